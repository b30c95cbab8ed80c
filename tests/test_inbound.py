"""MessageAcceptor: a complete message becomes a durable queue entry before its 250.

The listener hands over the message with our Received: header already in front
(`trace_len` long) and the queue id it names; these tests stand in for that request and
check when and with what the acceptor answers: 250 with the queue id only once the record
is readable from the queue (committed); 452 4.3.1 when the queue is full, 451 4.3.0 when
it cannot store the message for another reason.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance import queue as queue_module
from appliance.config import _build
from appliance.inbound import MessageAcceptor
from appliance.policy import Verdict
from appliance.queue import Queue, new_queue_id

HEADER = b"Received: from client.test ([192.0.2.9])\r\n\tby mx.test (Sluice)\r\n"


def request(body: bytes) -> Any:
    return SimpleNamespace(
        sender="a@client.test",
        recipients=["b@dest.test"],
        rcpt_params=[[]],
        mail_params=[],
        body=HEADER + body,
        qid=new_queue_id(),
        trace_len=len(HEADER),
        helo="client.test",
        peer_ip="192.0.2.9",
        esmtp=True,
        tls=None,
        listener="inbound",
    )


def acceptor_for(tmp_path: Path, queue: Queue, queued: list[str]) -> MessageAcceptor:
    config = replace(_build("t.toml", {"hostname": "mx.test", "data_dir": str(tmp_path)}, None))
    return MessageAcceptor(config, queue, lambda: queued.append("wake"))


async def answer(acceptor: MessageAcceptor, req: Any, queue: Queue) -> tuple[Verdict, bool]:
    """The verdict, and whether the message was in the queue when the verdict came."""
    loop = asyncio.get_running_loop()
    replied: asyncio.Future[tuple[Verdict, bool]] = loop.create_future()

    def reply(verdict: Verdict) -> None:
        replied.set_result((verdict, queue.get(req.qid) is not None))

    assert acceptor.accept(req, reply) is None  # the verdict comes by callback
    return await asyncio.wait_for(replied, 10)


async def test_250_names_the_queue_id_and_comes_after_the_commit(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    woken: list[str] = []
    try:
        req = request(b"Subject: x\r\n\r\nhello\r\n")
        verdict, stored = await answer(acceptor_for(tmp_path, queue, woken), req, queue)
        assert (verdict.code, verdict.enhanced) == (250, "2.0.0")
        assert verdict.text == f"Ok: queued as {req.qid}"
        assert stored, "the 250 came before the record was committed"
        assert queue.body(req.qid) == req.body  # our header and the message, as handed over
        assert woken == ["wake"]  # delivery was told
    finally:
        await queue.close()


async def test_a_full_queue_gets_452_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "MAP_SIZE", 1024 * 1024)  # LMDB: MDB_MAP_FULL soon
    queue = Queue(tmp_path)
    woken: list[str] = []
    try:
        req = request(b"x" * (4 * 1024 * 1024) + b"\r\n")
        verdict, stored = await answer(acceptor_for(tmp_path, queue, woken), req, queue)
        # RFC 5321 452 insufficient system storage, RFC 3463 4.3.1 mail system full
        assert (verdict.code, verdict.enhanced) == (452, "4.3.1")
        assert not stored and queue.count() == 0 and woken == []
    finally:
        await queue.close()


async def test_a_closing_queue_gets_451(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    acceptor = acceptor_for(tmp_path, queue, [])
    await queue.close()
    replies: list[Verdict] = []
    assert acceptor.accept(request(b"Subject: x\r\n\r\nhi\r\n"), replies.append) is None
    assert [(v.code, v.enhanced) for v in replies] == [(451, "4.3.0")]  # at once
