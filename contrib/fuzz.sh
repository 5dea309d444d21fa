#!/usr/bin/env bash
# Runs mxguard's fuzz targets (fuzz/fuzz_targets/) with cargo-fuzz on the
# stable toolchain: `-s none` keeps libFuzzer's coverage guidance without
# the sanitizers (which need nightly); Rust's own checks still catch what
# safe code can do wrong. A crash, a hang (one input over 10 s) or memory
# over 2 GiB fails the run and leaves the input in fuzz/artifacts/TARGET/.
#
#   bash contrib/fuzz.sh [--smoke] [SECONDS] [TARGET...]
#
# Without arguments: every target for 1800 s (30 min), optimised build, two
# at a time (FUZZ_JOBS=N: N at a time). --smoke: a debug build (quicker to
# compile), as the test suite runs it with 30 s per target. Installs
# cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

build=()
if [ "${1:-}" = "--smoke" ]; then
    build=(--dev)
    shift
fi
seconds="${1:-1800}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version 0.13.2
cargo fuzz build -s none "${build[@]}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
echo "contrib/fuzz.sh: ${targets[*]}, ${seconds} s each"
export FUZZ_SECONDS="$seconds" FUZZ_BUILD="${build[*]}"
printf '%s\n' "${targets[@]}" | xargs -P "${FUZZ_JOBS:-2}" -I{} bash -c '
    mkdir -p fuzz/corpus/{}
    if cargo fuzz run -s none $FUZZ_BUILD {} -- -max_total_time="$FUZZ_SECONDS" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >fuzz/{}.log 2>&1; then
        echo "fuzz {}: $(grep -o "Done [0-9]* runs in [0-9]* second(s)" fuzz/{}.log)"
    else
        echo "fuzz {}: FAILED, see fuzz/{}.log and fuzz/artifacts/{}/" >&2
        tail -40 fuzz/{}.log >&2
        exit 255
    fi'
