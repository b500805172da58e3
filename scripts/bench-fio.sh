#!/usr/bin/env bash
# Reads through the lazy device (FUSE + loop) against a loop device over the
# plain image file, with the same fio jobs in the same run. Prints a Markdown
# report on stdout (progress goes to stderr), ready for docs/BENCHMARKS.md.
#
# The image is random data, so every chunk is stored and every cold read
# really fetches (zero chunks would be served without I/O and flatter the
# figures). Both targets are read through a read-only loop device with
# buffered backing I/O (`losetup -r --direct-io=off`), by fio with io_uring
# and O_DIRECT on the loop device:
#   seq:  1 MiB sequential reads of the whole image, queue depth 8;
#   rand: 4 KiB random reads, queue depth 32, for FIO_RUNTIME seconds.
# Cold: page cache dropped and, for lazyblk, a fresh cache directory, so
# every chunk is fetched from the store on first touch. Warm: the same job
# after one full sequential read of the device, so the whole image is in the
# page cache (baseline) or in the cache directory (lazyblk): a random job
# alone leaves the baseline only partly cached and would flatter lazyblk,
# which fetches whole chunks.
#
# Environment: LAZYBLK_BENCH_DIR (default /var/tmp/lazyblk-bench-fio, on
# disk like a real store), LAZYBLK_FIO_IMAGE (default 1G), FIO_RUNTIME
# (default 10), LAZYBLK_BENCH_KEEP=1 keeps the work directory,
# LAZYBLK_BENCH_BIN measures another lazyblk binary (an earlier build, for a
# before/after comparison) instead of this checkout's release build.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

work=${LAZYBLK_BENCH_DIR:-/var/tmp/lazyblk-bench-fio}
image_size=${LAZYBLK_FIO_IMAGE:-1G}
runtime=${FIO_RUNTIME:-10}

"$REPO_ROOT/scripts/install-deps.sh" >&2
# Other work on the machine moves every figure: the report records it.
load=$(cut -d' ' -f1-3 /proc/loadavg)
ensure_kernel_devices
if [[ -n ${LAZYBLK_BENCH_BIN:-} ]]; then
    bin=$LAZYBLK_BENCH_BIN
    [[ -x $bin ]] || die "LAZYBLK_BENCH_BIN=$bin is not an executable"
else
    note "cargo build --release"
    bin=$(build_release)
fi
lazy=1
for sub in "keygen --out" "push --store" "add --fuse" "del --fuse"; do
    # shellcheck disable=SC2086 # "sub flag" splits on purpose
    if ! has_subcommand "$bin" $sub; then
        note "this build of lazyblk has no '${sub% *}' with ${sub#* }: measuring the baseline only"
        lazy=0
        break
    fi
done

image=$work/image
loop_dev=""
store=$work/store
key=$work/key
mnt=$work/mnt
loops=()

detach_loops() {
    local dev
    for dev in "${loops[@]}"; do
        losetup -d "$dev" 2>/dev/null || true
    done
    loops=()
}

detach_lazy() {
    if mountpoint -q "$mnt" 2>/dev/null; then
        "$bin" del --fuse "$mnt" >&2 || fusermount3 -u -z "$mnt" || true
    fi
}

on_exit() {
    local rc=$?
    detach_loops
    detach_lazy
    if [[ ${LAZYBLK_BENCH_KEEP:-0} == 1 ]]; then
        note "work directory kept: $work"
    elif ! mountpoint -q "$mnt" 2>/dev/null; then
        release_work_dir "$work"
    fi
    exit "$rc"
}

detach_lazy
mountpoint -q "$mnt" 2>/dev/null && die "$mnt is still mounted from an earlier run"
claim_work_dir "$work"
mkdir -p "$mnt"
trap on_exit EXIT
trap 'exit 130' INT TERM

# Attaches a read-only loop device over FILE with buffered backing I/O and
# sets loop_dev to it (a global: the trap must see every device attached).
attach_loop() {
    loop_dev=$(losetup -f --show -r --direct-io=off "$1") || die "losetup over $1 failed"
    loops+=("$loop_dev")
}

