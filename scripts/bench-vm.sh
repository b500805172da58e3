#!/usr/bin/env bash
# Reads through lazyblk's ublk device, through FUSE + loop, and through a loop
# device over the plain image, with the same fio jobs, all inside one VM on a
# kernel with ublk (scripts/vm-run.sh). Prints a Markdown report on stdout
# (progress goes to stderr), ready for docs/BENCHMARKS.md.
#
# The VM runs under TCG emulation: absolute figures mean little, ratios
# between targets measured in the same run do. Everything lives in the
# guest's tmpfs: the image, the store and (unless BENCH_CACHE_FS says
# otherwise) the cache directories.
#   rand: 4 KiB random reads, queue depth 32, for BENCH_RUNTIME seconds;
#   seq:  1 MiB sequential reads of the whole device, queue depth 8.
# fio uses io_uring and O_DIRECT on the block device. Cold: a fresh cache
# directory (every chunk fetched from the store on first touch) and, for
# FUSE + loop, dropped page caches. Warm: the same job after one full read
# of the device. The baseline's image is in tmpfs, so it is always warm.
#
# Each warm job runs BENCH_ROUNDS times, each time right after the same job
# on the loop baseline, and the report gives medians and the median of the
# per-pair ratios: under emulation on a shared host the loop figure alone
# moves by 2x from one minute to the next, so a target is only compared
# with a baseline measured beside it. Cold jobs run once (their cache is
# warm afterwards) and are compared with the median loop figure.
#
# ublk runs in the mode `add` picks (zero copy where the driver offers
# AUTO_BUF_REG, else copy) and, where that is zero copy, once more with
# `--no-zero-copy`, so both data paths are measured on the same kernel.
#
# BENCH_CACHE_FS=ext4 puts lazyblk's cache directories on an ext4 file
# system (a file in the guest's tmpfs, loop-mounted) instead of tmpfs.
# tmpfs has no non-blocking buffered reads, so io_uring hands each cache
# read to an io-wq worker thread; on ext4 (as on a real host's cache disk) a
# read the page cache holds completes inline (kernel-notes/ublk.md).
#
# Environment: BENCH_IMAGE_MIB (default 128), BENCH_RUNTIME (default 10),
# BENCH_ROUNDS (default 3), BENCH_FUSE (default 1; 0 skips FUSE + loop), BENCH_CACHE_FS (tmpfs, the
# default, or ext4), LAZYBLK_VM_RUN (default scripts/vm-run.sh),
# LAZYBLK_VM_SUITE (the kernel: trixie, the default, or trixie-backports).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

image_mib=${BENCH_IMAGE_MIB:-128}
runtime=${BENCH_RUNTIME:-10}
rounds=${BENCH_ROUNDS:-3}
fuse=${BENCH_FUSE:-1}
cache_fs=${BENCH_CACHE_FS:-tmpfs}
vm_run=${LAZYBLK_VM_RUN:-$REPO_ROOT/scripts/vm-run.sh}
[[ -x $vm_run ]] || die "no VM runner at $vm_run"
[[ $image_mib =~ ^[1-9][0-9]*$ ]] || die "BENCH_IMAGE_MIB wants a number of MiB, not '$image_mib'"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME wants a number of seconds, not '$runtime'"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS wants a number of rounds, not '$rounds'"
[[ $fuse == [01] ]] || die "BENCH_FUSE wants 0 or 1, not '$fuse'"
[[ $cache_fs == tmpfs || $cache_fs == ext4 ]] || die "BENCH_CACHE_FS wants tmpfs or ext4, not '$cache_fs'"

note "cargo build --release"
built=$(build_release)
work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-bench-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
# A copy: another build into the same target directory cannot swap it.
bin=$work/lazyblk
cp "$built" "$bin"
has_subcommand "$bin" add --recoverable || die "$built has no ublk support (add --recoverable): a stale build?"

cat >"$work/bench-guest" <<'EOF'
#!/bin/sh
# In the guest: prints "BENCH target temp job round iops kib_per_s" lines
# (a warm round of target T is preceded by the same job on loop, printed
# as target loop-T with the same round), and "BENCH-MODE target mode" for
# each ublk target.
set -eu
image_mib=$1 runtime=$2 fuse=$3 cache_fs=$4 rounds=$5
cd /tmp
if [ "$cache_fs" = ext4 ]; then
    # Room for one full cache at a time (each is removed after its job).
    truncate -s $((image_mib * 2 + 64))M cachefs.img
    mkfs.ext4 -q cachefs.img
    mkdir -p /cachefs
    mount -o loop cachefs.img /cachefs
    ln -s /cachefs caches
