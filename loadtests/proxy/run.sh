#!/usr/bin/env bash
# Load test of the HTTP proxy (issue 3): `ward proxy` against HAProxy and nginx with the same rules, wrk and h2load; harness in xtask/src/loadtest/proxy.rs.
# One implementation for every part: this runs `cargo xtask loadtest proxy` (root; installs
# what it drives; writes ../REPORT.md, or target/loadtest/REPORT-quick.md with --quick).
# See ../README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo xtask loadtest proxy "$@"
