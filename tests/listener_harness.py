"""A real `sluice run` for the listener tests (STARTTLS, connection limits).

`sluice_server(tmp_path, listener={...}, routes={...})` writes a TOML file with one
listener on 127.0.0.1:<free port> and its own data_dir and event log, starts
`sluice run --config FILE` and returns once the `startup` event is logged. `stop()` sends
SIGTERM (then SIGKILL). The `sluice_servers` fixture stops every server a test started.

Small on purpose: the end-to-end suite (tests/e2e) has the full harness; these tests need
only a running listener and raw sockets.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netutil import free_port as free_port
from tests.netutil import toml_value

ROOT = Path(__file__).resolve().parents[1]
SLUICE = Path(sys.prefix) / "bin" / "sluice"
if not SLUICE.exists():
    SLUICE = ROOT / ".venv" / "bin" / "sluice"

HOSTNAME = "gw.sluice.test"


@dataclass
class Server:
    workdir: Path
    config_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "events.jsonl"

    def events(self, name: str) -> list[dict[str, object]]:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def start(self) -> None:
        before = len(self.events("startup"))
        with open(self.workdir / "stderr.txt", "ab") as stderr:
            self.proc = subprocess.Popen(
                [str(SLUICE), "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + 30
        while len(self.events("startup")) <= before:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice exited: {self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sluice did not start: {self.stderr()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stderr(self) -> str:
        path = self.workdir / "stderr.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SLUICE), *args], capture_output=True, text=True, timeout=30, cwd=self.workdir
        )

    def connect(self, source: str | None = None, timeout: float = 10) -> socket.socket:
        src = (source, 0) if source else None
        return socket.create_connection((self.host, self.port), timeout, source_address=src)


ServerFactory = Callable[..., Server]


def write_config(
    server: Server,
    listener: Mapping[str, object] | None = None,
    routes: Mapping[str, list[str]] | None = None,
) -> None:
    lst: dict[str, object] = {
        "name": "inbound",
        "address": f"127.0.0.1:{server.port}",
        "relay_networks": ["127.0.0.0/8"],
        "command_timeout": 30,
        "data_timeout": 30,
    }
    lst.update(listener or {})
    lines = [
        f"hostname = {toml_value(HOSTNAME)}",
        'data_dir = "data"',
        'log_file = "events.jsonl"',
        "[[listeners]]",
        *(f"{k} = {toml_value(v)}" for k, v in lst.items()),
        "[routes]",
        *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in (routes or {}).items()),
        "[delivery]",
        'retry_initial = "1s"',
        'retry_max = "2s"',
        "connect_timeout = 3",
    ]
    server.config_path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def sluice_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Factory: `sluice_server(listener=..., routes=..., start=True)` -> `Server`."""
    started: list[Server] = []

    def make(
        *,
        listener: Mapping[str, object] | None = None,
        routes: Mapping[str, list[str]] | None = None,
        start: bool = True,
    ) -> Server:
        workdir = tmp_path / f"sluice{len(started)}"
        workdir.mkdir()
        server = Server(workdir, workdir / "sluice.toml", free_port())
        write_config(server, listener, routes)
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in started:
        server.stop()


class Lines:
    """SMTP replies read from a socket (plain or TLS), one complete reply at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def rebind(self, sock: socket.socket) -> None:
        assert not self.buf, f"unread bytes before switching sockets: {self.buf!r}"
        self.sock = sock

    def reply(self) -> list[bytes]:
        """The lines of the next reply ("250-a", "250 b"), line ends removed."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; partial reply {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    def code(self) -> int:
        return int(self.reply()[-1][:3])
