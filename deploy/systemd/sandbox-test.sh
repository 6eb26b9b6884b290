#!/usr/bin/env bash
# Runs the hardened units for real: two throwaway "hosts" (containers booting this machine's
# systemd as PID 1, sharing its /usr read-only), a primary and a standby, installed with
# deploy/install.sh, enrolled with stackclone-certs, and a stack pushed between them by the
# units themselves. `systemd-analyze verify` (deploy/check.sh) only parses the units; this
# proves the sandbox (capability set, seccomp filter, MemoryDenyWriteExecute=, ProtectSystem=
# and the writable paths, the Docker socket under ProtectSystem=strict) lets the agents work:
#
#  - stackclone-certs-serve.service (with a drop-in moving its port) enrolls the standby;
#  - stackclone-target.service receives; stackclone-source-push@shop.service pushes a data dir
#    holding what needs capabilities to reproduce: files owned by 999 (mode 0600 in a 0700 dir),
#    setuid and setgid files, a setgid dir of another group, a user.* xattr, a hardlink, a
#    symlink, a sparse file, a nanosecond mtime; the stack's containers (plain `docker run`s
#    with Compose labels, no Compose needed) are stopped and started on both sides;
#  - everything arrives as it was; the agents' effective capabilities and seccomp mode are the
#    units' (checked in /proc);
#  - stackclone-source.service and stackclone-target.service start, reload (SIGHUP) without
#    restarting, and stop cleanly (exit 0) on SIGTERM.
#
# Usage: deploy/systemd/sandbox-test.sh       (about a minute after the release build)
# Needs: root, docker, systemd installed on this machine (/lib/systemd/systemd), a Debian-like
# merged /usr. The containers get the capabilities systemd needs as PID 1, not --privileged.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf '\n== %s\n' "$*"; }
fail() {
    echo "sandbox-test.sh: FAIL: $*" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || fail "run as root (the data dir holds files of other owners)"
[ -x /lib/systemd/systemd ] || fail "systemd is not installed on this machine (apt-get install systemd)"
docker version >/dev/null 2>&1 || fail "the Docker daemon does not answer"

W=$(mktemp -d /tmp/stackclone-sandbox.XXXXXX)
ID=$(basename "$W" | tr -dc 'a-z0-9' | tail -c 6)
HOSTS=(primary standby)
cleanup() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        for h in "${HOSTS[@]}"; do
            echo "--- journal of $h (last 40 lines)" >&2
            docker exec "sc-sandbox-$h-$ID" journalctl --no-pager -o short-monotonic -n 40 2>/dev/null >&2 || true
        done
    fi
    for h in "${HOSTS[@]}"; do docker rm -f "sc-sandbox-$h-$ID" >/dev/null 2>&1 || true; done
    ids=$(docker ps -aq --filter "label=stackclone-sandbox-test=$ID")
    # shellcheck disable=SC2086
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT

say "release binaries and the test image"
cargo build --release --locked -q -p stackclone-source -p stackclone-target -p stackclone-certs --bins
deploy/image/build.sh
IMG=stackclone-test/busybox:1

# A root file system of mount points and the merged-/usr links; /usr comes from this machine.
BASE=stackclone-sandbox-base:1
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    mkdir -p "$W/base"
    (
        cd "$W/base"
        mkdir -p usr etc var run tmp proc sys dev opt root home mnt
        for d in bin sbin lib lib64; do ln -s "usr/$d" "$d"; done
        tar --numeric-owner --owner=0 --group=0 -c . | docker import - "$BASE" >/dev/null
    )
fi

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ENROLL_PORT=$(free_port)
SYNC_PORT=$(free_port)

# What systemd needs as PID 1 in a container; not --privileged, which some hosts refuse.
CAPS=()
for c in CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP NET_ADMIN \
    NET_BIND_SERVICE NET_RAW IPC_LOCK IPC_OWNER SYS_CHROOT SYS_PTRACE SYS_ADMIN SYS_NICE MKNOD \
    AUDIT_WRITE SETFCAP SYSLOG LINUX_IMMUTABLE; do
    CAPS+=(--cap-add "$c")
done

say "two hosts: install.sh into each, boot systemd"
for h in "${HOSTS[@]}"; do
    H=$W/$h
    mkdir -p "$H/data"
    cp -a /etc "$H/etc"
    # Only what the test starts runs: none of this machine's enabled services.
    find "$H/etc/systemd/system" -mindepth 1 -maxdepth 1 -name '*.wants' -exec rm -rf {} +
    : >"$H/etc/machine-id"
    DESTDIR=$H/stage deploy/install.sh --bin-dir target/release --role "$([ "$h" = primary ] && echo source || echo target)" >"$H/install.log" 2>&1 ||
        fail "install.sh for $h: $(cat "$H/install.log")"
    cp -a "$H/stage/etc/." "$H/etc/"
    docker run -d --name "sc-sandbox-$h-$ID" --hostname "$h" "${CAPS[@]}" \
        --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
        --network host -e container=docker --stop-signal SIGRTMIN+3 \
        -v /sys/fs/cgroup:/sys/fs/cgroup:rw -v /usr:/usr:ro \
        -v "$H/stage/usr/local:/usr/local" -v "$H/etc:/etc" -v "$H/stage/var:/var" \
        -v "$H/data:/opt/containers" -v /var/run/docker.sock:/run/docker.sock \
        --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
        "$BASE" /lib/systemd/systemd >/dev/null
done
in_host() { # HOST COMMAND...
    local h=$1
    shift
    docker exec "sc-sandbox-$h-$ID" "$@"
}
for h in "${HOSTS[@]}"; do
    for _ in $(seq 60); do
        state=$(in_host "$h" systemctl is-system-running 2>/dev/null || true)
        case "$state" in running | degraded) break ;; esac
        sleep 0.5
    done
    echo "$h: systemd $state"
    case "$state" in running | degraded) ;; *) fail "systemd did not boot in $h" ;; esac
