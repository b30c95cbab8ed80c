"""A timestamping SMTP client: the time from the end of DATA to the server's reply.

For each message it sends MAIL, RCPT and DATA one at a time (no pipelining), waiting for
each reply, then writes the message and the final ".\\r\\n" in one write and takes the
time right after that write returns; the clock stops when the complete reply to the end
of data has been read. Messages are started on a fixed schedule (`--rate` per second,
spread over `--sessions` connections): a session takes the next slot, waits for its time,
and sends; a session that is behind sends at once. The result is one JSON object on
stdout: achieved rate, errors, and the latency percentiles in milliseconds.

    python bench/latency_client.py --host 127.0.0.10 --port 2525 --rate 2000 \\
        --sessions 20 --duration 8 --size 4096 [--new-connection]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import percentile


class SmtpError(Exception):
    pass


def make_message(size: int, sender: str, recipient: str) -> bytes:
    """A message of about `size` payload octets in 78-character lines, dot-stuffing-free,
    terminated by the end-of-data marker."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: latency probe\r\n"
        "Message-ID: <probe@bench.example>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    lines, rest = divmod(size, len(line))
    body = line * lines + (b"y" * max(rest - 2, 0) + b"\r\n" if rest else b"")
    return head + body + b".\r\n"


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One complete (possibly multi-line) reply; its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cmd: bytes, expect: bytes
) -> None:
    writer.write(cmd)
    reply = await read_reply(reader)
    if not reply.startswith(expect):
        raise SmtpError(f"{cmd.strip()!r} -> {reply.strip()!r}")


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    sent: int = 0


class Schedule:
    """Hands out start times t0 + i / rate, up to `count` of them or until `end`."""

    def __init__(self, rate: float, count: int | None, duration: float | None) -> None:
        self.rate = rate
        self.count = count
        self.start = time.perf_counter() + 0.05
        self.end = self.start + duration if duration is not None else None
        self.next = 0

    def take(self) -> float | None:
        t = self.start + self.next / self.rate
        if self.count is not None and self.next >= self.count:
            return None
        if self.end is not None and t >= self.end:
            return None
        self.next += 1
        return t


async def session(
    host: str,
    port: int,
    message: bytes,
    schedule: Schedule,
    stats: Stats,
    new_connection: bool,
    sender: str,
    recipient: str,
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while (slot := schedule.take()) is not None:
            delay = slot - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                    greeting = await read_reply(reader)
                    if not greeting.startswith(b"220"):
                        raise SmtpError(f"greeting {greeting.strip()!r}")
                    await command(reader, writer, b"EHLO latency.bench.example\r\n", b"250")
                assert reader is not None
                await command(reader, writer, f"MAIL FROM:<{sender}>\r\n".encode(), b"250")
                await command(reader, writer, f"RCPT TO:<{recipient}>\r\n".encode(), b"250")
                await command(reader, writer, b"DATA\r\n", b"354")
                writer.write(message)
                t0 = time.perf_counter()
                reply = await read_reply(reader)
                t1 = time.perf_counter()
                if not reply.startswith(b"250"):
                    raise SmtpError(f"end of data -> {reply.strip()!r}")
                stats.latencies.append((t1 - t0) * 1000)
                stats.sent += 1
                if new_connection:
                    await command(reader, writer, b"QUIT\r\n", b"221")
                    writer.close()
                    writer = reader = None
            except (OSError, SmtpError) as exc:
                stats.errors += 1
                stats.first_error = stats.first_error or str(exc)
                if writer is not None:
                    writer.close()
                writer = reader = None
    finally:
        if writer is not None and reader is not None:
            try:
                await command(reader, writer, b"QUIT\r\n", b"221")
            except (OSError, SmtpError):
                pass
            writer.close()


async def measure(
    host: str,
    port: int,
    rate: float,
    sessions: int,
    size: int,
    count: int | None = None,
    duration: float | None = None,
    new_connection: bool = False,
) -> dict[str, float | int | str]:
    sender, recipient = "probe@client.bench.example", "sink@dest.bench.example"
    message = make_message(size, sender, recipient)
    schedule = Schedule(rate, count, duration)
    stats = Stats()
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            session(host, port, message, schedule, stats, new_connection, sender, recipient)
            for _ in range(sessions)
        )
    )
    elapsed = time.perf_counter() - schedule.start
    lat = sorted(stats.latencies)
    return {
        "target_rate": rate,
        "achieved_rate": stats.sent / elapsed if elapsed > 0 else 0.0,
        "messages": stats.sent,
        "errors": stats.errors,
        "first_error": stats.first_error,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else float("nan"),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages per second")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--count", type=int, help="stop after this many messages")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--new-connection", action="store_true", help="one message per session")
    args = parser.parse_args()
    if args.count is None and args.duration is None:
        parser.error("give --count or --duration")
    result = uvloop.run(
        measure(
            args.host,
            args.port,
            args.rate,
            args.sessions,
            args.size,
            args.count,
            args.duration,
            args.new_connection,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
