"""Sluice side by side with Postfix, an aiosmtpd peer and the smtp-sink ceiling.

One run on one machine starts each server under test on its own 127.0.0.x:port, drives
it with the same client in the same settings, stops it, and prints a table per scenario
(a column per server), the ratio of each to Postfix, and the target verdicts:

  Sluice durable     fsync before the 250 (the product)
  Sluice no-fsync    `durable = false` (for comparison only: NOT durable)
  Postfix            a private Debian Postfix instance, default durability, relaying to
                     its own smtp-sink
  aiosmtpd+fsync     the Python peer: aiosmtpd on uvloop, append + fdatasync per message
  smtp-sink          accepts and discards: the ceiling

Throughput is driven by Postfix's smtp-source (identical for every server); the time from
the end of DATA to the 250 is measured by bench/latency_client.py at 80 % of the rate the
server just reached. Server CPU time and peak RSS come from /proc (bench/procstat.py),
queue commits from Sluice's Prometheus endpoint, fsyncs from `strace -c` on a separate
short run.

Scenarios:
  1  4 KiB, 20 sessions, connection reuse
  2  4 KiB, 20 sessions, a new connection per message
  3  message size 1 KiB, 64 KiB, 1 MiB (20 sessions, reuse)
  4  concurrency 1, 20, 200, 1000 (4 KiB, reuse)
  5  outbound drain: N queued messages to an smtp-sink (Sluice vs Postfix)
  6  5000 idle connections held open while scenario 1 runs (Sluice)

Usage:
  .venv/bin/python bench/run.py [--scenarios 1,2,...] [--quick] [--messages N]
  (--quick: scenario 1 only, a few hundred messages, no targets: the smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine, procstat
from bench.servers import (
    AiosmtpdServer,
    PostfixServer,
    Server,
    ServerError,
    SinkServer,
    SluiceServer,
    TarpitListener,
)

ROOT = Path(__file__).resolve().parents[1]
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
STRACE = shutil.which("strace")
SENDER = "bench@client.bench.example"
RECIPIENT = "sink@dest.bench.example"
MIB = 1024 * 1024

ALL_SERVERS = ("sluice", "sluice_nofsync", "postfix", "aiosmtpd", "sink")
LABELS = {
    "sluice": "Sluice durable",
    "sluice_nofsync": "Sluice no-fsync",
    "postfix": "Postfix",
    "aiosmtpd": "aiosmtpd+fsync",
    "sink": "smtp-sink",
}
SLUICE_KEYS = ("sluice", "sluice_nofsync")
# Scenario 5 runs Sluice in two configurations.
DRAIN_LABELS = {"sluice": "Sluice 1 proc", "sluice_2proc": "Sluice 2 procs"}

# Targets (ratios within the same run).
TARGET_VS_POSTFIX = 5.0
TARGET_VS_SINK = 0.5
TARGET_DRAIN_VS_POSTFIX = 3.0
TARGET_RSS = 512 * MIB
LATENCY_LOAD = 0.8


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- loads and results ------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    title: str
    size: int
    sessions: int
    reuse: bool = True


def kib(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // 1024} KiB"


@dataclass
class Run:
    """One server under one load."""

    server: str
    messages: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    cpu_ms_per_msg: float = math.nan
    peak_rss: int = 0
    peak_anon: int = 0
    commits_per_msg: float | None = None
    fsyncs_per_msg: float | None = None
    latency: dict[str, Any] | None = None
    error: str | None = None

    def record(self, messages: int, seconds: float, usage: procstat.Usage) -> None:
        """Fill in what one measured run of `messages` in `seconds` cost."""
        self.messages = messages
        self.seconds = seconds
        self.rate = messages / seconds
        self.cpu_ms_per_msg = usage.cpu_seconds * 1000 / messages
        self.peak_rss = usage.peak_rss
        self.peak_anon = usage.peak_anon


@dataclass
class Table:
    scenario: int
    title: str
    runs: dict[str, Run] = field(default_factory=dict)
    extra_rows: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Options:
    quick: bool
    messages: int
    seconds: float
    servers: tuple[str, ...]
    strace: bool
    drain_messages: int
    idle: int
    latency: bool


# -- the client ---------------------------------------------------------------------------


def smtp_source(server: Server, load: Load, count: int, timeout: float = 900) -> float:
    """Send `count` messages with smtp-source; returns the wall-clock seconds."""
    args = [
        SMTP_SOURCE,
        "-s",
        str(load.sessions),
        "-m",
        str(count),
        "-l",
        str(load.size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "client.bench.example",
    ]
    if load.reuse:
        args.append("-d")
    args.append(server.address)
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise ServerError(
            f"smtp-source exited {res.returncode}: {(res.stderr or res.stdout).strip()[-400:]}"
        )
    return elapsed


def latency_run(
    server: Server, load: Load, rate: float, duration: float | None, count: int | None
) -> dict[str, Any]:
    args = [
        sys.executable,
        str(ROOT / "bench" / "latency_client.py"),
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--rate",
        f"{rate:.1f}",
        "--sessions",
        str(load.sessions),
        "--size",
        str(load.size),
    ]
    if duration is not None:
        args += ["--duration", f"{duration:g}"]
    if count is not None:
        args += ["--count", str(count)]
    if not load.reuse:
        args.append("--new-connection")
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        raise ServerError(f"latency client failed: {res.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(res.stdout)
    return result


# -- per-server helpers -------------------------------------------------------------------


def queue_depth(server: Server) -> int:
    if isinstance(server, SluiceServer):
        return int(server.metrics().get("sluice_queue_messages", 0))
    if isinstance(server, PostfixServer):
        return server.queue_size()
    return 0


def settle(server: Server, timeout: float = 300) -> None:
    """Wait until the server has delivered everything it accepted (empty queue), so the
    next measurement does not share the machine with this server's delivery backlog."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if queue_depth(server) == 0:
            return
        time.sleep(0.2)
    log(f"warning: {server.label} still has {queue_depth(server)} queued after {timeout:g}s")


