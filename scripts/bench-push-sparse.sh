#!/usr/bin/env bash
# Push of a large sparse image against a push of its data alone, in the same
# run: a 64 GiB sparse file holding 320 MiB of random data in 4 MiB runs spread
# across it, and a dense 320 MiB file of the same data. Each push goes to a
# fresh directory store; the best of several rounds counts. Prints a Markdown
# report on stdout (progress on stderr), ready for docs/BENCHMARKS.md.
#
# Environment: SPARSE_SIZE_GIB (default 64), SPARSE_DATA_MIB (default 320, a
# multiple of 4), ROUNDS (default 3), BENCH_DIR (default /var/tmp: a disk file
# system that reports holes; tmpfs does too).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

size_gib=${SPARSE_SIZE_GIB:-64}
data_mib=${SPARSE_DATA_MIB:-320}
rounds=${ROUNDS:-3}
(( data_mib % 4 == 0 )) || die "SPARSE_DATA_MIB must be a multiple of 4"

bin=$(build_release)
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/lazyblk-bench-sparse.XXXXXX")
trap 'rm -rf "$work"' EXIT
load=$(cut -d' ' -f1-3 /proc/loadavg)

"$bin" keygen --out "$work/key" >&2
note "writing ${data_mib} MiB of random data, dense and spread over ${size_gib} GiB"
runs=$((data_mib / 4))
head -c "$((data_mib << 20))" /dev/urandom >"$work/dense.img"
truncate -s "${size_gib}G" "$work/sparse.img"
stride_mib=$(((size_gib << 10) / runs))
for ((i = 0; i < runs; i++)); do
    dd if="$work/dense.img" of="$work/sparse.img" bs=4M skip="$i" seek="$((i * stride_mib / 4))" \
        count=1 conv=notrunc status=none
done
allocated=$(du -k "$work/sparse.img" | cut -f1)

# Wall seconds of the fastest of $rounds pushes of $1, each to a fresh store.
best_push() {
    local image=$1 best="" secs store
    for ((r = 0; r < rounds; r++)); do
        store="$work/store-$r"
        rm -rf "$store"
        secs=$( { /usr/bin/time -f %e "$bin" push "$image" --store "$store" --key "$work/key" \
            --name bench --json >"$work/report.json"; } 2>&1 | tail -1)
        best=$(awk -v a="$best" -v b="$secs" 'BEGIN { print (a == "" || b < a) ? b : a }')
    done
    rm -rf "$work"/store-*
    printf '%s\n' "$best"
}

note "pushing the dense file, best of $rounds"
dense=$(best_push "$work/dense.img")
note "pushing the sparse file, best of $rounds"
sparse=$(best_push "$work/sparse.img")
read_mib=$(jq '.bytes_read / 1048576' "$work/report.json")

cat <<REPORT
Commands: \`lazyblk push IMAGE --store DIR --key KEY --name bench --json\` into a fresh
directory store under ${BENCH_DIR:-/var/tmp}, best of $rounds, timed with \`/usr/bin/time\`;
load average before the run: $load.

| image | size | data | read by push | wall | ratio to dense |
| --- | ---: | ---: | ---: | ---: | ---: |
| dense | ${data_mib} MiB | ${data_mib} MiB | ${data_mib} MiB | ${dense} s | 1.00 |
| sparse | ${size_gib} GiB | ${data_mib} MiB (${allocated} KiB allocated) | ${read_mib} MiB | ${sparse} s | $(ratio "$sparse" "$dense") |
REPORT
