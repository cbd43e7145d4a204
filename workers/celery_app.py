"""The Celery application: long GPU tasks that must survive crashed workers.

Shards are acknowledged only after they finish (``acks_late``) and go back to the queue
when the process running them dies; prefetch 1 keeps a busy worker from hoarding shards
that an idle one could take. The broker's redelivery is only the slow backstop: a running
shard holds a lease (``workers/lease.py``), and every worker sweeps for leases that ran out
and enqueues those shards again within minutes (``workers/lease_sweep.py``).

Redis (``redis://``) and RabbitMQ (``amqp://``) brokers both work.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from kombu import Exchange, Queue

from schema.db import dispose_engines
from schema.redact import install_log_redaction
from schema.settings import Settings, get_settings

SHARD_QUEUE = "gpu"
CONTROL_QUEUE = "control"

app = Celery("camaudit", include=["workers.tasks", "scheduler.control_tasks"])


def redelivery_after_s(settings: Settings) -> int:
    """How long the broker lets a delivery go unacknowledged: longer than any live shard runs."""
    return settings.visibility_timeout_s or settings.shard_time_limit_s * 2


def is_amqp(broker_url: str | None) -> bool:
    return (broker_url or "").split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def task_queues(settings: Settings) -> tuple[Queue, ...]:
    """On RabbitMQ, a delivery unacknowledged for ``consumer_timeout`` (30 min by default)
    closes the worker's channel, so every queue asks for the redelivery time instead. The
    ``x-consumer-timeout`` argument takes effect from RabbitMQ 3.12; older servers ignore it
    and need ``consumer_timeout`` in rabbitmq.conf (see docs/ARCHITECTURE.md, Faults).
    """
    arguments = None
    if is_amqp(settings.broker_url):
        arguments = {"x-consumer-timeout": redelivery_after_s(settings) * 1000}
    return tuple(
        Queue(name, Exchange(name), routing_key=name, queue_arguments=arguments)
        for name in (SHARD_QUEUE, CONTROL_QUEUE)
    )


def celery_config(settings: Settings) -> dict[str, Any]:
    hard_limit = settings.shard_time_limit_s
    return {
        "broker_url": settings.broker_url or "memory://",
        "result_backend": settings.result_backend,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": hard_limit,
        "task_soft_time_limit": max(hard_limit - 60, int(hard_limit * 0.9)),
        # A message must not be handed to a second worker while the first is still on it.
        "broker_transport_options": {
            "visibility_timeout": redelivery_after_s(settings),
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            # Each sweep holds a lock in Redis for milliseconds. A worker killed inside one
            # leaves the lock behind until it expires (kombu's default: 5 minutes), and until
            # then no worker restores the shard it was running.
            "unacked_mutex_expire": max(10, 3 * settings.unacked_restore_interval_s),
        },
        "task_default_queue": CONTROL_QUEUE,
        "task_queues": task_queues(settings),
        "task_routes": {"camaudit.explain_shard": {"queue": SHARD_QUEUE}},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def configure(settings: Settings | None = None) -> Celery:
    app.conf.update(celery_config(settings or get_settings()))
    return app


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_logs(logger: Any = None, **_: Any) -> None:
    """Whatever a worker logs (its own lines, retries, Celery's errors) has passwords hidden."""
    install_log_redaction(logger)
    install_log_redaction()


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked pool child must open its own database connections, and serves the metrics."""
    dispose_engines()
    settings = get_settings()
    if settings.metrics_port:
        from workers import metrics

        metrics.serve(settings.metrics_port, settings.broker_url)


configure()


_sweeper: Any = None


@worker_ready.connect
def _start_lease_sweeper(**_: Any) -> None:
    """Every worker's main process sweeps for expired leases: recovery needs no beat."""
    global _sweeper
    from workers.lease_sweep import LeaseSweeper

    settings = get_settings()

    def enqueue(run_id: str, shard_id: int) -> None:
        app.send_task("camaudit.explain_shard", (run_id, shard_id), queue=SHARD_QUEUE)

    def run_ended(run_id: str) -> None:
        app.send_task("camaudit.finalize_run", (run_id,), queue=CONTROL_QUEUE)

    _sweeper = LeaseSweeper(
        settings.database_url,
        interval_s=settings.lease_sweep_interval_s,
        max_lost=settings.max_lost_leases,
        enqueue=enqueue,
        run_ended=run_ended,
    ).start()


@worker_shutdown.connect
def _stop_lease_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
