"""Tests for appliance.queue: the LMDB queue with group commit, on uvloop like the product."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import pytest
import uvloop

from appliance.queue import (
    MessageRecord,
    Queue,
    RecipientRecord,
    decode_record,
    encode_record,
    new_queue_id,
    shard_of,
)

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


def make_record(next_attempt: float = 0.0, rcpts: int = 2, **kw: Any) -> MessageRecord:
    return MessageRecord(
        qid=new_queue_id(),
        arrived=time.time(),
        sender=kw.pop("sender", "alice@example.org"),
        mail_params=[("BODY", "8BITMIME"), ("SMTPUTF8", None)],
        recipients=[
            RecipientRecord(f"r{i}@example.com", [("NOTIFY", "FAILURE")]) for i in range(rcpts)
        ],
        size=100,
        peer_ip="192.0.2.1",
        helo="client.example.org",
        listener="inbound",
        next_attempt=next_attempt,
        **kw,
    )


def test_queue_id_shape_and_order() -> None:
    ids = []
    for _ in range(50):
        ids.append(new_queue_id())
        time.sleep(0.001)
    assert len(set(ids)) == 50
    assert all(16 <= len(q) <= 20 and q.isalnum() and q.isascii() for q in ids)
    # Ids made in different milliseconds sort by time.
    assert ids == sorted(ids)


def test_encoding_round_trip() -> None:
    rec = make_record(next_attempt=12.5, sender="", is_bounce=True)
    rec.recipients[0].state = "deferred"
    rec.recipients[0].attempts = 3
    rec.recipients[0].last_reply = "451 4.7.1 try later"
    assert decode_record(encode_record(rec)) == rec


def test_round_trip(tmp_path: Path) -> None:
    async def main() -> None:
        q = Queue(tmp_path, durable=False)
        rec = make_record()
        body = b"Subject: hi\r\n\r\nhello\r\n"
        await q.submit(rec, body)
        assert q.get(rec.qid) == rec
        assert q.body(rec.qid) == body
        assert q.count() == 1
        assert [r.qid for r in q.all()] == [rec.qid]
        assert q.get("nosuchqid") is None
        with pytest.raises(KeyError):
            q.body("nosuchqid")
        await q.close()

    run(main())


def test_group_commit_batches_concurrent_submits(tmp_path: Path) -> None:
    async def main() -> None:
        q = Queue(tmp_path, durable=True)
        records = [make_record() for _ in range(200)]
        # A task that must keep running while commits (and their fsyncs) happen.
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        await asyncio.gather(*(q.submit(r, b"x" * 1000) for r in records))
        tick_task.cancel()
        assert q.stats.messages_committed == 200
        assert q.stats.commits < 20, q.stats
        assert q.count() == 200
        assert ticks > 0
        await q.close()

    run(main())


def test_group_commit_under_steady_arrivals(tmp_path: Path) -> None:
    # Submitters arriving while a commit is in flight share the next one.
    async def main() -> None:
        q = Queue(tmp_path, durable=True)

        async def client(i: int) -> None:
            for _ in range(10):
                await q.submit(make_record(), b"y" * 4096)

        await asyncio.gather(*(client(i) for i in range(20)))
        assert q.stats.messages_committed == 200
        assert q.stats.commits < 200
        await q.close()

    run(main())


def test_due_ordering_update_remove(tmp_path: Path) -> None:
    async def main() -> None:
        q = Queue(tmp_path, durable=False)
        assert q.next_due_time() is None
        assert q.due(time.time(), 10) == []
        recs = [make_record(next_attempt=t) for t in (500.0, 100.0, 300.0, 200.0, 10_000.0)]
        for r in recs:
            await q.submit(r, b"body " + r.qid.encode())
        assert q.next_due_time() == 100.0
        assert [r.next_attempt for r in q.due(1000.0, 10)] == [100.0, 200.0, 300.0, 500.0]
        assert [r.next_attempt for r in q.due(1000.0, 2)] == [100.0, 200.0]
        assert [r.next_attempt for r in q.due(300.0, 10)] == [100.0, 200.0, 300.0]

        # Defer the earliest: it moves to its new place in the schedule.
        first = recs[1]
        first.next_attempt = 400.0
        first.attempts = 1
        first.recipients[0].state = "deferred"
        first.recipients[0].last_reply = "451 4.3.0 later"
        await q.update(first)
        assert [r.next_attempt for r in q.due(1000.0, 10)] == [200.0, 300.0, 400.0, 500.0]
        assert q.get(first.qid) == first
        assert q.next_due_time() == 200.0

        # A finished message leaves the schedule but stays until removed.
        second = recs[3]
        for rcpt in second.recipients:
            rcpt.state = "delivered"
        await q.update(second)
        assert second.qid not in [r.qid for r in q.due(1000.0, 10)]
        assert q.get(second.qid) == second
        await q.remove(second.qid)
        assert q.get(second.qid) is None
        with pytest.raises(KeyError):
            q.body(second.qid)
        assert q.count() == 4

        await q.remove(recs[2].qid)
        assert [r.next_attempt for r in q.due(1000.0, 10)] == [400.0, 500.0]
        # Updating a removed message must not resurrect it.
        await q.update(recs[2])
        assert q.get(recs[2].qid) is None
        await q.close()

    run(main())


def test_reopen_after_close(tmp_path: Path) -> None:
    recs = [make_record(next_attempt=float(i)) for i in range(5)]

    async def write() -> None:
        q = Queue(tmp_path)
        for r in recs:
            await q.submit(r, r.qid.encode() * 3)
        await q.remove(recs[0].qid)
        await q.close()
        await q.close()  # idempotent
        with pytest.raises(RuntimeError):
            await q.submit(make_record(), b"")

    async def read() -> None:
        q = Queue(tmp_path)
        assert q.count() == 4
        assert [r.qid for r in q.due(100.0, 10)] == [r.qid for r in recs[1:]]
        for r in recs[1:]:
            assert q.get(r.qid) == r
            assert q.body(r.qid) == r.qid.encode() * 3
        await q.close()

    run(write())
    run(read())


def test_readonly_open(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Queue(tmp_path / "missing", readonly=True)

    async def main() -> None:
        q = Queue(tmp_path)
        rec = make_record()
        await q.submit(rec, b"b")
        await q.close()

    run(main())
    ro = Queue(tmp_path, readonly=True)
    assert ro.count() == 1
    assert len(list(ro.all())) == 1
    with pytest.raises(RuntimeError, match="read-only"):
        run(ro.remove("x"))
    ro.close_sync()


def test_double_open_in_one_process_refused(tmp_path: Path) -> None:
    q = Queue(tmp_path, durable=False)
    with pytest.raises(RuntimeError, match="already open"):
        Queue(tmp_path, durable=False)
    q.close_sync()


def test_all_spans_several_read_transactions(tmp_path: Path) -> None:
    async def main() -> None:
        q = Queue(tmp_path, durable=False)
        recs = [make_record() for _ in range(1234)]
        await asyncio.gather(*(q.submit(r, b"") for r in recs))
        assert sorted(r.qid for r in q.all()) == sorted(r.qid for r in recs)
        assert len(list(q.all())) == 1234
        await q.close()

    run(main())


def test_corrupt_record_is_quarantined(tmp_path: Path) -> None:
    good, bad = make_record(next_attempt=1.0), make_record(next_attempt=2.0)

    async def write() -> None:
        q = Queue(tmp_path)
        await q.submit(good, b"good body")
        await q.submit(bad, b"bad body")
        await q.close()

    run(write())
    # Damage one envelope behind the queue's back.
    env = lmdb.open(str(tmp_path / "queue"), max_dbs=8, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(bad.qid.encode(), b"\xc1 not msgpack", db=env.open_db(b"messages", txn=txn))
    env.close()

    async def read() -> None:
        q = Queue(tmp_path)
        assert [r.qid for r in q.due(10.0, 10)] == [good.qid]  # skipped, not fatal
        assert q.get(bad.qid) is None
        assert [r.qid for r in q.all()] == [good.qid]
        # The move to quarantine is queued behind the read; any later write flushes it.
        await q.update(good)
        assert q.quarantined() == [bad.qid]
        assert q.count() == 1
        assert q.stats.quarantined == 1
        await q.close()

    run(read())

    async def reopen() -> None:
        q = Queue(tmp_path)
        assert q.quarantined() == [bad.qid]
        assert [r.qid for r in q.due(10.0, 10)] == [good.qid]
        await q.close()

    run(reopen())


CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    import uvloop
    from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id

    async def main() -> None:
        q = Queue(Path(sys.argv[1]), durable=True)

        async def client() -> None:
            while True:
                qid = new_queue_id()
                rcpt = RecipientRecord("b@example.com", [])
                rec = MessageRecord(qid=qid, arrived=time.time(), sender="a@example.org",
                                    mail_params=[], recipients=[rcpt], size=0)
                await q.submit(rec, qid.encode() * 200)
                sys.stdout.write(qid + "\\n")
                sys.stdout.flush()

        await asyncio.gather(*(client() for _ in range(16)))

    uvloop.run(main())
    """
)


