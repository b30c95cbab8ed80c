"""The delivery process: runs the scheduler on its own interpreter, beside the listener.

`sluice run` (appliance.app) starts it with `python -m appliance.delivery.worker` so that
outbound delivery (the SMTP client, reading due mail, writing outcomes back) does not
take the GIL from the process that accepts mail. Both processes open the same LMDB
queue: each has its own writer thread and group commit, and LMDB serialises write
transactions between processes with the lock in `lock.mdb`. The queue is the only
shared state; the data-directory lock (`sluice.lock`) stays with the parent, which is
the one `sluice run` on that directory.

The parent talks to it over one pipe, the child's stdin:

* first the configuration, pickled, after an 8-byte big-endian length (the parent's
  already validated `Config`, so both processes run on exactly the same settings);
* then one byte whenever new mail was queued (`DeliveryScheduler.notify`); the
  scheduler also polls the queue's schedule, so a lost wake-up only delays mail;
* end of file: the parent is gone. Delivery stops, as on SIGTERM.

With `[delivery] processes = N` the parent starts N of them, each with its own pipe and
`--shard K` (0 .. N-1) on its command line: process K delivers only the queue ids with
`shard_of(qid, N) == K` (`Queue.due(shard=...)`), runs on its share of the outbound
limits (`config.process_share`: connection limits divided by N, rates by N), keeps its
own adaptive back-off state and publishes it as `hosts-K.json` (`sluice hosts` merges
them). Wake-ups go to every process; each is restarted on its own when it dies.

SIGTERM (sent by the parent once its listener has stopped) stops delivery: attempts in
flight finish (up to the scheduler's grace), the queue is closed, the process exits 0.
SIGHUP reopens the event log. SIGINT is ignored: a Ctrl-C in a terminal reaches the
whole process group, and the parent decides when delivery stops. Should the parent be
killed (kill -9), the kernel kills this process too (PR_SET_PDEATHSIG), so no orphan
keeps delivering beside a restarted server; an attempt cut short that way is retried
after the restart (at-least-once, as if one process had been killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import math
import os
import pickle
import signal
import sys

import uvloop

from appliance import eventlog
from appliance.config import Config, process_share
from appliance.delivery.routing import Router
from appliance.delivery.scheduler import DISPATCH_INTERVAL, DeliveryScheduler
from appliance.eventlog import log_event
from appliance.queue import Queue

_PR_SET_PDEATHSIG = 1
WAKE = b"w"
# The shortest time between two wake-ups of the delivery processes: the scheduler's own
# pace (it starts at most one dispatch round per DISPATCH_INTERVAL anyway).
WAKE_INTERVAL = DISPATCH_INTERVAL


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the parent exits; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)  # the parent died before the request above took effect


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the parent closed the pipe")
        data += chunk
    return data


def read_config(fd: int) -> Config:
    size = int.from_bytes(_read_exactly(fd, 8), "big")
    config = pickle.loads(_read_exactly(fd, size))
    if not isinstance(config, Config):
        raise TypeError(f"expected a Config, got {type(config).__name__}")
    return config


def encode_config(config: Config) -> bytes:
    data = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(8, "big") + data


async def run(config: Config, wake_fd: int, parent: int, index: int = 0) -> int:
    """Deliver shard `index` of `[delivery] processes` until SIGTERM or the parent's end."""
    loop = asyncio.get_running_loop()
    count = config.delivery.processes
    shard = (index, count) if count > 1 else None
    config = process_share(config)
    try:
        # Outcomes need not survive a power cut to keep mail safe (Queue's docstring).
        queue = Queue(config.data_dir, durable=config.durable, metasync=False)
    except Exception as exc:  # lmdb.Error is not an OSError
        log_event("delivery_error", shard=index, error=f"cannot open the queue: {exc}")
        return 1
    scheduler = DeliveryScheduler(queue, Router(config), config, server_pid=parent, shard=shard)
    log_event("delivery_started", pid=os.getpid(), shard=index, processes=count)

    def on_wake() -> None:
        try:
            data = os.read(wake_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            scheduler.notify()
        else:  # the parent is gone
            loop.remove_reader(wake_fd)
            scheduler.stop()

    os.set_blocking(wake_fd, False)
    loop.add_reader(wake_fd, on_wake)
    loop.add_signal_handler(signal.SIGTERM, scheduler.stop)
    loop.add_signal_handler(signal.SIGHUP, eventlog.reopen)
    try:
        await scheduler.run()
    finally:
        loop.remove_reader(wake_fd)
        await queue.close()
    return 0


class _Child:
    """One delivery process (shard `index`): start, wake, stop, restart on a crash."""

    def __init__(self, config: Config, index: int, restart_delay: float) -> None:
        self._config = config
        self.index = index
        self._restart_delay = restart_delay
        self._proc: asyncio.subprocess.Process | None = None
        self._wake_fd = -1
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        await self._spawn()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _spawn(self) -> None:
        read_end, write_end = os.pipe()
        try:
            env = dict(os.environ, SLUICE_PARENT_PID=str(os.getpid()))
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "appliance.delivery.worker",
                "--shard",
                str(self.index),
                stdin=read_end,
                env=env,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self.starts += 1
        # The configuration is small (far below the pipe's buffer): this write does not
        # wait for the child. Wake-ups after it never block the loop.
        os.write(write_end, encode_config(self._config))
        os.set_blocking(write_end, False)
        self._wake_fd = write_end

    def wake(self) -> None:
        if self._wake_fd < 0:
            return
        try:
            os.write(self._wake_fd, WAKE)
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the scheduler has not read yet
        except OSError:
            pass  # the process is gone; the watcher starts a new one

    def _close_pipe(self) -> None:
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    async def _watch(self) -> None:
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            self._close_pipe()
            if self._stopping:
                return
            log_event(
                "delivery_exited",
                pid=self._proc.pid,
                shard=self.index,
                status=code,
                action="restart",
            )
            await asyncio.sleep(self._restart_delay)
            if self._stopping:
                return
            try:
                await self._spawn()
            except OSError as exc:
                log_event("delivery_error", shard=self.index, error=f"cannot start delivery: {exc}")
                return

    def reopen_log(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGHUP)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM); it is not restarted after this."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    async def wait(self) -> int | None:
        """After `terminate()`: wait until it has exited; returns its exit status."""
        proc = self._proc
        code = await proc.wait() if proc is not None else None
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._close_pipe()
        return code


