"""A scripted next hop for delivery tests: an asyncio SMTP server on the test's own loop.

It records what smtp-sink cannot show: how many sessions were open at once, when each
transaction arrived, the exact MAIL/RCPT lines, and whether the session used TLS. It can
offer or withhold extensions (PIPELINING, 8BITMIME, DSN, STARTTLS), do STARTTLS with a
given server certificate, or answer STARTTLS with 220 and then send garbage (a broken TLS
stack), and it can hold each DATA reply for a while so concurrency becomes visible.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port, loopback_hosts


@dataclass
class Transaction:
    mail: str
    rcpts: list[str]
    data: bytes
    tls: bool
    at: float  # time.monotonic() when the final dot arrived


@dataclass
class Recorder:
    host: str
    port: int
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME")
    tls_context: ssl.SSLContext | None = None  # offer STARTTLS with this context
    broken_tls: bool = False  # answer STARTTLS with 220 and then garbage
    data_delay: float = 0.0
    sessions: int = 0
    concurrent: int = 0
    peak: int = 0
    tls_sessions: int = 0
    transactions: list[Transaction] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> Recorder:
        self.server = await asyncio.start_server(self._session, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)
        tls = False
        try:
            writer.write(b"220 recorder ESMTP\r\n")
            mail, rcpts = "", []
            while line := await reader.readline():
                command = line.decode("utf-8", "replace").rstrip("\r\n")
                self.commands.append(command)
                verb = command.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    ext = list(self.extensions)
                    if (self.tls_context is not None or self.broken_tls) and not tls:
                        ext.append("STARTTLS")
                    lines = ["recorder", *ext]
                    text = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
                    writer.write(text.encode())
                elif verb == "STARTTLS":
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    if self.broken_tls or self.tls_context is None:
                        writer.write(b"this is not a TLS server hello\r\n" * 4)
                        await writer.drain()
                        return
                    try:
                        await writer.start_tls(self.tls_context)
                    except (ssl.SSLError, OSError):
                        return
                    tls = True
                    self.tls_sessions += 1
                elif verb == "MAIL":
                    mail, rcpts = command, []
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == "RCPT":
                    rcpts.append(command)
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    data = bytearray()
                    while (chunk := await reader.readline()) != b".\r\n":
                        if not chunk:
                            return
                        data += chunk
                    if self.data_delay:
                        await asyncio.sleep(self.data_delay)
                    self.transactions.append(
                        Transaction(mail, rcpts, bytes(data), tls, time.monotonic())
                    )
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.concurrent -= 1
            writer.close()


async def start_recorder(**kw: object) -> Recorder:
    (host,) = loopback_hosts(1)
    rec = Recorder(host, free_port(host), **kw)  # type: ignore[arg-type]
    return await rec.start()


# -- certificates -----------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path) -> tuple[Path, Path]:
    """A self-signed test CA: (certificate, key)."""
    cert, key = directory / "ca.crt", directory / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=Sluice Test CA", "-days", "30", "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path], *names: str) -> tuple[Path, Path]:
    """A certificate signed by `ca` for `names` (DNS names or IP addresses)."""
    stem = names[0].replace(":", "_")
    cert, key, csr = (directory / f"{stem}.{ext}" for ext in ("crt", "key", "csr"))
    ext = directory / f"{stem}.ext"
    sans = ",".join(f"IP:{n}" if n[0].isdigit() else f"DNS:{n}" for n in names)
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={names[0]}", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "30", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
