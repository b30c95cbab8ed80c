"""The durable mail queue: envelopes, bodies and the retry schedule in one LMDB environment.

Who talks to it: the inbound path calls `submit()` once policy accepted a message and sends
the 250 reply (RFC 5321 section 4.1.1.4: after a 250 to the end of DATA the server has
taken responsibility for the message) only when `submit()` returns, which is only after the
record and its body are committed and fsync'ed. The scheduler and delivery read `due()`
and write back per-recipient state with `update()`, then `remove()` the message when every
recipient is delivered or bounced. `sluice queue` opens the same environment read-only
from another process while the server runs (LMDB readers never block the writer).

Layout under `<data_dir>/queue` (an LMDB environment, records encoded with msgpack):

    messages    qid -> envelope record (a msgpack map; unknown keys are ignored so later
                versions may add fields; `bounce_profile` and `delay_warned` were added
                that way and default to "" / false when absent)
    bodies      qid -> the message bytes as received (CRLF line ends, RFC 5322)
    schedule    8-byte big-endian next-attempt time in ms + qid -> b"" (an index: cursor
                order is due order)
    quarantine  qid -> msgpack map of the undecodable envelope, its body and the reason

Bodies live inline in LMDB; docs/queue.md has the measurements against append-only spool
files that led to this.

Group commit: there is exactly one writer, a dedicated thread. Callers on the event loop
put operations on a pending list and await a future; the writer takes everything pending,
applies it in one write transaction, commits (py-lmdb releases the GIL for the commit and
its fsync, so the loop keeps accepting mail meanwhile and the next batch accumulates) and
then tells every waiter of that batch (a future, or a plain callback from
`submit_then()`) from one callback per event loop. The cost of an
fsync is thus shared by however many messages arrived during the previous one.

Crash safety: LMDB is copy-on-write with two meta pages; a transaction is visible only
once its meta page is written, and with sync/metasync on, commit returns only after the
data and the meta page reached the disk. A kill -9 or power loss therefore leaves the last
committed state, and no future is resolved before its commit returned.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lmdb
import msgpack

from appliance.eventlog import log_event

RecipientState = Literal["pending", "deferred", "delivered", "bounced"]
_STATES: frozenset[str] = frozenset(("pending", "deferred", "delivered", "bounced"))

# The map is sparse: LMDB reserves address space, the file grows only with use.
MAP_SIZE = 64 * 1024**3
# Bound one transaction so a flood cannot make a single commit (and the 250s waiting on
# it) arbitrarily slow; the remainder goes into the next batch.
MAX_BATCH_OPS = 1000
MAX_BATCH_BYTES = 64 * 1024 * 1024
# Records read per read transaction by all(): a long-lived reader pins old pages and would
# make the file grow under churn, so the scan resumes in a fresh transaction.
_SCAN_CHUNK = 500


@dataclass
class RecipientRecord:
    address: str
    params: list[tuple[str, str | None]]
    state: RecipientState = "pending"
    attempts: int = 0
    last_reply: str = ""
    updated: float = 0.0


@dataclass
class MessageRecord:
    qid: str
    arrived: float
    sender: str  # "" is the null reverse path <> (RFC 5321 section 4.5.5)
    mail_params: list[tuple[str, str | None]]
    recipients: list[RecipientRecord]
    size: int
    peer_ip: str = ""
    helo: str = ""
    listener: str = ""
    next_attempt: float = 0.0
    attempts: int = 0
    is_bounce: bool = False  # a DSN we generated: never bounced again (RFC 3464 section 2)
    # The bounce profile chosen at acceptance (the listener's); "" means "default".
    bounce_profile: str = ""
    # A "delayed" DSN (RFC 3464 Action: delayed) was already sent for this message.
    delay_warned: bool = False

    def pending_recipients(self) -> list[RecipientRecord]:
        return [r for r in self.recipients if r.state in ("pending", "deferred")]

    def done(self) -> bool:
        return not self.pending_recipients()


@dataclass
class QueueStats:
    """Counters for metrics and benchmarks; written by the writer thread only."""

    commits: int = 0
    messages_committed: int = 0  # submit() operations made durable
    operations_committed: int = 0  # submit + update + remove
    largest_batch: int = 0
    quarantined: int = 0


# ---------------------------------------------------------------------------------------
# Queue ids

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # ASCII order


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, d = divmod(n, 62)
        out.append(_ALPHABET[d])
    return "".join(reversed(out))


def new_queue_id() -> str:
    """18 characters: 8 of milliseconds since the epoch, 10 random (about 59 bits).

    The alphabet is in ASCII order and the time part fixed-width, so ids sort by arrival
    time as plain strings (and as LMDB keys); the random part keeps ids unique across
    processes and boxes without coordination. 62**8 ms lasts until the year 8888.
    """
    ms = time.time_ns() // 1_000_000
    return _base62(ms, 8) + _base62(secrets.randbits(59), 10)


# ---------------------------------------------------------------------------------------
# Record encoding


class CorruptRecord(Exception):
    """An envelope record that cannot be decoded."""


def encode_record(record: MessageRecord) -> bytes:
    doc = {
        "v": 1,
        "qid": record.qid,
        "arrived": float(record.arrived),
        "sender": record.sender,
        "mail_params": [[k, v] for k, v in record.mail_params],
        "recipients": [
            {
                "address": r.address,
                "params": [[k, v] for k, v in r.params],
                "state": r.state,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "updated": float(r.updated),
            }
            for r in record.recipients
        ],
        "size": record.size,
        "peer_ip": record.peer_ip,
        "helo": record.helo,
        "listener": record.listener,
        "next_attempt": float(record.next_attempt),
        "attempts": record.attempts,
        "is_bounce": record.is_bounce,
        "bounce_profile": record.bounce_profile,
        "delay_warned": record.delay_warned,
    }
    # surrogateescape: addresses decoded leniently from 8-bit input round-trip unchanged.
    data: bytes = msgpack.packb(doc, use_bin_type=True, unicode_errors="surrogateescape")
    return data


def _typed(doc: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptRecord(f"field {key!r} has type {type(value).__name__}")
    return value


def _optional(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    return _typed(doc, key, kind) if key in doc else default


def _params(value: object) -> list[tuple[str, str | None]]:
    if not isinstance(value, list):
        raise CorruptRecord("params is not a list")
    out: list[tuple[str, str | None]] = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not (item[1] is None or isinstance(item[1], str))
        ):
            raise CorruptRecord("malformed parameter")
        out.append((item[0], item[1]))
    return out


def decode_record(data: bytes) -> MessageRecord:
    """Decode an envelope; raises CorruptRecord for anything that is not a valid record."""
    try:
        doc = msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape")
        if not isinstance(doc, dict):
            raise CorruptRecord("record is not a map")
        recipients = []
        for r in _typed(doc, "recipients", list):
            if not isinstance(r, dict):
                raise CorruptRecord("recipient is not a map")
            state = _typed(r, "state", str)
            if state not in _STATES:
                raise CorruptRecord(f"unknown recipient state {state!r}")
            recipients.append(
                RecipientRecord(
                    address=_typed(r, "address", str),
                    params=_params(r["params"]),
                    state=state,
                    attempts=_typed(r, "attempts", int),
                    last_reply=_typed(r, "last_reply", str),
                    updated=float(_typed(r, "updated", (int, float))),
                )
            )
        return MessageRecord(
            qid=_typed(doc, "qid", str),
            arrived=float(_typed(doc, "arrived", (int, float))),
            sender=_typed(doc, "sender", str),
            mail_params=_params(doc["mail_params"]),
            recipients=recipients,
            size=_typed(doc, "size", int),
            peer_ip=_typed(doc, "peer_ip", str),
            helo=_typed(doc, "helo", str),
            listener=_typed(doc, "listener", str),
            next_attempt=float(_typed(doc, "next_attempt", (int, float))),
            attempts=_typed(doc, "attempts", int),
            is_bounce=_typed(doc, "is_bounce", bool),
            # Added later: records written before have neither key.
            bounce_profile=_optional(doc, "bounce_profile", str, ""),
            delay_warned=_optional(doc, "delay_warned", bool, False),
        )
    except CorruptRecord:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise CorruptRecord(f"{type(exc).__name__}: {exc}") from None


def _next_attempt_of(raw: bytes) -> float | None:
    """The `next_attempt` of a stored envelope without building the whole record (the
    writer needs only that to find the schedule entry to move); None if undecodable."""
    try:
        doc = msgpack.unpackb(raw, raw=False, unicode_errors="surrogateescape")
        value = doc["next_attempt"]
    except Exception:  # msgpack raises several unrelated types; not a map; no key
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def shard_of(qid: str, count: int) -> int:
    """The delivery shard (0 .. count-1) a queue id belongs to: a hash of the id, so the
    shards are even whatever the ids look like, and stable across restarts."""
    return _shard_of_key(qid.encode("ascii", "replace"), count)


def _shard_of_key(key: bytes, count: int) -> int:
    return zlib.crc32(key) % count


def _qid_key(qid: str) -> bytes:
    # Checked before the operation joins a batch: a key LMDB refuses (over 511 bytes)
    # would otherwise fail the whole transaction and every message sharing it.
    key = qid.encode("ascii")
    if not 0 < len(key) <= 64:
        raise ValueError(f"bad queue id {qid!r}")
    return key


def _ms(t: float) -> int:
    return max(0, int(t * 1000))


def _schedule_key(ms: int, qid: bytes) -> bytes:
    return ms.to_bytes(8, "big") + qid


# ---------------------------------------------------------------------------------------
# The queue


@dataclass
class _Op:
    kind: Literal["put", "update", "remove", "quarantine", "unindex"]
    qid: bytes
    envelope: bytes = b""  # put/update: encoded record; quarantine: the corrupt bytes seen
    body: bytes = b""
    sched: bytes | None = None  # put/update: new schedule key (None: not scheduled)
    reason: str = ""
    # Called on that loop once the operation's batch is committed (None) or failed.
    waiter: tuple[asyncio.AbstractEventLoop, Callable[[BaseException | None], None]] | None = None
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.envelope) + len(self.body)


# LMDB must not be opened twice in one process (its locks are per process); catch it here
# with a clear message rather than as silent lock corruption.
_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


class Queue:
    def __init__(
        self,
        data_dir: Path,
        *,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
        metasync: bool | None = None,
    ) -> None:
        """Open (creating unless `readonly`) the queue under `data_dir/queue`.

        `durable=False` skips fsync: for tests and benchmarks only, never production.
        `metasync=False` (LMDB's MDB_NOMETASYNC; default: as `durable`) syncs the data
        of each commit but not the meta page that publishes it: one fsync per commit
        instead of two. LMDB keeps the database intact; a system crash may undo the
        last commit. The delivery process opens the queue so: what it writes are
        outcomes, and an undone outcome means a message is delivered again
        (at-least-once), never lost. The listener keeps full sync, as the 250 requires.
        `readonly=True` is for inspection from another process (`sluice queue`); it raises
        FileNotFoundError when there is no queue yet and never writes, so corrupt records
        are skipped rather than quarantined.
        """
        self.path = Path(data_dir) / "queue"
        self.durable = durable
        self.readonly = readonly
        self._clock = clock
        self.stats = QueueStats()
        if readonly and not (self.path / "data.mdb").exists():
            raise FileNotFoundError(f"no queue at {self.path}")
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(self.path)
        with _open_paths_lock:
            if self._key in _open_paths:
                raise RuntimeError(f"queue {self.path} is already open in this process")
            _open_paths.add(self._key)
        try:
            self._env = lmdb.open(
                str(self.path),
                map_size=MAP_SIZE,
                max_dbs=8,
                subdir=True,
                readonly=readonly,
                lock=True,
                sync=durable,
                metasync=durable if metasync is None else (durable and metasync),
                # Bodies are read at random; readahead only pollutes the page cache.
                readahead=False,
            )
            # Free reader slots left behind by a process that was killed mid-read.
            self._env.reader_check()
            create = not readonly
            self._messages = self._env.open_db(b"messages", create=create)
            self._bodies = self._env.open_db(b"bodies", create=create)
            self._schedule = self._env.open_db(b"schedule", create=create)
            self._quarantine = self._env.open_db(b"quarantine", create=create)
        except BaseException:
            with _open_paths_lock:
                _open_paths.discard(self._key)
            raise

        self._cond = threading.Condition()
        self._pending: list[_Op] = []
        self._closing = False
        self._closed = False
        # qids seen corrupt and sent to quarantine but perhaps not yet moved.
        self._bad: set[bytes] = set()
        self._writer: threading.Thread | None = None
        if not readonly:
            self._writer = threading.Thread(
                target=self._writer_main, name="sluice-queue-writer", daemon=True
            )
            self._writer.start()

    # -- writes (all through the writer thread) ------------------------------------------

    async def submit(self, record: MessageRecord, body: bytes) -> None:
        """Store a new message; returns once it is durable (the moment to send 250)."""
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit_then(record, bytes(body), functools.partial(_settle, durable))
        await durable

    def submit_then(
        self, record: MessageRecord, body: bytes, done: Callable[[BaseException | None], None]
    ) -> None:
        """`submit()` for callers on the event loop that want a callback instead of an
        awaitable: `done(None)` runs on this loop once the message is durable, `done(exc)`
        if its batch failed. The listener uses it so that the 250s of a whole batch go out
        from one callback, with no task or future per message. Raises RuntimeError at once
        when the queue is closing."""
        qid = _qid_key(record.qid)
        sched = None if record.done() else _schedule_key(_ms(record.next_attempt), qid)
        op = _Op("put", qid, envelope=encode_record(record), body=body, sched=sched)
        op.waiter = (asyncio.get_running_loop(), done)
        self._enqueue(op)

    async def update(self, record: MessageRecord) -> None:
        """Rewrite the envelope and move its schedule entry to `record.next_attempt`.

        A record with no pending recipients leaves the schedule. Updating a message that
        was removed meanwhile does nothing: re-creating an envelope without a body would
        be worse than losing the update.
        """
        qid = _qid_key(record.qid)
        sched = None if record.done() else _schedule_key(_ms(record.next_attempt), qid)
        await self._run(_Op("update", qid, envelope=encode_record(record), sched=sched))

    async def remove(self, qid: str, scheduled_at: float | None = None) -> None:
        """Delete the envelope, the body and the schedule entry of a finished message.

        `scheduled_at`, the record's `next_attempt` as the caller read it, names the
        schedule entry so the writer need not read and decode the envelope to find it.
        """
        key = _qid_key(qid)
        sched = None if scheduled_at is None else _schedule_key(_ms(scheduled_at), key)
        await self._run(_Op("remove", key, sched=sched))

    async def _run(self, op: _Op) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        op.waiter = (loop, functools.partial(_settle, future))
        self._enqueue(op)
        await future

    def _enqueue(self, op: _Op) -> None:
        with self._cond:
            if self._closing or self.readonly:
                raise RuntimeError("queue is closed" if self._closing else "queue is read-only")
            self._pending.append(op)
            self._cond.notify()

    def _writer_main(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return  # closing and drained
                batch: list[_Op] = []
                size = 0
                for op in self._pending:
                    if batch and (len(batch) >= MAX_BATCH_OPS or size + op.size > MAX_BATCH_BYTES):
                        break
                    batch.append(op)
                    size += op.size
                del self._pending[: len(batch)]
            self._commit(batch)

    def _commit(self, batch: list[_Op]) -> None:
        error: BaseException | None = None
        try:
            with self._env.begin(write=True) as txn:
                for op in batch:
                    self._apply(txn, op)
            # Leaving the block committed (and, when durable, fsync'ed) the transaction.
        except Exception as exc:
            # Disk full, map full or I/O error: nothing of the batch is stored, and every
            # submitter is told so (it answers 4xx and the client retries later).
            error = exc
            log_event("queue_error", error=f"{type(exc).__name__}: {exc}", batch=len(batch))
        else:
            self.stats.commits += 1
            self.stats.operations_committed += len(batch)
            self.stats.messages_committed += sum(1 for op in batch if op.kind == "put")
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[BaseException | None], None]]]
        by_loop = {}
        for op in batch:
            if op.waiter is not None:
                by_loop.setdefault(op.waiter[0], []).append(op.waiter[1])
        for loop, callbacks in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, callbacks, error)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more

    def _apply(self, txn: lmdb.Transaction, op: _Op) -> None:
        qid = op.qid
        if op.kind == "put":
            self._unindex(txn, qid)  # a re-submitted qid must not leave a stale entry
            txn.put(qid, op.envelope, db=self._messages)
            txn.put(qid, op.body, db=self._bodies)
            if op.sched is not None:
                txn.put(op.sched, b"", db=self._schedule)
        elif op.kind == "update":
            if txn.get(qid, db=self._messages) is None:
                log_event("queue_update_missing", qid=qid.decode("ascii"))
                return
            self._unindex(txn, qid)
            txn.put(qid, op.envelope, db=self._messages)
            if op.sched is not None:
                txn.put(op.sched, b"", db=self._schedule)
        elif op.kind == "remove":
            # The entry the caller named, if it is still there; else look it up.
            if op.sched is None or not txn.delete(op.sched, db=self._schedule):
                self._unindex(txn, qid)
            txn.delete(qid, db=self._messages)
            txn.delete(qid, db=self._bodies)
        elif op.kind == "quarantine":
            current = txn.get(qid, db=self._messages)
            if current is None or bytes(current) != op.envelope:
                return  # rewritten or removed since it was seen corrupt
            body = txn.get(qid, db=self._bodies)
            entry = {
                "envelope": op.envelope,
                "body": b"" if body is None else bytes(body),
                "reason": op.reason,
                "quarantined": self._clock(),
            }
            txn.put(qid, msgpack.packb(entry, use_bin_type=True), db=self._quarantine)
            self._unindex(txn, qid)
            txn.delete(qid, db=self._messages)
            txn.delete(qid, db=self._bodies)
            self.stats.quarantined += 1
        elif op.kind == "unindex":
            # A schedule entry that points at no record, or at a record scheduled at
            # another time: drop just that entry.
            assert op.sched is not None
            record_qid = op.sched[8:]
            if txn.get(record_qid, db=self._messages) is None or not self._entry_current(
                txn, op.sched
            ):
                txn.delete(op.sched, db=self._schedule)

    def _entry_current(self, txn: lmdb.Transaction, key: bytes) -> bool:
        raw = txn.get(key[8:], db=self._messages)
        if raw is None:
            return False
        try:
            record = decode_record(bytes(raw))
        except CorruptRecord:
            return True  # leave it; the quarantine op removes it
        return not record.done() and _schedule_key(_ms(record.next_attempt), key[8:]) == key

    def _unindex(self, txn: lmdb.Transaction, qid: bytes) -> None:
        """Delete the schedule entry of the record currently stored under qid."""
        raw = txn.get(qid, db=self._messages)
        if raw is None:
            return
        next_attempt = _next_attempt_of(bytes(raw))
        if next_attempt is None:
            self._scan_unindex(txn, qid)
            return
        txn.delete(_schedule_key(_ms(next_attempt), qid), db=self._schedule)

    def _scan_unindex(self, txn: lmdb.Transaction, qid: bytes) -> None:
        # The old time is unknown: only reached for corrupt records, so a scan is fine.
        stale = [key for key, _ in txn.cursor(db=self._schedule) if key[8:] == qid]
        for key in stale:
            txn.delete(key, db=self._schedule)

    def _report_corrupt(self, qid: bytes, raw: bytes, reason: str) -> None:
        if qid in self._bad:
            return
        self._bad.add(qid)
        log_event(
            "queue_corrupt_record",
            qid=qid.decode("ascii", "replace"),
            reason=reason,
            action="skipped" if self.readonly else "quarantined",
        )
        # Fire and forget: the read path cannot wait for a commit, and the record is
        # already skipped by every reader through self._bad.
        self._background(_Op("quarantine", qid, envelope=raw, reason=reason))

    def _decode(self, qid: bytes, raw: bytes) -> MessageRecord | None:
        if qid in self._bad:
            return None
        try:
            return decode_record(raw)
        except CorruptRecord as exc:
            self._report_corrupt(qid, raw, str(exc))
            return None

    # -- reads (any thread; each in its own read transaction) ----------------------------

    def due(
        self,
        now: float,
        limit: int,
        exclude: Container[str] = (),
        shard: tuple[int, int] | None = None,
    ) -> list[MessageRecord]:
        """Messages whose next attempt is at or before `now`, oldest first, at most `limit`.

        Queue ids in `exclude` (attempts already in flight) are passed over by their
        schedule key alone, before their envelope is read or decoded, and do not count
        towards `limit`. `shard=(index, count)` keeps only the queue ids for which
        `shard_of(qid, count) == index` (each delivery process takes one shard).
        """
        now_ms = _ms(now)
        out: list[MessageRecord] = []
        with self._env.begin() as txn:
            for key in txn.cursor(db=self._schedule).iternext(keys=True, values=False):
                if len(out) >= limit or int.from_bytes(key[:8], "big") > now_ms:
                    break
                qid = bytes(key[8:])
                if shard is not None and _shard_of_key(qid, shard[1]) != shard[0]:
                    continue
                if exclude and qid.decode("ascii", "replace") in exclude:
                    continue
                raw = txn.get(qid, db=self._messages)
                record = None if raw is None else self._decode(qid, bytes(raw))
                if record is None:
                    if raw is None:
                        self._drop_stale(bytes(key))
                    continue
                if _schedule_key(_ms(record.next_attempt), qid) != key or record.done():
                    self._drop_stale(bytes(key))
                    continue
                out.append(record)
        return out

    def _drop_stale(self, key: bytes) -> None:
        self._background(_Op("unindex", key[8:], sched=key))

    def _background(self, op: _Op) -> None:
        """Queue a housekeeping write nobody waits for; dropped when read-only or closing."""
        with self._cond:
            if not self.readonly and not self._closing:
                self._pending.append(op)
                self._cond.notify()

    def next_due_time(self, shard: tuple[int, int] | None = None) -> float | None:
        """The earliest scheduled attempt (seconds since the epoch), or None if none;
        with `shard`, the earliest of that shard's queue ids (as in `due`)."""
        with self._env.begin() as txn:
            for key in txn.cursor(db=self._schedule).iternext(keys=True, values=False):
                if shard is None or _shard_of_key(key[8:], shard[1]) == shard[0]:
                    return int.from_bytes(key[:8], "big") / 1000.0
            return None

    def get(self, qid: str) -> MessageRecord | None:
        if not qid.isascii():
            return None
        key = qid.encode("ascii")
        with self._env.begin() as txn:
            raw = txn.get(key, db=self._messages)
            return None if raw is None else self._decode(key, bytes(raw))

    def body(self, qid: str) -> bytes:
        """The message as received; KeyError if the message is not queued."""
        if not qid.isascii():
            raise KeyError(qid)
        with self._env.begin() as txn:
            data = txn.get(qid.encode("ascii"), db=self._bodies)
            if data is None:
                raise KeyError(qid)
            return bytes(data)

    def all(self) -> Iterator[MessageRecord]:
        """Every decodable record in queue-id (arrival) order."""
        after: bytes | None = None
        while True:
            chunk: list[MessageRecord] = []
            with self._env.begin() as txn:
                cursor = txn.cursor(db=self._messages)
                positioned = cursor.set_range(after) if after is not None else cursor.first()
                if positioned and after is not None and cursor.key() == after:
                    positioned = cursor.next()
                n = 0
                while positioned and n < _SCAN_CHUNK:
                    qid = bytes(cursor.key())
                    record = self._decode(qid, bytes(cursor.value()))
                    if record is not None:
                        chunk.append(record)
                    after = qid
                    n += 1
                    positioned = cursor.next()
            yield from chunk
            if not positioned:
                return

    def count(self) -> int:
        with self._env.begin() as txn:
            entries: int = txn.stat(self._messages)["entries"]
            return entries

    def quarantined(self) -> list[str]:
        """Queue ids held in quarantine (for operators and tests)."""
        with self._env.begin() as txn:
            return [bytes(k).decode("ascii", "replace") for k, _ in txn.cursor(self._quarantine)]

    async def close(self) -> None:
        """Commit whatever is pending, stop the writer thread and close the environment."""
        # Joining the writer waits for its last commit: keep the loop free meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        """close() for callers without an event loop (the CLI, read-only handles)."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify()
        if self._writer is not None:
            self._writer.join()
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._env.close()
        with _open_paths_lock:
            _open_paths.discard(self._key)


def _resolve(
    callbacks: list[Callable[[BaseException | None], None]], error: BaseException | None
) -> None:
    """Tell every waiter of one committed (or failed) batch, on its loop."""
    for callback in callbacks:
        try:
            callback(error)
        except Exception as exc:  # one waiter's bug must not keep the others waiting
            log_event("queue_callback_error", error=f"{type(exc).__name__}: {exc}")


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return  # the waiter was cancelled; the operation is committed regardless
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
