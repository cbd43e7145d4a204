"""Prometheus metrics of a worker process: throughput, failures, queue depth, device memory,
and per-audit gauges of the last finalised run, for Alertmanager rules.

Counters live in the process that runs shards (a pool child with the prefork pool), so the
HTTP endpoint is started there, on ``CAMAUDIT_METRICS_PORT``. The audit gauges are set by the
process that finalises runs (the worker consuming the ``control`` queue).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from scheduler.alerts import RunFacts

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

AUDIT_DRIFTED = Gauge(
    "camaudit_audit_drifted_classes",
    "Drifted (method, layer, class) rows of the audit's last run against its baseline",
    ["audit"],
    registry=REGISTRY,
)
AUDIT_WORST_CORRELATION = Gauge(
    "camaudit_audit_worst_class_correlation",
    "Lowest mean correlation of any class with the baseline in the audit's last run",
    ["audit"],
    registry=REGISTRY,
)
AUDIT_POINTING_GAME = Gauge(
    "camaudit_audit_pointing_game",
    "Pointing game of the audit's last run per method (worst layer)",
    ["audit", "method"],
    registry=REGISTRY,
)
AUDIT_FAILED_FRACTION = Gauge(
    "camaudit_audit_failed_fraction",
    "Failed fraction of the audit's last run's items",
    ["audit"],
    registry=REGISTRY,
)
AUDIT_DURATION = Gauge(
    "camaudit_audit_duration_seconds", "Wall time of the audit's last run", ["audit"], registry=REGISTRY
)
AUDIT_LAST_SUCCESS = Gauge(
    "camaudit_audit_last_success_timestamp_seconds",
    "When the audit's last finished run ended (Unix time)",
    ["audit"],
    registry=REGISTRY,
)
AUDIT_LAST_FINALISED = Gauge(
    "camaudit_audit_last_run_timestamp_seconds",
    "When the audit's last run was finalised (Unix time), whatever its status",
    ["audit"],
    registry=REGISTRY,
)
AUDIT_ALERTS = Gauge(
    "camaudit_audit_alerts_fired",
    "Alert rules that fired on the audit's last run",
    ["audit"],
    registry=REGISTRY,
)

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


def record_audit(facts: RunFacts, fired: int = 0) -> None:
    """Gauges of an audit's latest finalised run; drift gauges vanish when it had no baseline."""
    import time

    audit = facts.audit_name
    if not audit:
        return
    AUDIT_FAILED_FRACTION.labels(audit).set(facts.failed_fraction)
    AUDIT_ALERTS.labels(audit).set(fired)
    AUDIT_LAST_FINALISED.labels(audit).set(time.time())
    if facts.duration_s is not None:
        AUDIT_DURATION.labels(audit).set(facts.duration_s)
    if facts.status == "finished" and facts.finished_at is not None:
        AUDIT_LAST_SUCCESS.labels(audit).set(facts.finished_at.timestamp())
    if facts.drift is None:
        for gauge in (AUDIT_DRIFTED, AUDIT_WORST_CORRELATION):
            _forget(gauge, audit)
    else:
        AUDIT_DRIFTED.labels(audit).set(len(facts.drifted()))
        if facts.drift:
            AUDIT_WORST_CORRELATION.labels(audit).set(min(c.mean_correlation for c in facts.drift))
        else:
            _forget(AUDIT_WORST_CORRELATION, audit)
    worst: dict[str, float] = {}
    for q in facts.quality:
        if q.n:
            worst[q.method] = min(worst.get(q.method, 1.0), q.pointing_game)
    for method, value in worst.items():
        AUDIT_POINTING_GAME.labels(audit, method).set(value)


def _forget(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


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
