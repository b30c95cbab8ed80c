"""Delivery scheduler: moves due mail from the queue to next hops and records the outcome.

Runs as one task on the product's uvloop loop, in the unprivileged Python process. The
inbound side calls `notify()` after a message is queued so it leaves at once; everything
else is driven by the queue's schedule (`Queue.due`, `Queue.next_due_time`).

One attempt of one message:
  recipients still pending are grouped by domain; each domain is resolved (`Router`);
  its hosts are tried in order, moving on only while a host cannot be used at all
  (connection refused or timed out, greeting or EHLO/HELO refused, connection lost before
  the server answered MAIL); once a host took the transaction its replies are final for
  this attempt (RFC 5321 4.5.4.1, 5.1). Per recipient: 2xx delivered, 5xx bounced, 4xx or
  no usable host deferred with exponential backoff and jitter.
  The record is written back after every attempt (`Queue.update`), or removed when no
  recipient is left, so a crash right after a delivery does not deliver again.
  Recipients that failed permanently in the attempt produce one RFC 3464 bounce
  (`appliance.bounce`) queued from <> to the envelope sender; mail from <> and our own
  bounces are never bounced (RFC 5321 4.5.5, RFC 3464 2): the report goes to the
  configured postmaster or is dropped. Mail still deferred after `max_queue_time` is
  bounced as expired (RFC 3463 4.4.7).

Bounded resources: at most `window` messages in flight (deferred mail waits in the queue,
not in memory), at most `delivery.max_connections` outbound connections, idle connections
reused for up to `delivery.messages_per_connection` messages and closed after a few
seconds. Time is injected (`clock`, `sleep`) so retry timing is tested on a fake clock.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from appliance.bounce import build_bounce, format_expired, format_reply, parse_reply_record
from appliance.config import Config
from appliance.delivery.routing import Router
from appliance.delivery.smtp_client import (
    MAX_RCPT_PER_TRANSACTION,
    Reply,
    SmtpConnectError,
    SmtpConnection,
    Timeouts,
    local_reply,
)
from appliance.eventlog import log_event
from appliance.queue import MessageRecord, Queue, RecipientRecord, new_queue_id

Hop = tuple[str, int]

# Seconds an unused connection stays open for the next message to the same host; long
# enough for a burst, short enough not to hold the remote server's slots.
IDLE_SECONDS = 5.0
# Seconds `run()` lets attempts in flight finish after `stop()` before cancelling them.
SHUTDOWN_GRACE = 30.0


class _Pool:
    """Outbound connections: a global limit, reuse of idle connections per host.

    A slot is held from connect until the connection is closed (after QUIT). A task that
    finds no free slot waits in line; a connection coming back is handed straight to a
    waiter for the same host, or closed to free its slot when others wait for other hosts,
    or else kept idle for a few seconds.
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
        self._helo = helo_name
        self._timeouts = timeouts
        self._per_connection = per_connection
        self._factory = factory
        self._idle: dict[Hop, list[SmtpConnection]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._waiters: list[tuple[Hop, asyncio.Future[SmtpConnection | None]]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0  # connections ever opened (for tests and metrics)
        self.peak = 0  # most connections open at once

    async def acquire(
        self, host: str, port: int, fresh: bool = False
    ) -> tuple[SmtpConnection, bool]:
        """A connected, greeted connection to host:port and whether it was reused.

        Raises SmtpConnectError when a new connection cannot be set up.
        """
        key = (host, port)
        while True:
            idle = self._idle.get(key, [])
            while idle and not fresh:
                conn = idle.pop()
                self._cancel_timer(conn)
                if conn.usable:
                    return conn, True
                self._discard(conn)
            if self._open < self._limit:
                break
            if self._evict_one():
                continue  # its slot frees once it is closed; wait for that below
            future: asyncio.Future[SmtpConnection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append((key, future))
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
        self.peak = max(self.peak, self._open)
        conn = self._factory()
        try:
            await conn.connect(host, port, self._helo, self._timeouts)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        self.opened += 1
        return conn, False

    def release(self, conn: SmtpConnection) -> None:
        """Return a connection after a transaction: hand it on, keep it idle, or close it."""
        if not conn.usable or conn.messages >= self._per_connection:
            self._discard(conn)
            return
        key = (conn.host, conn.port)
        for i, (wanted, future) in enumerate(self._waiters):
            if wanted == key and not future.done():
                del self._waiters[i]
                future.set_result(conn)
                return
        if any(not future.done() for _, future in self._waiters):
            self._discard(conn)  # someone needs a slot for another host
            return
        self._idle.setdefault(key, []).append(conn)
        loop = asyncio.get_running_loop()
        self._timers[id(conn)] = loop.call_later(IDLE_SECONDS, self._expire, conn)

    def _wake_one(self) -> None:
        while self._waiters:
            _, future = self._waiters.pop(0)
            if not future.done():
                future.set_result(None)
                return

    def _expire(self, conn: SmtpConnection) -> None:
        self._timers.pop(id(conn), None)
        idle = self._idle.get((conn.host, conn.port), [])
        if conn in idle:
            idle.remove(conn)
            self._discard(conn)

    def _evict_one(self) -> bool:
        for key, idle in self._idle.items():
            if idle:
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

        async def close() -> None:
            try:
                await conn.quit()
            finally:
                self._open -= 1
                self._wake_one()

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
        rng: random.Random | None = None,
        connection_factory: Callable[[], SmtpConnection] = SmtpConnection,
    ) -> None:
        self._queue = queue
        self._router = router
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._window = window
        self._rng = rng or random.Random()
        delivery = config.delivery
        self._pool = _Pool(
            delivery.max_connections,
            delivery.helo_name or config.hostname,
            Timeouts.from_config(delivery),
            delivery.messages_per_connection,
            connection_factory,
        )
        self._active: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False

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
        try:
            while not self._stopping:
                self._dispatch()
                await self._wait()
        finally:
            tasks = list(self._active.values())
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.gather(*late, return_exceptions=True)
            await self._pool.close_all()

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

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self) -> int:
        room = self._window - len(self._active)
        if room <= 0:
            return 0
        started = 0
        # Records in flight are still due in the queue: ask for enough to see past them.
        for record in self._queue.due(self._clock(), room + len(self._active)):
            if started >= room:
                break
            if record.qid in self._active:
                continue
            task = asyncio.get_running_loop().create_task(self._attempt(record))
            self._active[record.qid] = task
            task.add_done_callback(functools.partial(self._finished, record.qid))
            started += 1
        return started

    def _finished(self, qid: str, _task: asyncio.Task[None]) -> None:
        self._active.pop(qid, None)
        self._wake.set()

    async def _wait(self) -> None:
        if self._wake.is_set():
            self._wake.clear()
            return
        timeout: float | None = None
        if len(self._active) < self._window:
            next_due = self._queue.next_due_time()
            if next_due is not None:
                timeout = next_due - self._clock()
                if timeout <= 0:
                    # Everything due is already in flight: a finishing attempt wakes us.
                    timeout = None
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
            record.next_attempt = self._clock() + self._config.delivery.retry_initial
            await self._queue.update(record)

    async def _deliver_message(self, record: MessageRecord) -> None:
        try:
            body = self._queue.body(record.qid)
        except KeyError:
            return  # removed meanwhile (operator, or a concurrent attempt finished it)
        domains: dict[str, list[RecipientRecord]] = {}
        for rcpt in record.pending_recipients():
            domain = rcpt.address.rpartition("@")[2].lower()
            domains.setdefault(domain, []).append(rcpt)
        failed: list[RecipientRecord] = []
        await asyncio.gather(
            *(self._deliver_domain(record, d, rcpts, body, failed) for d, rcpts in domains.items())
        )

        now = self._clock()
        record.attempts += 1
        deferred = [r for r in record.recipients if r.state == "deferred"]
        expires = record.arrived + self._config.max_queue_time
        if deferred and now >= expires:
            for rcpt in deferred:
                rcpt.state = "bounced"
                rcpt.last_reply = format_expired(rcpt.last_reply)
                rcpt.updated = now
                failed.append(rcpt)
            log_event(
                "expired",
                qid=record.qid,
                recipients=[r.address for r in deferred],
                reply="4.4.7 message expired",
            )
        elif deferred:
            # Never wait past the expiry: the last attempt happens when it is due.
            record.next_attempt = min(now + self._backoff(record.attempts), expires)
            for rcpt in deferred:
                log_event(
                    "deferred",
                    qid=record.qid,
                    recipient=rcpt.address,
                    host=parse_reply_record(rcpt.last_reply).host,
                    reply=rcpt.last_reply,
                    next_attempt=record.next_attempt,
                )
        if failed:
            await self._bounce(record, failed, body, now)
        if record.done():
            await self._queue.remove(record.qid)
        else:
            await self._queue.update(record)

    def _backoff(self, attempts: int) -> float:
        delivery = self._config.delivery
        delay = delivery.retry_initial * 2.0 ** min(max(attempts - 1, 0), 40)
        # Jitter spreads retries of mail deferred together (one outage) over time.
        return min(delay * self._rng.uniform(0.9, 1.1), delivery.retry_max)

    async def _deliver_domain(
        self,
        record: MessageRecord,
        domain: str,
        rcpts: list[RecipientRecord],
        body: bytes,
        failed: list[RecipientRecord],
    ) -> None:
        resolution = await self._router.resolve(domain)
        if not resolution.ok:
            reply = local_reply(resolution.code, resolution.enhanced, resolution.reason)
            for rcpt in rcpts:
                self._outcome(record, rcpt, None, reply, failed)
            return
        pending = list(rcpts)
        last_error: tuple[str, Reply] | None = None
        for host, port in resolution.hosts:
            name = resolution.names.get(host, host)
            label = host if name == host else f"{name}[{host}]"
            fresh = False
            while pending:
                try:
                    conn, reused = await self._pool.acquire(host, port, fresh)
                except SmtpConnectError as exc:
                    last_error = (label, exc.reply)
                    log_event(
                        "connect_failed", qid=record.qid, host=label, port=port, reply=str(exc)
                    )
                    break
                chunk = pending[:MAX_RCPT_PER_TRANSACTION]
                log_event(
                    "delivery_attempt",
                    qid=record.qid,
                    recipients=[r.address for r in chunk],
                    host=label,
                    port=port,
                    reused=reused,
                )
                result = await conn.send(
                    record.sender,
                    [r.address for r in chunk],
                    body,
                    record.mail_params,
                    [r.params for r in chunk],
                )
                self._pool.release(conn)
                if result.unanswered:
                    # Nothing was said about this mail, so trying again cannot duplicate
                    # it: a reused connection may just have been closed by the server
                    # while idle (retry fresh); a fresh one means this host is unusable.
                    last_error = (label, result.recipients[0])
                    if reused:
                        fresh = True
                        continue
                    break
                for rcpt, reply in zip(chunk, result.recipients, strict=True):
                    self._outcome(record, rcpt, label, reply, failed)
                del pending[: len(chunk)]
            if not pending:
                return
        host_label, reply = last_error or (None, local_reply(451, "4.4.1", "no host to try"))
        for rcpt in pending:
            self._outcome(record, rcpt, host_label, reply, failed)

    def _outcome(
        self,
        record: MessageRecord,
        rcpt: RecipientRecord,
        host: str | None,
        reply: Reply,
        failed: list[RecipientRecord],
    ) -> None:
        state: Literal["delivered", "bounced", "deferred"]
        if reply.positive:
            state = "delivered"
        elif reply.permanent:
            state = "bounced"
            failed.append(rcpt)
        else:
            state = "deferred"
        rcpt.state = state
        rcpt.attempts += 1
        rcpt.updated = self._clock()
        rcpt.last_reply = format_reply(host, reply.code, reply.enhanced, reply.text)
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
        bounce = MessageRecord(
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
        await self._queue.submit(bounce, data)
        log_event(
            "bounce_queued", qid=record.qid, bounce_qid=bounce.qid, to=to, recipients=addresses
        )
        self.notify()
