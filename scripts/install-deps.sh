#!/usr/bin/env bash
# Installs, with apt, the system tools that the tests, benchmarks and demo
# need. Idempotent: when everything is already present it touches nothing
# (no `apt-get update`), so repeated runs cost a fraction of a second.
set -euo pipefail

# "command package" pairs: a tool is present when the command is on PATH.
# Most of these live in sbin, which a non-login root shell may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
tools=(
    "fusermount3 fuse3"      # fuser mounts through it
    "mkfs.ext4 e2fsprogs"    # sample images, e2fsck in tests
    "e2fsck e2fsprogs"
    "fio fio"                # device benchmarks
    "openssl openssl"        # the crypto bound in bench-crypto.sh
    "losetup util-linux"     # loop devices over FUSE files and images
    "findmnt util-linux"
    "mountpoint util-linux"
    "mount mount"
    "umount mount"
    "modprobe kmod"          # loading loop/fuse where they are modules
    "jq jq"                  # reading --json output in scripts
    "time time"              # /usr/bin/time for CPU time in benchmarks
    "qemu-system-x86_64 qemu-system-x86"  # the ublk test VM (scripts/vm-run.sh)
    "cpio cpio"              # packs the VM's initramfs
    "xz xz-utils"            # unpacks the kernel modules for busybox insmod
    "dpkg-deb dpkg"          # unpacks the VM's kernel package
    "modinfo kmod"           # the VM's modules' dependencies (scripts/lib/vm.sh)
    "skopeo skopeo"          # image copies between layouts, archives, registries
    "umoci umoci"            # OCI layouts built from directories
    "docker-registry docker-registry" # a loopback registry for source tests
    "mkfifo coreutils"
    "setfattr attr"          # xattrs in the OCI test layouts
    "bsdtar libarchive-tools" # LIBARCHIVE.xattr records in the layer tests
    "tar tar"                # GNU tar sparse members in the layer tests
    "python3 python3"        # installs SeaweedFS (scripts/lib/seaweedfs.sh), finds free ports
    "curl curl"              # readiness checks of the SeaweedFS test cluster
    "wrk wrk"                # load for the chunk server benchmark (bench-http.sh)
    "nginx nginx"            # the chunk server benchmark's baseline
    "qemu-img qemu-utils"    # NBD clients in the NBD tests (qemu-img, qemu-io)
    "qemu-io qemu-utils"
    "nbdinfo libnbd-bin"     # NBD clients in the NBD tests (nbdinfo, nbdcopy)
    "nbdcopy libnbd-bin"
    "nbdkit nbdkit"          # the NBD benchmark's baseline (curl plugin, cache filter)
    "debootstrap debootstrap" # the image corpus and the VM boot benchmark's rootfs
    "pip3 python3-pip"       # the corpus's Python packages (make-corpus.sh)
)
# Packages with no command of their own, checked through dpkg.
libraries=(
    libclang-dev             # bindgen for the ublk bindings
    busybox-static           # the VM's userland (replaces a dynamic busybox)
    python3-venv             # the virtualenv SeaweedFS is installed into
)

missing=()
for pair in "${tools[@]}"; do
    read -r cmd pkg <<<"$pair"
    # `time` is a shell keyword, so look for the binary itself.
    if [[ $cmd == time ]]; then
        [[ -x /usr/bin/time ]] || missing+=("$pkg")
    elif ! command -v "$cmd" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done
for pkg in "${libraries[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    echo "install-deps: all system dependencies present"
    exit 0
fi

# One package can stand for several commands; install each once.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps: installing ${missing[*]}"
if ((EUID != 0)); then
    echo "install-deps: missing packages (${missing[*]}) and not root; run as root or install them by hand" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing packages (${missing[*]}) and no apt-get; install them by hand" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
