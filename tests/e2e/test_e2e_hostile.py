"""Hostile and odd clients against a real `sluice run`, over real TCP sockets.

Every case is fed twice (the `mode` parameter): the whole input in one write, and one
byte per write with TCP_NODELAY, so that nothing depends on how the input is cut into
reads. Inputs of a megabyte or more (cases 7 and 14) send their middle in one
write in byte mode too; the bytes around every boundary that matters (the line-length
limit, the line end, the end of data) still go one per write.

What is checked for each case: the exact replies (code and enhanced status), and what was
queued (the `accepted` event, `sluice queue --json`) or what the next hop received (a
`WireSink`, which keeps the raw DATA bytes and the envelope lines as sent).

Two servers are shared by the whole module, one per configuration, both relaying
everything ("*") to one WireSink: `relay` (the default listener settings) and `tight`
(require_helo, max_recipients = 100, max_message_size = 1 MiB, data_timeout = 1). The
suite's `sluice` and `wire_sink` fixtures are function-scoped (tmp_path), so these are
built from the same harness pieces; the bounce case, which needs a next hop that refuses,
uses the `sluice` and `smtp_sink` fixtures themselves. Each test uses its own sender (or
reads its queue id from the 250) to find its own events and captures.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import (
    HOSTNAME,
    RawSmtp,
    Sluice,
    SluiceFactory,
    WireCapture,
    WireSink,
    free_port,
    loopback_hosts,
    new_sluice,
    route_to,
    wait_until,
)

if TYPE_CHECKING:
    from tests.conftest import SinkFactory

ONE = "one-write"
BYTES = "byte-per-write"
by_mode = pytest.mark.parametrize("mode", [ONE, BYTES])

MiB = 1024 * 1024
TIGHT: dict[str, object] = {
    "require_helo": True,
    "max_recipients": 100,
    "max_message_size": MiB,
    "data_timeout": 1,
}
EHLO = b"EHLO client.test\r\n"
GREETED = f"250 {HOSTNAME}"
QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)\Z")


# -- shared servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nexthop() -> Iterator[WireSink]:
    host = loopback_hosts(1)[0]
    sink = WireSink(host, free_port(host))
    yield sink
    sink.close()


def _start_sluice(workdir: Path, nexthop: WireSink, listener: dict[str, object]) -> Sluice:
    server = new_sluice(workdir, routes={"*": route_to(nexthop)}, listener=listener)
    server.start()
    return server


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, nexthop: WireSink) -> Iterator[Sluice]:
    """Default listener settings (the harness only sets relay_networks and timeouts)."""
    server = _start_sluice(tmp_path_factory.mktemp("relay"), nexthop, {})
    yield server
    server.stop(timeout=10)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, nexthop: WireSink) -> Iterator[Sluice]:
    server = _start_sluice(tmp_path_factory.mktemp("tight"), nexthop, TIGHT)
    yield server
    server.stop(timeout=10)


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


# -- the client ------------------------------------------------------------------------------


class Client(RawSmtp):
    """RawSmtp that writes in the test's mode and reads replies as "code enhanced"."""

    def __init__(self, server: Sluice, mode: str) -> None:
        super().__init__(server.host, server.port, timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.mode = mode
        self.text = ""  # the text of the last reply read by status()
        assert self.status() == f"220 {HOSTNAME}"

    def __enter__(self) -> Client:
        return self

    def bytewise(self, data: bytes) -> None:
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])

    def write(self, data: bytes, edge: int = 0) -> None:
        """Send `data` in the test's mode; with `edge`, byte mode sends only the first and
        last `edge` bytes one by one and the middle in one write."""
        if self.mode == ONE:
            self.sock.sendall(data)
        elif edge and len(data) > 2 * edge:
            self.bytewise(data[:edge])
            self.sock.sendall(data[edge:-edge])
            self.bytewise(data[-edge:])
        else:
            self.bytewise(data)

    def status(self) -> str:
        """The next reply as "250 2.1.0" (the first word of an EHLO reply is the name)."""
        code, self.text = self.reply()
        return f"{code} {self.text.split(maxsplit=1)[0]}" if self.text else str(code)

    def exchange(self, data: bytes, replies: int = 1) -> list[str]:
        self.write(data)
        return [self.status() for _ in range(replies)]

    def qid(self) -> str:
        m = QUEUED.match(self.text)
        assert m, f"not a queued reply: {self.text!r}"
        return m.group(1)

    def quiet(self, seconds: float = 0.3) -> bool:
        """Nothing arrives, and the connection stays open, for `seconds`."""
        if self._buf:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(20)
        self._buf += chunk
        return False

    def start_tls(self) -> None:
        assert not self._buf
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname=HOSTNAME)


