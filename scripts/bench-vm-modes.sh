#!/usr/bin/env bash
# Warm reads through lazyblk's ublk device in both data paths (zero copy and
# `--no-zero-copy`), with the caches on ext4, against loop devices in the
# same boot, in short alternating rounds; then, with BENCH_TRACE=1, one more
# round of each with ftrace histograms that count, per target, the io_uring
# submissions by opcode, the ones io_uring punted to an io-wq worker
# (io_uring_queue_async_work), io_uring_enter calls and context switches.
# What kernel-notes/ublk.md says bounds warm 4 KiB reads comes from here.
#
# Targets, each round in this order: loop over the image in tmpfs; for each
# binary, a zero-copy then a copy-mode device (caches on an ext4 file
# system, a file in the guest's tmpfs, loop-mounted); loop over the first
# binary's zero-copy cache file on that ext4. Jobs: rand = 4 KiB random
# reads at QD32, seq = 1 MiB sequential reads at QD8, both BENCH_RUNTIME
# seconds, fio with io_uring and O_DIRECT. Output: "RES target job round
# iops=N kib=N ios=N busy_us=N" lines on stdout (busy_us: guest CPU time,
# all vCPUs, not idle during the job, per request), then the histograms.
#
# Environment: BENCH_BINS (lazyblk binaries to compare, space-separated,
# default the release build; each must have a distinct file name),
# BENCH_IMAGE_MIB (default 128), BENCH_RUNTIME (default 8), BENCH_ROUNDS
# (default 2), BENCH_SEQ (default 1; 0 skips seq), BENCH_TRACE (default 1),
# LAZYBLK_VM_SUITE (default trixie-backports: zero copy needs 6.16+).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

image_mib=${BENCH_IMAGE_MIB:-128}
runtime=${BENCH_RUNTIME:-8}
rounds=${BENCH_ROUNDS:-2}
seq_job=${BENCH_SEQ:-1}
trace=${BENCH_TRACE:-1}
export LAZYBLK_VM_SUITE=${LAZYBLK_VM_SUITE:-trixie-backports}
[[ $image_mib =~ ^[1-9][0-9]*$ ]] || die "BENCH_IMAGE_MIB wants a number of MiB, not '$image_mib'"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME wants a number of seconds, not '$runtime'"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS wants a number of rounds, not '$rounds'"
[[ $seq_job == [01] ]] || die "BENCH_SEQ wants 0 or 1, not '$seq_job'"
[[ $trace == [01] ]] || die "BENCH_TRACE wants 0 or 1, not '$trace'"

if [[ -n ${BENCH_BINS:-} ]]; then
    read -r -a bins <<<"$BENCH_BINS"
else
    note "cargo build --release"
    bins=("$(build_release)")
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-bench-vm-modes.XXXXXX")
trap 'rm -rf "$work"' EXIT
adds=() names=()
for b in "${bins[@]}"; do
    [[ -x $b ]] || die "no executable lazyblk binary at $b"
    n=$(basename "$b")
    [[ " ${names[*]} " != *" $n "* ]] || die "two binaries named $n: give each a distinct file name"
    # A copy: another build into the same target directory cannot swap it.
    cp "$b" "$work/$n"
    adds+=(--add "$work/$n:/vm/$n")
    names+=("$n")
done

