#!/usr/bin/env bash
# Boots VMs whose root disk is a flattened container image and times how long
# until a command in the guest has answered. Prints a Markdown report on
# stdout (progress goes to stderr), ready for docs/BENCHMARKS.md.
#
# The image is a Debian minbase rootfs (debootstrap, cached under
# ~/.cache/lazyblk/vmboot) packed as a one-layer OCI image, or the OCI image
# BENCH_VMBOOT_IMAGE names (oci:DIR:TAG, docker-archive:FILE). It is pushed
# to a directory store served by `lazyblk serve` on loopback. Variants:
#   copy-then-boot   the baseline: `lazyblk export` the whole image to a
#                    local file, then boot from it (virtio-blk on a raw file);
#   vhost cold       `add --vhost-user-blk` with an empty cache directory;
#   vhost prefetch   the same, where `add --record-trace` exists: a fresh
#                    cache, prefetching the trace the cold run recorded;
#   vhost warm       a second VM on the cold run's device, every chunk it
#                    needs already fetched;
#   nbd cold / warm  the same over `add --nbd unix:SOCKET`, where it exists
#                    (QEMU's -drive file=nbd:unix:SOCKET).
# The guest (the kernel of scripts/vm-run.sh, TCG) mounts /dev/vda and runs
# a few programs from it in a chroot: bash, dpkg-query over the package
# database, perl, apt-get. Time is from the start of the variant (export or
# add) to the guest's marker line; "in guest" is from /init to the marker,
# the disk-bound part. Under TCG absolute times mean little: compare the
# ratios. Each variant runs BENCH_ROUNDS times (default 3); the median is
# reported.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

rounds=${BENCH_ROUNDS:-3}
mem=1024
cache_root=${LAZYBLK_VMBOOT_CACHE:-$HOME/.cache/lazyblk/vmboot}
marker=VMBOOT-DONE
for cmd in umoci jq qemu-system-x86_64 debootstrap; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is missing (run scripts/install-deps.sh)"
done

bin=${LAZYBLK_BENCH_BIN:-$(build_release)}
has_trace=0 has_nbd=0
has_subcommand "$bin" add --record-trace && has_trace=1
has_subcommand "$bin" add --nbd && has_nbd=1

