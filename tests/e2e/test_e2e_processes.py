"""End to end: `[delivery] processes = 2` under a real `sluice run`.

Two delivery processes share the queue, each delivering its own shard of the queue ids:
a batch arrives at the next hop exactly once, both processes take part, `sluice hosts`
shows them as one, SIGHUP and SIGTERM reach both, and a delivery process killed with
kill -9 is started again while mail keeps flowing.
"""

from __future__ import annotations

import json
import os
import signal
from typing import TYPE_CHECKING, Any

from appliance.queue import shard_of
from tests.e2e.harness import Sluice, SluiceFactory, route_to, wait_until

if TYPE_CHECKING:
    from tests.conftest import Sink, SinkFactory


def send_batch(server: Sluice, count: int, tag: str) -> list[str]:
    subjects = [f"{tag}-{i}" for i in range(count)]
    with server.smtp() as client:
        for subject in subjects:
            body = f"Subject: {subject}\r\n\r\nbatch\r\n".encode()
            assert client.sendmail("alice@src.test", [f"{subject}@ok.test"], body) == {}
    return subjects


def delivered_subjects(sink: Sink) -> list[str]:
    out = []
    for msg in sink.messages():
        for line in msg.data.split(b"\n"):
            if line.startswith(b"Subject: "):
                out.append(line[len(b"Subject: ") :].decode().strip())
                break
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def started_pids(server: Sluice) -> dict[int, int]:
    """Shard -> pid of its latest delivery process."""
    return {e["shard"]: e["pid"] for e in server.events("delivery_started")}


def hosts_json(server: Sluice) -> dict[str, Any]:
    res = server.cli("hosts", "--config", str(server.config_path), "--json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def ok_row(doc: dict[str, Any]) -> dict[str, Any]:
    return next((r for r in doc["destinations"] if r["domain"] == "ok.test"), {})


def test_two_processes_deliver_a_batch_exactly_once(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    server = sluice(
        routes={"ok.test": route_to(sink)},
        delivery={"processes": 2, "max_connections": 8},
        destinations={"*": {"max_connections": 4}},
    )
    starts = server.wait_event("delivery_started", count=2)
    assert sorted(e["shard"] for e in starts) == [0, 1]
    assert all(e["processes"] == 2 for e in starts)
    pids = started_pids(server)
    assert len(set(pids.values())) == 2

    subjects = send_batch(server, 200, "m")
    assert wait_until(lambda: len(sink.messages()) >= 200, timeout=60), len(sink.messages())
    server.wait_event("delivered", count=200)
    got = delivered_subjects(sink)
    assert sorted(got) == sorted(subjects)  # every message, each exactly once
    assert wait_until(lambda: server.queue_json() == [], timeout=10)

    # Both processes delivered: each publishes its own counts, and the CLI adds them up.
    def merged() -> dict[str, Any] | None:
        doc = hosts_json(server)
        return doc if ok_row(doc).get("delivered") == 200 else None

    doc = wait_until(merged)
    assert doc, hosts_json(server)
    assert doc["running"] is True and server.proc is not None and doc["pid"] == server.proc.pid
    row = ok_row(doc)
    assert row["queued"] == 0 and row["deferred"] == 0 and row["bounced"] == 0
    assert row["connection_limit"] == 4  # 2 per process, summed
    assert row["last_reply"].startswith(f"{sink.host}: 250")
    per_shard = [json.loads((server.data_dir / f"hosts-{k}.json").read_text()) for k in (0, 1)]
    counts = [s["destinations"]["ok.test"]["delivered"] for s in per_shard]
    assert all(c > 0 for c in counts) and sum(counts) == 200, counts
    assert [s["shard"] for s in per_shard] == [[0, 2], [1, 2]]
    # Each delivered exactly the queue ids of its shard.
    qids = [e["qid"] for e in server.events("delivered")]
    assert sorted(sum(1 for q in qids if shard_of(q, 2) == k) for k in (0, 1)) == sorted(counts)
    assert not (server.data_dir / "hosts.json").exists()

    text = server.cli("hosts", "--config", str(server.config_path))
    line = next(x for x in text.stdout.splitlines() if x.startswith("ok.test"))
    assert line.split()[2:6] == ["0", "200", "0", "0"]

    # SIGHUP reaches both delivery processes (each reopens the event log).
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    server.wait_event("log_reopened", count=3, timeout=10)

    # SIGTERM: the parent waits for both, and neither is restarted.
    assert server.stop() == 0
    assert not any(alive(pid) for pid in pids.values())
    assert server.events("delivery_exited") == []
    stopped = hosts_json(server)
    assert stopped["running"] is False and ok_row(stopped)["delivered"] == 200


def test_a_killed_delivery_process_is_restarted_and_mail_flows(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    server = sluice(routes={"ok.test": route_to(sink)}, delivery={"processes": 2})
    server.wait_event("delivery_started", count=2)
    before = started_pids(server)
    victim, survivor = before[1], before[0]

    os.kill(victim, signal.SIGKILL)
    (exited,) = server.wait_event("delivery_exited", shard=1)
    assert exited["pid"] == victim and exited["status"] == -signal.SIGKILL
    server.wait_event("delivery_started", count=2, shard=1)
    after = started_pids(server)
    assert after[0] == survivor and alive(survivor)  # the other one was left alone
    assert after[1] != victim and alive(after[1])
    assert server.events("delivery_exited", shard=0) == []

    subjects = send_batch(server, 30, "after-kill")
    assert wait_until(lambda: len(sink.messages()) >= 30, timeout=30), len(sink.messages())
    assert sorted(delivered_subjects(sink)) == sorted(subjects)
    qids = [e["qid"] for e in server.wait_event("delivered", count=30)]
    assert {shard_of(q, 2) for q in qids} == {0, 1}  # the restarted one delivers its shard
    assert wait_until(lambda: server.queue_json() == [], timeout=10)
    assert server.stop() == 0
    assert not alive(after[1]) and not alive(survivor)


def test_delivery_processes_die_with_the_parent(
    sluice: SluiceFactory, smtp_sink: SinkFactory
) -> None:
    sink = smtp_sink()
    server = sluice(routes={"ok.test": route_to(sink)}, delivery={"processes": 3})
    server.wait_event("delivery_started", count=3)
    pids = list(started_pids(server).values())
    assert len(pids) == 3
    server.kill()  # kill -9 of `sluice run`: PR_SET_PDEATHSIG takes every child along
    assert wait_until(lambda: not any(alive(p) for p in pids), timeout=10)
