#!/usr/bin/env bash
# The chunk server (`lazyblk serve`) on loopback, each figure against a
# baseline measured in the same run:
#   (a) push of an image of random data over HTTP, fresh and repeated,
#       against the push to a directory store;
#   (b) the server against nginx serving the same chunk files from disk,
#       wrk with 64 connections, requests/s and MB/s; then a caching server
#       (serve --origin) answering from its memory;
#   (c) a cold export (every chunk fetched through the engine's fetch path)
#       from the server with 0, 5 and 20 ms added to each chunk GET, through
#       an empty host cache as a host runs it (tiers: host cache, then the
#       server), with each tier's chunk fetch p50/p99 from export's report;
#       then the same export again, served by the now warm host cache.
# Prints a Markdown report on stdout (progress goes to stderr), ready for
# docs/BENCHMARKS.md.
#
# Environment: LAZYBLK_BENCH_BYTES (default 1G) sizes the image;
# LAZYBLK_BENCH_SECONDS (default 10) is each wrk run; LAZYBLK_BENCH_DIR
# names the work directory (default: a fresh one under $TMPDIR or
# /var/tmp, removed at the end); LAZYBLK_BENCH_ONLY=push runs (a) alone;
# LAZYBLK_BENCH_BIN names a binary to measure instead of building one.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/install-deps.sh" >&2
bytes=${LAZYBLK_BENCH_BYTES:-1G}
seconds=${LAZYBLK_BENCH_SECONDS:-10}

only=${LAZYBLK_BENCH_ONLY:-}
[[ -z $only || $only == push ]] || die "LAZYBLK_BENCH_ONLY takes only push, not $only"
if [[ -n ${LAZYBLK_BENCH_BIN:-} ]]; then
    bin=$LAZYBLK_BENCH_BIN
    [[ -x $bin ]] || die "LAZYBLK_BENCH_BIN=$bin is no executable"
else
    note "cargo build --release"
    bin=$(build_release)
fi

bench_work_dir "${TMPDIR:-/var/tmp}" lazyblk-bench-http
servers=()
cleanup() {
    local pid
    for pid in "${servers[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -z ${LAZYBLK_BENCH_DIR:-} ]]; then
        rm -rf "$work"
    fi
}
trap cleanup EXIT

note "writing $bytes of random data to $work/image"
head -c "$bytes" /dev/urandom >"$work/image"
image_bytes=$(stat -c %s "$work/image")
"$bin" keygen --out "$work/key" >&2
head -c 32 /dev/urandom | base64 >"$work/write.token"
load=$(cut -d' ' -f1-3 /proc/loadavg)

# Starts `lazyblk serve` in the background; sets $url.
serve() {
    local out=$work/serve.$RANDOM.out
    "$bin" serve --listen 127.0.0.1:0 "$@" >"$out" 2>>"$work/serve.err" &
    servers+=($!)
    until [[ -s $out ]]; do
        kill -0 "${servers[-1]}" 2>/dev/null || die "serve did not start: $(cat "$work/serve.err")"
        sleep 0.05
    done
    url=$(head -n1 "$out")
}

stop_last_server() { # [what: serve (default) or nginx]
    local pid=${servers[-1]}
    kill -TERM "$pid"
    if [[ ${1:-serve} == serve ]]; then
        wait "$pid" || die "serve exited non-zero after SIGTERM"
    else
        wait "$pid" || true
    fi
    unset 'servers[-1]'
}

# Runs a command under /usr/bin/time; sets $wall and $cpu (its user +
# system seconds).
timed() {
    /usr/bin/time -f '%e %U %S' -o "$work/time" "$@" >"$work/last.out" 2>"$work/last.err" ||
        die "$* failed: $(cat "$work/last.err")"
    read -r wall user sys <"$work/time"
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f\n", u + s }')
}
# CPU seconds (user + system, every thread) process $1 has used so far.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$1/stat"; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f\n", a - b }'; }
mbps() { awk -v b="$image_bytes" -v s="$1" 'BEGIN { printf "%.0f\n", b / 1e6 / s }'; }

