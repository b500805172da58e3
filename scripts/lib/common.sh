# shellcheck shell=bash
# Shared helpers for the scripts in scripts/. Source it; it sets no options.

# A non-login shell (CI, sudo) may lack rustup's and sbin's directories.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/usr/local/sbin:/usr/sbin:/sbin"

# The repository root, whichever directory the script was started from.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

die() {
    printf '%s: %s\n' "$(basename "$0")" "$*" >&2
    exit 1
}

# Progress messages go to stderr, so stdout stays the Markdown report.
note() {
    printf '%s: %s\n' "$(basename "$0")" "$*" >&2
}

# Builds the release binary and prints its path (honours CARGO_TARGET_DIR).
build_release() {
    (cd "$REPO_ROOT" && cargo build --release --quiet) >&2 || die "cargo build --release failed"
    local target
    target=$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
    [[ -x $target/release/lazyblk ]] || die "no binary at $target/release/lazyblk after the build"
    printf '%s\n' "$target/release/lazyblk"
}

# Whether the binary implements a subcommand taking the given flag (a
# subcommand not written yet prints no help naming its flags).
has_subcommand() {
    local bin=$1 sub=$2 flag=$3
    "$bin" "$sub" --help 2>&1 | grep -q -- "$flag"
}

# Divides two numbers with awk; prints "n/a" when the divisor is zero.
ratio() {
    awk -v a="$1" -v b="$2" -v fmt="${3:-%.2f}" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf fmt "\n", a / b }'
}

# Loads loop and fuse where they are modules and makes sure their device
# nodes exist; dies with the reason when the kernel cannot provide them.
ensure_kernel_devices() {
    modprobe loop >/dev/null 2>&1 || true
    modprobe fuse >/dev/null 2>&1 || true
    # Minimal containers run a kernel with FUSE but no device node for it.
    if [[ ! -e /dev/fuse ]] && grep -qw fuse /proc/filesystems; then
        mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
    fi
    if [[ ! -e /dev/loop-control ]]; then
        mknod -m 0660 /dev/loop-control c 10 237 2>/dev/null || true
    fi
    [[ $EUID -eq 0 ]] || die "mounting filesystems and attaching loop devices needs root"
    [[ -c /dev/fuse ]] || die "/dev/fuse is missing: this kernel has no FUSE (CONFIG_FUSE_FS)"
    [[ -c /dev/loop-control ]] || die "/dev/loop-control is missing: this kernel has no loop driver (CONFIG_BLK_DEV_LOOP)"
    losetup -f >/dev/null 2>&1 || die "losetup cannot find a free loop device (none left, or the sandbox forbids it)"
    grep -qw ext4 /proc/filesystems || die "this kernel has no ext4"
}

# Empties and re-creates DIR as a script's work directory. A directory is
# only ever emptied if it is missing, empty, or carries the stamp this
# function leaves, so a mistyped LAZYBLK_*_DIR cannot wipe someone's data.
WORK_STAMP=.lazyblk-work-dir
claim_work_dir() {
    local dir=$1
    if [[ -d $dir && ! -e $dir/$WORK_STAMP ]] && [[ -n $(ls -A "$dir") ]]; then
        die "$dir exists, is not empty and was not made by these scripts; refusing to empty it"
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    : >"$dir/$WORK_STAMP"
}

# Removes a work directory made by claim_work_dir.
release_work_dir() {
    local dir=$1
    [[ -e $dir/$WORK_STAMP ]] && rm -rf "$dir"
    return 0
}

# Sets $work to $LAZYBLK_BENCH_DIR, or to a fresh directory under DIR named
# after PREFIX that is removed when the script exits.
bench_work_dir() {
    local dir=$1 prefix=$2
    work=${LAZYBLK_BENCH_DIR:-}
    # A directory named but not made yet is made, not a failure later on.
    [[ -n $work ]] && mkdir -p "$work"
    if [[ -z $work ]]; then
        work=$(mktemp -d "$dir/$prefix.XXXXXX")
        # shellcheck disable=SC2064 # expanded now: $work is set
        trap "rm -rf '$work'" EXIT
    fi
}
