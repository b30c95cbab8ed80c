"""Shared test machinery: real programs on loopback, and async tests on uvloop.

- `async def test_...` functions run on a fresh uvloop loop (the product's loop), so no
  asyncio plugin is needed.
- `smtp_sink` starts Postfix's `/usr/sbin/smtp-sink` on 127.x.y.z:port, scripted with its
  -f/-r/-q/-Q options to answer 5xx/4xx/disconnect/421 to chosen commands, dumping every
  transaction (-D) so a test reads what arrived: envelope and message lines.
- `dns_server` starts `dnsmasq` on 127.0.0.1:<free port>, authoritative for test zones,
  serving MX, A/AAAA (and null MX "0 .") records that point at the sinks.
- `loopback_hosts(n)` hands out distinct random 127.x.y.z addresses, so tests (and other
  test sessions on the same machine) never collide on one address and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import inspect
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import uvloop

from appliance import eventlog
from tests.netutil import free_port, loopback_hosts

SMTP_SINK = "/usr/sbin/smtp-sink"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
_SINK_MARK = b"==SLUICE-SINK-MESSAGE==\n"


# -- async tests on uvloop ------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(pyfuncitem.obj(**kwargs))
    return True


# -- addresses and ports ----------------------------------------------------------------------


def _wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start listening on {host}:{port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- smtp-sink ----------------------------------------------------------------------------------


@dataclass
class SinkMessage:
    """One transaction as smtp-sink dumped it (its dump has LF line ends)."""

    client_addr: str
    helo: str
    mail_args: str
    rcpt_args: list[str]
    data: bytes  # the message as received after dot-unstuffing, LF line ends

    @property
    def recipients(self) -> list[str]:
        return [a.split()[0].strip("<>") for a in self.rcpt_args]

    @property
    def sender(self) -> str:
        return self.mail_args.split()[0].strip("<>") if self.mail_args else ""


@dataclass
class Sink:
    host: str
    port: int
    dump: Path
    proc: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    def messages(self) -> list[SinkMessage]:
        if not self.dump.exists():
            return []
        raw = self.dump.read_bytes()
        return [_parse_sink_message(chunk) for chunk in raw.split(_SINK_MARK)[1:]]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Block until `count` messages are in the dump file (it is written as "." arrives)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def _parse_sink_message(chunk: bytes) -> SinkMessage:
    lines = chunk.split(b"\n")
    fields: dict[str, list[str]] = {}
    i = 0
    while i < len(lines):
        line = lines[i].decode("utf-8", "replace")
        i += 1
        if line.startswith("Received:"):
            # smtp-sink's own three-line Received: header ends its part of the dump.
            while i < len(lines) and lines[i].startswith(b"\t"):
                i += 1
            break
        name, _, value = line.partition(": ")
        fields.setdefault(name, []).append(value)
    rest = b"\n".join(lines[i:])
    # The dump appends one empty line after each message.
    data = rest[:-1] if rest.endswith(b"\n") else rest
    return SinkMessage(
        client_addr=fields.get("X-Client-Addr", [""])[0],
        helo=fields.get("X-Helo-Args", [""])[0],
        mail_args=fields.get("X-Mail-Args", [""])[0],
        rcpt_args=fields.get("X-Rcpt-Args", []),
        data=data,
    )


SinkFactory = Callable[..., Sink]


def start_sink(
    directory: Path,
    host: str | None = None,
    port: int | None = None,
    *,
    hard: Sequence[str] = (),
    soft: Sequence[str] = (),
    disconnect: Sequence[str] = (),
    close421: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> Sink:
    """Start smtp-sink dumping into `directory` (see the `smtp_sink` fixture); the caller
    stops it with `stop_sink`. For fixtures wider than one test."""
    host = host or loopback_hosts(1)[0]
    port = port or free_port(host)
    dump = directory / f"sink-{host}-{port}.dump"
    args = [SMTP_SINK, "-S", _SINK_MARK.decode().replace("\n", "\\n"), "-D", str(dump)]
    if os.geteuid() == 0:
        args += ["-u", "root"]  # smtp-sink refuses to run as root without -u
    for flag, commands in (("-f", hard), ("-r", soft), ("-q", disconnect), ("-Q", close421)):
        if commands:
            args += [flag, ",".join(commands)]
    args += [*extra, f"{host}:{port}", "64"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sink = Sink(host, port, dump, proc, args)
    try:
        _wait_tcp(host, port, proc, "smtp-sink")
    except BaseException:
        _stop(proc)
        raise
    return sink


def stop_sink(sink: Sink) -> None:
    _stop(sink.proc)


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SinkFactory]:
    """Factory: `smtp_sink(host=None, port=None, hard=(), soft=(), disconnect=(),
    close421=(), extra=())` starts smtp-sink and returns a `Sink`.

    hard/soft/disconnect/close421 name SMTP commands (e.g. "RCPT", "DATA", ".", "EHLO",
    "CONNECT") answered with 5xx (-f), 4xx (-r), a silent disconnect (-q) or 421 (-Q).
    """
    started: list[Sink] = []

    def start(*args: Any, **kwargs: Any) -> Sink:
        sink = start_sink(tmp_path, *args, **kwargs)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        stop_sink(sink)


# -- dnsmasq ------------------------------------------------------------------------------------


@dataclass
class DnsServer:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    args: list[str]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


DnsFactory = Callable[..., DnsServer]


def _wait_dns(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    import dns.message
    import dns.query

    deadline = time.monotonic() + 10
    query = dns.message.make_query("ready.invalid.", "A")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"dnsmasq exited with {proc.returncode}: {err}")
        with contextlib.suppress(Exception):
            dns.query.udp(query, host, port=port, timeout=0.2)
            return
        time.sleep(0.02)
    raise RuntimeError("dnsmasq did not answer")


@pytest.fixture
def dns_server() -> Iterator[DnsFactory]:
    """Factory: `dns_server(mx=[(domain, exchange, preference)], hosts=[(name, addr, ...)],
    local=("test",), ttl=0, extra=())` starts dnsmasq and returns a `DnsServer`.

    Names under each `local` zone that are not configured answer NXDOMAIN; an exchange of
    "." gives a null MX (RFC 7505). No upstream servers: nothing leaves the machine.
    """
    started: list[DnsServer] = []

    def start(
        *,
        mx: Sequence[tuple[str, str, int]] = (),
        hosts: Sequence[Sequence[str]] = (),
        local: Sequence[str] = ("test",),
        ttl: int = 0,
        extra: Sequence[str] = (),
    ) -> DnsServer:
        host = "127.0.0.1"
        port = free_port(host)
        args = [
            DNSMASQ,
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--port={port}",
            f"--listen-address={host}",
            "--bind-interfaces",
            f"--local-ttl={ttl}",
            "--pid-file=",  # no pid file: several servers run side by side
            "--cache-size=0",
        ]
        if os.geteuid() == 0:
            args.append("--user=root")
        args += [f"--local=/{zone}/" for zone in local]
        args += [f"--mx-host={domain},{exchange},{pref}" for domain, exchange, pref in mx]
        args += ["--host-record=" + ",".join(record) for record in hosts]
        args += list(extra)
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = DnsServer(host, port, proc, args)
        started.append(server)
        _wait_dns(host, port, proc)
        return server

    yield start
    for server in started:
        _stop(server.proc)


# -- reading MIME reports back (typed views over email.message) -------------------------------


def parse_message(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def mime_parts(msg: Message) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list), "not a multipart (or message/*) part"
    return [part for part in payload if isinstance(part, Message)]


def decoded_text(part: Message) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    charset = part.get_content_charset() or "us-ascii"
    return data.decode(charset)


def dsn_fields(report: Message) -> list[Message]:
    """The field groups of a report's message/delivery-status part: per-message first."""
    return mime_parts(mime_parts(report)[1])


@pytest.fixture
def events(tmp_path: Path) -> Iterator[Callable[..., list[dict[str, Any]]]]:
    """The event log of the code under test, sent to a file: `events()` reads every
    event so far, `events("delivered")` only those of one kind."""
    path = tmp_path / "events.jsonl"
    eventlog.configure(str(path))

    def read(name: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in path.read_text().splitlines()]
        return [e for e in found if name is None or e["event"] == name]

    yield read
    eventlog.configure(None)
