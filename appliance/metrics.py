"""Prometheus metrics (prometheus-client), served on `metrics_address` when configured.

Values are read at scrape time from the objects that own them (queue, listener), so the
hot path pays nothing for metrics it already counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from appliance._native import Server
    from appliance.queue import Queue


class SluiceCollector(Collector):
    def __init__(self, queue: Queue, server: Server) -> None:
        self._queue = queue
        self._server = server

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sluice_queue_messages", "Messages in the queue", value=self._queue.count()
        )
        yield GaugeMetricFamily(
            "sluice_inbound_sessions",
            "Open inbound SMTP sessions",
            value=self._server.active_sessions(),
        )
        yield CounterMetricFamily(
            "sluice_queue_commits", "Queue write transactions", value=self._queue.stats.commits
        )
        yield CounterMetricFamily(
            "sluice_queue_messages_committed",
            "Messages made durable by the queue",
            value=self._queue.stats.messages_committed,
        )


def start(address: str, queue: Queue, server: Server) -> None:
    host, _, port = address.rpartition(":")
    REGISTRY.register(SluiceCollector(queue, server))
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
