"""End to end: clients (smtplib, swaks, raw sockets) -> `sluice run` -> smtp-sink.

What a client sees (replies, queue ids), what the next hop receives (envelope, our
Received: header, the message byte for byte, dot-stuffing on the wire) and what the
event log says, for a real `sluice run` process.
"""

from __future__ import annotations

import email.utils
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import (
    HOSTNAME,
    RawSmtp,
    Sluice,
    SluiceFactory,
    WireSink,
    route_to,
    wait_until,
)

if TYPE_CHECKING:
    from tests.conftest import SinkFactory

QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)\Z")


def split_received(data: bytes) -> tuple[str, bytes]:
    """Split a message (LF line ends, as smtp-sink dumps it) into its first header field,
    unfolded, and everything after that field."""
    lines = data.split(b"\n")
    field = [lines[0]]
    i = 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        field.append(lines[i])
        i += 1
    unfolded = b" ".join(part.strip() for part in field).decode()
    return unfolded, b"\n".join(lines[i:])


def check_our_received(header: str, qid: str, helo: str) -> None:
    """Our trace header (RFC 5321 4.4): from <helo> ([ip]) by <us> with ESMTP id <qid>;
    <date>."""
    assert header.startswith(f"Received: from {helo} "), header
    assert "[127.0.0.1]" in header, header
    assert f"by {HOSTNAME} " in header, header
    assert re.search(rf"\bwith E?SMTP id {re.escape(qid)}\b", header), header
    date = header.rpartition(";")[2].strip()
    assert email.utils.parsedate_to_datetime(date) is not None, header


def data_reply_qid(reply: bytes | str) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    m = QUEUED.match(text)
    assert m, f"not a queued reply: {text!r}"
    return m.group(1)


MESSAGES = [
    (
        "alice@src.test",
        ["bob@dest.test"],
        b"From: Alice <alice@src.test>\r\n"
        b"To: Bob <bob@dest.test>\r\n"
        b"Subject: first\r\n"
        b"Message-ID: <m1@src.test>\r\n"
        b"X-Folded: one\r\n"
        b"\ttwo\r\n"
        b"\r\n"
        b"Hello Bob,\r\n"
        b"\r\n"
        b"  indented line with trailing space \r\n"
        b"\ttab\tseparated\r\n"
        b"From the start of a line\r\n"
        b"caf\xc3\xa9 8-bit text\r\n"
        b"\r\n"
        b"\r\n",
    ),
    (
        "alice@src.test",
        ["carol@dest.test", "dave@dest.test", "erin@dest.test"],
        b"Subject: second, three recipients\r\nMessage-ID: <m2@src.test>\r\n\r\n"
        + b"x" * 998
        + b"\r\nlast line\r\n",
    ),
    (
        "frank@other-src.test",
        ["grace@dest.test", "heidi@dest.test"],
        b"Subject: third\r\nMessage-ID: <m3@src.test>\r\n\r\nbody\r\n",
    ),
]


