#!/usr/bin/env bash
# The cold-start benchmark through ublk: scripts/bench-coldstart.sh's numpy
# start, run inside the VM of scripts/vm-run.sh, where lazyblk serves the
# image as /dev/ublkbN (no FUSE, no loop device) and the guest mounts that.
# Prints a Markdown report on stdout (progress goes to stderr), ready for
# docs/BENCHMARKS.md.
#
# The corpus's app-v1 image (scripts/make-corpus.sh) is pushed to a
# directory store on the host, exported once as a flat file for the floor,
# and both go to the guest on a virtio disk. In the guest, `lazyblk serve`
# answers on 127.0.0.1 with BENCH_DELAY ms added to every chunk request
# (default 10). Each round, in this order, page caches dropped before each:
#   floor     the flat image on a loop device over a file in the guest's
#             memory (where the device caches are too): the same start,
#             nothing to fetch;
#   cold      `add --no-prefetch`, a fresh device cache;
#   prefetch  `add`, a fresh device cache, prefetching the trace a first,
#             untimed `add --record-trace` start stored;
#   warm      `add --no-prefetch` on the cold start's device cache.
# A start is timed from `add` (or `mount`, for the floor) to the end of
# `python3 -c 'import numpy'` in a chroot of the mounted image. Under TCG
# the guest runs programs about ten times slower than the host, while the
# origin's delay is real time: compare the ratios to the floor, not the
# seconds with the host's.
#
# Environment: BENCH_DELAY (ms, default 10), BENCH_ROUNDS (default 3),
# LAZYBLK_BENCH_BIN (a release binary already built), LAZYBLK_VM_SUITE (the
# kernel: trixie, the default, or trixie-backports), LAZYBLK_CORPUS_DIR.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

delay=${BENCH_DELAY:-10}
rounds=${BENCH_ROUNDS:-3}
[[ $delay =~ ^[0-9]+$ ]] || die "BENCH_DELAY wants a number of ms, not '$delay'"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS wants a number of rounds, not '$rounds'"
[[ $EUID -eq 0 ]] || die "the corpus and the data disk need root"
"$REPO_ROOT/scripts/install-deps.sh" >&2
corpus=${LAZYBLK_CORPUS_DIR:-$HOME/.cache/lazyblk/corpus}
"$REPO_ROOT/scripts/make-corpus.sh" >/dev/null

if [[ -n ${LAZYBLK_BENCH_BIN:-} ]]; then
    built=$LAZYBLK_BENCH_BIN
    [[ -x $built ]] || die "LAZYBLK_BENCH_BIN=$built is not an executable"
else
    note "cargo build --release"
    built=$(build_release)
fi
has_subcommand "$built" add --record-trace || die "$built has no add --record-trace: a stale build?"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/lazyblk-bench-coldstart-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
bin=$work/lazyblk
cp "$built" "$bin"

note "pushing app-v1 and exporting its flat image"
data=$work/data
mkdir -p "$data"
"$bin" keygen --out "$data/key" >/dev/null
"$bin" push "oci:$corpus/oci:app-v1" --store "$data/store" --key "$data/key" --name app-v1 --json >"$work/push.json"
"$bin" export --store "$data/store" --key "$data/key" --name app-v1 --out "$data/flat.ext4" >/dev/null
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$data/write-token"
chmod 600 "$data/write-token"
data_mib=$(($(du -sm "$data" | cut -f1) * 5 / 4 + 64))
truncate -s "${data_mib}M" "$work/data.img"
mkfs.ext4 -q -F -d "$data" "$work/data.img"
rm -rf "$data"

