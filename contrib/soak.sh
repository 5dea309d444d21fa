#!/usr/bin/env bash
# Soak: the mixed-mail test of tests/soak.rs (good, greylisted, refused,
# forwarded and bounced mail through a throwaway Postfix and the real
# mxguard binary) for MINUTES minutes (default 15) instead of the suite's
# one minute; fails on a lost, duplicated or unexpected message, a wrong
# reply, or memory that grows. Needs what the suite needs (root, postfix,
# redis-server: see contrib/test.sh).
#
# The debug build, as the suite uses: the soak looks for leaks and lost
# mail over time, not for speed; the debug binary has the same allocations,
# keeps overflow checks and debug assertions on, and is already built by
# the suite (a release build of the tests takes minutes on two cores).
set -euo pipefail
minutes=${1:-15}
case $minutes in
'' | *[!0-9]*)
    echo "usage: $0 [MINUTES]" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
MXGUARD_SOAK_SECONDS=$((minutes * 60)) exec cargo test --test soak -- --nocapture
