#!/usr/bin/env bash
# Repeatable per-request cost of `ward proxy` (standalone, defaults, the sweep's rules):
# callgrind's user-space instructions per request over a fixed number of h2load requests.
# Wall time and CPU-seconds move a lot on this shared 2-CPU machine; instruction counts do
# not, so two builds can be compared one after the other.
#
# usage (root): loadtests/proxy-callgrind.sh [RULES] [h1|h2] [REQUESTS]
# Needs target/dist/ward (WARD= another binary), valgrind, nginx, h2load. Everything runs
# in a network namespace named ward-pcg-PID, deleted on exit; processes are killed by PID.
# Two callgrind runs: 2,000 requests, then 2,000 + REQUESTS; the difference divided by
# REQUESTS is the cost per request without start-up, warm-up and shutdown. Load: h2load
# with 64 connections (`--h1`) or 8 connections of 8 streams (h2c), as the sweep's base
# point.
set -euo pipefail

RULES=${1:-2}
PROTO=${2:-h1}
N=${3:-20000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WARD=${WARD:-$ROOT/target/dist/ward}
NS=ward-pcg-$$
WORK=$(mktemp -d /tmp/ward-pcg-XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

ip netns add "$NS"
ip -n "$NS" link set lo up
inns() { ip netns exec "$NS" "$@"; }

cat >"$WORK/backend.conf" <<EOF2
daemon off; master_process off; worker_processes 1; pid $WORK/backend.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off; default_type text/plain;
  client_body_temp_path $WORK/b; proxy_temp_path $WORK/p; fastcgi_temp_path $WORK/f;
  uwsgi_temp_path $WORK/u; scgi_temp_path $WORK/s;
  keepalive_requests 100000000; keepalive_timeout 300s;
  server {
    listen 127.0.0.1:8081; listen 127.0.0.1:8082 http2;
    location / { return 200 "hello from the backend\n"; }
  }
}
EOF2
ip netns exec "$NS" nginx -e stderr -p "$WORK" -c "$WORK/backend.conf" </dev/null >/dev/null 2>>"$WORK/bg.log" &
PIDS+=($!)

cat >"$WORK/cluster.yaml" <<'EOF2'
cluster:
  namespaces: [{name: bench}]
  pods:
    - {namespace: bench, name: client, labels: {app: client}, ip: 127.0.0.1}
    - {namespace: bench, name: web, labels: {app: web}, ip: 10.0.9.2}
EOF2
# the load test's rules: every other rule but the last a POST with a header
{
    printf '%s\n' "apiVersion: cilium.io/v2" "kind: CiliumNetworkPolicy" \
        "metadata: {name: bench-http, namespace: bench}" "spec:" \
        "  endpointSelector: {matchLabels: {app: web}}" "  ingress:" \
        "  - fromEndpoints: [{matchLabels: {app: client}}]" "    toPorts:" \
        "    - ports: [{port: \"80\", protocol: TCP}]" "      rules:" "        http:"
    for i in $(seq 0 $((RULES - 1))); do
        if [ $((i + 1)) -lt "$RULES" ] && [ $((i % 2)) -eq 0 ]; then
            echo "        - {method: POST, path: \"/api/v1/svc$i/orders\", headers: [\"Content-Type: application/json\"]}"
        else
            echo "        - {method: GET, path: \"/api/v1/svc$i/.*\"}"
        fi
    done
} >"$WORK/policy.yaml"
if [ "$PROTO" = h1 ]; then UP=8081; else UP=8082; fi
WARD_ARGS=(proxy --listen 127.0.0.1:9001 --upstream 127.0.0.1:$UP --cluster "$WORK/cluster.yaml"
    --policies "$WORK/policy.yaml" --endpoint bench/web --port 80)
URL=http://127.0.0.1:9001/api/v1/svc$((RULES - 1))/items

load() {
    if [ "$PROTO" = h1 ]; then
        inns h2load --h1 -c 64 -n "$1" "$URL" >"$WORK/load.out"
    else
        inns h2load -c 8 -m 8 -n "$1" "$URL" >"$WORK/load.out"
    fi
    grep -E '^requests:' "$WORK/load.out" >&2
    if ! grep -qE "^status codes: $1 2xx" "$WORK/load.out"; then
        echo "not every request answered 200:" >&2
        cat "$WORK/load.out" >&2
        exit 1
    fi
}
wait_up() {
    for _ in $(seq 1 600); do
        if inns curl -s -o /dev/null --max-time 1 "$URL"; then return 0; fi
        sleep 0.1
    done
    echo "ward did not answer" >&2
    exit 1
}

# One callgrind run of ward serving $1 requests (after start-up and one curl); prints the
# total instructions.
cg_run() {
    ip netns exec "$NS" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-$1.out" \
        "$WARD" "${WARD_ARGS[@]}" 2>"$WORK/cg-$1.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_up
    load "$1"
    # SIGTERM: ward dies by it and callgrind still writes its counts
    kill -TERM "$pid"
    wait "$pid" || true
    callgrind_annotate "$WORK/cg-$1.out" 2>/dev/null |
        awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'
}

base=$(cg_run 2000)
total=$(cg_run $((2000 + N)))
echo "callgrind: $base instructions for 2000 requests, $total for $((2000 + N))"
echo "callgrind: $(((total - base) / N)) instructions per request ($PROTO, $RULES rules)"
