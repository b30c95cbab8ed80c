"""Fixtures of the end-to-end suite (the machinery is in tests/e2e/harness.py).

- `sluice`: a factory that writes a TOML configuration into tmp_path and starts
  `sluice run` on it (see `harness.Sluice`); every server is stopped with SIGTERM (then
  SIGKILL) at teardown.
- `wire_sink`: a factory for `harness.WireSink`, a next hop that keeps DATA as raw bytes.
The rootdir conftest (tests/conftest.py) provides `smtp_sink` and `dns_server`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Sluice,
    SluiceFactory,
    WireSink,
    free_port,
    loopback_hosts,
    new_sluice,
)


@pytest.fixture
def sluice(tmp_path: Path) -> Iterator[SluiceFactory]:
    """Factory: `sluice(routes=..., listener=..., delivery=..., dns=..., top=...,
    start=True)` writes a config and (by default) starts `sluice run` on it."""
    servers: list[Sluice] = []

    def make(*, start: bool = True, **config: object) -> Sluice:
        workdir = tmp_path / f"sluice{len(servers)}"
        workdir.mkdir()
        server = new_sluice(workdir, **config)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=10)


@pytest.fixture
def wire_sink() -> Iterator[Callable[[], WireSink]]:
    started: list[WireSink] = []

    def start() -> WireSink:
        host = loopback_hosts(1)[0]
        sink = WireSink(host, free_port(host))
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a long end-to-end test (about a minute at most)")
