#!/usr/bin/env bash
# Crypto throughput of push and fetch against the bound OpenSSL sets on this
# machine, measured in the same run. Prints a Markdown report on stdout
# (progress goes to stderr), ready for docs/BENCHMARKS.md.
#
# Bounds, single core, from `openssl speed` at the chunk size (512 KiB):
#   push  = 1 / (2/sha256 + 1/aes)   two SHA-256 passes (key, id), one AES-GCM
#   fetch = 1 / (1/sha256 + 1/aes)   one SHA-256 pass (id check), one AES-GCM
#
# Environment: LAZYBLK_BENCH_BYTES (default 1G) and LAZYBLK_BENCH_ROUNDS
# (default 3) size the in-process benchmark; LAZYBLK_PUSH_BYTES (default 1G)
# the end-to-end push image; OPENSSL_SECONDS (default 3) and OPENSSL_RUNS
# (default 3) each openssl figure, the best run counting, as in the
# in-process benchmark: on a shared machine the fastest run is the one
# least disturbed by others.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/install-deps.sh" >&2
# Other work on the machine moves every figure: the report records it.
load=$(cut -d' ' -f1-3 /proc/loadavg)

openssl_seconds=${OPENSSL_SECONDS:-3}
openssl_runs=${OPENSSL_RUNS:-3}
push_bytes=${LAZYBLK_PUSH_BYTES:-1G}

# MB/s (10^6 bytes/s) of one EVP algorithm at 512 KiB, one process, best
# of $openssl_runs runs.
openssl_mbps() {
    local out best=0 mbps _
    for _ in $(seq "$openssl_runs"); do
        out=$(openssl speed -bytes 524288 -seconds "$openssl_seconds" -evp "$1" 2>/dev/null) ||
            die "openssl speed -evp $1 failed"
        # The last line reads e.g. "AES-256-GCM    3138412.35k": 1000s of bytes/s.
        mbps=$(awk 'END { v = $NF; sub(/k$/, "", v); if (v + 0 <= 0) exit 1; printf "%.1f\n", v / 1000 }' <<<"$out") ||
            die "cannot read a figure from openssl speed -evp $1: $out"
        best=$(awk -v a="$best" -v b="$mbps" 'BEGIN { print (b > a ? b : a) }')
    done
    printf '%s\n' "$best"
}

note "openssl speed -evp sha256 (best of $openssl_runs x ${openssl_seconds} s)"
ossl_sha=$(openssl_mbps sha256)
note "openssl speed -evp aes-256-gcm (best of $openssl_runs x ${openssl_seconds} s)"
ossl_aes=$(openssl_mbps aes-256-gcm)
push_bound=$(awk -v s="$ossl_sha" -v a="$ossl_aes" 'BEGIN { printf "%.1f\n", 1 / (2 / s + 1 / a) }')
fetch_bound=$(awk -v s="$ossl_sha" -v a="$ossl_aes" 'BEGIN { printf "%.1f\n", 1 / (1 / s + 1 / a) }')

note "cargo bench --bench crypto"
bench_out=$(cargo bench --quiet --bench crypto) || die "cargo bench --bench crypto failed"
declare -A fig
while IFS='=' read -r key value; do
    [[ $key =~ ^[a-z0-9_]+$ && -n $value ]] && fig[$key]=$value
done <<<"$bench_out"
for key in bytes push_mbps fetch_mbps sha256_sha2_mbps sha256_ring_mbps \
    aes256gcm_ring_seal_mbps aes256gcm_rustcrypto_seal_mbps; do
    [[ -n ${fig[$key]:-} ]] || die "the crypto benchmark printed no $key; its output was:
$bench_out"
done

row() { # name, MB/s, bound, what the bound is
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$(ratio "$2" "$3")" "$4"
}

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "## Crypto throughput, single core"
echo
echo "Machine: ${cpu:-unknown CPU}, $(nproc) cores; $(openssl version | cut -d' ' -f1-2); $(rustc --version | cut -d' ' -f1-2); load average before the run: $load."
echo "Command: \`scripts/bench-crypto.sh\` (\`cargo bench --bench crypto\` on $((fig[bytes] >> 20)) MiB of random data in 512 KiB chunks, best of ${LAZYBLK_BENCH_ROUNDS:-3} passes; best of $openssl_runs runs of \`openssl speed -bytes 524288 -seconds $openssl_seconds -evp ...\`). MB = 10^6 bytes."
echo
echo "| figure | MB/s | bound MB/s | ratio | bound |"
echo "| --- | ---: | ---: | ---: | --- |"
row "push: \`seal_chunk\` (SHA-256 key, AES-256-GCM, SHA-256 id)" "${fig[push_mbps]}" "$push_bound" "1/(2/sha256 + 1/aes), openssl"
row "fetch: \`open_chunk\` (SHA-256 id, AES-256-GCM open)" "${fig[fetch_mbps]}" "$fetch_bound" "1/(1/sha256 + 1/aes), openssl"
row "SHA-256, sha2 crate" "${fig[sha256_sha2_mbps]}" "$ossl_sha" "openssl sha256"
row "SHA-256, ring" "${fig[sha256_ring_mbps]}" "$ossl_sha" "openssl sha256"
row "AES-256-GCM seal, ring" "${fig[aes256gcm_ring_seal_mbps]}" "$ossl_aes" "openssl aes-256-gcm"
row "AES-256-GCM seal, aes-gcm crate (RustCrypto)" "${fig[aes256gcm_rustcrypto_seal_mbps]}" "$ossl_aes" "openssl aes-256-gcm"
row "openssl sha256" "$ossl_sha" "$ossl_sha" "itself"
row "openssl aes-256-gcm" "$ossl_aes" "$ossl_aes" "itself"
echo