def commits(server: Server) -> float | None:
    if not isinstance(server, SluiceServer):
        return None
    m = server.metrics()
    return m.get("sluice_queue_commits_total", m.get("sluice_queue_commits"))


def reset_peaks(server: Server) -> None:
    for root in server.pids():
        for pid in procstat.tree(root):
            procstat.reset_peak_rss(pid)


def strace_fsyncs(server: Server, load: Load, count: int) -> float | None:
    """fsync-family system calls per message over a short run (accept and delivery),
    counted by `strace -c` attached to every process and thread of the server."""
    if STRACE is None:
        return None
    pids = [p for root in server.pids() for p in procstat.tree(root)]
    with tempfile.NamedTemporaryFile(prefix="strace-", suffix=".txt", delete=False) as f:
        out = Path(f.name)
    args = [STRACE, "-f", "-c", "-e", "trace=fsync,fdatasync,msync,sync_file_range"]
    args += ["-o", str(out)]
    for pid in pids:
        args += ["-p", str(pid)]
    tracer = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let strace attach to every thread
        smtp_source(server, load, count)
        settle(server)
        time.sleep(0.5)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    calls = 0
    for line in out.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in {"fsync", "fdatasync", "msync", "sync_file_range"}:
            calls += int(parts[3])
    out.unlink()
    return calls / count


def measure(server: Server, load: Load, opts: Options) -> Run:
    """Probe the rate, then time a run of about `opts.seconds` (or opts.messages when
    quick), measuring the server's CPU time, peak RSS and queue commits."""
    run = Run(server=server.key)
    try:
        if opts.quick:
            count = max(opts.messages, load.sessions)
        else:
            probe = max(200, 2 * load.sessions) if load.size < MIB else max(50, load.sessions)
            probe_rate = probe / smtp_source(server, load, probe)
            settle(server)
            count = int(probe_rate * opts.seconds)
            count = max(count, 2 * load.sessions, 100)
            count = min(count, opts.messages)
        reset_peaks(server)
        meter = procstat.Meter(server.pids())
        c0 = commits(server)
        meter.start()
        elapsed = smtp_source(server, load, count)
        usage = meter.stop()
        c1 = commits(server)
        run.record(count, elapsed, usage)
        if c0 is not None and c1 is not None:
            run.commits_per_msg = (c1 - c0) / count
        settle(server)
    except (ServerError, subprocess.TimeoutExpired, OSError) as exc:
        run.error = str(exc)
        log(f"{server.label}: {exc}")
    return run


