#!/usr/bin/env bash
# Cold starts of real images (the corpus of scripts/make-corpus.sh), lazily
# and the usual way, in one run. For each workload and origin (0, 10 and
# 50 ms added to every chunk request by `lazyblk serve --delay`, and 5 ms at
# 200 Mbit/s with `--rate`), and page caches dropped before every start:
#
#   baseline  skopeo copy from a loopback registry + umoci unpack + chroot
#             (measured once, at loopback speed: the baseline's best case)
#   cold      lazyblk add --fuse + mount -o loop,ro + chroot, empty caches
#   prefetch  the same, prefetching the trace of an earlier run (when the
#             binary has `add --record-trace`)
#   warm      the same through a host cache an earlier run filled
#   floor     the flattened image as a local file on a plain loop device:
#             what the device path costs on this host without FUSE, the
#             engine or an origin (a "floor" line, not a start)
#   probe     cold with readahead off at the first origin (untimed for the figures):
#             the chunks the workload itself reads
#
# Each start is timed from `add` (or the pull) to the first answer (for
# the HTTP service, its first passing health check) and to the workload's
# end; bytes moved and chunks fetched come from the device's counters
# (`lazyblk list --json`). One JSON object per start, and one per push of
# the corpus into the store, go to the results file (LAZYBLK_BENCH_RESULTS,
# default docs/coldstart-results.jsonl) for `lazyblk report`. Progress and a
# summary go to stderr.
#
# Needs root, FUSE and loop devices, and the corpus (built on first use).
# LAZYBLK_BENCH_DIR (default a fresh directory under /var/tmp) is the work
# directory; LAZYBLK_BENCH_ORIGINS picks origins (default "0 10 50 5@200"),
# LAZYBLK_BENCH_WORKLOADS workloads (default "numpy handler http tally").
# The lazyblk report figures come from the same run:
#   lazyblk report --store WORK/store --base python \
#       --series app-v1,app-v2,app-v3,app-v4,app-v5 --other tally-v1 \
#       --results RESULTS --plots docs/img
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/install-deps.sh" >&2
ensure_kernel_devices
corpus=${LAZYBLK_CORPUS_DIR:-$HOME/.cache/lazyblk/corpus}
layout=$corpus/oci
"$REPO_ROOT/scripts/make-corpus.sh" >/dev/null
results=${LAZYBLK_BENCH_RESULTS:-$REPO_ROOT/docs/coldstart-results.jsonl}
origins=${LAZYBLK_BENCH_ORIGINS:-0 10 50 5@200}
bench_work_dir /var/tmp bench-coldstart
# LAZYBLK_BIN runs a binary already built instead of building one.
bin=${LAZYBLK_BIN:-$(build_release)}
: >"$results"

