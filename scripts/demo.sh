#!/usr/bin/env bash
# The main job, end to end on one machine: build lazyblk, make a sample OCI
# image (two layers, with umoci), flatten and push it into a local chunk
# store in one command, attach it lazily (ublk where the kernel has it, FUSE
# + loop otherwise), run a program from the mounted filesystem and show how
# little of the image that fetched.
#
# Environment: LAZYBLK_DEMO_DIR (default /tmp/lazyblk-demo) is the work
# directory, emptied at the start; LAZYBLK_DEMO_KEEP=1 keeps it afterwards.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

demo_dir=${LAZYBLK_DEMO_DIR:-/tmp/lazyblk-demo}
step() { printf '\n== %s\n' "$*"; }

step "system dependencies and kernel support"
"$REPO_ROOT/scripts/install-deps.sh"
ensure_kernel_devices

step "cargo build --release"
bin=$(build_release)
echo "$bin"
for sub in "keygen --out" "push --free-space" "add --fuse" "del --fuse" "list --json"; do
    # shellcheck disable=SC2086 # "sub flag" splits on purpose
    has_subcommand "$bin" $sub || die "this build of lazyblk has no '${sub% *}' subcommand with ${sub#* }"
done

tree=$demo_dir/tree
layout=$demo_dir/layout
store=$demo_dir/store
key=$demo_dir/key
cache=$demo_dir/cache
mnt=$demo_dir/mnt
rootfs=$demo_dir/rootfs

ublk_id=""

# Unmounts and detaches what this demo (or an earlier run of it) left
# behind. Every step tolerates "not there", so it serves both before a run
# and in the trap.
teardown() {
    if mountpoint -q "$rootfs" 2>/dev/null; then
        umount "$rootfs" || umount -l "$rootfs" || true
    fi
    if [[ -n $ublk_id ]]; then
        "$bin" del -n "$ublk_id" || true
        ublk_id=""
    fi
    if mountpoint -q "$mnt" 2>/dev/null; then
        "$bin" del --fuse "$mnt" || fusermount3 -u -z "$mnt" || true
    fi
}

# Removes the work directory, but never through a live mount.
remove_work_dir() {
    if mountpoint -q "$rootfs" 2>/dev/null || mountpoint -q "$mnt" 2>/dev/null; then
        echo "demo.sh: $demo_dir still has a mount; left in place" >&2
        return 0
    fi
    release_work_dir "$demo_dir"
}

on_exit() {
    local rc=$?
    teardown
    if [[ ${LAZYBLK_DEMO_KEEP:-0} == 1 ]]; then
        echo "work directory kept: $demo_dir"
    else
        remove_work_dir
    fi
    exit "$rc"
}

teardown
if mountpoint -q "$rootfs" 2>/dev/null || mountpoint -q "$mnt" 2>/dev/null; then
    die "cannot clear $demo_dir: something is still mounted below it"
fi
claim_work_dir "$demo_dir"
mkdir -p "$tree" "$mnt" "$rootfs"
trap on_exit EXIT
trap 'exit 130' INT TERM

step "sample OCI image: a base layer of documentation and generated files, an app layer with Python"
base=$tree/base
app=$tree/app
mkdir -p "$base/usr/share" "$base/data/small" "$app/usr/bin" "$app/usr/lib"
cp -a /usr/share/doc "$base/usr/share/"
for i in $(seq -w 1 300); do
    head -c $((RANDOM % 64 * 1024 + 100)) /dev/urandom >"$base/data/small/file-$i"