done

say "certificates: stackclone-certs-serve.service (port moved by a drop-in), enroll"
in_host primary stackclone-certs init --name primary >/dev/null
mkdir -p "$W/primary/etc/systemd/system/stackclone-certs-serve.service.d"
cat >"$W/primary/etc/systemd/system/stackclone-certs-serve.service.d/port.conf" <<EOF
[Service]
ExecStart=
ExecStart=/usr/local/bin/stackclone-certs serve --listen 127.0.0.1:$ENROLL_PORT
EOF
in_host primary systemctl daemon-reload
in_host primary systemctl start stackclone-certs-serve
TOKEN_JSON=$(in_host primary stackclone-certs token create --role target --server "127.0.0.1:$ENROLL_PORT" --json)
TOKEN=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$TOKEN_JSON")
PIN=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_pin"])' <<<"$TOKEN_JSON")
# The token on stdin (`docker exec -i`), as the printed command gives it: never an argument.
echo "$TOKEN" | docker exec -i "sc-sandbox-standby-$ID" stackclone-certs enroll --name standby --server "127.0.0.1:$ENROLL_PORT" --token-file - --ca-pin "$PIN"

say "the stack: a data dir that needs capabilities to reproduce, and its containers on both hosts"
D=$W/primary/data/shop/data
mkdir -p "$D/pg" "$D/shared" "$D/meta" "$W/standby/data/shop/data"
echo "order-1" >"$D/orders"
echo 15 >"$D/pg/PG_VERSION"
chown -R 999:999 "$D/pg"
chmod 0700 "$D/pg"
chmod 0600 "$D/pg/PG_VERSION"
python3 -c "import os, sys; os.setxattr(sys.argv[1], 'user.stackclone', b'kept')" "$D/pg/PG_VERSION"
chgrp 1234 "$D/shared"
chmod 2775 "$D/shared"
echo x >"$D/meta/suid"
chown 1000:1000 "$D/meta/suid"
chmod 4755 "$D/meta/suid"
echo y >"$D/meta/sgid"
chown 1000:1234 "$D/meta/sgid"
chmod 2750 "$D/meta/sgid"
touch -d '2001-02-03 04:05:06.123456789' "$D/meta/sgid"
ln "$D/orders" "$D/meta/orders-hardlink"
ln -s ../orders "$D/meta/link"
truncate -s 64M "$D/meta/sparse"
echo end >>"$D/meta/sparse"
# A stack is the containers labelled with its Compose project: plain `docker run`s will do.
start_stack() { # PROJECT DATA_DIR
    docker run -d --label "com.docker.compose.project=$1" --label com.docker.compose.service=app \
        --label "stackclone-sandbox-test=$ID" -v "$2:/data" "$IMG" \
        sh -c "trap 'exit 0' TERM; while :; do sleep 1 & wait; done" >/dev/null
}
start_stack "scsandboxp$ID" "$D"
start_stack "scsandboxs$ID" "$W/standby/data/shop/data"

