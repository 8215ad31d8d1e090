#!/usr/bin/env bash
# Where the CPU time goes in the e2e load test (`cargo xtask loadtest e2e`), for (c)
# Ward's HTTP proxy in the agent or (d) HAProxy transparent in node 1's namespace, or for
# (b) Ward L3/L4 and (a) no agents: the same two-node `ward-lab` lab, policy, server and
# pinning as the harness, then `perf record -e cpu-clock -g` (no hardware counters in
# this VM) during a wrk run, and `perf report --no-children` by symbol and by DSO. (c),
# (d): the enforcing process; (a), (b): all of CPU 0, where wrk, nginx and the packets'
# softirq work (the TC programs among it) run.
#
# usage (root): loadtests/e2e-profile.sh [a|b|c|d] [RULES] [CONNECTIONS] [SECONDS]
# Needs target/release/ward and ward-lab (WARD_LAB= another ward-lab, ward beside it),
# perf, nginx, wrk, haproxy, iptables. The lab is this script's own (`ward-lab down --id`
# on exit); processes are killed by PID. Reports stay in OUT (default
# /tmp/ward-e2e-profile-SUBJECT).
set -euo pipefail

SUBJECT=${1:-c}
RULES=${2:-50}
CONNS=${3:-64}
SECS=${4:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAB_BIN=${WARD_LAB:-$ROOT/target/release/ward-lab}
WARD=$(dirname "$LAB_BIN")/ward
OUT=${OUT:-/tmp/ward-e2e-profile-$SUBJECT}
WORK=$(mktemp -d /tmp/ward-e2e-profile-XXXXXX)
PIDS=()
LAB=
mkdir -p "$OUT"

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ -n "$LAB" ]; then "$LAB_BIN" down --id "$LAB" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# the harness's scenario: client on node-1, web and dns on node-2, the client's egress
# policy with RULES HTTP rules (every other rule but the last a POST with a header)
{
    cat <<'EOF'
format: netpol-oracle/v1
id: e2e
name: e2e-profile
title: the e2e profile's lab
semantics: cilium
cluster:
  namespaces:
  - {name: e2e, labels: {}}
  nodes:
  - {name: node-1, ip: 172.18.0.2}
  - {name: node-2, ip: 172.18.0.3}
  pods:
  - {namespace: e2e, name: client, labels: {app: client}, ip: 10.0.1.10, node: node-1}
  - {namespace: e2e, name: web, labels: {app: web}, ip: 10.0.2.20, node: node-2}
  - {namespace: e2e, name: dns, labels: {app: dns}, ip: 10.0.2.53, node: node-2, ports: [{name: dns, port: 53, protocol: UDP}]}
probes: []
policies:
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: client-egress, namespace: e2e}
  spec:
    endpointSelector: {matchLabels: {app: client}}
    egress:
    - toEndpoints: [{matchLabels: {app: web}}]
      toPorts:
      - ports: [{port: "80", protocol: TCP}]
EOF
    if [ "$SUBJECT" = c ] || [ "$SUBJECT" = d ]; then
        echo "        rules:"
        echo "          http:"
        for i in $(seq 0 $((RULES - 1))); do
            if [ $((i + 1)) -lt "$RULES" ] && [ $((i % 2)) -eq 0 ]; then
                echo "          - {method: POST, path: \"/api/v1/svc$i/orders\", headers: [\"Content-Type: application/json\"]}"
            else
                echo "          - {method: GET, path: \"/api/v1/svc$i/.*\"}"
            fi
        done
    fi
} >"$WORK/scenario.yaml"

# on CPU 1 alone, so the agents size their runtime for one CPU (as the harness does)
NO_AGENT=()
if [ "$SUBJECT" = a ]; then NO_AGENT=(--no-agent); fi
LAB=$(taskset -c 1 "$LAB_BIN" up "$WORK/scenario.yaml" --ward "$WARD" "${NO_AGENT[@]}" 2>"$WORK/up.log")
STATE=/run/ward-lab/$LAB/state.json
for p in $(python3 -c 'import json,sys; print(" ".join(str(p) for p in json.load(open(sys.argv[1]))["pids"]))' "$STATE"); do
    taskset -a -p -c 0 "$p" >/dev/null
done
AGENT=
if [ "$SUBJECT" != a ]; then
    AGENT=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print([n["agent_pid"] for n in s["nodes"] if n["name"]=="node-1"][0])' "$STATE")
    taskset -a -p -c 1 "$AGENT" >/dev/null
fi

