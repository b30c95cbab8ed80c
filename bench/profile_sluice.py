"""Profile Sluice under scenario-1 load with py-spy (pip install py-spy).

Starts a durable Sluice relaying to an smtp-sink, drives it with smtp-source (4 KiB, 20
sessions, connection reuse) and records `--seconds` of samples of the server process with
py-spy, then prints the functions with the most samples, by own time and including
callees. Not part of the tests; `--native` adds the Rust frames.

    .venv/bin/python bench/profile_sluice.py [--seconds 10] [--native] [--gil]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.servers import SinkServer, SluiceServer

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def load(address: str, stop: threading.Event) -> None:
    while not stop.is_set():
        args = [SMTP_SOURCE, "-s", "20", "-m", "3000", "-l", "4096", "-d"]
        args += ["-f", "a@client.bench.example", "-t", "b@dest.bench.example", address]
        subprocess.run(
            args,
            capture_output=True,
            check=False,
        )


def frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--native", action="store_true", help="include native (Rust/C) frames")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="sluice-prof-", dir="/var/tmp"))
    hop = SinkServer("127.0.1.80", work / "hop")
    hop.start()
    server = SluiceServer("127.0.0.80", work / "sluice", args.durable, hop.address)
    server.start()
    stop = threading.Event()
    driver = threading.Thread(target=load, args=(server.address, stop), daemon=True)
    try:
        driver.start()
        out = work / "profile.txt"
        cmd = [py_spy, "record", "-p", str(server.pids()[0]), "-d", str(args.seconds)]
        cmd += ["-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"]
        if args.native:
            cmd.append("--native")
        if args.gil:
            cmd.append("--gil")
        subprocess.run(cmd, check=True, capture_output=True)
    finally:
        stop.set()
        driver.join(timeout=60)
        server.stop()
        hop.stop()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        names = [frame_name(f) for f in frames[1:]]
        if names:
            own[names[-1]] += count
        for name in set(names):
            incl[name] += count
    print(f"{total} samples over {args.seconds}s (durable={args.durable})")
    print("\nby outermost frame:")
    for name, n in threads.most_common(10):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nown time:")
    for name, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nincluding callees:")
    for name, n in incl.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
