#!/usr/bin/env bash
# The vhost-user-blk test: VMs boot with disks served by `lazyblk add
# --vhost-user-blk`, the way a hypervisor uses them.
#
# A two-layer OCI layout (umoci) is pushed to a directory store and served by
# two device processes: a writable one with two queues and a read-only one.
# The first VM (QEMU, TCG, the kernel of scripts/vm-run.sh) sees them as
# /dev/vda and /dev/vdb; it checks the serial numbers, queue counts and the
# read-only flag, mounts both, checks every file's SHA-256, writes a file on
# vda, trims it, syncs and powers off. The device processes must outlive
# the VM: a second VM connects to the same sockets, finds the written file
# and the hashes again, and a write to vdb still fails. Then `lazyblk list`
# shows both devices with fetched bytes and `lazyblk del --vhost-user-blk`
# stops them.
#
#   scripts/vhost-user-test.sh [--timeout SECS]
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

timeout_secs=300
while (($#)); do
    case $1 in
    --timeout) timeout_secs=${2:?--timeout needs SECS}; shift 2 ;;
    *) die "unknown option $1 (usage: scripts/vhost-user-test.sh [--timeout SECS])" ;;
    esac
done
for cmd in umoci jq sha256sum qemu-system-x86_64; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is missing (run scripts/install-deps.sh)"
done

note "cargo build --bin lazyblk"
cargo build --quiet --bin lazyblk || die "cargo build failed"
target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
bin=$target/debug/lazyblk

work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-vhost-test.XXXXXX")
export LAZYBLK_RUN_DIR=$work/run
cleanup() {
    local rc=$?
    # Every device this test started, whatever state it is in.
    "$bin" del --all --force >/dev/null 2>&1 || true
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

note "a two-layer OCI image"
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:t"
umoci unpack --image "$layout:t" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs/data/small" "$rootfs/etc"
echo "base layer" >"$rootfs/etc/release"
for i in 1 2 3 4 5 6; do
    head -c $((i * 37 * 1024 + 11)) /dev/urandom >"$rootfs/data/small/f$i"
done
umoci repack --image "$layout:t" "$work/bundle"
head -c 6M /dev/urandom >"$rootfs/data/large.bin"
echo "app layer" >"$rootfs/etc/release"
rm "$rootfs/data/small/f6"
umoci repack --image "$layout:t" "$work/bundle"
(cd "$rootfs" && find data etc -type f | LC_ALL=C sort | xargs sha256sum) >"$work/sums"
rm -rf "$work/bundle"

note "push and serve it on two vhost-user sockets"
"$bin" keygen --out "$work/key" >/dev/null
"$bin" push "oci:$layout:t" --store "$work/store" --key "$work/key" --name vmdisk \
    --free-space 16M >/dev/null
common=(--store "$work/store" --key "$work/key" --name vmdisk)
"$bin" add "${common[@]}" --cache-dir "$work/cache-rw" --vhost-user-blk "$work/rw.sock" --queues 2
"$bin" add "${common[@]}" --cache-dir "$work/cache-ro" --vhost-user-blk "$work/ro.sock" --read-only

# What the guest runs: PHASE 1 checks and writes, PHASE 2 checks what 1 wrote.
cat >"$work/guest" <<'EOF'
#!/bin/sh
set -e
phase=$1
fail() { echo "guest: $*"; exit 1; }
[ "$(cat /sys/block/vda/serial)" = vmdisk ] || fail "vda serial is '$(cat /sys/block/vda/serial)'"
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || fail "vda has $(ls /sys/block/vda/mq | wc -l) queues, not 2"
[ "$(cat /sys/block/vda/ro)" = 0 ] || fail "vda is read-only"
[ "$(cat /sys/block/vdb/ro)" = 1 ] || fail "vdb is not read-only"
[ "$(cat /sys/block/vda/queue/discard_max_bytes)" != 0 ] || fail "vda offers no discard"
mkdir -p /mnt/rw /mnt/ro
mount /dev/vda /mnt/rw
mount -o ro,noload /dev/vdb /mnt/ro
(cd /mnt/rw && sha256sum -c -s /vm/sums) || fail "hashes differ on vda"
(cd /mnt/ro && sha256sum -c -s /vm/sums) || fail "hashes differ on vdb"
[ ! -e /mnt/rw/data/small/f6 ] || fail "a file the top layer deleted is there"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then
    fail "a write to the read-only vdb succeeded"
fi
if [ "$phase" = 1 ]; then
    head -c 3000000 /dev/urandom >/mnt/rw/written
    sha256sum /mnt/rw/written | cut -d' ' -f1 >/mnt/rw/written.sum
    rm /mnt/rw/data/large.bin
    sync
    fstrim -v /mnt/rw || fail "fstrim failed"
else
    [ -e /mnt/rw/written ] || fail "the first VM's file is gone"
    [ "$(sha256sum /mnt/rw/written | cut -d' ' -f1)" = "$(cat /mnt/rw/written.sum)" ] ||
        fail "the first VM's file changed"
    [ ! -e /mnt/rw/data/large.bin ] || fail "the first VM's delete is undone"
fi
umount /mnt/rw /mnt/ro
echo "guest: phase $phase ok"
EOF
chmod 755 "$work/guest"
grep -v ' data/large.bin$' "$work/sums" >"$work/sums-after"

mem=512
boot() {
    local phase=$1 sums=$2
    scripts/vm-run.sh --timeout "$timeout_secs" --mem "$mem" \
        --add "$work/guest:/vm/guest" --add "$sums:/vm/sums" \
        --qemu-arg -object --qemu-arg "memory-backend-memfd,id=mem,size=${mem}M,share=on" \
        --qemu-arg -numa --qemu-arg node,memdev=mem \
        --qemu-arg -chardev --qemu-arg "socket,id=rw,path=$work/rw.sock" \
        --qemu-arg -device --qemu-arg vhost-user-blk-pci,chardev=rw,num-queues=2 \
        --qemu-arg -chardev --qemu-arg "socket,id=ro,path=$work/ro.sock" \
        --qemu-arg -device --qemu-arg vhost-user-blk-pci,chardev=ro,num-queues=1 \
        -- guest "$phase"
}

note "first VM"
boot 1 "$work/sums" || die "the first VM failed"
note "second VM, same device processes"
boot 2 "$work/sums-after" || die "the second VM failed"

"$bin" list --json >"$work/list.json"
live=$(jq '[.[] | select(.frontend == "vhost-user-blk" and .state == "live")] | length' "$work/list.json")
((live == 2)) || die "lazyblk list shows $live live vhost-user-blk devices, not 2: $(cat "$work/list.json")"
fetched=$(jq '[.[] | .stats.bytes_fetched] | min' "$work/list.json")
((fetched > 0)) || die "a device fetched nothing: $(cat "$work/list.json")"
for sock in rw ro; do
    "$bin" del --vhost-user-blk "$work/$sock.sock"
    [[ ! -e $work/$sock.sock ]] || die "$sock.sock is still there after del"
done
live=$("$bin" list --json | jq length)
((live == 0)) || die "$live devices left after del"
note "vhost-user-blk: two VMs served one after the other, reads, writes, trim and read-only checked"
