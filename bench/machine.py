"""Machine facts printed at the top of a benchmark run: cores, CPU, kernel, disk sync.

The fsync figure is what durability costs on this disk: a 4 KiB append followed by
fdatasync, repeated, on the file system that holds the servers' queues.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MachineFacts:
    cores: int
    cpu_model: str
    kernel: str
    memory_gib: float
    load_avg: tuple[float, float, float]
    fsync_p50_ms: float
    fsync_p99_ms: float
    fsync_dir: str

    def lines(self) -> list[str]:
        la = ", ".join(f"{x:.2f}" for x in self.load_avg)
        return [
            f"cores: {self.cores}   cpu: {self.cpu_model}",
            f"kernel: {self.kernel}   memory: {self.memory_gib:.1f} GiB   load avg: {la}",
            f"fsync (4 KiB append + fdatasync, {self.fsync_dir}): "
            f"p50 {self.fsync_p50_ms:.3f} ms, p99 {self.fsync_p99_ms:.3f} ms",
        ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def fsync_latency(directory: Path, count: int = 500) -> tuple[float, float]:
    """p50 and p99 (ms) of a 4 KiB append + fdatasync in `directory`."""
    block = os.urandom(4096)
    samples: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory, prefix="fsync-probe-") as f:
        fd = f.fileno()
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), percentile(samples, 99)


def collect(directory: Path, fsync_count: int = 500) -> MachineFacts:
    p50, p99 = fsync_latency(directory, fsync_count)
    return MachineFacts(
        cores=os.cpu_count() or 1,
        cpu_model=cpu_model(),
        kernel=f"{platform.system()} {platform.release()}",
        memory_gib=memory_gib(),
        load_avg=os.getloadavg(),
        fsync_p50_ms=p50,
        fsync_p99_ms=p99,
        fsync_dir=str(directory),
    )