# The corpus in push order: the base first, then each version as CI
# would push it, then the unrelated app.
series=(python app-v1 app-v2 app-v3 app-v4 app-v5 tally-v1)
# workload name, image, how it is run: "cmd ARGS..." runs to its end;
# "http PORT" starts the app's service and waits for /health.
workloads=(
    "numpy app-v1 cmd /opt/venv/bin/python3 -c 'import numpy'"
    "handler app-v1 cmd /opt/venv/bin/python3 /app/handler.py"
    "http app-v1 http"
    "tally tally-v1 cmd /opt/venv/bin/python3 /srv/tally/tally.py"
)
if [[ -n ${LAZYBLK_BENCH_WORKLOADS:-} ]]; then
    chosen=()
    for spec in "${workloads[@]}"; do
        [[ " $LAZYBLK_BENCH_WORKLOADS " == *" ${spec%% *} "* ]] && chosen+=("$spec")
    done
    ((${#chosen[@]} > 0)) || die "LAZYBLK_BENCH_WORKLOADS=$LAZYBLK_BENCH_WORKLOADS names none of: numpy handler http tally"
    workloads=("${chosen[@]}")
fi

pids=()
mounted=()
cleanup() {
    # Runs under `set -e` with the script's status: a step that finds
    # nothing left to undo (the device was removed already) must not turn
    # a finished run into a failed one, hence every `|| true`.
    local m
    for m in "${mounted[@]}"; do
        if mountpoint -q "$m"; then umount "$m" 2>/dev/null || true; fi
    done
    # Only this run's device: others on the host are not ours to stop.
    if [[ -n ${fuse_mnt:-} ]] && mountpoint -q "$fuse_mnt"; then
        "$bin" del --fuse "$fuse_mnt" >/dev/null 2>&1 || true
    fi
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ -z ${LAZYBLK_BENCH_DIR:-} ]]; then rm -rf "$work"; fi
    return 0
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts a background process whose first stdout line is its URL; sets $url.
start_server() {
    local log=$1
    shift
    "$@" >"$log.out" 2>"$log.err" &
    pids+=($!)
    for _ in $(seq 200); do
        url=$(head -n1 "$log.out" 2>/dev/null || true)
        [[ $url == http://* ]] && return 0
        sleep 0.05
    done
    die "$* did not start: $(tail -3 "$log.err")"
}

# run_workload ROOT SPEC...: runs the workload in ROOT; prints the seconds
# since $t0 at its first answer and at its end.
run_workload() {
    local root=$1 kind=$2
    shift 2
    local ready finished
    case $kind in
        cmd)
            chroot "$root" sh -c "$*" >"$work/workload.out" 2>&1 || die "workload $* failed: $(tail -3 "$work/workload.out")"
            ready=$(now) finished=$ready
            ;;
        http)
            local port
            port=$(free_port)
            chroot "$root" /opt/venv/bin/python3 /app/server.py "$port" >"$work/workload.out" 2>&1 &
            local server=$!
            until curl -sf -o /dev/null "http://127.0.0.1:$port/health"; do
                kill -0 "$server" 2>/dev/null || die "the app's service exited: $(tail -3 "$work/workload.out")"
                sleep 0.005
            done
            ready=$(now)
            curl -sf -o /dev/null "http://127.0.0.1:$port/score" || die "the app's /score failed"
            finished=$(now)
            kill "$server"
            wait "$server" 2>/dev/null || true
            ;;
    esac
    echo "$(elapsed "$t0" "$ready") $(elapsed "$t0" "$finished")"
}

# emit JSON...: one result line (jq -n arguments).
emit() {
    jq -cn "$@" >>"$results"
}

key=$work/key
store=$work/store
"$bin" keygen --out "$key" >/dev/null

note "pushing the corpus to a directory store"
for tag in "${series[@]}"; do
    report=$("$bin" push "oci:$layout:$tag" --store "$store" --key "$key" --name "$tag" --json)
    emit --arg name "$tag" --argjson report "$report" '{kind: "push", name: $name, report: $report}'
done
# One manifest per workload, so each keeps a trace of its own; the chunks
# are all there already.
for spec in "${workloads[@]}"; do
    read -r wl image _ <<<"$spec"
    "$bin" push "oci:$layout:$image" --store "$store" --key "$key" --name "$image.$wl" --json >/dev/null
done

note "the registry and the baseline (pull + unpack + run)"
registry_port=$(free_port)
mkdir -p "$work/registry"
cat >"$work/registry.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$registry_port
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$registry_port/v2/" >/dev/null && break
    sleep 0.1
done
for tag in app-v1 tally-v1; do
    skopeo copy --quiet --dest-tls-verify=false "oci:$layout:$tag" "docker://127.0.0.1:$registry_port/corpus:$tag"
done

for spec in "${workloads[@]}"; do
    read -r wl image kind rest <<<"$spec"
    pulled=$work/pulled bundle=$work/bundle
    rm -rf "$pulled" "$bundle"
    drop_caches
    t0=$(now)
    skopeo copy --quiet --src-tls-verify=false "docker://127.0.0.1:$registry_port/corpus:$image" "oci:$pulled:$image"
    umoci unpack --image "$pulled:$image" "$bundle" >/dev/null
    unpacked=$(elapsed "$t0" "$(now)")
    read -r ready finished < <(run_workload "$bundle/rootfs" "$kind" "$rest")
    moved=$(du -sb "$pulled/blobs" | cut -f1)
    note "baseline $wl: ready ${ready}s, done ${finished}s (pull+unpack ${unpacked}s, $moved bytes)"
    emit --arg wl "$wl" --arg image "$image" --argjson ready "$ready" --argjson finished "$finished" \
        --argjson unpacked "$unpacked" --argjson moved "$moved" --arg load "$(load)" \
        '{kind: "start", workload: $wl, image: $image, variant: "baseline", origin: "loopback registry",
          delay_ms: 0, rate_bytes_per_sec: null, ready_secs: $ready, done_secs: $finished,
          pull_unpack_secs: $unpacked, bytes_moved: $moved, load: $load}'
    rm -rf "$pulled" "$bundle"
done

# The floor of the device path on this host: the same flattened image as a
# local file on a plain loop device, page cache dropped. What a lazy start
# takes beyond it is FUSE + the engine + the origin.
note "the floor: the flattened image on a local loop device"
floor_root=$work/floor-root
mkdir -p "$floor_root"
mounted+=("$floor_root")
for spec in "${workloads[@]}"; do
    read -r wl image kind rest <<<"$spec"
    flat=$work/flat-$image.ext4
    [[ -e $flat ]] || "$bin" export --store "$store" --key "$key" --name "$image" --out "$flat" >/dev/null
    drop_caches
    t0=$(now)
    loop_dev=$(losetup -f --show -r "$flat")
    mount -o ro "$loop_dev" "$floor_root"
    read -r ready finished < <(run_workload "$floor_root" "$kind" "$rest")
    umount "$floor_root"
    losetup -d "$loop_dev" 2>/dev/null || true
    note "floor $wl: ready ${ready}s, done ${finished}s"
    emit --arg wl "$wl" --arg image "$image" --argjson ready "$ready" --argjson finished "$finished" \
        --arg load "$(load)" \
        '{kind: "floor", workload: $wl, image: $image, ready_secs: $ready, done_secs: $finished, load: $load}'
done
for spec in "${workloads[@]}"; do
    read -r _ image _ <<<"$spec"
    rm -f "$work/flat-$image.ext4"
done

fuse_mnt=$work/fuse
root=$work/root
mkdir -p "$fuse_mnt" "$root"
fuse_mnt=$(realpath "$fuse_mnt")
mounted+=("$root")
can_trace=false
has_subcommand "$bin" add --record-trace && can_trace=true
no_prefetch=()
$can_trace && no_prefetch=(--no-prefetch)

# lazy_start VARIANT WORKLOAD IMAGE KIND REST ORIGIN_URL DELAY RATE [ADD ARGS...]:
# one timed start through a fresh device cache.
lazy_start() {
    local variant=$1 wl=$2 image=$3 kind=$4 rest=$5 origin=$6 delay=$7 rate=$8
    shift 8
    local cache=$work/device-cache
    rm -rf "$cache"
    drop_caches
    t0=$(now)
    "$bin" add --store "$origin" --key "$key" --name "$image.$wl" --cache-dir "$cache" \
        --fuse "$fuse_mnt" --read-only "$@" >/dev/null
    mount -o loop,ro "$fuse_mnt/disk" "$root"
    local ready finished
    read -r ready finished < <(run_workload "$root" "$kind" "$rest")
    local stats
    stats=$("$bin" list --json | jq -c --arg m "$fuse_mnt" '.[] | select(.target == $m) | .stats')
    umount "$root"
    "$bin" del --fuse "$fuse_mnt" >/dev/null
    [[ $variant == record ]] && return 0
    local moved fetched
    # Bytes from the origin: the last tier's when there are tiers.
    moved=$(jq -r 'if (.tiers // []) == [] then .bytes_fetched else .tiers[-1].bytes end' <<<"$stats")
    fetched=$(jq -r '.chunks_fetched' <<<"$stats")
    note "$variant $wl @ ${delay}ms${rate:+/$rate B/s}: ready ${ready}s, done ${finished}s, $fetched chunks, $moved bytes from the origin"
    emit --arg variant "$variant" --arg wl "$wl" --arg image "$image" --argjson ready "$ready" \
        --argjson finished "$finished" --argjson delay "$delay" --arg rate "$rate" --argjson moved "$moved" \
        --argjson stats "$stats" --arg load "$(load)" \
        '{kind: "start", workload: $wl, image: $image, variant: $variant,
          origin: ("\($delay) ms" + (if $rate == "" then "" else " at \(($rate | tonumber) * 8 / 1e6) Mbit/s" end)),
          delay_ms: $delay, rate_bytes_per_sec: (if $rate == "" then null else ($rate | tonumber) end),
          ready_secs: $ready, done_secs: $finished, bytes_moved: $moved,
          chunks_fetched: $stats.chunks_fetched, chunks_total: $stats.chunks_total,
          chunks_zero: $stats.chunks_zero, stats: $stats, load: $load}'
}

