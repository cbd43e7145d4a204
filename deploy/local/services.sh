#!/usr/bin/env bash
# Make sure Redis, PostgreSQL and RabbitMQ answer on 127.0.0.1, installing them from Debian's
# packages if needed. Used by `make test` so a fresh machine needs nothing set up by hand.
# A RabbitMQ installed here gets consumer_timeout = 2 h in /etc/rabbitmq/rabbitmq.conf (shards run
# up to an hour); one already running is used as it is. The fault tests make (and remove) a
# virtual host of their own with rabbitmqctl, which needs root.
set -euo pipefail

REDIS_PORT=${REDIS_PORT:-6379}
PG_PORT=${PG_PORT:-5432}
AMQP_PORT=${AMQP_PORT:-5672}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

wait_for() {  # wait_for DESCRIPTION COMMAND...: poll until the command succeeds, 60 s at most
  local what=$1; shift
  for _ in $(seq 1 120); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "services: $what did not come up" >&2; return 1
}

redis_up() { python3 - "$REDIS_PORT" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"PING\r\n"); assert s.recv(16).startswith(b"+PONG")
PY
}

if ! redis_up 2>/dev/null; then
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /tmp --logfile /tmp/camaudit-redis.log
  wait_for "redis on 127.0.0.1:$REDIS_PORT" redis_up
fi
echo "services: redis on 127.0.0.1:$REDIS_PORT"

pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }
if ! { command -v pg_isready >/dev/null && pg_up; }; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -q "camaudit-test" "$hba"; then
    # Tests connect as postgres over TCP without a password, as on the development machines.
    sed -i '1i host all all 127.0.0.1/32 trust # camaudit-test\nhost all all ::1/128 trust # camaudit-test' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
  wait_for "postgresql on 127.0.0.1:$PG_PORT" pg_up
fi
if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "select 1 from pg_database where datname='test'" | grep -q 1; then
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "create database test"
fi
echo "services: postgresql on 127.0.0.1:$PG_PORT"

amqp_up() { python3 - "$AMQP_PORT" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.sendall(b"AMQP\x00\x00\x09\x01"); assert s.recv(1) == b"\x01"  # a Connection.Start method frame
PY
}
if ! amqp_up 2>/dev/null; then
  if ! command -v rabbitmq-server >/dev/null; then
    apt_install rabbitmq-server
    conf=/etc/rabbitmq/rabbitmq.conf
    if ! grep -qs "^consumer_timeout" "$conf"; then
      # Older servers ignore the queues' x-consumer-timeout; 2 h = twice the default shard time limit.
      echo "consumer_timeout = 7200000" | $SUDO tee -a "$conf" >/dev/null
    fi
  fi
  $SUDO service rabbitmq-server start >/dev/null 2>&1 || $SUDO rabbitmq-server -detached
  wait_for "rabbitmq on 127.0.0.1:$AMQP_PORT" amqp_up
fi
echo "services: rabbitmq on 127.0.0.1:$AMQP_PORT"

# Headless Chromium for the web UI's browser tests (Debian's build; no browser downloads).
if [ -z "${CAMAUDIT_TEST_CHROMIUM:-}" ] && ! command -v chromium >/dev/null; then
  apt_install chromium
fi
echo "services: chromium at ${CAMAUDIT_TEST_CHROMIUM:-$(command -v chromium)}"
