#!/usr/bin/env bash
# The test command: installs what the tests need, checks that the kernel can
# run them, then runs formatting, lint, doc and every test target. Exits
# non-zero on the first failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A non-login shell (CI) may lack rustup's and sbin's directories.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin:/usr/local/sbin:/usr/sbin:/sbin"
section() { printf '\n==== %s ====\n' "$*"; }
die() {
    printf 'test.sh: %s\n' "$*" >&2
    exit 1
}
started=$SECONDS

section "system dependencies"
scripts/install-deps.sh

section "kernel prerequisites (loop devices, FUSE)"
# Where loop and fuse are modules, load them; where they are built in,
# modprobe fails harmlessly and the checks below decide.
modprobe loop >/dev/null 2>&1 || true
modprobe fuse >/dev/null 2>&1 || true
# Minimal containers run a kernel with FUSE but no device node for it.
if [[ ! -e /dev/fuse ]] && grep -qw fuse /proc/filesystems; then
    mknod -m 0666 /dev/fuse c 10 229 || true
fi
if [[ ! -e /dev/loop-control ]]; then
    mknod -m 0660 /dev/loop-control c 10 237 2>/dev/null || true
fi
[[ $EUID -eq 0 ]] || die "the integration tests mount filesystems and need root"
[[ -c /dev/fuse ]] || die "/dev/fuse is missing: this kernel has no FUSE (CONFIG_FUSE_FS), so the FUSE frontend cannot be tested here"
[[ -c /dev/loop-control ]] || die "/dev/loop-control is missing: this kernel has no loop driver (CONFIG_BLK_DEV_LOOP), so images cannot be mounted here"
loopdev=$(losetup -f 2>/dev/null) ||
    die "losetup cannot allocate a loop device (no free device, or the sandbox forbids it)"
grep -qw ext4 /proc/filesystems ||
    die "this kernel has no ext4, which the integration tests mount"
echo "root, /dev/fuse, /dev/loop-control (next free: $loopdev), ext4: ok"

section "toolchain"
cargo --version || die "cargo is not on PATH"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing (rustup component add rustfmt)"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing (rustup component add clippy)"
rustc --version

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

section "cargo doc --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps

section "cargo test --all-targets"
# Bench targets run here too, each in a short smoke mode, so they stay
# working between benchmark runs.
cargo test --all-targets

section "done in $((SECONDS - started)) s"
