#!/usr/bin/env bash
# Soak: devices under verified load, fetching through a faulty network,
# while the chunk server also serves a wrk flood. Not part of CI.
#
# 4 FUSE devices (each loop-attached) of one image, each under 8 fio jobs
# (random reads and writes, crc32c verification of every block written,
# checked as it goes). The devices read through `lazyblk fault-proxy`
# injecting SOAK_FAULT_RATE of faults (5xx, resets, stalls, truncated
# bodies, flipped bits, in equal shares) on chunk reads, with the chunk
# server itself as the tier below; wrk hammers the same server with chunk
# GETs meanwhile. Reports fio's errors (must be 0), each process's RSS and
# open file descriptors at the start and end, the faults injected and the
# load average, as Markdown on stdout.
#
#   SOAK_SECONDS=600 scripts/soak.sh          # the default: 10 minutes
#   SOAK_SECONDS=180 SOAK_IMAGE_MIB=512 scripts/soak.sh
#   LAZYBLK_BIN=target/debug/lazyblk scripts/soak.sh   # skip the release build
#
# Needs root, FUSE, loop devices, fio, wrk and jq (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib/common.sh

seconds=${SOAK_SECONDS:-600}
image_mib=${SOAK_IMAGE_MIB:-512}
fault_rate=${SOAK_FAULT_RATE:-0.01}
devices=4
jobs=8
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "SOAK_SECONDS must be a positive number of seconds"
[[ $image_mib =~ ^[1-9][0-9]*$ ]] && ((image_mib % (jobs * 4) == 0)) ||
    die "SOAK_IMAGE_MIB must be a multiple of $((jobs * 4))"
for tool in fio wrk jq losetup fusermount3 curl; do
    command -v "$tool" >/dev/null || die "needs $tool (scripts/install-deps.sh)"
done
(($(id -u) == 0)) || die "needs root (loop devices)"

bin=${LAZYBLK_BIN:-$(build_release)}
work=$(mktemp -d /tmp/lazyblk-soak.XXXXXX)
export LAZYBLK_RUN_DIR=$work/run
pids=()
loops=()
mounts=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for loop in "${loops[@]}"; do losetup -d "$loop" 2>/dev/null || true; done
    for mnt in "${mounts[@]}"; do "$bin" del --fuse "$mnt" >/dev/null 2>&1 || umount -l "$mnt" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts a command that prints its URL first, in the background; sets $url.
