#!/usr/bin/env bash
# Builds the agent image stackclone:local FROM scratch, without any registry.
#
#  1. cargo build --release of the three binaries;
#  2. a root file system: the binaries in /usr/local/bin (debug info stripped; STRIP=0 keeps
#     it), every shared library `ldd` lists for them and the dynamic loader, at the paths the
#     binaries ask for; a minimal /etc (passwd, group, nsswitch.conf) and the host's CA bundle
#     (/etc/ssl/certs/ca-certificates.crt, for https alerts); /etc/stackclone,
#     /var/lib/stackclone and /tmp;
#  3. docker build with deploy/container/Dockerfile;
#  4. proof that the binaries start inside the image (`--version`, `--help`).
#
# Usage: deploy/container/build.sh [IMAGE]      (default stackclone:local)
# Env:   STRIP=0 keeps the debug info (line tables for backtraces; the image grows ~4x).
#        SKIP_CARGO=1 uses the binaries already in target/release.
# Needs: cargo, docker (with access to the daemon), ldd, readelf and objcopy (binutils).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
IMAGE=${1:-stackclone:local}
BINS=(stackclone-source stackclone-target stackclone-certs)

if ! docker version >/dev/null 2>&1; then
    echo "build.sh: the Docker daemon does not answer:" >&2
    docker version >&2 || true
    exit 1
fi

if [ "${SKIP_CARGO:-0}" != 1 ]; then
    cargo build --release --locked -p stackclone-source -p stackclone-target -p stackclone-certs
fi
B=$ROOT/target/release

work=$(mktemp -d "${TMPDIR:-/tmp}/stackclone-container.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
R=$work/rootfs
mkdir -p "$R/usr/local/bin" "$R/etc/ssl/certs" "$R/etc/stackclone" "$R/var/lib/stackclone" "$R/tmp"
chmod 0700 "$R/etc/stackclone" "$R/var/lib/stackclone"
chmod 1777 "$R/tmp"

for b in "${BINS[@]}"; do
    [ -x "$B/$b" ] || {
        echo "build.sh: $B/$b is missing" >&2
        exit 1
    }
    if [ "${STRIP:-1}" = 0 ]; then
        cp "$B/$b" "$R/usr/local/bin/$b"
    else
        objcopy --strip-debug "$B/$b" "$R/usr/local/bin/$b"
    fi
    chmod 0755 "$R/usr/local/bin/$b"
done

# Shared libraries and the loader, copied (symlinks resolved) to the path each binary asks for,
# so the image needs no ld.so.cache. A binary that is statically linked lists none.
libs=$(for b in "${BINS[@]}"; do ldd "$B/$b" 2>/dev/null || true; done |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
for lib in $libs; do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done
# The loader is named in each binary's PT_INTERP; make sure that exact path exists.
interp=$(readelf -l "$B/stackclone-source" | sed -n 's/.*program interpreter: \(.*\)]/\1/p')
if [ -n "$interp" ] && [ ! -e "$R$interp" ]; then
    mkdir -p "$R$(dirname "$interp")"
    cp -L "$interp" "$R$interp"
fi

cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
# Docker provides /etc/hosts and /etc/resolv.conf; glibc's files and dns sources are built in.
echo 'hosts: files dns' >"$R/etc/nsswitch.conf"
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    cp -L /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
else
    echo "build.sh: warning: no /etc/ssl/certs/ca-certificates.crt on this host (install" \
        "ca-certificates); https alerts from the image will fail certificate checks" >&2
fi

cp deploy/container/Dockerfile "$work/Dockerfile"
version=$("$B/stackclone-source" --version | awk '{ print $2 }')
echo "build.sh: rootfs $(du -sh "$R" | cut -f1), libraries: $(echo "$libs" | tr '\n' ' ')" >&2
docker build -q --build-arg VERSION="$version" -t "$IMAGE" "$work" >/dev/null
echo "build.sh: built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))" >&2

# Proof that the binaries start in the image (loader, libraries, PATH).
docker run --rm "$IMAGE" stackclone-target --version
docker run --rm "$IMAGE" stackclone-certs --version
help=$(docker run --rm "$IMAGE" stackclone-source --help)
echo "${help%%$'\n'*}"
echo "build.sh: $IMAGE runs stackclone-source, stackclone-target and stackclone-certs" >&2
