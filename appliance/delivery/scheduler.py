"""Delivery scheduler: moves due mail from the queue to next hops and records the outcome.

Runs as one task on the uvloop loop of the delivery process (appliance/delivery/worker.py,
a child of `sluice run` on the same queue). The inbound side wakes it through that
process's pipe (`notify()`) after a message is queued so it leaves at once; everything
else is driven by the queue's schedule (`Queue.due`, `Queue.next_due_time`).

One attempt of one message:
  recipients still pending are grouped by domain. Each domain is a destination
  (`destinations.py`): if it is paused by the adaptive back-off its recipients are held
  (deferred, no attempt counted) until the pause ends; otherwise the domain is resolved
  (`Router`) and its hosts are tried in order, moving on only while a host cannot be used
  at all (connection refused or timed out, greeting, EHLO/HELO or required TLS refused,
  connection lost before the server answered MAIL); once a host took the transaction its
  replies are final for this attempt (RFC 5321 4.5.4.1, 5.1). Transactions carry at most
  the destination's `recipients_per_message`, start no faster than its
  `messages_per_minute` and use at most its `max_connections`. Per recipient: 2xx
  delivered, 5xx bounced, 4xx or no usable host deferred with exponential backoff and
  jitter from the message's bounce profile (the listener's, or the destination's own).
  The record is written back after every attempt (`Queue.update`), or removed when no
  recipient is left, so a crash right after a delivery does not deliver again.
  Recipients that failed permanently in the attempt produce one RFC 3464 bounce
  (`appliance.bounce`) queued from <> to the envelope sender, leaving out those whose
  NOTIFY excludes FAILURE; mail from <> and our own bounces are never bounced (RFC 5321
  4.5.5, RFC 3464 2): the report goes to the configured postmaster or is dropped. Mail
  still deferred after its profile's `max_queue_time` is bounced as expired (RFC 3463
  4.4.7); after `delay_warning` one "delayed" DSN goes out per message, and NOTIFY=SUCCESS
  to a next hop without DSN gives a "relayed" DSN (RFC 3461 5.2.2).

Bounded resources: at most `window` messages and `max_bytes_in_flight` message bytes in
flight (deferred mail waits in the queue, not in memory), at most
`delivery.max_connections` outbound connections in total and the
destination's `max_connections` per domain, idle connections reused for up to
`messages_per_connection` messages and closed after a few seconds. Time is injected
(`clock`, `sleep`) so retry timing and pauses are tested on a fake clock. The state of
every destination is published every few seconds to <data_dir>/hosts.json for
`sluice hosts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.bounce import (
    build_bounce,
    build_dsn,
    format_expired,
    format_reply,
    parse_reply_record,
)
from appliance.config import BounceProfile, Config, DestinationConfig, TlsPolicy
from appliance.delivery.destinations import Destinations, DestinationState, iso, write_snapshot
from appliance.delivery.routing import Router
from appliance.delivery.smtp_client import (
    DeliveryResult,
    Reply,
    SmtpConnectError,
    SmtpConnection,
    Timeouts,
    local_reply,
    tls_context,
)
from appliance.eventlog import log_event
from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id

Hop = tuple[str, int]

# Seconds an unused connection stays open for the next message to the same host; long
# enough for a burst, short enough not to hold the remote server's slots.
IDLE_SECONDS = 5.0
# Seconds `run()` lets attempts in flight finish after `stop()` before cancelling them.
SHUTDOWN_GRACE = 30.0
# Seconds between snapshots of destination state in <data_dir>/hosts.json.
HOSTS_INTERVAL = 2.0
# A message waits this long (or one rate interval) in memory for its destination's rate
# limit; beyond that it goes back to the queue until its slot comes.
RATE_SLEEP_MAX = 5.0


@dataclass
class _Info:
    """What the pool knows of one of its connections."""

    key: tuple[str, str, int]  # (destination domain, host, port)
    per_connection: int  # messages before it is closed (messages_per_connection)


@dataclass
class _Waiter:
    key: tuple[str, str, int]
    dest_limit: int
    future: asyncio.Future[SmtpConnection | None]


# Message bytes that attempts in flight may hold at once (see _dispatch). Each attempt
# holds its body and a dot-stuffed copy while sending, so memory is about twice this.
# 16 MiB keeps 16 one-MiB messages moving at once, plenty to fill a link; small mail is
# bounded by the window instead.
MAX_BYTES_IN_FLIGHT = 16 * 1024 * 1024

# The shortest time between two dispatch rounds (seconds): new mail waits at most this
# long before its first attempt starts.
DISPATCH_INTERVAL = 0.01

# How soon to look at the queue again when mail is overdue but every due message seemed
# to be in flight (seconds).
DUE_RECHECK = 1.0


class _Pool:
    """Outbound connections: a global limit, a limit per destination, reuse of idle
    connections per destination and host.

    A slot is held from connect until the connection is closed (after QUIT), both in the
    global count and in its destination's, so a next hop never sees more connections
    from us for one domain than that domain's limit. A connection serves one destination
    (domain): mail for two domains behind one smarthost uses separate connections, so
    each domain's limits hold (docs/delivery.md). A task that finds no free slot waits in
    line; a connection coming back is handed straight to a waiter for the same
    destination and host, or closed to free its slot when others wait, or else kept idle
    for a few seconds.
    """

    def __init__(
        self,
        limit: int,
        helo_name: str,
        timeouts: Timeouts,
        per_connection: int,
        factory: Callable[[], SmtpConnection],
    ) -> None:
        self._limit = limit
        self._open = 0
        self._open_by: dict[str, int] = {}
        self._helo = helo_name
        self._timeouts = timeouts
        self._per_connection = per_connection
        self._factory = factory
        self._info: dict[int, _Info] = {}
        self._idle: dict[tuple[str, str, int], list[SmtpConnection]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._waiters: list[_Waiter] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0  # connections ever opened (for tests and metrics)
        self.peak = 0  # most connections open at once
        self.peak_by: dict[str, int] = {}  # the same per destination

    def open_for(self, dest: str) -> int:
        """Connections open (in use, idle or closing) for destination `dest`."""
        return self._open_by.get(dest, 0)

    def _room(self, dest: str, dest_limit: int) -> bool:
        return self._open < self._limit and self._open_by.get(dest, 0) < dest_limit

    async def acquire(
        self,
        host: str,
        port: int,
        fresh: bool = False,
        *,
        dest: str = "",
        dest_limit: int | None = None,
        per_connection: int | None = None,
        tls: TlsPolicy = "none",
        context: ssl.SSLContext | None = None,
        tls_name: str | None = None,
    ) -> tuple[SmtpConnection, bool]:
        """A connected, greeted connection to host:port for destination `dest`, and
        whether it was reused. Raises SmtpConnectError when a new one cannot be set up.
        """
        key = (dest, host, port)
        limit = dest_limit or self._limit
        while True:
            idle = self._idle.get(key, [])
            while idle and not fresh:
                conn = idle.pop()
                self._cancel_timer(conn)
                if conn.usable:
                    return conn, True
                self._discard(conn)
            if self._room(dest, limit):
                break
            # Free a slot held by an idle connection that is in our way: one of our
            # destination (to another host) when that limit is reached, else any.
            full = self._open_by.get(dest, 0) >= limit
            self._evict_one(dest if full else None)
            future: asyncio.Future[SmtpConnection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(_Waiter(key, limit, future))
            try:
                handed = await future
            except asyncio.CancelledError:
                # Cancelled after a connection was handed to us: pass it on, don't leak it.
                late = future.result() if future.done() and not future.cancelled() else None
                if late is not None:
                    self.release(late)
                raise
            if handed is not None and not fresh:
                return handed, True
            if handed is not None:
                self._discard(handed)
        self._open += 1
        self._open_by[dest] = self._open_by.get(dest, 0) + 1
        self.peak = max(self.peak, self._open)
        self.peak_by[dest] = max(self.peak_by.get(dest, 0), self._open_by[dest])
        conn = self._factory()
        try:
            await conn.connect(
                host, port, self._helo, self._timeouts, tls=tls, context=context, tls_name=tls_name
            )
        except BaseException:
            self._closed(dest)
            raise
        self._info[id(conn)] = _Info(key, per_connection or self._per_connection)
        self.opened += 1
        return conn, False

    def release(self, conn: SmtpConnection) -> None:
        """Return a connection after a transaction: hand it on, keep it idle, or close it."""
        info = self._info.get(id(conn))
        if info is None or not conn.usable or conn.messages >= info.per_connection:
            self._discard(conn)
            return
        for i, waiter in enumerate(self._waiters):
            if waiter.key == info.key and not waiter.future.done():
                del self._waiters[i]
                waiter.future.set_result(conn)
                return
        if any(not w.future.done() for w in self._waiters):
            self._discard(conn)  # someone needs a slot for another host or destination
            return
        self._idle.setdefault(info.key, []).append(conn)
        loop = asyncio.get_running_loop()
        self._timers[id(conn)] = loop.call_later(IDLE_SECONDS, self._expire, conn)

    def _closed(self, dest: str) -> None:
        self._open -= 1
        left = self._open_by.get(dest, 1) - 1
        if left > 0:
            self._open_by[dest] = left
        else:
            self._open_by.pop(dest, None)
        self._wake_one()

    def _wake_one(self) -> None:
        """Wake the first waiter that may open a connection now."""
        for i, waiter in enumerate(self._waiters):
            if waiter.future.done():
                continue
            if self._room(waiter.key[0], waiter.dest_limit):
                del self._waiters[i]
                waiter.future.set_result(None)
                return
        self._waiters = [w for w in self._waiters if not w.future.done()]

    def _expire(self, conn: SmtpConnection) -> None:
        self._timers.pop(id(conn), None)
        info = self._info.get(id(conn))
        idle = self._idle.get(info.key, []) if info is not None else []
        if conn in idle:
            idle.remove(conn)
            self._discard(conn)

    def _evict_one(self, dest: str | None) -> bool:
        for key, idle in self._idle.items():
            if idle and (dest is None or key[0] == dest):
                conn = idle.pop(0)
                if not idle:
                    del self._idle[key]
                self._cancel_timer(conn)
                self._discard(conn)
                return True
        return False

    def _cancel_timer(self, conn: SmtpConnection) -> None:
        timer = self._timers.pop(id(conn), None)
        if timer is not None:
            timer.cancel()

    def _discard(self, conn: SmtpConnection) -> None:
        """Say QUIT in the background; the slot is free once the connection is closed."""
        info = self._info.pop(id(conn), None)

        async def close() -> None:
            try:
                await conn.quit()
            finally:
                if info is not None:
                    self._closed(info.key[0])

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                self._cancel_timer(conn)
                self._discard(conn)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


@dataclass
class _Attempt:
    """What one attempt of one message collects across its domains."""

    failed: list[RecipientRecord] = field(default_factory=list)  # bounced this attempt
    relayed: list[RecipientRecord] = field(default_factory=list)  # NOTIFY=SUCCESS notices
    held: dict[int, float] = field(default_factory=dict)  # id(rcpt) -> earliest retry
    tried: bool = False  # a recipient was really attempted (not only held back)


def _notify_set(rcpt: RecipientRecord) -> set[str] | None:
    """The recipient's RFC 3461 NOTIFY keywords, or None when it gave none."""
    for key, value in rcpt.params:
        if key.upper() == "NOTIFY" and value:
            return {v.strip().upper() for v in value.split(",")}
    return None


