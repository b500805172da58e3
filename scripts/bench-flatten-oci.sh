#!/usr/bin/env bash
# `lazyblk flatten` end to end on a gzip OCI layout: MB/s of uncompressed
# layer input and peak RSS, against two baselines measured in the same run:
# gunzip of the same layers to /dev/null (the decompression bound: flatten
# cannot beat it on one core) and `umoci unpack` (the usual way to turn a
# layout into a root filesystem, onto the host's filesystem). Prints a
# Markdown report on stdout (progress on stderr) for docs/BENCHMARKS.md.
#
# Input: a two-layer layout made with umoci from this machine's
# /usr/share/doc + /usr/lib/python3 (base) and /usr/lib/python3.11 (layer).
# LAZYBLK_BENCH_DIR (default a fresh directory under /var/tmp) holds it; it is
# removed at the end unless it was given.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/install-deps.sh" >&2
load=$(cut -d' ' -f1-3 /proc/loadavg)
bench_work_dir /var/tmp bench-flatten-oci
for src in /usr/share/doc /usr/lib/python3 /usr/lib/python3.11; do
    [[ -e $src ]] || die "missing input $src"
done

note "building the layout with umoci"
layout=$work/layout
rm -rf "$layout" "$work/bundle"
umoci init --layout "$layout"
umoci new --image "$layout:t"
umoci unpack --image "$layout:t" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/usr/share" "$work/bundle/rootfs/usr/lib"
cp -a /usr/share/doc "$work/bundle/rootfs/usr/share/"
cp -a /usr/lib/python3 "$work/bundle/rootfs/usr/lib/"
# Without --refresh-bundle the second repack diffs against the empty image
# again and the tag ends up with one layer holding everything.
umoci repack --refresh-bundle --image "$layout:t" "$work/bundle"
cp -a /usr/lib/python3.11 "$work/bundle/rootfs/usr/lib/"
umoci repack --image "$layout:t" "$work/bundle"
rm -rf "$work/bundle"

bin=$(build_release)

# The layer blobs, base first, and their uncompressed size.
manifest=$(jq -r '.manifests[0].digest' "$layout/index.json" | cut -d: -f2)
mapfile -t layers < <(jq -r '.layers[].digest' "$layout/blobs/sha256/$manifest" | cut -d: -f2)
[[ ${#layers[@]} -eq 2 ]] || die "the layout has ${#layers[@]} layers, 2 expected"
tar_bytes=0
for l in "${layers[@]}"; do
    n=$(gzip -dc "$layout/blobs/sha256/$l" | wc -c)
    tar_bytes=$((tar_bytes + n))
done
mb=$((tar_bytes / 1000000))

# timed NAME CMD...: runs CMD under /usr/bin/time -v; prints "seconds rss_kib".
timed() {
    local name=$1
    shift
    /usr/bin/time -v -o "$work/$name.time" "$@" >"$work/$name.out" ||
        die "$name failed: $(tail -5 "$work/$name.time")"
    awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; secs = s }
                /Maximum resident set size/ { rss = $2 } END { print secs, rss }' "$work/$name.time"
}

note "gunzip of the layers (decompression bound)"
read -r gs _ < <(timed gunzip sh -c "for l in ${layers[*]}; do gzip -dc '$layout/blobs/sha256/'\$l; done | cat >/dev/null")
note "umoci unpack"
rm -rf "$work/unpacked"
read -r us _ < <(timed umoci umoci unpack --image "$layout:t" "$work/unpacked")
rm -rf "$work/unpacked"
note "lazyblk flatten"
rm -f "$work/image.ext4"
read -r fs frss < <(timed flatten "$bin" flatten "oci:$layout:t" -o "$work/image.ext4" --json)
files=$(jq -r .files "$work/flatten.out")
e2fsck -fn "$work/image.ext4" >/dev/null 2>&1 || die "e2fsck -fn of the flattened image is not clean"

# push of a source, streamed, against flatten to a file then push of the
# file (the two-step way it replaces); each into a fresh store.
"$bin" keygen --out "$work/key" >/dev/null 2>&1 || [[ -f $work/key ]]
rm -rf "$work/store-file" "$work/store-stream"
note "lazyblk push of the flattened file"
read -r ps _ < <(timed pushfile "$bin" push "$work/image.ext4" --store "$work/store-file" --key "$work/key" --name app --json)
note "lazyblk push oci: (flatten and push streamed)"
read -r ss srss < <(timed pushstream "$bin" push "oci:$layout:t" --store "$work/store-stream" --key "$work/key" --name app --json)
[[ $(jq -r .chunks_distinct "$work/pushstream.out") == $(jq -r .chunks_distinct "$work/pushfile.out") ]] ||
    die "the streamed push stored other chunks than the file push"
two_step=$(awk -v a="$fs" -v b="$ps" 'BEGIN { printf "%.2f", a + b }')

cat <<MD
## Flattening an OCI layout end to end (\`scripts/bench-flatten-oci.sh\`)

Load average at start: $load. A two-layer gzip layout made by umoci from
\`/usr/share/doc\` + \`/usr/lib/python3\` and \`/usr/lib/python3.11\`:
$mb MB of uncompressed layer tar, $files inodes. Release build; wall time and
peak RSS from \`/usr/bin/time -v\`. Ratios are flatten's speed over the
baseline's, in this run.

| run | seconds | MB/s of layer tar | flatten ÷ baseline |
| --- | ---: | ---: | ---: |
| gunzip of the layers to /dev/null | $gs | $(ratio "$mb" "$gs" %.0f) | $(ratio "$gs" "$fs") |
| umoci unpack (to the host's filesystem) | $us | $(ratio "$mb" "$us" %.0f) | $(ratio "$us" "$fs") |
| lazyblk flatten (to an ext4 image) | $fs | $(ratio "$mb" "$fs" %.0f) | |

Peak RSS of flatten: $((frss / 1024)) MiB (budget 256 MiB + 200 B × $files files = $((256 + files * 200 / 1048576)) MiB).

\`lazyblk push oci:…\` flattens and pushes in one pass with no image file;
the baseline is the two steps it replaces, \`flatten\` to a file then \`push\`
of the file, each into a fresh directory store:

| run | seconds | MB/s of layer tar | streamed ÷ baseline |
| --- | ---: | ---: | ---: |
| flatten, then push of the file | $two_step | $(ratio "$mb" "$two_step" %.0f) | $(ratio "$two_step" "$ss") |
| push oci: (streamed) | $ss | $(ratio "$mb" "$ss" %.0f) | |

Peak RSS of the streamed push: $((srss / 1024)) MiB.
MD
