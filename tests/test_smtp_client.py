"""Tests for appliance.delivery.smtp_client against Postfix's smtp-sink on loopback.

smtp-sink shows what arrived after it undid the dot-stuffing; the exact bytes on the wire
(the stuffed form, the command sequence) are captured by a small recording server that
runs in the test on a real socket, and which also scripts per-recipient replies that
smtp-sink cannot give.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from appliance.delivery import smtp_client
from appliance.delivery.smtp_client import (
    DeliveryResult,
    Reply,
    SmtpConnectError,
    SmtpConnection,
    Timeouts,
    dot_stuff,
    parse_reply,
)
from tests.conftest import SinkFactory, free_port, loopback_hosts

FAST = Timeouts(connect=3, command=5, data=5)
BODY = b"Subject: dots\r\nFrom: a@example.org\r\n\r\n.x\r\n.\r\n..\r\nplain\r\n"


# -- pure functions ---------------------------------------------------------------------------


def test_dot_stuff_every_line_start() -> None:
    assert dot_stuff(b".x\r\n.\r\n..\r\nok\r\n") == b"..x\r\n..\r\n...\r\nok\r\n.\r\n"


def test_dot_stuff_adds_final_crlf_and_handles_empty() -> None:
    assert dot_stuff(b"a\r\n.") == b"a\r\n..\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


def test_dot_stuff_normalises_bare_lf_and_cr() -> None:
    # A bare LF before "." must never reach a lenient next hop as "\n.\r\n".
    assert dot_stuff(b"a\n.\r\nb\rc\r\n") == b"a\r\n..\r\nb\r\nc\r\n.\r\n"


def test_parse_reply_multiline_with_enhanced_codes() -> None:
    reply = parse_reply([b"550-5.1.1 no such\r\n", b"550 5.1.1 user here\r\n"])
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.1.1", "no such user here")
    assert str(reply) == "550 5.1.1 no such user here"


def test_parse_reply_enhanced_code_must_match_class() -> None:
    reply = parse_reply([b"250 5.1.1 odd\r\n"])
    assert reply.enhanced == "" and reply.text == "5.1.1 odd"
    assert parse_reply([b"250\r\n"]).code == 250


@pytest.mark.parametrize(
    "lines",
    [[b"25 ok\r\n"], [b"250-a\r\n", b"251 b\r\n"], [b"250-a\r\n"], [b"hello\r\n"], [b"250xok\r\n"]],
)
def test_parse_reply_rejects_malformed(lines: list[bytes]) -> None:
    with pytest.raises(ValueError):
        parse_reply(lines)


# -- against smtp-sink --------------------------------------------------------------------------


async def test_relays_exact_message_with_dot_lines(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    conn = SmtpConnection()
    await conn.connect(sink.host, sink.port, "mta.test", FAST)
    assert "PIPELINING" in conn.extensions  # smtp-sink's default: the pipelined path
    result = await conn.send("a@example.org", ["x@example.net", "y@example.net"], BODY)
    await conn.quit()
    assert [r.code for r in result.recipients] == [250, 250]
    (msg,) = sink.wait_for(1)
    assert msg.data == BODY.replace(b"\r\n", b"\n")
    assert msg.sender == "a@example.org"
    assert msg.recipients == ["x@example.net", "y@example.net"]
    assert msg.helo == "mta.test"
    assert msg.mail_args == "<a@example.org>"  # smtp-sink announces no SIZE or DSN


async def test_reuses_connection_for_several_messages(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(extra=["-p"])  # no PIPELINING: the one-command-at-a-time path
    conn = SmtpConnection()
    await conn.connect(sink.host, sink.port, "mta.test", FAST)
    for i in range(3):
        body = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
        result = await conn.send("a@example.org", [f"r{i}@example.net"], body)
        assert result.recipients[0].positive
    assert conn.messages == 3 and conn.usable
    await conn.quit()
    msgs = sink.wait_for(3)
    assert [m.recipients for m in msgs] == [
        ["r0@example.net"],
        ["r1@example.net"],
        ["r2@example.net"],
    ]


async def test_rcpt_soft_and_hard_failures(smtp_sink: SinkFactory) -> None:
    soft = smtp_sink(soft=["RCPT"])
    hard = smtp_sink(hard=["RCPT"])
    for sink, code in ((soft, 450), (hard, 500)):
        conn = SmtpConnection()
        await conn.connect(sink.host, sink.port, "mta.test", FAST)
        result = await conn.send("a@example.org", ["x@example.net", "y@example.net"], BODY)
        assert [r.code for r in result.recipients] == [code, code]
        assert result.recipients[0].remote
        # Nobody accepted, so no DATA was sent; the open transaction is reset next time.
        assert result.data is None
        again = await conn.send("a@example.org", ["z@example.net"], BODY)
        assert again.recipients[0].code == code
        await conn.quit()
    assert soft.messages() == [] and hard.messages() == []


async def test_data_and_final_dot_rejections(smtp_sink: SinkFactory) -> None:
    for hard, want in ((["DATA"], 500), (["."], 500)):
        sink = smtp_sink(hard=hard)
        conn = SmtpConnection()
        await conn.connect(sink.host, sink.port, "mta.test", FAST)
        result = await conn.send("a@example.org", ["x@example.net", "y@example.net"], BODY)
        assert [r.code for r in result.recipients] == [want, want]
        assert result.data is not None and result.data.code == want
        await conn.quit()


async def test_421_and_disconnect_are_temporary(smtp_sink: SinkFactory) -> None:
    closing = smtp_sink(close421=["RCPT"])
    dropping = smtp_sink(disconnect=["DATA"])
    for sink in (closing, dropping):
        conn = SmtpConnection()
        await conn.connect(sink.host, sink.port, "mta.test", FAST)
        result = await conn.send("a@example.org", ["x@example.net", "y@example.net"], BODY)
        assert all(r.transient for r in result.recipients), result.recipients
        assert result.session_lost and not result.unanswered
        assert not conn.usable
    assert closing.messages() == [] and dropping.messages() == []


async def test_helo_fallback_when_ehlo_refused(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(hard=["EHLO"])
    conn = SmtpConnection()
    await conn.connect(sink.host, sink.port, "mta.test", FAST)
    assert not conn.esmtp and conn.extensions == {}
    result = await conn.send("a@example.org", ["x@example.net"], BODY)
    await conn.quit()
    assert result.recipients[0].positive
    (msg,) = sink.wait_for(1)
    assert msg.mail_args == "<a@example.org>"  # no ESMTP parameters to a HELO server


async def test_5xx_to_ehlo_and_helo_is_temporary(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(hard=["EHLO", "HELO"])
    with pytest.raises(SmtpConnectError) as info:
        await SmtpConnection().connect(sink.host, sink.port, "mta.test", FAST)
    assert info.value.reply.transient


async def test_greeting_refusal_and_connection_refused(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(soft=["CONNECT"])
    with pytest.raises(SmtpConnectError) as info:
        await SmtpConnection().connect(sink.host, sink.port, "mta.test", FAST)
    assert info.value.reply.code == 450
    (host,) = loopback_hosts(1)
    with pytest.raises(SmtpConnectError) as refused:
        await SmtpConnection().connect(host, free_port(host), "mta.test", FAST)
    assert refused.value.reply.transient and not refused.value.reply.remote


async def test_line_breaks_in_addresses_and_helo_never_reach_the_wire(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink()
    with pytest.raises(ValueError):
        await SmtpConnection().connect(sink.host, sink.port, "mta.test\r\nRSET", FAST)
    conn = SmtpConnection()
    await conn.connect(sink.host, sink.port, "mta.test", FAST)
    result = await conn.send(
        "a@example.org", ["x@example.net\r\nRCPT TO:<evil@x>", "ok@example.net"], BODY
    )
    assert result.recipients[0].code == 553 and not result.recipients[0].remote
    assert result.recipients[1].positive
    bad_sender = await conn.send("a@example.org\r\nDATA", ["ok@example.net"], BODY)
    assert bad_sender.recipients[0].code == 553
    await conn.quit()
    (msg,) = sink.wait_for(1)
    assert msg.recipients == ["ok@example.net"]


# -- exact bytes and per-recipient replies: a scripted recording server ---------------------


@dataclass
class Recorder:
    host: str
    port: int
    received: bytearray = field(default_factory=bytearray)
    commands: list[str] = field(default_factory=list)


Script = Callable[[str], str]


def default_script(command: str) -> str:
    verb = command.split(" ", 1)[0].upper()
    if verb == "EHLO":
        return "250-rec\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-DSN\r\n250 8BITMIME"
    if verb == "RCPT" and "bad" in command:
        return "550 5.1.1 no such user"
    if verb == "RCPT" and "later" in command:
        return "451 4.2.0 try later"
    if verb == "DATA":
        return "354 go ahead"
    if verb == "QUIT":
        return "221 bye"
    return "250 2.0.0 ok"


async def start_recorder(script: Script = default_script) -> tuple[Recorder, asyncio.Server]:
    (host,) = loopback_hosts(1)
    rec = Recorder(host, free_port(host))

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder ESMTP\r\n")
        in_data = False
        while line := await reader.readline():
            rec.received += line
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    writer.write(b"250 2.0.0 queued\r\n")
                continue
            command = line.decode().rstrip("\r\n")
            rec.commands.append(command)
            reply = script(command)
            writer.write(reply.encode() + b"\r\n")
            if reply.startswith("354"):
                in_data = True
            if command.upper() == "QUIT":
                break
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(session, rec.host, rec.port)
    return rec, server


async def with_recorder(
    test: Callable[[Recorder, SmtpConnection], Awaitable[None]], script: Script = default_script
) -> Recorder:
    rec, server = await start_recorder(script)
    async with server:
        conn = SmtpConnection()
        await conn.connect(rec.host, rec.port, "mta.test", FAST)
        await test(rec, conn)
        await conn.quit()
    return rec


async def test_stuffed_bytes_on_the_wire() -> None:
    async def test(rec: Recorder, conn: SmtpConnection) -> None:
        result = await conn.send("a@example.org", ["x@example.net"], BODY)
        assert result.recipients[0].positive

    rec = await with_recorder(test)
    wire = bytes(rec.received)
    start = wire.index(b"DATA\r\n") + len(b"DATA\r\n")
    assert wire[start:].startswith(
        b"Subject: dots\r\nFrom: a@example.org\r\n\r\n..x\r\n..\r\n...\r\nplain\r\n.\r\nQUIT\r\n"
    )


async def test_per_recipient_outcomes_and_rset_before_next_transaction() -> None:
    async def test(rec: Recorder, conn: SmtpConnection) -> None:
        rcpts = ["ok@example.net", "bad@example.net", "later@example.net"]
        params = [("BODY", "8BITMIME"), ("RET", "HDRS"), ("AUTH", "<>")]
        rcpt_params = [[("NOTIFY", "FAILURE")], [("ORCPT", "rfc822;bad@example.net")], []]
        result = await conn.send("a@example.org", rcpts, BODY, params, rcpt_params)
        assert [str(r) for r in result.recipients] == [
            "250 2.0.0 queued",
            "550 5.1.1 no such user",
            "451 4.2.0 try later",
        ]
        # Every recipient refused: MAIL stays open, so the next transaction needs RSET.
        refused = await conn.send("a@example.org", ["bad@example.net"], BODY)
        assert refused.recipients[0].code == 550
        again = await conn.send("b@example.org", ["ok@example.net"], BODY)
        assert again.recipients[0].positive

    rec = await with_recorder(test)
    verbs = [c.split(":")[0].split(" ")[0] for c in rec.commands]
    assert verbs == [
        "EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA",
        "MAIL", "RCPT", "DATA",
        "RSET", "MAIL", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip
    # SIZE announced -> our size; BODY and DSN's RET passed through; unknown AUTH dropped.
    assert rec.commands[1] == f"MAIL FROM:<a@example.org> SIZE={len(BODY)} BODY=8BITMIME RET=HDRS"
    assert rec.commands[2] == "RCPT TO:<ok@example.net> NOTIFY=FAILURE"
    assert rec.commands[3] == "RCPT TO:<bad@example.net> ORCPT=rfc822;bad@example.net"


async def test_size_limit_of_next_hop_is_permanent() -> None:
    async def test(rec: Recorder, conn: SmtpConnection) -> None:
        result = await conn.send("a@example.org", ["x@example.net"], b"x" * 2000 + b"\r\n")
        assert str(result.recipients[0]).startswith("552 5.3.4")
        assert not result.recipients[0].remote

    rec = await with_recorder(test)
    assert [c.split(" ")[0] for c in rec.commands] == ["EHLO", "QUIT"]


async def test_pipelined_server_that_wants_a_body_nobody_gets() -> None:
    def script(command: str) -> str:
        return "550 5.1.1 no" if command.startswith("RCPT") else default_script(command)

    async def test(rec: Recorder, conn: SmtpConnection) -> None:
        result = await conn.send("a@example.org", ["x@example.net"], BODY)
        assert result.recipients[0].code == 550
        assert conn.usable

    rec = await with_recorder(test, script)
    assert b"..x" not in bytes(rec.received)  # the body itself was never sent


# -- timeouts: the connection's watchdog ---------------------------------------------------


async def send(conn: SmtpConnection, body: bytes) -> DeliveryResult:
    # Bounded here so that a broken watchdog fails the test instead of hanging it.
    return await conn.send("a@example.org", ["x@example.net"], body)


async def start_stalling_server(
    stall_on: str, *, read_after_stall: bool = True
) -> tuple[str, int, asyncio.Server]:
    """A next hop that answers normally until a command starting with `stall_on`, then
    says nothing more (and, unless `read_after_stall`, stops reading too)."""
    (host,) = loopback_hosts(1)
    port = free_port(host)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 staller ESMTP\r\n")
        while line := await reader.readline():
            command = line.decode(errors="replace").rstrip("\r\n")
            if command.upper().startswith(stall_on):
                if not read_after_stall:
                    await asyncio.sleep(3600)
                while await reader.read(65536):
                    pass  # swallow everything, answer nothing
                break
            reply = default_script(command).replace("PIPELINING\r\n250-", "")
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(session, host, port)
    return host, port, server


async def test_silent_next_hop_times_out_with_a_temporary_reply() -> None:
    host, port, server = await start_stalling_server("RCPT")
    async with server:
        conn = SmtpConnection()
        await conn.connect(host, port, "mta.test", Timeouts(connect=3, command=0.5, data=5))
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await asyncio.wait_for(send(conn, BODY), 10)
        waited = loop.time() - started
        reply = result.recipients[0]
        assert (reply.code, reply.enhanced) == (451, "4.4.2")
        assert reply.text == "timeout waiting for next hop reply"
        assert result.session_lost and not conn.usable
        assert 0.4 < waited < 3.0, waited


async def test_next_hop_that_stops_reading_times_out_while_sending() -> None:
    host, port, server = await start_stalling_server("DATA", read_after_stall=False)

    def answers_data(command: str) -> str:
        if command.startswith("EHLO"):
            return "250-x\r\n250 8BITMIME"  # no SIZE limit, no PIPELINING
        return "354 go ahead" if command.startswith("DATA") else default_script(command)

    async with server:
        conn = SmtpConnection()
        await conn.connect(host, port, "mta.test", Timeouts(connect=3, command=5, data=0.5))
        # The stalling server never answers DATA: send() times out waiting for the 354.
        result = await asyncio.wait_for(send(conn, BODY), 10)
        assert result.recipients[0].text == "timeout waiting for next hop reply"
    # A hop that takes DATA but stops reading: the body write itself must time out.
    (rec_host,) = loopback_hosts(1)
    rec_port = free_port(rec_host)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 x\r\n")
        while line := await reader.readline():
            reply = answers_data(line.decode().rstrip("\r\n"))
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()
            if reply.startswith("354"):
                await asyncio.sleep(3600)  # never read the body

    server = await asyncio.start_server(session, rec_host, rec_port)
    async with server:
        conn = SmtpConnection()
        await conn.connect(rec_host, rec_port, "mta.test", Timeouts(connect=3, command=5, data=0.5))
        big = b"x" * 998 + b"\r\n"
        result = await asyncio.wait_for(send(conn, big * 40_000), 10)
        assert result.recipients[0].text == "timeout sending to next hop"
        assert result.session_lost


async def test_a_short_deadline_is_kept_after_a_longer_one() -> None:
    """The watchdog armed for a long exchange must not delay a shorter one's timeout."""
    host, port, server = await start_stalling_server("RCPT")
    async with server:
        conn = SmtpConnection()
        await conn.connect(host, port, "mta.test", Timeouts(connect=3, command=30, data=30))
        conn._arm(30)  # as if a long exchange had just run
        conn._disarm()
        conn._timeouts = Timeouts(connect=3, command=0.5, data=30)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await asyncio.wait_for(send(conn, BODY), 10)
        assert result.recipients[0].text == "timeout waiting for next hop reply"
        assert loop.time() - started < 3.0