# Reads the whole device once, as the warm-up before a warm run.
read_all() {
    dd if="$1" of=/dev/null bs=1M iflag=direct status=none || die "reading all of $1 failed"
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# Runs one job on DEV and prints "iops MB/s p99_us".
run_fio() {
    local dev=$1 job=$2 args out
    case $job in
        seq) args=(--rw=read --bs=1M --iodepth=8 --size=100%) ;;
        rand) args=(--rw=randread --bs=4k --iodepth=32 --runtime="$runtime" --time_based) ;;
    esac
    out=$(fio --name="$job" --filename="$dev" --readonly --direct=1 --ioengine=io_uring \
        --output-format=json "${args[@]}") || die "fio $job on $dev failed"
    jq -r '.jobs[0].read | "\(.iops) \(.bw_bytes / 1e6) \(.clat_ns.percentile["99.000000"] / 1e3)"' <<<"$out" ||
        die "cannot read fio's JSON output: $out"
}

declare -A result

measure_baseline() {
    local job=$1
    attach_loop "$image"
    drop_caches
    note "baseline $job cold"
    result[base_${job}_cold]=$(run_fio "$loop_dev" "$job")
    read_all "$loop_dev"
    note "baseline $job warm"
    result[base_${job}_warm]=$(run_fio "$loop_dev" "$job")
    detach_loops
}

measure_lazy() {
    local job=$1 cache
    cache=$work/cache-$job
    "$bin" add --store "$store" --key "$key" --name bench --cache-dir "$cache" --fuse "$mnt" --read-only >&2 ||
        die "lazyblk add failed"
    attach_loop "$mnt/disk"
    drop_caches
    note "lazyblk $job cold"
    result[lazy_${job}_cold]=$(run_fio "$loop_dev" "$job")
    read_all "$loop_dev"
    note "lazyblk $job warm"
    result[lazy_${job}_warm]=$(run_fio "$loop_dev" "$job")
    detach_loops
    detach_lazy
    rm -rf "$cache"
}

note "writing a $image_size random image"
head -c "$image_size" /dev/urandom >"$image"
image_bytes=$(stat -c %s "$image")
if ((lazy)); then
    "$bin" keygen --out "$key" >&2
    note "lazyblk push"
    "$bin" push "$image" --store "$store" --key "$key" --name bench --json >"$work/push.json" ||
        die "lazyblk push failed"
fi

for job in seq rand; do
    measure_baseline "$job"
    if ((lazy)); then
        measure_lazy "$job"
    fi
done

# field: 1 = IOPS, 2 = MB/s, 3 = p99 latency in µs.
field() {
    [[ -n ${result[$1]:-} ]] || {
        echo "–"
        return
    }
    awk -v f="$2" '{ printf (f == 1 ? "%.0f" : "%.1f") "\n", $f }' <<<"${result[$1]}"
}
row() { # label, job_temp, field, unit
    local b l r=–
    b=$(field "base_$2" "$3")
    l=$(field "lazy_$2" "$3")
    [[ $l == – ]] || r=$(ratio "$l" "$b")
    printf '| %s | %s | %s | %s |\n' "$1 ($4)" "$b" "$l" "$r"
}

echo "## Reads through FUSE + loop vs loop over the plain image"
echo
echo "Command: \`scripts/bench-fio.sh\`: $((image_bytes >> 20)) MiB random image, both targets read through \`losetup -r --direct-io=off\`; fio $(fio --version) with \`--ioengine=io_uring --direct=1\`; seq = \`--rw=read --bs=1M --iodepth=8\` over the whole device, rand = \`--rw=randread --bs=4k --iodepth=32 --runtime=$runtime --time_based\`. Cold = page cache dropped and, for lazyblk, a fresh cache directory; warm = the same job after one full sequential read of the device. Load average before the run: $load. Ratio = lazyblk / baseline (for IOPS and MB/s higher is better, for latency lower). A cold rand run lasts ${runtime} s, and lazyblk fetches whole chunks: once every chunk has been touched the rest of the run is warm, so the cold rand figure depends on the image size."
echo
echo "| job | baseline: loop over image file | lazyblk: FUSE + loop | ratio |"
echo "| --- | ---: | ---: | ---: |"
row "seq 1 MiB, cold" seq_cold 2 "MB/s"
row "seq 1 MiB, warm" seq_warm 2 "MB/s"
row "rand 4 KiB QD32, cold" rand_cold 1 "IOPS"
row "rand 4 KiB QD32, warm" rand_warm 1 "IOPS"
row "rand 4 KiB QD32, cold" rand_cold 3 "p99 µs"
row "rand 4 KiB QD32, warm" rand_warm 3 "p99 µs"
if ((!lazy)); then
    echo
    echo "lazyblk columns skipped: this build has no \`push\`/\`add --fuse\` yet."
fi