host_cache=$work/host-cache
# A recording device stores its trace through the server when it stops:
# without a write token the server refuses it, and every "prefetch" start
# would silently be a cold one.
write_token=$work/write-token
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$write_token"
for origin_spec in $origins; do
    delay=${origin_spec%@*} rate=
    [[ $origin_spec == *@* ]] && rate=$((${origin_spec#*@} * 1000000 / 8))
    serve_args=(serve --store "$store" --listen 127.0.0.1:0 --delay "$delay" --write-token-file "$write_token")
    [[ -n $rate ]] && serve_args+=(--rate "$rate")
    start_server "$work/serve-$delay" "$bin" "${serve_args[@]}"
    origin=$url
    serve_pid=${pids[-1]}
    for spec in "${workloads[@]}"; do
        read -r wl image kind rest <<<"$spec"
        # The untimed runs once, at the first origin: with
        # LAZYBLK_BENCH_ORIGINS=10 alone, the trace and the host cache must
        # still be there for the starts that use them.
        if [[ $origin_spec == "${origins%% *}" ]]; then
            lazy_start probe "$wl" "$image" "$kind" "$rest" "$origin" "$delay" "$rate" \
                --readahead-chunks 0 "${no_prefetch[@]}"
            if $can_trace; then
                lazy_start record "$wl" "$image" "$kind" "$rest" "$origin" "$delay" "$rate" \
                    --record-trace --no-prefetch --token-file "$write_token"
                "$bin" trace show --store "$store" --key "$key" --name "$image.$wl" >/dev/null ||
                    die "the recorded trace of $image.$wl was not stored (see the device log)"
            fi
            # Fills the host cache for the warm starts.
            rm -rf "$host_cache.$wl"
            lazy_start record "$wl" "$image" "$kind" "$rest" "$origin" "$delay" "$rate" \
                --host-cache "$host_cache.$wl" "${no_prefetch[@]}"
        fi
        lazy_start cold "$wl" "$image" "$kind" "$rest" "$origin" "$delay" "$rate" "${no_prefetch[@]}"
        if $can_trace; then
            lazy_start prefetch "$wl" "$image" "$kind" "$rest" "$origin" "$delay" "$rate"
        fi
        lazy_start warm "$wl" "$image" "$kind" "$rest" "$origin" "$delay" "$rate" \
            --host-cache "$host_cache.$wl"
    done
    kill "$serve_pid"
    wait "$serve_pid" 2>/dev/null || true
done
note "results in $results (load average $(load))"