cat >"$W/standby/etc/stackclone/target.toml" <<EOF
listen = "127.0.0.1:$SYNC_PORT"
EOF
cat >"$W/standby/etc/stackclone/conf.d/shop.toml" <<EOF
stack = "shop"
path = "/opt/containers/shop"
allow = ["primary"]
compose_project = "scsandboxs$ID"
stop_timeout = "5s"
health_timeout = "30s"
EOF
cat >"$W/primary/etc/stackclone/source.toml" <<EOF
[targets.standby]
address = "127.0.0.1:$SYNC_PORT"
EOF
cat >"$W/primary/etc/stackclone/conf.d/shop.toml" <<EOF
stack = "shop"
path = "/opt/containers/shop"
target = "standby"
compose_project = "scsandboxp$ID"
stop_timeout = "5s"
# The engine is this machine's, so the container's bind source is the path outside the
# "host"; the agent sees the same directory as its path. Agents on a real host (or in the
# container image, which mounts stacks at the same path) need no such line.
ignore_mounts = { "$D" = "the sandbox host's view of this very data dir, which is path" }
EOF

say "stackclone-target.service, then stackclone-source-push@shop.service"
in_host standby systemctl enable --now stackclone-target
for _ in $(seq 50); do
    in_host standby journalctl -u stackclone-target -o cat | grep -q "target listening" && break
    sleep 0.2
done
in_host primary systemctl start stackclone-source-push@shop.service ||
    fail "the push unit failed: $(in_host primary journalctl -u stackclone-source-push@shop -o cat | tail -n 5)"
in_host primary journalctl -u stackclone-source-push@shop -o cat | grep -E '^shop +committed' ||
    fail "no committed line in the push unit's journal"

say "everything arrived as it was"
T=$W/standby/data/shop/data
for p in orders pg pg/PG_VERSION shared meta/suid meta/sgid meta/orders-hardlink meta/link meta/sparse; do
    a=$(stat -c '%A %u:%g %h %s %.9Y' "$D/$p")
    b=$(stat -c '%A %u:%g %h %s %.9Y' "$T/$p")
    [ "$a" = "$b" ] || fail "$p: primary [$a] standby [$b]"
    printf 'ok  %-22s %s\n' "$p" "$b"
done
cmp -s "$D/meta/sparse" "$T/meta/sparse" || fail "meta/sparse: content differs"
[ "$(du -k "$T/meta/sparse" | cut -f1)" -lt 1024 ] || fail "meta/sparse arrived dense"
xattr=$(python3 -c "import os, sys; print(os.getxattr(sys.argv[1], 'user.stackclone').decode())" "$T/pg/PG_VERSION")
[ "$xattr" = kept ] || fail "user.stackclone xattr: got '$xattr'"
echo "ok  sparse stays sparse, user.* xattr kept"

say "the sandbox is the units' (from /proc of the running agent)"
pid=$(in_host standby systemctl show -p MainPID --value stackclone-target)
status=$(in_host standby cat "/proc/$pid/status")
grep -qx $'CapEff:\t000000000000001f' <<<"$status" || fail "target: CapEff is not CHOWN|DAC_OVERRIDE|DAC_READ_SEARCH|FOWNER|FSETID: $(grep Cap <<<"$status")"
grep -qx $'Seccomp:\t2' <<<"$status" || fail "target: no seccomp filter"
grep -qx $'NoNewPrivs:\t1' <<<"$status" || fail "target: NoNewPrivs not set"
echo "ok  stackclone-target: CapEff 0x1f (CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID), seccomp filter, no_new_privs"

say "daemons: reload (SIGHUP) keeps them running, SIGTERM stops them cleanly"
in_host primary systemctl start stackclone-source
for h in primary standby; do
    u=$([ "$h" = primary ] && echo stackclone-source || echo stackclone-target)
    before=$(in_host "$h" systemctl show -p MainPID --value "$u")
    in_host "$h" systemctl reload "$u"
    sleep 1
    after=$(in_host "$h" systemctl show -p MainPID --value "$u")
    if [ "$(in_host "$h" systemctl is-active "$u")" != active ] || [ "$before" != "$after" ]; then
        fail "$u: reload did not keep the same process running (pid $before -> $after)"
    fi
    in_host "$h" systemctl stop "$u"
    res=$(in_host "$h" systemctl show -p Result --value "$u")
    code=$(in_host "$h" systemctl show -p ExecMainStatus --value "$u")
    if [ "$res" != success ] || [ "$code" != 0 ]; then
        fail "$u: stop gave Result=$res, exit status $code"
    fi
    echo "ok  $u: reloaded in place (pid $before), stopped with exit 0"
done

say "sandbox-test.sh: the hardened units work"
