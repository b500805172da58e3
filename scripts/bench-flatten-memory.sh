#!/usr/bin/env bash
# The flattener's memory per file, against the budget of 256 MiB + 200
# bytes per file: examples/flatten_synthetic.rs flattens one generated layer
# of FILES small files (one data block each, 19-byte names) and reports its
# peak resident set (VmHWM). Bytes per file = (peak with FILES files - peak
# with none) / inodes in the image, for two directory sizes: 1,000 files
# per directory, and 8 (about the mean under a Debian /usr, where directories
# are one inode in nine). Prints a Markdown report on stdout (progress on
# stderr), ready for docs/BENCHMARKS.md.
#
# Environment: FILES (default 1000000); LAZYBLK_BENCH_DIR (default a fresh
# directory under /var/tmp) holds the images, each removed after its run;
# the directory is removed at the end unless it was given.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

files=${FILES:-1000000}
[[ $files =~ ^[0-9]+$ && $files -gt 0 ]] || die "FILES must be a positive number, not '$files'"
bench_work_dir /var/tmp bench-flatten-memory
load=$(cut -d' ' -f1-3 /proc/loadavg)

note "building the example"
cargo build --release --quiet --example flatten_synthetic >&2 || die "cargo build --example flatten_synthetic failed"
target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
bin=$target/release/examples/flatten_synthetic

# run FILES PER_DIR: prints "inodes peak_rss_bytes seconds".
run() {
    local start end out
    start=$(date +%s.%N)
    out=$("$bin" "$work/image.ext4" "$1" 100 "$2") || die "flatten_synthetic $1 files, $2 per directory failed"
    end=$(date +%s.%N)
    rm -f "$work/image.ext4"
    printf '%s %s %s\n' "$(jq -r .files <<<"$out")" "$(jq -r .peak_rss_bytes <<<"$out")" \
        "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
}

note "baseline (no files)"
read -r _ base _ < <(run 0 1000)
rows=""
for per_dir in 1000 8; do
    note "$files files, $per_dir per directory"
    read -r inodes peak secs < <(run "$files" "$per_dir")
    per_file=$(((peak - base) / inodes))
    budget=$((256 * 1048576 + 200 * inodes))
    rows+="| $per_dir | $inodes | $secs | $((peak / 1048576)) | $per_file | $((budget / 1048576)) | $(ratio "$peak" "$budget") |"$'\n'
done

cat <<MD
## Flattener memory per file (\`scripts/bench-flatten-memory.sh\`)

Load average at start: $load. One generated layer of $files files of 100
bytes (one data block each) with 19-byte names, flattened by
\`examples/flatten_synthetic.rs\` (release build); peak RSS is the kernel's
VmHWM. Bytes per inode = (peak RSS − $((base / 1024)) KiB, the peak with no
files) / inodes, against the budget's 200 B per file; the whole peak against
256 MiB + 200 B × inodes.

| files per directory | inodes | seconds | peak RSS MiB | bytes per inode (budget 200) | budget MiB | peak ÷ budget |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: |
${rows%$'\n'}
MD
