#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers of untrusted bytes (the cargo-fuzz
# crate in fuzz/): installs cargo-fuzz if missing, builds every target with
# AddressSanitizer, runs each for FUZZ_SECONDS seconds (default 20) from the
# committed seeds plus the local corpus, and fails on the first crash,
# naming the input that reproduces it.
#
#   FUZZ_SECONDS=600 scripts/fuzz.sh           # a longer hunt, every target
#   FUZZ_SECONDS=60 scripts/fuzz.sh chunk_open # one target
#
# The corpus grows in fuzz/corpus/<target>/ and reproducers land in
# fuzz/artifacts/<target>/; both stay local (gitignored). After a format
# change, refresh the seeds with
#   cargo run --manifest-path fuzz/Cargo.toml --example seeds
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib/common.sh

seconds=${FUZZ_SECONDS:-20}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "FUZZ_SECONDS must be a positive number of seconds, not '$seconds'"

# cargo-fuzz passes rustc flags that are nightly-only (-Zsanitizer, the
# sanitizer-coverage passes). RUSTC_BOOTSTRAP lets the stable toolchain,
# which ships the sanitizer runtimes, accept them.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    note "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
    ((${#targets[@]} > 0)) || die "cargo fuzz list found no targets in fuzz/"
fi

# One build for all targets: they share every dependency.
cargo fuzz build

for target in "${targets[@]}"; do
    [[ -d fuzz/seeds/$target ]] || die "no seeds for target '$target' in fuzz/seeds/"
    mkdir -p "fuzz/corpus/$target"
    log=$(mktemp)
    # libFuzzer adds new inputs to the first directory only, so the committed
    # seeds are read, never written. A single input slower than -timeout
    # seconds counts as a failure (a hang on hostile bytes is a bug).
    if cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
        coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || echo "cov: ?")
        printf '%-20s ok: %s runs in %s s, %s\n' "$target" "$runs" "$seconds" "$coverage"
        rm -f "$log"
    else
        # What went wrong (a panic's message, a sanitizer's report), then
        # how libFuzzer and cargo-fuzz ended.
        grep -m 1 -A 12 -E 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$log" >&2 || true
        printf '...\n' >&2
        tail -n 25 "$log" >&2
        reproducer=$(grep -o 'Test unit written to .*' "$log" | tail -n 1 | sed 's/^Test unit written to //')
        if [[ -n $reproducer ]]; then
            die "fuzz target '$target' failed; reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run $target $reproducer (full log: $log)"
        fi
        die "fuzz target '$target' failed without writing a reproducer (full log: $log)"
    fi
done
