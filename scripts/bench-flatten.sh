#!/usr/bin/env bash
# The flattener on real files: throughput, peak memory, and chunk reuse
# between a base image, the base plus a layer, and the base plus the layer
# with one line changed, next to the same reuse figures for `mkfs.ext4 -d`
# (fixed UUID, hash seed and time) on the merged trees. Prints a Markdown
# report on stdout (progress on stderr), ready for docs/BENCHMARKS.md.
#
# Inputs, copied from this machine: base = /usr/share/doc + /usr/lib/python3,
# layer = /usr/lib/python3.11 (Debian's standard library), the changed layer
# = the layer with one line of os.py edited. Each layer is flattened from
# its directory by examples/flatten_dirs.rs (the OCI reader is not in this
# measurement: input is uncompressed file data from the page cache).
#
# Environment: LAZYBLK_BENCH_DIR (default a fresh directory under /tmp) holds
# the trees and images; it is removed at the end unless it was given.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/install-deps.sh" >&2
load=$(cut -d' ' -f1-3 /proc/loadavg)
bench_work_dir /tmp bench-flatten
for src in /usr/share/doc /usr/lib/python3 /usr/lib/python3.11/os.py; do
    [[ -e $src ]] || die "missing input $src"
done

note "copying the trees"
rm -rf "$work/base" "$work/layer" "$work/layer2"
mkdir -p "$work/base/usr/share" "$work/base/usr/lib" "$work/layer/usr/lib"
cp -a /usr/share/doc "$work/base/usr/share/"
cp -a /usr/lib/python3 "$work/base/usr/lib/"
cp -a /usr/lib/python3.11 "$work/layer/usr/lib/"
cp -a "$work/layer" "$work/layer2"
# One line, same length class: the kind of edit a rebuilt app layer carries.
sed -i '0,/^import abc$/s//import abc  # changed/' "$work/layer2/usr/lib/python3.11/os.py"
cmp -s "$work/layer/usr/lib/python3.11/os.py" "$work/layer2/usr/lib/python3.11/os.py" &&
    die "the one-line edit of os.py did not apply"

note "building the flattener"
cargo build --release --quiet --example flatten_dirs >&2 || die "cargo build --example flatten_dirs failed"
target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
bin=$target/release/examples/flatten_dirs
# Warm the page cache so the figures measure the flattener, not the disk.
tar -cf - -C "$work" base layer layer2 | cat >/dev/null

# flatten NAME DIR...: runs the flattener under /usr/bin/time -v; prints
# "seconds cpu_seconds rss_kib bytes files image_size".
flatten() {
    local name=$1
    shift
    /usr/bin/time -v -o "$work/$name.time" "$bin" "$work/$name.ext4" "$@" >"$work/$name.json" ||
        die "flatten $name failed: $(cat "$work/$name.time")"
    local secs cpu rss
    secs=$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s }' "$work/$name.time")
    cpu=$(awk -F': ' '/(User|System) time \(seconds\)/ { s += $2 } END { printf "%.2f", s }' "$work/$name.time")
    rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/$name.time")
    printf '%s %s %s %s\n' "$secs" "$cpu" "$rss" "$(jq -r '"\(.bytes) \(.files) \(.image_size)"' "$work/$name.json")"
}

note "flattening"
read -r s0 c0 r0 b0 f0 i0 < <(flatten base "$work/base")
read -r s1 c1 r1 b1 f1 i1 < <(flatten derived "$work/base" "$work/layer")
read -r s2 c2 r2 b2 f2 i2 < <(flatten changed "$work/base" "$work/layer2")
for img in base derived changed; do
    e2fsck -fn "$work/$img.ext4" >/dev/null 2>&1 || die "e2fsck -fn $img.ext4 is not clean"
done

note "mkfs.ext4 -d on the merged trees"
rm -rf "$work/m-derived" "$work/m-changed"
cp -a "$work/base" "$work/m-derived"
cp -a "$work/layer/." "$work/m-derived/"
cp -a "$work/base" "$work/m-changed"
cp -a "$work/layer2/." "$work/m-changed/"
mkfs_image() {
    local tree=$1 out=$2 mib
    mib=$(($(du -sm "$tree" | cut -f1) * 13 / 10 + 256))
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 \
        -U 6b1f0c2e-0000-4000-8000-000000000000 -E hash_seed=6b1f0c2e-0000-4000-8000-000000000001,root_owner=0:0 \
        -d "$tree" "$out" "${mib}M" >&2 || die "mkfs.ext4 -d $tree failed"
}
mkfs_image "$work/base" "$work/mkfs-base.ext4"
mkfs_image "$work/m-derived" "$work/mkfs-derived.ext4"
mkfs_image "$work/m-changed" "$work/mkfs-changed.ext4"

