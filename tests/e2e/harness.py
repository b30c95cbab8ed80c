"""End-to-end harness: a real `sluice run` subprocess, configured by a TOML file.

The `sluice` fixture is a factory. Each call writes a configuration file into the test's
tmp_path (its own data_dir, an event log file, one listener on 127.0.0.1 with a free
port, the routes and [dns]/[delivery] settings the test asks for, short retry times),
starts `sluice run --config FILE`, and returns once the `startup` event line is in the
log. Teardown sends SIGTERM, then SIGKILL if the process has not exited.

The helpers poll the event log (one JSON object per line) and `sluice queue --json`
instead of sleeping for fixed times, with generous bounds for a shared 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.netutil import free_port as free_port  # re-exported for the e2e tests
from tests.netutil import loopback_hosts as loopback_hosts
from tests.netutil import toml_value as toml_value

ROOT = Path(__file__).resolve().parents[2]
SLUICE = str(Path(sys.prefix) / "bin" / "sluice")
if not os.path.exists(SLUICE):
    SLUICE = str(ROOT / ".venv" / "bin" / "sluice")

HOSTNAME = "gw.sluice.test"

# Bounds for waits (seconds). Polling returns as soon as the condition holds; these only
# matter when something is broken or the machine is very busy.
START_TIMEOUT = 30.0
EVENT_TIMEOUT = 20.0

Json = dict[str, Any]


# -- small helpers ---------------------------------------------------------------------------


class NextHop(Protocol):
    """Anything listening on host:port (an smtp-sink `Sink`, a `WireSink`)."""

    host: str
    port: int


def route_to(hop: NextHop) -> list[str]:
    """The `[routes]` value that sends a domain to `hop`."""
    return [f"{hop.host}:{hop.port}"]


def toml_table(header: str, table: Mapping[str, object]) -> str:
    lines = [header] if header else []
    lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def wait_until(
    condition: Callable[[], Any], timeout: float = EVENT_TIMEOUT, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout` passes
    (the last falsy value is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


# -- the server under test ---------------------------------------------------------------------


@dataclass
class Sluice:
    """One `sluice run` process and the files it uses."""

    workdir: Path
    config_path: Path
    data_dir: Path
    log_path: Path
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    stderr_paths: list[Path] = field(default_factory=list)
    starts: int = 0

    # -- process -----------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        before = len(self.events("startup"))
        self.starts += 1
        err = self.workdir / f"stderr-{self.starts}.txt"
        self.stderr_paths.append(err)
        with open(err, "wb") as stderr:
            self.proc = subprocess.Popen(
                [SLUICE, "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while len(self.events("startup")) <= before:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sluice exited with {self.proc.returncode}: {err.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"sluice did not log startup: {err.read_text()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9, and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.stderr_paths if p.exists())

    # -- event log -----------------------------------------------------------------------------

    def events(self, name: str | None = None, **fields: object) -> list[Json]:
        """Every complete event line so far, optionally filtered by event name and fields."""
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written right now (or cut by kill -9)
            if name is not None and event.get("event") != name:
                continue
            if any(event.get(k) != v for k, v in fields.items()):
                continue
            out.append(event)
        return out

    def wait_event(
        self, name: str, count: int = 1, timeout: float = EVENT_TIMEOUT, **fields: object
    ) -> list[Json]:
        """Wait until at least `count` matching events were logged; fails the test if not."""
        found = wait_until(lambda: len(self.events(name, **fields)) >= count, timeout)
        events = self.events(name, **fields)
        assert found, f"expected {count} {name} events {fields}, got {events}\n{self.log_tail()}"
        return events

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "log tail:\n" + "\n".join(lines[-n:])

    # -- CLI -------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SLUICE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
        )

    def queue_json(self) -> list[Json]:
        res = self.cli("queue", "--config", str(self.config_path), "--json")
        assert res.returncode == 0, res.stderr
        rows: list[Json] = json.loads(res.stdout)
        return rows

    # -- clients ---------------------------------------------------------------------------

    def smtp(self, timeout: float = 20.0) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, local_hostname="client.test", timeout=timeout)


SluiceFactory = Callable[..., Sluice]


def write_config(
    path: Path,
    *,
    data_dir: Path,
    log_path: Path,
    port: int,
    routes: Mapping[str, list[str]] | None = None,
    listener: Mapping[str, object] | None = None,
    delivery: Mapping[str, object] | None = None,
    dns: Mapping[str, object] | None = None,
    top: Mapping[str, object] | None = None,
    destinations: Mapping[str, Mapping[str, object]] | None = None,
) -> None:
    head: dict[str, object] = {
        "hostname": HOSTNAME,
        "data_dir": str(data_dir),
        "log_file": str(log_path),
    }
    head.update(top or {})
    lst: dict[str, object] = {
        "name": "inbound",
        "address": f"127.0.0.1:{port}",
        "relay_networks": ["127.0.0.0/8"],
        "command_timeout": 60,
        "data_timeout": 60,
    }
    lst.update(listener or {})
    dlv: dict[str, object] = {
        "retry_initial": "1s",
        "retry_max": "2s",
        "connect_timeout": 3,
        "command_timeout": 10,
        "data_timeout": 10,
    }
    dlv.update(delivery or {})
    parts = [toml_table("", head), toml_table("[[listeners]]", lst)]
    parts.append(toml_table("[routes]", routes or {}))
    if dns:
        parts.append(toml_table("[dns]", dns))
    parts.append(toml_table("[delivery]", dlv))
    for domain, controls in (destinations or {}).items():
        parts.append(toml_table(f"[destinations.{json.dumps(domain)}]", controls))
    path.write_text("\n".join(parts))


# -- a raw SMTP client, for bytes smtplib would not send ----------------------------------------


def new_sluice(workdir: Path, **config: Any) -> Sluice:
    """A Sluice in `workdir`, on a free port of 127.0.0.1, with its configuration written
    by `write_config(**config)` (routes=, listener=, delivery=, ...); not started."""
    port = free_port()
    server = Sluice(
        workdir=workdir,
        config_path=workdir / "sluice.toml",
        data_dir=workdir / "data",
        log_path=workdir / "events.jsonl",
        host="127.0.0.1",
        port=port,
    )
    write_config(
        server.config_path,
        data_dir=server.data_dir,
        log_path=server.log_path,
        port=port,
        **config,
    )
    return server


class RawSmtp:
    """A line-level SMTP client over a plain socket: send exact bytes, read whole replies."""

    def __init__(self, host: str, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        """One complete (possibly multi-line) reply: the code and the text lines joined
        by "\\n", e.g. (250, "2.0.0 Ok: queued as X")."""
        texts = []
        while True:
            line = self._line()
            assert len(line) >= 3 and line[:3].isdigit(), f"not a reply line: {line!r}"
            texts.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(texts)

    def command(self, line: bytes) -> tuple[int, str]:
        self.send(line + b"\r\n")
        return self.reply()

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._buf += chunk
        except ConnectionResetError:
            return True
        except (TimeoutError, OSError):
            return False


# -- a next hop that records the raw bytes of DATA ---------------------------------------------


@dataclass
class WireCapture:
    """What `WireSink` received: per transaction, the envelope and the raw DATA bytes
    (everything after the 354 up to and including the terminating CRLF.CRLF)."""

    mail: bytes
    rcpts: list[bytes]
    raw: bytes


class WireSink:
    """A minimal ESMTP server in a thread that keeps DATA exactly as it came off the wire
    (smtp-sink's dump shows the message after un-stuffing; this shows it before)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.captures: list[WireCapture] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5)
        self._listener.close()

    def messages(self) -> list[WireCapture]:
        with self._lock:
            return list(self.captures)

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        buf = b""

        def line() -> bytes:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError
                buf += chunk
            out, _, buf = buf.partition(b"\r\n")
            return out

        with conn, contextlib.suppress(OSError, ConnectionError):
            conn.settimeout(30)
            conn.sendall(b"220 wire.test ESMTP\r\n")
            mail, rcpts = b"", []
            while True:
                cmd = line()
                verb = cmd[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-wire.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
                elif verb == b"HELO":
                    conn.sendall(b"250 wire.test\r\n")
                elif verb == b"MAIL":
                    mail, rcpts = cmd, []
                    conn.sendall(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(cmd)
                    conn.sendall(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    while b"\r\n.\r\n" not in b"\r\n" + buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            raise ConnectionError
                        buf += chunk
                    end = (b"\r\n" + buf).index(b"\r\n.\r\n") + 3
                    raw, buf = buf[:end], buf[end:]
                    with self._lock:
                        self.captures.append(WireCapture(mail, rcpts, raw))
                    conn.sendall(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:  # RSET, NOOP
                    conn.sendall(b"250 2.0.0 ok\r\n")