def test_smtplib_messages_arrive_byte_exact(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    server = sluice(routes={"dest.test": route_to(sink)})

    qids = []
    with server.smtp() as client:
        code, _ = client.ehlo()
        assert code == 250
        # Several messages on one connection, several recipients per message.
        for sender, recipients, body in MESSAGES:
            assert client.mail(sender)[0] == 250
            for rcpt in recipients:
                assert client.rcpt(rcpt)[0] == 250
            code, reply = client.data(body)
            assert code == 250, reply
            qids.append(data_reply_qid(reply))
    assert len(set(qids)) == len(qids)

    received = sink.wait_for(len(MESSAGES), timeout=20)
    assert len(received) == len(MESSAGES)
    by_qid = {}
    for msg in received:
        header, _ = split_received(msg.data)
        m = re.search(r"\bid (\S+?);?(?: |$)", header)
        assert m, header
        by_qid[m.group(1).rstrip(";")] = msg
    assert sorted(by_qid) == sorted(qids)

    for qid, (sender, recipients, body) in zip(qids, MESSAGES, strict=True):
        msg = by_qid[qid]
        assert msg.sender == sender
        assert sorted(msg.recipients) == sorted(recipients)
        header, rest = split_received(msg.data)
        check_our_received(header, qid, "client.test")
        # Exactly one trace header added; the original follows unchanged (the dump
        # turns CRLF into LF, nothing else).
        assert rest == body.replace(b"\r\n", b"\n")

        [accepted] = server.wait_event("accepted", qid=qid)
        assert accepted["sender"] == sender
        assert sorted(accepted["recipients"]) == sorted(recipients)
        delivered = server.wait_event("delivered", count=len(recipients), qid=qid)
        assert sorted(e["recipient"] for e in delivered) == sorted(recipients)

    assert wait_until(lambda: server.queue_json() == [], timeout=10)


def swaks(server: Sluice, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"{server.host}:{server.port}", "--helo", "swaks.test", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


# The DATA of the dot-stuffing case, unstuffed. "..x" as the first body line, then lines
# that are exactly "." and "..": on the wire each gets one more leading dot.
DOTS_MESSAGE = (
    b"Subject: dots\r\nMessage-ID: <dots@src.test>\r\n\r\n..x\r\n.\r\n..\r\n. not alone\r\nend\r\n"
)


def stuffed(message: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency: a leading "." on any line is doubled."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def test_swaks_plain_and_pipelined(
    sluice: SluiceFactory, smtp_sink: SinkFactory, tmp_path: Path
) -> None:
    sink = smtp_sink()
    server = sluice(routes={"dest.test": route_to(sink)})
    data = tmp_path / "message.eml"
    # swaks sends the file with CRLF line ends, stuffs leading dots itself and ends the
    # data with CRLF . CRLF (so the file has no final newline of its own).
    data.write_bytes(DOTS_MESSAGE.replace(b"\r\n", b"\n").removesuffix(b"\n"))

    plain = swaks(server, "--from", "a@src.test", "--to", "b@dest.test", "--data", str(data))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    piped = swaks(
        server,
        "--pipeline",
        "--from",
        "a@src.test",
        "--to",
        "c@dest.test,d@dest.test",
        "--data",
        str(data),
    )
    assert piped.returncode == 0, piped.stdout + piped.stderr
    # swaks really pipelined: MAIL, both RCPTs and DATA went out before the first reply.
    assert " -> DATA\n<-  250 2.1.0" in piped.stdout, piped.stdout
    qids = [re.findall(r"<-\s+250 2\.0\.0 Ok: queued as (\S+)", r.stdout) for r in (plain, piped)]
    assert [len(q) for q in qids] == [1, 1], (plain.stdout, piped.stdout)

    received = sink.wait_for(2, timeout=20)
    assert len(received) == 2
    by_rcpts = {tuple(sorted(m.recipients)): m for m in received}
    assert set(by_rcpts) == {("b@dest.test",), ("c@dest.test", "d@dest.test")}
    for rcpts, [qid] in zip([("b@dest.test",), ("c@dest.test", "d@dest.test")], qids, strict=True):
        msg = by_rcpts[rcpts]
        assert msg.sender == "a@src.test"
        header, rest = split_received(msg.data)
        check_our_received(header, qid, "swaks.test")
        # smtp-sink's dump is the message after un-stuffing: the lines as the user wrote
        # them. Had Sluice forgotten to stuff, "." would have ended the message early
        # at the sink; had it stuffed twice, "..x" would arrive as "...x".
        assert rest == DOTS_MESSAGE.replace(b"\r\n", b"\n")
        server.wait_event("delivered", count=len(rcpts), qid=qid)


def test_dot_stuffing_on_the_wire(sluice: SluiceFactory, wire_sink: Callable[[], WireSink]) -> None:
    """The next hop gets the stuffed bytes (what a sink un-stuffs), ending CRLF.CRLF."""
    nexthop: WireSink = wire_sink()
    server = sluice(routes={"wire.test": route_to(nexthop)})
    with RawSmtp(server.host, server.port) as client:
        assert client.reply()[0] == 220
        assert client.command(b"EHLO raw.test")[0] == 250
        assert client.command(b"MAIL FROM:<a@src.test>")[0] == 250
        assert client.command(b"RCPT TO:<b@wire.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        client.send(stuffed(DOTS_MESSAGE) + b".\r\n")
        code, text = client.reply()
        assert code == 250, text
        qid = data_reply_qid(text)
        assert client.command(b"QUIT")[0] == 221

    assert wait_until(lambda: len(nexthop.messages()) >= 1, timeout=15)
    [capture] = nexthop.messages()
    assert capture.mail.upper().startswith(b"MAIL FROM:<A@SRC.TEST>")
    assert [r.upper().startswith(b"RCPT TO:<B@WIRE.TEST>") for r in capture.rcpts] == [True]
    assert capture.raw.endswith(b"\r\n.\r\n")
    header_end = capture.raw.index(b"\r\nSubject: dots")
    assert capture.raw[:header_end].startswith(b"Received: from raw.test ")
    assert qid.encode() in capture.raw[:header_end]
    assert capture.raw[header_end + 2 :] == stuffed(DOTS_MESSAGE) + b".\r\n"
    assert b"\r\n...x\r\n..\r\n...\r\n.. not alone\r\n" in capture.raw


def test_relay_denied_outside_relay_networks(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    server = sluice(
        routes={"example.com": route_to(sink)},
        listener={"relay_networks": ["10.0.0.0/8"], "accepted_domains": ["example.com"]},
    )
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("someone@elsewhere.test")[0] == 250
        code, text = client.rcpt("user@other.org")
        assert code == 550 and text.startswith(b"5.7.1"), (code, text)
        code, text = client.rcpt("user@example.com")
        assert code == 250, (code, text)
        code, reply = client.data(b"Subject: inbound\r\n\r\nfor example.com\r\n")
        assert code == 250, reply
        qid = data_reply_qid(reply)
    [msg] = sink.wait_for(1, timeout=20)
    assert msg.recipients == ["user@example.com"]
    [accepted] = server.wait_event("accepted", qid=qid)
    assert accepted["recipients"] == ["user@example.com"]


def _message_with_received(n: int) -> bytes:
    trace = b"".join(
        b"Received: from hop%d.test ([192.0.2.%d])\r\n"
        b"\tby hop%d.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i % 250 + 1, i + 1)
        for i in range(n)
    )
    return trace + b"Subject: hops\r\n\r\nbody\r\n"


def test_mail_loop_over_100_received_headers(sluice: SluiceFactory, smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    server = sluice(routes={"dest.test": route_to(sink)})
    with server.smtp() as client:
        client.ehlo()
        client.mail("a@src.test")
        client.rcpt("b@dest.test")
        code, text = client.data(_message_with_received(101))
        assert code == 554 and text.startswith(b"5.4.6"), (code, text)

        client.mail("a@src.test")
        client.rcpt("b@dest.test")
        code, text = client.data(_message_with_received(100))
        assert code == 250, (code, text)
        qid = data_reply_qid(text)
    [msg] = sink.wait_for(1, timeout=20)
    assert msg.data.count(b"\nReceived: ") + msg.data.startswith(b"Received: ") == 101
    assert [e["qid"] for e in server.events("accepted")] == [qid]


SMUGGLED = b"MAIL FROM:<x@evil.test>\nRCPT TO:<y@dest.test>\nDATA\nSubject: smuggled\n\nbad\n"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"line one\nline two\r\n", id="bare-lf"),
        pytest.param(b"line one\rline two\r\n", id="bare-cr"),
        pytest.param(b"text\n.\n" + SMUGGLED + b".\nend\r\n", id="lf-dot-lf"),
        pytest.param(b"text\r\n.\n" + SMUGGLED + b".\r\n", id="crlf-dot-lf"),
        pytest.param(b"text\n.\r\n" + SMUGGLED + b".\r\n", id="lf-dot-crlf"),
    ],
)
def test_bare_lf_in_data_is_refused_and_not_queued(
    sluice: SluiceFactory, smtp_sink: SinkFactory, payload: bytes
) -> None:
    sink = smtp_sink()
    server = sluice(routes={"dest.test": route_to(sink)})
    with RawSmtp(server.host, server.port) as client:
        assert client.reply()[0] == 220
        assert client.command(b"EHLO raw.test")[0] == 250
        assert client.command(b"MAIL FROM:<a@src.test>")[0] == 250
        assert client.command(b"RCPT TO:<b@dest.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        # The message ends only at CRLF.CRLF: one reply for all of it, a refusal.
        client.send(b"Subject: smuggle\r\n\r\n" + payload + b".\r\n")
        code, text = client.reply()
        assert code == 550 and text.startswith("5.6.0"), (code, text)
        # The session goes on, in step: the next reply is the one to our next command
        # (a smuggled command answered on its own would show up here instead).
        assert client.command(b"NOOP")[0] == 250
        assert client.command(b"MAIL FROM:<a@src.test>")[0] == 250
        assert client.command(b"RCPT TO:<c@dest.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        client.send(b"Subject: clean\r\n\r\nok\r\n.\r\n")
        code, text = client.reply()
        assert code == 250, text
        qid = data_reply_qid(text)
    [msg] = sink.wait_for(1, timeout=20)
    assert msg.recipients == ["c@dest.test"]
    assert b"smuggle" not in msg.data
    assert [e["qid"] for e in server.events("accepted")] == [qid]
    assert wait_until(lambda: server.queue_json() == [], timeout=10)
    # Nothing else ever reached the next hop.
    assert len(sink.messages()) == 1


def test_malformed_addresses(sluice: SluiceFactory) -> None:
    server = sluice()
    with RawSmtp(server.host, server.port) as client:
        assert client.reply()[0] == 220
        assert client.command(b"EHLO raw.test")[0] == 250
        for bad in (b"MAIL FROM:<a@@b.test>", b"MAIL FROM:<a b@c.test>", b"MAIL FROM:<a@>"):
            code, text = client.command(bad)
            assert (code, text[:5]) == (501, "5.1.7"), (bad, code, text)
        assert client.command(b"MAIL FROM:<a@src.test>")[0] == 250
        for bad in (b"RCPT TO:<b@>", b"RCPT TO:<b c@d.test>", b"RCPT TO:<b@@d.test>"):
            code, text = client.command(bad)
            assert (code, text[:5]) == (501, "5.1.3"), (bad, code, text)
        assert client.command(b"RCPT TO:<b@d.test>")[0] == 250
