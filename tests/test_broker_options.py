"""The Redis transport really runs with the options that make redelivery after a crash prompt."""

from __future__ import annotations

import redis
from kombu import Connection

from schema.settings import Settings
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
