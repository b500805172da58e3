#!/usr/bin/env bash
# Runs one command inside a throwaway VM on a Debian cloud kernel (with
# ublk_drv, loop and virtio_blk loaded), and exits with that command's exit
# code. The guest has no network card and no disk unless --qemu-arg gives
# it one: everything it needs is in its initramfs, /tmp is a tmpfs.
#
#   scripts/vm-run.sh [--timeout SECS] [--mem MIB] [--cwd GUESTDIR]
#                     [--env NAME=VALUE]... [--add HOSTPATH[:GUESTPATH]]...
#                     [--qemu-arg ARG]... -- COMMAND [ARGS...]
#
# --add copies a file or directory into the guest, at GUESTPATH or else at
# /vm/BASENAME (/vm is on PATH and is the default working directory); not
# under /tmp, /run, /dev, /proc or /sys, which the guest mounts over. Every
# ELF file added gets the shared libraries `ldd` lists. The guest always has
# busybox, fio, mkfs.ext4, e2fsck, debugfs, losetup, mount, umount, findmnt
# and fusermount3. --qemu-arg passes one more argument to QEMU (e.g. the
# -chardev and -device of a vhost-user disk, which the guest sees as
# /dev/vdX; -m is --mem).
#
# The console streams to stdout. Exit status: the guest command's, or 124
# when the VM ran past --timeout, or 125 when the guest ended without
# reporting (kernel panic, /init failure) or the VM could not start.
# Kernel: LAZYBLK_VM_SUITE (trixie: 6.12, the default; trixie-backports:
# 7.x). Cache: $LAZYBLK_VM_CACHE (default ~/.cache/lazyblk/vm).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/vm.sh
. "$REPO_ROOT/scripts/lib/vm.sh"

usage() {
    sed -n '7,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,3\}//' >&2
    exit "${1:-125}"
}
fail() {
    printf 'vm-run: %s\n' "$*" >&2
    exit 125
}

timeout_secs=600
mem_mib=2048
cwd=/vm
adds=()
envs=()
qemu_args=()
while (($#)); do
    case $1 in
    --timeout) timeout_secs=${2:?--timeout needs SECS}; shift 2 ;;
    --mem) mem_mib=${2:?--mem needs MIB}; shift 2 ;;
    --cwd) cwd=${2:?--cwd needs a guest directory}; shift 2 ;;
    --add) adds+=("${2:?--add needs HOSTPATH[:GUESTPATH]}"); shift 2 ;;
    --env) envs+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
    --qemu-arg) qemu_args+=("${2:?--qemu-arg needs an argument}"); shift 2 ;;
    --) shift; break ;;
    -h | --help) usage 0 ;;
    *) printf 'vm-run: unknown option %s\n' "$1" >&2; usage ;;
    esac