cat >"$work/bench-guest" <<'EOF'
#!/bin/sh
set -eu
image_mib=$1 runtime=$2 rounds=$3 seq_job=$4 trace=$5
shift 5
cd /tmp
truncate -s $((image_mib * ($# * 2 + 1) + 64))M cachefs.img
mkfs.ext4 -q cachefs.img
mkdir -p /cachefs
mount -o loop cachefs.img /cachefs
dd if=/dev/urandom of=image bs=1M count="$image_mib" 2>/dev/null
first=$1
$first keygen --out key >/dev/null
$first push image --store store --key key --name bench --json >/dev/null 2>push.err || { cat push.err >&2; exit 1; }
loop=$(losetup -f)
losetup -r "$loop" image
targets="loop:$loop:"
for b in "$@"; do
    for m in zc copy; do
        extra=
        [ $m = copy ] && extra=--no-zero-copy
        # shellcheck disable=SC2086
        out=$($b add --store store --key key --name bench --cache-dir "/cachefs/$b-$m" --read-only $extra)
        dev=${out%% *}
        pid=$(echo "$out" | sed -n 's/.*(pid \([0-9]*\).*/\1/p')
        dd if="$dev" of=/dev/null bs=1M iflag=direct 2>/dev/null
        targets="$targets $b-$m:$dev:$pid"
    done
done
loop_cache=$(losetup -f)
losetup -r "$loop_cache" "/cachefs/$first-zc/data"
targets="$targets loopcache:$loop_cache:"

busy_ticks() { # guest CPU time not idle, in USER_HZ ticks (all CPUs)
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}
run() { # name dev rw bs iodepth
    before=$(busy_ticks)
    result=$(fio --name=r --filename="$2" --readonly --direct=1 --ioengine=io_uring --rw="$3" --bs="$4" \
        --iodepth="$5" --runtime="$runtime" --time_based --output-format=terse --terse-version=3)
    busy=$(($(busy_ticks) - before))
    # $6: KiB read; busy_us: guest CPU time per request (10 ms ticks).
    echo "$result" | awk -F';' -v n="$1" -v busy="$busy" -v kib_per_io="${4%[kM]}" -v unit="${4#"${4%?}"}" '{
        ios = $6 / (unit == "M" ? kib_per_io * 1024 : kib_per_io)
        printf "RES %s iops=%d kib=%d ios=%d busy_us=%.0f\n", n, $8, $7, ios, ios ? busy * 10000 / ios : 0
    }'
}
r=1
while [ "$r" -le "$rounds" ]; do
    for t in $targets; do run "${t%%:*} rand $r" "$(echo "$t" | cut -d: -f2)" randread 4k 32; done
    if [ "$seq_job" = 1 ]; then
        for t in $targets; do run "${t%%:*} seq $r" "$(echo "$t" | cut -d: -f2)" read 1M 8; done
    fi
    r=$((r + 1))
done
[ "$trace" = 1 ] || exit 0

T=/sys/kernel/tracing
mount -t tracefs nodev $T
hists="io_uring/io_uring_queue_async_work:common_pid.execname,opcode
io_uring/io_uring_submit_req:common_pid.execname,opcode
sched/sched_switch:prev_comm,prev_pid
raw_syscalls/sys_enter:common_pid.execname
io_uring/io_uring_task_work_run:common_pid.execname"
triggers() { # "" to set, "!" to remove
    echo "$hists" | while IFS=: read -r event keys; do
        echo "${1}hist:keys=$keys" >"$T/events/$event/trigger"
    done
}
for t in $targets; do
    name=${t%%:*} dev=$(echo "$t" | cut -d: -f2) pid=$(echo "$t" | cut -d: -f3)
    echo "=== TRACE $name"
    echo 'id == 426' >$T/events/raw_syscalls/sys_enter/filter # io_uring_enter
    triggers ""
    run "$name rand traced" "$dev" randread 4k 32
    echo "$hists" | while IFS=: read -r event _; do
        echo "--- $event"
        grep -E 'hitcount|Hits:' "$T/events/$event/hist" | awk '{ print $NF, $0 }' | sort -n | tail -n 12 | cut -d' ' -f2-
    done
    triggers "!"
    echo 0 >$T/events/raw_syscalls/sys_enter/filter
    [ -z "$pid" ] || for task in /proc/"$pid"/task/*; do
        echo "TASK $(cat "$task/comm") $(grep ctxt "$task/status" | tr '\n' ' ')"
    done
done
EOF
chmod 755 "$work/bench-guest"

note "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$REPO_ROOT/scripts/vm-run.sh" --timeout 1800 --mem $((image_mib * (${#bins[@]} * 4 + 4) + 1024)) \
    "${adds[@]}" --add "$work/bench-guest:/vm/bench-guest" \
    -- bench-guest "$image_mib" "$runtime" "$rounds" "$seq_job" "$trace" "${names[@]}" >"$work/console.log" ||
    die "the benchmark failed in the VM: $(tail -n 20 "$work/console.log")"
awk '/^LAZYBLK-VM-EXIT/ { exit } /^=== TRACE/ { traced = 1 } traced || /^RES /' "$work/console.log"
note "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
