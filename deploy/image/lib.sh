# What the test-image scripts (build.sh, build-postgres.sh) share. Source it with `me` (the
# script's name, for messages) and `image` set:
#
#   . "$(dirname "$0")/lib.sh"
#   take_image_lock "$lock_file"     # exits 0 if the image exists (now or once the lock is ours)
#
# POSIX sh. `me` and `image` are the caller's.
# shellcheck disable=SC2154

have_image() {
    docker image inspect "$image" >/dev/null 2>&1
}

# Exits 0 at once when the image exists; otherwise waits for the build lock (parallel tests call
# the scripts at the same time), exits 0 if another caller built the image meanwhile, and checks
# that the daemon answers, failing with its own words rather than a confusing error later.
take_image_lock() {
    if have_image; then
        exit 0
    fi
    exec 9>"$1"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    if have_image; then
        exit 0
    fi
    if ! docker version >/dev/null 2>&1; then
        echo "$me: the Docker daemon does not answer:" >&2
        docker version >&2 || true
        exit 1
    fi
}

# Runs a command as root: directly when root, else with `sudo -n`.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        echo "$me: need root (or sudo) to run: $*" >&2
        return 1
    fi
}
