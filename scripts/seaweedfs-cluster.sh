#!/usr/bin/env bash
# Runs a SeaweedFS cluster on loopback for the S3 tests and benchmarks: a
# master, three volume servers that keep every object on two of them
# (replication 001), a filer and an S3 gateway, each on its own free port,
# with all data under DIR.
#
#   scripts/seaweedfs-cluster.sh DIR
#
# When the cluster accepts writes it writes DIR/cluster.env (shell
# assignments: S3_ENDPOINT, S3_BUCKET, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_REGION, MASTER_URL, VOLUME_PIDS, SERVER_PIDS)
# and prints "ready" on stdout, then runs until it is signalled or the
# process that started it exits. Either way every server is killed. It
# exits non-zero, with the servers' logs on stderr, if the cluster is not
# up within SEAWEEDFS_START_TIMEOUT seconds (default 90).
#
# `weed` comes from $LAZYBLK_WEED, else from the tools cache (installed on
# first use; see scripts/lib/seaweedfs.sh). The bucket is $SEAWEEDFS_BUCKET
# (default lazyblk-test).
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/seaweedfs.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/seaweedfs.sh"

(($# == 1)) || die "usage: $0 DIR"
dir=$1
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
weed=$(ensure_weed) || die "no weed binary"
bucket=${SEAWEEDFS_BUCKET:-lazyblk-test}
access_key=lazyblk-test-key
secret_key=lazyblk-test-secret
region=us-east-1
timeout=${SEAWEEDFS_START_TIMEOUT:-90}
parent=$PPID

pids=()
stop_all() {
    trap - EXIT INT TERM
    # A server killed on purpose (a test stopping a volume server) is
    # already gone: kill the others regardless.
    if ((${#pids[@]})); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 143' INT TERM

show_logs() {
    local log
    for log in "$dir"/*.log; do
        printf '\n---- %s (last 40 lines) ----\n' "$log" >&2
        tail -n 40 "$log" >&2
    done
}
fail() {
    printf 'seaweedfs-cluster: %s\n' "$*" >&2
    show_logs
    exit 1
}

# Twelve ports the kernel hands out as free, held open together so they
# differ, then released for the servers. Every gRPC port is named
# explicitly, so SeaweedFS's default of port + 10000 never applies.
read -r -a ports < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(12)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
((${#ports[@]} == 12)) || die "could not find free ports"
master_port=${ports[0]} master_grpc=${ports[1]}
filer_port=${ports[8]} filer_grpc=${ports[9]}
s3_port=${ports[10]} s3_grpc=${ports[11]}
master=127.0.0.1:$master_port.$master_grpc

cat >"$dir/s3.json" <<EOF
{"identities":[{"name":"lazyblk","credentials":[{"accessKey":"$access_key","secretKey":"$secret_key"}],"actions":["Admin","Read","Write","List"]}]}
EOF

start() {
    local name=$1
    shift
    "$weed" "$@" >"$dir/$name.log" 2>&1 &
    pids+=($!)
}

mkdir -p "$dir/master"
start master master -ip=127.0.0.1 -ip.bind=127.0.0.1 -port="$master_port" -port.grpc="$master_grpc" \
    -mdir="$dir/master" -peers=none -defaultReplication=001 -volumeSizeLimitMB=256 -telemetry=false
volume_pids=()
for i in 1 2 3; do
    mkdir -p "$dir/volume$i"
    start "volume$i" volume -ip=127.0.0.1 -ip.bind=127.0.0.1 -port="${ports[2 * i]}" \
        -port.grpc="${ports[2 * i + 1]}" -dir="$dir/volume$i" -master="$master" -max=32 \
        -preStopSeconds=0
    volume_pids+=("${pids[-1]}")
done
mkdir -p "$dir/filer"
start filer filer -ip=127.0.0.1 -ip.bind=127.0.0.1 -port="$filer_port" -port.grpc="$filer_grpc" \
    -master="$master" -defaultStoreDir="$dir/filer" -localSocket="$dir/filer.sock"
start s3 s3 -ip.bind=127.0.0.1 -port="$s3_port" -port.grpc="$s3_grpc" -port.iceberg=0 \
    -port.lance=0 -filer="127.0.0.1:$filer_port.$filer_grpc" -config="$dir/s3.json" \
    -localSocket="$dir/s3.sock"

deadline=$((SECONDS + timeout))
# Polls until the command succeeds; fails with the logs at the deadline
# or when a server has already died.
await() {
    local what=$1
    shift
    until "$@" >/dev/null 2>&1; do
        local pid
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || fail "a server exited while waiting for $what"
        done
        ((SECONDS < deadline)) || fail "no $what after ${timeout} s"
        sleep 0.1
    done
}
s3() {
    curl -sf --max-time 10 --aws-sigv4 "aws:amz:$region:s3" --user "$access_key:$secret_key" "$@"
}
volumes_registered() {
    [[ $(curl -sf "http://127.0.0.1:$master_port/dir/status" | grep -o '"Url"' | wc -l) -ge 3 ]]
}
bucket_exists() { s3 -I "http://127.0.0.1:$s3_port/$bucket"; }
create_bucket() { bucket_exists || s3 -X PUT "http://127.0.0.1:$s3_port/$bucket"; }
# The first write makes the master grow volumes; until it has, writes fail.
probe_write() {
    local probe=$dir/probe
    echo probe >"$probe"
    s3 -T "$probe" "http://127.0.0.1:$s3_port/$bucket/.probe" &&
        s3 -X DELETE "http://127.0.0.1:$s3_port/$bucket/.probe"
}

await "master" curl -sf "http://127.0.0.1:$master_port/cluster/status"
await "three volume servers registered" volumes_registered
await "filer" curl -sf -o /dev/null "http://127.0.0.1:$filer_port/"
await "bucket $bucket" create_bucket
await "a successful write" probe_write

cat >"$dir/cluster.env.tmp" <<EOF
S3_ENDPOINT=http://127.0.0.1:$s3_port
S3_BUCKET=$bucket
AWS_ACCESS_KEY_ID=$access_key
AWS_SECRET_ACCESS_KEY=$secret_key
AWS_REGION=$region
MASTER_URL=http://127.0.0.1:$master_port
VOLUME_PIDS="${volume_pids[*]}"
SERVER_PIDS="${pids[*]}"
EOF
mv "$dir/cluster.env.tmp" "$dir/cluster.env"
echo ready

# The process this one is a child of now: when the one that started it
# exits, it is reparented (to init or a subreaper).
current_parent() {
    local stat ppid
    read -r stat <"/proc/$$/stat"
    stat=${stat##*) }
    read -r _ ppid _ <<<"$stat"
    printf '%s\n' "$ppid"
}

# Runs until signalled, or until whoever started it is gone (a test that
# crashed cannot run its cleanup; this reaps its cluster). Started already
# orphaned, it runs until signalled.
while [[ $(current_parent) == "$parent" ]]; do
    sleep 1
done
