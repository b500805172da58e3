#!/usr/bin/env bash
# The NBD export against what a user would reach for today: nbdkit's curl
# plugin with its cache filter, both reading the same random image from a
# loopback HTTP origin, under the same fio jobs (fio's nbd engine, over a
# Unix socket). Prints a Markdown report on stdout (progress on stderr).
#
#   lazyblk: `lazyblk serve` (the chunk server) over a directory store of
#            the pushed image -> `lazyblk add --nbd unix:…`
#   nbdkit:  nginx serving the raw image file (range requests) ->
#            `nbdkit --filter=cache curl` with cache-on-read=true
# Jobs: 1 MiB sequential reads of the whole image at queue depth 8, and
# 4 KiB random reads at queue depth 32 for FIO_RUNTIME seconds. Cold: a new
# device (lazyblk: a fresh cache directory; nbdkit: a fresh process and
# cache), the origin's files in the page cache. Warm: the same job after one
# whole sequential read. The image is random data, so every chunk is stored
# and every cold read is fetched.
#
# Environment: LAZYBLK_BENCH_DIR (default: a fresh directory under
# /var/tmp), LAZYBLK_NBD_IMAGE (default 512M), FIO_RUNTIME (default 10),
# LAZYBLK_BENCH_BIN (a lazyblk binary instead of this checkout's release build).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

image_size=${LAZYBLK_NBD_IMAGE:-512M}
runtime=${FIO_RUNTIME:-10}
"$REPO_ROOT/scripts/install-deps.sh" >&2
load=$(cut -d' ' -f1-3 /proc/loadavg)
if [[ -n ${LAZYBLK_BENCH_BIN:-} ]]; then
    bin=$LAZYBLK_BENCH_BIN
else
    note "cargo build --release"
    bin=$(build_release)
fi
bench_work_dir /var/tmp lazyblk-bench-nbd
pids=()
cleanup() {
    "$bin" del --all --force >/dev/null 2>&1 || true
    local pid
    for pid in "${pids[@]}" $(cat "$work"/nbdkit*.pid 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    if [[ -f $work/nginx/nginx.pid ]]; then kill "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
export LAZYBLK_RUN_DIR=$work/run
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

note "image of $image_size random bytes, pushed to a directory store"
head -c "$image_size" /dev/urandom >"$work/image.raw"
image_bytes=$(stat -c %s "$work/image.raw")
"$bin" keygen --out "$work/key" >&2
"$bin" push --store "$work/store" --key "$work/key" --name img "$work/image.raw" >&2
# Both origins answer from the page cache.
cat "$work/image.raw" >/dev/null
find "$work/store" -type f -exec cat {} + >/dev/null

"$bin" serve --store "$work/store" --listen 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
pids+=($!)
until [[ -s $work/serve.out ]]; do sleep 0.1; done
origin=$(head -n 1 "$work/serve.out")

nginx_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
user root;
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    server {
        listen 127.0.0.1:$nginx_port;
        root $work;
    }
}
CONF
nginx -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log"
until curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$nginx_port/image.raw"; do sleep 0.1; done

# fio JOB URI: prints IOPS for rand, MiB/s for seq.
fio_job() {
    local job=$1 uri=$2 out=$work/fio.json
    case $job in
    seq) fio --name=seq --ioengine=nbd --uri="$uri" --rw=read --bs=1M --iodepth=8 \
        --size="$image_bytes" --output-format=json --output="$out" >&2 ;;
    rand) fio --name=rand --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 \
        --size="$image_bytes" --time_based --runtime="$runtime" --output-format=json --output="$out" >&2 ;;
    esac
    case $job in
    seq) jq -r '.jobs[0].read.bw_bytes / 1048576 | floor' "$out" ;;
    rand) jq -r '.jobs[0].read.iops | floor' "$out" ;;
    esac
}

# start_lazyblk N: a fresh device; prints its URI.
start_lazyblk() {
    "$bin" add --store "$origin" --key "$work/key" --name img --cache-dir "$work/cache$1" \
        --nbd "unix:$work/lazyblk$1.sock" | awk '{print $1}'
}
stop_lazyblk() { "$bin" del --force --nbd "unix:$work/lazyblk$1.sock" >&2; }

# start_nbdkit N: a fresh nbdkit (its cache starts empty); prints its URI.
start_nbdkit() {
    local sock=$work/nbdkit$1.sock
    TMPDIR=$work nbdkit -U "$sock" -P "$work/nbdkit$1.pid" \
        --filter=cache curl "url=http://127.0.0.1:$nginx_port/image.raw" cache-on-read=true \
        >/dev/null 2>>"$work/nbdkit.err"
    until [[ -S $sock && -s $work/nbdkit$1.pid ]]; do sleep 0.1; done
    printf 'nbd+unix:///?socket=%s\n' "$sock"
}
stop_nbdkit() { kill "$(cat "$work/nbdkit$1.pid")" 2>/dev/null || true; }

declare -A result
for side in lazyblk nbdkit; do
    note "$side: cold seq, warm seq, warm rand"
    uri=$("start_$side" 1)
    result[$side.cold.seq]=$(fio_job seq "$uri")
    result[$side.warm.seq]=$(fio_job seq "$uri")
    result[$side.warm.rand]=$(fio_job rand "$uri")
    "stop_$side" 1
    note "$side: cold rand"
    uri=$("start_$side" 2)
    result[$side.cold.rand]=$(fio_job rand "$uri")
    "stop_$side" 2
done

cat <<EOF
### NBD export vs nbdkit curl + cache ($(date -u +%Y-%m-%d), load average at start: $load)

\`scripts/bench-nbd.sh\` (image $image_size of random data, FIO_RUNTIME=$runtime, fio --ioengine=nbd over a Unix socket; lazyblk's origin is \`lazyblk serve\`, nbdkit's is nginx, both on loopback from the page cache)

| job | lazyblk | nbdkit --filter=cache curl | lazyblk / nbdkit |
|---|---|---|---|
EOF
for state in cold warm; do
    printf '| %s 1 MiB seq read, QD8 (MiB/s) | %s | %s | %s |\n' "$state" \
        "${result[lazyblk.$state.seq]}" "${result[nbdkit.$state.seq]}" \
        "$(ratio "${result[lazyblk.$state.seq]}" "${result[nbdkit.$state.seq]}")"
    printf '| %s 4 KiB rand read, QD32 (IOPS) | %s | %s | %s |\n' "$state" \
        "${result[lazyblk.$state.rand]}" "${result[nbdkit.$state.rand]}" \
        "$(ratio "${result[lazyblk.$state.rand]}" "${result[nbdkit.$state.rand]}")"
done