cat >"$work/coldstart-guest" <<'EOF'
#!/bin/sh
# In the guest: prints "COLDSTART variant round seconds chunks_fetched
# demand_fetches bytes_fetched" lines.
set -eu
delay=$1 rounds=$2
mkdir -p /data /tmp/root
mount -o noatime /dev/vda /data
cd /tmp
# The floor's image in memory, as the device caches are: a drop of the
# page cache then leaves what a local disk would give, not a virtio disk
# under emulation.
cp /data/flat.ext4 /tmp/flat.ext4
now() { read -r up _ </proc/uptime; echo "$up"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
stat_of() { # json field
    printf '%s\n' "$1" | sed -n "s/.*\"$2\": \([0-9]*\).*/\1/p" | head -n 1
}
lazyblk serve --store /data/store --listen 127.0.0.1:0 --delay "$delay" \
    --write-token-file /data/write-token >serve.out 2>serve.err &
url=
for _ in $(seq 100); do
    url=$(head -n 1 serve.out 2>/dev/null || true)
    case $url in http://*) break ;; esac
    sleep 0.1
done
case $url in http://*) ;; *) cat serve.err >&2; exit 1 ;; esac

workload() { chroot /tmp/root /opt/venv/bin/python3 -c 'import numpy'; }

# start VARIANT ROUND CACHE [ADD ARGS...]
start() {
    variant=$1 round=$2 cache=$3
    shift 3
    drop_caches
    t0=$(now)
    out=$(lazyblk add --store "$url" --key /data/key --name app-v1 --cache-dir "$cache" --read-only "$@")
    dev=${out%% *}
    id=$(echo "$out" | cut -d' ' -f3)
    mount -o ro "$dev" /tmp/root
    workload
    t1=$(now)
    stats=$(lazyblk list --json)
    umount /tmp/root
    lazyblk del -n "$id" >/dev/null
    [ "$variant" = record ] && return 0
    if [ "$variant.$round" = cold.1 ]; then
        echo "COLDSTART-MODE $(printf '%s\n' "$stats" | sed -n 's/.*"copy_mode": "\([a-z-]*\)".*/\1/p' | head -n 1)"
    fi
    echo "COLDSTART $variant $round $(echo "$t1 $t0" | awk '{ printf "%.2f", $1 - $2 }')" \
        "$(stat_of "$stats" chunks_fetched) $(stat_of "$stats" demand_fetches) $(stat_of "$stats" bytes_fetched)"
}

echo "coldstart: recording a trace" >&2
start record 0 rec --record-trace --no-prefetch --token-file /data/write-token
rm -rf rec
lazyblk trace show --store "$url" --key /data/key --name app-v1 >/dev/null
r=1
while [ "$r" -le "$rounds" ]; do
    echo "coldstart: round $r" >&2
    drop_caches
    t0=$(now)
    mount -o loop,ro /tmp/flat.ext4 /tmp/root
    workload
    t1=$(now)
    umount /tmp/root
    echo "COLDSTART floor $r $(echo "$t1 $t0" | awk '{ printf "%.2f", $1 - $2 }') 0 0 0"
    rm -rf cold pre
    start cold "$r" cold --no-prefetch
    start prefetch "$r" pre
    start warm "$r" cold --no-prefetch
    r=$((r + 1))
done
echo "COLDSTART-KERNEL $(uname -r)"
EOF
chmod 755 "$work/coldstart-guest"

note "running the starts in the VM (${delay} ms origin, $rounds rounds)"
"$REPO_ROOT/scripts/vm-run.sh" --timeout 3000 --mem 4096 \
    --add "$bin:/vm/lazyblk" --add "$work/coldstart-guest:/vm/coldstart-guest" \
    --qemu-arg -drive --qemu-arg "file=$work/data.img,if=virtio,format=raw" \
    -- coldstart-guest "$delay" "$rounds" >"$work/console.log" ||
    die "the benchmark failed in the VM: $(tail -n 20 "$work/console.log")"

declare -A secs chunks waits bytes
while read -r _ variant round s c w b; do
    secs[$variant.$round]=$s chunks[$variant.$round]=$c waits[$variant.$round]=$w bytes[$variant.$round]=$b
done < <(grep -E '^COLDSTART [a-z]+ [0-9]+ [0-9.]+ [0-9]+ [0-9]+ [0-9]+$' "$work/console.log")
kernel=$(sed -n 's/^COLDSTART-KERNEL //p' "$work/console.log")
mode=$(sed -n 's/^COLDSTART-MODE //p' "$work/console.log")
median() { # numbers...
    printf '%s\n' "$@" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.10g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
column() { # variant array-name
    local -n values=$2
    local r list=()
    for ((r = 1; r <= rounds; r++)); do
        [[ -n ${values[$1.$r]:-} ]] || die "no figure for $1 in round $r in the VM's output"
        list+=("${values[$1.$r]}")
    done
    median "${list[@]}"
}
floor=$(column floor secs)
total=$(jq -r '.chunks_total' "$work/push.json")

echo "### Cold starts through ublk, in the VM (kernel $kernel, ${delay} ms origin)"
echo
echo "Command: \`LAZYBLK_VM_SUITE=${LAZYBLK_VM_SUITE:-trixie} BENCH_DELAY=$delay BENCH_ROUNDS=$rounds scripts/bench-coldstart-vm.sh\`: the corpus's app-v1 image ($total chunks), \`python3 -c 'import numpy'\` in a chroot of the mounted device, kernel $kernel under qemu TCG (2 vCPUs), ublk in $mode mode, \`lazyblk serve --delay $delay\` on the guest's loopback over a directory store on a virtio disk, page caches dropped before each start, host load $(cut -d" " -f1-3 /proc/loadavg). Seconds from \`add\` to the import's end (medians of $rounds rounds), and / floor against the flat image on a loop device in the same guest."
echo
echo "| start | seconds | / floor | chunks fetched | waits (demand fetches) | MB from the origin |"
echo "|---|---:|---:|---:|---:|---:|"
for variant in floor cold prefetch warm; do
    # Each in the script's own shell, so a missing figure ends the script.
    s=$(column "$variant" secs)
    c=$(column "$variant" chunks)
    w=$(column "$variant" waits)
    b=$(column "$variant" bytes)
    printf '| %s | %s | %s | %s | %s | %s |\n' "$variant" "$s" "$(ratio "$s" "$floor")" "$c" "$w" \
        "$(awk -v b="$b" 'BEGIN { printf "%.1f", b / 1e6 }')"
done
