#!/usr/bin/env bash
# Builds the image corpus the cold-start benchmark and `lazyblk report` use:
# real images made here from Debian's and PyPI's packages, written with umoci
# into one OCI layout, one tag per image:
#
#   base        Debian minbase (debootstrap --variant=minbase)       1 layer
#   python      + python3, python3-venv (apt) + a venv with numpy
#               and requests (pip)                                  +2 layers
#   app-v1..v5  + the app's dependencies (pip) + its code           +2 layers
#               v1  the app
#               v2  v1 rebuilt from scratch, nothing changed
#               v3  a one-line change in the handler
#               v4  a dependency bump (requests) on top of v3
#               v5  a new data file on top of v4
#   tally-v1    a second, unrelated app on the same python image    +2 layers
#
# The app layers are built the way CI builds them (every version from the
# python image, anew), with the mtimes of what a build step touched set to
# SOURCE_DATE_EPOCH, as reproducible builds do, so a rebuild with no change
# is byte-identical; pip then writes hash-checked .pyc files, which stay
# valid whatever the mtimes.
#
# Idempotent: tags already in the layout are kept. The corpus lives in
# LAZYBLK_CORPUS_DIR (default ~/.cache/lazyblk/corpus); its layout is
# $LAZYBLK_CORPUS_DIR/oci. Needs root (debootstrap, chroot) and Debian's and
# PyPI's package mirrors; nothing else from the network.
#
# Prints, on stdout, a Markdown table of the tags' sizes and layer counts.
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