async def test_idle_pooled_connection_is_not_cut_by_the_watchdog() -> None:
    async def test(rec: Recorder, conn: SmtpConnection) -> None:
        conn._timeouts = Timeouts(connect=3, command=0.3, data=0.3)
        assert (await conn.send("a@example.org", ["x@example.net"], BODY)).recipients[0].positive
        await asyncio.sleep(0.8)  # idle well past the command timeout
        assert conn.usable
        assert (await conn.send("a@example.org", ["y@example.net"], BODY)).recipients[0].positive

    await with_recorder(test)


@pytest.mark.parametrize(
    "raw",
    [
        b"250 ok\r\n", b"250\r\n", b"250 \r\n", b"250 2.0.0 ok\r\n", b"550 5.1.1 no such\r\n",
        b"250 5.1.1 odd\r\n", b"451 4.2.0\r\n", b"250 ok\r\r\n", b"250 ok\n",
        b"250  spaced  \r\n", b"250\tx\r\n", b"250 2.0.0  x y\r\n", b"250 2.0.0x\r\n",
        b"250ok\r\n", b"250-more\r\n", b"650 x\r\n", b"250 caf\xc3\xa9\r\n",
    ],
)  # fmt: skip
def test_parse_reply_fast_path_agrees_with_the_general_parser(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parse() -> Reply | str:
        try:
            return parse_reply([raw])
        except ValueError:
            return "malformed"

    fast = parse()
    monkeypatch.setattr(smtp_client, "_ONE_LINE", re.compile(b"(?!)"))  # never matches
    assert parse() == fast