start_printing_url() {
    local log=$1
    shift
    "$@" >"$log" 2>"$log.err" &
    pids+=($!)
    for _ in $(seq 100); do
        url=$(head -n 1 "$log" 2>/dev/null || true)
        [[ $url == http://* ]] && return 0
        sleep 0.1
    done
    die "$* printed no URL: $(cat "$log.err")"
}

# RSS in KiB and open file descriptors of a process.
usage_of() {
    local pid=$1
    printf '%s %s\n' "$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")" "$(ls "/proc/$pid/fd" | wc -l)"
}

note "image of $image_mib MiB, $devices devices x $jobs fio jobs, $seconds s, faults at $fault_rate"
"$bin" keygen --out "$work/key" >/dev/null
head -c $((image_mib << 20)) /dev/urandom >"$work/image.raw"
"$bin" push --store "$work/store" --key "$work/key" --name soak "$work/image.raw" >/dev/null
rm "$work/image.raw"

start_printing_url "$work/serve.out" "$bin" serve --store "$work/store" --listen 127.0.0.1:0
server=$url
server_pid=${pids[-1]}
share=$(awk -v r="$fault_rate" 'BEGIN { printf "%.6f", r / 5 }')
start_printing_url "$work/proxy.out" "$bin" fault-proxy --upstream "$server" --only-under /v1/chunks/ \
    --error-rate "$share" --reset-rate "$share" --stall-rate "$share" \
    --truncate-rate "$share" --flip-rate "$share" --seed 1
proxy=$url
proxy_pid=${pids[-1]}

device_pids=()
for d in $(seq "$devices"); do
    mnt=$work/fuse$d
    mkdir -p "$mnt"
    # The proxy first, the server itself below it: a damaged or stalled
    # read through the proxy is read again from the server directly.
    "$bin" add --store "$proxy" --store "$server" --key "$work/key" --name soak \
        --cache-dir "$work/cache$d" --fuse "$mnt" >/dev/null
    mounts+=("$mnt")
    loops+=("$(losetup -f --show "$mnt/disk")")
    device_pids+=("$("$bin" list --json | jq -r --arg t "$mnt" '.[] | select(.target == $t) | .pid')")
done

chunk=$(curl -sf "$server/v1/chunks?limit=1" | jq -r '.chunks[0].id')
wrk -t 2 -c 32 -d "${seconds}s" "$server/v1/chunks/$chunk" >"$work/wrk.out" 2>&1 &
pids+=($!)
wrk_pid=$!

region=$((image_mib / jobs))
fio_pids=()
for d in $(seq "$devices"); do
    fio --name="soak$d" --filename="${loops[d - 1]}" --direct=1 --ioengine=libaio \
        --rw=randrw --rwmixread=50 --bsrange=4k-64k --iodepth=4 \
        --numjobs="$jobs" --size="${region}M" --offset_increment="${region}M" \
        --verify=crc32c --verify_backlog=64 --verify_fatal=1 --verify_state_save=0 \
        --time_based --runtime="$seconds" \
        --output-format=json --output="$work/fio$d.json" >/dev/null 2>&1 &
    fio_pids+=($!)
done

# The start: once the devices have fetched their first chunks.
sleep 15
processes=("server $server_pid" "fault-proxy $proxy_pid")
for d in $(seq "$devices"); do processes+=("device$d ${device_pids[d - 1]}"); done
declare -A start_usage
for entry in "${processes[@]}"; do
    set -- $entry
    start_usage[$1]=$(usage_of "$2")
done
load_start=$(cut -d ' ' -f 1-3 /proc/loadavg)

# The end: just before fio stops.
sleep $((seconds > 25 ? seconds - 25 : 1))
declare -A end_usage
for entry in "${processes[@]}"; do
    set -- $entry
    end_usage[$1]=$(usage_of "$2")
done
load_end=$(cut -d ' ' -f 1-3 /proc/loadavg)

failed=0
for d in $(seq "$devices"); do
    wait "${fio_pids[d - 1]}" || failed=$((failed + 1))
done
wait "$wrk_pid" || true

printf '## Soak: %d devices x %d fio jobs, %d s, faults at %s\n\n' "$devices" "$jobs" "$seconds" "$fault_rate"
printf '| device | fio errors | read | written | engine integrity failures | proxy tier: errors, timeouts, corrupt | server tier hits |\n|---|---|---|---|---|---|---|\n'
errors_total=0
for d in $(seq "$devices"); do
    json=$(sed -n '/^{/,$p' "$work/fio$d.json")
    errors=$(jq '[.jobs[].error] | add' <<<"$json")
    errors_total=$((errors_total + errors))
    read_mib=$(jq '[.jobs[].read.io_bytes] | add / 1048576 | floor' <<<"$json")
    write_mib=$(jq '[.jobs[].write.io_bytes] | add / 1048576 | floor' <<<"$json")
    stats=$("$bin" list --json | jq --arg t "$work/fuse$d" '.[] | select(.target == $t) | .stats')
    printf '| %d | %s | %s MiB | %s MiB | %s | %s, %s, %s |  %s |\n' "$d" "$errors" "$read_mib" "$write_mib" \
        "$(jq .integrity_failures <<<"$stats")" \
        "$(jq '.tiers[0].errors' <<<"$stats")" "$(jq '.tiers[0].timeouts' <<<"$stats")" \
        "$(jq '.tiers[0].integrity_failures' <<<"$stats")" \
        "$(jq '.tiers[1].hits' <<<"$stats")"
done
printf '\n| process | RSS start | RSS end | fds start | fds end |\n|---|---|---|---|---|\n'
for entry in "${processes[@]}"; do
    set -- $entry
    read -r rss0 fd0 <<<"${start_usage[$1]}"
    read -r rss1 fd1 <<<"${end_usage[$1]}"
    printf '| %s | %d MiB | %d MiB | %d | %d |\n' "$1" $((rss0 / 1024)) $((rss1 / 1024)) "$fd0" "$fd1"
done
faults=$(curl -sf "$proxy/_fault-proxy/stats" | jq -c 'del(.gets_by_path)')
printf '\nFaults injected: `%s`\n\n' "$faults"
printf 'wrk against the server meanwhile: %s\n\n' "$(grep -E 'Requests/sec|Non-2xx|Socket errors' "$work/wrk.out" | tr -s ' ' | paste -sd ';')"
printf 'Load average (1, 5, 15 min): %s at the start, %s at the end.\n' "$load_start" "$load_end"
((failed == 0 && errors_total == 0)) || die "fio reported $errors_total errors ($failed fio runs failed)"