cat >"$WORK/web.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $WORK/web.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off; default_type text/plain;
  client_body_temp_path $WORK/b; proxy_temp_path $WORK/p; fastcgi_temp_path $WORK/f;
  uwsgi_temp_path $WORK/u; scgi_temp_path $WORK/s;
  keepalive_requests 100000000; keepalive_timeout 300s;
  server { listen 80; location / { return 200 "hello from the server to \$remote_addr\n"; } }
}
EOF
bg() { local ns=$1; shift; ip netns exec "$LAB-$ns" taskset -c "$@" </dev/null >/dev/null 2>>"$WORK/bg.log" & }
bg e2e-web 0 nginx -e stderr -p "$WORK" -c "$WORK/web.conf"
PIDS+=($!)
SUBJECT_PID=$AGENT
if [ "$SUBJECT" = d ]; then
    {
        printf '%s\n' global "  nbthread 1" "  maxconn 4000" defaults "  mode http" \
            "  timeout connect 5s" "  timeout client 60s" "  timeout server 60s" \
            "frontend fe_e2e" "  bind 127.0.0.1:15001 transparent"
        for i in $(seq 0 $((RULES - 1))); do
            if [ $((i + 1)) -lt "$RULES" ] && [ $((i % 2)) -eq 0 ]; then
                echo "  http-request allow if METH_POST { path_reg ^/api/v1/svc$i/orders\$ } { req.hdr(content-type) -m str application/json }"
            else
                echo "  http-request allow if METH_GET { path_reg ^/api/v1/svc$i/.*\$ }"
            fi
        done
        printf '%s\n' "  http-request deny deny_status 403 content-type text/plain string \"Access denied (haproxy)\"" \
            "  default_backend be_orig" "backend be_orig" "  source 0.0.0.0 usesrc clientip" \
            "  server orig 0.0.0.0:0"
    } >"$WORK/haproxy.cfg"
    ip netns exec "$LAB-node-1" iptables -t mangle -A OUTPUT -p tcp -d 10.0.2.20 --dport 80 \
        -j MARK --set-xmark 0xb00/0xf00
    bg node-1 1 haproxy -db -f "$WORK/haproxy.cfg"
    SUBJECT_PID=$!
    PIDS+=($SUBJECT_PID)
    for _ in $(seq 1 100); do
        if [ -n "$(ip netns exec "$LAB-node-1" ss -Hltn src 127.0.0.1:15001)" ]; then break; fi
        sleep 0.1
    done
fi
URL=http://10.0.2.20/api/v1/svc$((RULES - 1))/items
for _ in $(seq 1 100); do
    if ip netns exec "$LAB-e2e-client" curl -s -o /dev/null --max-time 1 "$URL"; then break; fi
    sleep 0.1
done
# the enforcer answers the denied path itself
ip netns exec "$LAB-e2e-client" curl -s --max-time 2 http://10.0.2.20/admin; echo

# the agent's memory before the load: resident anonymous memory vs mapped files
[ -z "$AGENT" ] || grep -E '^(VmRSS|RssAnon|RssFile|RssShmem)' "/proc/$AGENT/status" | tr -s ' \t' ' ' | paste -sd' ' | sed 's/^/agent idle: /'
ip netns exec "$LAB-e2e-client" taskset -c 0 wrk -t1 -c "$CONNS" -d $((SECS + 2))s --latency "$URL" \
    </dev/null >"$OUT/load.txt" &
LPID=$!
PIDS+=($LPID)
sleep 1
if [ "$SUBJECT" = c ] || [ "$SUBJECT" = d ]; then
    TARGET=(-p "$SUBJECT_PID")
else
    TARGET=(-a -C 0)
fi
perf record -e cpu-clock -F 2000 -g -o "$OUT/perf.data" "${TARGET[@]}" -- sleep "$SECS" 2>"$OUT/record.log"
[ -z "$AGENT" ] || grep -E '^(VmRSS|RssAnon|RssFile|RssShmem)' "/proc/$AGENT/status" | tr -s ' \t' ' ' | paste -sd' ' | sed 's/^/agent under load: /'
wait "$LPID" || true
perf report -i "$OUT/perf.data" --no-children --percent-limit 0.7 --stdio -g none \
    >"$OUT/report.txt" 2>/dev/null
perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none \
    >"$OUT/dso.txt" 2>/dev/null
grep -E '^ +[0-9]' "$OUT/dso.txt" | head -12
echo
grep -E '^ +[0-9]' "$OUT/report.txt" | head -40
echo
grep -E 'Requests/sec|50%|99%' "$OUT/load.txt" || true
