#!/usr/bin/env bash
# Counts the worker's user-space instructions per request (or message, or event)
# under valgrind's callgrind: a measure that does not move with the machine's load,
# for changes too small for the throughput harness to resolve on a shared VM.
#
#   benches/callgrind.sh [SCENARIOS] -- WORKER_BINARY...
#   e.g. benches/callgrind.sh ws,small,newconn,sse -- target/release/appproxy-worker /tmp/old-worker
#   (h2: small GETs over prior-knowledge h2c, h2load with 8 connections x 10 streams)
#
# Each binary serves the same circuits with spinning off (`[reactor] spin_polls = 0`:
# empty polls would count the machine's idle time, not the work). Per scenario: 2 s of
# warm-up, counters zeroed, 6 s of load from 8 connections on CPU 1, counters dumped.
# Prints `scenario binary requests instructions per-request`; the annotated profiles
# stay in the run's directory (`callgrind_annotate --threshold=100 FILE`).
# ACCESS_LOG=true turns the worker's access log on (JSON lines to its stdout, the
# run's log file), as `appproxy-bench --access-logs` does.
# WORKER_EXTRA, when set, is added to each worker's configuration after its
# `[reactor]` section (e.g. WORKER_EXTRA=$'[limits]\nmax_connections_per_client = 1000'
# to count what a limit costs).
# Needs: valgrind, nginx (the app of the HTTP scenarios), wrk (h2load for h2), and the harness binary
# (`cargo build --release -p appproxy-benches`) for the WebSocket and SSE apps and loads.
set -euo pipefail
cd "$(dirname "$0")/.."

scenarios=${1:-ws,small,newconn,sse}
[ "${2:-}" = "--" ] || { echo "usage: $0 SCENARIOS -- WORKER_BINARY..." >&2; exit 2; }
shift 2
[ $# -gt 0 ] || { echo "no worker binary given" >&2; exit 2; }
bench=$PWD/target/release/appproxy-bench
for tool in valgrind callgrind_control nginx wrk "$bench"; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/appproxy-callgrind.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Ports of this script only (the harness uses 190xx).
app=19601 ws_app=19603 sse_app=19607 small=19612 ws=19614 sse=19617 admin=19619

cat > "$dir/app.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/app.pid;
error_log $dir/app.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:$app reuseport backlog=4096;
    location = / { return 200 "0123456789012345678901234567890123456789012345678901234567890123"; }
  }
}
EOF
taskset -c 1 nginx -c "$dir/app.conf" -p "$dir" >"$dir/app.log" 2>&1 & pids+=($!)
taskset -c 1 "$bench" ws-echo $ws_app >"$dir/ws-echo.log" 2>&1 & pids+=($!)
taskset -c 1 "$bench" sse-app $sse_app >"$dir/sse-app.log" 2>&1 & pids+=($!)

route() { echo "route_info = [{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = $1 }]"; }
cat > "$dir/worker.toml" <<EOF
[worker]
cores = "0"
bind_host = "127.0.0.1"
port_range = [1024, 65535]
[admin]
bind = "127.0.0.1:$admin"
[logging]
filter = "warn"
access_log = ${ACCESS_LOG:-false}
[reactor]
spin_polls = 0
${WORKER_EXTRA:-}
[[circuits]]
id = "c0a8f5d2-1111-4222-8333-444455556666"
port = $small
open_to_public = true
$(route $app)
[[circuits]]
id = "c0a8f5d2-1111-4222-8333-444455550001"
port = $ws
open_to_public = true
$(route $ws_app)
[[circuits]]
id = "c0a8f5d2-1111-4222-8333-444455550003"
port = $sse
open_to_public = true
$(route $sse_app)
EOF

load() { # SCENARIO SECONDS -> the load tool's BENCH line
  case $1 in
    ws) taskset -c 1 "$bench" ws-load 127.0.0.1:$ws 8 "$2" 2>&1 | grep BENCH ;;
    sse) taskset -c 1 "$bench" sse-load 127.0.0.1:$sse 8 "$2" 2>&1 | grep BENCH ;;
    small) taskset -c 1 wrk -t1 -c8 -d"$2"s -s benches/wrk-done.lua http://127.0.0.1:$small/ 2>&1 | grep BENCH ;;
    newconn) taskset -c 1 wrk -t1 -c8 -d"$2"s -H "Connection: close" -s benches/wrk-done.lua http://127.0.0.1:$small/ 2>&1 | grep BENCH ;;
    h2) taskset -c 1 h2load -D "$2" -c 8 -m 10 http://127.0.0.1:$small/ 2>&1 | awk '/^requests:/ {print "BENCH requests=" $8}' ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; exit 1
}
wait_port $app; wait_port $ws_app; wait_port $sse_app

echo "scenario binary requests instructions per-request"
for bin in "$@"; do
  name=$(basename "$bin")
  for sc in ${scenarios//,/ }; do
    out="$dir/$name-$sc.callgrind"
    taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --config "$dir/worker.toml" \
      >"$dir/$name-$sc.log" 2>&1 &
    vg=$!
    wait_port $small
    load "$sc" 2 >/dev/null
    callgrind_control -z $vg >/dev/null 2>&1
    line=$(load "$sc" 6)
    callgrind_control -d $vg >/dev/null 2>&1
    sleep 1
    kill $vg; wait $vg 2>/dev/null || true
    n=$(sed 's/.*requests=\([0-9]*\).*/\1/' <<<"$line")
    ir=$(awk '/^totals:/ {print $2}' "$out".1)
    echo "$sc $name $n $ir $((ir / n))"
  done
done
echo "profiles: $dir"
