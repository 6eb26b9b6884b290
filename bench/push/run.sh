#!/usr/bin/env bash
# The push benchmark: stackclone-source push against rsync over ssh, rclone over sftp and
# `cp -a`, in one run, with ratios against the targets of issue 7. See bench/README.md, "Push".
#
#   bench/push/run.sh [--scale 0.05] [--reps 3] [--rclone-reps N]
#                     [--datasets small,big,both,million] [--link loopback|lan|wan]
#                     [--tools stackclone,stackclone-precopy,rsync,rclone,cp] [--dir DIR] [--keep]
#
# Needs root (a throwaway sshd on 127.0.0.1:2222 that logs in as root, nft counters on lo; with
# --link lan|wan a network namespace, torn down at the end, with the link proxy in it).
# Writes everything under bench/work/push (gitignored) or --dir; the table goes to
# DIR/results.md and stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $(id -u) != 0 ]]; then
    echo "run.sh needs root: it starts its own sshd for root logins and adds nft counters" >&2
    exit 1
fi

# Tools: install what is missing (apt-get update once, only if something is missing).
need=()
command -v rsync >/dev/null || need+=(rsync)
[[ -x /usr/sbin/sshd && -x /usr/lib/openssh/sftp-server ]] || need+=(openssh-server)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v rclone >/dev/null || need+=(rclone)
[[ -x /usr/bin/time ]] || need+=(time)
command -v nft >/dev/null || need+=(nftables)
command -v python3 >/dev/null || need+=(python3)
command -v ethtool >/dev/null || need+=(ethtool)  # --link: offloads off on the namespace's lo
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release -p stackclone-source -p stackclone-target -p stackclone-certs \
    -p stackclone-bench-linkem

# The interpreter itself, not a wrapper such as pyenv's python3 shim (a script that runs python
# as its child): a SIGTERM to this script's pid must reach bench.py, which then tears down.
py=$(python3 -c 'import sys; print(sys.executable)')
exec "$py" bench/push/bench.py --command-line "bench/push/run.sh $*" "$@"
