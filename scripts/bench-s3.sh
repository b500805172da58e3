#!/usr/bin/env bash
# Push and export through an S3 store on a SeaweedFS cluster on loopback
# (master, three volume servers with replication 001, filer, S3 gateway:
# scripts/seaweedfs-cluster.sh) against the directory store, in the same
# run, on the same filesystem. Prints a Markdown report on stdout (progress
# goes to stderr), ready for docs/BENCHMARKS.md.
#
# Environment: LAZYBLK_BENCH_BYTES (default 1G) sizes the image of random
# data; LAZYBLK_BENCH_DIR names the work directory (default: a fresh one
# under $TMPDIR or /var/tmp, removed at the end).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/seaweedfs.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/seaweedfs.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/install-deps.sh" >&2
weed=$(ensure_weed) || die "could not install SeaweedFS"
bytes=${LAZYBLK_BENCH_BYTES:-1G}

note "cargo build --release"
bin=$(build_release)

bench_work_dir "${TMPDIR:-/var/tmp}" lazyblk-bench-s3
cluster_pid=
cleanup() {
    if [[ -n $cluster_pid ]]; then
        kill -TERM "$cluster_pid" 2>/dev/null || true
        wait "$cluster_pid" 2>/dev/null || true
    fi
    if [[ -z ${LAZYBLK_BENCH_DIR:-} ]]; then
        rm -rf "$work"
    fi
}
trap cleanup EXIT

note "writing $bytes of random data to $work/image"
head -c "$bytes" /dev/urandom >"$work/image"
image_bytes=$(stat -c %s "$work/image")
"$bin" keygen --out "$work/key" >&2

note "starting the SeaweedFS cluster"
LAZYBLK_WEED=$weed "$REPO_ROOT/scripts/seaweedfs-cluster.sh" "$work/cluster" >"$work/cluster.out" &
cluster_pid=$!
until [[ -e $work/cluster/cluster.env ]]; do
    kill -0 "$cluster_pid" 2>/dev/null || die "the SeaweedFS cluster did not start"
    sleep 0.2
done
# shellcheck disable=SC1091
. "$work/cluster/cluster.env"
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION
s3_store=s3://$S3_BUCKET/bench
dir_store=$work/dir-store

# Other work on the machine moves every figure: the report records it.
load=$(cut -d' ' -f1-3 /proc/loadavg)

# CPU seconds (user + system) the SeaweedFS servers have used so far.
# shellcheck disable=SC2153 # set by cluster.env
read -r -a server_pids <<<"$SERVER_PIDS"
ticks=$(getconf CLK_TCK)
cluster_cpu() {
    local pid total=0
    for pid in "${server_pids[@]}"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    awk -v t="$total" -v hz="$ticks" 'BEGIN { printf "%.2f\n", t / hz }'
}

# Runs a command under /usr/bin/time; sets $wall, $cpu (user + system) and
# $server_cpu (the cluster's CPU seconds meanwhile).
timed() {
    local times=$work/times before
    before=$(cluster_cpu)
    /usr/bin/time -f '%e %U %S' -o "$times" "$@" >"$work/last.out" 2>"$work/last.err" ||
        die "$* failed: $(cat "$work/last.err")"
    read -r wall user sys <"$times"
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f\n", u + s }')
    server_cpu=$(awk -v a="$(cluster_cpu)" -v b="$before" 'BEGIN { printf "%.2f\n", a - b }')
}

declare -A wall_of cpu_of server_cpu_of
run() { # label, command...
    local label=$1
    shift
    note "$label"
    timed "$@"
    wall_of[$label]=$wall
    cpu_of[$label]=$cpu
    server_cpu_of[$label]=$server_cpu
}

push_args=(--key "$work/key" --name bench --json)
run dir-push "$bin" push "$work/image" --store "$dir_store" "${push_args[@]}"
run s3-push "$bin" push "$work/image" --store "$s3_store" --s3-endpoint "$S3_ENDPOINT" "${push_args[@]}"
uploaded=$(jq -r .chunks_uploaded "$work/last.out")
run s3-push-again "$bin" push "$work/image" --store "$s3_store" --s3-endpoint "$S3_ENDPOINT" "${push_args[@]}"
[[ $(jq -r .chunks_uploaded "$work/last.out") == 0 ]] || die "the repeated push uploaded chunks"
run dir-push-again "$bin" push "$work/image" --store "$dir_store" "${push_args[@]}"
run dir-export "$bin" export --store "$dir_store" --key "$work/key" --name bench --out "$work/out-dir"
cmp -s "$work/image" "$work/out-dir" || die "export from the directory store differs"
rm -f "$work/out-dir"
run s3-export "$bin" export --store "$s3_store" --s3-endpoint "$S3_ENDPOINT" --key "$work/key" --name bench --out "$work/out-s3"
cmp -s "$work/image" "$work/out-s3" || die "export from the S3 store differs"
rm -f "$work/out-s3"

mbps() { awk -v b="$image_bytes" -v s="$1" 'BEGIN { printf "%.1f\n", b / 1e6 / s }'; }
row() { # what, s3 label, dir label
    local s3=$2 dir=$3
    printf '| %s | %s s | %s | %s s | %s | %s |\n' "$1" \
        "${wall_of[$s3]}" "$(mbps "${wall_of[$s3]}")" \
        "${wall_of[$dir]}" "$(mbps "${wall_of[$dir]}")" \
        "$(ratio "${wall_of[$dir]}" "${wall_of[$s3]}")"
}

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "### Push and export: S3 on a SeaweedFS cluster vs the directory store"
echo
echo "Machine: ${cpu:-unknown CPU}, $(nproc) cores; SeaweedFS $("$weed" version 2>/dev/null | awk '{ print $3; exit }'); load average before the run: $load."
echo "Command: \`scripts/bench-s3.sh\` (LAZYBLK_BENCH_BYTES=$bytes): $((image_bytes >> 20)) MiB of random data ($uploaded chunks uploaded), pushed with \`lazyblk push IMAGE --store STORE --key KEY --name bench --json\` into a fresh store, pushed again (every chunk stored), and exported with \`lazyblk export\` (compared with \`cmp\`). S3 store: \`s3://$S3_BUCKET/bench\` on a master, three volume servers (replication 001: two copies of every object), a filer and an S3 gateway on loopback; directory store on the same filesystem. Release build, one run each; MB = 10^6 bytes; ratio = S3 MB/s / directory MB/s."
echo
echo "| operation | S3 wall | S3 MB/s | directory wall | directory MB/s | ratio |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
row "push, fresh store" s3-push dir-push
row "push again, every chunk stored" s3-push-again dir-push-again
row "export (cold: every chunk fetched)" s3-export dir-export
echo
echo "CPU seconds (user + system), lazyblk / SeaweedFS servers: push ${cpu_of[s3-push]} / ${server_cpu_of[s3-push]} (S3) vs ${cpu_of[dir-push]} (directory); push again ${cpu_of[s3-push-again]} / ${server_cpu_of[s3-push-again]} vs ${cpu_of[dir-push-again]}; export ${cpu_of[s3-export]} / ${server_cpu_of[s3-export]} vs ${cpu_of[dir-export]}."