# End to end: a real `lazyblk push` of random data (nothing deduplicates,
# nothing is zero) into a fresh directory store on tmpfs, so disk speed
# does not enter the figure.
echo "## End-to-end push"
echo
note "cargo build --release"
bin=$(build_release)
if ! has_subcommand "$bin" push --store || ! has_subcommand "$bin" keygen --out; then
    echo "Skipped: this build of \`lazyblk\` has no \`push\`/\`keygen\` subcommand yet."
    note "skipping the end-to-end push: lazyblk push is not built yet"
    exit 0
fi

work=$(mktemp -d /dev/shm/lazyblk-bench-crypto.XXXXXX)
trap 'rm -rf "$work"' EXIT
note "writing $push_bytes of random data to $work/image"
head -c "$push_bytes" /dev/urandom >"$work/image"
"$bin" keygen --out "$work/key" >&2
note "lazyblk push ($push_bytes) to a fresh store on tmpfs"
/usr/bin/time -f '%e %U %S' -o "$work/time" \
    "$bin" push "$work/image" --store "$work/store" --key "$work/key" --name bench --json >"$work/push.json" ||
    die "lazyblk push failed"
read -r elapsed user sys <"$work/time"
image_bytes=$(jq -r .image_bytes "$work/push.json")
uploaded=$(jq -r .chunks_uploaded "$work/push.json")

# One row per timed command: wall time, CPU time, MB/s on the wall clock and
# per core (bytes / CPU seconds), and the per-core ratio to its bound.
timed_row() { # label, time file, bound
    local elapsed user sys cpu_s wall_mbps core_mbps
    read -r elapsed user sys <"$2"
    cpu_s=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f\n", u + s }')
    # Parenthesised: a bare ">" after printf would be awk's output redirection.
    wall_mbps=$(awk -v b="$image_bytes" -v t="$elapsed" 'BEGIN { printf "%.1f\n", (t > 0 ? b / t / 1e6 : 0) }')
    core_mbps=$(awk -v b="$image_bytes" -v t="$cpu_s" 'BEGIN { printf "%.1f\n", (t > 0 ? b / t / 1e6 : 0) }')
    printf '| %s | %s s | %s s | %s | %s | %s | %s |\n' "$1" "$elapsed" "$cpu_s" "$wall_mbps" "$core_mbps" "$3" "$(ratio "$core_mbps" "$3")"
}

note "lazyblk push again: every chunk is already stored"
/usr/bin/time -f '%e %U %S' -o "$work/time-again" \
    "$bin" push "$work/image" --store "$work/store" --key "$work/key" --name bench --json >"$work/push-again.json" ||
    die "second lazyblk push failed"
[[ $(jq -r .chunks_uploaded "$work/push-again.json") == 0 ]] || die "the second push uploaded chunks"

note "lazyblk export: fetch, verify and decrypt every chunk"
/usr/bin/time -f '%e %U %S' -o "$work/time-export" \
    "$bin" export --store "$work/store" --key "$work/key" --name bench --out "$work/exported" >/dev/null ||
    die "lazyblk export failed"
cmp "$work/image" "$work/exported" || die "the exported image differs from the pushed one"

echo "Commands: \`lazyblk push IMAGE --store DIR --key KEY --name bench --json\` of $((image_bytes >> 20)) MiB from /dev/urandom into a fresh directory store on tmpfs ($uploaded chunks uploaded), the same push again (every chunk already stored), and \`lazyblk export\` of it back to tmpfs (compared with \`cmp\`), each timed with \`/usr/bin/time\`. Per core = bytes / (user + system CPU seconds); the bound is the single-core one above."
echo
echo "| command | wall | CPU (user + system) | MB/s (wall) | MB/s per core | bound | ratio |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
timed_row "push, fresh store" "$work/time" "$push_bound"
timed_row "push, all chunks stored" "$work/time-again" "$push_bound"
timed_row "export (fetch path)" "$work/time-export" "$fetch_bound"
