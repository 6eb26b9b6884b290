#!/usr/bin/env bash
# The stackclone demo, on one machine: a "primary" compose stack and its "standby" copy, with a
# source and a target agent talking mutual-TLS QUIC over 127.0.0.1.
#
# It builds the binaries and two local test images (busybox and PostgreSQL 15 from Debian's
# packages; no registry needed), makes a fleet CA, enrolls the standby with a one-time token,
# starts the target agent, brings up a two-service compose stack as the primary (a PostgreSQL
# database in a named volume, as official compose examples keep it, and an app that depends on
# it and writes to a bind-mounted data dir, both health-checked), shows which mounts the push
# replicates, pushes it, shows the standby's database answering with the same rows from its own
# volume, writes
# to the database and the data while pgbench loads it, pushes again (only the change crosses;
# the primary is down only for the final pass), and prints both status tables, a verify and a
# rollback.
#
# Usage: ./deploy/demo.sh [WORKDIR]      (default: a fresh temp dir, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

if [ $# -ge 1 ]; then W=$1; mkdir -p "$W"; KEEP=1; else W=$(mktemp -d /tmp/stackclone-demo.XXXXXX); KEEP=0; fi
W=$(cd "$W" && pwd)
SUFFIX=$(basename "$W" | tr -dc 'a-z0-9' | tail -c 6)
P_PRIMARY="scdemoprimary$SUFFIX"
P_STANDBY="scdemostandby$SUFFIX"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for p in "$P_PRIMARY" "$P_STANDBY"; do
    ids=$(docker ps -aq --filter "label=com.docker.compose.project=$p")
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
    docker network rm "${p}_default" >/dev/null 2>&1 || true
    # The standby's volume links to its replicated tree, and Docker removes it only once the
    # link is gone (README: "A named volume is part of the generation").
    for v in $(docker volume ls -q --filter "label=com.docker.compose.project=$p"); do
      mp=$(docker volume inspect -f '{{.Mountpoint}}' "$v")
      if [ -L "$mp" ]; then rm -f "$mp"; fi
      docker volume rm "$v" >/dev/null 2>&1 || true
    done
  done
  if [ "$KEEP" = 0 ]; then rm -rf "$W"; fi
}
trap cleanup EXIT

say "Building the binaries (release) and the test images"
cargo build --release --locked -q -p stackclone-certs -p stackclone-source -p stackclone-target
B=$ROOT/target/release
export PATH=$B:$PATH
"$ROOT/deploy/image/build.sh"
"$ROOT/deploy/image/build-postgres.sh"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ENROLL_PORT=$(free_port)
SYNC_PORT=$(free_port)

say "1. On the primary (the CA host): create the fleet CA, this host's identity and its flag key"
run stackclone-certs --dir "$W/primary/etc" init --name primary

say "2. Still on the primary: a one-time join token for the standby, and the enrollment endpoint"
TOKEN_JSON=$(stackclone-certs --dir "$W/primary/etc" token create --role target --ttl 10m --server "127.0.0.1:$ENROLL_PORT" --json)
echo "$TOKEN_JSON"
TOKEN=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$TOKEN_JSON")
PIN=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_pin"])' <<<"$TOKEN_JSON")
stackclone-certs --dir "$W/primary/etc" serve --listen "127.0.0.1:$ENROLL_PORT" >"$W/enroll.log" 2>&1 &
ENROLL_PID=$!; PIDS+=("$ENROLL_PID")
for _ in $(seq 100); do grep -q listening "$W/enroll.log" && break; sleep 0.1; done

say "3. On the standby: enroll with the token; the CA is checked against the pin before anything is sent"
echo "$TOKEN" | run stackclone-certs --dir "$W/standby/etc" enroll --name standby --server "127.0.0.1:$ENROLL_PORT" --token-file - --ca-pin "$PIN"
kill "$ENROLL_PID"

say "4. The primary's compose stack 'shop': a PostgreSQL db in a named volume, and an app that depends on it and writes ./data"
S=$W/primary/stacks/shop
mkdir -p "$S/data"
cat >"$S/docker-compose.yml" <<'YML'
version: "2.4"
services:
  db:
    image: stackclone-test/postgres:15
    volumes: ["pgdata:/var/lib/postgresql/data"]
    healthcheck: {test: ["CMD", "pg_isready", "-U", "postgres", "-h", "127.0.0.1"], interval: 1s, retries: 60}
  app:
    image: stackclone-test/busybox:1
    depends_on: [db]
    volumes: ["./data:/data"]
    command: ["sh", "-c", "trap 'exit 0' TERM; echo \"app started $$(date -u +%T)\" >> /data/log; touch /tmp/ready; while :; do sleep 1 & wait; done"]
    healthcheck: {test: ["CMD-SHELL", "test -f /tmp/ready"], interval: 1s, retries: 30}
volumes:
  pgdata: {}
YML
head -c $((16 * 1024 * 1024)) /dev/urandom >"$S/data/catalog.db"
(cd "$S" && run "${COMPOSE[@]}" -p "$P_PRIMARY" up -d)
# sql PROJECT STATEMENT: psql in the project's db container, as the postgres user.
sql() { docker exec -u postgres "$(docker ps -q --filter "label=com.docker.compose.project=$1" --filter label=com.docker.compose.service=db)" psql -U postgres -qAtc "$2" postgres; }
for _ in $(seq 120); do sql "$P_PRIMARY" 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
run sql "$P_PRIMARY" "create table orders (id serial primary key, item text not null); insert into orders (item) values ('2 coffee');"

