#!/bin/sh
# Builds the local test image stackclone-test/busybox:1 without any registry.
#
# No image can be pulled where stackclone is tested, so the image is made from Debian's
# statically linked busybox: `apt-get download busybox-static`, unpack it into a root file
# system, add the applet links and the few directories a container needs, and `docker import`
# the tarball. The tests (common/tests/docker.rs, tests/) and deploy/demo.sh all call this.
#
# Usage: deploy/image/build.sh [IMAGE]     (default stackclone-test/busybox:1)
#
# - Idempotent: exits 0 at once when the image exists. `docker rmi` it to rebuild.
# - Safe to run concurrently (tests run in parallel): a lock file serialises builds, and the
#   second caller finds the image made by the first.
# - Applet links are RELATIVE (`bin/sh -> busybox`). `busybox --install -s DIR` would write
#   absolute links to the build host's path, which are broken inside the image.
# - Needs: docker (with access to the daemon), apt-get, dpkg-deb, tar. Runs `apt-get update`
#   only when the package lists do not know busybox-static yet (root, or sudo without a
#   password).
set -eu

image="${1:-stackclone-test/busybox:1}"
me=build.sh
# shellcheck source=deploy/image/lib.sh
. "$(dirname "$0")/lib.sh"
take_image_lock "${TMPDIR:-/tmp}/stackclone-test-image.lock"

work="$(mktemp -d "${TMPDIR:-/tmp}/stackclone-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT INT TERM
# apt-get download drops privileges to _apt, which must be able to write here.
chmod 0777 "$work"

cd "$work"
if ! apt-get download busybox-static >apt.log 2>&1; then
    echo "build.sh: busybox-static not in the package lists; running apt-get update" >&2
    as_root apt-get update >>apt.log 2>&1 || {
        cat apt.log >&2
        exit 1
    }
    apt-get download busybox-static >>apt.log 2>&1 || {
        cat apt.log >&2
        exit 1
    }
fi

deb="$(ls busybox-static_*.deb)"
mkdir rootfs
dpkg-deb -x "$deb" rootfs
rm -rf rootfs/usr/share/doc rootfs/usr/share/man

for a in $(rootfs/bin/busybox --list); do
    [ -e "rootfs/bin/$a" ] || [ -L "rootfs/bin/$a" ] || ln -s busybox "rootfs/bin/$a"
done
mkdir -p rootfs/tmp rootfs/etc rootfs/proc rootfs/sys rootfs/dev rootfs/root
chmod 1777 rootfs/tmp
echo 'root:x:0:0:root:/root:/bin/sh' >rootfs/etc/passwd
echo 'root:x:0:' >rootfs/etc/group

# The image must not depend on who ran the script: every file belongs to root inside it.
tar --numeric-owner --owner=0 --group=0 -C rootfs -c . |
    docker import --change 'CMD ["/bin/sh"]' - "$image" >/dev/null

docker run --rm "$image" /bin/sh -c 'test -x /bin/sleep && touch /tmp/ok' || {
    echo "build.sh: imported $image but it does not run a shell" >&2
    exit 1
}
echo "build.sh: built $image" >&2
