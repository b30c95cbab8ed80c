"""End to end: a real Postfix as Sluice's next hop (issue 4), for STARTTLS, PIPELINING
and DSN interoperation.

The Postfix instance is bench/servers.py's `PostfixServer` (its own main.cf, master.cf,
queue and data directories, one smtpd on a 127.x.y.z address, started with
`postfix -c DIR`), here with a self-signed certificate for STARTTLS
(`smtpd_tls_security_level = may`, `smtpd_tls_received_header = yes`), mail for
`held.test` put on hold (so its queue file can be read with `postcat`), and everything
else relayed to an smtp-sink whose dump shows what Postfix received and passed on.
Postfix logs to its own `maillog_file` (postlogd), so no syslog is needed.

Evidence is taken from both sides: Postfix's Received: header, its log and its queue
files; Sluice's event log. PIPELINING is seen on the wire by a small TCP relay between
Sluice and Postfix that records who said what, in order (a plain-text session; the
TLS sessions cannot be read).

Skipped, with the reason, only where a private Postfix cannot run at all (not root, no
Postfix installed, no `postfix` user); a Postfix that is there but fails to start fails
the tests.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.servers import POSTFIX, PostfixServer
from tests.conftest import Sink, SinkMessage, start_sink, stop_sink
from tests.e2e.harness import Sluice, SluiceFactory, free_port, loopback_hosts, wait_until

POSTFIX_NAME = "postfix.test"
HELD = "held.test"  # Postfix holds mail for this domain (check_recipient_access HOLD)


def _why_no_postfix() -> str | None:
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (postfix start, mail_owner postfix)"
    if not Path(POSTFIX).exists():
        return f"Postfix is not installed ({POSTFIX} is missing)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user for Postfix's mail_owner"
    return None


@dataclass
class PostfixWorld:
    postfix: PostfixServer
    sink: Sink  # Postfix's relayhost

    def arrived(self, recipient: str, timeout: float = 20.0) -> SinkMessage:
        """The message Postfix relayed to the sink for `recipient` (waits for it)."""
        found = wait_until(lambda: self._find(recipient), timeout)
        assert found, (
            f"nothing for {recipient} reached the sink behind Postfix\n"
            f"{self.postfix.maillog()[-3000:]}"
        )
        message: SinkMessage = found
        return message

    def _find(self, recipient: str) -> SinkMessage | None:
        for message in self.sink.messages():
            if recipient in message.recipients:
                return message
        return None


@pytest.fixture(scope="module")
def postfix_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixWorld]:
    reason = _why_no_postfix()
    if reason is not None:
        pytest.skip(reason)
    sink = start_sink(tmp_path_factory.mktemp("postfix-nexthop"))
    # Postfix's daemons (user postfix) must search every parent of the queue directory.
    # pytest keeps its base directory at mode 0700 and resets it when a session starts
    # (another session may start meanwhile), so the instance lives in /var/tmp instead.
    workdir = Path(tempfile.mkdtemp(prefix="sluice-postfix-", dir="/var/tmp"))
    postfix: PostfixServer | None = None
    try:
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={POSTFIX_NAME}",
             "-days", "2", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        (host,) = loopback_hosts(1)
        postfix = PostfixServer(
            host,
            workdir / "postfix",
            relay_to=f"{sink.host}:{sink.port}",
            settings={
                "myhostname": POSTFIX_NAME,
                "smtpd_tls_cert_file": str(cert),
                "smtpd_tls_key_file": str(key),
                "smtpd_tls_security_level": "may",
                "smtpd_tls_received_header": "yes",
                "smtpd_tls_loglevel": "1",
                "smtpd_recipient_restrictions": f"check_recipient_access inline:{{{HELD}=HOLD}}",
            },
        )
        postfix.start()
        yield PostfixWorld(postfix, sink)
    finally:
        if postfix is not None:
            postfix.stop()
        stop_sink(sink)
        shutil.rmtree(workdir, ignore_errors=True)


def route(world: PostfixWorld) -> list[str]:
    return [f"{world.postfix.host}:{world.postfix.port}"]


def send(
    server: Sluice,
    recipients: list[str],
    subject: str,
    mail_options: tuple[str, ...] = (),
    rcpt_options: tuple[str, ...] = (),
) -> str:
    """One message into Sluice; its queue id."""
    with server.smtp() as client:
        client.ehlo()
        code, text = client.mail("alice@src.test", list(mail_options))
        assert code == 250, text
        for rcpt in recipients:
            code, text = client.rcpt(rcpt, list(rcpt_options))
            assert code == 250, text
        code, text = client.data(f"Subject: {subject}\r\nFrom: alice@src.test\r\n\r\nbody\r\n")
        assert code == 250, text
    m = re.search(rb"queued as (\S+)", text)
    assert m, text
    return m.group(1).decode()


def headers_of(message: SinkMessage) -> email.message.Message:
    return email.message_from_bytes(message.data, policy=email.policy.compat32)


def unfold(value: str) -> str:
    return " ".join(value.split())


def test_starttls_to_postfix_opportunistic_and_required(
    sluice: SluiceFactory, postfix_world: PostfixWorld
) -> None:
    server = sluice(
        routes={"tls-may.test": route(postfix_world), "tls-req.test": route(postfix_world)},
        destinations={
            "tls-may.test": {"tls": "opportunistic"},
            "tls-req.test": {"tls": "required"},
        },
    )
    qids = {
        "may@tls-may.test": send(server, ["may@tls-may.test"], "opportunistic"),
        "req@tls-req.test": send(server, ["req@tls-req.test"], "required"),
    }
    for rcpt, qid in qids.items():
        (delivered,) = server.wait_event("delivered", qid=qid)
        assert delivered["recipient"] == rcpt
        assert delivered["reply"].startswith("250 2.0.0 Ok: queued as ")
        # Sluice's side: the session had TLS.
        (attempt,) = server.events("delivery_attempt", qid=qid)
        assert attempt["tls"].startswith("TLSv1."), attempt

        # Postfix's side: its Received: header says it took the message over TLS
        # (smtpd_tls_received_header), as ESMTPS, from Sluice's HELO name.
        message = postfix_world.arrived(rcpt)
        postfix_received, sluice_received, *_ = headers_of(message).get_all("Received") or []
        trace = unfold(postfix_received)
        assert trace.startswith("from gw.sluice.test (unknown [127.0.0.1])"), trace
        assert re.search(r"\(using TLSv1\.[23] with cipher \S+", trace), trace
        assert f"by {POSTFIX_NAME} (Postfix) with ESMTPS id" in trace, trace
        assert f"for <{rcpt}>" in trace, trace
        assert attempt["tls"].split()[0] in trace  # the same protocol version on both sides
        # ... and Sluice's own header below it names this message.
        assert f"with ESMTP id {qid}" in unfold(sluice_received)

    log = postfix_world.postfix.maillog()
    assert len(re.findall(r"TLS connection established from unknown\[127\.0\.0\.1\]", log)) >= 2


# -- PIPELINING, seen on the wire -----------------------------------------------------------


class Tap:
    """A TCP relay from host:port to `target` that records every chunk in the order it
    was read, with its direction ("C" client to server, "S" server to client). A chunk
    is recorded before it is passed on, so a server reply always comes after the client
    bytes it answers."""

    def __init__(self, host: str, port: int, target: tuple[str, int]) -> None:
        self.host, self.port, self.target = host, port, target
        self.chunks: list[tuple[str, bytes]] = []
        self.sessions = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)
        self._stopping = False
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stopping = True
        self._threads[0].join(timeout=5)
        self._listener.close()

    def turns(self) -> list[tuple[str, bytes]]:
        """Consecutive chunks of one direction joined: who said what, turn by turn."""
        out: list[tuple[str, bytes]] = []
        with self._lock:
            for direction, data in self.chunks:
                if out and out[-1][0] == direction:
                    out[-1] = (direction, out[-1][1] + data)
                else:
                    out.append((direction, data))
        return out

    def _serve(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=10)
            self.sessions += 1
            for src, dst, direction in ((client, server, "C"), (server, client, "S")):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    self.chunks.append((direction, data))
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_pipelining_many_recipients_and_connection_reuse_with_postfix(
    sluice: SluiceFactory, postfix_world: PostfixWorld
) -> None:
    (tap_host,) = loopback_hosts(1)
    tap = Tap(
        tap_host, free_port(tap_host), (postfix_world.postfix.host, postfix_world.postfix.port)
    )
    try:
        server = sluice(
            routes={"pipe.test": [f"{tap.host}:{tap.port}"]},
            # Plain text so the relay can read the session; one connection, so the later
            # messages must reuse it.
            destinations={"pipe.test": {"tls": "none", "max_connections": 1}},
        )
        first = ["p1@pipe.test", "p2@pipe.test", "p3@pipe.test"]
        qids = [send(server, first, "three recipients")]
        qids += [send(server, [f"p{n}@pipe.test"], f"message {n}") for n in (4, 5)]
        for qid in qids:
            server.wait_event("delivered", qid=qid)
        for rcpt in [*first, "p4@pipe.test", "p5@pipe.test"]:
            postfix_world.arrived(rcpt)
        turns = tap.turns()
    finally:
        tap.close()

    # Sluice's side: one connection, reused for the second and third message.
    attempts = [server.events("delivery_attempt", qid=qid)[0] for qid in qids]
    assert [a["reused"] for a in attempts] == [False, True, True]
    assert attempts[0]["recipients"] == first and attempts[0]["tls"] == ""
    assert tap.sessions == 1

    # On the wire: Postfix offered PIPELINING, and Sluice sent MAIL, every RCPT and DATA
    # in one go before Postfix said anything about them (RFC 2920), three times.
    assert any(d == "S" and b"250-PIPELINING\r\n" in data for d, data in turns), turns
    groups = [data for d, data in turns if d == "C" and b"MAIL FROM:" in data]
    assert len(groups) == 3, turns
    lines = groups[0].split(b"\r\n")
    assert lines[0].startswith(b"MAIL FROM:<alice@src.test>")
    assert lines[1:4] == [f"RCPT TO:<{r}>".encode() for r in first]
    assert lines[4:] == [b"DATA", b""]
    single = re.compile(
        rb"MAIL FROM:<alice@src\.test>[^\r\n]*\r\nRCPT TO:<p[45]@pipe\.test>\r\nDATA\r\n"
    )
    for group in groups[1:]:
        assert single.fullmatch(group), group
    # Postfix answered each group's commands together: all 250 and the 354.
    answers = [turns[i + 1][1] for i, (d, data) in enumerate(turns) if d == "C" and data in groups]
    assert answers[0].count(b"250 ") == 4 and answers[0].endswith(
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
    )

    # Postfix's side: one session with three transactions and five recipients (logged
    # when it ends: Sluice says QUIT on shutdown), and no complaint about pipelining.
    server.stop()
    session = re.compile(
        r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 mail=3 rcpt=5 data=3 quit=1 "
    )

    def session_logged() -> str:
        log = postfix_world.postfix.maillog()
        return log if session.search(log) else ""

    log = wait_until(session_logged, timeout=10)
    assert log, postfix_world.postfix.maillog()[-3000:]
    assert "improper command pipelining" not in log


# -- DSN ----------------------------------------------------------------------------------------


def test_dsn_parameters_reach_postfix(sluice: SluiceFactory, postfix_world: PostfixWorld) -> None:
    server = sluice(routes={HELD: route(postfix_world)})
    postfix = postfix_world.postfix
    # The ORCPT address and the ENVID hold a literal "+2B" (sent as xtext "+2B2B"): Sluice
    # stores them decoded and must encode them again exactly once.
    qid = send(
        server,
        [f"dsn@{HELD}"],
        "dsn",
        mail_options=("RET=HDRS", "ENVID=env+2B2B7"),
        rcpt_options=("NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;o+2B2Bx@{HELD}"),
    )
    (delivered,) = server.wait_event("delivered", qid=qid)
    assert delivered["recipient"] == f"dsn@{HELD}"
    # Postfix offers DSN: the request went on, so Sluice makes no "relayed" report itself.
    assert server.events("dsn_queued") == []
    assert wait_until(lambda: server.queue_json() == [], timeout=10) is True

    # Postfix's side: the queue file on hold carries the DSN envelope records.
    (held,) = wait_until(lambda: postfix.queue_ids("hold"), timeout=10)
    envelope = postfix.postcat(held, "-e")
    records = set(envelope.splitlines())
    assert "named_attribute: envelope_id=env+2B7" in records, envelope
    assert "named_attribute: ret_flags=2" in records, envelope  # DSN_RET_HDRS
    assert "named_attribute: notify_flags=6" in records, envelope  # SUCCESS | FAILURE
    assert f"named_attribute: dsn_orig_rcpt=rfc822;o+2Bx@{HELD}" in records, envelope
    assert f"recipient: dsn@{HELD}" in records, envelope

    # Released, Postfix passes the same parameters on to its own next hop.
    postfix.release()
    message = postfix_world.arrived(f"dsn@{HELD}")
    mail_args = message.mail_args.split()
    assert mail_args[0] == "<alice@src.test>"
    assert {"RET=HDRS", "ENVID=env+2B2B7"} <= set(mail_args[1:]), message.mail_args
    (rcpt_args,) = message.rcpt_args
    assert set(rcpt_args.split()) == {
        f"<dsn@{HELD}>",
        "NOTIFY=SUCCESS,FAILURE",
        f"ORCPT=rfc822;o+2B2Bx@{HELD}",
    }, rcpt_args
