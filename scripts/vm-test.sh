#!/usr/bin/env bash
# Runs the ublk integration tests (tests/ublk.rs) on a real ublk kernel: builds
# the test executable and the lazyblk binary, then runs the tests inside the
# VM of scripts/vm-run.sh. On hosts the ublk tests are #[ignore]d; here they
# run with --ignored, one at a time. Fails on any test failure, on a VM
# timeout, and when no test ran. Builds with the release profile: under
# emulation a debug build ran the same test 6x slower, far more than the
# build costs (--debug to build without optimisation). The kernel is
# LAZYBLK_VM_SUITE's (see scripts/vm-run.sh).
#
#   scripts/vm-test.sh [--timeout SECS] [--mem MIB] [--debug]
#                      [--add HOSTPATH[:GUESTPATH]]... [-- LIBTEST-ARGS...]
#   scripts/vm-test.sh --self-check [--timeout SECS] [--mem MIB]
#
# LIBTEST-ARGS go to the test executable after `--ignored --test-threads=1`,
# e.g. `-- --exact recover_after_sigkill` runs one test. --self-check builds
# nothing: it checks the VM itself (ublk control device, a loop device under
# fio, mkfs.ext4 + e2fsck) and prints the loop device's fio figures.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/vm.sh
. "$REPO_ROOT/scripts/lib/vm.sh"
cd "$REPO_ROOT"

usage() {
    sed -n '11,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,3\}//' >&2
    exit "${1:-2}"
}

timeout_secs=${LAZYBLK_VM_TIMEOUT:-1200}
mem_mib=${LAZYBLK_VM_MEM:-2048}
profile=(--release)
self_check=
vm_args=()
while (($#)); do
    case $1 in
    --timeout) timeout_secs=${2:?--timeout needs SECS}; shift 2 ;;
    --mem) mem_mib=${2:?--mem needs MIB}; shift 2 ;;
    --debug) profile=(); shift ;;
    --add) vm_args+=(--add "${2:?--add needs HOSTPATH[:GUESTPATH]}"); shift 2 ;;
    --self-check) self_check=1; shift ;;
    --) shift; break ;;
    -h | --help) usage 0 ;;
    *) printf 'vm-test: unknown option %s\n' "$1" >&2; usage ;;
    esac
done
vm_args+=(--timeout "$timeout_secs" --mem "$mem_mib")
work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-vm-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ -n $self_check ]]; then
    cat >"$work/self-check" <<'EOF'
#!/bin/sh
# Each step must succeed; fio prints IOPS and bandwidth in its terse line.
set -e
echo "self-check: /init reached at $(cut -d' ' -f1 /proc/uptime) s of uptime"
[ -c /dev/ublk-control ] || { echo "self-check: no /dev/ublk-control after insmod ublk_drv"; exit 1; }
grep -qw ext4 /proc/filesystems || { echo "self-check: the kernel has no ext4"; exit 1; }
truncate -s 256M /tmp/loop.img
dev=$(losetup -f)
losetup "$dev" /tmp/loop.img
for job in "randread 4k 32 10" "read 1M 8 5"; do
    set -- $job
    fio --name=loop --filename="$dev" --ioengine=io_uring --direct=1 --rw=$1 --bs=$2 \
        --iodepth=$3 --time_based --runtime=$4 --output-format=terse --terse-version=3 |
        awk -F';' -v j="$1 $2 QD$3" '{ printf "self-check: loop fio %s: %d IOPS, %.1f MiB/s\n", j, $8, $7 / 1024 }'
done
losetup -d "$dev"
mkdir -p /tmp/tree/sub
for i in 1 2 3; do head -c 300000 /dev/urandom >/tmp/tree/sub/f$i; done
mkfs.ext4 -q -F -d /tmp/tree /tmp/fs.img 64M
e2fsck -fn /tmp/fs.img >/dev/null
mkdir -p /mnt
mount -o loop,ro /tmp/fs.img /mnt
for i in 1 2 3; do cmp /mnt/sub/f$i /tmp/tree/sub/f$i; done
umount /mnt
echo "self-check: ok at $(cut -d' ' -f1 /proc/uptime) s of uptime"
EOF
    chmod 755 "$work/self-check"
    status=0
    scripts/vm-run.sh "${vm_args[@]}" --add "$work/self-check" -- self-check || status=$?
    exit "$status"
fi

target=ublk
[[ -f tests/$target.rs ]] ||
    die "tests/$target.rs is missing: there is no ublk test target to run in the VM yet"
command -v jq >/dev/null 2>&1 || die "jq is missing (run scripts/install-deps.sh)"

note "building the $target test executable and the lazyblk binary"
cargo test --no-run --test "$target" "${profile[@]}" --message-format=json-render-diagnostics \
    >"$work/build.json" || die "cargo test --no-run --test $target failed"
test_exe=$(jq -r --arg t "$target" \
    'select(.reason == "compiler-artifact" and .target.name == $t and .profile.test) | .executable' \
    "$work/build.json" | tail -n1)
bin=$(jq -r \
    'select(.reason == "compiler-artifact" and .target.name == "lazyblk" and (.target.kind | index("bin"))) | .executable' \
    "$work/build.json" | tail -n1)
[[ -x $test_exe ]] || die "cargo named no test executable for --test $target"
[[ -x $bin ]] || die "cargo named no lazyblk binary while building --test $target"

# Cargo runs a test executable from the package root and sets
# CARGO_MANIFEST_DIR to it. The guest gets the tests/ tree at a fixed path
# rather than the host's: a checkout under /tmp would vanish beneath the
# guest's tmpfs. Paths compiled in (env!) still name the host: the binary
# comes from LAZYBLK_BIN instead of CARGO_BIN_EXE_lazyblk.
guest_pkg=/vm/package
log=$work/vm.log
set +e
scripts/vm-run.sh "${vm_args[@]}" \
    --add "$test_exe:/vm/$target-tests" --add "$bin:/vm/lazyblk" \
    --add "$REPO_ROOT/tests:$guest_pkg/tests" --cwd "$guest_pkg" \
    --env LAZYBLK_BIN=/vm/lazyblk --env CARGO_MANIFEST_DIR="$guest_pkg" \
    -- "$target-tests" --ignored --test-threads=1 "$@" | tee "$log"
status=${PIPESTATUS[0]}
set -e

summary=$(grep -E '^test result: ' "$log" | tail -n1 || true)
printf '\n'
if ((status == 124 || status == 125)); then
    die "the VM did not finish the tests (see above)${summary:+; last summary: $summary}"
fi
[[ -n $summary ]] || die "the test executable printed no summary (exit $status)"
grep -qE '^running 0 tests$' "$log" && die "no test ran: $summary"
note "$summary (suite $VM_SUITE, kernel $(vm_kernel_version))"
((status == 0)) || die "tests failed in the VM (exit $status)"
