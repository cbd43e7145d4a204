#!/usr/bin/env bash
# Make sure Redis, PostgreSQL and RabbitMQ answer on 127.0.0.1, installing them from Debian's
# packages if needed. Used by `make test` so a fresh machine needs nothing set up by hand.
# A RabbitMQ installed here gets consumer_timeout = 2 h in /etc/rabbitmq/rabbitmq.conf (shards run
# up to an hour); one already running is used as it is. The fault tests make (and remove) a
# virtual host of their own with rabbitmqctl, which needs root.
set -euo pipefail

REDIS_PORT=${REDIS_PORT:-6379}
PG_PORT=${PG_PORT:-55432}  # a port of its own, so no system cluster or its pg_hba.conf is involved
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
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if ! { command -v pg_isready >/dev/null && pg_up; }; then
  [ -n "$(pg_bin)" ] || apt_install postgresql
  # Nothing answers on $PG_PORT: start a throwaway cluster for the tests on that port, leaving
  # the system's clusters (on 5432 or elsewhere) and their pg_hba.conf untouched. It lives in
  # $PG_DATA, listens on 127.0.0.1 only (its socket inside $PG_DATA), and trusts every connection to it: the tests connect as
  # postgres without a password and create and drop databases and roles. Remove it with
  # `pg_ctl -D $PG_DATA stop && rm -rf $PG_DATA`.
  bin=$(pg_bin)
  PG_DATA=${CAMAUDIT_TEST_PGDATA:-/tmp/camaudit-test-pg-$PG_PORT}
  as_owner=()
  if [ "$(id -u)" = 0 ]; then as_owner=(runuser -u postgres --); fi  # initdb refuses to run as root
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DATA"; fi
    chmod 700 "$PG_DATA"
    "${as_owner[@]}" "$bin/initdb" -D "$PG_DATA" -U postgres -A trust --no-sync >/dev/null
  fi
  "${as_owner[@]}" "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PG_DATA" start >/dev/null
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
