#!/usr/bin/env bash
# Load test of FQDN learning at scale (issue 22): the real `ward agent` on a generated node
# (500 endpoints, 10,000 toFQDNs names, 200,000 conntrack flows) under 2,000 DNS queries/s
# of rotating answers; harness in xtask/src/loadtest/fqdn.rs.
# This runs `cargo xtask loadtest fqdn` (root; writes ../REPORT-fqdn.md, or
# target/loadtest/REPORT-quick.md with --quick). Options: --secs S, --clients N,
# --rss-limit-mib M, --ward PATH, --ward-base PATH. See ../README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo xtask loadtest fqdn "$@"