def test_kill_9_loses_no_acknowledged_message(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 500 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged.append(line.decode().strip())
    # Kill while 16 submitters are mid-flight, some in the batch being committed.
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read().decode()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 500, "the child did not get going"
    # Lines printed after our count were acknowledged too; a trailing partial line was
    # cut by the kill and proves nothing.
    acknowledged += [ln for ln in rest.split("\n")[:-1] if ln]

    async def check() -> None:
        q = Queue(tmp_path / "data")
        for qid in acknowledged:
            assert q.body(qid) == qid.encode() * 200, qid
            rec = q.get(qid)
            assert rec is not None and rec.qid == qid
        assert q.count() >= len(acknowledged)
        await q.close()

    run(check())


def test_due_and_next_due_time_keep_to_a_shard(tmp_path: Path) -> None:
    async def main() -> None:
        q = Queue(tmp_path, durable=False)
        recs = [make_record(next_attempt=float(100 + i)) for i in range(40)]
        for r in recs:
            await q.submit(r, b"body")
        for index in (0, 1):
            mine = [r for r in recs if shard_of(r.qid, 2) == index]
            assert mine, "40 random ids all in one shard"
            due = q.due(1000.0, 100, shard=(index, 2))
            assert [r.qid for r in due] == [r.qid for r in mine]
            assert q.next_due_time(shard=(index, 2)) == mine[0].next_attempt
        assert q.next_due_time() == 100.0
        await q.close()

    run(main())
