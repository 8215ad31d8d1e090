#!/usr/bin/env bash
# Where `ward proxy`'s CPU time goes under load, as `cargo xtask loadtest proxy` runs it
# (standalone, default settings, pinned to CPU 1; nginx backend and the load on CPU 0):
# `perf record -e cpu-clock -g` (no hardware counters in this VM) of the proxy process during a wrk (HTTP/1.1) or h2load (h2c) run, then
# `perf report --no-children` (the top entries by self time) and the same by DSO.
#
# usage (root): loadtests/proxy-profile.sh [RULES] [h1|h2] [CONNECTIONS] [SECONDS]
# Needs target/dist/ward (`cargo build --profile dist --bin ward`; WARD= another binary),
# perf (Debian linux-perf), nginx, wrk, h2load. Everything runs in a network namespace named
# ward-pprof-PID, deleted on exit; processes are killed by PID. The perf data and reports
# stay in OUT (default /tmp/ward-proxy-profile).
set -euo pipefail

RULES=${1:-2}
PROTO=${2:-h1}
CONNS=${3:-64}
SECS=${4:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WARD=${WARD:-$ROOT/target/dist/ward}
OUT=${OUT:-/tmp/ward-proxy-profile}
NS=ward-pprof-$$
WORK=$(mktemp -d /tmp/ward-pprof-XXXXXX)
PIDS=()
mkdir -p "$OUT"

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
# Started with `ip netns exec` itself (it and taskset exec the program, so $! is its PID)
# and without this script's descriptors (a pipe or a lock held open by a child outlives
# the script).
bg() { ip netns exec "$NS" taskset -c "$@" </dev/null >/dev/null 2>>"$WORK/bg.log" & }
bg 0 nginx -e stderr -p "$WORK" -c "$WORK/backend.conf"
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
bg 1 "$WARD" proxy --listen 127.0.0.1:9001 --upstream 127.0.0.1:$UP \
    --cluster "$WORK/cluster.yaml" --policies "$WORK/policy.yaml" --endpoint bench/web \
    --port 80
WPID=$!
PIDS+=($WPID)
URL=http://127.0.0.1:9001/api/v1/svc$((RULES - 1))/items
for _ in $(seq 1 200); do
    if inns curl -s -o /dev/null --max-time 1 "$URL"; then break; fi
    sleep 0.1
done

if [ "$PROTO" = h1 ]; then
    ip netns exec "$NS" taskset -c 0 wrk -t1 -c "$CONNS" -d $((SECS + 2))s --latency "$URL" \
        </dev/null >"$OUT/load.txt" &
else
    S=$((CONNS < 8 ? CONNS : 8))
    ip netns exec "$NS" taskset -c 0 h2load -t1 -c $(((CONNS + S - 1) / S)) -m $S -D $((SECS + 2)) \
        "$URL" </dev/null >"$OUT/load.txt" &
fi
LPID=$!
PIDS+=($LPID)
sleep 1
perf record -e cpu-clock -F 2000 -g -o "$OUT/perf.data" -p "$WPID" -- sleep "$SECS" 2>"$OUT/record.log"
wait "$LPID" || true
perf report -i "$OUT/perf.data" --no-children --percent-limit 0.7 --stdio -g none \
    >"$OUT/report.txt" 2>/dev/null
perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none \
    >"$OUT/dso.txt" 2>/dev/null
grep -E '^ +[0-9]' "$OUT/dso.txt" | head -12
echo
grep -E '^ +[0-9]' "$OUT/report.txt" | head -40
echo
grep -E 'Requests/sec|requests:|finished in|50%|99%' "$OUT/load.txt" || true
