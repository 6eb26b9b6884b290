#!/bin/sh
# Builds the local test image stackclone-test/postgres:15 without any registry.
#
# No image can be pulled where stackclone is tested, but Debian's package mirror answers. So
# the image is a Debian bookworm root file system made by `debootstrap --variant=minbase
# --include=postgresql`, shrunk, given an entrypoint, and loaded into Docker. It gives the
# tests a real database that writes while it is replicated (pgbench), shuts down cleanly on
# `docker stop`, and leaves a data directory that pg_controldata can judge.
#
# Usage: deploy/image/build-postgres.sh [IMAGE]     (default stackclone-test/postgres:15)
#
# The image:
# - runs /usr/local/bin/stackclone-postgres (ENTRYPOINT, CMD ["postgres"]). With PGDATA
#   (/var/lib/postgresql/data, a bind mount in the tests) lacking PG_VERSION it chowns the
#   directory to postgres and runs initdb (trust auth, superuser postgres, UTF8, locale C,
#   listen_addresses='*', `host all all 0.0.0.0/0 trust`). Then it execs the server as the
#   postgres user, so postgres is PID 1 and `docker stop` signals it directly. Arguments
#   starting with `-` go to postgres (`docker run IMAGE -c checkpoint_timeout=30s`); any
#   other command runs as given (`docker run IMAGE pg_controldata`).
# - stops with SIGINT, PostgreSQL's fast shutdown (as the official image): SIGTERM would be
#   a smart shutdown, which waits for every client to disconnect.
# - has /usr/lib/postgresql/15/bin first in PATH, so psql, pg_dump, pgbench, pg_isready,
#   pg_controldata are the real binaries (/usr/bin has Debian's perl pg_wrapper links).
# - has no LLVM (JIT): libLLVM and its libz3 are two fifths of the root file system, and
#   without llvmjit.so PostgreSQL quietly runs without JIT. Also gone: apt's caches and lists,
#   docs, man pages, message translations (only the C locale is used), Debian's default
#   cluster 15/main.
#
# - Idempotent: exits 0 at once when the image exists. `docker rmi` it to rebuild.
# - Safe to run concurrently (tests run in parallel): a lock file serialises builds, and the
#   second caller finds the image made by the first. The image gets its name only after the
#   smoke check below has passed, so a broken build never looks done.
# - The image is written as a one-layer `docker save` archive and `docker load`ed rather
#   than `docker import`ed: import's --change refuses STOPSIGNAL ("stopsignal is not a valid
#   change command"; the daemon's list of changes for import and commit has never had it), and
#   a second `docker build` step would need the deprecated legacy builder or buildx.
# - Smoke check: a container on a fresh data directory must answer pg_isready within 60 s,
#   run `pgbench -i -s 1` and 3 s of `pgbench -T 3`, exit 0 on `docker stop`, and leave a
#   cluster that pg_controldata calls "shut down".
# - Cold build: 1 to 3 minutes on 2 busy cores, most of it debootstrap's download (about 100 MB
#   of packages) and unpacking. Needs about 1 GB under ${TMPDIR:-/tmp} (not mounted nodev).
# - Needs: docker (with access to the daemon), root or sudo without a password (debootstrap,
#   and reading the root file system it makes), apt-get (installs debootstrap when missing;
#   `apt-get update` only when the package lists do not know it), tar, sha256sum, awk, and
#   the Debian mirror: the one apt on this machine uses for bookworm (from
#   /etc/apt/sources.list.d/*.sources, *.list, /etc/apt/sources.list), or
#   $STACKCLONE_DEBIAN_MIRROR, or http://deb.debian.org/debian.
set -eu

image="${1:-stackclone-test/postgres:15}"
suite=bookworm
pg=15
me=build-postgres.sh
# shellcheck source=deploy/image/lib.sh
. "$(dirname "$0")/lib.sh"
take_image_lock "${TMPDIR:-/tmp}/stackclone-test-postgres-image.lock"

