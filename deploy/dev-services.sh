#!/usr/bin/env bash
# Starts a throwaway PostgreSQL and Redis for development, in a temporary folder, on
# the given ports (defaults 5432 and 6379), prints the URLs for coordinator.cluster.toml
# and stops both (deleting their data) on Ctrl-C.
#
#   deploy/dev-services.sh [pg-port] [redis-port]
set -euo pipefail
PG_PORT="${1:-5432}"
REDIS_PORT="${2:-6379}"
if command -v initdb >/dev/null; then
  BIN="$(dirname "$(readlink -f "$(command -v initdb)")")"
else
  BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
fi
[ -x "$BIN/initdb" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)"; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)"; exit 1; }
DIR="$(mktemp -d /tmp/appproxy-dev-XXXXXX)"
AS=()
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; AS=(runuser -u postgres --); fi
cleanup() {
  [ -n "${PG_PID:-}" ] && kill -INT "$PG_PID" 2>/dev/null || true
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
"${AS[@]}" "$BIN/initdb" -A trust -U postgres -E UTF8 --no-sync -D "$DIR/pg" >/dev/null
"${AS[@]}" "$BIN/postgres" -D "$DIR/pg" -h 127.0.0.1 -p "$PG_PORT" -k "$DIR" >"$DIR/postgres.log" 2>&1 &
PG_PID=$!
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 100); do "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.1; done
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || { cat "$DIR/postgres.log"; exit 1; }
"$BIN/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE ROLE appproxy LOGIN" -c "CREATE DATABASE appproxy OWNER appproxy"
echo "PostgreSQL: postgres://appproxy@127.0.0.1:$PG_PORT/appproxy"
echo "Redis:      redis://127.0.0.1:$REDIS_PORT/2 (keys; stream_db = 4 for the streams)"
echo "data in $DIR (deleted on exit); Ctrl-C to stop"
wait