def envelope(sender: str, *recipients: str) -> bytes:
    lines = [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in recipients]
    return "".join(line + "\r\n" for line in lines).encode()


def open_data(client: Client, sender: str, *recipients: str) -> None:
    """EHLO, MAIL, RCPT..., DATA pipelined in one input, up to the 354."""
    replies = client.exchange(
        EHLO + envelope(sender, *recipients) + b"DATA\r\n", 3 + len(recipients)
    )
    assert replies == [GREETED, "250 2.1.0", *["250 2.1.5"] * len(recipients), "354 2.0.0"]


def stuffed(message: bytes) -> bytes:
    """RFC 5321 4.5.2: a line beginning with "." gets one more."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def captures_for(nexthop: WireSink, sender: str, count: int = 1) -> list[WireCapture]:
    """The `count` transactions the next hop got from `sender` (one per recipient domain),
    waiting for them; fails if more or fewer arrive."""
    mail = f"MAIL FROM:<{sender}>".encode()

    def found() -> list[WireCapture]:
        return [m for m in nexthop.messages() if m.mail.split(b" ")[:2] == mail.split(b" ")]

    captures = wait_until(lambda: len(found()) >= count, timeout=15) and found()
    assert len(captures) == count, captures
    return list(captures)


def capture_for(nexthop: WireSink, sender: str) -> WireCapture:
    [capture] = captures_for(nexthop, sender)
    return capture


def nothing_queued(server: Sluice, sender: str) -> None:
    """Neither an `accepted` event nor a queue entry from `sender`."""
    assert server.events("accepted", sender=sender) == []
    assert [row for row in server.queue_json() if row["sender"] == sender] == []


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- 1, 2: only CRLF . CRLF ends the data ----------------------------------------------------


@by_mode
def test_commands_after_a_bare_lf_dot_are_body(relay: Sluice, mode: str, uid: str) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        open_data(client, sender, "b@example.com")
        client.write(
            b"first body\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
            b"DATA\r\nsecond\r\n.\r\n"
        )
        # One reply for all of it: the refusal of the bare LF, no 250 for the inner MAIL.
        assert client.status() == "550 5.6.0"
        assert client.quiet()
        assert client.exchange(b"NOOP\r\n") == ["250 2.0.0"]
    nothing_queued(relay, sender)
    assert relay.events("accepted", sender="a@example.org") == []


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n"], ids=["lf-dot-lf", "crlf-dot-lf"])
@by_mode
def test_quit_after_a_fake_end_of_data_is_body(
    relay: Sluice, mode: str, uid: str, fake_end: bytes
) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        open_data(client, sender, "b@example.com")
        client.write(b"Subject: fake end\r\n\r\nbody" + fake_end + b"QUIT\r\n")
        # The message goes on and QUIT did not run: no reply, no close.
        assert client.quiet()
        started = time.monotonic()
        client.write(b".\r\n")  # after "QUIT\r\n": the first real CRLF.CRLF
        assert client.status() == "550 5.6.0"
        assert time.monotonic() - started < 2
        assert client.quiet(0.2)
        assert client.exchange(b"NOOP\r\n") == ["250 2.0.0"]
    nothing_queued(relay, sender)


# -- 3, 4: transparency and BDAT ---------------------------------------------------------------

DOTS_SENT = b"..x\r\n..\r\n...\r\n.\r\n"
DOTS_STORED = b".x\r\n.\r\n..\r\n"


@by_mode
def test_dot_stuffing_stored_unstuffed_relayed_stuffed(
    relay: Sluice, nexthop: WireSink, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        open_data(client, sender, "b@dots.test")
        assert client.exchange(DOTS_SENT) == ["250 2.0.0"]
        qid = client.qid()
    capture = capture_for(nexthop, sender)
    # The next hop gets exactly the stuffed bytes the client sent, after our Received:.
    assert capture.raw.endswith(DOTS_SENT)
    header = capture.raw[: -len(DOTS_SENT)]
    assert header.startswith(b"Received: from client.test ") and header.endswith(b"\r\n")
    assert qid.encode() in header
    # What was stored is the header and the unstuffed message: ".x", ".", "..".
    [accepted] = relay.events("accepted", qid=qid)
    assert accepted["size"] == len(header) + len(DOTS_STORED)


BDAT_FIRST = b"Subject: bdat\r\n\r\nbefore\r\n.\r\nMAIL FROM:<inner@example.org>\r\nQUIT\r\n"
BDAT_LAST = b"after\r\n"


@by_mode
def test_bdat_chunk_with_crlf_dot_crlf_is_kept(
    relay: Sluice, nexthop: WireSink, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        assert client.exchange(EHLO + envelope(sender, "b@bdat.test"), 3) == [
            GREETED,
            "250 2.1.0",
            "250 2.1.5",
        ]
        chunks = (
            b"BDAT %d\r\n" % len(BDAT_FIRST)
            + BDAT_FIRST
            + b"BDAT %d LAST\r\n" % len(BDAT_LAST)
            + BDAT_LAST
        )
        assert client.exchange(chunks) == ["250 2.0.0"]
        assert client.text == f"2.0.0 {len(BDAT_FIRST)} octets received"
        assert client.status() == "250 2.0.0"
        qid = client.qid()
        assert client.quiet(0.1)
    body = BDAT_FIRST + BDAT_LAST
    capture = capture_for(nexthop, sender)
    assert capture.raw.endswith(stuffed(body) + b".\r\n")
    header = capture.raw[: -len(stuffed(body) + b".\r\n")]
    assert header.startswith(b"Received: from client.test ")
    [accepted] = relay.events("accepted", qid=qid)
    assert accepted["size"] == len(header) + len(body)
    assert relay.events("accepted", sender="inner@example.org") == []


# -- 5: STARTTLS injection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "injected", [b"RSET\r\n", b"MAIL FROM:<x@example.org>\r\n"], ids=["rset", "mail"]
)
@pytest.mark.parametrize("listener", ["relay", "tight"])
@by_mode
def test_commands_pipelined_after_starttls_never_run(
    request: pytest.FixtureRequest, listener: str, injected: bytes, mode: str
) -> None:
    server: Sluice = request.getfixturevalue(listener)
    with Client(server, mode) as client:
        assert client.exchange(EHLO) == [GREETED]
        assert "\nSTARTTLS" in client.text
        if mode == ONE:
            client.sock.sendall(b"STARTTLS\r\n" + injected)
        else:  # the STARTTLS line byte by byte; its last byte and the injection together
            client.bytewise(b"STARTTLS\r")
            client.sock.sendall(b"\n" + injected)
        assert client.status() == "220 2.0.0"
        client.start_tls()
        # The first reply after the handshake answers our command: the injected RSET
        # (250 2.0.0) or MAIL (250 2.1.0) never ran, and the greeting was forgotten too.
        if listener == "tight":  # require_helo
            assert client.exchange(b"MAIL FROM:<y@example.org>\r\n") == ["503 5.5.1"]
            assert client.text == "5.5.1 Send HELO or EHLO first"
        else:
            assert client.exchange(b"RCPT TO:<y@example.org>\r\n") == ["503 5.5.1"]
            assert client.text == "5.5.1 Need MAIL before RCPT"
        assert client.exchange(EHLO) == [GREETED]
        assert "STARTTLS" not in client.text
        assert client.exchange(b"MAIL FROM:<y@example.org>\r\nQUIT\r\n", 2) == [
            "250 2.1.0",
            "221 2.0.0",
        ]


# -- 6: the DATA timeout -------------------------------------------------------------------------


@by_mode
def test_silent_client_inside_data_gets_421_and_nothing_runs(
    tight: Sluice, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    late = f"late-{uid}@src.test"
    with Client(tight, mode) as client:
        open_data(client, sender, "b@example.com")
        client.write(b"Subject: never finished\r\n\r\npartial")
        started = time.monotonic()
        code, text = client.reply()
        waited = time.monotonic() - started
        assert (code, text) == (421, f"4.4.2 {HOSTNAME} timeout exceeded, closing connection")
        assert 0.8 <= waited < 5, waited  # data_timeout = 1
        assert client.closed_by_peer(5)
        # Too late: the end of the message and a new transaction are never read.
        with contextlib.suppress(OSError):
            client.write(b"\r\n.\r\n" + envelope(late, "b@example.com") + b"DATA\r\nx\r\n.\r\n")
    time.sleep(0.3)
    nothing_queued(tight, sender)
    nothing_queued(tight, late)


# -- 7: a 1 MiB line -----------------------------------------------------------------------------


@by_mode
def test_megabyte_command_line_gets_one_500_then_resyncs(relay: Sluice, mode: str) -> None:
    assert relay.proc is not None
    before = rss_kib(relay.proc.pid)
    with Client(relay, mode) as client:
        assert client.exchange(EHLO) == [GREETED]
        client.write(b"X" * MiB, edge=8192)
        assert client.status() == "500 5.5.2"
        assert client.text == "5.5.2 Line too long"
        # The rest of the line up to its end is dropped; the next line is a command.
        assert client.exchange(b"\r\nNOOP\r\n") == ["250 2.0.0"]
        assert client.quiet(0.1)
    growth = rss_kib(relay.proc.pid) - before
    assert growth < 32 * 1024, f"RSS grew by {growth} KiB"
    assert relay.running


@pytest.mark.parametrize(
    ("listener", "expected"),
    [("relay", "250 2.0.0"), ("tight", "552 5.3.4")],
    ids=["10MiB-accepted", "1MiB-refused"],
)
@by_mode
def test_megabyte_line_inside_data_is_body(
    request: pytest.FixtureRequest, nexthop: WireSink, listener: str, expected: str, mode: str
) -> None:
    server: Sluice = request.getfixturevalue(listener)
    assert server.proc is not None
    sender = f"s-{uuid.uuid4().hex[:12]}@src.test"
    line = b"y" * MiB
    before = rss_kib(server.proc.pid)
    with Client(server, mode) as client:
        open_data(client, sender, "b@long.test")
        client.write(b"Subject: one long line\r\n\r\n" + line + b"\r\n.\r\n", edge=8192)
        assert client.status() == expected
        if expected == "552 5.3.4":
            assert client.exchange(b"NOOP\r\n") == ["250 2.0.0"]
    growth = rss_kib(server.proc.pid) - before
    assert growth < 32 * 1024, f"RSS grew by {growth} KiB"
    assert server.running
    if expected == "552 5.3.4":
        nothing_queued(server, sender)
    else:
        capture = capture_for(nexthop, sender)
        assert capture.raw.endswith(b"\r\n\r\n" + line + b"\r\n.\r\n")


# -- 8: too many recipients ----------------------------------------------------------------------


@by_mode
def test_thousand_recipients_first_hundred_accepted(
    tight: Sluice, nexthop: WireSink, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    recipients = [f"r{i}-{uid}@many.test" for i in range(1000)]
    with Client(tight, mode) as client:
        assert client.exchange(EHLO) == [GREETED]
        replies = client.exchange(envelope(sender, *recipients), 1 + len(recipients))
        assert replies == ["250 2.1.0"] + ["250 2.1.5"] * 100 + ["452 4.5.3"] * 900
        assert client.exchange(b"DATA\r\n") == ["354 2.0.0"]
        assert client.exchange(b"Subject: many\r\n\r\nhi\r\n.\r\n") == ["250 2.0.0"]
        qid = client.qid()
    [accepted] = tight.events("accepted", qid=qid)
    assert accepted["recipients"] == recipients[:100]
    capture = capture_for(nexthop, sender)
    assert capture.rcpts == [f"RCPT TO:<{r}>".encode() for r in recipients[:100]]


# -- 9-12: commands -----------------------------------------------------------------------------


@by_mode
def test_commands_are_case_insensitive(
    relay: Sluice, nexthop: WireSink, mode: str, uid: str
) -> None:
    sender = f"a-{uid}@example.com"
    with Client(relay, mode) as client:
        script = (
            f"ehlo client.test\r\nmail from:<{sender}> body=8bitmime\r\n"
            "Rcpt To:<b@example.net>\r\ndata\r\n"
        ).encode()
        assert client.exchange(script, 4) == [GREETED, "250 2.1.0", "250 2.1.5", "354 2.0.0"]
        assert client.exchange(b"Subject: lower\r\n\r\ncaf\xc3\xa9\r\n.\r\n") == ["250 2.0.0"]
        qid = client.qid()
    [accepted] = relay.events("accepted", qid=qid)
    assert accepted["recipients"] == ["b@example.net"]
    # The lower-case BODY parameter was understood and is passed on as sent (the next hop
    # has 8BITMIME; parameter values are kept as the client wrote them).
    assert capture_for(nexthop, sender).mail == f"MAIL FROM:<{sender}> BODY=8bitmime".encode()


@by_mode
def test_ehlo_inside_a_transaction_resets_it(relay: Sluice, mode: str, uid: str) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        script = EHLO + envelope(sender, "b@example.com") + EHLO + b"DATA\r\n"
        assert client.exchange(script, 5) == [
            GREETED,
            "250 2.1.0",
            "250 2.1.5",
            GREETED,
            "503 5.5.1",
        ]
        assert client.text == "5.5.1 Need MAIL command"
        assert client.exchange(b"RCPT TO:<b@example.com>\r\n") == ["503 5.5.1"]
    nothing_queued(relay, sender)


@by_mode
def test_rset_clears_the_envelope_but_keeps_the_greeting(
    tight: Sluice, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    with Client(tight, mode) as client:
        script = EHLO + envelope(sender, "dropped@example.com") + b"RSET\r\nDATA\r\n"
        replies = client.exchange(script, 5)
        assert replies == [GREETED, "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1"]
        # require_helo is on: MAIL is taken, so the EHLO survived the RSET.
        script = envelope(sender, "kept@example.com") + b"DATA\r\n"
        assert client.exchange(script, 3) == ["250 2.1.0", "250 2.1.5", "354 2.0.0"]
        assert client.exchange(b"Subject: after rset\r\n\r\nhi\r\n.\r\n") == ["250 2.0.0"]
        qid = client.qid()
    [accepted] = tight.events("accepted", qid=qid)
    assert accepted["recipients"] == ["kept@example.com"]
    assert accepted["helo"] == "client.test"


@by_mode
def test_noop_changes_nothing(relay: Sluice, mode: str, uid: str) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        script = (
            b"NOOP\r\n"
            + EHLO
            + b"NOOP\r\n"
            + envelope(sender)
            + b"NOOP\r\nRCPT TO:<b@example.com>\r\nNOOP\r\nDATA\r\n"
        )
        assert client.exchange(script, 8) == [
            "250 2.0.0",
            GREETED,
            "250 2.0.0",
            "250 2.1.0",
            "250 2.0.0",
            "250 2.1.5",
            "250 2.0.0",
            "354 2.0.0",
        ]
        assert client.exchange(b"Subject: noop\r\n\r\nhi\r\n.\r\n") == ["250 2.0.0"]
        qid = client.qid()
    [accepted] = relay.events("accepted", qid=qid)
    assert (accepted["sender"], accepted["recipients"]) == (sender, ["b@example.com"])


@by_mode
def test_vrfy_and_expn_get_252(relay: Sluice, mode: str) -> None:
    with Client(relay, mode) as client:
        assert client.exchange(EHLO + b"VRFY user\r\nEXPN list\r\n", 3) == [
            GREETED,
            "252 2.5.0",
            "252 2.5.0",
        ]


@by_mode
def test_address_literals_and_bare_postmaster_are_recipients(
    relay: Sluice, nexthop: WireSink, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        rcpts = b"RCPT TO:<user@[192.0.2.1]>\r\nRCPT TO:<user@[IPv6:2001:db8::1]>\r\n"
        script = EHLO + envelope(sender) + rcpts + b"RCPT TO:<Postmaster>\r\nDATA\r\n"
        assert client.exchange(script, 6) == [GREETED, "250 2.1.0"] + ["250 2.1.5"] * 3 + [
            "354 2.0.0"
        ]
        assert client.exchange(b"Subject: literals\r\n\r\nhi\r\n.\r\n") == ["250 2.0.0"]
        qid = client.qid()
    [accepted] = relay.events("accepted", qid=qid)
    # <Postmaster> without a domain is this host's postmaster (RFC 5321 4.5.1).
    assert accepted["recipients"] == [
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        f"postmaster@{HOSTNAME}",
    ]
    # One transaction per destination domain, each with its RCPT as written.
    captures = captures_for(nexthop, sender, 3)
    assert sorted(rcpt for c in captures for rcpt in c.rcpts) == [
        b"RCPT TO:<postmaster@gw.sluice.test>",
        b"RCPT TO:<user@[192.0.2.1]>",
        b"RCPT TO:<user@[IPv6:2001:db8::1]>",
    ]


# -- 13: the null reverse path -------------------------------------------------------------------


@by_mode
def test_failed_message_from_null_sender_never_bounces(
    sluice: SluiceFactory, smtp_sink: SinkFactory, mode: str
) -> None:
    refusing = smtp_sink(hard=["RCPT"])
    server = sluice(routes={"*": route_to(refusing)})
    with Client(server, mode) as client:
        open_data(client, "", "gone@refused.test")
        assert client.exchange(b"Subject: a bounce\r\n\r\nhi\r\n.\r\n") == ["250 2.0.0"]
        qid = client.qid()
    [accepted] = server.wait_event("accepted", qid=qid)
    assert accepted["sender"] == ""
    [bounced] = server.wait_event("bounced", qid=qid)
    assert bounced["recipient"] == "gone@refused.test"
    [dropped] = server.wait_event("dropped", qid=qid)
    assert dropped["reason"] == "double bounce"
    assert server.events("bounce_queued") == []
    assert wait_until(lambda: server.queue_json() == [], timeout=10)


@by_mode
def test_null_sender_with_auth_parameter_is_accepted(relay: Sluice, mode: str) -> None:
    with Client(relay, mode) as client:
        script = EHLO + b"MAIL FROM:<>\r\nRSET\r\nMAIL FROM:<> AUTH=<>\r\n"
        assert client.exchange(script, 4) == [GREETED, "250 2.1.0", "250 2.0.0", "250 2.1.0"]


# -- 14: SIZE ------------------------------------------------------------------------------------


@by_mode
def test_declared_size_beyond_the_limit_is_refused(relay: Sluice, mode: str, uid: str) -> None:
    sender = f"s-{uid}@src.test"
    with Client(relay, mode) as client:
        script = (
            EHLO
            + f"MAIL FROM:<{sender}> SIZE=99999999999999999999999\r\n".encode()
            + f"MAIL FROM:<{sender}> SIZE={10 * MiB + 1}\r\n".encode()
            + f"MAIL FROM:<{sender}> SIZE={10 * MiB}\r\n".encode()
        )
        assert client.exchange(script, 4) == [GREETED, "552 5.3.4", "552 5.3.4", "250 2.1.0"]


@by_mode
def test_real_size_beyond_the_limit_is_refused_whatever_was_declared(
    tight: Sluice, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    body = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * (2 * MiB // 80)
    assert len(body) > 2 * MiB - 100
    with Client(tight, mode) as client:
        script = f"MAIL FROM:<{sender}> SIZE=10\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        assert client.exchange(EHLO + script.encode(), 4) == [
            GREETED,
            "250 2.1.0",
            "250 2.1.5",
            "354 2.0.0",
        ]
        client.write(body + b".\r\n", edge=8192)
        assert client.status() == "552 5.3.4"
        assert client.exchange(b"NOOP\r\n") == ["250 2.0.0"]
    nothing_queued(tight, sender)


# -- 15, 16: addresses -------------------------------------------------------------------------


@by_mode
def test_shell_characters_in_addresses_are_relayed_exactly(
    relay: Sluice, nexthop: WireSink, mode: str, uid: str
) -> None:
    sender = f"s-{uid}@src.test"
    rcpts = ['"x;rm -rf ~"@example.com', "x|id@example.com"]
    with Client(relay, mode) as client:
        open_data(client, sender, *rcpts)
        assert client.exchange(b"Subject: shell\r\n\r\nhi\r\n.\r\n") == ["250 2.0.0"]
        qid = client.qid()
    [accepted] = relay.events("accepted", qid=qid)
    assert accepted["recipients"] == rcpts
    assert capture_for(nexthop, sender).rcpts == [
        b'RCPT TO:<"x;rm -rf ~"@example.com>',
        b"RCPT TO:<x|id@example.com>",
    ]


@by_mode
def test_utf8_addresses_need_smtputf8_and_no_invisible_characters(relay: Sluice, mode: str) -> None:
    with Client(relay, mode) as client:
        script = "\r\n".join(
            [
                "EHLO client.test",
                "MAIL FROM:<jörg@exämple.de> SMTPUTF8",
                "RCPT TO:<zero\u200bwidth@example.de>",
                "RCPT TO:<c1\u0085control@example.de>",
                "RSET",
                "MAIL FROM:<jörg@exämple.de>",
                "MAIL FROM:<zero\u200bwidth@example.de> SMTPUTF8",
                "MAIL FROM:<zero\u200bwidth@example.de>",
                "MAIL FROM:<c1\u0085control@example.de> SMTPUTF8",
                "MAIL FROM:<ascii\x01control@example.de>",
                "",
            ]
        ).encode()
        assert client.exchange(script, 10) == [
            GREETED,
            "250 2.1.0",
            "501 5.1.3",  # RCPT: bad destination address syntax (RFC 3463)
            "501 5.1.3",
            "250 2.0.0",
            "553 5.6.7",
            "501 5.1.7",
            "501 5.1.7",
            "501 5.1.7",
            "501 5.1.7",
        ]


# -- EHLO and real clients -----------------------------------------------------------------------


@pytest.mark.parametrize(("listener", "size"), [("relay", 10 * MiB), ("tight", MiB)])
@by_mode
def test_ehlo_lists_what_works_and_no_auth(
    request: pytest.FixtureRequest, listener: str, size: int, mode: str
) -> None:
    server: Sluice = request.getfixturevalue(listener)
    with Client(server, mode) as client:
        assert client.exchange(EHLO) == [GREETED]
        assert client.text.split("\n") == [
            HOSTNAME,
            "PIPELINING",
            f"SIZE {size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
            "CHUNKING",
            "STARTTLS",
        ]
        assert client.exchange(b"AUTH PLAIN AGFhAGI=\r\n") == ["502 5.5.1"]


def test_swaks_pipelining_over_tls(relay: Sluice, nexthop: WireSink, uid: str) -> None:
    """swaks --pipeline and --tls each have a test already; here both at once."""
    sender = f"s-{uid}@src.test"
    res = subprocess.run(
        [
            "swaks",
            "--server",
            f"{relay.host}:{relay.port}",
            "--tls",
            "--pipeline",
            "--helo",
            "swaks.test",
            "--from",
            sender,
            "--to",
            "b@swaks.test,c@swaks.test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "<-  220 2.0.0 Ready to start TLS" in res.stdout
    assert "~> DATA\n<~  250 2.1.0" in res.stdout, res.stdout
    capture = capture_for(nexthop, sender)
    assert capture.rcpts == [b"RCPT TO:<b@swaks.test>", b"RCPT TO:<c@swaks.test>"]
    assert re.search(rb"with ESMTPS id \w+ \(TLSv1\.3 ", capture.raw), capture.raw[:400]
