"""What the delivery tests share: a fake clock, a static route to a test next hop, and a
scheduler on a real queue in a temporary directory."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from appliance.config import Config, Route
from appliance.delivery.routing import Router
from appliance.delivery.scheduler import DeliveryScheduler
from appliance.queue import Queue

T0 = 1_800_000_000.0


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