# (a) push.
push_args=(--key "$work/key" --name bench --json)
dir_store=$work/dir-store
note "push to a directory store"
timed "$bin" push "$work/image" --store "$dir_store" "${push_args[@]}"
dir_push=$wall dir_cpu=$cpu
serve --store "$work/served-store" --write-token-file "$work/write.token"
note "push to $url"
server_before=$(cpu_of "${servers[-1]}")
timed "$bin" push "$work/image" --store "$url" --token-file "$work/write.token" "${push_args[@]}"
http_push=$wall http_cpu=$cpu
server_cpu=$(minus "$(cpu_of "${servers[-1]}")" "$server_before")
note "push to $url again"
timed "$bin" push "$work/image" --store "$url" --token-file "$work/write.token" "${push_args[@]}"
http_push_again=$wall
[[ $(jq -r .chunks_uploaded "$work/last.out") == 0 ]] || die "the repeated push uploaded chunks"
again_requests=$(curl -s "$url/metrics" | awk '/^lazyblk_http_requests_total\{route="chunk_missing"/ { n += $2 } END { print n + 0 }')
note "push to the directory store again"
timed "$bin" push "$work/image" --store "$dir_store" "${push_args[@]}"
dir_push_again=$wall
stop_last_server

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
print_push() {
    echo "### HTTP chunk server"
    echo
    echo "Machine: ${cpu_model:-unknown CPU}, $(nproc) cores${nginx_version:+; $nginx_version}; load average before the run: $load."
    echo "Image: $image_bytes bytes of random data (every chunk distinct), 512 KiB chunks. Command: \`scripts/bench-http.sh\`."
    echo
    echo "| push | time | MB/s | vs directory store | CPU s (client + server) |"
    echo "|---|---|---|---|---|"
    printf '| directory store, fresh | %s s | %s | 1 | %s |\n' "$dir_push" "$(mbps "$dir_push")" "$dir_cpu"
    printf '| http:// on loopback, fresh | %s s | %s | %s | %s + %s |\n' "$http_push" "$(mbps "$http_push")" "$(ratio "$dir_push" "$http_push")" "$http_cpu" "$server_cpu"
    printf '| directory store, repeated | %s s | %s | 1 | |\n' "$dir_push_again" "$(mbps "$dir_push_again")"
    printf '| http://, repeated (nothing uploaded; %s missing batches) | %s s | %s | %s | |\n' "$again_requests" "$http_push_again" "$(mbps "$http_push_again")" "$(ratio "$dir_push_again" "$http_push_again")"
}
if [[ $only == push ]]; then
    print_push
    exit 0
fi

