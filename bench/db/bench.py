#!/usr/bin/env python3
"""The database benchmark (bench/db/run.sh calls this; see bench/README.md).

A PostgreSQL 15 compose stack (the local image of deploy/image/build-postgres.sh) is replicated
to a standby on the same host over 127.0.0.1 by the release binaries. Each cycle runs under
pgbench load that started a few seconds before it (the stop of the primary ends the load). Per
cycle it records what the push reports: the primary's downtime (`source_downtime_ms`), the
standby's (`target_downtime_ms`), the wall time and the bytes sent; then checks that the
standby's `pg_dump` equals the primary's. The baseline is what the replaced tool did: stop the
primary, copy its data dir with `rsync -a --delete --numeric-ids` to a second local dir, start
it. That rsync is local (no ssh, no network), so it is a lower bound of "stop, sync, start".
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"
IMAGE = "stackclone-test/postgres:15"
COMPOSE = f"""version: "2.4"
services:
  db:
    image: {IMAGE}
    volumes: ["./pgdata:/var/lib/postgresql/data"]
    healthcheck:
      test: ["CMD", "pg_isready", "-U", "postgres", "-h", "127.0.0.1"]
      interval: 1s
      retries: 120
"""


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def compose_cli():
    if run(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


def container(project):
    out = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
               "--filter", "label=com.docker.compose.service=db"]).stdout.split()
    if len(out) != 1:
        sys.exit(f"{project}: expected one db container, found {out}")
    return out[0]


def psql(project, sql):
    return run(["docker", "exec", "-u", "postgres", container(project), "psql", "-U", "postgres",
                "-qAtc", sql, "postgres"]).stdout.strip()


def wait_ready(project, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        cid = container(project)
        health = run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid],
                     check=False).stdout.strip()
        if health == "healthy":
            return
        time.sleep(0.2)
    sys.exit(f"{project} not healthy within {limit} s")


def dump(project):
    out = run(["docker", "exec", "-u", "postgres", container(project), "pg_dump", "-U",
               "postgres", "postgres"]).stdout
    # pg_dump draws a random key for its \restrict lines on every run.
    return "\n".join(l for l in out.splitlines()
                     if not l.startswith(("\\restrict ", "\\unrestrict ")))


def load(project):
    return subprocess.Popen(
        ["docker", "exec", "-u", "postgres", container(project), "pgbench", "-n", "-c", "4",
         "-T", "600", "-U", "postgres", "postgres"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def end_load(p):
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        sys.exit("pgbench did not end: the primary was not stopped")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--scale", type=int, default=10, help="pgbench scale (10 = about 150 MiB)")
    ap.add_argument("--load-secs", type=float, default=5.0,
                    help="seconds of load before each cycle")
    ap.add_argument("--dir", default=str(ROOT / "bench" / "work" / "db"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--command-line", default="bench/db/run.sh")
    a = ap.parse_args()

    # Data under DIR/data (removed at the end unless --keep); results.md stays in DIR.
    top = Path(a.dir)
    w = top / "data"
    tag = f"scbenchdb{os.getpid()}"
    src_proj, tgt_proj = f"{tag}src", f"{tag}tgt"
    cli = compose_cli()
    procs = []

    def cleanup():
        for p in procs:
            p.terminate()
        for project in (src_proj, tgt_proj):
            ids = run(["docker", "ps", "-aq", "--filter",
                       f"label=com.docker.compose.project={project}"], check=False).stdout.split()
            if ids:
                run(["docker", "rm", "-f", "-v", *ids], check=False)
            run(["docker", "network", "rm", f"{project}_default"], check=False)
        if not a.keep:
            shutil.rmtree(w, ignore_errors=True)

    if w.exists():
        shutil.rmtree(w)
    w.mkdir(parents=True)
    top.mkdir(parents=True, exist_ok=True)
    try:
        certs = lambda d, *args: run([str(BIN / "stackclone-certs"), "--dir", str(w / d), *args])
        certs("src-id", "init", "--name", "primary")
        certs("tgt-id", "csr", "--name", "standby", "--out", str(w / "standby.csr"))
        certs("src-id", "sign", str(w / "standby.csr"), "--role", "target", "--out",
              str(w / "standby.bundle"))
        pin = json.loads(certs("src-id", "show", "--json").stdout)["ca"]["pin"]
        certs("tgt-id", "install", str(w / "standby.bundle"), "--ca-pin", pin)
        src = w / "src" / "db"
        (src / "pgdata").mkdir(parents=True)
        (src / "docker-compose.yml").write_text(COMPOSE)
        run([*cli, "-p", src_proj, "up", "-d"], cwd=src)
        wait_ready(src_proj)
        run(["docker", "exec", "-u", "postgres", container(src_proj), "pgbench", "-i", "-s",
             str(a.scale), "-U", "postgres", "postgres"])
        size = psql(src_proj, "select pg_size_pretty(pg_database_size('postgres'))")

        port = 47000 + os.getpid() % 1000
        (w / "tgt" / "db").mkdir(parents=True)
        (w / "etc-target" / "conf.d").mkdir(parents=True)
        (w / "etc-target" / "target.toml").write_text(
            f'listen = "127.0.0.1:{port}"\nidentity_dir = "{w}/tgt-id"\n')
        (w / "etc-target" / "conf.d" / "db.toml").write_text(
            f'stack = "db"\npath = "{w}/tgt/db"\nallow = ["primary"]\n'
            f'compose_project = "{tgt_proj}"\nstop_timeout = "60s"\nhealth_timeout = "120s"\n')
        (w / "etc-source" / "conf.d").mkdir(parents=True)
        (w / "etc-source" / "source.toml").write_text(
            f'identity_dir = "{w}/src-id"\n[targets.standby]\naddress = "127.0.0.1:{port}"\n')
        target_log = open(w / "target.log", "w")
        procs.append(subprocess.Popen(
            [str(BIN / "stackclone-target"), "--config", str(w / "etc-target" / "target.toml"),
             "run"], stdout=subprocess.DEVNULL, stderr=target_log))
        time.sleep(1)

        def stack_file(precopy):
            (w / "etc-source" / "conf.d" / "db.toml").write_text(
                f'stack = "db"\npath = "{src}"\ntarget = "standby"\n'
                f'compose_project = "{src_proj}"\nstop_timeout = "60s"\n'
                f'precopy = {"true" if precopy else "false"}\n')

        def push():
            r = run([str(BIN / "stackclone-source"), "--config",
                     str(w / "etc-source" / "source.toml"), "--state-dir",
                     str(w / "src-state"), "push", "db", "--json"], check=False)
            try:
                o = json.loads(r.stdout)[0]
            except (json.JSONDecodeError, IndexError):
                sys.exit(f"push printed no JSON:\n{r.stdout}\n{r.stderr}")
            if not o["ok"]:
                sys.exit(f"push failed: {o['error']}")
            return o

        stack_file(True)
        push()  # generation 1: creates the standby; not timed
        wait_ready(tgt_proj)

        rows = {}
        for name, precopy in (("stackclone, pre-copy", True), ("stackclone, no pre-copy", False)):
            stack_file(precopy)
            rows[name] = []
            for _ in range(a.cycles):
                p = load(src_proj)
                time.sleep(a.load_secs)
                o = push()
                end_load(p)
                wait_ready(src_proj)
                wait_ready(tgt_proj)
                if dump(src_proj) != dump(tgt_proj):
                    sys.exit(f"{name}: the standby's pg_dump differs from the primary's")
                rows[name].append({
                    "src": o["source_downtime_ms"] / 1000,
                    "tgt": o["target_downtime_ms"] / 1000,
                    "wall": o["duration_ms"] / 1000,
                    "sent": o["bytes_sent"] / 2**20,
                })
                print(f"{name}: {rows[name][-1]}", flush=True)

        # The replaced tool's way: stop, sync, start (rsync locally: a lower bound).
        name = "stop, rsync -a (local), start"
        rows[name] = []
        copy = w / "rsync-copy"
        copy.mkdir()
        run(["rsync", "-a", "--delete", "--numeric-ids", f"{src}/pgdata/", f"{copy}/"])
        for _ in range(a.cycles):
            p = load(src_proj)
            time.sleep(a.load_secs)
            cid = container(src_proj)
            t0 = time.time()
            run(["docker", "stop", "-t", "60", cid])
            run(["rsync", "-a", "--delete", "--numeric-ids", f"{src}/pgdata/", f"{copy}/"])
            run(["docker", "start", cid])
            down = time.time() - t0
            end_load(p)
            wait_ready(src_proj)
            rows[name].append({"src": down, "tgt": down, "wall": down, "sent": float("nan")})
            print(f"{name}: {rows[name][-1]}", flush=True)

        base = median([r["src"] for r in rows[name]])
        out = [
            f"`{a.command_line}`: PostgreSQL 15, pgbench scale {a.scale} ({size}), "
            f"{a.cycles} cycles per row, each under `pgbench -n -c 4` load that ran "
            f"{a.load_secs:g} s before the cycle; medians.",
            "",
            "| way | primary down s | standby down s | cycle wall s | sent MiB | primary down ÷ stop-rsync-start |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, rs in rows.items():
            m = {k: median([r[k] for r in rs]) for k in ("src", "tgt", "wall", "sent")}
            sent = "-" if m["sent"] != m["sent"] else f"{m['sent']:.1f}"
            out.append(f"| {name} | {m['src']:.2f} | {m['tgt']:.2f} | {m['wall']:.2f} | "
                       f"{sent} | {m['src'] / base:.2f} |")
        text = "\n".join(out) + "\n"
        (top / "results.md").write_text(text)
        print()
        print(text)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