bench_work_dir /var/tmp lazyblk-bench-vmboot
export LAZYBLK_RUN_DIR=$work/run
servers=()
cleanup() {
    "$bin" del --all --force >/dev/null 2>&1 || true
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# The image: a cached minbase rootfs as a one-layer OCI layout.
image=${BENCH_VMBOOT_IMAGE:-}
if [[ -z $image ]]; then
    mkdir -p "$cache_root"
    tarball=$cache_root/bookworm-minbase.tar
    if [[ ! -s $tarball ]]; then
        note "debootstrap --variant=minbase bookworm (once; cached in $tarball)"
        rm -rf "$cache_root/rootfs.tmp"
        debootstrap --variant=minbase bookworm "$cache_root/rootfs.tmp" http://deb.debian.org/debian >&2 ||
            die "debootstrap failed"
        tar -C "$cache_root/rootfs.tmp" --numeric-owner -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$cache_root/rootfs.tmp"
    fi
    note "packing the rootfs as an OCI layout"
    umoci init --layout "$work/layout"
    umoci new --image "$work/layout:minbase"
    umoci unpack --image "$work/layout:minbase" "$work/bundle" >/dev/null
    tar -C "$work/bundle/rootfs" -xf "$tarball"
    umoci repack --image "$work/layout:minbase" "$work/bundle"
    rm -rf "$work/bundle"
    image=oci:$work/layout:minbase
    image_label="Debian bookworm minbase (debootstrap), one-layer OCI layout"
fi
image_label=${image_label:-$image}

"$bin" keygen --out "$work/key" >/dev/null
note "push $image"
"$bin" push "$image" --store "$work/store" --key "$work/key" --name boot --free-space 64M --json \
    >"$work/push.json" || die "lazyblk push failed"
image_bytes=$(jq -r .image_bytes "$work/push.json")
chunk_size=$(jq -r '.chunk_size // 524288' "$work/push.json")
nonzero_chunks=$(jq -r '.chunks_total - .chunks_zero' "$work/push.json")

"$bin" serve --store "$work/store" --listen 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
servers+=($!)
until [[ -s $work/serve.out ]]; do
    kill -0 "${servers[-1]}" 2>/dev/null || die "serve did not start: $(cat "$work/serve.err")"
    sleep 0.05
done
store_url=$(head -n1 "$work/serve.out")

# What the guest runs once /init has the disk.
cat >"$work/guest" <<EOF
#!/bin/sh
mkdir -p /newroot
mount /dev/vda /newroot || exit 1
chroot /newroot /bin/bash -c '. /etc/os-release; echo "\$PRETTY_NAME"; dpkg-query -W | wc -l; perl -e "print qq(perl ok\n)"; apt-get -v | head -n1' || exit 1
echo $marker
umount /newroot
EOF
chmod 755 "$work/guest"

# boot DISK-ARGS...: boots a VM with the disk QEMU arguments given and sets
# $guest_s (seconds from /init to the marker) and $marker_at (epoch seconds
# when the marker appeared).
boot() {
    local args=() a
    for a in -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem "$@"; do
        args+=(--qemu-arg "$a")
    done
    scripts/vm-run.sh --timeout 600 --mem "$mem" --add "$work/guest:/vm/guest" "${args[@]}" -- guest 2>&1 |
        while IFS= read -r line; do
            case $line in
            LAZYBLK-VM-START*) date +%s.%N >"$work/started" ;;
            "$marker"*) date +%s.%N >"$work/marked" ;;
            esac
            printf '%s\n' "$line" >>"$work/console.log"
        done
    [[ -s $work/marked && -s $work/started ]] || die "the guest did not answer; console: $(tail -n 20 "$work/console.log")"
    marker_at=$(cat "$work/marked")
    guest_s=$(awk -v a="$(cat "$work/started")" -v b="$marker_at" 'BEGIN { printf "%.2f", b - a }')
    rm -f "$work/marked" "$work/started"
}

# Bytes the one live device has fetched so far.
fetched_bytes() {
    "$bin" list --json | jq -r '[.[] | .stats.bytes_fetched] | first // 0'
}

declare -A total guest bytes
record() { # VARIANT START-EPOCH BYTES
    total[$1]+="$(awk -v a="$2" -v b="$marker_at" 'BEGIN { printf "%.2f", b - a }') "
    guest[$1]+="$guest_s "
    bytes[$1]+="$3 "
}

add_vhost() { # CACHE-DIR SOCKET [ADD-ARGS...]
    local cache=$1 sock=$2
    shift 2
    "$bin" add --store "$store_url" --key "$work/key" --name boot --cache-dir "$cache" \
        --vhost-user-blk "$sock" "$@" >/dev/null || die "lazyblk add --vhost-user-blk failed"
}
add_nbd() { # CACHE-DIR SOCKET
    "$bin" add --store "$store_url" --key "$work/key" --name boot --cache-dir "$1" \
        --nbd "unix:$2" >/dev/null || die "lazyblk add --nbd failed"
}
vhost_disk=(-device "vhost-user-blk-pci,chardev=disk,num-queues=2")