done
(($#)) || { printf 'vm-run: no command given after --\n' >&2; usage; }
[[ $timeout_secs =~ ^[1-9][0-9]*$ ]] || fail "--timeout wants a positive number of seconds, not '$timeout_secs'"
if ! [[ $mem_mib =~ ^[1-9][0-9]*$ ]] || ((mem_mib < 256)); then
    fail "--mem wants at least 256 (MiB), not '$mem_mib'"
fi
[[ $cwd == /* ]] || fail "--cwd wants an absolute guest path, not '$cwd'"
for e in "${envs[@]}"; do
    [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || fail "--env wants NAME=VALUE, not '$e'"
done
for cmd in qemu-system-x86_64 busybox cpio ldd timeout; do
    command -v "$cmd" >/dev/null 2>&1 || fail "$cmd is missing (run scripts/install-deps.sh)"
done

vm_fetch_kernel
kernel=$VM_KERNEL_DIR/vmlinuz
note "kernel $(vm_kernel_version) ($VM_SUITE)"

# Single-quotes a word for the guest's busybox sh.
shq() {
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}

# Copies the libraries `ldd` names for one ELF file into ROOT, at the paths
# ldd resolved them to (the loader searches those same directories).
# Non-ELF files and static binaries need nothing.
add_libs() {
    local root=$1 file=$2 line lib
    [[ $(head -c4 "$file" 2>/dev/null | od -An -c | tr -d ' ') == 177ELF ]] || return 0
    while read -r line; do
        case $line in
        *"=> not found"*) fail "ldd $file: ${line%% =>*} not found on this host" ;;
        *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
        /*) lib=${line%% (*} ;;
        *) continue ;;
        esac
        [[ -e $root$lib ]] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(ldd "$file" 2>/dev/null || true)
}

# Copies a file or directory into ROOT at GUESTPATH, with its ELF libraries.
add_path() {
    local root=$1 host=$2 guest=$3 f
    mkdir -p "$root$(dirname "$guest")"
    cp -a -L "$host" "$root$guest" || fail "cannot copy $host into the guest"
    if [[ -d $host ]]; then
        while IFS= read -r -d '' f; do add_libs "$root" "$f"; done < <(find "$root$guest" -type f -print0)
    else
        add_libs "$root" "$root$guest"
    fi
}

# The static part of the initramfs (busybox and its applets, the test tools
# with their libraries), cached as one cpio archive keyed on what went into
# it. It holds nothing of the kernel, so every kernel shares it; the modules
# (a few hundred KiB) go in with each run.
base_tools=(fio mkfs.ext4 mke2fs e2fsck debugfs losetup mount umount findmnt fusermount3)
base_files=(/etc/mke2fs.conf)
base_cpio() {
    local paths=() t p
    for t in "${base_tools[@]}"; do
        p=$(command -v "$t") || fail "$t is missing (run scripts/install-deps.sh)"
        paths+=("$(readlink -f "$p")")
    done
    local key
    key=$({
        sed -n '/^base_cpio()/,/^}/p' "${BASH_SOURCE[0]}"
        printf '%s\n' "${base_tools[@]}"
        stat -L -c '%n %s %Y' "$(command -v busybox)" "${paths[@]}" "${base_files[@]}"
    } | sha256sum | cut -c1-16)
    local out=$VM_CACHE/base-$key.cpio
    if [[ -s $out ]]; then
        touch "$out"
        printf '%s\n' "$out"
        return
    fi
    local root
    root=$(mktemp -d "$VM_CACHE/base.XXXXXX")
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,vm}
    cp -L "$(command -v busybox)" "$root/bin/busybox"
    add_libs "$root" "$root/bin/busybox"
    local applet
    # Every applet as a link in /bin; real tools in /usr come first on PATH.
    for applet in $(busybox --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    for t in "${base_tools[@]}"; do
        p=$(command -v "$t")
        mkdir -p "$root$(dirname "$p")"
        cp -L "$p" "$root$p"
        add_libs "$root" "$root$p"
    done
    for p in "${base_files[@]}"; do
        [[ -e $p ]] && cp -L "$p" "$root$p"
    done
    ln -s /proc/mounts "$root/etc/mtab"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    # Runs may build at once (and checkouts of other versions of this
    # script share the cache): each writes its own file and renames it.
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$root.cpio" ||
        fail "cpio of the base initramfs failed"
    mv "$root.cpio" "$out"
    rm -rf "$root"
    # Bases of other tool versions or recipes, unused for two days.
    find "$VM_CACHE" -maxdepth 1 -name 'base-*.cpio' -mtime +2 -delete
    printf '%s\n' "$out"
}

mkdir -p "$VM_CACHE"
base=$(base_cpio)

work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/vm" "$root/lib/modules"
cp "$VM_KERNEL_DIR"/*.ko "$VM_KERNEL_DIR/modules.load" "$root/lib/modules/"
for a in "${adds[@]}"; do
    if [[ $a =~ ^(.+):(/.*)$ ]]; then
        host=${BASH_REMATCH[1]} guest=${BASH_REMATCH[2]}
    else
        host=$a guest=/vm/$(basename "$a")
    fi
    [[ -e $host ]] || fail "--add $a: $host does not exist"
    # /init mounts file systems there before the command runs, hiding
    # whatever the initramfs put in them.
    top=${guest#/} top=/${top%%/*}
    case $top in
    /tmp | /run | /dev | /proc | /sys)
        fail "--add $a: the guest mounts over $top; choose a guest path elsewhere (e.g. under /vm)" ;;
    esac
    add_path "$root" "$host" "$guest"
done

# The command, its environment and the boot steps, as the guest's /init.
{
    printf 'LAZYBLK_VM_CWD=%s\n' "$(shq "$cwd")"
    printf 'LAZYBLK_VM_TMP_MIB=%s\n' $((mem_mib * 3 / 4))
    for e in "${envs[@]}"; do
        printf 'export %s=%s\n' "${e%%=*}" "$(shq "${e#*=}")"
    done
    printf 'set --'
    for w in "$@"; do printf ' %s' "$(shq "$w")"; done
    printf '\n'
} >"$root/vm-command"
cat >"$root/init" <<'EOF'
#!/bin/sh
# PID 1: set up the guest, run the command, report its exit code, power off.
export PATH=/vm:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp LAZYBLK_RUN_DIR=/run/lazyblk RUST_BACKTRACE=1
report() {
    echo
    echo "LAZYBLK-VM-EXIT $1"
    sync
    poweroff -f
}
. /vm-command
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=${LAZYBLK_VM_TMP_MIB}m,mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lazyblk
ifconfig lo 127.0.0.1 netmask 255.0.0.0 up
# modules.load lists dependencies before the modules that need them.
for m in $(cat /lib/modules/modules.load); do
    insmod /lib/modules/$m.ko || { echo "vm-init: insmod $m.ko failed"; report 125; }
done
cd "$LAZYBLK_VM_CWD" || { echo "vm-init: no directory $LAZYBLK_VM_CWD"; report 125; }
echo "LAZYBLK-VM-START"
"$@"
report $?
EOF
chmod 755 "$root/init"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$work/extra.cpio" ||
    fail "cpio of the initramfs failed"
# The kernel unpacks concatenated archives in turn, later files winning;
# each must start 4-byte aligned, and cpio pads archives to 512 bytes.
cat "$base" "$work/extra.cpio" >"$work/initrd"

log=$work/console.log
trap 'kill "${qemu_pid:-}" 2>/dev/null || true; wait "${qemu_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# boot: runs the VM once, streaming its console to stdout and $log; sets
# qemu_status.
boot() {
    rm -f "$work/console"
    mkfifo "$work/console"
    # QEMU runs in the background so that an interrupted or terminated run
    # can stop it: timeout puts it in a process group of its own, out of
    # reach of the terminal's Ctrl-C, and passes on the signal it is sent.
    timeout --kill-after=10 "$timeout_secs" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu max -smp 2 -m "$mem_mib" \
        -nographic -no-reboot -nic none \
        -kernel "$kernel" -initrd "$work/initrd" \
        -append "console=ttyS0 quiet panic=-1" \
        "${qemu_args[@]}" \
        </dev/null >"$work/console" 2>&1 &
    qemu_pid=$!
    # The serial console ends lines with CR LF, and the firmware sends
    # terminal resets that would clear the caller's screen. In the
    # background too: bash runs a trap only once the foreground command is
    # done, but `wait` returns as soon as a signal arrives.
    sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' <"$work/console" | tee "$log" &
    reader_pid=$!
    set +e
    wait "$qemu_pid"
    qemu_status=$?
    wait "$reader_pid"
    set -e
}
# Multi-threaded TCG now and then crashes the guest kernel while it patches
# its own code during boot (an int3 oops in early timer code), before /init
# starts anything. Such a boot is retried; a panic once the command has
# started is a result and is reported.
for attempt in 1 2 3; do
    boot
    if grep -q '^LAZYBLK-VM-START' "$log" || ! grep -q 'Kernel panic' "$log" ||
        ((qemu_status == 124 || qemu_status == 137)); then
        break
    fi
    printf 'vm-run: the guest kernel panicked while booting (attempt %s of 3)\n' "$attempt" >&2
done
if ((qemu_status == 124 || qemu_status == 137)); then
    printf 'vm-run: timed out after %s s (--timeout); the VM was killed\n' "$timeout_secs" >&2
    exit 124
fi
code=$(grep -E '^LAZYBLK-VM-EXIT [0-9]+$' "$log" | tail -n1 | cut -d' ' -f2 || true)
if [[ -z $code ]]; then
    if grep -q 'Kernel panic' "$log"; then
        printf 'vm-run: the guest kernel panicked before the command reported (see the console above)\n' >&2
    else
        printf 'vm-run: the VM ended (qemu status %s) without the LAZYBLK-VM-EXIT line\n' "$qemu_status" >&2
    fi
    exit 125
fi
exit "$code"
