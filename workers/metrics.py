"""Prometheus metrics of a worker process: throughput, failures, queue depth, device memory.

Counters live in the process that runs shards (a pool child with the prefork pool), so the
HTTP endpoint is started there, on ``CAMAUDIT_METRICS_PORT``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("camaudit.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
ITEMS = Counter("camaudit_items", "Items explained, by outcome", ["status"], registry=REGISTRY)
SHARDS = Counter("camaudit_shards", "Shards finished, by outcome", ["status"], registry=REGISTRY)
SHARD_SECONDS = Histogram(
    "camaudit_shard_seconds",
    "Wall time of one shard",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
IMAGES_PER_SECOND = Gauge("camaudit_images_per_second", "Throughput of the last shard", registry=REGISTRY)

_started = False
_lock = threading.Lock()


class _LiveGauges(Collector):
    """Read at scrape time: device memory and the broker's queue length."""

    def __init__(self, broker_url: str | None, queues: tuple[str, ...]) -> None:
        self.broker_url = broker_url
        self.queues = queues

    def collect(self) -> Iterator[Any]:
        memory = GaugeMetricFamily(
            "camaudit_device_memory_bytes", "Allocated device memory", labels=["device"]
        )
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                memory.add_metric([f"cuda:{index}"], float(torch.cuda.memory_allocated(index)))
        yield memory
        depth = GaugeMetricFamily("camaudit_queue_depth", "Messages waiting in a queue", labels=["queue"])
        if self.broker_url and self.broker_url.startswith("redis"):
            try:
                import redis

                client = redis.Redis.from_url(self.broker_url, socket_timeout=1)
                for queue in self.queues:
                    depth.add_metric([queue], float(client.llen(queue)))
                client.close()
            except Exception as exc:  # a scrape must not fail because the broker blinked
                log.debug("queue depth unavailable: %s", exc)
        yield depth


def record_shard(n_done: int, n_failed: int, seconds: float, status: str = "done") -> None:
    ITEMS.labels("done").inc(n_done)
    ITEMS.labels("failed").inc(n_failed)
    SHARDS.labels(status).inc()
    SHARD_SECONDS.observe(seconds)
    if seconds > 0 and n_done + n_failed:
        IMAGES_PER_SECOND.set((n_done + n_failed) / seconds)


def serve(port: int, broker_url: str | None, queues: tuple[str, ...] = ("gpu", "control")) -> bool:
    """Start the endpoint once per process; returns False when the port is taken."""
    global _started
    with _lock:
        if _started:
            return True
        REGISTRY.register(_LiveGauges(broker_url, queues))
        try:
            start_http_server(port, registry=REGISTRY)
        except OSError as exc:
            log.warning("metrics port %d unavailable: %s", port, exc)
            return False
        _started = True
        log.info("metrics on :%d/metrics", port)
        return True
