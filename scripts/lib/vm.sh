# shellcheck shell=bash
# The VM's kernel: Debian trixie's cloud kernel (6.12, ext4 and io_uring built
# in, ublk_drv and loop as modules), fetched with apt through a private
# sources list and lists directory so the host's apt setup is never touched.
# Source it after common.sh; it sets no options.
#
# Cache layout, outside the checkout so fresh clones reuse it:
#   $VM_CACHE/apt/          private sources list, lists, downloaded .deb
#   $VM_CACHE/kernel/       vmlinuz, ublk_drv.ko, loop.ko, VERSION
#   $VM_CACHE/base-*.cpio   the initramfs's static part (see vm-run.sh)

VM_CACHE=${LAZYBLK_VM_CACHE:-$HOME/.cache/lazyblk/vm}
VM_KERNEL_DIR=$VM_CACHE/kernel
VM_SUITE=${LAZYBLK_VM_SUITE:-trixie}
VM_MIRROR=${LAZYBLK_VM_MIRROR:-http://deb.debian.org/debian}
# Modules inside the kernel package, relative to lib/modules/VERSION/.
VM_MODULES=(
    kernel/drivers/block/ublk_drv.ko.xz
    kernel/drivers/block/loop.ko.xz
)

# Runs apt-get or apt-cache against the private configuration only.
vm_apt() {
    local tool=$1
    shift
    local apt=$VM_CACHE/apt
    "$tool" \
        -o Dir::Etc::SourceList="$apt/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$apt/lists" \
        -o Dir::Cache::Archives="$apt/archives" \
        -o Dir::Cache::pkgcache="" -o Dir::Cache::srcpkgcache="" \
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root \
        "$@"
}

# Makes sure vmlinuz and the decompressed modules are in $VM_KERNEL_DIR.
# Quick (no network) once they are there; set LAZYBLK_VM_REFRESH=1 to look
# for a newer kernel package.
vm_fetch_kernel() {
    local k=$VM_KERNEL_DIR
    if [[ -z ${LAZYBLK_VM_REFRESH:-} && -s $k/VERSION && -s $k/vmlinuz ]] &&
        [[ -s $k/ublk_drv.ko && -s $k/loop.ko ]]; then
        return 0
    fi
    local cmd
    for cmd in apt-get apt-cache dpkg-deb xz; do
        command -v "$cmd" >/dev/null 2>&1 || die "fetching the VM kernel needs $cmd"
    done
    local apt=$VM_CACHE/apt
    mkdir -p "$apt/lists/partial" "$apt/archives/partial"
    printf 'deb %s %s main\n' "$VM_MIRROR" "$VM_SUITE" >"$apt/sources.list"
    note "updating the private $VM_SUITE package lists in $apt"
    vm_apt apt-get -qq update >&2 || die "apt-get update for $VM_SUITE failed (network to $VM_MIRROR?)"

    # The metapackage depends on exactly one versioned image package.
    local pkg
    pkg=$(vm_apt apt-cache depends linux-image-cloud-amd64 |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64(-unsigned)?$/ { print $2; exit }')
    [[ -n $pkg ]] || die "apt-cache depends linux-image-cloud-amd64 named no versioned kernel package"
    local version
    version=$(vm_apt apt-cache show --no-all-versions "$pkg" | awk '$1 == "Version:" { print $2; exit }')
    note "kernel package: $pkg $version"
    # A refresh that finds the same package keeps the cache as it is.
    if [[ -s $k/VERSION && $(sed -n 2p "$k/VERSION") == "${pkg}_${version//:/%3a}_amd64.deb" ]]; then
        note "kernel unchanged in $k"
        return 0
    fi
    local deb
    deb=$(cd "$apt/archives" && vm_apt apt-get -qq download "$pkg" >&2 && ls -t "$pkg"_*.deb | head -n1) ||
        die "apt-get download $pkg failed"

    local tmp
    tmp=$(mktemp -d "$VM_CACHE/extract.XXXXXX")
    dpkg-deb -x "$apt/archives/$deb" "$tmp" || { rm -rf "$tmp"; die "dpkg-deb -x $deb failed"; }
    local vmlinuz
    vmlinuz=$(ls "$tmp"/boot/vmlinuz-* 2>/dev/null | head -n1)
    [[ -n $vmlinuz ]] || { rm -rf "$tmp"; die "$deb holds no boot/vmlinuz-*"; }
    local release=${vmlinuz##*/vmlinuz-} moddir
    for moddir in "$tmp"/lib/modules/"$release" "$tmp"/usr/lib/modules/"$release" ""; do
        [[ -d $moddir ]] && break
    done
    [[ -n $moddir ]] || { rm -rf "$tmp"; die "$deb holds no modules directory for $release"; }
    local staged=$tmp/staged
    mkdir -p "$staged"
    cp "$vmlinuz" "$staged/vmlinuz"
    local mod name
    for mod in "${VM_MODULES[@]}"; do
        name=${mod##*/}
        [[ -f $moddir/$mod ]] || { rm -rf "$tmp"; die "$deb holds no $mod for $release"; }
        # busybox insmod loads plain ELF objects only.
        xz -dc "$moddir/$mod" >"$staged/${name%.xz}"
    done
    printf '%s\n%s\n' "$release" "$deb" >"$staged/VERSION"
    # Swap in whole so a half-extracted kernel is never taken as cached.
    rm -rf "$k"
    mv "$staged" "$k"
    rm -rf "$tmp" "$apt/archives/$deb"
    note "kernel $release ready in $k"
}

# Prints the cached kernel's version (first line of VERSION).
vm_kernel_version() {
    head -n1 "$VM_KERNEL_DIR/VERSION"
}
