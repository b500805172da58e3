#!/usr/bin/env bash
# The erasure-coded cache fleet: chunk read latency through five real
# `lazyblk serve` cache nodes on loopback (4+1), with every node fast and
# then with one node answering BENCH_EC_DELAY_MS (default 50) late, measured
# in the same run; and the coding speed of one 512 KiB envelope, XOR against
# Reed-Solomon. Prints a Markdown report on stdout, progress on stderr.
#
# Environment: BENCH_EC_CHUNKS (default 400) chunks read per fleet,
# BENCH_EC_DELAY_MS (default 50) the slow node's added latency.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

load=$(cut -d' ' -f1-3 /proc/loadavg)
command="BENCH_EC_CHUNKS=${BENCH_EC_CHUNKS:-400} BENCH_EC_DELAY_MS=${BENCH_EC_DELAY_MS:-50} scripts/bench-ec.sh"
note "building the release test binary and the release lazyblk"
cargo build --release --quiet >&2 || die "cargo build --release failed"
run_bench() {
    cargo test --release --quiet --test ec_fleet -- --ignored --exact --nocapture "$1" 2>/dev/null |
        grep -v -e '^running' -e '^test ' -e '^\.*$' -e '^test result' || die "$1 failed"
}
note "chunk latency with a slow node"
latency=$(run_bench bench_chunk_latency_with_a_slow_node)
note "codec speed"
codec=$(run_bench bench_codec)

cat <<REPORT
Load average at start: $load. Command: \`$command\`.

\`\`\`text
$latency

$codec
\`\`\`
REPORT
