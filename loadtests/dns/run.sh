#!/usr/bin/env bash
# DNS proxy benchmark: dnsperf against (1) the upstream directly, (2) `ward dns-proxy` in
# standalone mode, (3) dnsmasq as a forwarder (cache off), all to the same upstream
# (dnsmasq answering from --host-record). Pinned cores: the subject (ward or the dnsmasq
# forwarder) on SUBJECT_CPU, dnsperf and the upstream on LOAD_CPU.
#
# Prints queries per second, the subject's CPU seconds, queries per CPU-second, and
# latency percentiles at a fixed rate (from dnsperf -v), with ratios to direct / dnsmasq.
#
# Usage: loadtests/dns/run.sh [SECONDS]   (root not needed; Debian: dnsperf, dnsmasq-base)
set -euo pipefail

DURATION=${1:-10}
LAT_QPS=${LAT_QPS:-2000}
LAT_SECONDS=${LAT_SECONDS:-5}
SUBJECT_CPU=${SUBJECT_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { echo "missing: $1 ($2)" >&2; exit 1; }; }
need dnsperf "apt-get install dnsperf"
need taskset "util-linux"
DNSMASQ=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
[ -x "$DNSMASQ" ] || { echo "missing: dnsmasq (apt-get install dnsmasq-base)" >&2; exit 1; }

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

(cd "$ROOT" && cargo build --quiet --release --bin ward)
WARD="$ROOT/target/release/ward"

UP=$(free_port); WARDP=$(free_port); FWD=$(free_port)

# Upstream: 100 names, answered from configuration.
RECORDS=()
: > "$WORK/queries"
for i in $(seq 1 100); do
    RECORDS+=("--host-record=h$i.bench.test,192.0.2.$i")
    echo "h$i.bench.test A" >> "$WORK/queries"
done
common=(--keep-in-foreground --conf-file=/dev/null --no-hosts --bind-interfaces
        --listen-address=127.0.0.1 --user=root --log-facility=/dev/null)
taskset -c "$LOAD_CPU" "$DNSMASQ" "${common[@]}" --no-resolv --port="$UP" \
    --cache-size=1000 --pid-file="$WORK/up.pid" "${RECORDS[@]}" &
PIDS+=($!)

# dnsmasq as a plain forwarder to the same upstream, no cache.
taskset -c "$SUBJECT_CPU" "$DNSMASQ" "${common[@]}" --no-resolv --port="$FWD" \
    --cache-size=0 --pid-file="$WORK/fwd.pid" --server="127.0.0.1#$UP" &
PIDS+=($!); FWD_PID=$!

# ward: one endpoint whose DNS rules allow *.bench.test and whose toFQDNs select it.
cat > "$WORK/cluster.yaml" <<YAML
namespaces: [{name: bench}]
pods: [{namespace: bench, name: client, labels: {app: client}, ip: 10.0.9.10}]
YAML
cat > "$WORK/policy.yaml" <<YAML
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-dns, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [127.0.0.1/32]
    toPorts:
    - ports: [{port: "$UP", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.bench.test"}]
  - toFQDNs: [{matchPattern: "*.bench.test"}]
YAML
taskset -c "$SUBJECT_CPU" "$WARD" dns-proxy --listen "127.0.0.1:$WARDP" \
    --upstream "127.0.0.1:$UP" --cluster "$WORK/cluster.yaml" \
    --policies "$WORK/policy.yaml" --endpoint bench/client --threads 1 \
    --audit-log /dev/null 2>"$WORK/ward.err" &
PIDS+=($!); WARD_PID=$!

wait_ready() {
    for _ in $(seq 1 100); do
        if dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/queries" -n 1 -t 1 2>/dev/null \
            | grep -q 'Queries completed: *100 '; then return 0; fi
        sleep 0.1
    done
    echo "port $1 not answering" >&2; exit 1
}
wait_ready "$UP"; wait_ready "$FWD"; wait_ready "$WARDP"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# run NAME PORT PID: sets QPS_NAME, CPU_NAME, P50_NAME, P90_NAME, P99_NAME
run() {
    local name=$1 port=$2 pid=$3 before after out
    before=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
    out=$(taskset -c "$LOAD_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries" \
        -l "$DURATION" -q 100 -c 4 2>&1)
    after=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
    local completed qps
    completed=$(echo "$out" | awk '/Queries completed:/ {print $3}')
    qps=$(echo "$out" | awk '/Queries per second:/ {print $4}')
    local cpu
    cpu=$(awk -v a="$after" -v b="$before" -v hz="$HZ" 'BEGIN {printf "%.2f", (a-b)/hz}')
    # latency at a fixed rate
    taskset -c "$LOAD_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries" \
        -l "$LAT_SECONDS" -Q "$LAT_QPS" -q 10 -v 2>/dev/null \
        | awk '/^> NOERROR/ {print $NF}' | sort -g > "$WORK/lat.$name"
    local n p50 p90 p99
    n=$(wc -l < "$WORK/lat.$name")
    pct() { awk -v n="$n" -v p="$1" 'NR == int(n*p/100)+1 {printf "%.1f", $1*1e6; exit}' "$WORK/lat.$name"; }
    p50=$(pct 50); p90=$(pct 90); p99=$(pct 99)
    eval "QPS_$name=$qps CPU_$name=$cpu DONE_$name=$completed P50_$name=$p50 P90_$name=$p90 P99_$name=$p99"
}

run direct "$UP" ""
run ward "$WARDP" "$WARD_PID"
run dnsmasq "$FWD" "$FWD_PID"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a/b; else print "-" }'; }
per_cpu() { awk -v d="$1" -v c="$2" 'BEGIN { if (c > 0) printf "%.0f", d/c; else print "-" }'; }

echo
echo "dnsperf ${DURATION}s, 100 outstanding; latency at ${LAT_QPS} qps for ${LAT_SECONDS}s; subject on cpu ${SUBJECT_CPU}, load on cpu ${LOAD_CPU}"
printf "%-9s %10s %8s %12s %9s %9s %9s\n" target qps cpu_s q/cpu_s p50_us p90_us p99_us
for t in direct ward dnsmasq; do
    eval "q=\$QPS_$t c=\$CPU_$t d=\$DONE_$t a=\$P50_$t b=\$P90_$t e=\$P99_$t"
    printf "%-9s %10s %8s %12s %9s %9s %9s\n" "$t" "$q" "$c" "$(per_cpu "$d" "$c")" "$a" "$b" "$e"
done
echo
echo "ward/dnsmasq queries per CPU-second: $(ratio "$(per_cpu "$DONE_ward" "$CPU_ward")" "$(per_cpu "$DONE_dnsmasq" "$CPU_dnsmasq")")"
echo "ward/direct qps: $(ratio "$QPS_ward" "$QPS_direct")   dnsmasq/direct qps: $(ratio "$QPS_dnsmasq" "$QPS_direct")"
echo "added median latency over direct: ward $(awk -v a="$P50_ward" -v b="$P50_direct" 'BEGIN{printf "%.1f", a-b}') us, dnsmasq $(awk -v a="$P50_dnsmasq" -v b="$P50_direct" 'BEGIN{printf "%.1f", a-b}') us"
