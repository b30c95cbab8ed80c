"""What the delivery tests share: a configuration, a fake clock, a static route to a test
next hop, and a scheduler on a real queue in a temporary directory."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from appliance.config import BounceProfile, Config, DeliveryConfig, DestinationConfig, Route
from appliance.delivery.routing import Router
from appliance.delivery.scheduler import DeliveryScheduler
from appliance.queue import Queue
from tests.netutil import free_port

T0 = 1_800_000_000.0


def make_config(
    tmp_path: Path,
    routes: dict[str, Route],
    destinations: dict[str, DestinationConfig] | None = None,
    profiles: dict[str, BounceProfile] | None = None,
    *,
    dns: tuple[str, int] | None = None,
    **kw: Any,
) -> Config:
    """A configuration for delivery tests: short client timeouts, DNS at `dns` (default: a
    port where nothing answers); `max_queue_time` and `postmaster` among `kw` go to the
    top level, every other keyword to [delivery]."""
    top = {k: kw.pop(k) for k in ("max_queue_time", "postmaster") if k in kw}
    return Config(
        source="test",
        hostname="mta.test",
        data_dir=tmp_path,
        routes=routes,
        durable=False,
        dns_servers=(dns or ("127.0.0.1", free_port()),),
        dns_timeout=1.0,
        delivery=DeliveryConfig(connect_timeout=3, command_timeout=5, data_timeout=5, **kw),
        destinations=destinations or {},
        bounce_profiles=profiles or {},
        **top,
    )


class Clock:
    """An injected clock the test moves by hand (retry timing without sleeps)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hop(host: str, port: int) -> Route:
    """A static route to one next hop."""
    return Route(hosts=((host, port),))


@asynccontextmanager
async def scheduler(
    tmp_path: Path, config: Config, clock: Callable[[], float] = time.time
) -> AsyncIterator[tuple[DeliveryScheduler, Queue]]:
    """A scheduler (seeded jitter) on a non-durable queue in `tmp_path`."""
    queue = Queue(tmp_path, durable=False, clock=clock)
    sched = DeliveryScheduler(queue, Router(config, clock), config, clock, rng=random.Random(1))
    try:
        yield sched, queue
    finally:
        await sched.close()
        await queue.close()