# (b) serve vs nginx on the same chunk files.
mapfile -t chunk_files < <(find "$dir_store/chunks" -type f | head -n 512)
((${#chunk_files[@]} > 0)) || die "no chunk files in $dir_store"
chunk_bytes=$(stat -c %s "${chunk_files[0]}")
wrk_script() { # prefix-function name -> a wrk Lua script requesting every chunk in turn
    local file=$work/$1.lua
    {
        echo "local paths = {"
        local path
        for path in "${chunk_files[@]}"; do
            local id=${path##*/}
            if [[ $1 == nginx ]]; then
                echo "  \"/chunks/${id:0:2}/$id\","
            else
                echo "  \"/v1/chunks/$id\","
            fi
        done
        echo "}"
        echo "local i = 0"
        echo "request = function() i = i % #paths + 1; return wrk.format(\"GET\", paths[i]) end"
    } >"$file"
    printf '%s\n' "$file"
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Reads every chunk once so that both servers start from the page cache.
cat "${chunk_files[@]}" >/dev/null

nginx_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
user root;
worker_processes 2;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    server {
        listen 127.0.0.1:$nginx_port;
        root $dir_store;
    }
}
CONF
nginx -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
servers+=($!)
until curl -s -o /dev/null "http://127.0.0.1:$nginx_port/"; do
    kill -0 "${servers[-1]}" 2>/dev/null || die "nginx did not start: $(cat "$work/nginx/error.log")"
    sleep 0.05
done
nginx_lua=$(wrk_script nginx)
curl -sf -o /dev/null "http://127.0.0.1:$nginx_port/chunks/$(basename "$(dirname "${chunk_files[0]}")")/$(basename "${chunk_files[0]}")" ||
    die "nginx does not serve the chunk files"

wrk_run() { # url, script -> sets $rps
    wrk -t2 -c64 -d"${seconds}s" -s "$2" "$1" >"$work/wrk.out" 2>&1 || die "wrk failed: $(cat "$work/wrk.out")"
    grep -q "Non-2xx" "$work/wrk.out" && die "wrk saw error answers: $(cat "$work/wrk.out")"
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$work/wrk.out")
}
note "wrk against nginx"
wrk_run "http://127.0.0.1:$nginx_port" "$nginx_lua"
nginx_rps=$rps
stop_last_server nginx
serve --store "$dir_store"
serve_lua=$(wrk_script serve)
note "wrk against $url"
wrk_run "$url" "$serve_lua"
serve_rps=$rps
stop_last_server
# The caching server with every chunk in its memory: read once before wrk.
serve --origin "$dir_store" --cache-dir "$work/server-cache" --cache-size 4G
for path in "${chunk_files[@]}"; do
    curl -sf -o /dev/null "$url/v1/chunks/${path##*/}" || die "the caching server does not serve ${path##*/}"
done
note "wrk against $url (caching server, memory warm)"
wrk_run "$url" "$serve_lua"
memory_rps=$rps
stop_last_server
rm -rf "$work/server-cache"

# (c) cold export through the engine's fetch path.
# "p50 / p99 ms" of tier $2 (0: the host cache, 1: the server) in the
# report export printed to $1.
tier_latency() {
    sed 's/^[^{]*//' "$1" | jq -r --argjson tier "$2" \
        '.tiers[$tier] | "\(.hit_latency_p50_us / 10 | round / 100) / \(.hit_latency_p99_us / 10 | round / 100) ms (\(.hits) hits)"'
}
declare -A export_wall export_latency
for delay in 0 5 20; do
    serve --store "$dir_store" --delay "$delay"
    note "cold export from $url with $delay ms per chunk GET"
    rm -rf "$work/out" "$work/host-cache"
    export_args=(--store "$url" --host-cache "$work/host-cache" --key "$work/key" --name bench --out "$work/out")
    timed "$bin" export "${export_args[@]}"
    export_wall[$delay]=$wall
    export_latency[$delay]=$(tier_latency "$work/last.out" 1)
    cmp -s "$work/image" "$work/out" || die "the export with $delay ms delay differs"
    if [[ $delay == 0 ]]; then
        note "export again, from the warm host cache"
        rm -f "$work/out"
        timed "$bin" export "${export_args[@]}"
        warm_export=$wall
        warm_latency=$(tier_latency "$work/last.out" 0)
        cmp -s "$work/image" "$work/out" || die "the export from the host cache differs"
    fi
    stop_last_server
done
rm -rf "$work/host-cache"
note "export from the directory store"
rm -f "$work/out"
timed "$bin" export --store "$dir_store" --key "$work/key" --name bench --out "$work/out"
dir_export=$wall
rm -f "$work/out"

mb() { awk -v r="$1" -v b="$chunk_bytes" 'BEGIN { printf "%.0f\n", r * b / 1e6 }'; }
nginx_version=$(nginx -v 2>&1 | sed 's/^nginx version: //')
print_push
echo
echo "| wrk -t2 -c64 -d${seconds}s, ${#chunk_files[@]} chunks of $chunk_bytes bytes round robin | req/s | MB/s | vs nginx |"
echo "|---|---|---|---|"
printf '| nginx (sendfile, 2 workers) | %s | %s | 1 |\n' "$nginx_rps" "$(mb "$nginx_rps")"
printf '| lazyblk serve (directory store) | %s | %s | %s |\n' "$serve_rps" "$(mb "$serve_rps")" "$(ratio "$serve_rps" "$nginx_rps")"
printf '| lazyblk serve --origin (chunks in its memory) | %s | %s | %s |\n' "$memory_rps" "$(mb "$memory_rps")" "$(ratio "$memory_rps" "$nginx_rps")"
echo
echo "| cold export (64 fetches in flight) | time | MB/s | chunk fetch p50 / p99 (tier) |"
echo "|---|---|---|---|"
printf '| directory store | %s s | %s | |\n' "$dir_export" "$(mbps "$dir_export")"
for delay in 0 5 20; do
    printf '| http://, %s ms per chunk GET, empty host cache | %s s | %s | %s (server) |\n' "$delay" "${export_wall[$delay]}" "$(mbps "${export_wall[$delay]}")" "${export_latency[$delay]}"
done
printf '| the same again, warm host cache | %s s | %s | %s (host cache) |\n' "$warm_export" "$(mbps "$warm_export")" "$warm_latency"
