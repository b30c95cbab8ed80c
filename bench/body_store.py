"""Where should queued message bodies live: inline in LMDB, or in append-only spool files?

Measures, for both layouts and with fsync on (as in production):
  * insert: N messages, committed in batches of 1 or 100 (the group-commit sizes of an
    idle box and a busy one), each message = a ~300-byte msgpack envelope + its body;
  * churn: a steady state of `--live` queued messages where every new message is matched
    by the removal of a random queued one (delivery finishes in no particular order, and
    a deferred message can pin space for days) — this is where LMDB's overflow pages
    could fragment and spool segments could be pinned by a few survivors;
  * the disk used afterwards (data.mdb, plus the spool directory for the spool layout).

Layouts:
  lmdb   envelope and body in one write transaction (body in a `bodies` DB; LMDB stores
         values larger than ~2 KiB on runs of contiguous overflow pages).
  spool  body appended to the current 64 MiB segment file; fdatasync the segment, then one
         LMDB transaction holds the envelopes and (segment, offset, length). A segment is
         unlinked once sealed and holding no live message (no compaction: a real
         implementation would need one, which is part of the cost of this layout).
  queue  the real appliance.queue.Queue (lmdb layout) fed by concurrent submit() calls,
         `batch` at a time, to show the group commit end to end.

Usage: python bench/body_store.py [--quick] [--dir DIR]   (DIR should be on the real disk)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MAP_SIZE = 64 * 1024**3
SEGMENT_SIZE = 64 * 1024 * 1024


def envelope(qid: bytes, size: int, where: tuple[int, int, int] | None = None) -> bytes:
    doc = {
        "qid": qid.decode(),
        "arrived": time.time(),
        "sender": "someone@example.org",
        "mail_params": [["BODY", "8BITMIME"], ["SIZE", str(size)]],
        "recipients": [
            {"address": f"user{i}@example.com", "params": [], "state": "pending"} for i in range(3)
        ],
        "size": size,
        "peer_ip": "192.0.2.10",
        "helo": "client.example.org",
        "next_attempt": 0.0,
        "body": list(where) if where else None,
    }
    data: bytes = msgpack.packb(doc)
    return data


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class LmdbStore:
    name = "lmdb"

    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=4, sync=True, metasync=True)
        self.messages = self.env.open_db(b"messages")
        self.bodies = self.env.open_db(b"bodies")
        self.path = path

    def insert(self, batch: list[tuple[bytes, bytes]], delete: list[bytes]) -> None:
        with self.env.begin(write=True) as txn:
            for qid, body in batch:
                txn.put(qid, envelope(qid, len(body)), db=self.messages)
                txn.put(qid, body, db=self.bodies)
            for qid in delete:
                txn.delete(qid, db=self.messages)
                txn.delete(qid, db=self.bodies)

    def disk(self) -> int:
        return dir_bytes(self.path)

    def close(self) -> None:
        self.env.close()


class SpoolStore:
    name = "spool"

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(path / "env"), map_size=MAP_SIZE, max_dbs=4, sync=True, metasync=True
        )
        self.messages = self.env.open_db(b"messages")
        self.spool = path / "spool"
        self.spool.mkdir(exist_ok=True)
        self.path = path
        self.segment = -1
        self.fd = -1
        self.offset = 0
        self.live: dict[int, int] = {}
        self.where: dict[bytes, int] = {}
        self._new_segment()

    def _new_segment(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            if self.live.get(self.segment, 0) == 0:
                os.unlink(self.spool / f"{self.segment:08d}")
        self.segment += 1
        self.fd = os.open(self.spool / f"{self.segment:08d}", os.O_WRONLY | os.O_CREAT, 0o600)
        self.offset = 0
        # The new file's directory entry must be durable before anything points into it.
        dfd = os.open(self.spool, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)

    def insert(self, batch: list[tuple[bytes, bytes]], delete: list[bytes]) -> None:
        placed = []
        for qid, body in batch:
            if self.offset + len(body) > SEGMENT_SIZE and self.offset:
                os.fdatasync(self.fd)
                self._new_segment()
            os.pwrite(self.fd, body, self.offset)
            placed.append((qid, (self.segment, self.offset, len(body))))
            self.offset += len(body)
            self.live[self.segment] = self.live.get(self.segment, 0) + 1
            self.where[qid] = self.segment
        os.fdatasync(self.fd)
        with self.env.begin(write=True) as txn:
            for qid, where in placed:
                txn.put(qid, envelope(qid, where[2], where), db=self.messages)
            for qid in delete:
                txn.delete(qid, db=self.messages)
        for qid in delete:
            seg = self.where.pop(qid)
            self.live[seg] -= 1
            if self.live[seg] == 0 and seg != self.segment:
                os.unlink(self.spool / f"{seg:08d}")
                del self.live[seg]

    def disk(self) -> int:
        return dir_bytes(self.path)

    def close(self) -> None:
        os.close(self.fd)
        self.env.close()


@dataclass
class Result:
    layout: str
    size: str
    batch: int
    insert_rate: float
    insert_mb_s: float
    after_insert: int
    churn_rate: float
    after_churn: int
    payload: int
    live_after_churn: int = 0


def body_sizes(kind: str, n: int, rng: random.Random) -> list[int]:
    if kind == "mixed":  # roughly a gateway's mix: mostly small, a few large
        return [rng.choices([4096, 65536, 1 << 20], [70, 25, 5])[0] for _ in range(n)]
    return [int(kind)] * n


def run_store(
    make: Callable[[Path], LmdbStore | SpoolStore],
    root: Path,
    kind: str,
    batch: int,
    count: int,
    churn: int,
) -> Result:
    rng = random.Random(42)
    path = root / f"{kind}-{batch}"
    store = make(path)
    sizes = body_sizes(kind, count + churn, rng)
    blobs = {s: os.urandom(s) for s in set(sizes)}
    live: list[bytes] = []
    seq = 0

    def batch_of(n: int) -> list[tuple[bytes, bytes]]:
        nonlocal seq
        out = []
        for _ in range(n):
            qid = f"{seq:018d}".encode()
            out.append((qid, blobs[sizes[seq]]))
            seq += 1
        return out

    t0 = time.perf_counter()
    nbytes = 0
    while seq < count:
        items = batch_of(min(batch, count - seq))
        nbytes += sum(len(b) for _, b in items)
        store.insert(items, [])
        live.extend(q for q, _ in items)
    t_insert = time.perf_counter() - t0
    after_insert = store.disk()

    t0 = time.perf_counter()
    done = 0
    while done < churn:
        n = min(batch, churn - done, len(live))
        gone = []
        for _ in range(n):  # remove random live messages
            i = rng.randrange(len(live))
            live[i], live[-1] = live[-1], live[i]
            gone.append(live.pop())
        items = batch_of(n)
        store.insert(items, gone)
        live.extend(q for q, _ in items)
        done += n
    t_churn = time.perf_counter() - t0
    result = Result(
        layout=store.name,
        size=kind,
        batch=batch,
        insert_rate=count / t_insert,
        insert_mb_s=nbytes / t_insert / 1e6,
        after_insert=after_insert,
        churn_rate=churn / t_churn if churn else 0.0,
        after_churn=store.disk(),
        payload=nbytes,
        live_after_churn=sum(sizes[int(q)] for q in live),
    )
    store.close()
    shutil.rmtree(path)
    return result


def run_queue(root: Path, kind: str, batch: int, count: int) -> Result:
    """End to end through appliance.queue.Queue: `batch` concurrent submitters."""
    import uvloop

    from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id

    sizes = body_sizes(kind, count, random.Random(42))
    blobs = {s: os.urandom(s) for s in set(sizes)}
    path = root / f"queue-{kind}-{batch}"
    stats: list[int] = []

    async def main() -> float:
        q = Queue(path, durable=True)
        it = iter(sizes)

        async def worker() -> None:
            for size in it:
                rec = MessageRecord(
                    qid=new_queue_id(),
                    arrived=time.time(),
                    sender="someone@example.org",
                    mail_params=[],
                    recipients=[RecipientRecord(f"u{i}@example.com", []) for i in range(3)],
                    size=size,
                )
                await q.submit(rec, blobs[size])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(batch)))
        elapsed = time.perf_counter() - t0
        stats.extend([q.stats.commits, dir_bytes(q.path)])
        await q.close()
        return elapsed

    elapsed = uvloop.run(main())
    shutil.rmtree(path)
    return Result(
        "queue",
        kind,
        batch,
        count / elapsed,
        sum(sizes) / elapsed / 1e6,
        stats[1],
        0.0,
        0,
        sum(sizes),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", help="scratch directory (default: a temp dir under ./var)")
    ap.add_argument("--quick", action="store_true", help="a smaller run for a smoke test")
    ap.add_argument(
        "--size",
        choices=["4096", "65536", "1048576", "mixed"],
        action="append",
        help="only these body sizes (repeatable)",
    )
    ap.add_argument(
        "--churn",
        type=float,
        default=2.0,
        help="messages replaced during churn, as a multiple of the live count",
    )
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path("var")
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-body-", dir=base))
    scale = 0.1 if args.quick else 1.0
    # Counts keep every run around 100-500 MB written so the whole suite takes minutes.
    plan = {"4096": 3000, "65536": 1500, "1048576": 200, "mixed": 1500}
    print(
        f"{'layout':6} {'body':>8} {'batch':>5} {'ins msg/s':>10} {'ins MB/s':>9} "
        f"{'disk/payload after insert':>26} {'churn msg/s':>11} {'disk/live after churn':>26}"
    )
    try:
        for kind, count in plan.items():
            if args.size and kind not in args.size:
                continue
            count = max(20, int(count * scale))
            for batch in (1, 100):
                n = count if batch == 100 else max(20, count // 5)  # batch 1 is fsync-bound
                for make in (LmdbStore, SpoolStore):
                    r = run_store(make, root, kind, batch, n, churn=int(n * args.churn))
                    _print(r)
                _print(run_queue(root, kind, batch, n))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _print(r: Result) -> None:
    mib = 1024 * 1024
    label = {"4096": "4KiB", "65536": "64KiB", "1048576": "1MiB"}.get(r.size, r.size)
    churn = f"{r.churn_rate:11.0f}" if r.churn_rate else f"{'-':>11}"
    after = (
        f"{r.after_churn / mib:8.1f}MiB/{r.live_after_churn / mib:7.1f}MiB"
        if r.after_churn
        else f"{'-':>26}"
    )
    print(
        f"{r.layout:6} {label:>8} {r.batch:>5} {r.insert_rate:10.0f} {r.insert_mb_s:9.1f} "
        f"{r.after_insert / mib:10.1f}MiB/{r.payload / mib:7.1f}MiB {churn} {after}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
