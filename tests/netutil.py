"""Loopback addresses, free ports and TOML snippets shared by every test harness.

Ports come from 20000-32767, below Linux's ephemeral range (32768-60999), so a port we
picked cannot be taken meanwhile by the source port of some test's outgoing connection.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

_PORT_LOW, _PORT_HIGH = 20000, 32767
_handed_out_hosts: set[str] = set()


def free_port(*hosts: str) -> int:
    """A port free for both TCP and UDP on every one of `hosts` (default 127.0.0.1)."""
    hosts = hosts or ("127.0.0.1",)
    for _ in range(500):
        port = random.randint(_PORT_LOW, _PORT_HIGH)
        try:
            for host in hosts:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def loopback_hosts(n: int) -> list[str]:
    """n distinct random 127.a.b.c addresses (never 127.0.0.1), not handed out before."""
    out: list[str] = []
    while len(out) < n:
        host = f"127.{random.randint(2, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
        if host not in _handed_out_hosts:
            _handed_out_hosts.add(host)
            out.append(host)
    return out


def toml_value(value: object) -> str:
    """A Python value as a TOML value (the subset our test configs use)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string for the text we use
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
