"""Smoke run of the benchmark harness: `bench/run.py --quick` (scenario 1, a few hundred
messages, no targets) must start every server under test, drive it with smtp-source and
the latency client, and print a table with a positive msgs/s for each server.

The full benchmark is not part of the tests; see bench/RESULTS.md and `make bench`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVERS = ["Sluice durable", "Sluice no-fsync", "Postfix", "aiosmtpd+fsync", "smtp-sink"]

pytestmark = pytest.mark.skipif(
    not (shutil.which("smtp-source") or os.path.exists("/usr/sbin/smtp-source")),
    reason="smtp-source (Debian postfix) is not installed",
)


def _columns(header: str, names: list[str]) -> list[tuple[str, int]]:
    """(name, end offset) of each right-aligned column in the table header."""
    return [(n, header.index(n) + len(n)) for n in names]


def test_quick_run_prints_a_positive_rate_for_every_server(tmp_path: Path) -> None:
    result_file = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--messages",
            "300",
            "--workdir",
            str(tmp_path),
            "--json",
            str(result_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "fsync (4 KiB append + fdatasync" in out, out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== 1."))
    header = lines[start + 1]
    rate_line = next(line for line in lines[start:] if line.startswith("msgs/s"))
    for name, end in _columns(header, SERVERS):
        begin = max(header.rfind("  ", 0, end - len(name)), 0)
        cell = rate_line[begin:end].strip()
        assert re.fullmatch(r"\d+", cell), f"{name}: msgs/s cell {cell!r}\n{out}{proc.stderr}"
        assert int(cell) > 0, f"{name}: {cell}"

    data = json.loads(result_file.read_text())
    (table,) = data["tables"]
    for key, run in table["runs"].items():
        assert run["error"] is None, f"{key}: {run['error']}"
        assert run["messages"] == 300 and run["rate"] > 0, key
    for key in ("sluice", "sluice_nofsync"):
        latency = table["runs"][key]["latency"]
        assert latency["messages"] > 0 and latency["errors"] == 0, latency
        assert latency["p99_ms"] >= latency["p50_ms"] > 0, latency