else
    mkdir caches
fi
dd if=/dev/urandom of=image bs=1M count="$image_mib" 2>/dev/null
lazyblk keygen --out key >/dev/null
echo "bench: pushing a $image_mib MiB random image" >&2
lazyblk push image --store store --key key --name bench --json >push.json 2>push.err || { cat push.err >&2; exit 1; }

job() { # target temp job round device
    case $3 in
    rand) set -- "$1" "$2" "$3" "$4" "$5" --rw=randread --bs=4k --iodepth=32 --runtime="$runtime" --time_based ;;
    seq) set -- "$1" "$2" "$3" "$4" "$5" --rw=read --bs=1M --iodepth=8 --size=100% ;;
    esac
    target=$1 temp=$2 name=$3 round=$4 dev=$5
    shift 5
    echo "bench: $target $temp $name $round" >&2
    fio --name="$name" --filename="$dev" --readonly --direct=1 --ioengine=io_uring \
        --output-format=terse --terse-version=3 "$@" |
        awk -F';' -v t="$target $temp $name $round" '{ printf "BENCH %s %d %d\n", t, $8, $7 }'
}
warm_rounds() { # target job device: each round on loop first, then on the target
    r=1
    while [ "$r" -le "$rounds" ]; do
        job "loop-$1" warm "$2" "$r" "$loop"
        job "$1" warm "$2" "$r" "$3"
        r=$((r + 1))
    done
}
read_all() { dd if="$1" of=/dev/null bs=1M iflag=direct 2>/dev/null; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

loop=$(losetup -f)
losetup -r "$loop" image

# ublk: the mode add picks; ublkcopy: copy mode forced, where that differs.
targets=ublk
if lazyblk features --json | grep -A1 '"name": "AUTO_BUF_REG"' | grep -q '"supported": true'; then
    targets="ublk ublkcopy"
fi
for t in $targets; do
    for j in rand seq; do
        extra=
        [ "$t" = ublkcopy ] && extra=--no-zero-copy
        # shellcheck disable=SC2086
        out=$(lazyblk add --store store --key key --name bench --cache-dir "caches/cache-$t-$j" --read-only $extra)
        dev=${out%% *}
        id=$(echo "$out" | cut -d' ' -f3)
        mode=$(lazyblk list --json | sed -n 's/.*"copy_mode": "\([a-z-]*\)".*/\1/p' | head -n 1)
        echo "BENCH-MODE $t ${mode:-unknown}"
        job "$t" cold $j 1 "$dev"
        read_all "$dev"
        warm_rounds "$t" $j "$dev"
        lazyblk del -n "$id" >/dev/null
        rm -rf "caches/cache-$t-$j"
    done
done

[ "$fuse" = 1 ] || { losetup -d "$loop"; echo "BENCH-FIO $(fio --version)"; echo "BENCH-KERNEL $(uname -r)"; exit 0; }
mkdir -p mnt
for j in rand seq; do
    lazyblk add --store store --key key --name bench --cache-dir "caches/cache-fuse-$j" --read-only --fuse mnt >/dev/null
    fuse_loop=$(losetup -f)
    losetup -r "$fuse_loop" mnt/disk
    drop_caches
    job fuse cold $j 1 "$fuse_loop"
    read_all "$fuse_loop"
    warm_rounds fuse $j "$fuse_loop"
    losetup -d "$fuse_loop"
    lazyblk del --fuse mnt >/dev/null
    rm -rf "caches/cache-fuse-$j"
done
losetup -d "$loop"
echo "BENCH-FIO $(fio --version)"
echo "BENCH-KERNEL $(uname -r)"
EOF
chmod 755 "$work/bench-guest"

note "running the benchmark in the VM (${image_mib} MiB image, ${runtime} s random jobs)"
"$vm_run" --timeout 1800 --mem $((image_mib * 5 + 1024)) \
    --add "$bin:/vm/lazyblk" --add "$work/bench-guest:/vm/bench-guest" \
    -- bench-guest "$image_mib" "$runtime" "$fuse" "$cache_fs" "$rounds" >"$work/console.log" ||
    die "the benchmark failed in the VM: $(tail -n 20 "$work/console.log")"

declare -A iops kib mode
while read -r _ target temp job round i k; do
    iops[$target.$temp.$job.$round]=$i
    kib[$target.$temp.$job.$round]=$k
done < <(grep -E '^BENCH [a-z-]+ (cold|warm) (rand|seq) [0-9]+ [0-9]+ [0-9]+$' "$work/console.log")
while read -r _ target m; do
    mode[$target]=$m
done < <(grep -E '^BENCH-MODE [a-z]+ [a-z-]+$' "$work/console.log")
fio_version=$(sed -n 's/^BENCH-FIO //p' "$work/console.log")
kernel=$(sed -n 's/^BENCH-KERNEL //p' "$work/console.log")
targets=(ublk)
[[ -n ${mode[ublkcopy]:-} ]] && targets+=(ublkcopy)
((fuse)) && targets+=(fuse)
for t in "${targets[@]}"; do
    for j in rand seq; do
        keys=("$t.cold.$j.1")
        for ((r = 1; r <= rounds; r++)); do keys+=("$t.warm.$j.$r" "loop-$t.warm.$j.$r"); done
        for key in "${keys[@]}"; do
            [[ -n ${iops[$key]:-} ]] || die "no figure for $key in the VM's output"
        done
    done
done

# value: rand in IOPS, seq in MiB/s.
value() {
    case $1 in
    *.rand.*) printf '%s' "${iops[$1]}" ;;
    *.seq.*) awk -v k="${kib[$1]}" 'BEGIN { printf "%.0f", k / 1024 }' ;;
    esac
}
median() { # numbers...
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
label() { # target
    # shellcheck disable=SC2016 # the backquotes are Markdown's
    case $1 in
    ublk) printf 'ublk (%s)' "${mode[ublk]}" ;;
    ublkcopy) printf 'ublk (%s, `--no-zero-copy`)' "${mode[ublkcopy]}" ;;
    fuse) printf 'FUSE + loop' ;;
    esac
}
row() { # label, target, temp, job, unit
    local t=$2 temp=$3 j=$4 r l v ratios=() loops=() values=() line
    for ((r = 1; r <= rounds; r++)); do
        loops+=("$(value "loop-$t.warm.$j.$r")")
        values+=("$(value "$t.warm.$j.$r")")
        ratios+=("$(ratio "${values[-1]}" "${loops[-1]}")")
    done
    l=$(median "${loops[@]}")
    if [[ $temp == warm ]]; then
        v=$(median "${values[@]}")
        line="| $1 ($5) | $(label "$t") | $l | $v | $(median "${ratios[@]}") | ${ratios[*]} |"
    else
        v=$(value "$t.cold.$j.1")
        line="| $1 ($5) | $(label "$t") | $l | $v | $(ratio "$v" "$l") | |"
    fi
    printf '%s\n' "$line"
}

