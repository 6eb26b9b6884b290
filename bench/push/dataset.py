#!/usr/bin/env python3
"""Deterministic datasets for the push benchmark, and the 1 % mutation step.

    dataset.py gen    ROOT --kind small|big|both|million [--scale S] [--seed N]
    dataset.py mutate ROOT --kind ... [--scale S] [--seed N]
    dataset.py revert ROOT --kind ... [--scale S] [--seed N]

Everything, content and metadata, comes from the seed (MT19937 via `random.Random(str)`, which
is stable across Python versions), so two runs with the same flags produce the same bytes, the
same mtimes and the same mutated positions.

- small: round(20000 * scale) files of 1-16 KiB in nested dirs `dNN/eN/fNNNNN.dat`
  (20 x 10 dirs of 100 files at full size). Content is PRNG output, so it does not compress:
  no tool gets a head start from zstd or ssh compression.
- big: 4 files `big/dbK.bin` of 256 MiB * scale (rounded down to 4 KiB), PRNG content,
  like database pages.
- both: `small/` and `big/` subtrees side by side, the same content as the two above.
- million: round(1000000 * scale) files of 1-4 KiB in `mNNN/nN/fNNNNNNN.dat` (100 x 10 dirs of
  1,000 files at full size, 2.4 GiB). Content comes from one PRNG stream per leaf dir, so that
  writing a million files costs little more than the system calls.

mutate (deterministic positions and new content):
- big: 1 % of each file's 4 KiB blocks rewritten in place (same size, new mtime).
- small, million: 1 % of the files: half edited (256 bytes replaced at a random offset, 64 bytes
  appended), a quarter deleted, a quarter new files added in existing dirs.
What it overwrote is kept in ROOT/../<name>.undo, and `revert` writes it back and restores the
original mtimes (directories too), so the content is the base set again. Inodes and ctimes of
the touched files change, as they would in life.

A state file ROOT/../<name>.state ("base" / "mutated" + the parameters) lets a rerun reuse the
data and revert an interrupted mutation.
"""

import argparse
import json
import os
import pickle
import random
import shutil
import sys

KIB = 1024
MIB = 1024 * KIB
BLOCK = 4 * KIB
BASE_MTIME = 1_700_000_000
MUT_MTIME = 1_750_000_000
DIR_MTIME_NS = BASE_MTIME * 10**9


def small_count(scale):
    return max(10, round(20000 * scale))


