"""Inbound: the Python half of the listener bridge.

The Rust listener (`appliance._native.Server`) owns the sockets and the SMTP dialog; it
asks Python only at policy points. Its eventfd becomes readable when questions are
waiting; `Inbound` drains them all in one call, answers what it can at once, and sends
the answers back in one call. Questions that must wait (a message waiting for its group
commit, an asynchronous policy lookup) are answered in a later batch, as they finish.

A complete message (`kind == "data"`) goes through `MessageAcceptor`: loop check, a
queue record, and the durable group commit. The listener has already put our Received:
header in front of the body and chosen the queue id it names (`Request.qid`), so the
message is stored as handed over, without another copy. Only when that commit is
on disk does the client get its 250 with the queue id (the queue's durability rule).
The copy for a configured bounce address is not queued: it is parsed and recorded in the
bounce log (appliance/bounce_intake.py), fsync'ed before the 250 as well.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import lmdb

from appliance import eventlog, trace
from appliance.bounce_intake import BounceIntake
from appliance.eventlog import log_event
from appliance.policy import Policy, PolicyResult, Verdict
from appliance.queue import MessageRecord, Queue, RecipientRecord

if TYPE_CHECKING:
    from appliance._native import Request, Server
    from appliance.config import Config

LOOP_DETECTED = Verdict(554, "5.4.6", "mail loop detected: too many Received: headers")
QUEUE_FAILED = Verdict(451, "4.3.0", "temporary queue failure, try again later")
# RFC 5321 452 "insufficient system storage", RFC 3463 4.3.1 "mail system full".
QUEUE_FULL = Verdict(452, "4.3.1", "insufficient system storage, try again later")
BOUNCE_LOG_FAILED = Verdict(451, "4.3.0", "temporary bounce log failure, try again later")


class MessageAcceptor:
    """Turns a complete message into a durable queue entry and answers with its queue id."""

    def __init__(self, config: Config, queue: Queue, on_queued: Callable[[], None]) -> None:
        self._config = config
        self._queue = queue
        self._on_queued = on_queued
        # Stored with each message: the scheduler retries it by this profile.
        self._profiles = {lc.name: lc.bounce_profile for lc in config.listeners}
        self._bounces = BounceIntake(config) if config.bounce_addresses else None

    def accept(self, request: Request, reply: Callable[[Verdict], None]) -> PolicyResult | None:
        """Decide on a complete message: a verdict now (a loop), an awaitable of one (a
        report for the bounce address), or None when `reply` will be called on this loop
        with the verdict, once the message is durable (the usual case: no task or future
        per message, and the 250s of a commit batch go out together)."""
        body = request.body  # our Received: header, then the message as received
        start = request.trace_len  # where the client's message begins
        if trace.is_loop(body, start):
            log_event(
                "reject",
                reason="loop",
                peer=request.peer_ip,
                sender=request.sender,
                received=trace.count_received(body, start),
            )
            return LOOP_DETECTED
        if self._bounces is not None:
            to_us = [i for i, r in enumerate(request.recipients) if r in self._bounces.addresses]
            if to_us:
                return self._intake(self._bounces, request, body, to_us)
        self._commit(request, body, reply)
        return None

    async def _intake(
        self, bounces: BounceIntake, request: Request, body: bytes, to_us: list[int]
    ) -> Verdict:
        """A report for our bounce address: recorded, not relayed; any other recipients
        of the same message are queued as usual under the same queue id. The log is
        written first, so a failure after it (queue) means a 451 and, when the client
        sends again, the report recorded twice: never a 250 for an unrecorded report."""
        qid = request.qid
        bounce_to = request.recipients[to_us[0]]
        report = body[request.trace_len :]  # the report as the reporting host sent it
        loop = asyncio.get_running_loop()
        try:
            records = await loop.run_in_executor(
                None,
                lambda: bounces.record(
                    report,
                    bounce_id=qid,
                    sender=request.sender,
                    bounce_to=bounce_to,
                    peer=request.peer_ip,
                    now=time.time(),
                ),
            )
        except Exception as exc:  # the disk said no: the client must keep the message
            log_event("bounce_error", qid=qid, error=repr(exc))
            return BOUNCE_LOG_FAILED
        log_event(
            "bounce_received",
            qid=qid,
            peer=request.peer_ip,
            sender=request.sender,
            bounce_to=bounce_to,
            size=len(report),
            format=records[0].format if records else "",
            failed=[r.recipient for r in records],
            classes=[r.bounce_class for r in records],
            original_qids=sorted({r.original_qid for r in records if r.original_qid}),
        )
        others = [i for i in range(len(request.recipients)) if i not in to_us]
        if others:
            queued: asyncio.Future[Verdict] = loop.create_future()
            self._commit(request, body, queued.set_result, qid=qid, only=others)
            return await queued
        return Verdict(250, "2.0.0", f"Ok: bounce recorded as {qid}")

    def _commit(
        self,
        request: Request,
        body: bytes,
        reply: Callable[[Verdict], None],
        qid: str | None = None,
        only: list[int] | None = None,
    ) -> None:
        """Queue the message for its recipients (only those at indexes `only`, if given)
        and call `reply` with the verdict once it is durable (or could not be stored)."""
        now = time.time()
        qid = qid or request.qid
        indexes = range(len(request.recipients)) if only is None else only
        recipients = [self._local_postmaster(request.recipients[i]) for i in indexes]
        rcpt_params = [request.rcpt_params[i] for i in indexes]
        # Stored as handed over, our Received: header included. When only some recipients
        # are queued (the others were our bounce address) the message had two or more,
        # so that header names none of them (`for` only ever names a sole recipient).
        stored = body
        record = MessageRecord(
            qid=qid,
            arrived=now,
            sender=request.sender,
            mail_params=list(request.mail_params),
            recipients=[
                RecipientRecord(address=address, params=list(params))
                for address, params in zip(recipients, rcpt_params, strict=True)
            ],
            size=len(stored),
            peer_ip=request.peer_ip,
            helo=request.helo or "",
            listener=request.listener,
            next_attempt=now,
            bounce_profile=self._profiles.get(request.listener, ""),
        )
        size = len(stored)

        def durable(error: BaseException | None) -> None:
            if error is not None:  # the disk said no: the client must keep the message
                log_event("queue_error", qid=qid, error=repr(error))
                reply(QUEUE_FULL if _storage_full(error) else QUEUE_FAILED)
                return
            log_event(
                "accepted",
                qid=qid,
                peer=request.peer_ip,
                helo=request.helo,
                sender=request.sender,
                recipients=recipients,
                size=size,
                listener=request.listener,
            )
            self._on_queued()
            reply(Verdict(250, "2.0.0", f"Ok: queued as {qid}"))

        try:
            self._queue.submit_then(record, stored, durable)
        except Exception as exc:  # closing, or a record that cannot be encoded
            durable(exc)

    def _local_postmaster(self, address: str) -> str:
        # <Postmaster> with no domain (RFC 5321 4.5.1) means this host's postmaster.
        if "@" in address:
            return address
        return self._config.postmaster or f"postmaster@{self._config.hostname}"


class Inbound:
    """Drains the listener's questions, asks policy, and returns verdicts in batches."""

    def __init__(
        self,
        server: Server,
        policy: Policy,
        acceptor: MessageAcceptor,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._server = server
        self._policy = policy
        self._acceptor = acceptor
        self._loop = loop
        self._ready: list[tuple[int, int, str, str]] = []
        self._flush_scheduled = False
        self._waiting: set[asyncio.Task[Verdict]] = set()
        # Messages whose verdict comes by callback (MessageAcceptor.accept returned None).
        self._committing: set[int] = set()
        self._handlers: dict[str, Callable[[Request], PolicyResult | None]] = {
            "connect": self._on_connect,
            "mail": policy.on_mail,
            "rcpt": policy.on_rcpt,
            "data": self._on_data,
        }

    def start(self) -> None:
        self._loop.add_reader(self._server.fileno(), self._on_readable)

    def stop(self) -> None:
        self._loop.remove_reader(self._server.fileno())

    @property
    def in_flight(self) -> int:
        """Questions still being decided (messages waiting for their commit, lookups)."""
        return len(self._waiting) + len(self._committing)

    async def drain(self, grace: float) -> None:
        """Wait until every question already asked has been answered, or `grace` seconds."""
        deadline = self._loop.time() + grace
        while self.in_flight and self._loop.time() < deadline:
            if self._waiting:
                await asyncio.wait(set(self._waiting), timeout=deadline - self._loop.time())
            else:
                await asyncio.sleep(0.01)  # commits in progress answer by callback
        self._flush()

    def _on_data(self, request: Request) -> PolicyResult | None:
        request_id = request.id
        self._committing.add(request_id)

        def reply(verdict: Verdict) -> None:
            self._committing.discard(request_id)
            self._answer_later(request_id, verdict)

        try:
            result = self._acceptor.accept(request, reply)
        except BaseException:
            self._committing.discard(request_id)
            raise
        if result is not None:
            self._committing.discard(request_id)  # answered the other way
        return result

    def _on_connect(self, request: Request) -> PolicyResult:
        log_event(
            "connect",
            session=request.session,
            peer=request.peer_ip,
            port=request.peer_port,
            listener=request.listener,
        )
        return self._policy.on_connect(request)

    def _on_readable(self) -> None:
        for request in self._server.take_requests():
            try:
                result = self._handlers[request.kind](request)
            except Exception as exc:  # a policy bug must not hang the client
                log_event("policy_error", kind=request.kind, error=repr(exc))
                result = Verdict(451, "4.3.0", "temporary local problem, try again later")
            if isinstance(result, Verdict):
                if result.code >= 400 and request.kind != "data":
                    _log_refusal(request, result)
                self._ready.append((request.id, result.code, result.enhanced, result.text))
            elif result is not None:  # None: the verdict comes by callback (_on_data)
                self._wait_for(request.id, result)
        self._flush()

    def _wait_for(self, request_id: int, pending: Awaitable[Verdict]) -> None:
        coroutine = pending if inspect.iscoroutine(pending) else _awaited(pending)
        task = self._loop.create_task(coroutine)
        self._waiting.add(task)

        def finished(done: asyncio.Task[Verdict]) -> None:
            self._waiting.discard(task)
            if done.cancelled():
                verdict = Verdict(421, "4.3.2", "service shutting down")
            elif (exc := done.exception()) is not None:
                log_event("policy_error", error=repr(exc))
                verdict = Verdict(451, "4.3.0", "temporary local problem, try again later")
            else:
                verdict = done.result()
            self._answer_later(request_id, verdict)

        task.add_done_callback(finished)

    def _answer_later(self, request_id: int, verdict: Verdict) -> None:
        self._ready.append((request_id, verdict.code, verdict.enhanced, verdict.text))
        # Answers that come in the same loop iteration go back in one call.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._ready:
            # The lines about these answers (refusals, accepted) go out before them.
            eventlog.flush()
            ready, self._ready = self._ready, []
            self._server.answer(ready)


def _storage_full(error: BaseException) -> bool:
    """The queue's map or the file system is full (as opposed to any other failure)."""
    if isinstance(error, lmdb.MapFullError):
        return True
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _log_refusal(request: Request, verdict: Verdict) -> None:
    """One `reject` line per refused connection, sender or recipient, so an operator can
    see why a client was turned away (refused messages are logged where they are decided)."""
    log_event(
        "reject",
        stage=request.kind,
        session=request.session,
        peer=request.peer_ip,
        helo=request.helo,
        sender=request.sender if request.kind == "rcpt" else request.address,
        recipient=request.address if request.kind == "rcpt" else None,
        reply=f"{verdict.code} {verdict.enhanced} {verdict.text}",
    )


async def _awaited(pending: Awaitable[Verdict]) -> Verdict:
    return await pending