echo "### ublk vs FUSE + loop vs loop, in the VM (kernel $kernel)"
echo
echo "Command: \`LAZYBLK_VM_SUITE=${LAZYBLK_VM_SUITE:-trixie} scripts/bench-vm.sh\` (BENCH_IMAGE_MIB=$image_mib, BENCH_RUNTIME=$runtime, BENCH_ROUNDS=$rounds, BENCH_FUSE=$fuse, BENCH_CACHE_FS=$cache_fs): kernel $kernel under qemu TCG (2 vCPUs), $fio_version with \`--ioengine=io_uring --direct=1\` on the block device; rand = \`--rw=randread --bs=4k --iodepth=32 --runtime=$runtime --time_based\`, seq = \`--rw=read --bs=1M --iodepth=8\` over the whole device. Image and store in the guest's tmpfs, caches on $cache_fs. The baseline is \`losetup -r\` over the image file (in memory, so always warm). lazyblk ublk: \`add --read-only\` with the default queues (one per vCPU) and depth 128, in the mode \`add\` picks and, where that is zero copy, also with \`--no-zero-copy\`. FUSE + loop: \`add --fuse --read-only\` and \`losetup -r\` over \`MNT/disk\`. Cold = fresh cache directory, one run; warm = after one full read of the device, $rounds rounds, each right after the same job on loop. Figures are medians; / loop is the median of the per-round ratios (listed), or for cold jobs the ratio to the median loop figure."
echo
echo "| job | target | loop | target | / loop | per round |"
echo "| --- | --- | ---: | ---: | ---: | --- |"
for spec in "rand 4 KiB QD32, warm:warm:rand:IOPS" "seq 1 MiB, warm:warm:seq:MiB/s" "rand 4 KiB QD32, cold:cold:rand:IOPS" "seq 1 MiB, cold:cold:seq:MiB/s"; do
    IFS=: read -r name temp j unit <<<"$spec"
    for t in "${targets[@]}"; do
        row "$name" "$t" "$temp" "$j" "$unit"
    done
done
