#!/usr/bin/env bash
# Load test of the eBPF datapath (issue 5): no program, the programs with an allow policy, with 1,000 more entries, iperf3, TCP_RR and BPF_PROG_TEST_RUN; harness in xtask/src/loadtest/datapath.rs.
# One implementation for every part: this runs `cargo xtask loadtest datapath` (root; installs
# what it drives; writes ../REPORT.md, or target/loadtest/REPORT-quick.md with --quick).
# See ../README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo xtask loadtest datapath "$@"
