# shellcheck shell=bash
# The VM's kernel: a Debian cloud kernel, from the suite LAZYBLK_VM_SUITE
# (trixie by default: 6.12; trixie-backports: the current 7.x). Fetched with
# apt through a private sources list and lists directory, so the host's apt
# setup is never touched. Source it after common.sh; it sets no options.
#
# Cache layout, outside the checkout so fresh clones reuse it; one kernel per
# suite, so switching suites never fetches again:
#   $VM_CACHE/apt-SUITE/     private sources list, lists, downloaded .deb
#   $VM_CACHE/kernel-SUITE/  vmlinuz, config, the modules as plain .ko,
#                            modules.load (insmod order), VERSION
#   $VM_CACHE/base-*.cpio    the initramfs's kernel-independent part (see
#                            vm-run.sh)

VM_CACHE=${LAZYBLK_VM_CACHE:-$HOME/.cache/lazyblk/vm}
VM_SUITE=${LAZYBLK_VM_SUITE:-trixie}
VM_MIRROR=${LAZYBLK_VM_MIRROR:-http://deb.debian.org/debian}
# The suite names directories in the cache.
[[ $VM_SUITE =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    die "LAZYBLK_VM_SUITE='$VM_SUITE' is not a Debian suite name"
VM_APT_DIR=$VM_CACHE/apt-$VM_SUITE
VM_KERNEL_DIR=$VM_CACHE/kernel-$VM_SUITE
# Modules the guest loads, by module name; their own dependencies are found
# from each module's `depends` field and loaded first. Everything else the
# tests use (ext4, io_uring, FUSE, tmpfs, virtio-pci) is built into both
# kernels; virtio_blk gives the guest the disks of vhost-user-blk tests.
VM_MODULES=(ublk_drv loop virtio_blk)

# Runs apt-get or apt-cache against the private configuration only.
vm_apt() {
    local tool=$1
    shift
    "$tool" \
        -o Dir::Etc::SourceList="$VM_APT_DIR/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$VM_APT_DIR/lists" \
        -o Dir::Cache::Archives="$VM_APT_DIR/archives" \
        -o Dir::Cache::pkgcache="" -o Dir::Cache::srcpkgcache="" \
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root \
        "$@"
}

# Whether $VM_KERNEL_DIR holds a complete kernel with every wanted module.
vm_kernel_cached() {
    local k=$VM_KERNEL_DIR m
    [[ -s $k/VERSION && -s $k/vmlinuz && -s $k/modules.load ]] || return 1
    for m in "${VM_MODULES[@]}"; do
        grep -qx "$m" "$k/modules.load" || return 1
    done
    while read -r m; do
        [[ -s $k/$m.ko ]] || return 1
    done <"$k/modules.load"
}

# Prints the first of its arguments that is a file (globs that matched
# nothing stay as they are and are no file); fails when none is.
vm_first_file() {
    local f
    for f in "$@"; do
        [[ -f $f ]] && { printf '%s\n' "$f"; return 0; }
    done
    return 1
}

# Decompresses module NAME and, before it, the modules it depends on, from
# MODDIR into STAGED, appending each name to STAGED/modules.load once.
vm_stage_module() {
    local moddir=$1 staged=$2 name=${3//-/_}
    grep -qx "$name" "$staged/modules.load" 2>/dev/null && return 0
    # `depends` and file names use - and _ alike for the same module.
    local file
    file=$(find "$moddir/kernel" -name "${name//_/[_-]}.ko*" | head -n1)
    [[ -n $file ]] || die "no module $name under $moddir/kernel"
    case $file in
    *.ko.xz) xz -dc "$file" ;;
    *.ko.zst) zstd -dcq "$file" ;;
    *.ko.gz) gzip -dc "$file" ;;
    *) cat "$file" ;;
    esac >"$staged/$name.ko" || die "cannot decompress $file"
    local deps dep
    deps=$(modinfo -F depends "$staged/$name.ko") || die "modinfo $file failed"
    for dep in ${deps//,/ }; do
        vm_stage_module "$moddir" "$staged" "$dep"
    done
    printf '%s\n' "$name" >>"$staged/modules.load"
}

# Makes sure vmlinuz and the decompressed modules are in $VM_KERNEL_DIR.
# Quick (no network) once they are there; set LAZYBLK_VM_REFRESH=1 to look
# for a newer kernel package.
vm_fetch_kernel() {
    local k=$VM_KERNEL_DIR
    if [[ -z ${LAZYBLK_VM_REFRESH:-} ]] && vm_kernel_cached; then
        return 0
    fi
    local cmd
    for cmd in apt-get apt-cache dpkg-deb xz modinfo; do
        command -v "$cmd" >/dev/null 2>&1 || die "fetching the VM kernel needs $cmd"
    done
    local apt=$VM_APT_DIR
    mkdir -p "$apt/lists/partial" "$apt/archives/partial"
    printf 'deb %s %s main\n' "$VM_MIRROR" "$VM_SUITE" >"$apt/sources.list"
    note "updating the private $VM_SUITE package lists in $apt"
    vm_apt apt-get -qq update >&2 || die "apt-get update for $VM_SUITE failed (network to $VM_MIRROR?)"

    # The metapackage depends on exactly one versioned image package.
    local pkg
    pkg=$(vm_apt apt-cache depends linux-image-cloud-amd64 |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64(-unsigned)?$/ { print $2; exit }')
    [[ -n $pkg ]] || die "apt-cache depends linux-image-cloud-amd64 named no versioned kernel package in $VM_SUITE"
    local version
    version=$(vm_apt apt-cache show --no-all-versions "$pkg" | awk '$1 == "Version:" { print $2; exit }')
    note "kernel package: $pkg $version"
    # A refresh that finds the same package keeps the cache as it is.
    if vm_kernel_cached && [[ $(sed -n 2p "$k/VERSION") == "${pkg}_${version//:/%3a}_amd64.deb" ]]; then
        note "kernel unchanged in $k"
        return 0
    fi
    # Older kernels ship everything in the image package; newer ones make it
    # a stub depending on linux-binary-REL (vmlinuz), linux-modules-REL and
    # linux-base-REL (config, System.map), all of the same version.
    local rel=${pkg#linux-image-}
    rel=${rel%-unsigned}
    local pkgs=("$pkg") dep
    while read -r dep; do
        pkgs+=("$dep")
    done < <(vm_apt apt-cache depends "$pkg" |
        awk -v rel="$rel" '$1 == "Depends:" && $2 !~ /^linux-image-/ {
            name = $2; if (sub(/^linux-[a-z]+-/, "", name) && name == rel) print $2 }')
    note "downloading ${pkgs[*]}"
    (cd "$apt/archives" && vm_apt apt-get -qq download "${pkgs[@]}" >&2) ||
        die "apt-get download ${pkgs[*]} failed"
    local tmp debs=() deb p
    tmp=$(mktemp -d "$VM_CACHE/extract.XXXXXX")
    for p in "${pkgs[@]}"; do
        deb=$(vm_apt apt-cache show --no-all-versions "$p" | awk '$1 == "Filename:" { print $2; exit }')
        deb=${deb##*/}
        [[ -n $deb && -f $apt/archives/$deb ]] || { rm -rf "$tmp"; die "apt-get download left no $p .deb"; }
        debs+=("$deb")
        dpkg-deb -x "$apt/archives/$deb" "$tmp/root" || { rm -rf "$tmp"; die "dpkg-deb -x $deb failed"; }
    done

    local vmlinuz release moddir
    vmlinuz=$(vm_first_file "$tmp"/root/boot/vmlinuz-* "$tmp"/root/{,usr/}lib/modules/*/vmlinuz) ||
        { rm -rf "$tmp"; die "${pkgs[*]} hold no boot/vmlinuz-* nor lib/modules/*/vmlinuz"; }
    case $vmlinuz in
    */boot/vmlinuz-*) release=${vmlinuz##*/vmlinuz-} ;;
    *) release=$(basename "$(dirname "$vmlinuz")") ;;
    esac
    for moddir in "$tmp"/root/lib/modules/"$release" "$tmp"/root/usr/lib/modules/"$release" ""; do
        [[ -d $moddir/kernel ]] && break
    done
    [[ -n $moddir ]] || { rm -rf "$tmp"; die "${pkgs[*]} hold no modules for $release"; }
    local staged=$tmp/staged
    mkdir -p "$staged"
    cp "$vmlinuz" "$staged/vmlinuz"
    local config
    if config=$(vm_first_file "$tmp"/root/boot/config-"$release" "$moddir/config"); then
        cp "$config" "$staged/config"
    fi
    local m
    for m in "${VM_MODULES[@]}"; do
        # die exits only the subshell; the status brings it out.
        (vm_stage_module "$moddir" "$staged" "$m") || { rm -rf "$tmp"; exit 1; }
    done
    printf '%s\n%s\n' "$release" "${debs[0]}" >"$staged/VERSION"
    # Swap in whole so a half-extracted kernel is never taken as cached.
    rm -rf "$k"
    mv "$staged" "$k"
    rm -rf "$tmp"
    for deb in "${debs[@]}"; do rm -f "$apt/archives/$deb"; done
    note "kernel $release ready in $k (modules: $(paste -sd' ' "$k/modules.load"))"
}

# Prints the cached kernel's version (first line of VERSION).
vm_kernel_version() {
    head -n1 "$VM_KERNEL_DIR/VERSION"
}