done
ln -s small/file-001 "$base/data/link-to-first"
ln -s /usr/share/doc "$base/data/docs"
# A large file the program never reads: it stays in the store.
head -c 100M /dev/urandom >"$base/data/large.bin"
# Debian's own Python (a binary and its standard library) if the host has
# one: the demo then starts an interpreter from the lazily loaded image.
python=""
for candidate in /usr/bin/python3.[0-9]*; do
    [[ $candidate =~ ^/usr/bin/python3\.[0-9]+$ ]] || continue
    version=${candidate#/usr/bin/}
    if [[ -f /usr/lib/$version/os.py ]]; then
        cp -a "$candidate" "$app/usr/bin/"
        cp -a "/usr/lib/$version" "$app/usr/lib/"
        python=/usr/bin/$version
        break
    fi
done
umoci init --layout "$layout"
umoci new --image "$layout:demo"
umoci unpack --image "$layout:demo" "$demo_dir/bundle" >/dev/null
cp -a "$base/." "$demo_dir/bundle/rootfs/"
umoci repack --image "$layout:demo" "$demo_dir/bundle"
cp -a "$app/." "$demo_dir/bundle/rootfs/"
umoci repack --image "$layout:demo" "$demo_dir/bundle"
rm -rf "$demo_dir/bundle"
tree_mib=$(du -sm "$tree" | cut -f1)
files=$(find "$tree" -type f | wc -l)
echo "oci:$layout:demo: 2 gzip layers, $files files, $tree_mib MiB${python:+, with $python}"

step "lazyblk keygen + push oci:$layout:demo (flatten to ext4, chunk, seal, store)"
"$bin" keygen --out "$key"
"$bin" push "oci:$layout:demo" --store "$store" --key "$key" --name demo \
    --free-space 64M --json >"$demo_dir/push.json"
jq . "$demo_dir/push.json"
image_bytes=$(jq -r .image_bytes "$demo_dir/push.json")
chunks_total=$(jq -r .chunks_total "$demo_dir/push.json")
chunks_zero=$(jq -r .chunks_zero "$demo_dir/push.json")
chunks_nonzero=$((chunks_total - chunks_zero))

step "attach"
attach_start=$(date +%s.%N)
if [[ -e /dev/ublk-control ]]; then
    added=$("$bin" add --store "$store" --key "$key" --name demo --cache-dir "$cache" --read-only)
    echo "$added"
    device=${added%% *}
    ublk_id=$(awk '{ print $3 }' <<<"$added")
    target=$device
    mount -o ro "$device" "$rootfs"
    echo "$device mounted read-only on $rootfs"
else
    echo "no /dev/ublk-control (this kernel has no ublk): using FUSE + loop"
    "$bin" add --store "$store" --key "$key" --name demo --cache-dir "$cache" --fuse "$mnt" --read-only
    [[ -f $mnt/disk ]] || die "lazyblk add returned but $mnt/disk does not exist"
    target=$(realpath "$mnt")
    mount -o loop,ro "$mnt/disk" "$rootfs"
    echo "$mnt/disk ($(stat -c %s "$mnt/disk") bytes) mounted read-only on $rootfs"
fi

# The device's counters, from `lazyblk list --json`: an array of device
# records, each with its counters under "stats"; ours is the one presented
# at our target (ublk device or FUSE mountpoint). Prints "chunks_fetched
# bytes_fetched".
fetched_so_far() {
    local list stats
    list=$("$bin" list --json) || die "lazyblk list --json failed"
    printf '%s\n' "$list" >"$demo_dir/list.json"
    stats=$(jq -c --arg target "$target" 'map(select(.target == $target)) | first | .stats // empty' <<<"$list")
    [[ -n $stats ]] || die "lazyblk list --json shows no device at $target: $list"
    jq -r '"\(.chunks_fetched) \(.bytes_fetched)"' <<<"$stats" | grep -E '^[0-9]+ [0-9]+$' ||
        die "lazyblk list --json has no chunks_fetched/bytes_fetched counters: $stats"
}

now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.2f", e - s }'; }

# Each stage's time and the counters after it, for the summary.
stages=()
record_stage() { # label, seconds
    local counters
    counters=$(fetched_so_far)
    stages+=("$1|$2|$counters")
}
record_stage "add + mount (superblock, group descriptors, root directory)" "$(since "$attach_start")"

step "run a program from the lazily loaded filesystem"
start=$(now)
if [[ -n $python ]]; then
    # The interpreter finds its standard library next to itself, inside the
    # mounted image; -I keeps the host's site-packages and environment out.
    "$rootfs$python" -I -c '
import sys, json, email.parser, http.client, decimal, sqlite3
print("Python", sys.version.split()[0], "from", sys.prefix)
print("sqlite", sqlite3.sqlite_version, "| 2/3 =", decimal.Decimal(2) / decimal.Decimal(3))
'
    record_stage "start ${python#/usr/bin/} from the image, import 6 modules" "$(since "$start")"
else
    echo "(no Debian python3 on this host: only reading files)"
fi

step "walk every file's metadata, hash a few files"
start=$(now)
echo "files in the image: $(find "$rootfs" -type f | wc -l)"
sha256sum "$rootfs"/data/small/file-00[1-3] "$rootfs/data/link-to-first"
record_stage "find over all $files files, sha256sum of 3" "$(since "$start")"

step "lazyblk list --json"
jq . "$demo_dir/list.json"

step "summary: what was fetched, cumulatively, from a cold cache"
echo "image: $((image_bytes >> 20)) MiB in $chunks_total chunks of $(($(jq -r .chunk_size "$demo_dir/push.json") >> 10)) KiB, $chunks_nonzero of them non-zero (stored)"
echo
echo "| after | seconds | chunks fetched | of non-zero | MiB fetched | of image |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for stage in "${stages[@]}"; do
    IFS='|' read -r label seconds counters <<<"$stage"
    read -r chunks bytes <<<"$counters"
    printf '| %s | %s | %s | %s%% | %s | %s%% |\n' "$label" "$seconds" "$chunks" \
        "$(ratio "$((chunks * 100))" "$chunks_nonzero" %.1f)" "$((bytes >> 20))" \
        "$(ratio "$((bytes * 100))" "$image_bytes" %.1f)"
done