# -- server sets ----------------------------------------------------------------------------


class Fleet:
    """The servers under test for the inbound scenarios, each with its own next hop."""

    def __init__(self, workdir: Path, keys: tuple[str, ...]) -> None:
        self.workdir = workdir
        self.keys = keys
        self.servers: dict[str, Server] = {}
        self.hops: list[SinkServer] = []
        self.errors: dict[str, str] = {}

    def _hop(self, n: int) -> SinkServer:
        hop = SinkServer(f"127.0.1.{10 + n}", self.workdir / f"hop{n}")
        hop.start()
        self.hops.append(hop)
        return hop

    def start(self) -> None:
        for n, key in enumerate(self.keys):
            host = f"127.0.0.{10 + n}"
            wd = self.workdir / key
            server: Server | None = None
            try:
                if key in SLUICE_KEYS:
                    hop = self._hop(n)
                    server = SluiceServer(host, wd, durable=key == "sluice", relay_to=hop.address)
                elif key == "postfix":
                    hop = self._hop(n)
                    server = PostfixServer(host, wd, relay_to=hop.address)
                elif key == "aiosmtpd":
                    server = AiosmtpdServer(host, wd)
                else:
                    server = SinkServer(host, wd)
                t0 = time.perf_counter()
                server.start()
                log(f"started {server.label} on {server.address} ({time.perf_counter() - t0:.1f}s)")
                self.servers[key] = server
            except (ServerError, OSError, subprocess.SubprocessError) as exc:
                self.errors[key] = str(exc)
                log(f"could not start {LABELS[key]}: {exc}")
                if server is not None:
                    with contextlib.suppress(Exception):
                        server.stop()  # whatever did start, and its private directories

    def stop(self) -> None:
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        for hop in self.hops:
            hop.stop()


@contextlib.contextmanager
def fleet(workdir: Path, keys: tuple[str, ...]) -> Iterator[Fleet]:
    f = Fleet(workdir, keys)
    try:
        f.start()
        yield f
    finally:
        f.stop()


# -- scenarios -------------------------------------------------------------------------------


def inbound_table(scenario: int, load: Load, f: Fleet, opts: Options, with_strace: bool) -> Table:
    table = Table(scenario, load.title)
    for key in opts.servers:
        if key in f.errors:
            table.runs[key] = Run(server=key, error=f"not started: {f.errors[key]}")
            continue
        server = f.servers[key]
        log(f"scenario {scenario} [{load.title}]: {server.label}")
        run = measure(server, load, opts)
        # The latency client is one Python process: above 200 sessions it measures itself.
        if run.error is None and opts.latency and key in SLUICE_KEYS and load.sessions <= 200:
            rate = LATENCY_LOAD * run.rate
            try:
                if opts.quick:
                    run.latency = latency_run(server, load, rate, None, opts.messages)
                else:
                    run.latency = latency_run(server, load, rate, opts.seconds, None)
                settle(server)
            except (ServerError, subprocess.TimeoutExpired) as exc:
                run.latency = {"error": str(exc)}
        if run.error is None and with_strace and key != "sink":
            try:
                run.fsyncs_per_msg = strace_fsyncs(server, load, min(1000, opts.messages))
            except (ServerError, subprocess.SubprocessError, OSError) as exc:
                log(f"strace on {server.label}: {exc}")
        table.runs[key] = run
    return table


