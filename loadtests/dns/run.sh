#!/usr/bin/env bash
# Load test of the DNS proxy (issue 4): `ward dns-proxy` against dnsmasq as a forwarder and the upstream directly, dnsperf; harness in xtask/src/loadtest/dns.rs.
# One implementation for every part: this runs `cargo xtask loadtest dns` (root; installs
# what it drives; writes ../REPORT.md, or target/loadtest/REPORT-quick.md with --quick).
# See ../README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo xtask loadtest dns "$@"