say "5. Config: one file per stack in conf.d on each side"
mkdir -p "$W/primary/conf/conf.d" "$W/standby/conf/conf.d" "$W/standby/stacks"
cat >"$W/standby/conf/target.toml" <<CONF
listen = "127.0.0.1:$SYNC_PORT"
identity_dir = "$W/standby/etc"
CONF
cat >"$W/standby/conf/conf.d/shop.toml" <<CONF
stack = "shop"
path = "$W/standby/stacks/shop"
allow = ["primary"]
compose_project = "$P_STANDBY"
order = ["db", "app"]          # Compose v1 writes no depends_on label
stop_timeout = "30s"
health_timeout = "60s"
CONF
cat >"$W/primary/conf/source.toml" <<CONF
identity_dir = "$W/primary/etc"
[targets.standby]
address = "127.0.0.1:$SYNC_PORT"
CONF
cat >"$W/primary/conf/conf.d/shop.toml" <<CONF
stack = "shop"
path = "$S"
target = "standby"
compose_project = "$P_PRIMARY"
order = ["db", "app"]
stop_timeout = "30s"           # PostgreSQL's fast shutdown needs well under a second here
precopy = true                 # the bulk crosses while the stack runs
CONF
cat "$W/primary/conf/conf.d/shop.toml"

say "6. Start the target agent on the standby"
stackclone-target --config "$W/standby/conf/target.toml" run 2>"$W/target.log" &
PIDS+=("$!")
for _ in $(seq 100); do grep -q "target listening" "$W/target.log" && break; sleep 0.1; done

SRC=(stackclone-source --config "$W/primary/conf/source.toml" --state-dir "$W/primary/state")
TGT=(stackclone-target --config "$W/standby/conf/target.toml")
show_stacks() { docker ps --filter "label=com.docker.compose.project=$1" --format '  {{.Label "com.docker.compose.service"}}: {{.Status}}'; }

say "7. What the push will replicate: every mount of the stack, judged before anything stops"
run "${SRC[@]}" push shop --dry-run | grep ' mount '

say "8. First push: pre-copy while the primary runs, then a short stop for the final pass"
run "${SRC[@]}" push shop

say "9. The standby runs its own copy, healthy, on the same data; its database answers from its own volume"
echo "primary ($P_PRIMARY):"; show_stacks "$P_PRIMARY"
echo "standby ($P_STANDBY):"; show_stacks "$P_STANDBY"
run docker volume ls --filter "label=com.docker.compose.project=$P_STANDBY"
cmp "$S/data/catalog.db" "$W/standby/stacks/shop/data/catalog.db" && echo "catalog.db: identical on both hosts"
echo "the standby's orders:"; sql "$P_STANDBY" 'select id, item from orders order by id'

if [ -n "${STACKCLONE_DEMO_HANDOFF:-}" ]; then
  # deploy/failover-demo.sh goes on from here with the running primary, standby and agent.
  declare -p W SUFFIX P_PRIMARY P_STANDBY SYNC_PORT S B COMPOSE >"$STACKCLONE_DEMO_HANDOFF"
  printf 'TARGET_PIDS=(%s)\n' "${PIDS[*]}" >>"$STACKCLONE_DEMO_HANDOFF"
  trap - EXIT
  say "Handing the running demo over to the caller"
  exit 0
fi

say "10. A new order and pgbench load on the primary's database, 1% of the catalog changes; push again"
run sql "$P_PRIMARY" "insert into orders (item) values ('1 tea');"
docker exec -u postgres "$(docker ps -q --filter "label=com.docker.compose.project=$P_PRIMARY" --filter label=com.docker.compose.service=db)" \
    pgbench -i -s 1 -U postgres postgres >/dev/null 2>&1
python3 - "$S/data/catalog.db" <<'PY'
import os, sys, random
random.seed(7)
with open(sys.argv[1], "r+b") as f:
    size = os.fstat(f.fileno()).st_size
    for _ in range(size // 4096 // 100):
        f.seek(random.randrange(size // 4096) * 4096)
        f.write(os.urandom(4096))
PY
# The database keeps writing while the pre-copy runs; the final pass, with the primary stopped,
# sends what it wrote meanwhile (pgbench's connections end when the primary stops).
docker exec -u postgres "$(docker ps -q --filter "label=com.docker.compose.project=$P_PRIMARY" --filter label=com.docker.compose.service=db)" \
    pgbench -n -c 2 -T 60 -U postgres postgres >/dev/null 2>&1 &
LOAD=$!
sleep 2
run "${SRC[@]}" push shop --dry-run
run "${SRC[@]}" push shop
wait "$LOAD" || true
for _ in $(seq 120); do sql "$P_STANDBY" 'select 1' >/dev/null 2>&1 && sql "$P_PRIMARY" 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
echo "the standby's orders:"; sql "$P_STANDBY" 'select id, item from orders order by id'
echo "pgbench history rows: primary $(sql "$P_PRIMARY" 'select count(*) from pgbench_history'), standby $(sql "$P_STANDBY" 'select count(*) from pgbench_history')"
echo "standby ($P_STANDBY):"; show_stacks "$P_STANDBY"

say "11. Status on both sides"
run "${SRC[@]}" status
run "${TGT[@]}" status

say "12. Verify the standby's live copy (its own app appended to data/log and its database wrote"
echo "    its files when it started: that drift is reported here, and the next push brings it back"
echo "    to the primary's version)"
run "${TGT[@]}" verify shop || true

say "13. Roll the standby back to generation 1 (stop, restore, start, health check)"
run "${TGT[@]}" rollback shop --yes   # (on a terminal it would ask first)
echo "the standby's orders:"; sql "$P_STANDBY" 'select id, item from orders order by id'
echo "standby ($P_STANDBY):"; show_stacks "$P_STANDBY"

say "Done. The demo worked in $W"
