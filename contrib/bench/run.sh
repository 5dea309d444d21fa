#!/usr/bin/env bash
# Runs every mxguard benchmark on loopback and writes the tables, ready for
# BENCHMARKS.md, to target/bench/BENCHMARKS.md (and to the terminal):
#   policy front end vs postgrey (embedded store and Redis), the milter front
#   end at protocol level vs opendmarc, Postfix end to end (alone, with a null
#   policy service and milter, with mxguard over inet and unix sockets, with
#   postgrey + postsrsd + opendmarc), memory, and the criterion
#   micro-benchmarks.
#
#   bash contrib/bench/run.sh           # 5 runs per figure (about 15 min)
#   bash contrib/bench/run.sh --quick   # 3 runs, fewer messages (under 3 min
#                                       # once built)
#
# As root on Debian 12: installs the peers (postfix, redis-server, postgrey,
# postsrsd, opendmarc, openssl) with apt-get when missing. Postfix's master
# process must run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."

args=()
case "${1:-}" in
    --quick) args=(--quick) ;;
    "") ;;
    *) echo "usage: contrib/bench/run.sh [--quick]" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "contrib/bench/run.sh: Postfix's master process runs as root; run as root" >&2
    exit 1
fi
need=()
[ -x /usr/sbin/postfix ] || need+=(postfix)
[ -x /usr/sbin/smtp-source ] || need+=(postfix)
[ -x /usr/bin/redis-server ] || need+=(redis-server)
[ -x /usr/sbin/postgrey ] || need+=(postgrey)
[ -x /usr/sbin/postsrsd ] || need+=(postsrsd)
[ -x /usr/sbin/opendmarc ] || need+=(opendmarc)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "contrib/bench/run.sh: installing ${need[*]}"
    apt-get update -qq
    # "No configuration": the system's own Postfix never starts; the
    # benchmarks run their own instances.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The packages' own daemons would take CPU (and postgrey's and postsrsd's
# default ports); the benchmarks start their own on free ports.
if command -v systemctl >/dev/null; then
    for s in postgrey postsrsd opendmarc redis-server; do
        if systemctl is-active -q "$s" 2>/dev/null; then
            systemctl stop "$s" || true
        fi
    done
fi

out=target/bench/BENCHMARKS.md
mkdir -p target/bench
# Build first, so that compile time is not inside any figure.
cargo bench --locked --no-run --bench compare --bench micro
{
    cargo bench --locked --bench compare -- "${args[@]}"
    # criterion's own report goes to the terminal; its table to the file.
    cargo bench --locked --bench micro -- "${args[@]}" | tee /dev/stderr | sed -n '/^## Micro-benchmarks/,$p'
    echo
    echo "Command: \`bash contrib/bench/run.sh${args[*]:+ ${args[*]}}\`, $(date -u +%Y-%m-%d)."
} | tee "$out.tmp"
mv "$out.tmp" "$out"
echo "contrib/bench/run.sh: tables written to $out" >&2