def wants_dsn(rcpt: RecipientRecord, kind: Literal["FAILURE", "DELAY", "SUCCESS"]) -> bool:
    """RFC 3461 4.1: without NOTIFY a failure is reported (and, by our choice, a delay
    when the profile has delay_warning, as Postfix does), never a success; NEVER turns
    every report off."""
    notify = _notify_set(rcpt)
    if notify is None:
        return kind != "SUCCESS"
    return kind in notify and "NEVER" not in notify


class DeliveryScheduler:
    """Delivers queued mail. `run()` until `stop()`; `notify()` when new mail is queued."""

    def __init__(
        self,
        queue: Queue,
        router: Router,
        config: Config,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        window: int = 1000,
        max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT,
        rng: random.Random | None = None,
        connection_factory: Callable[[], SmtpConnection] = SmtpConnection,
        publish_interval: float = HOSTS_INTERVAL,
        server_pid: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self._queue = queue
        self._router = router
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._window = window
        # Dispatch again once a quarter of the window is free (at once for small windows).
        self._refill_at = window - max(1, window // 4)
        self._max_bytes_in_flight = max_bytes_in_flight
        self._sizes: dict[str, int] = {}
        self._bytes_in_flight = 0
        self._rng = rng or random.Random()
        delivery = config.delivery
        self._pool = _Pool(
            delivery.max_connections,
            delivery.helo_name or config.hostname,
            Timeouts.from_config(delivery),
            delivery.messages_per_connection,
            connection_factory,
        )
        self.destinations = Destinations(config)
        self._tls_contexts: dict[tuple[str, Path | None], ssl.SSLContext | None] = {}
        self._active: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._started = clock()
        self._publish_interval = publish_interval
        # Named in hosts.json: the `sluice run` process (this one, or the parent of the
        # delivery process).
        self._server_pid = server_pid
        # (index, count): this process delivers only the queue ids of its shard
        # (`[delivery] processes`, appliance.queue.shard_of); None: all of them.
        self._shard = shard

    @property
    def connections_opened(self) -> int:
        return self._pool.opened

    @property
    def active(self) -> int:
        return len(self._active)

    def notify(self) -> None:
        """New mail was queued: look at the queue now rather than at the next due time."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Deliver until `stop()`; then let attempts in flight finish (or cancel them
        after SHUTDOWN_GRACE seconds) and close idle connections."""
        publisher = asyncio.get_running_loop().create_task(self._publish_loop())
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                round_started = loop.time()
                self._dispatch()
                await self._wait()
                # Under load wake-ups (mail queued, attempts finished) come many per
                # millisecond, and each round walks the schedule and sets up its waits:
                # take them together, at most one round per DISPATCH_INTERVAL.
                pause = round_started + DISPATCH_INTERVAL - loop.time()
                if pause > 0 and not self._stopping:
                    await asyncio.sleep(pause)
        finally:
            tasks = list(self._active.values())
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.gather(*late, return_exceptions=True)
            await self._pool.close_all()
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            self.publish()

    async def run_once(self) -> int:
        """Start every attempt that is due now and wait for all to finish (for tests and
        for `sluice queue flush`). Returns how many attempts were started."""
        started = self._dispatch()
        tasks = list(self._active.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return started

    async def close(self) -> None:
        """Close idle connections (after `run_once()` use)."""
        await self._pool.close_all()

    # -- state for `sluice hosts` ----------------------------------------------------------

    def hosts_snapshot(self) -> dict[str, Any]:
        return self.destinations.snapshot(
            self._clock(), self._started, self._pool.open_for, self._server_pid, self._shard
        )

    def publish(self) -> None:
        """Write <data_dir>/hosts.json (hosts-<k>.json for shard k of several) now (also
        done every few seconds by `run()`)."""
        try:
            write_snapshot(self._config.data_dir, self.hosts_snapshot(), self._shard)
        except OSError as exc:
            log_event("hosts_snapshot_failed", error=f"{type(exc).__name__}: {exc}")

    async def _publish_loop(self) -> None:
        # Real time, not the injected sleep: the snapshot is for operators, and tests
        # that drive the clock must not see extra sleeps.
        while True:
            self.publish()
            await asyncio.sleep(self._publish_interval)

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self) -> int:
        room = self._window - len(self._active)
        if room <= 0:
            return 0
        started = 0
        # Records in flight are still due in the queue: the queue passes over them by key,
        # without decoding their envelopes again.
        for record in self._queue.due(self._clock(), room, exclude=self._active, shard=self._shard):
            if started >= room:
                break
            if record.qid in self._active:
                continue
            # Each attempt holds its body (and a dot-stuffed copy while sending): bound
            # the bytes in flight, not only the count, or a queue of large messages costs
            # gigabytes. One message always goes, however large.
            if self._active and self._bytes_in_flight + record.size > self._max_bytes_in_flight:
                break
            task = asyncio.get_running_loop().create_task(self._attempt(record))
            self._active[record.qid] = task
            self._sizes[record.qid] = record.size
            self._bytes_in_flight += record.size
            task.add_done_callback(functools.partial(self._finished, record.qid))
            started += 1
        return started

    def _finished(self, qid: str, _task: asyncio.Task[None]) -> None:
        self._active.pop(qid, None)
        self._bytes_in_flight -= self._sizes.pop(qid, 0)
        # Refill in batches: every dispatch walks the schedule past the attempts still in
        # flight, so waking per finished attempt with a full window costs O(window) each
        # time (a tenth of the delivery process's CPU in a 20,000-message drain).
        if len(self._active) <= self._refill_at:
            self._wake.set()

    async def _wait(self) -> None:
        if self._wake.is_set():
            self._wake.clear()
            return
        timeout: float | None = None
        if len(self._active) < self._window:
            next_due = self._queue.next_due_time(self._shard)
            if next_due is not None:
                timeout = next_due - self._clock()
                if timeout <= 0:
                    # Something is due that _dispatch did not start: it became due after
                    # _dispatch looked, or it is in flight (then a finishing attempt wakes
                    # us). Never wait on a wake-up alone: one that never comes would
                    # strand overdue mail until new mail arrives. Look again shortly.
                    timeout = DUE_RECHECK if self._active else DUE_RECHECK / 20
        waiter = asyncio.ensure_future(self._wake.wait())
        waits: set[asyncio.Future[Any]] = {waiter}
        if timeout is not None:
            waits.add(asyncio.ensure_future(self._sleep(timeout)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waits:
                fut.cancel()
        self._wake.clear()

    # -- one attempt of one message ------------------------------------------------------

    async def _attempt(self, record: MessageRecord) -> None:
        try:
            await self._deliver_message(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug must not turn into a hot loop on the same message: push it back.
            log_event("delivery_error", qid=record.qid, error=f"{type(exc).__name__}: {exc}")
            profile = self._config.profile(record.bounce_profile)
            record.next_attempt = self._clock() + profile.retry_initial
            await self._queue.update(record)

    def profile_for(self, record: MessageRecord, domain: str) -> BounceProfile:
        """The destination's bounce profile if it names one, else the message's own."""
        override = self.destinations.get(domain).settings.bounce_profile
        return self._config.profile(override or record.bounce_profile)

    async def _deliver_message(self, record: MessageRecord) -> None:
        scheduled_at = record.next_attempt  # names its schedule entry for remove()
        try:
            body = self._queue.body(record.qid)
        except KeyError:
            return  # removed meanwhile (operator, or a concurrent attempt finished it)
        domains: dict[str, list[RecipientRecord]] = {}
        for rcpt in record.pending_recipients():
            domain = rcpt.address.rpartition("@")[2].lower()
            domains.setdefault(domain, []).append(rcpt)
        attempt = _Attempt()
        if len(domains) == 1:  # the usual case: no task per domain
            ((domain, rcpts),) = domains.items()
            await self._deliver_domain(record, domain, rcpts, body, attempt)
        else:
            await asyncio.gather(
                *(
                    self._deliver_domain(record, d, rcpts, body, attempt)
                    for d, rcpts in domains.items()
                )
            )

        now = self._clock()
        if attempt.tried:
            record.attempts += 1
        failed = attempt.failed
        expired: list[RecipientRecord] = []
        next_times: list[float] = []
        for rcpt in [r for r in record.recipients if r.state == "deferred"]:
            profile = self.profile_for(record, _domain_of(rcpt))
            expires = record.arrived + profile.max_queue_time
            if now >= expires:
                rcpt.state = "bounced"
                rcpt.last_reply = format_expired(rcpt.last_reply)
                rcpt.updated = now
                expired.append(rcpt)
                continue
            due = attempt.held.get(id(rcpt))
            dest = self.destinations.get(_domain_of(rcpt))
            if due is None:
                due = now + self._backoff(profile, max(rcpt.attempts, 1))
                if dest.paused(now):
                    # Paused (perhaps by this very attempt): nothing before the pause end.
                    due = max(due, dest.paused_until)
            # Never wait past the expiry: the last attempt happens when it is due.
            next_times.append(min(due, expires))
        if expired:
            failed.extend(expired)
            log_event(
                "expired",
                qid=record.qid,
                recipients=[r.address for r in expired],
                reply="4.4.7 message expired",
            )
        deferred = [r for r in record.recipients if r.state == "deferred"]
        if deferred:
            record.next_attempt = min(next_times)
            for rcpt in deferred:
                log_event(
                    "deferred",
                    qid=record.qid,
                    recipient=rcpt.address,
                    host=parse_reply_record(rcpt.last_reply).host,
                    reply=rcpt.last_reply,
                    next_attempt=record.next_attempt,
                )
            await self._delay_warning(record, deferred, body, now)
        if failed:
            wanted = [r for r in failed if wants_dsn(r, "FAILURE")]
            quiet = [r.address for r in failed if not wants_dsn(r, "FAILURE")]
            if quiet:
                log_event("dsn_suppressed", qid=record.qid, recipients=quiet, notify="failure")
            if wanted:
                await self._bounce(record, wanted, body, now)
        if attempt.relayed:
            await self._report(record, attempt.relayed, body, now, "relayed")
        if record.done():
            await self._queue.remove(record.qid, scheduled_at=scheduled_at)
        else:
            await self._queue.update(record)

    async def _delay_warning(
        self, record: MessageRecord, deferred: list[RecipientRecord], body: bytes, now: float
    ) -> None:
        """One "delayed" DSN per message, once the profile's delay_warning has passed."""
        if record.delay_warned or not record.sender or record.is_bounce:
            return
        late = []
        for rcpt in deferred:
            warning = self.profile_for(record, _domain_of(rcpt)).delay_warning
            if warning > 0 and now - record.arrived >= warning and wants_dsn(rcpt, "DELAY"):
                late.append(rcpt)
        if late:
            # Marked only once the notice is queued: a failure here is logged and the
            # warning is tried again on the next pass rather than silently lost.
            await self._report(record, late, body, now, "delayed")
            record.delay_warned = True

    def _backoff(self, profile: BounceProfile, attempts: int) -> float:
        delay = profile.retry_initial * 2.0 ** min(max(attempts - 1, 0), 40)
        # Jitter spreads retries of mail deferred together (one outage) over time.
        return min(delay * self._rng.uniform(0.9, 1.1), profile.retry_max)

    def _tls_context(self, settings: DestinationConfig) -> ssl.SSLContext | None:
        key = (settings.tls, settings.tls_ca_file)
        if key not in self._tls_contexts:
            self._tls_contexts[key] = tls_context(settings.tls, settings.tls_ca_file)
        return self._tls_contexts[key]

    def _hold(
        self,
        record: MessageRecord,
        rcpts: list[RecipientRecord],
        until: float,
        reply: str,
        attempt: _Attempt,
    ) -> None:
        """Defer recipients without trying them (paused or rate-limited destination):
        no attempt is counted, and the next one is at `until`."""
        for rcpt in rcpts:
            rcpt.state = "deferred"
            rcpt.last_reply = reply
            rcpt.updated = self._clock()
            attempt.held[id(rcpt)] = until
        log_event(
            "held", qid=record.qid, recipients=[r.address for r in rcpts], reason=reply, until=until
        )

    def _hold_paused(
        self,
        record: MessageRecord,
        dest: DestinationState,
        rcpts: list[RecipientRecord],
        attempt: _Attempt,
    ) -> None:
        text = f"destination {dest.domain} paused until {iso(dest.paused_until)}"
        reply = format_reply(None, 451, "4.4.5", f"{text}: {dest.pause_reason}")
        self._hold(record, rcpts, dest.paused_until, reply, attempt)

    async def _deliver_domain(
        self,
        record: MessageRecord,
        domain: str,
        rcpts: list[RecipientRecord],
        body: bytes,
        attempt: _Attempt,
    ) -> None:
        dest = self.destinations.get(domain)
        settings = dest.settings
        if dest.paused(self._clock()):
            self._hold_paused(record, dest, rcpts, attempt)
            return
        attempt.tried = True
        resolution = await self._router.resolve(domain)
        if not resolution.ok:
            reply = local_reply(resolution.code, resolution.enhanced, resolution.reason)
            for rcpt in rcpts:
                self._outcome(record, dest, rcpt, None, reply, attempt)
            return
        pending = list(rcpts)
        last_error: tuple[str, Reply] | None = None
        answered = transient = False
        context = self._tls_context(settings)
        global_limit = self._config.delivery.max_connections
        for host, port in resolution.hosts:
            name = resolution.names.get(host, host)
            label = host if name == host else f"{name}[{host}]"
            fresh = False
            while pending:
                now = self._clock()
                if dest.paused(now):  # another attempt paused it meanwhile
                    self._hold_paused(record, dest, pending, attempt)
                    pending.clear()
                    break
                wait = dest.rate_wait(now)
                if wait > max(RATE_SLEEP_MAX, 60.0 / max(settings.messages_per_minute, 1)):
                    rate = settings.messages_per_minute
                    held = format_reply(
                        None, 451, "4.4.5", f"rate limit of {domain}: {rate} messages per minute"
                    )
                    self._hold(record, pending, now + wait, held, attempt)
                    pending.clear()
                    break
                wait = dest.reserve(now)
                if wait > 0:
                    await self._sleep(wait)
                try:
                    conn, reused = await self._pool.acquire(
                        host,
                        port,
                        fresh,
                        dest=domain,
                        dest_limit=dest.connection_limit(global_limit),
                        per_connection=settings.messages_per_connection,
                        tls=settings.tls,
                        context=context,
                        tls_name=name,
                    )
                except SmtpConnectError as exc:
                    last_error = (label, exc.reply)
                    transient = True
                    log_event(
                        "connect_failed", qid=record.qid, host=label, port=port, reply=str(exc)
                    )
                    dest.note_reply(format_reply(label, *_parts(exc.reply)), self._clock())
                    break
                chunk = pending[: settings.recipients_per_message]
                log_event(
                    "delivery_attempt",
                    qid=record.qid,
                    recipients=[r.address for r in chunk],
                    host=label,
                    port=port,
                    reused=reused,
                    tls=conn.tls or ("fallback-plain" if conn.tls_fallback else ""),
                )
                result = await conn.send(
                    record.sender,
                    [r.address for r in chunk],
                    body,
                    record.mail_params,
                    [r.params for r in chunk],
                )
                # RFC 3461 5.2.2: a next hop that takes DSN parameters reports success
                # itself; one that does not gets them dropped, and we say "relayed".
                passes_dsn = "DSN" in conn.extensions
                self._pool.release(conn)
                if result.unanswered:
                    # Nothing was said about this mail, so trying again cannot duplicate
                    # it: a reused connection may just have been closed by the server
                    # while idle (retry fresh); a fresh one means this host is unusable.
                    last_error = (label, result.recipients[0])
                    if reused:
                        fresh = True
                        continue
                    transient = True
                    break
                for rcpt, reply in zip(chunk, result.recipients, strict=True):
                    self._outcome(record, dest, rcpt, label, reply, attempt, passes_dsn)
                verdict = _session_verdict(result)
                if verdict is True:
                    answered = True
                elif verdict is False:
                    transient = True
                del pending[: len(chunk)]
            if not pending:
                break
        if pending:
            host_label, reply = last_error or (None, local_reply(451, "4.4.1", "no host to try"))
            for rcpt in pending:
                self._outcome(record, dest, rcpt, host_label, reply, attempt)
        self._adapt(dest, answered, transient)

    def _adapt(self, dest: DestinationState, answered: bool, transient: bool) -> None:
        """Adaptive back-off: a definite answer resets the destination; an attempt that
        only met unusable hosts or 4xx counts as a failure and may pause it."""
        now = self._clock()
        if answered:
            if dest.success():
                log_event("destination_recovered", destination=dest.domain)
        elif transient:
            pause = dest.failure(dest.last_reply, now)
            if pause is not None:
                log_event(
                    "destination_paused",
                    destination=dest.domain,
                    seconds=pause,
                    until=dest.paused_until,
                    reason=dest.pause_reason,
                )

    def _outcome(
        self,
        record: MessageRecord,
        dest: DestinationState,
        rcpt: RecipientRecord,
        host: str | None,
        reply: Reply,
        attempt: _Attempt,
        passes_dsn: bool = False,
    ) -> None:
        state: Literal["delivered", "bounced", "deferred"]
        if reply.positive:
            state = "delivered"
            dest.delivered += 1
            if not passes_dsn and wants_dsn(rcpt, "SUCCESS"):
                attempt.relayed.append(rcpt)
        elif reply.permanent:
            state = "bounced"
            dest.bounced += 1
            attempt.failed.append(rcpt)
        else:
            state = "deferred"
            dest.deferred += 1
        rcpt.state = state
        rcpt.attempts += 1
        rcpt.updated = self._clock()
        rcpt.last_reply = format_reply(host, reply.code, reply.enhanced, reply.text)
        dest.note_reply(rcpt.last_reply, rcpt.updated)
        if state != "deferred":  # deferred is logged with its next attempt time
            log_event(state, qid=record.qid, recipient=rcpt.address, host=host, reply=str(reply))

    async def _bounce(
        self, record: MessageRecord, failed: list[RecipientRecord], body: bytes, now: float
    ) -> None:
        addresses = [r.address for r in failed]
        to = record.sender
        if not record.sender or record.is_bounce:
            # RFC 5321 4.5.5 / RFC 3464 2: never answer <> with a bounce (loops). The
            # postmaster may want to know, unless this already was a note to them.
            postmaster = self._config.postmaster
            to_postmaster_already = record.is_bounce and all(
                a.lower() == (postmaster or "").lower() for a in addresses
            )
            if not postmaster or to_postmaster_already:
                log_event("dropped", qid=record.qid, recipients=addresses, reason="double bounce")
                return
            to = postmaster
        data = build_bounce(record, failed, body, self._config.hostname, now, to=to)
        await self._queue_report(record, to, data, addresses, now, "failed")

    async def _report(
        self,
        record: MessageRecord,
        rcpts: list[RecipientRecord],
        body: bytes,
        now: float,
        action: Literal["delayed", "relayed"],
    ) -> None:
        """A "delayed" or "relayed" DSN to the sender; never for mail from <> or ours."""
        if not record.sender or record.is_bounce:
            return
        until = {
            id(r): record.arrived + self.profile_for(record, _domain_of(r)).max_queue_time
            for r in rcpts
        }
        data = build_dsn(
            record,
            rcpts,
            body,
            self._config.hostname,
            now,
            action=action,
            retry_until=lambda r: until[id(r)],
        )
        await self._queue_report(
            record, record.sender, data, [r.address for r in rcpts], now, action
        )

    async def _queue_report(
        self,
        record: MessageRecord,
        to: str,
        data: bytes,
        addresses: list[str],
        now: float,
        action: str,
    ) -> None:
        report = MessageRecord(
            qid=new_queue_id(),
            arrived=now,
            sender="",
            mail_params=[],
            recipients=[RecipientRecord(address=to, params=[])],
            size=len(data),
            listener="bounce",
            next_attempt=now,
            is_bounce=True,
        )
        await self._queue.submit(report, data)
        event = "bounce_queued" if action == "failed" else "dsn_queued"
        log_event(
            event,
            qid=record.qid,
            bounce_qid=report.qid,
            to=to,
            recipients=addresses,
            action=action,
        )
        self.notify()


def _session_verdict(result: DeliveryResult) -> bool | None:
    """For the adaptive back-off: True when the next hop handled the transaction (also
    when it deferred or refused some recipients: mailbox full or greylisting says nothing
    about the host), False when it deferred the whole of it (dropped connection, 421,
    4xx to MAIL or to the message), None when nothing was sent (refused locally)."""
    if result.session_lost:
        return False
    if result.mail is None:
        return None
    if result.mail.transient:
        return False
    return not (result.data is not None and result.data.transient)


def _domain_of(rcpt: RecipientRecord) -> str:
    return rcpt.address.rpartition("@")[2].lower()


def _parts(reply: Reply) -> tuple[int, str, str]:
    return reply.code, reply.enhanced, reply.text
