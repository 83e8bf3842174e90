#!/usr/bin/env bash
# Runs every cargo-fuzz target in this directory for N seconds each (default 20), one after
# another, starting from the seed corpus in corpus/<target>/. Exits non-zero if any target
# crashes (its reproducer lands in artifacts/<target>/) or does not build.
#
#   fuzz/run-all.sh [SECONDS]        (or FUZZ_SECONDS=N; FUZZ_TOOLCHAIN=nightly by default)
#
# Needs a nightly toolchain (sanitizers); installs cargo-fuzz if `cargo fuzz` is missing.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-${FUZZ_SECONDS:-20}}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

cargo_tc=(cargo)
if command -v rustup >/dev/null 2>&1; then
    if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
        rustup toolchain install "$toolchain" --profile minimal
    fi
    cargo_tc=(cargo "+$toolchain")
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi

"${cargo_tc[@]}" fuzz build

failed=()
for target in $("${cargo_tc[@]}" fuzz list); do
    echo "=== fuzz target $target: ${secs}s"
    if ! "${cargo_tc[@]}" fuzz run "$target" -- -max_total_time="$secs"; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "fuzzing failed for: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
    exit 1
fi
echo "all fuzz targets ran ${secs}s without a crash"
