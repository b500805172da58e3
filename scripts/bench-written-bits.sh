#!/usr/bin/env bash
# What recording written chunks costs: through FUSE, 4 KiB writes into 1024
# chunks the device fetched (each first write to such a chunk persists its
# written bit before the bytes change), then the same writes again (no
# bookkeeping left), each pass ending in one fsync, same device, same run.
# Prints one Markdown table row on stdout, ready for docs/BENCHMARKS.md.
#
# Environment: LAZYBLK_BIN (default: a release build of this checkout),
# BENCH_DIR (default /var/tmp).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

bin=${LAZYBLK_BIN:-$(build_release)}
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/lazyblk-bench-written.XXXXXX")
chmod 700 "$work"
export LAZYBLK_RUN_DIR=$work/run
trap '"$bin" del --fuse "$work/mnt" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
load=$(cut -d' ' -f1-3 /proc/loadavg)

"$bin" keygen --out "$work/key" >/dev/null
head -c $((64 << 20)) /dev/urandom >"$work/image"
"$bin" push "$work/image" --store "$work/store" --key "$work/key" --name image \
    --chunk-size 65536 >/dev/null
mkdir "$work/mnt"
"$bin" add --store "$work/store" --key "$work/key" --name image \
    --cache-dir "$work/cache" --fuse "$work/mnt" >/dev/null
note "fetching all 1024 chunks"
cat "$work/mnt/disk" >/dev/null
python3 - "$work/mnt/disk" "$load" <<'PY'
import os, sys, time
disk, load = sys.argv[1], sys.argv[2]
fd = os.open(disk, os.O_RDWR)
os.fsync(fd)  # the fetched chunks' bits on disk: first writes must persist
block = os.urandom(4096)
def one_pass():
    start = time.monotonic()
    for chunk in range(1024):
        os.pwrite(fd, block, chunk * 65536 + 8192)
    os.fsync(fd)
    return time.monotonic() - start
first, again = one_pass(), one_pass()
os.close(fd)
print("| first writes to 1024 fetched chunks | the same writes again | ratio | load average |")
print("|---|---|---|---|")
print(f"| {first * 1000:.0f} ms ({first / 1024 * 1e6:.0f} µs each) "
      f"| {again * 1000:.0f} ms ({again / 1024 * 1e6:.0f} µs each) "
      f"| {first / again:.1f} | {load} |")
PY