# The mirror apt uses for $suite: deb822 stanzas (Types: deb, Suites: naming $suite, not
# Enabled: no), then one-line `deb [options] URI SUITE ...` entries. Only URIs debootstrap can
# fetch (http, https, ftp, file) count.
apt_mirror() {
    {
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            awk -v suite="$suite" '
                function flush() {
                    if (types ~ /(^|[ \t])deb([ \t]|$)/ &&
                        (" " suites " ") ~ ("[ \t]" suite "[ \t]") &&
                        tolower(enabled) !~ /^no/ && uris != "") {
                        split(uris, u, /[ \t]+/)
                        print u[1]
                    }
                    types = ""; uris = ""; suites = ""; enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { next }  # continuation line (e.g. an inline Signed-By key)
                {
                    key = tolower($0); sub(/:.*/, "", key)
                    val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = val
                }
                END { flush() }
            ' "$f"
        done
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            awk -v suite="$suite" '
                $1 == "deb" {
                    line = $0
                    sub(/^[ \t]*deb[ \t]+/, "", line)
                    gsub(/\[[^]]*\]/, "", line)
                    n = split(line, w, /[ \t]+/)
                    i = (w[1] == "") ? 2 : 1
                    if (w[i + 1] == suite) print w[i]
                }
            ' "$f"
        done
    } | grep -E '^(https?|ftp|file)://' | head -n 1 | sed 's,/*$,,'
}

work="$(mktemp -d "${TMPDIR:-/tmp}/stackclone-postgres-image.XXXXXX")"
rootfs="$work/rootfs"
tmp_image="stackclone-build-tmp/postgres:$$"
cid=""
cleanup() {
    set +e
    if [ -n "$cid" ]; then
        docker rm -f "$cid" >/dev/null 2>&1
    fi
    docker image rm "$tmp_image" >/dev/null 2>&1
    # debootstrap mounts /proc and /sys (and may bind /dev) in the target while it runs and
    # unmounts them when it ends; if it was killed, they must not be walked into by rm.
    awk -v p="$work/" 'index($2, p) == 1 { print $2 }' /proc/mounts 2>/dev/null | sort -r |
        while read -r m; do as_root umount -l "$m"; done
    as_root rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. debootstrap, installed when missing.
debootstrap="$(command -v debootstrap || echo /usr/sbin/debootstrap)"
if [ ! -x "$debootstrap" ]; then
    echo "$me: installing debootstrap with apt-get" >&2
    install_debootstrap() {
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -o DPkg::Lock::Timeout=300 debootstrap >>"$work/apt.log" 2>&1
    }
    if ! install_debootstrap; then
        echo "$me: debootstrap not in the package lists; running apt-get update" >&2
        if ! { as_root apt-get update >>"$work/apt.log" 2>&1 && install_debootstrap; }; then
            cat "$work/apt.log" >&2
            echo "$me: could not install debootstrap (log above)" >&2
            exit 1
        fi
    fi
    debootstrap=/usr/sbin/debootstrap
fi

mirror="${STACKCLONE_DEBIAN_MIRROR:-$(apt_mirror)}"
mirror="${mirror:-http://deb.debian.org/debian}"
echo "$me: debootstrap $suite with postgresql from $mirror (takes a few minutes)" >&2
as_root "$debootstrap" --variant=minbase --include=postgresql "$suite" "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    [ -f "$rootfs/debootstrap/debootstrap.log" ] && as_root tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
    echo "$me: debootstrap failed (log above; is ${TMPDIR:-/tmp} mounted nodev or noexec?)" >&2
    exit 1
}
if [ ! -x "$rootfs/usr/lib/postgresql/$pg/bin/postgres" ]; then
    echo "$me: debootstrap did not install PostgreSQL $pg (/usr/lib/postgresql/$pg/bin/postgres)" >&2
    exit 1
fi

