#!/usr/bin/env bash
# End-to-end load test (issue 25): HTTP and DNS between a client pod on node 1 and a server
# pod on node 2 of a two-node `ward-lab` lab, with no agents, Ward L3/L4, Ward's HTTP proxy
# and HAProxy taking the same redirect; harness in xtask/src/loadtest/e2e.rs.
# This runs `cargo xtask loadtest e2e` (root; writes ../REPORT-e2e.md and ../e2e-h1.png,
# or target/loadtest/REPORT-quick.md with --quick). Options: --rules 10,50,100,1000,
# --conns 1,16,64,256, --ward PATH (a ward built beforehand, ward-lab beside it).
# See ../README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo xtask loadtest e2e "$@"
