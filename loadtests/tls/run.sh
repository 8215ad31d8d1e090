#!/usr/bin/env bash
# Load test of TLS egress (issue 20): `ward proxy` intercepting HTTPS (terminate + originate, 50 HTTP rules) against HAProxy and nginx doing the same, and SNI splice against HAProxy's TCP mode; harness in xtask/src/loadtest/tls.rs.
# This runs `cargo xtask loadtest tls` (root; writes ../REPORT-tls.md, or
# target/loadtest/REPORT-quick.md with --quick). See ../README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo xtask loadtest tls "$@"
