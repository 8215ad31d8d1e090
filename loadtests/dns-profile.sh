#!/usr/bin/env bash
# Repeatable per-query cost of `ward dns-proxy` (standalone, as in `cargo xtask loadtest
# dns`): callgrind instructions per query over a fixed number of dnsperf queries, and
# `strace -c -f` syscalls per query. Wall time is not used: on this shared 2-CPU machine it
# moves a lot; instruction and syscall counts do not.
#
# usage (root): loadtests/dns-profile.sh [QUERIES] [callgrind|strace|both]
# Needs target/dist/ward (`cargo build --profile dist -p agent`, the shipped build; WARD=
# another binary), valgrind, strace, dnsperf, dnsmasq (dnsmasq-base). Everything runs in a
# network namespace named ward-prof-PID, deleted on exit; processes are killed by PID.
set -euo pipefail

N=${1:-20000}
WHAT=${2:-both}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WARD=${WARD:-$ROOT/target/dist/ward}
NS=ward-prof-$$
WORK=$(mktemp -d /tmp/ward-prof-XXXXXX)
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

records=()
: >"$WORK/queries"
for i in $(seq 1 100); do
    records+=("--host-record=h$i.bench.test,192.0.2.$i")
    echo "h$i.bench.test A" >>"$WORK/queries"
done
ip netns exec "$NS" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-hosts --bind-interfaces \
    --listen-address=127.0.0.1 --user=root --log-facility=/dev/null --no-resolv \
    --pid-file="$WORK/up.pid" --port=5301 --cache-size=1000 "${records[@]}" &
PIDS+=($!)

cat >"$WORK/cluster.yaml" <<'EOF'
namespaces: [{name: bench}]
pods: [{namespace: bench, name: client, labels: {app: client}, ip: 10.0.9.10}]
EOF
cat >"$WORK/policy.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bench-dns, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [127.0.0.1/32]
    toPorts:
    - ports: [{port: "5301", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.bench.test"}]
  - toFQDNs: [{matchPattern: "*.bench.test"}]
EOF
WARD_ARGS=(dns-proxy --listen 127.0.0.1:5303 --upstream 127.0.0.1:5301 --cluster "$WORK/cluster.yaml"
    --policies "$WORK/policy.yaml" --endpoint bench/client --threads 1 --audit-log /dev/null)

# dnsperf: 10 outstanding queries, the 100-name file repeated; -n counts passes over it.
perf_run() { inns dnsperf -s 127.0.0.1 -p 5303 -d "$WORK/queries" -q 10 -t 30 -n "$1" >"$WORK/dnsperf.out"; }
wait_up() {
    for _ in $(seq 1 600); do
        if inns dig +short +tries=1 +time=1 -p 5303 @127.0.0.1 h1.bench.test >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "ward did not answer" >&2
    exit 1
}
passes=$((N / 100))

# One callgrind run of ward answering $1 passes of the query file (after start-up and one
# dig); prints the total instructions. The cost per query is the difference of two runs
# divided by the difference of their query counts: start-up, the warm-up and the shutdown
# cancel out.
cg_run() {
    ip netns exec "$NS" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-$1.out" "$WARD" "${WARD_ARGS[@]}" \
        2>"$WORK/cg-$1.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_up
    perf_run "$1"
    grep -E "Queries completed|Queries lost" "$WORK/dnsperf.out" >&2
    # SIGTERM: ward dies by it and callgrind still writes its counts (SIGINT is ignored by
    # background jobs of a non-interactive shell)
    kill -TERM "$pid"
    wait "$pid" || true
    callgrind_annotate "$WORK/cg-$1.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'
}

if [[ $WHAT == callgrind || $WHAT == both ]]; then
    base=$(cg_run 10)
    total=$(cg_run $((10 + passes)))
    echo "callgrind: $base instructions for 1000 queries, $total for $((1000 + N))"
    echo "callgrind: $(((total - base) / N)) instructions per query"
    cp "$WORK/cg-$((10 + passes)).out" "${CG_KEEP:-/dev/null}"
    callgrind_annotate --inclusive=no "$WORK/cg-$((10 + passes)).out" 2>/dev/null | sed -n '/^Ir/,$p' | head -40 || true
fi

if [[ $WHAT == strace || $WHAT == both ]]; then
    ip netns exec "$NS" strace -c -f -o "$WORK/strace.out" "$WARD" "${WARD_ARGS[@]}" 2>/dev/null &
    WPID=$!
    PIDS+=("$WPID")
    wait_up
    perf_run "$passes"
    # ward itself (strace's child) ends; strace then writes its summary
    kill -TERM "$(pgrep -P "$WPID")"
    wait "$WPID" || true
    grep -E "Queries completed|Queries lost" "$WORK/dnsperf.out"
    echo "strace: syscalls for $N queries (plus start-up):"
    cat "$WORK/strace.out"
fi
