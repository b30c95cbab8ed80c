"""Hold N idle SMTP connections open: connect, read the greeting, then say nothing.

Prints "ready <n>" on stdout once every connection has its greeting (n is how many
succeeded), then keeps them until stdin closes or SIGTERM. Used by scenario 6.

    python bench/idle_conns.py --host 127.0.0.10 --port 2525 --count 5000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop


async def hold(host: str, port: int, count: int, parallel: int) -> None:
    gate = asyncio.Semaphore(parallel)
    writers: list[asyncio.StreamWriter] = []
    failures: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                line = await asyncio.wait_for(reader.readline(), 60)
            except (OSError, TimeoutError) as exc:
                failures.append(str(exc))
                return
            if line.startswith(b"220"):
                writers.append(writer)
            else:
                failures.append(line.decode(errors="replace").strip())
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    print(f"ready {len(writers)}", flush=True)
    if failures:
        print(f"failed {len(failures)}: {failures[0]}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)
    await stop.wait()
    for w in writers:
        w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--parallel", type=int, default=200, help="connects in flight")
    args = parser.parse_args()
    uvloop.run(hold(args.host, args.port, args.count, args.parallel))


if __name__ == "__main__":
    main()