# 2. Shrink. Every path is inside the new root file system, which must have nothing mounted
#    in it any more (debootstrap unmounts its /proc, /sys and any /dev bind when it ends).
if awk -v p="$rootfs/" 'index($2, p) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    echo "$me: something is still mounted under $rootfs:" >&2
    grep -F "$rootfs/" /proc/mounts >&2
    exit 1
fi
# shellcheck disable=SC2016 # expanded by that sh
as_root sh -eu -c '
    cd "$1"
    pg="$2"
    rm -rf var/cache/apt/* var/lib/apt/lists/* var/cache/debconf/*-old var/lib/dpkg/*-old
    rm -rf usr/share/doc/* usr/share/man/* usr/share/info/* usr/share/lintian
    rm -rf usr/share/locale/* usr/share/i18n
    find usr/lib/locale -mindepth 1 -maxdepth 1 ! -name C.utf8 -exec rm -rf {} +
    # JIT: llvmjit.so is the only user of libLLVM (and libLLVM of libz3).
    rm -rf "usr/lib/postgresql/$pg/lib/llvmjit.so" "usr/lib/postgresql/$pg/lib/llvmjit_types.bc" \
        "usr/lib/postgresql/$pg/lib/bitcode"
    find usr/lib -name "libLLVM*.so*" -exec rm -f {} +
    find usr/lib -name "libz3.so*" -exec rm -f {} +
    # Debian created and stopped a cluster "main"; the entrypoint makes its own in PGDATA.
    rm -rf "etc/postgresql/$pg" "var/lib/postgresql/$pg" var/log/postgresql/*
    find var/log -type f -exec rm -f {} +
    rm -rf debootstrap run/adduser
    # Docker provides /dev, /etc/hosts, /etc/hostname, /etc/resolv.conf; do not ship the build
    # host'\''s.
    find dev -mindepth 1 -delete
    : >etc/resolv.conf
    : >etc/hostname
' sh "$rootfs" "$pg"

# 3. The entrypoint.
cat >"$work/stackclone-postgres" <<'EOF'
#!/bin/sh
# Entrypoint of stackclone-test/postgres:15 (stackclone's deploy/image/build-postgres.sh).
# `IMAGE [postgres] [-postgres-options...]`: initdb PGDATA when it has no PG_VERSION, then exec
# the server as the postgres user (PID 1, so `docker stop` signals it). Anything else runs as is.
set -eu
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA
bin=/usr/lib/postgresql/15/bin

if [ "$#" = 0 ] || [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi
shift

root=no
[ "$(id -u)" = 0 ] && root=yes
as_postgres() {
    if [ "$root" = yes ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups "$@"
    else
        "$@"
    fi
}

if [ "$root" = yes ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres /var/run/postgresql
    chmod 2775 /var/run/postgresql
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ "$root" = yes ]; then
        chown -R postgres:postgres "$PGDATA"
        chmod 0700 "$PGDATA"
    fi
    as_postgres "$bin/initdb" -D "$PGDATA" --auth=trust -U postgres --encoding=UTF8 --locale=C
    printf "\n# stackclone-postgres\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    printf "\n# stackclone-postgres\nhost all all 0.0.0.0/0 trust\n" >>"$PGDATA/pg_hba.conf"
fi

if [ "$root" = yes ]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$PGDATA" "$@"
fi
exec "$bin/postgres" -D "$PGDATA" "$@"
EOF
as_root install -m 0755 -o 0 -g 0 "$work/stackclone-postgres" "$rootfs/usr/local/bin/stackclone-postgres"

# 4. A one-layer image archive, as `docker save` writes it. Owners stay as debootstrap made
#    them (numeric: postgres is a system user of the image, unknown to the build host).
mkdir "$work/archive"
as_root tar --numeric-owner -C "$rootfs" -cf "$work/archive/layer.tar" .
diff_id="$(as_root sha256sum "$work/archive/layer.tar" | cut -d' ' -f1)"
arch="$(docker version --format '{{.Server.Arch}}')"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
path="/usr/lib/postgresql/$pg/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
cat >"$work/archive/config.json" <<EOF
{
  "architecture": "$arch",
  "os": "linux",
  "created": "$created",
  "config": {
    "Env": ["PATH=$path", "PGDATA=/var/lib/postgresql/data"],
    "Entrypoint": ["/usr/local/bin/stackclone-postgres"],
    "Cmd": ["postgres"],
    "ExposedPorts": {"5432/tcp": {}},
    "StopSignal": "SIGINT"
  },
  "rootfs": {"type": "layers", "diff_ids": ["sha256:$diff_id"]},
  "history": [{"created": "$created", "created_by": "deploy/image/build-postgres.sh: debootstrap --variant=minbase --include=postgresql $suite $mirror"}]
}
EOF
cat >"$work/archive/manifest.json" <<EOF
[{"Config": "config.json", "RepoTags": ["$tmp_image"], "Layers": ["layer.tar"]}]
EOF
as_root tar -C "$work/archive" -cf - manifest.json config.json layer.tar |
    docker load >"$work/load.log" 2>&1 || {
    cat "$work/load.log" >&2
    echo "$me: docker load of the image archive failed" >&2
    exit 1
}
as_root rm -rf --one-file-system "$rootfs" "$work/archive"

# 5. Smoke check, on the image under its temporary name.
fail() {
    echo "$me: smoke check of $image failed: $*" >&2
    if [ -n "$cid" ]; then
        echo "$me: container log:" >&2
        docker logs "$cid" 2>&1 | tail -n 40 >&2
    fi
    exit 1
}
bounded() {
    if command -v timeout >/dev/null 2>&1; then
        timeout "$@"
    else
        shift
        "$@"
    fi
}

missing="$(docker run --rm --entrypoint /bin/sh "$tmp_image" -c '
    for f in /usr/lib/postgresql/*/bin/* /usr/lib/postgresql/*/lib/*.so; do
        ldd "$f" 2>/dev/null | grep "not found" | sed "s,^,$f: ,"
    done')" || fail "could not run a shell in it"
[ -z "$missing" ] || fail "libraries missing after shrinking: $missing"

data="$work/smoke-data"
mkdir "$data"
cid="$(docker run -d -v "$data:/var/lib/postgresql/data" "$tmp_image")" || fail "docker run"
i=0
until docker exec "$cid" pg_isready -q -U postgres >/dev/null 2>&1; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$cid")" != true ]; then
        fail "the server exited before it accepted connections"
    fi
    i=$((i + 1))
    [ "$i" -lt 60 ] || fail "pg_isready not ready after 60 s"
    sleep 1
done
bounded 300 docker exec "$cid" pgbench -i -s 1 -U postgres postgres >"$work/pgbench.log" 2>&1 ||
    fail "pgbench -i: $(tail -n 5 "$work/pgbench.log")"
bounded 120 docker exec "$cid" pgbench -T 3 -U postgres postgres >>"$work/pgbench.log" 2>&1 ||
    fail "pgbench -T 3: $(tail -n 5 "$work/pgbench.log")"
docker stop "$cid" >/dev/null || fail "docker stop"
code="$(docker inspect -f '{{.State.ExitCode}}' "$cid")"
[ "$code" = 0 ] || fail "the server exited with $code on docker stop (SIGINT), not 0"
docker rm "$cid" >/dev/null
cid=""
state="$(docker run --rm -v "$data:/var/lib/postgresql/data" "$tmp_image" pg_controldata |
    sed -n 's/^Database cluster state: *//p')"
[ "$state" = "shut down" ] || fail "pg_controldata says the cluster is \"$state\", not \"shut down\""

docker tag "$tmp_image" "$image"
docker image rm "$tmp_image" >/dev/null
echo "$me: built $image" >&2