corpus=${LAZYBLK_CORPUS_DIR:-$HOME/.cache/lazyblk/corpus}
suite=${LAZYBLK_CORPUS_SUITE:-bookworm}
mirror=${LAZYBLK_CORPUS_MIRROR:-http://deb.debian.org/debian}
# 2025-01-01T00:00:00Z: the build date every reproducible file carries.
epoch=1735689600
numpy_version=1.26.4
requests_version=2.31.0
requests_bump=2.32.3

[[ $EUID -eq 0 ]] || die "debootstrap and chroot need root"
"$REPO_ROOT/scripts/install-deps.sh" >&2
for tool in debootstrap umoci pip3 jq unshare; do
    command -v "$tool" >/dev/null || die "missing $tool"
done

layout=$corpus/oci
wheels=$corpus/wheels
work=$corpus/work
mkdir -p "$corpus"
# Bundles of an interrupted run are stale: start them anew.
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
[[ -d $layout ]] || umoci init --layout "$layout"

# grep reads the whole list: `grep -q` would stop at the first match and,
# under pipefail, umoci's SIGPIPE would read as "no such tag".
has_tag() {
    umoci ls --layout "$layout" | grep -x "$1" >/dev/null
}

# The wheels every image installs, fetched once for the images' Python
# (Debian bookworm's 3.11, x86-64): the images install from this directory
# and never reach PyPI themselves.
fetch_wheels() {
    local want=(
        "numpy==$numpy_version" "requests==$requests_version" "requests==$requests_bump"
        "attrs==23.2.0" "tabulate==0.9.0"
    )
    [[ -e $wheels/.complete ]] && return 0
    note "fetching wheels from PyPI"
    mkdir -p "$wheels"
    for req in "${want[@]}"; do
        pip3 download --quiet --no-cache-dir --only-binary=:all: --platform manylinux2014_x86_64 \
            --python-version 3.11 --implementation cp --abi cp311 \
            --dest "$wheels" "$req" >&2
    done
    : >"$wheels/.complete"
}

# in_root ROOTFS CMD...: runs CMD chrooted in ROOTFS with /proc mounted in a
# mount namespace of its own, so nothing stays mounted if the step fails.
# shellcheck disable=SC2016 # the inner shell expands its own arguments
in_root() {
    local root=$1
    shift
    unshare --mount --fork -- sh -c 'mount -t proc proc "$1/proc" && shift && exec chroot "$@"' \
        in_root "$root" "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive SOURCE_DATE_EPOCH=$epoch "$@"
}

# Starts a build step: MARKER's mtime is set a little in the past, as file
# timestamps are coarser than the clock (a file made right after the marker
# may carry the same time). What umoci unpacked keeps its older mtimes.
mark_step() {
    touch -d "@$(($(date +%s) - 2))" "$1"
}

# Sets what the step since MARKER created or changed to the build date.
settle_mtimes() {
    local root=$1 marker=$2
    find "$root" -xdev -newer "$marker" -exec touch -h -d "@$epoch" {} +
}

build_base() {
    has_tag base && return 0
    note "debootstrap $suite (minbase)"
    umoci new --image "$layout:base"
    umoci unpack --image "$layout:base" "$work/base" >/dev/null
    debootstrap --variant=minbase "$suite" "$work/base/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        die "debootstrap failed: $(tail -5 "$work/debootstrap.log")"
    # What a container image leaves out: package caches and lists.
    rm -rf "$work/base/rootfs/var/cache/apt/archives/"*.deb "$work/base/rootfs/var/lib/apt/lists/"*
    umoci repack --image "$layout:base" "$work/base"
    rm -rf "$work/base"
}

build_python() {
    has_tag python && return 0
    note "python image: apt layer, then the venv layer"
    local bundle=$work/python root=$work/python/rootfs
    umoci unpack --image "$layout:base" "$bundle" >/dev/null
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    in_root "$root" apt-get -o Acquire::Check-Valid-Until=false -qq update >&2
    in_root "$root" apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
    : >"$root/etc/resolv.conf"
    umoci repack --refresh-bundle --image "$layout:python" "$bundle"
    mkdir -p "$root/tmp/wheels"
    cp "$wheels"/*.whl "$root/tmp/wheels/"
    in_root "$root" python3 -m venv /opt/venv
    in_root "$root" /opt/venv/bin/pip install --quiet --no-cache-dir --no-index \
        --find-links /tmp/wheels "numpy==$numpy_version" "requests==$requests_version" >&2
    rm -rf "$root/tmp/wheels"
    umoci repack --image "$layout:python" "$bundle"
    rm -rf "$bundle"
}

# The app's handler; VERSION_LINE is the line the one-line change edits.
write_handler() {
    local dir=$1 version_line=$2
    cat >"$dir/handler.py" <<EOF
"""Scores a request's values: the function a serverless platform would call."""
import json
import sys

import numpy as np
import requests

$version_line


def handle(event):
    values = np.asarray(event.get("values", []), dtype=float)
    return {
        "version": VERSION,
        "n": int(values.size),
        "mean": float(values.mean()) if values.size else 0.0,
        "user_agent": requests.utils.default_user_agent(),
    }


if __name__ == "__main__":
    print(json.dumps(handle({"values": [float(a) for a in sys.argv[1:]] or [1, 2, 3, 4]})))
EOF
    cat >"$dir/server.py" <<'EOF'
"""The app as an HTTP service: GET /health answers once the handler is loaded."""
import http.server
import json
import sys

from handler import handle


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = b"ok\n"
        elif self.path == "/score":
            body = json.dumps(handle({"values": [1, 2, 3]})).encode() + b"\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
EOF
}

write_tally() {
    local dir=$1
    cat >"$dir/tally.py" <<'EOF'
"""Totals a small ledger and prints it as a table."""
import csv
import io
import statistics

from tabulate import tabulate

LEDGER = """account,amount
rent,1200
food,310.5
travel,89.9
food,42.1
"""


def main():
    totals = {}
    for row in csv.DictReader(io.StringIO(LEDGER)):
        totals.setdefault(row["account"], []).append(float(row["amount"]))
    rows = [(k, sum(v), statistics.mean(v)) for k, v in sorted(totals.items())]
    print(tabulate(rows, headers=["account", "total", "mean"]))


if __name__ == "__main__":
    main()
EOF
}

# A deterministic 4 MiB lookup table, the "new data file" of v5.
write_data_file() {
    python3 - "$1" <<'EOF'
import json, random, sys
rng = random.Random(5)
table = {f"k{i:06d}": [rng.randrange(1 << 30) for _ in range(8)] for i in range(48000)}
with open(sys.argv[1], "w") as f:
    json.dump(table, f, sort_keys=True)
EOF
}

# build_app TAG REQUIREMENTS APP_STEP: from the python image, a dependency
# layer (pip install -r requirements) and a code layer (APP_STEP writes into
# the root), each step's files set to the build date.
build_app() {
    local tag=$1 requirements=$2 app_step=$3
    has_tag "$tag" && return 0
    note "app image $tag"
    local bundle=$work/$tag root=$work/$tag/rootfs marker=$work/$tag.marker
    umoci unpack --image "$layout:python" "$bundle" >/dev/null
    mark_step "$marker"
    mkdir -p "$root/tmp/wheels"
    cp "$wheels"/*.whl "$root/tmp/wheels/"
    printf '%s\n' "$requirements" >"$root/tmp/requirements.txt"
    in_root "$root" /opt/venv/bin/pip install --quiet --no-cache-dir --no-index \
        --find-links /tmp/wheels -r /tmp/requirements.txt >&2
    rm -rf "$root/tmp/wheels" "$root/tmp/requirements.txt"
    settle_mtimes "$root" "$marker"
    umoci repack --refresh-bundle --image "$layout:$tag-deps" "$bundle"
    mark_step "$marker"
    "$app_step" "$root"
    settle_mtimes "$root" "$marker"
    umoci repack --image "$layout:$tag" "$bundle"
    umoci rm --image "$layout:$tag-deps"
    rm -rf "$bundle" "$marker"
}

app_requirements="requests==$requests_version
attrs==23.2.0"
app_requirements_bumped="requests==$requests_bump
attrs==23.2.0"

app_v1() {
    mkdir -p "$1/app"
    write_handler "$1/app" 'VERSION = "1"'
}
app_v3() {
    mkdir -p "$1/app"
    write_handler "$1/app" 'VERSION = "3"'
}
app_v5() {
    app_v3 "$1"
    mkdir -p "$1/app/data"
    write_data_file "$1/app/data/lookup.json"
}
tally() {
    mkdir -p "$1/srv/tally"
    write_tally "$1/srv/tally"
}

fetch_wheels
build_base
build_python
build_app app-v1 "$app_requirements" app_v1
build_app app-v2 "$app_requirements" app_v1
build_app app-v3 "$app_requirements" app_v3
build_app app-v4 "$app_requirements_bumped" app_v3
build_app app-v5 "$app_requirements_bumped" app_v5
build_app tally-v1 "tabulate==0.9.0" tally
umoci gc --layout "$layout"

# The table for docs/BENCHMARKS.md: compressed (as pushed to a registry)
# and uncompressed layer bytes per tag.
echo "| image | layers | compressed MB | uncompressed MB |"
echo "|---|---:|---:|---:|"
for tag in base python app-v1 app-v2 app-v3 app-v4 app-v5 tally-v1; do
    manifest=$(jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
        "$layout/index.json" | cut -d: -f2)
    mapfile -t layers < <(jq -r '.layers[].digest' "$layout/blobs/sha256/$manifest" | cut -d: -f2)
    compressed=0 expanded=0
    for l in "${layers[@]}"; do
        compressed=$((compressed + $(stat -c %s "$layout/blobs/sha256/$l")))
        expanded=$((expanded + $(gzip -dc "$layout/blobs/sha256/$l" | wc -c)))
    done
    printf '| %s | %d | %.1f | %.1f |\n' "$tag" "${#layers[@]}" \
        "$(ratio "$compressed" 1000000 %.3f)" "$(ratio "$expanded" 1000000 %.3f)"
done