def scenario_loads(n: int, quick: bool) -> list[Load]:
    if n == 1:
        return [Load("4 KiB, 20 sessions, connection reuse", 4096, 20, True)]
    if n == 2:
        return [Load("4 KiB, 20 sessions, new connection per message", 4096, 20, False)]
    if n == 3:
        return [Load(f"{kib(s)}, 20 sessions, reuse", s, 20, True) for s in (1024, 65536, MIB)]
    if n == 4:
        return [Load(f"concurrency {c}, 4 KiB, reuse", 4096, c, True) for c in (1, 20, 200, 1000)]
    return []


def drain_table(workdir: Path, opts: Options) -> Table:
    n = opts.drain_messages
    table = Table(5, f"outbound drain: {n} queued 4 KiB messages to an smtp-sink")
    fill = Load("fill", 4096, 20, True)
    extra: dict[str, dict[str, str]] = {"of which start/release": {}, "fill msgs/s": {}}
    # Sluice twice: as configured everywhere else (one delivery process, the default)
    # and with `[delivery] processes = 2`, one per core of the benchmark machine.
    variants: dict[str, Callable[[Path, Load, int], tuple[Run, float, float]]] = {
        "sluice": drain_sluice,
        "sluice_2proc": functools.partial(drain_sluice, processes=2),
        "postfix": drain_postfix,
    }
    for key, drain in variants.items():
        if key.split("_")[0] not in opts.servers:
            continue
        log(f"scenario 5: {DRAIN_LABELS.get(key, LABELS.get(key, key))}: filling {n}")
        try:
            run, release_s, fill_rate = drain(workdir / f"drain-{key}", fill, n)
            extra["of which start/release"][key] = f"{release_s:.1f} s"
            extra["fill msgs/s"][key] = f"{fill_rate:.0f}"
        except (ServerError, subprocess.SubprocessError, OSError) as exc:
            run = Run(server=key, error=str(exc))
            log(f"scenario 5 {key}: {exc}")
        table.runs[key] = run
    table.extra_rows = [(k, v) for k, v in extra.items()]
    table.notes.append(
        "msgs/s = messages / (release -> queue empty: every message delivered to the sink "
        "and removed). Sluice: "
        "filled while its deliveries wait on a listener that never greets, killed (-9), "
        "then restarted with the sink there (the clock starts at the restart). Postfix: "
        "filled into the hold queue, released with postsuper -H ALL + postqueue -f."
    )
    return table


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out waiting for {what}")
        time.sleep(0.1)


def drain_sluice(workdir: Path, fill: Load, n: int, processes: int = 1) -> tuple[Run, float, float]:
    hop_host = "127.0.1.60"
    hop_port = 0
    from bench.servers import free_port

    hop_port = free_port(hop_host)
    tarpit = TarpitListener(hop_host, hop_port)
    server = SluiceServer(
        "127.0.0.60",
        workdir,
        durable=True,
        relay_to=f"{hop_host}:{hop_port}",
        extra_toml=f"[delivery]\nprocesses = {processes}\n",
    )
    sink: SinkServer | None = None
    try:
        server.start()
        fill_s = smtp_source(server, fill, n)
        wait_until(lambda: queue_depth(server) >= n, 60, "the queue to hold every message")
        assert server.proc is not None
        server.proc.kill()  # durable queue; -9 skips the grace for deliveries in the tarpit
        server.proc.wait()
        tarpit.close()
        sink = SinkServer(hop_host, workdir / "sink", port=hop_port)
        sink.start()
        t0 = time.perf_counter()
        server.start()
        t_up = time.perf_counter()
        meter = procstat.Meter(server.pids())
        meter.start()
        wait_until(lambda: queue_depth(server) == 0, 900, "Sluice's queue to empty")
        t1 = time.perf_counter()
        usage = meter.stop()
        run = Run(server="sluice" if processes == 1 else f"sluice_{processes}proc")
        run.record(n, t1 - t0, usage)
        return run, t_up - t0, n / fill_s
    finally:
        server.stop()
        tarpit.close()
        if sink is not None:
            sink.stop()


