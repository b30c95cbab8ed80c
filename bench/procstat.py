"""Per-process measures read from /proc: CPU time of a process tree and peak RSS.

CPU time is utime + stime of every live process in the tree, plus cutime + cstime of
each (the children it has already reaped: Postfix's master reaps its smtpd, cleanup and
smtp processes as they retire). Peak RSS is VmHWM, the high-water mark the kernel keeps
per process; for a tree it is the sum of the per-process marks (an upper bound, since
shared pages count once per process).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all threads' children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime (+ reaped children's cutime+cstime) of the given processes, seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the ')': state is index 0, so utime=11, stime=12, cutime=13, cstime=14.
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / _TICK


def tree_cpu_seconds(roots: list[int]) -> float:
    return cpu_seconds([p for root in roots for p in tree(root)])


def peak_rss_bytes(pids: list[int]) -> int:
    """Sum of VmHWM over the given processes (bytes)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def tree_peak_rss_bytes(roots: list[int]) -> int:
    return peak_rss_bytes([p for root in roots for p in tree(root)])


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def anon_rss_bytes(pids: list[int]) -> int:
    """Sum of RssAnon (heap, stacks, buffers: memory the process itself allocated) over the
    given processes. VmHWM also counts file-backed pages such as LMDB's memory map, which
    the page cache can drop; RssAnon is what a message really costs."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


@dataclass
class Usage:
    """Resource use of a server over one measured run."""

    cpu_seconds: float
    peak_rss: int
    peak_anon: int = 0


class Meter:
    """Snapshot CPU at start(); stop() returns the CPU used since, the peak RSS (VmHWM) and
    the peak anonymous RSS, sampled every 50 ms over the process tree (the kernel keeps no
    high-water mark for it)."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self._cpu0 = 0.0
        self._peak_anon = 0
        self._done = threading.Event()
        self._sampler: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            pids = [p for root in self.roots for p in tree(root)]
            self._peak_anon = max(self._peak_anon, anon_rss_bytes(pids))

    def start(self) -> None:
        self._cpu0 = tree_cpu_seconds(self.roots)
        self._peak_anon = 0
        self._done.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def stop(self) -> Usage:
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
        return Usage(
            cpu_seconds=tree_cpu_seconds(self.roots) - self._cpu0,
            peak_rss=tree_peak_rss_bytes(self.roots),
            peak_anon=self._peak_anon,
        )
