#!/usr/bin/env bash
# The database benchmark: how long a real PostgreSQL stack under pgbench load is down per cycle,
# on the primary and on the standby, with stackclone (pre-copy on and off) against the replaced
# tool's way ("stop, sync, start") done with rsync. See bench/README.md, "Database downtime".
#
#   bench/db/run.sh [--cycles 5] [--scale 10] [--load-secs 5] [--dir DIR] [--keep]
#
# Needs root (the data dirs belong to the image's postgres user) and Docker. Builds the release
# binaries and the local PostgreSQL image (deploy/image/build-postgres.sh). Writes everything
# under bench/work/db (gitignored) or --dir; the table goes to DIR/results.md and stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $(id -u) != 0 ]]; then
    echo "run.sh needs root: the database's files belong to the image's postgres user" >&2
    exit 1
fi
need=()
command -v rsync >/dev/null || need+=(rsync)
command -v python3 >/dev/null || need+=(python3)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked -p stackclone-source -p stackclone-target -p stackclone-certs
deploy/image/build-postgres.sh
exec python3 bench/db/bench.py --command-line "bench/db/run.sh $*" "$@"
