"""Connection limits and slow clients on a real `sluice run`, with raw sockets on loopback.

- `max_connections_per_ip`: one address beyond its limit gets 421 4.7.0 "too many
  connections from your address"; other addresses are unaffected; a closed session gives
  its place back.
- `max_connections`: the listener as a whole, 421 4.7.0 "too many connections".
- Timeouts are per read (RFC 5321 section 4.5.3.2): a client trickling bytes stays, an
  idle one gets 421 4.4.2.
- A client that never reads our replies is closed once a write has waited
  `command_timeout`, and meanwhile holds nothing but its own session: other clients are
  served (more such clients than I/O threads, so no thread can be stuck on one).
"""

from __future__ import annotations

import contextlib
import socket
import time

from tests.listener_harness import HOSTNAME, Lines, Server, ServerFactory, sluice_server

__all__ = ["sluice_server"]  # the fixture, imported for pytest

PER_IP = f"421 4.7.0 {HOSTNAME} too many connections from your address, try again later"
TOTAL = f"421 4.7.0 {HOSTNAME} too many connections, try again later"


def greeting(server: Server, source: str | None = None) -> tuple[socket.socket, str]:
    """Connect and return the socket with the first reply line."""
    sock = server.connect(source)
    return sock, b"\n".join(Lines(sock).reply()).decode()


def refused_then_closed(sock: socket.socket) -> bool:
    """After a 421 the server closes: the next read is EOF (or a reset)."""
    sock.settimeout(10)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def wait_for_greeting(server: Server, source: str, timeout: float) -> socket.socket | None:
    """Connect from `source` until the listener greets with 220 instead of 421."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock, reply = greeting(server, source)
        if reply.startswith("220 "):
            return sock
        sock.close()
        time.sleep(0.1)
    return None


def test_connections_beyond_the_per_address_limit_get_421(sluice_server: ServerFactory) -> None:
    server = sluice_server(listener={"max_connections_per_ip": 3})
    with contextlib.ExitStack() as stack:
        held = []
        for _ in range(3):
            sock, reply = greeting(server)
            stack.enter_context(sock)
            assert reply.startswith("220 "), reply
            held.append(sock)
        sock, reply = greeting(server)
        with sock:
            assert reply == PER_IP
            assert refused_then_closed(sock)
        # Another address has its own count.
        sock, reply = greeting(server, "127.0.0.2")
        with sock:
            assert reply.startswith("220 "), reply
        # A session that ends gives its place back.
        held[0].sendall(b"QUIT\r\n")
        assert Lines(held[0]).code() == 221
        again = wait_for_greeting(server, "127.0.0.1", timeout=10)
        assert again is not None, "the closed session's place was not given back"
        again.close()


def test_connections_beyond_the_listener_limit_get_421(sluice_server: ServerFactory) -> None:
    server = sluice_server(listener={"max_connections": 2, "max_connections_per_ip": 10})
    first, reply1 = greeting(server, "127.0.0.2")
    second, reply2 = greeting(server, "127.0.0.3")
    with first, second:
        assert reply1.startswith("220 ") and reply2.startswith("220 ")
        sock, reply = greeting(server, "127.0.0.4")
        with sock:
            assert reply == TOTAL
            assert refused_then_closed(sock)


def test_timeouts_are_per_read(sluice_server: ServerFactory) -> None:
    server = sluice_server(listener={"command_timeout": 2})
    trickle, reply = greeting(server)
    idle, reply2 = greeting(server)
    with trickle, idle:
        assert reply.startswith("220 ") and reply2.startswith("220 ")
        started = time.monotonic()
        # One byte every 0.5 s: the line takes longer than command_timeout in all, but
        # no single wait does, so the session lives (RFC 5321 timeouts are per read).
        for byte in b"NOOP\r\n":
            trickle.sendall(bytes([byte]))
            time.sleep(0.5)
        assert time.monotonic() - started > 2.5
        assert Lines(trickle).reply() == [b"250 2.0.0 OK"]
        # The idle client has been waited for longer than command_timeout by now.
        idle_reply = Lines(idle).reply()
        assert idle_reply[0].startswith(b"421 4.4.2"), idle_reply


def stuff_without_reading(sock: socket.socket, quiet: float = 0.5, limit: float = 15) -> int:
    """Pipeline NOOPs without reading a reply until the server stops taking them (its
    replies fill the socket buffers, so it blocks writing and stops reading)."""
    chunk = b"NOOP\r\n" * 10_000
    sock.setblocking(False)
    sent = 0
    last_progress = started = time.monotonic()
    while time.monotonic() - last_progress < quiet and time.monotonic() - started < limit:
        try:
            sent += sock.send(chunk)
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


def test_client_that_never_reads_is_closed_and_blocks_nobody(
    sluice_server: ServerFactory,
) -> None:
    server = sluice_server(listener={"command_timeout": 2, "max_connections_per_ip": 1})
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # more than the 2 I/O threads
    stuck = []
    for source in sources:
        sock = socket.socket()
        # A small receive window, so our unread replies back up into the server quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((source, 0))
        sock.connect((server.host, server.port))
        stuck.append(sock)
    try:
        for sock in stuck:
            stuff_without_reading(sock)
        started = time.monotonic()
        # The server is blocked writing to each of them; everyone else is served.
        ok, reply = greeting(server)
        with ok:
            assert reply.startswith("220 "), reply
            lines = Lines(ok)
            ok.sendall(b"EHLO client.test\r\n")
            assert lines.reply()[-1].startswith(b"250 ")
            ok.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRSET\r\n")
            assert lines.code() == 250 and lines.code() == 250 and lines.code() == 250
        assert time.monotonic() - started < 2, "a stuck client delayed another one"
        # The last one stuck (well within command_timeout) still holds its address's
        # only place...
        sock, reply = greeting(server, sources[-1])
        with sock:
            assert reply == PER_IP
        # ...until its write has waited command_timeout: then it is closed.
        for source in sources:
            freed = wait_for_greeting(server, source, timeout=15)
            assert freed is not None, f"the session from {source} was never closed"
            freed.close()
    finally:
        for sock in stuck:
            sock.close()
