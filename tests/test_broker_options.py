"""The Redis transport really runs with the options that make redelivery after a crash prompt."""

from __future__ import annotations

import redis
from kombu import Connection

from schema.settings import Settings
from tests.plugins.services import rabbitmqctl
from workers.celery_app import celery_config


def test_transport_takes_the_visibility_and_restore_options(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url, visibility_timeout_s=7, unacked_restore_interval_s=2)
    options = celery_config(settings)["broker_transport_options"]
    with Connection(redis_url, transport_options=options) as connection:
        channel = connection.default_channel
        assert channel.visibility_timeout == 7
        assert channel.unacked_restore_interval == 2
        # a worker killed inside a restore sweep must not block restores for kombu's 5 minutes
        assert channel.unacked_mutex_expire <= 10
        assert channel.unacked_mutex_expire >= 2 * channel.unacked_restore_interval
        channel.qos.restore_visible(num=10)  # a real sweep against Redis takes and drops the lock
        assert not redis.Redis.from_url(redis_url).exists(channel.unacked_mutex_key)


def test_rabbitmq_queues_ask_for_the_redelivery_time_and_carry_a_task(amqp_url: str) -> None:
    settings = Settings(broker_url=amqp_url, shard_time_limit_s=100)
    config = celery_config(settings)
    queues = {queue.name: queue for queue in config["task_queues"]}
    assert set(queues) == {"gpu", "control"}
    assert all(q.queue_arguments == {"x-consumer-timeout": 200_000} for q in queues.values())
    with Connection(amqp_url) as connection:
        for queue in queues.values():
            queue(connection.default_channel).declare()
        with connection.SimpleQueue(queues["gpu"]) as gpu:
            gpu.put({"shard": 1})
            message = gpu.get(timeout=10)
            assert message.payload == {"shard": 1}
            message.ack()
    vhost = amqp_url.rsplit("/", 1)[1]
    listed = rabbitmqctl("-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "arguments")
    arguments = dict(line.split("\t", 1) for line in listed.splitlines() if "\t" in line)
    assert arguments == {name: '[{"x-consumer-timeout",200000}]' for name in ("gpu", "control")}


def test_redis_queues_carry_no_rabbitmq_arguments(redis_url: str) -> None:
    queues = celery_config(Settings(broker_url=redis_url))["task_queues"]
    assert [q.queue_arguments for q in queues] == [None, None]