def drain_postfix(workdir: Path, fill: Load, n: int) -> tuple[Run, float, float]:
    sink = SinkServer("127.0.1.61", workdir / "sink")
    sink.start()
    server = PostfixServer("127.0.0.61", workdir, relay_to=sink.address, hold=True)
    try:
        server.start()
        fill_s = smtp_source(server, fill, n)
        wait_until(lambda: server.held() >= n, 120, "Postfix's hold queue to hold every message")
        meter = procstat.Meter(server.pids())
        meter.start()
        t0 = time.perf_counter()
        server.release()
        t_up = time.perf_counter()
        wait_until(lambda: server.queue_size() == 0, 900, "Postfix's queue to empty")
        t1 = time.perf_counter()
        usage = meter.stop()
        run = Run(server="postfix")
        run.record(n, t1 - t0, usage)
        return run, t_up - t0, n / fill_s
    finally:
        server.stop()
        sink.stop()


def idle_table(workdir: Path, opts: Options) -> Table:
    load = scenario_loads(1, opts.quick)[0]
    table = Table(6, f"{opts.idle} idle connections held open while scenario 1 runs")
    hop = SinkServer("127.0.1.70", workdir / "hop")
    hop.start()
    server = SluiceServer("127.0.0.70", workdir / "sluice", durable=True, relay_to=hop.address)
    holder: subprocess.Popen[str] | None = None
    try:
        server.start()
        log("scenario 6: Sluice durable without idle connections")
        base = measure(server, load, opts)
        base.server = "baseline"
        holder = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "idle_conns.py"),
                "--host",
                server.host,
                "--port",
                str(server.port),
                "--count",
                str(opts.idle),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        ready = holder.stdout.readline().split()
        held = int(ready[1]) if len(ready) == 2 and ready[0] == "ready" else 0
        log(f"scenario 6: {held} idle connections open; running scenario 1")
        busy = measure(server, load, opts)
        busy.server = "idle"
        # VmHWM since the process started: the whole scenario, idle connections included.
        busy.peak_rss = procstat.tree_peak_rss_bytes(server.pids())
        table.runs["baseline"] = base
        table.runs["idle"] = busy
        table.extra_rows.append(("idle connections held", {"idle": str(held)}))
        if base.rate and busy.rate:
            table.extra_rows.append(
                ("msgs/s kept", {"idle": f"{100 * busy.rate / base.rate:.0f} %"})
            )
    finally:
        if holder is not None:
            with contextlib.suppress(OSError):
                assert holder.stdin is not None
                holder.stdin.close()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
        server.stop()
        hop.stop()
    return table


# -- output ----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{unit}"


def rows_for(table: Table) -> list[tuple[str, dict[str, str]]]:
    runs = table.runs
    postfix = runs.get("postfix")
    sink = runs.get("sink")
    pf_rate = postfix.rate if postfix and not postfix.error else 0.0
    sink_rate = sink.rate if sink and not sink.error else 0.0
    rows: list[tuple[str, dict[str, str]]] = []

    def row(label: str, get: Callable[[Run], str | None]) -> None:
        cells = {}
        for key, run in runs.items():
            if run.error:
                cells[key] = "error" if label == "msgs/s" else ""
                continue
            cells[key] = get(run) or "-"
        if any(v not in ("-", "") for v in cells.values()):
            rows.append((label, cells))

    row("messages", lambda r: str(r.messages))
    row("seconds", lambda r: fmt(r.seconds, ".1f"))
    row("msgs/s", lambda r: fmt(r.rate))
    if pf_rate:
        row("ratio to Postfix", lambda r: fmt(r.rate / pf_rate, ".2f", "x"))
    if sink_rate:
        row("ratio to smtp-sink", lambda r: fmt(r.rate / sink_rate, ".2f", "x"))
    row("server CPU ms/msg", lambda r: fmt(r.cpu_ms_per_msg, ".3f"))
    row(
        "peak RSS MiB (sum of procs)",
        lambda r: fmt(r.peak_rss / MIB, ".0f") if r.peak_rss else None,
    )
    row(
        "peak anon RSS MiB (sampled)",
        lambda r: fmt(r.peak_anon / MIB, ".0f") if r.peak_anon else None,
    )
    row("queue commits/msg", lambda r: fmt(r.commits_per_msg, ".3f"))
    row("fsyncs/msg (strace)", lambda r: fmt(r.fsyncs_per_msg, ".3f"))

    def lat(field_name: str, spec: str = ".2f") -> Callable[[Run], str | None]:
        def get(r: Run) -> str | None:
            if not r.latency:
                return None
            if "error" in r.latency:
                return "error"
            return fmt(r.latency.get(field_name), spec)

        return get

    row("latency at msgs/s", lat("achieved_rate", ".0f"))
    row("EOD->250 p50 ms", lat("p50_ms"))
    row("EOD->250 p99 ms", lat("p99_ms"))
    rows += table.extra_rows
    return rows


