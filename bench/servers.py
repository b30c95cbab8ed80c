"""The servers under test, each started on its own 127.0.0.x:port and stopped after use.

  SluiceServer    `sluice run` with a generated TOML file (durable or `durable = false`),
                  relaying everything to its own smtp-sink by a "*" route.
  PostfixServer   a private Postfix instance (`postfix -c DIR`): its own main.cf,
                  master.cf, queue and data directories, one smtpd on a loopback port,
                  relayhost = its own smtp-sink; Postfix's default durability (queue files
                  are fsync'ed before the 250).
  AiosmtpdServer  bench/peers/aiosmtpd_fsync.py: aiosmtpd on uvloop, append + fsync.
  SinkServer      Postfix's smtp-sink: accepts and discards (the ceiling, and the next
                  hop the relaying servers deliver to).

`pids()` gives the root processes whose tree bench.procstat measures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SLUICE = str(VENV_BIN / "sluice") if (VENV_BIN / "sluice").exists() else "sluice"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
POSTCAT = shutil.which("postcat") or "/usr/sbin/postcat"

START_TIMEOUT = 60.0


class ServerError(RuntimeError):
    pass


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_greeting(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Poll until the server at host:port answers a connection with a 220 greeting."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                data = s.recv(512)
                if data.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = ServerError(f"unexpected greeting {data!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise ServerError(f"no 220 greeting from {host}:{port} within {timeout:g}s: {last}")


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    """What run.py needs from a server under test."""

    key = "server"
    label = "server"

    def __init__(self, host: str, workdir: Path) -> None:
        self.host = host
        self.port = 0
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class SinkServer(Server):
    """smtp-sink on host:port."""

    key = "sink"
    label = "smtp-sink"

    def __init__(self, host: str, workdir: Path, port: int = 0) -> None:
        super().__init__(host, workdir)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not self.port:
            self.port = free_port(self.host)
        args = [SMTP_SINK, "-m", "20000"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        args += [f"{self.host}:{self.port}", "4096"]
        err = open(self.workdir / f"sink-{self.port}.err", "ab")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        err.close()
        wait_greeting(self.host, self.port)

    def stop(self) -> None:
        _terminate(self.proc)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []


class TarpitListener:
    """A listening socket that never accepts: connections complete in the kernel's backlog
    and then get no greeting, so a client delivering there waits (used to hold Sluice's
    deliveries while its queue is filled, as Postfix's hold queue does)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(4096)

    def close(self) -> None:
        self.sock.close()


class SluiceServer(Server):
    """`sluice run` on a generated configuration; durable or not (labelled)."""

    def __init__(
        self,
        host: str,
        workdir: Path,
        durable: bool,
        relay_to: str,
        extra_toml: str = "",
    ) -> None:
        super().__init__(host, workdir)
        self.durable = durable
        self.key = "sluice" if durable else "sluice_nofsync"
        self.label = "Sluice durable" if durable else "Sluice no-fsync"
        self.relay_to = relay_to
        self.extra_toml = extra_toml
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.data_dir = workdir / "data"
        self.config_path = workdir / "sluice.toml"

    def write_config(self) -> None:
        if not self.port:
            self.port = free_port(self.host)
        if not self.metrics_port:
            self.metrics_port = free_port("127.0.0.1")
        lines = [
            'hostname = "sluice-bench.example"',
            f"data_dir = {json.dumps(str(self.data_dir))}",
            f"durable = {'true' if self.durable else 'false'}",
            f"log_file = {json.dumps(str(self.workdir / 'events.jsonl'))}",
            f'metrics_address = "127.0.0.1:{self.metrics_port}"',
            "",
            "[[listeners]]",
            'name = "bench"',
            f'address = "{self.host}:{self.port}"',
            'relay_networks = ["127.0.0.0/8"]',
            "max_message_size = 16777216",
            "max_connections = 20000",
            "max_connections_per_ip = 20000",
            "",
            "[routes]",
            f'"*" = ["{self.relay_to}"]',
            "",
            self.extra_toml,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.write_config()
        err = open(self.workdir / "stderr.txt", "ab")
        self.proc = subprocess.Popen(
            [SLUICE, "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=self.workdir,
        )
        err.close()
        try:
            wait_greeting(self.host, self.port)
        except ServerError:
            self.stop()
            tail = (self.workdir / "stderr.txt").read_text(errors="replace")[-2000:]
            raise ServerError(f"sluice did not start: {tail}") from None

    def stop(self) -> None:
        _terminate(self.proc, timeout=60)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def metrics(self) -> dict[str, float]:
        """The sluice_* samples of the Prometheus endpoint (name -> value)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("sluice_"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


# Postfix's master.cf services, with chroot off (the private instance has no chroot tree).
_MASTER_SERVICES = [
    # service   type  private unpriv chroot wakeup maxproc command
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),  # for smtpd STARTTLS
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


class PostfixServer(Server):
    """A private Postfix instance under `workdir`, managed with `postfix -c DIR`."""

    key = "postfix"
    label = "Postfix"

    def __init__(
        self,
        host: str,
        workdir: Path,
        relay_to: str,
        hold: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(host, workdir)
        self.relay_to = relay_to
        self.hold = hold
        # Further main.cf parameters, over the defaults below (the interoperation tests
        # add STARTTLS, DSN holds and a host name of their own).
        self.settings = dict(settings or {})
        self.config_dir = workdir / "etc"
        # Postfix's sockets live under the queue directory and a Unix socket path has at
        # most 107 octets: a deep work directory gets its queue in a short one instead.
        spool = workdir
        self._own_spool: Path | None = None
        if len(str(workdir / "queue" / "private" / "proxywrite")) > 100:
            spool = self._own_spool = Path(tempfile.mkdtemp(prefix="sbpf-", dir="/var/tmp"))
        self.queue_dir = spool / "queue"
        self.data_dir = spool / "data"

    def write_config(self) -> None:
        if not self.port:
            self.port = free_port(self.host)
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Postfix's daemons run as mail_owner: they must reach the queue (every parent
        # directory searchable) and own the data directory (master.lock, caches).
        for parent in [self.data_dir.parent, *self.data_dir.parent.parents]:
            if parent.stat().st_mode & 0o005 != 0o005:
                parent.chmod(parent.stat().st_mode | 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, user="postfix")
        relay_host, _, relay_port = self.relay_to.rpartition(":")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-bench.example",
            "mydomain": "example",
            # Postfix insists that inet_interfaces are configured interface addresses
            # (only 127.0.0.1 is, on lo); the smtpd listener in master.cf binds its own
            # 127.0.0.x:port explicitly, which Postfix allows.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "relayhost": f"[{relay_host}]:{relay_port}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            "maillog_file": str(self.workdir / "maillog"),
            "maillog_file_prefixes": str(self.workdir),
        }
        if self.hold:
            # Every accepted message goes to the hold queue; `release()` lets it go.
            main["smtpd_recipient_restrictions"] = "check_client_access static:HOLD"
        main.update(self.settings)
        text = "".join(f"{k} = {v}\n" for k, v in main.items())
        (self.config_dir / "main.cf").write_text(text)
        rows = [(f"{self.host}:{self.port}", "inet", "n", "-", "n", "-", "-", "smtpd")]
        rows += _MASTER_SERVICES
        (self.config_dir / "master.cf").write_text(
            "".join(" ".join(f"{c:<10}" for c in row).rstrip() + "\n" for row in rows)
        )

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if res.returncode != 0:
            raise ServerError(
                f"postfix {' '.join(args)} failed ({res.returncode}): "
                + (res.stderr.strip() or self._tty_diagnostic(args))
            )
        return res

    def _tty_diagnostic(self, args: tuple[str, ...]) -> str:
        """Postfix commands log to syslog, and to stderr only when it is a terminal: run
        the failed command again under script(1) to see its message."""
        script = shutil.which("script")
        if script is None:
            return "(no message: postfix logs to syslog)"
        cmd = " ".join([POSTFIX, "-c", str(self.config_dir), *args])
        res = subprocess.run(
            [script, "-qc", cmd, "/dev/null"], capture_output=True, text=True, timeout=60
        )
        return res.stdout.strip() or "(no message)"

    def start(self) -> None:
        self.write_config()
        self._postfix("check")
        self._postfix("start")
        wait_greeting(self.host, self.port)

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        pid = self.master_pid()
        return [pid] if pid is not None else []

    def stop(self) -> None:
        pid = self.master_pid()
        with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
            self._postfix("stop")
        if pid is not None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
        if self._own_spool is not None:
            shutil.rmtree(self._own_spool, ignore_errors=True)

    def queue_size(self) -> int:
        """Queue files in every queue (incoming, active, deferred, hold, maildrop)."""
        total = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _dirpath, _dirs, files in os.walk(self.queue_dir / name):
                total += len(files)
        return total

    def held(self) -> int:
        return sum(len(f) for _d, _s, f in os.walk(self.queue_dir / "hold"))

    def queue_ids(self, name: str = "hold") -> list[str]:
        """The queue ids of the files in one queue ("hold", "deferred", ...)."""
        return sorted(f for _d, _s, files in os.walk(self.queue_dir / name) for f in files)

    def postcat(self, qid: str, *options: str) -> str:
        """`postcat -c DIR [options] -q QID`: a queue file, envelope records included."""
        res = subprocess.run(
            [POSTCAT, "-c", str(self.config_dir), *options, "-q", qid],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if res.returncode != 0:
            raise ServerError(f"postcat -q {qid} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def maillog(self) -> str:
        """Postfix's own log (maillog_file, written by postlogd; no syslog needed)."""
        with contextlib.suppress(OSError):
            return (self.workdir / "maillog").read_text(errors="replace")
        return ""

    def release(self) -> None:
        """Release the hold queue and ask the queue manager to deliver now."""
        subprocess.run(
            [POSTSUPER, "-c", str(self.config_dir), "-H", "ALL"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-f"],
            check=True,
            capture_output=True,
            timeout=60,
        )


class AiosmtpdServer(Server):
    key = "aiosmtpd"
    label = "aiosmtpd+fsync"

    def __init__(self, host: str, workdir: Path) -> None:
        super().__init__(host, workdir)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port(self.host)
        err = open(self.workdir / "stderr.txt", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "peers" / "aiosmtpd_fsync.py"),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--spool",
                str(self.workdir / "spool.mbox"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        err.close()
        wait_greeting(self.host, self.port)

    def stop(self) -> None:
        _terminate(self.proc)
        with contextlib.suppress(OSError):
            (self.workdir / "spool.mbox").unlink()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []
