"""The Python peer: aiosmtpd on uvloop, appending each message to a file and fsyncing it
before the 250 (the durability Sluice promises, done the straightforward way).

Each message is written with one O_APPEND write and made durable with fdatasync in a
worker thread, so the event loop keeps serving other sessions while the disk works; there
is no group commit. Started by bench/run.py:

    python bench/peers/aiosmtpd_fsync.py --host 127.0.0.5 --port 2525 --spool FILE
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session


class AppendFsyncHandler:
    def __init__(self, path: str, threads: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fsync")
        self.messages = 0

    def _store(self, record: bytes) -> None:
        os.write(self.fd, record)
        os.fdatasync(self.fd)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        header = (
            f"From {envelope.mail_from} {len(content)} {','.join(envelope.rcpt_tos)}\n"
        ).encode()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, self._store, header + content)
        self.messages += 1
        return "250 2.0.0 Ok: stored"


async def serve(host: str, port: int, spool: str, threads: int) -> None:
    loop = asyncio.get_running_loop()
    handler = AppendFsyncHandler(spool, threads)

    def factory() -> Any:
        return SMTP(handler, hostname="aiosmtpd-peer", data_size_limit=64 * 1024 * 1024)

    server = await loop.create_server(factory, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    handler.pool.shutdown(wait=True)
    os.close(handler.fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spool", required=True, help="file the messages are appended to")
    parser.add_argument("--threads", type=int, default=8, help="fsync worker threads")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.spool, args.threads))


if __name__ == "__main__":
    main()