# reuse A B: "chunks_of_A reused_in_B new_in_B" over non-zero 512 KiB chunks.
reuse() {
    python3 - "$1" "$2" <<'PY'
import hashlib, sys
def chunks(path):
    out = set()
    with open(path, "rb") as f:
        while True:
            b = f.read(512 << 10)
            if not b:
                return out
            if b.count(0) != len(b):
                out.add(hashlib.sha256(b.ljust(512 << 10, b"\0")).digest())
a, b = chunks(sys.argv[1]), chunks(sys.argv[2])
print(len(a), len(a & b), len(b - a))
PY
}
read -r ob oreuse onew < <(reuse "$work/base.ext4" "$work/derived.ext4")
read -r od _ ochg < <(reuse "$work/derived.ext4" "$work/changed.ext4")
read -r mb mreuse mnew < <(reuse "$work/mkfs-base.ext4" "$work/mkfs-derived.ext4")
read -r md _ mchg < <(reuse "$work/mkfs-derived.ext4" "$work/mkfs-changed.ext4")
layer_bytes=$((b1 - b0))
budget=$(awk -v b="$layer_bytes" 'BEGIN { printf "%.1f", b / 524288 * 1.25 + 16 }')

cat <<MD
## Flattening (\`scripts/bench-flatten.sh\`)

Load average at start: $load. Base: \`/usr/share/doc\` + \`/usr/lib/python3\`
($f0 inodes, $((b0 / 1000000)) MB of file data); layer: \`/usr/lib/python3.11\`
($((layer_bytes / 1000000)) MB); changed: the layer with one line of \`os.py\` edited.
Flattened from the page cache by \`examples/flatten_dirs.rs\` (release build),
time and peak RSS from \`/usr/bin/time -v\`. Wall-clock MB/s depends on what
else runs on the machine (see the load); CPU seconds (user + system) do much less.
Times include the SHA-256 of the whole image (written blocks read back, the rest hashed as zeros).

| image | input MB | seconds | MB/s | CPU seconds | MB per CPU second | peak RSS MiB | RSS budget MiB (256 + 200 B/file) | image MiB |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| base | $((b0 / 1000000)) | $s0 | $(ratio "$((b0 / 1000000))" "$s0" %.0f) | $c0 | $(ratio "$((b0 / 1000000))" "$c0" %.0f) | $((r0 / 1024)) | $((256 + f0 * 200 / 1048576)) | $((i0 >> 20)) |
| base + layer | $((b1 / 1000000)) | $s1 | $(ratio "$((b1 / 1000000))" "$s1" %.0f) | $c1 | $(ratio "$((b1 / 1000000))" "$c1" %.0f) | $((r1 / 1024)) | $((256 + f1 * 200 / 1048576)) | $((i1 >> 20)) |
| base + changed layer | $((b2 / 1000000)) | $s2 | $(ratio "$((b2 / 1000000))" "$s2" %.0f) | $c2 | $(ratio "$((b2 / 1000000))" "$c2" %.0f) | $((r2 / 1024)) | $((256 + f2 * 200 / 1048576)) | $((i2 >> 20)) |

Chunk reuse (512 KiB chunks, non-zero only), goals: derived reuses ≥ 90% of
the base's chunks; the layer adds ≤ its bytes / chunk × 1.25 + 16 = $budget
new chunks; the one-line change adds ≤ 4.

| writer | base chunks | reused by derived | reuse | new chunks for the layer | new chunks for the one-line change |
| --- | ---: | ---: | ---: | ---: | ---: |
| lazyblk flatten | $ob | $oreuse | $(ratio "$((oreuse * 100))" "$ob" %.1f)% | $onew | $ochg (of $od) |
| mkfs.ext4 -d | $mb | $mreuse | $(ratio "$((mreuse * 100))" "$mb" %.1f)% | $mnew | $mchg (of $md) |
MD
