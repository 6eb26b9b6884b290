#!/usr/bin/env bash
# The failover story, on one machine, with the demo's compose stack (PostgreSQL in a named
# volume and an app writing a bind-mounted data dir): the primary dies after one more order,
# the standby is promoted and takes orders, the old primary comes back and is refused (its
# stack is not stopped, it is told why), the promoted host fails back to it by delta (the old
# primary's lost order is kept as a generation it can restore), the standby is demoted, and
# pushes in the original direction resume as deltas.
#
# It runs ./deploy/demo.sh up to its first push (the primary and the standby running, the
# standby's target agent serving), then goes on from there.
#
# Usage: ./deploy/failover-demo.sh [WORKDIR]     (default: a fresh temp dir, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

if [ $# -ge 1 ]; then W=$1; mkdir -p "$W"; KEEP=1; else W=$(mktemp -d /tmp/stackclone-failover.XXXXXX); KEEP=0; fi
W=$(cd "$W" && pwd)
HANDOFF=$W.handoff
TARGET_PIDS=()
P_PRIMARY=""
P_STANDBY=""
cleanup() {
  for p in "${TARGET_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for p in "$P_PRIMARY" "$P_STANDBY"; do
    [ -n "$p" ] || continue
    ids=$(docker ps -aq --filter "label=com.docker.compose.project=$p")
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
    docker network rm "${p}_default" >/dev/null 2>&1 || true
    # A volume that links to a replicated tree is removed once the link is gone.
    for v in $(docker volume ls -q --filter "label=com.docker.compose.project=$p"); do
      mp=$(docker volume inspect -f '{{.Mountpoint}}' "$v")
      if [ -L "$mp" ]; then rm -f "$mp"; fi
      docker volume rm "$v" >/dev/null 2>&1 || true
    done
  done
  rm -f "$HANDOFF"
  if [ "$KEEP" = 0 ]; then rm -rf "$W"; fi
}
trap cleanup EXIT

STACKCLONE_DEMO_HANDOFF=$HANDOFF "$ROOT/deploy/demo.sh" "$W"
# shellcheck disable=SC1090
source "$HANDOFF"
export PATH=$B:$PATH

sql() { docker exec -u postgres "$(docker ps -q --filter "label=com.docker.compose.project=$1" --filter label=com.docker.compose.service=db)" psql -U postgres -qAtc "$2" postgres; }
wait_sql() { for _ in $(seq 240); do sql "$1" 'select 1' >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "the database of $1 does not answer"; return 1; }
show_stacks() { docker ps -a --filter "label=com.docker.compose.project=$1" --format '  {{.Label "com.docker.compose.service"}}: {{.Status}}'; }
started_at() { docker inspect -f '{{.State.StartedAt}}' $(docker ps -aq --filter "label=com.docker.compose.project=$1" | sort); }
free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
fail() { echo "FAILED: $*"; exit 1; }

PRIMARY_SRC=(stackclone-source --config "$W/primary/conf/source.toml" --state-dir "$W/primary/state")
STANDBY_TGT=(stackclone-target --config "$W/standby/conf/target.toml")
LIVE=$W/standby/stacks/shop

say "F1. The primary takes one more order after its last push, then dies (SIGKILL, like a power cut)"
run sql "$P_PRIMARY" "insert into orders (item) values ('3 lost in the failover');"
run docker kill $(docker ps -q --filter "label=com.docker.compose.project=$P_PRIMARY")

say "F2. On the standby: what we have (the RPO: the age of the last generation)"
run "${STANDBY_TGT[@]}" status shop

say "F3. Promote the standby: recorded, a new history, the stack up and healthy on the last generation"
run "${STANDBY_TGT[@]}" promote shop
wait_sql "$P_STANDBY"
run sql "$P_STANDBY" "insert into orders (item) values ('4 taken by the standby after the failover');"
echo "the promoted standby's orders:"; sql "$P_STANDBY" 'select id, item from orders order by id'

say "F4. The old primary comes back (its containers start again, as a restart policy would)"
run docker start $(docker ps -aq --filter "label=com.docker.compose.project=$P_PRIMARY")
wait_sql "$P_PRIMARY"
before=$(started_at "$P_PRIMARY")
echo "its push is refused before anything stops:"
if "${PRIMARY_SRC[@]}" push shop; then fail "the old primary's push was accepted"; fi
if "${PRIMARY_SRC[@]}" push shop >/dev/null 2>&1; then fail "the second push was accepted"; fi
[ "$before" = "$(started_at "$P_PRIMARY")" ] || fail "the old primary's stack was stopped or restarted"
echo "the old primary's containers were not stopped by the two refused pushes"
run "${PRIMARY_SRC[@]}" status
echo "the promoted copy is untouched:"; sql "$P_STANDBY" 'select id, item from orders order by id'

say "F5. Fail back: the old primary serves as a target of 'shop', the promoted host pushes to it"
FB_PORT=$(free_port)
mkdir -p "$W/primary/target/conf.d" "$W/standby/source/conf.d"
cat >"$W/primary/target/target.toml" <<CONF
listen = "127.0.0.1:$FB_PORT"
identity_dir = "$W/primary/etc"            # the certificate it already has
CONF
cat >"$W/primary/target/conf.d/shop.toml" <<CONF
stack = "shop"
path = "$S"                                # its own data dir
allow = ["standby"]
compose_project = "$P_PRIMARY"
order = ["db", "app"]
stop_timeout = "30s"
health_timeout = "60s"
CONF
cat >"$W/standby/source/source.toml" <<CONF
identity_dir = "$W/standby/etc"            # the certificate it already has
[targets.primary]
address = "127.0.0.1:$FB_PORT"
CONF
cat >"$W/standby/source/conf.d/shop.toml" <<CONF
stack = "shop"
path = "$LIVE"
target = "primary"
compose_project = "$P_STANDBY"
order = ["db", "app"]
stop_timeout = "30s"
CONF
stackclone-target --config "$W/primary/target/target.toml" run 2>"$W/primary-target.log" &
TARGET_PIDS+=("$!")
for _ in $(seq 100); do grep -q "target listening" "$W/primary-target.log" && break; sleep 0.1; done
STANDBY_SRC=(stackclone-source --config "$W/standby/source/source.toml" --state-dir "$W/standby/source-state")
data_bytes=$(du -sb --dereference-args "$S" "$(docker volume inspect -f '{{.Mountpoint}}' "${P_PRIMARY}_pgdata")" | awk '{s+=$1} END {print s}')
# (`run` would put its "$ command" line into the JSON)
printf '$ %s\n' "${STANDBY_SRC[*]} push shop --to primary --fail-back --json"
"${STANDBY_SRC[@]}" push shop --to primary --fail-back --json | tee "$W/failback.json"
sent=$(json 'd[0]["bytes_sent"]' <"$W/failback.json")
[ "$(json 'd[0]["ok"]' <"$W/failback.json")" = True ] || fail "the fail-back did not commit"
[ "$(json 'd[0]["handed_over"]' <"$W/failback.json")" = True ] || fail "the fail-back did not hand over"
echo "bytes on the wire: $sent of the $data_bytes bytes the stack holds ($((sent * 100 / data_bytes)) %)"
[ "$sent" -lt $((data_bytes / 4)) ] || fail "the fail-back sent more than a quarter of the data"
rollback_to=$(json 'd[0]["replaced"]["rollback_to"]' <"$W/failback.json")
echo "the old primary's own copy (with the lost order) is kept: stackclone-target rollback shop --to $rollback_to restores it"
wait_sql "$P_PRIMARY"
echo "the primary runs the promoted copy's data again:"; sql "$P_PRIMARY" 'select id, item from orders order by id'
sql "$P_PRIMARY" "select count(*) from orders where item like '4 %'" | grep -qx 1 || fail "the standby's order did not come back"
echo "the standby's stack stays stopped (handed over):"; show_stacks "$P_STANDBY"
run stackclone-target --config "$W/primary/target/target.toml" status shop

say "F6. Return to normal: demote the standby; the primary's pushes are deltas again"
run "${STANDBY_TGT[@]}" demote shop
run sql "$P_PRIMARY" "insert into orders (item) values ('5 back to normal');"
printf '$ %s\n' "${PRIMARY_SRC[*]} push shop --json"
"${PRIMARY_SRC[@]}" push shop --json | tee "$W/normal.json"
[ "$(json 'd[0]["ok"]' <"$W/normal.json")" = True ] || fail "the push after demote did not commit"
wait_sql "$P_STANDBY"
echo "the standby's orders:"; sql "$P_STANDBY" 'select id, item from orders order by id'
sql "$P_STANDBY" "select count(*) from orders where item like '5 %'" | grep -qx 1 || fail "the standby is not current"
run "${PRIMARY_SRC[@]}" status
run "${STANDBY_TGT[@]}" status shop

say "Done. The failover story worked in $W"