def render(table: Table) -> str:
    keys = list(table.runs)
    labels = {
        **LABELS,
        **(DRAIN_LABELS if table.scenario == 5 else {}),
        "baseline": "Sluice durable (no idle)",
        "idle": "Sluice durable (+idle)",
    }
    rows = rows_for(table)
    head = ["", *[labels.get(k, k) for k in keys]]
    body = [[label, *[cells.get(k, "") for k in keys]] for label, cells in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [f"== {table.scenario}. {table.title}"]
    for r in [head, *body]:
        lines.append(
            "  ".join(
                (c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])) for i, c in enumerate(r)
            ).rstrip()
        )
    for key, run in table.runs.items():
        if run.error:
            lines.append(f"  {labels.get(key, key)}: {run.error}")
        if run.latency and run.latency.get("errors"):
            lines.append(
                f"  {labels.get(key, key)} latency client: {run.latency['errors']} errors, "
                f"first: {run.latency.get('first_error')}"
            )
    lines += [f"  {v}" for v in table.verdicts]
    lines += [f"  note: {n}" for n in table.notes]
    return "\n".join(lines)


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'MISS'}  {text}"


def judge(table: Table, facts: machine.MachineFacts) -> None:
    runs = table.runs
    s = runs.get("sluice")
    if table.scenario in (1, 2) and s and not s.error:
        pf, sink = runs.get("postfix"), runs.get("sink")
        if pf and not pf.error and pf.rate:
            ratio = s.rate / pf.rate
            table.verdicts.append(
                verdict(
                    ratio >= TARGET_VS_POSTFIX,
                    f"durable >= {TARGET_VS_POSTFIX:g}x Postfix: {ratio:.2f}x "
                    f"({s.rate:.0f} vs {pf.rate:.0f} msgs/s)",
                )
            )
        else:
            table.verdicts.append("n/a   durable >= 5x Postfix: Postfix did not run")
        if sink and not sink.error and sink.rate:
            ratio = s.rate / sink.rate
            table.verdicts.append(
                verdict(
                    ratio >= TARGET_VS_SINK,
                    f"durable >= {TARGET_VS_SINK:g}x smtp-sink: {ratio:.2f}x "
                    f"({s.rate:.0f} vs {sink.rate:.0f} msgs/s)",
                )
            )
    if table.scenario in (1, 2, 3) and s and s.latency and "p99_ms" in s.latency:
        bound = 2 * facts.fsync_p99_ms + 5
        p99 = float(s.latency["p99_ms"])
        table.verdicts.append(
            verdict(
                p99 <= bound,
                f"durable p99 end-of-DATA->250 <= 2 x fsync p99 + 5 ms = {bound:.2f} ms: "
                f"{p99:.2f} ms at {s.latency['achieved_rate']:.0f} msgs/s "
                f"(80% of {s.rate:.0f})",
            )
        )
    pf = runs.get("postfix")
    for key in ("sluice", "sluice_2proc"):
        run = runs.get(key)
        if table.scenario != 5 or not run or run.error or not pf or pf.error or not pf.rate:
            continue
        ratio = run.rate / pf.rate
        table.verdicts.append(
            verdict(
                ratio >= TARGET_DRAIN_VS_POSTFIX,
                f"drain >= {TARGET_DRAIN_VS_POSTFIX:g}x Postfix ({DRAIN_LABELS[key]}): "
                f"{ratio:.2f}x ({run.rate:.0f} vs {pf.rate:.0f} msgs/s)",
            )
        )
    idle = runs.get("idle")
    if table.scenario == 6 and idle and not idle.error:
        table.verdicts.append(
            verdict(
                idle.peak_rss <= TARGET_RSS,
                f"peak RSS <= 512 MiB with idle connections: {idle.peak_rss / MIB:.0f} MiB",
            )
        )


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sluice side by side with Postfix, aiosmtpd and smtp-sink.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Scenarios:", 1)[1] if __doc__ else None,
    )
    p.add_argument("--scenarios", default=None, help="comma-separated, default 1-6 (quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: few messages, no targets")
    p.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per measured run (quick: exactly this, default 300; "
        "full: the cap on a run sized to --seconds, default 40000)",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="target length of a run")
    p.add_argument(
        "--servers", default=",".join(ALL_SERVERS), help="subset of " + ",".join(ALL_SERVERS)
    )
    p.add_argument("--drain-messages", type=int, default=20000)
    p.add_argument("--idle", type=int, default=5000, help="idle connections in scenario 6")
    p.add_argument("--no-strace", action="store_true", help="skip the fsync count")
    p.add_argument("--no-latency", action="store_true", help="skip the latency client")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir in /var/tmp")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [
        int(s) for s in (args.scenarios or ("1" if args.quick else "1,2,3,4,5,6")).split(",")
    ]
    servers = tuple(s for s in args.servers.split(",") if s)
    unknown = set(servers) - set(ALL_SERVERS)
    if unknown:
        print(f"unknown servers: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    opts = Options(
        quick=args.quick,
        messages=args.messages or (300 if args.quick else 40000),
        seconds=args.seconds,
        servers=servers,
        strace=not args.no_strace and not args.quick and STRACE is not None,
        drain_messages=args.drain_messages,
        idle=args.idle,
        latency=not args.no_latency,
    )
    base = args.workdir or Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-", dir=base))
    workdir.chmod(0o755)
    started = datetime.now(UTC)
    facts = machine.collect(workdir, 200 if args.quick else 1000)
    quick_note = "  (--quick: no targets)" if args.quick else ""
    print(f"Sluice benchmark, {started:%Y-%m-%d %H:%M} UTC{quick_note}")
    for line in facts.lines():
        print(line)
    print(
        f"client: smtp-source (throughput), bench/latency_client.py (latency); work dir {workdir}"
    )
    print(flush=True)

    tables: list[Table] = []

    def publish(table: Table) -> None:
        if not args.quick:
            judge(table, facts)
        tables.append(table)
        print(render(table), "\n", flush=True)

    try:
        inbound = [n for n in scenarios if n in (1, 2, 3, 4)]
        if inbound:
            with fleet(workdir / "fleet", servers) as f:
                for n in inbound:
                    for load in scenario_loads(n, args.quick):
                        publish(inbound_table(n, load, f, opts, with_strace=opts.strace and n == 1))
        if 5 in scenarios:
            publish(drain_table(workdir / "drain", opts))
        if 6 in scenarios:
            publish(idle_table(workdir / "idle", opts))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    verdicts = [v for t in tables for v in t.verdicts]
    if verdicts:
        print("== targets")
        for t in tables:
            for v in t.verdicts:
                print(f"  [{t.scenario}. {t.title}] {v}")
    minutes = (datetime.now(UTC) - started).total_seconds() / 60
    print(f"\nfinished in {minutes:.1f} min")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "facts": asdict(facts),
                    "tables": [asdict(t) for t in tables],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