def big_size(scale):
    return max(BLOCK * 4, int(256 * MIB * scale) // BLOCK * BLOCK)


def small_rel(i):
    return os.path.join(f"d{i // 1000:02d}", f"e{(i // 100) % 10}", f"f{i:05d}.dat")


def small_mtime_ns(i):
    return (BASE_MTIME + i) * 10**9 + (i * 7919) % 10**9


def small_content(seed, i):
    r = random.Random(f"{seed}/small/{i}")
    return r.randbytes(r.randint(1 * KIB, 16 * KIB))


def million_count(scale):
    return max(10, round(1_000_000 * scale))


def million_rel(i):
    return os.path.join(f"m{i // 10000:03d}", f"n{(i // 1000) % 10}", f"f{i:07d}.dat")


def million_dir_content(seed, leaf, n):
    """Sizes and content of the files of one leaf dir (1,000 files), from one stream."""
    r = random.Random(f"{seed}/million/{leaf}")
    sizes = [r.randint(1 * KIB, 4 * KIB) for _ in range(n)]
    return sizes, r.randbytes(sum(sizes))


def big_rel(k):
    return os.path.join("big", f"db{k}.bin")


def big_mtime_ns(k):
    return (BASE_MTIME + 100_000 + k) * 10**9 + 123_456_789


class Dataset:
    def __init__(self, root, kind, scale=1.0, seed=1):
        self.root = os.path.abspath(root)
        self.kind = kind
        self.scale = scale
        self.seed = seed
        self.name = os.path.basename(self.root.rstrip("/"))
        parent = os.path.dirname(self.root)
        self.state_file = os.path.join(parent, self.name + ".state")
        self.undo_file = os.path.join(parent, self.name + ".undo")

    # ---- layout -------------------------------------------------------------------------
    def has_small(self):
        """Many small files: `small` (and in `both`) or `million`."""
        return self.kind in ("small", "both", "million")

    def n_small(self):
        return million_count(self.scale) if self.kind == "million" else small_count(self.scale)

    def rel(self, i):
        return million_rel(i) if self.kind == "million" else small_rel(i)

    def add_size_max(self):
        return 4 * KIB if self.kind == "million" else 16 * KIB

    def has_big(self):
        return self.kind in ("big", "both")

    def small_prefix(self):
        return "small" if self.kind == "both" else ""

    def spath(self, rel):
        return os.path.join(self.root, self.small_prefix(), rel)

    def params(self):
        return {"kind": self.kind, "scale": self.scale, "seed": self.seed,
                "small_files": self.n_small() if self.has_small() else 0,
                "big_files": 4 if self.has_big() else 0,
                "big_size": big_size(self.scale) if self.has_big() else 0}

    def read_state(self):
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def write_state(self, state):
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"state": state, **self.params()}, f)
        os.replace(tmp, self.state_file)

    # ---- generation ---------------------------------------------------------------------
    def ensure(self, log=print):
        """Generate if missing or made with other parameters; revert if left mutated."""
        st = self.read_state()
        if st is not None and {k: v for k, v in st.items() if k != "state"} == self.params() \
                and os.path.isdir(self.root):
            if st["state"] == "mutated":
                log(f"{self.name}: reverting a mutation left by an earlier run")
                self.revert()
            return False
        self.generate(log)
        return True

    def generate(self, log=print):
        if os.path.exists(self.root):
            shutil.rmtree(self.root)
        if os.path.exists(self.state_file):
            os.unlink(self.state_file)
        os.makedirs(self.root)
        if self.kind == "million":
            self.generate_million(log)
        elif self.has_small():
            n = small_count(self.scale)
            log(f"{self.name}: writing {n} small files")
            for i in range(n):
                p = self.spath(self.rel(i))
                if i % 100 == 0:
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(small_content(self.seed, i))
                t = small_mtime_ns(i)
                os.utime(p, ns=(t, t))
        if self.has_big():
            size = big_size(self.scale)
            log(f"{self.name}: writing 4 files of {size / MIB:.1f} MiB")
            os.makedirs(os.path.join(self.root, "big"), exist_ok=True)
            for k in range(4):
                p = os.path.join(self.root, big_rel(k))
                with open(p, "wb") as f:
                    off, c = 0, 0
                    while off < size:
                        n = min(MIB, size - off)
                        f.write(random.Random(f"{self.seed}/big/{k}/{c}").randbytes(n))
                        off += n
                        c += 1
                t = big_mtime_ns(k)
                os.utime(p, ns=(t, t))
        self.fix_dir_mtimes()
        self.write_state("base")

    def generate_million(self, log):
        n = million_count(self.scale)
        log(f"{self.name}: writing {n} files of 1-4 KiB")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for leaf in range((n + 999) // 1000):
            first, last = leaf * 1000, min(n, leaf * 1000 + 1000)
            d = os.path.dirname(self.spath(million_rel(first)))
            os.makedirs(d, exist_ok=True)
            sizes, blob = million_dir_content(self.seed, leaf, last - first)
            view = memoryview(blob)
            off = 0
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for i, size in zip(range(first, last), sizes):
                    fd = os.open(os.path.basename(million_rel(i)), flags, 0o644, dir_fd=dfd)
                    try:
                        os.write(fd, view[off:off + size])  # < 4 KiB: one write is all of it
                        t = small_mtime_ns(i)
                        os.utime(fd, ns=(t, t))
                    finally:
                        os.close(fd)
                    off += size
            finally:
                os.close(dfd)
            if leaf % 100 == 99:
                log(f"{self.name}: {last} files")

    def fix_dir_mtimes(self):
        for d, _, _ in os.walk(self.root, topdown=False):
            os.utime(d, ns=(DIR_MTIME_NS, DIR_MTIME_NS))

    # ---- mutation -----------------------------------------------------------------------
    def plan(self):
        """The deterministic mutation: which blocks and files, with what new content."""
        r = random.Random(f"{self.seed}/mutation")
        plan = {"big": [], "edit": [], "delete": [], "add": []}
        if self.has_big():
            nblocks = big_size(self.scale) // BLOCK
            m = max(1, nblocks // 100)
            for k in range(4):
                blocks = sorted(r.sample(range(nblocks), m))
                plan["big"].append((k, blocks))
        if self.has_small():
            n = self.n_small()
            m = max(4, n // 100)
            n_edit, n_del = m // 2, m // 4
            n_add = m - n_edit - n_del
            chosen = r.sample(range(n), n_edit + n_del)
            plan["edit"] = sorted(chosen[:n_edit])
            plan["delete"] = sorted(chosen[n_edit:])
            for j in range(n_add):
                d = os.path.dirname(self.rel(r.randrange(n)))
                plan["add"].append(os.path.join(d, f"new{j:05d}.dat"))
        return plan

    def mutate(self):
        st = self.read_state()
        if st and st["state"] == "mutated":
            raise SystemExit(f"{self.name} is already mutated; revert first")
        plan = self.plan()
        undo = {"big": [], "edit": [], "delete": [], "add": plan["add"]}
        for k, blocks in plan["big"]:
            p = os.path.join(self.root, big_rel(k))
            fd = os.open(p, os.O_RDONLY)
            try:
                old = b"".join(os.pread(fd, BLOCK, b * BLOCK) for b in blocks)
            finally:
                os.close(fd)
            undo["big"].append((k, blocks, old))
        for i in plan["edit"]:
            with open(self.spath(self.rel(i)), "rb") as f:
                undo["edit"].append((i, f.read()))
        for i in plan["delete"]:
            with open(self.spath(self.rel(i)), "rb") as f:
                undo["delete"].append((i, f.read()))
        # The undo data is on disk before anything is touched.
        with open(self.undo_file + ".tmp", "wb") as f:
            pickle.dump(undo, f)
        os.replace(self.undo_file + ".tmp", self.undo_file)
        self.write_state("mutated")

        for k, blocks in plan["big"]:
            p = os.path.join(self.root, big_rel(k))
            new = random.Random(f"{self.seed}/mutation/big/{k}").randbytes(BLOCK * len(blocks))
            fd = os.open(p, os.O_RDWR)
            try:
                for j, b in enumerate(blocks):
                    os.pwrite(fd, new[j * BLOCK:(j + 1) * BLOCK], b * BLOCK)
            finally:
                os.close(fd)
            t = MUT_MTIME * 10**9 + k
            os.utime(p, ns=(t, t))
        for n, (i, old) in enumerate(undo["edit"]):
            r = random.Random(f"{self.seed}/mutation/edit/{i}")
            off = r.randrange(max(1, len(old) - 256))
            data = old[:off] + r.randbytes(256) + old[off + 256:] + r.randbytes(64)
            p = self.spath(self.rel(i))
            with open(p, "r+b") as f:  # in place, like an editor that saves over the file
                f.write(data)
                f.truncate()
            t = MUT_MTIME * 10**9 + 1000 + n
            os.utime(p, ns=(t, t))
        for i in plan["delete"]:
            os.unlink(self.spath(self.rel(i)))
        for n, rel in enumerate(plan["add"]):
            p = self.spath(rel)
            r = random.Random(f"{self.seed}/mutation/add/{rel}")
            with open(p, "wb") as f:
                f.write(r.randbytes(r.randint(1 * KIB, self.add_size_max())))
            t = MUT_MTIME * 10**9 + 2000 + n
            os.utime(p, ns=(t, t))

    def revert(self):
        st = self.read_state()
        if not st or st["state"] != "mutated":
            return
        with open(self.undo_file, "rb") as f:
            undo = pickle.load(f)
        for k, blocks, old in undo["big"]:
            p = os.path.join(self.root, big_rel(k))
            fd = os.open(p, os.O_RDWR)
            try:
                for j, b in enumerate(blocks):
                    os.pwrite(fd, old[j * BLOCK:(j + 1) * BLOCK], b * BLOCK)
            finally:
                os.close(fd)
            t = big_mtime_ns(k)
            os.utime(p, ns=(t, t))
        for i, old in undo["edit"] + undo["delete"]:
            p = self.spath(self.rel(i))
            with open(p, "wb") as f:
                f.write(old)
            t = small_mtime_ns(i)
            os.utime(p, ns=(t, t))
        for rel in undo["add"]:
            try:
                os.unlink(self.spath(rel))
            except FileNotFoundError:
                pass
        self.fix_dir_mtimes()
        self.write_state("base")

    def describe(self):
        p = self.params()
        files = p["small_files"] + p["big_files"]
        total = 0
        for d, _, fs in os.walk(self.root):
            for f in fs:
                total += os.lstat(os.path.join(d, f)).st_size
        return {**p, "files": files, "bytes": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["gen", "ensure", "mutate", "revert", "describe"])
    ap.add_argument("root")
    ap.add_argument("--kind", required=True, choices=["small", "big", "both", "million"])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    ds = Dataset(a.root, a.kind, a.scale, a.seed)
    if a.action == "gen":
        ds.generate()
    elif a.action == "ensure":
        ds.ensure()
    elif a.action == "mutate":
        ds.mutate()
    elif a.action == "revert":
        ds.revert()
    else:
        print(json.dumps(ds.describe()))


if __name__ == "__main__":
    sys.exit(main())