load=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq 1 "$rounds"); do
    note "round $round of $rounds: copy-then-boot"
    rm -f "$work/copy.img"
    start=$(date +%s.%N)
    "$bin" export --store "$store_url" --key "$work/key" --name boot --out "$work/copy.img" >/dev/null ||
        die "lazyblk export failed"
    boot -drive "file=$work/copy.img,format=raw,if=virtio"
    record copy "$start" "$((nonzero_chunks * chunk_size))"

    note "round $round: vhost-user-blk cold"
    rm -rf "$work/cache-vhost"
    trace_args=()
    ((has_trace)) && trace_args=(--record-trace)
    start=$(date +%s.%N)
    add_vhost "$work/cache-vhost" "$work/vhost.sock" --queues 2 "${trace_args[@]}"
    boot -chardev "socket,id=disk,path=$work/vhost.sock" "${vhost_disk[@]}"
    record vhost_cold "$start" "$(fetched_bytes)"
    note "round $round: vhost-user-blk warm (same device, second VM)"
    before=$(fetched_bytes)
    start=$(date +%s.%N)
    boot -chardev "socket,id=disk,path=$work/vhost.sock" "${vhost_disk[@]}"
    record vhost_warm "$start" "$(($(fetched_bytes) - before))"
    "$bin" del --all >/dev/null

    if ((has_trace)); then
        note "round $round: vhost-user-blk cold with prefetch from the recorded trace"
        rm -rf "$work/cache-prefetch"
        start=$(date +%s.%N)
        add_vhost "$work/cache-prefetch" "$work/vhost.sock" --queues 2
        boot -chardev "socket,id=disk,path=$work/vhost.sock" "${vhost_disk[@]}"
        record vhost_prefetch "$start" "$(fetched_bytes)"
        "$bin" del --all >/dev/null
    fi

    if ((has_nbd)); then
        note "round $round: NBD cold"
        rm -rf "$work/cache-nbd"
        start=$(date +%s.%N)
        add_nbd "$work/cache-nbd" "$work/nbd.sock"
        boot -drive "file=nbd:unix:$work/nbd.sock,format=raw,if=virtio"
        record nbd_cold "$start" "$(fetched_bytes)"
        note "round $round: NBD warm"
        before=$(fetched_bytes)
        start=$(date +%s.%N)
        boot -drive "file=nbd:unix:$work/nbd.sock,format=raw,if=virtio"
        record nbd_warm "$start" "$(($(fetched_bytes) - before))"
        "$bin" del --all >/dev/null
    fi
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
base_total=$(median <<<"${total[copy]}")
base_guest=$(median <<<"${guest[copy]}")
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

echo "Command: \`scripts/bench-vmboot.sh\` ($rounds rounds, medians; lazyblk binary: ${bin/#$HOME/\~}). Image: $image_label, $(mib "$image_bytes") MiB flattened ($nonzero_chunks non-zero chunks of $((chunk_size >> 10)) KiB), pushed to a directory store served by \`lazyblk serve\` on loopback. Guest: $(. scripts/lib/vm.sh && vm_fetch_kernel && vm_kernel_version) under QEMU TCG ($(qemu-system-x86_64 --version | head -n1 | awk '{ print $4 }')), ${mem} MiB, 2 vCPUs; it mounts /dev/vda and runs bash, dpkg-query -W, perl and apt-get -v from it. Time: from the variant's first step (\`export\` or \`add\`) to the guest's answer; in guest: /init to the answer. Load average before the run: $load."
echo
echo "| variant | time to answer (s) | ratio to copy-then-boot | in guest (s) | ratio | bytes fetched (MiB) |"
echo "|---|---|---|---|---|---|"
row() { # KEY LABEL
    [[ -n ${total[$1]:-} ]] || return 0
    local t g b
    t=$(median <<<"${total[$1]}")
    g=$(median <<<"${guest[$1]}")
    b=$(median <<<"${bytes[$1]}")
    echo "| $2 | $t | $(ratio "$t" "$base_total") | $g | $(ratio "$g" "$base_guest") | $(mib "$b") |"
}
row copy "copy-then-boot: \`export\` the whole image, boot from the local copy"
row vhost_cold "lazyblk vhost-user-blk, cold"
row vhost_prefetch "lazyblk vhost-user-blk, cold with prefetch from a trace"
row vhost_warm "lazyblk vhost-user-blk, warm (second VM)"
row nbd_cold "lazyblk NBD, cold"
row nbd_warm "lazyblk NBD, warm (second VM)"
echo
((has_trace)) || echo "(no prefetch row: this build of lazyblk has no \`add --record-trace\`)"
((has_nbd)) || echo "(no NBD rows: this build of lazyblk has no \`add --nbd\`)"
