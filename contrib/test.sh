#!/usr/bin/env bash
# Runs mxguard's whole test suite on a Debian 12 machine: installs what the
# tests need (Postfix, redis-server, postsrsd, man-db) when it is missing, then runs
# the tests, a 30-second smoke run of each fuzz target (installing
# cargo-fuzz), clippy and the format check. The tests start their own Postfix,
# Redis and DNS server on loopback ports; nothing reaches the internet.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/postfix ] || need+=(postfix)
[ -x /usr/bin/redis-server ] || need+=(redis-server)
# Debian's SRS daemon: the SRS interop tests run it beside mxguard.
[ -x /usr/sbin/postsrsd ] || need+=(postsrsd)
command -v man >/dev/null || need+=(man-db)
command -v groff >/dev/null || need+=(groff-base)
# tests/hardening.rs rates the systemd unit with systemd-analyze.
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "contrib/test.sh: missing ${need[*]}; run as root, or: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
    echo "contrib/test.sh: installing ${need[*]}"
    apt-get update -qq
    # "No configuration": Debian writes no /etc/postfix/main.cf, so the
    # system's own Postfix never starts; the tests run their own instances.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The package starts its own postsrsd on ports 10001/10002; the tests
    # start theirs on free ports and need no system instance.
    if command -v systemctl >/dev/null && systemctl is-active -q postsrsd 2>/dev/null; then
        systemctl stop postsrsd || true
    fi
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "contrib/test.sh: the end-to-end tests start Postfix, whose master process runs as root; run as root" >&2
    exit 1
fi

cargo test --locked --lib --bins --tests
# Every fuzz target for 30 s (debug build); contrib/fuzz.sh alone runs
# them for 30 min each.
bash contrib/fuzz.sh --smoke 30
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --locked --all-targets -- -D warnings