class DeliveryProcess:
    """The parent's handle on the delivery processes (`[delivery] processes`, one per
    shard of the queue): start, wake, stop, restart each on its own after a crash."""

    # Seconds before a delivery process that exited on its own is started again.
    RESTART_DELAY = 1.0

    def __init__(self, config: Config) -> None:
        self._children = [
            _Child(config, index, self.RESTART_DELAY) for index in range(config.delivery.processes)
        ]
        self._wake_due = False
        self._last_wake = -math.inf

    @property
    def pids(self) -> list[int | None]:
        """The current pid of each delivery process, by shard."""
        return [child.pid for child in self._children]

    @property
    def starts(self) -> int:
        return sum(child.starts for child in self._children)

    async def start(self) -> None:
        """Start the processes and hand each the configuration; raises OSError if one
        cannot be started at all (those already started are stopped again)."""
        started: list[_Child] = []
        try:
            for child in self._children:
                await child.start()
                started.append(child)
        except BaseException:
            for child in started:
                child.terminate()
            for child in started:
                await child.wait()
            raise

    def notify(self) -> None:
        """New mail was queued: wake every scheduler, at once after a quiet spell, else
        at most once per WAKE_INTERVAL (under load a wake-up per loop iteration cost each
        delivery process more than its share of the mail)."""
        if not self._wake_due:
            self._wake_due = True
            loop = asyncio.get_running_loop()
            loop.call_at(max(loop.time(), self._last_wake + WAKE_INTERVAL), self._send_wake)

    def _send_wake(self) -> None:
        self._wake_due = False
        self._last_wake = asyncio.get_running_loop().time()
        for child in self._children:
            child.wake()

    def reopen_log(self) -> None:
        """Pass SIGHUP on, so the delivery processes reopen the event log too."""
        for child in self._children:
            child.reopen_log()

    async def stop(self) -> int | None:
        """SIGTERM to every process, then wait until all have exited (their attempts in
        flight finish first, bounded by the scheduler's own grace). Returns the first
        non-zero exit status, else 0 (None if none was ever started)."""
        for child in self._children:
            child.terminate()
        codes = [await child.wait() for child in self._children]
        known = [code for code in codes if code is not None]
        if not known:
            return None
        return next((code for code in known if code != 0), 0)


def _shard_index(argv: list[str]) -> int:
    """`--shard K` (the parent passes it; 0 without it)."""
    if len(argv) == 2 and argv[0] == "--shard" and argv[1].isdigit():
        return int(argv[1])
    if not argv:
        return 0
    raise SystemExit(f"usage: python -m appliance.delivery.worker [--shard K], got {argv}")


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = int(os.environ.get("SLUICE_PARENT_PID", "0")) or os.getppid()
    _die_with_parent(parent)
    index = _shard_index(sys.argv[1:])
    wake_fd = sys.stdin.fileno()
    try:
        config = read_config(wake_fd)
    except EOFError:
        return 0
    if index >= config.delivery.processes:
        raise SystemExit(f"--shard {index}: only {config.delivery.processes} processes")
    eventlog.configure(config.log_file)
    return uvloop.run(run(config, wake_fd, parent, index))


if __name__ == "__main__":
    sys.exit(main())
