//! The target's store on real files: fidelity, generations, rollback, crash at every journal op,
//! planted symlinks, a full disk, and the safety valves.
//!
//! Every `Commit` here is made the honest way (`support/cycle.rs`): a real `TargetSession` is
//! driven to it, with every wanted file staged through the real delta engine, so each commit
//! passed the real verification. These tests run as root (chown, mount).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, XattrFlags};
use stackclone_proto::manifest::Manifest;
use stackclone_proto::path::StackPath;
use stackclone_target::store::{self, Difference, LocalStage, StackStore, StoreConfig, StoreError};

#[path = "support/cycle.rs"]
mod cycle;
use cycle::{NOW, STACK, cycle, cycle_with, push, scan_tree};

// ------------------------------------------------------------------------------------------------
// Source trees on disk

fn sp(p: impl AsRef<[u8]>) -> StackPath {
    StackPath::new(p.as_ref().to_vec()).unwrap()
}

/// Builds a tree with exact owners, modes and nanosecond mtimes (applied last, deepest first).
struct Builder {
    root: PathBuf,
    times: BTreeMap<Vec<u8>, i64>,
    next_time: i64,
}

impl Builder {
    fn new(root: &Path) -> Self {
        fs::create_dir_all(root).unwrap();
        Self {
            root: root.to_path_buf(),
            times: BTreeMap::new(),
            next_time: 1_700_000_000_000_000_001,
        }
    }

    fn abs(&self, p: &[u8]) -> PathBuf {
        self.root.join(OsStr::from_bytes(p))
    }

    fn stamp(&mut self, p: &[u8]) {
        self.next_time += 1_000_123_457;
        self.times.insert(p.to_vec(), self.next_time);
    }

    fn own(&mut self, p: &[u8], uid: u32, mode: Option<u32>) {
        let a = self.abs(p);
        std::os::unix::fs::lchown(&a, Some(uid), Some(uid)).unwrap();
        if let Some(mode) = mode {
            fs::set_permissions(&a, fs::Permissions::from_mode(mode)).unwrap();
        }
        self.stamp(p);
    }

    fn dir(&mut self, p: impl AsRef<[u8]>, mode: u32, uid: u32) -> &mut Self {
        let p = p.as_ref();
        fs::create_dir(self.abs(p)).unwrap();
        self.own(p, uid, Some(mode));
        self
    }

    fn file(&mut self, p: impl AsRef<[u8]>, data: &[u8], mode: u32, uid: u32) -> &mut Self {
        let p = p.as_ref();
        let a = self.abs(p);
        let _ = fs::remove_file(&a);
        fs::write(&a, data).unwrap();
        self.own(p, uid, Some(mode));
        self
    }

    fn symlink(&mut self, p: impl AsRef<[u8]>, target: &str, uid: u32) -> &mut Self {
        let p = p.as_ref();
        std::os::unix::fs::symlink(target, self.abs(p)).unwrap();
        self.own(p, uid, None);
        self
    }

    fn hardlink(&mut self, existing: &str, new: &str) -> &mut Self {
        fs::hard_link(self.abs(existing.as_bytes()), self.abs(new.as_bytes())).unwrap();
        self
    }

    fn xattr(&mut self, p: &str, name: &str, value: &[u8]) -> &mut Self {
        rustix::fs::lsetxattr(self.abs(p.as_bytes()), name, value, XattrFlags::empty()).unwrap();
        self
    }

    /// A 16 MiB file with 4 KiB of data at 8 MiB and holes around it.
    fn sparse(&mut self, p: &str, uid: u32) -> &mut Self {
        let mut f = fs::File::create(self.abs(p.as_bytes())).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&noise(9, 4096)).unwrap();
        f.set_len(16 << 20).unwrap();
        self.own(p.as_bytes(), uid, Some(0o640));
        self
    }

    fn remove(&mut self, p: &str) -> &mut Self {
        let a = self.abs(p.as_bytes());
        if fs::symlink_metadata(&a).unwrap().is_dir() {
            fs::remove_dir_all(&a).unwrap();
        } else {
            fs::remove_file(&a).unwrap();
        }
        self.times.retain(|k, _| !sp(k).starts_with(&sp(p)));
        self
    }

    fn touch(&mut self, p: &str) -> &mut Self {
        self.stamp(p.as_bytes());
        self
    }

    /// Applies the recorded mtimes, deepest first (children change their parent's mtime).
    fn finish(&mut self) {
        let mut all: Vec<_> = self.times.iter().collect();
        all.sort_by_key(|(p, _)| std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count()));
        for (p, ns) in all {
            let t = Timespec {
                tv_sec: ns.div_euclid(1_000_000_000),
                tv_nsec: ns.rem_euclid(1_000_000_000) as _,
            };
            let times = Timestamps {
                last_access: t,
                last_modification: t,
            };
            rustix::fs::utimensat(CWD, self.abs(p), &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        }
    }
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Generation 1: every case `rsync -aHAXS --numeric-ids` keeps.
fn gen1(root: &Path) -> Builder {
    let mut b = Builder::new(root);
    b.dir("app", 0o755, 999)
        .file("app/config.yml", b"listen: 8080\n", 0o640, 999)
        .xattr("app/config.yml", "user.origin", b"primary")
        .file(b"app/\xff\xfe-latin1", b"bytes", 0o600, 999)
        .file("app/empty", b"", 0o644, 0)
        .dir("db", 0o1777, 999)
        .file("db/big.dat", &noise(1, 300_000), 0o600, 999)
        .file("db/other.dat", &noise(2, 70_000), 0o600, 999)
        .sparse("db/sparse.img", 999)
        .dir("empty-dir", 0o700, 999)
        .dir("setgid-dir", 0o2755, 999)
        .file("setgid-dir/inside", b"x", 0o644, 999)
        .file("setuid-bin", &noise(3, 5000), 0o4755, 0)
        .file("names-\u{e9}\n-newline", b"odd name", 0o644, 999)
        .symlink("current", "db/big.dat", 999)
        .symlink("dangling", "/nowhere/at/all", 999)
        .symlink("absolute", "/etc/passwd", 0)
        .file("hard-a", b"linked content", 0o644, 999)
        .hardlink("hard-a", "hard-b")
        .dir("nested", 0o755, 999)
        .dir("nested/a", 0o750, 999)
        .dir("nested/a/b", 0o755, 999)
        .file("nested/a/b/deep.txt", b"deep", 0o644, 999)
        .symlink("to-dir", "nested", 999)
        .dir("data", 0o755, 999)
        .file("data/rows", b"1,2,3\n", 0o644, 999);
    b.finish();
    b
}

/// Generation 2: edits, type changes both ways, a rename, deletes, metadata-only changes,
/// hardlink membership changes.
fn gen2(root: &Path) -> Builder {
    let mut b = gen1(root);
    let mut big = noise(1, 300_000);
    big[150_000..150_100].copy_from_slice(&[7u8; 100]);
    big.extend_from_slice(b"appended rows");
    b.file("db/big.dat", &big, 0o600, 999)
        // rename (same content elsewhere: staged from the live copy)
        .remove("db/other.dat")
        .file("db/renamed.dat", &noise(2, 70_000), 0o600, 999)
        // file -> dir, dir -> file, symlink -> dir, file -> symlink
        .remove("app/empty")
        .dir("app/empty", 0o755, 999)
        .file("app/empty/now-inside", b"inside", 0o644, 999)
        .remove("empty-dir")
        .file("empty-dir", b"now a file", 0o644, 999)
        .remove("to-dir")
        .dir("to-dir", 0o711, 0)
        .remove("names-\u{e9}\n-newline")
        .symlink("names-\u{e9}\n-newline", "app", 999)
        // symlink retarget, deletes of a subtree
        .remove("current")
        .symlink("current", "db/renamed.dat", 999)
        .remove("nested/a")
        // metadata only
        .own(b"app/config.yml", 0, Some(0o600));
    b.xattr("app/config.yml", "user.origin", b"standby-test")
        .xattr("app/config.yml", "user.extra", b"1")
        .touch("setgid-dir")
        .touch("data/rows")
        // hardlinks: a third member, and a new pair
        .hardlink("hard-a", "hard-c")
        .file("pair-1", b"pair", 0o644, 999)
        .hardlink("pair-1", "pair-2")
        .file("new.txt", b"hello", 0o644, 999)
        // a new directory tree, placed whole: hard links into it and out of it (a group's
        // leader is its first path: `fresh-link` sorts before `fresh/…`, `fresh/…` before
        // `zz-link`), a symlink, a nested directory owned by someone else
        .dir("fresh", 0o750, 999)
        .dir("fresh/deep", 0o711, 0)
        .file("fresh/deep/data", b"fresh data", 0o640, 999)
        .symlink("fresh/link", "deep/data", 999)
        .file("fresh/deep/led", b"led from outside", 0o600, 999)
        .hardlink("fresh/deep/data", "zz-link")
        .hardlink("fresh/deep/led", "fresh-link");
    b.touch("hard-a");
    b.finish();
    b
}

/// Generation 3: a few more edits (for multi-step rollback).
fn gen3(root: &Path) -> Builder {
    let mut b = gen2(root);
    b.file("new.txt", b"hello again", 0o644, 999)
        .remove("db/big.dat")
        .file("gen3-only", b"3", 0o600, 0);
    b.finish();
    b
}

struct Env {
    _tmp: tempfile::TempDir,
    live: PathBuf,
    src: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    Env {
        live: tmp.path().join("live"),
        src: tmp.path().join("src"),
        _tmp: tmp,
    }
}

fn open(live: &Path, keep: u32) -> StackStore {
    let mut cfg = StoreConfig::new(STACK, live);
    cfg.keep_generations = keep;
    StackStore::open(cfg).unwrap()
}

#[track_caller]
fn assert_same_tree(live: &Path, want: &Manifest) {
    let got = scan_tree(live);
    if &got != want {
        let drift = stackclone_target::store::compare(want, &got);
        panic!("live tree differs from the wanted generation: {drift:#?}");
    }
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap()
}

// ------------------------------------------------------------------------------------------------
// Fidelity

#[test]
fn first_commit_into_an_empty_live_dir_keeps_every_attribute() {
    let e = env();
    gen1(&e.src);
    let mut store = open(&e.live, 3);
    let report = push(&mut store, &e.src, 1);
    assert_eq!(report.generation, 1);
    assert_eq!(store.last_generation(), 1);
    let want = scan_tree(&e.src);
    assert_same_tree(&e.live, &want);
    assert_eq!(store.manifest(), &want);
    assert!(store.verify().unwrap().is_empty());

    // The same facts straight from lstat, not through the scanner.
    for (p, mode, uid) in [
        ("setuid-bin", 0o4755, 0),
        ("setgid-dir", 0o2755, 999),
        ("db", 0o1777, 999),
        ("app/config.yml", 0o640, 999),
    ] {
        let (s, l) = (lstat(&e.src.join(p)), lstat(&e.live.join(p)));
        assert_eq!(l.mode() & 0o7777, mode, "{p}");
        assert_eq!((l.uid(), l.gid()), (uid, uid), "{p}");
        assert_eq!(
            (l.mtime(), l.mtime_nsec()),
            (s.mtime(), s.mtime_nsec()),
            "{p}"
        );
    }
    for p in ["current", "dangling", "absolute", "to-dir"] {
        let (s, l) = (lstat(&e.src.join(p)), lstat(&e.live.join(p)));
        assert!(l.file_type().is_symlink(), "{p}");
        assert_eq!(
            fs::read_link(e.live.join(p)).unwrap(),
            fs::read_link(e.src.join(p)).unwrap()
        );
        assert_eq!(
            (l.uid(), l.mtime(), l.mtime_nsec()),
            (s.uid(), s.mtime(), s.mtime_nsec()),
            "{p}"
        );
    }
    let (a, b) = (lstat(&e.live.join("hard-a")), lstat(&e.live.join("hard-b")));
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2, "staging must not keep a link to a live file");
    let sparse = lstat(&e.live.join("db/sparse.img"));
    assert_eq!(sparse.len(), 16 << 20);
    assert!(
        sparse.blocks() * 512 <= 64 << 10,
        "sparse file took {} blocks",
        sparse.blocks()
    );
    assert!(lstat(&e.live.join(OsStr::from_bytes(b"app/\xff\xfe-latin1"))).is_file());
    assert!(lstat(&e.live.join("names-\u{e9}\n-newline")).is_file());
    let mut v = [0u8; 64];
    let n =
        rustix::fs::lgetxattr(e.live.join("app/config.yml"), "user.origin", &mut v[..]).unwrap();
    assert_eq!(&v[..n], b"primary");
    let empty = fs::read_dir(e.live.join("empty-dir")).unwrap().count();
    assert_eq!(empty, 0);
    // Staging is clean after a commit.
    assert!(store.staged().unwrap().is_empty());
    // The commit told the hash cache what it wrote: the next scan reads no file (a file in a
    // hardlink group is read once per group, and sparse and empty files count too).
    let rescan = store.scan_live(false).unwrap();
    assert_eq!(rescan.manifest, want);
    assert_eq!(
        (rescan.stats.files_hashed, rescan.stats.bytes_hashed),
        (0, 0),
        "{:?}",
        rescan.stats
    );
    // Nor any file's xattrs (app/config.yml has one): only the directories' are read.
    let dirs = want.entries().iter().filter(|e| e.is_dir()).count() as u64;
    assert_eq!(rescan.stats.xattrs_read, dirs, "{:?}", rescan.stats);
    // The state file says what is live.
    let st = store.state().clone();
    assert_eq!((st.generation, st.committed_at), (1, Some(NOW)));
    assert_eq!(st.manifest_root, Some(want.root().to_hex()));
    drop(store);
    let store = open(&e.live, 3);
    assert_eq!(store.state(), &st);
    assert_eq!(store.manifest(), &want);
}

#[test]
fn verify_reports_every_kind_of_drift() {
    let e = env();
    gen1(&e.src);
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    fs::write(e.live.join("db/other.dat"), b"tampered").unwrap();
    fs::set_permissions(e.live.join("setuid-bin"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::remove_file(e.live.join("dangling")).unwrap();
    fs::write(e.live.join("extra"), b"x").unwrap();
    std::os::unix::fs::lchown(e.live.join("app/empty"), Some(5), None).unwrap();
    let drift = store.verify().unwrap();
    let find = |p: &str| {
        drift
            .iter()
            .find(|d| d.path == sp(p))
            .map(|d| d.what.clone())
    };
    assert!(find("db/other.dat").unwrap().contains(&Difference::Content));
    assert!(matches!(
        find("setuid-bin").unwrap()[0],
        Difference::Mode {
            want: 0o4755,
            got: 0o755
        }
    ));
    assert_eq!(find("dangling").unwrap(), vec![Difference::Missing]);
    assert_eq!(find("extra").unwrap(), vec![Difference::Extra]);
    assert!(matches!(
        find("app/empty").unwrap()[0],
        Difference::Owner {
            want: (0, 0),
            got: (5, 0)
        }
    ));
}

// ------------------------------------------------------------------------------------------------
// Generations and rollback

#[test]
fn second_generation_then_rollback_restores_the_first_exactly() {
    let e = env();
    gen1(&e.src);
    let g1 = scan_tree(&e.src);
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    let g2 = scan_tree(&src2);
    let report = push(&mut store, &src2, 2);
    assert!(report.backed_up > 0 && report.placed > 0, "{report:?}");
    assert_same_tree(&e.live, &g2);
    let (a, c) = (lstat(&e.live.join("hard-a")), lstat(&e.live.join("hard-c")));
    assert_eq!((a.ino(), a.nlink()), (c.ino(), 3));
    assert!(lstat(&e.live.join("app/empty")).is_dir());
    assert!(lstat(&e.live.join("empty-dir")).is_file());
    assert!(lstat(&e.live.join("to-dir")).is_dir());
    assert_eq!(store.restorable().unwrap(), vec![1, 0]);

    let rb = store.rollback(None).unwrap();
    assert_eq!((rb.from, rb.to, rb.steps.len()), (2, 1, 1));
    assert_same_tree(&e.live, &g1);
    assert_eq!(store.last_generation(), 1);
    assert_eq!(store.state().rolled_back_from, Some(2));
    assert_eq!(store.manifest(), &g1);
    assert!(store.verify().unwrap().is_empty());
    let (a, b) = (lstat(&e.live.join("hard-a")), lstat(&e.live.join("hard-b")));
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert!(!e.live.join("hard-c").exists());
    // The generation dir it undid is gone; the next push (a higher generation) works.
    assert_eq!(store.restorable().unwrap(), vec![0]);
    push(&mut store, &src2, 3);
    assert_same_tree(&e.live, &g2);
}

#[test]
fn an_unchanged_generation_commits_without_touching_the_live_dir_and_rolls_back_to_nothing() {
    let e = env();
    gen1(&e.src);
    let g1 = scan_tree(&e.src);
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    // A fingerprint of every live inode: (path, ino, ctime) — a rename, write, chmod or utime
    // of anything would change one of them.
    let fingerprint = |live: &Path| -> Vec<(PathBuf, u64, i64, i64)> {
        let mut out = Vec::new();
        for d in walkdir(live) {
            let m = lstat(&d);
            out.push((d, m.ino(), m.ctime(), m.ctime_nsec()));
        }
        out.sort();
        out
    };
    let before = fingerprint(&e.live);

    let c = cycle(&mut store, &e.src, 2).unwrap();
    assert!(c.changes().is_empty());
    let p = store.prepare(&c).unwrap();
    assert_eq!(p.ops(), 1, "only the end-of-backups marker");
    let report = store.commit_unchanged(p, NOW).unwrap();
    assert_eq!(
        (report.generation, report.backed_up, report.placed),
        (2, 0, 0)
    );
    assert_eq!(store.last_generation(), 2);
    assert_eq!(store.manifest(), &g1);
    assert_eq!(fingerprint(&e.live), before, "the live dir was not touched");
    assert!(store.verify().unwrap().is_empty());
    assert_eq!(store.restorable().unwrap(), vec![1, 0]);

    // Rolling the unchanged generation back changes no file either.
    let rb = store.rollback(None).unwrap();
    assert_eq!((rb.from, rb.to), (2, 1));
    assert_eq!(fingerprint(&e.live), before);
    assert_same_tree(&e.live, &g1);

    // A prepared commit that changes something is refused without a stop, and nothing moves.
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    let c = cycle(&mut store, &src2, 3).unwrap();
    let p = store.prepare(&c).unwrap();
    let err = store.commit_unchanged(p, NOW).unwrap_err();
    assert!(matches!(err, StoreError::NotPrepared { .. }), "{err}");
    assert_eq!(store.last_generation(), 1);
    assert_eq!(fingerprint(&e.live), before);
    // The refused `Prepared` went into that call: the real commit prepares again.
    let c = cycle(&mut store, &src2, 3).unwrap();
    let p = store.prepare(&c).unwrap();
    store.commit(p, NOW).unwrap();
    assert_same_tree(&e.live, &scan_tree(&src2));
}

/// The commit proves the live dir is still the tree it was planned against from the planning
/// scan's stats alone, and every kind of change made after the plan still refuses it: new
/// content with the old size and mtime put back, a mode, an owner, an xattr, a name added in a
/// directory or at the top, a removal, a rename. A hard link to the outside of a file the commit
/// does not touch changes nothing the commit relies on: it commits, after a rescan.
#[test]
fn a_change_after_the_plan_refuses_the_commit_whatever_it_is() {
    type Change = fn(&Path);
    let cases: Vec<(&str, Change, bool)> = vec![
        ("nothing", |_| {}, true),
        (
            "same size, mtime put back",
            |live| {
                let p = live.join("app/config.yml");
                let md = lstat(&p);
                fs::write(&p, b"listen: 6060\n").unwrap();
                let t = Timespec {
                    tv_sec: md.mtime(),
                    tv_nsec: md.mtime_nsec() as _,
                };
                let times = Timestamps {
                    last_access: t,
                    last_modification: t,
                };
                rustix::fs::utimensat(CWD, &p, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
            },
            false,
        ),
        (
            "mode",
            |live| {
                fs::set_permissions(live.join("setuid-bin"), fs::Permissions::from_mode(0o755))
                    .unwrap()
            },
            false,
        ),
        (
            "owner",
            |live| std::os::unix::fs::lchown(live.join("data/rows"), Some(4321), None).unwrap(),
            false,
        ),
        (
            "xattr",
            |live| {
                rustix::fs::lsetxattr(
                    live.join("db/sparse.img"),
                    "user.added",
                    b"1",
                    XattrFlags::empty(),
                )
                .unwrap()
            },
            false,
        ),
        (
            "name added in a directory",
            |live| fs::write(live.join("setgid-dir/intruder"), b"x").unwrap(),
            false,
        ),
        (
            "name added at the top",
            |live| fs::write(live.join("intruder"), b"x").unwrap(),
            false,
        ),
        (
            "removal",
            |live| fs::remove_file(live.join("setgid-dir/inside")).unwrap(),
            false,
        ),
        (
            "rename",
            |live| fs::rename(live.join("setuid-bin"), live.join("db/setuid-bin")).unwrap(),
            false,
        ),
        (
            "hard link to the outside",
            |live| {
                fs::hard_link(live.join("setuid-bin"), live.with_file_name("outside-link")).unwrap()
            },
            true,
        ),
    ];
    for (name, change, commits) in cases {
        let e = env();
        gen1(&e.src);
        let mut store = open(&e.live, 3);
        push(&mut store, &e.src, 1);
        // The first commit's files are older than the next scan by more than a clock tick, so
        // their stats can vouch for them.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let src2 = e.src.with_file_name("src2");
        gen2(&src2);
        let c = cycle(&mut store, &src2, 2).unwrap();
        let p = store.prepare(&c).unwrap();
        change(&e.live);
        let result = store.commit(p, NOW);
        if commits {
            let report = result.unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(report.live_rescanned, name != "nothing", "{name}");
            assert_same_tree(&e.live, &scan_tree(&src2));
            assert_eq!(store.last_generation(), 2, "{name}");
        } else {
            let err = result.expect_err(name);
            assert!(
                matches!(err, StoreError::ChangedSincePlanned { .. }),
                "{name}: {err}"
            );
            assert_eq!(store.last_generation(), 1, "{name}");
            assert!(
                !e.live.join("new.txt").exists(),
                "{name}: generation 2 leaked"
            );
        }
    }
}

/// Every path under `root`, depth first, `root` included; never follows a symlink.
fn walkdir(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if lstat(root).is_dir() {
        for entry in fs::read_dir(root).unwrap() {
            out.extend(walkdir(&entry.unwrap().path()));
        }
    }
    out
}

#[test]
fn rollback_to_walks_back_several_generations() {
    let e = env();
    gen1(&e.src);
    let g1 = scan_tree(&e.src);
    let mut store = open(&e.live, 5);
    push(&mut store, &e.src, 1);
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    push(&mut store, &src2, 2);
    let src3 = e.src.with_file_name("src3");
    gen3(&src3);
    push(&mut store, &src3, 5);
    assert_same_tree(&e.live, &scan_tree(&src3));
    assert_eq!(store.restorable().unwrap(), vec![2, 1, 0]);
    let err = store.rollback(Some(4)).unwrap_err();
    assert!(
        matches!(&err, StoreError::NoSuchGeneration { generation: 4, available, .. } if available == &[2, 1, 0]),
        "{err}"
    );
    let rb = store.rollback(Some(1)).unwrap();
    assert_eq!((rb.from, rb.to, rb.steps.len()), (5, 1, 2));
    assert_same_tree(&e.live, &g1);
    assert_eq!(store.last_generation(), 1);
}

#[test]
fn keep_generations_prunes_old_backups() {
    let e = env();
    gen1(&e.src);
    let mut store = open(&e.live, 1);
    push(&mut store, &e.src, 1);
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    push(&mut store, &src2, 2);
    let src3 = e.src.with_file_name("src3");
    gen3(&src3);
    push(&mut store, &src3, 3);
    assert_eq!(store.restorable().unwrap(), vec![2]);
    let gens: Vec<_> = fs::read_dir(store.state_path().join("generations"))
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert_eq!(gens, vec![OsStr::new("3").to_os_string()]);
    let err = store.rollback(Some(1)).unwrap_err();
    assert!(
        matches!(err, StoreError::NoSuchGeneration { generation: 1, .. }),
        "{err}"
    );
    store.rollback(None).unwrap();
    assert_same_tree(&e.live, &scan_tree(&src2));

    let mut none = open(&e.live.with_file_name("other").join("live"), 0);
    push(&mut none, &e.src, 1);
    push(&mut none, &src2, 2);
    assert!(none.restorable().unwrap().is_empty());
    assert!(matches!(
        none.rollback(None),
        Err(StoreError::NoSuchGeneration { .. })
    ));
}

// ------------------------------------------------------------------------------------------------
// Crashes

#[test]
fn a_crash_after_any_journal_op_recovers_to_exactly_one_generation() {
    let e = env();
    gen1(&e.src);
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    let (g1, g2) = (scan_tree(&e.src), scan_tree(&src2));
    let mut k = 0;
    let mut total = None;
    loop {
        let live = e.src.with_file_name(format!("crash-{k}/live"));
        let mut store = open(&live, 3);
        push(&mut store, &e.src, 1);
        let c = cycle(&mut store, &src2, 2).unwrap();
        let p = store.prepare(&c).unwrap();
        let ops = p.ops();
        total = Some(total.unwrap_or(ops));
        assert_eq!(total, Some(ops));
        store.inject_crash_after_ops(Some(k));
        let err = store.commit(p, NOW).unwrap_err();
        assert!(matches!(err, StoreError::InjectedCrash { .. }), "{err}");
        drop(store);
        let store = open(&live, 3);
        // The journal was durable before the first op: recovery rolls forward to N.
        assert_same_tree(&live, &g2);
        assert_eq!(store.last_generation(), 2);
        assert!(store.verify().unwrap().is_empty());
        assert!(!store.state_path().join("journal").exists());
        // And rollback from a recovered commit is exact too.
        let mut store = store;
        store.rollback(None).unwrap();
        assert_same_tree(&live, &g1);
        fs::remove_dir_all(live.parent().unwrap()).unwrap();
        k += 1;
        if k > ops {
            break;
        }
    }
    assert!(
        total.unwrap() > 20,
        "too few ops to mean anything: {total:?}"
    );
}

#[test]
fn a_crash_during_a_rollback_recovers_too() {
    let e = env();
    gen1(&e.src);
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    let (g1, g2) = (scan_tree(&e.src), scan_tree(&src2));
    for k in [0, 3, 10, 25] {
        let live = e.src.with_file_name(format!("rb-crash-{k}/live"));
        let mut store = open(&live, 3);
        push(&mut store, &e.src, 1);
        push(&mut store, &src2, 2);
        store.inject_crash_after_ops(Some(k));
        match store.rollback(None) {
            Err(StoreError::InjectedCrash { .. }) => {}
            other => panic!("{other:?}"),
        }
        drop(store);
        let store = open(&live, 3);
        assert_same_tree(&live, &g1);
        assert_eq!(store.last_generation(), 1);
        let _ = &g2;
    }
}

#[test]
fn a_torn_journal_leaves_the_previous_generation() {
    let e = env();
    gen1(&e.src);
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    let g1 = scan_tree(&e.src);
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    let c = cycle(&mut store, &src2, 2).unwrap();
    let p = store.prepare(&c).unwrap();
    store.inject_crash_after_ops(Some(0));
    store.commit(p, NOW).unwrap_err();
    let state = store.state_path().to_path_buf();
    drop(store);
    // Turn the published journal into what a crash during its write leaves: a torn temp file.
    let full = fs::read(state.join("journal")).unwrap();
    fs::remove_file(state.join("journal")).unwrap();
    fs::write(state.join("journal.tmp"), &full[..full.len() / 2]).unwrap();
    let store = open(&e.live, 3);
    assert_same_tree(&e.live, &g1);
    assert_eq!(store.last_generation(), 1);
    assert!(!state.join("journal.tmp").exists());
    // Staging survived: the next cycle needs to send nothing again.
    drop(store);

    // A published journal that is damaged is refused, not guessed at; nothing is touched.
    let mut store = open(&e.live, 3);
    let c = cycle(&mut store, &src2, 2).unwrap();
    let p = store.prepare(&c).unwrap();
    store.inject_crash_after_ops(Some(0));
    store.commit(p, NOW).unwrap_err();
    drop(store);
    let full = fs::read(state.join("journal")).unwrap();
    fs::write(state.join("journal"), &full[..full.len() - 7]).unwrap();
    let err = StackStore::open(StoreConfig::new(STACK, &e.live)).unwrap_err();
    assert!(matches!(err, StoreError::JournalCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("verify"), "{err}");
    assert_same_tree(&e.live, &g1);
}

// ------------------------------------------------------------------------------------------------
// No escape

#[test]
fn a_planted_symlink_is_replaced_by_the_directory_and_never_followed() {
    let e = env();
    let outside = e.src.with_file_name("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"outside data").unwrap();
    let mut b = Builder::new(&e.src);
    b.dir("data", 0o755, 999)
        .file("data/db", b"rows", 0o600, 999)
        .file("data/secret", b"source version", 0o600, 999);
    b.finish();
    fs::create_dir_all(&e.live).unwrap();
    std::os::unix::fs::symlink(&outside, e.live.join("data")).unwrap();

    let mut store = open(&e.live, 3);
    // Reads through the planted link are refused.
    assert!(store.open_basis(&sp("data/secret")).is_err());
    assert_eq!(
        store
            .stage_local(
                &sp("data/secret"),
                stackclone_proto::manifest::Hash::of(b"outside data")
            )
            .unwrap(),
        LocalStage::Mismatch
    );
    assert!(store.staged().unwrap().is_empty());
    push(&mut store, &e.src, 1);
    assert!(lstat(&e.live.join("data")).is_dir());
    assert_same_tree(&e.live, &scan_tree(&e.src));
    let outside_now: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert_eq!(outside_now, vec![OsStr::new("secret").to_os_string()]);
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"outside data");
}

#[test]
fn a_symlink_planted_after_the_scan_refuses_the_commit_before_it_begins() {
    let e = env();
    let outside = e.src.with_file_name("outside");
    fs::create_dir_all(&outside).unwrap();
    let mut b = Builder::new(&e.src);
    b.dir("data", 0o755, 999)
        .file("data/db", b"rows", 0o600, 999);
    b.finish();
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    b.file("data/db", b"rows v2", 0o600, 999)
        .file("data/new", b"new", 0o600, 999);
    b.finish();
    let c = cycle(&mut store, &e.src, 2).unwrap();
    // The container swaps its data dir for a link out while the transfer runs.
    fs::rename(e.live.join("data"), e.live.join("data.moved")).unwrap();
    std::os::unix::fs::symlink(&outside, e.live.join("data")).unwrap();
    let err = store.prepare(&c).unwrap_err();
    assert!(matches!(err, StoreError::NotADirectory { .. }), "{err}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert!(lstat(&e.live.join("data")).file_type().is_symlink());
    assert_eq!(store.last_generation(), 1);
}

// ------------------------------------------------------------------------------------------------
// Full disk

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_live_dir_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED a_full_disk_is_a_clear_error_and_the_live_dir_stays: mounting a tmpfs is not permitted here"
        );
        return;
    }
    let _guard = Mount(mnt.clone());
    let live = mnt.join("live");
    let src = tmp.path().join("src");
    let mut b = Builder::new(&src);
    b.dir("d", 0o755, 999).file("d/small", b"small", 0o644, 999);
    b.finish();
    let g1 = scan_tree(&src);
    let mut store = open(&live, 3);
    push(&mut store, &src, 1);

    // A transfer bigger than the space.
    b.file("d/huge", &noise(4, 3 << 20), 0o644, 999);
    b.finish();
    let err = cycle(&mut store, &src, 2).unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_same_tree(&live, &g1);

    // Content that fits once but not twice (two unlinked paths): preparing the copy fails.
    b.remove("d/huge");
    let half = noise(5, 1200 << 10);
    b.file("d/one", &half, 0o644, 999)
        .file("d/two", &half, 0o644, 999);
    b.finish();
    let c = cycle(&mut store, &src, 2).unwrap();
    let err = store.prepare(&c).unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert_same_tree(&live, &g1);
    assert_eq!(store.last_generation(), 1);
    drop(store);
    drop(open(&live, 3));
    assert_same_tree(&live, &g1);
}

// ------------------------------------------------------------------------------------------------
// Safety valves

#[test]
fn dangerous_live_roots_are_refused() {
    let before: Vec<_> = ["/", "/usr", "/etc", "/var"]
        .iter()
        .map(|d| Path::new(d).join(".stackclone").exists())
        .collect();
    for p in [
        "/",
        "/etc",
        "/usr/../etc",
        "/etc/",
        "/var",
        "/home",
        "/root",
        "/usr",
        "/lib",
        "/lib64",
        "/usr/lib",
        "/bin",
        "/usr/bin",
        "/tmp",
        "/opt",
        "/tmp/../../var",
        "/etc/cron.d",
        "/usr/local/sbin",
        "/root/.ssh",
    ] {
        let err = StackStore::open(StoreConfig::new(STACK, p)).unwrap_err();
        assert!(
            matches!(err, StoreError::DangerousRoot { .. }),
            "{p}: {err}"
        );
        assert!(err.to_string().contains("allow_dangerous_root"), "{err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("looks-harmless");
    std::os::unix::fs::symlink("/var", &link).unwrap();
    let err = StackStore::open(StoreConfig::new(STACK, &link)).unwrap_err();
    assert!(
        matches!(err, StoreError::DangerousRoot { ref path, .. } if path == Path::new("/var")),
        "{err}"
    );
    let after: Vec<_> = ["/", "/usr", "/etc", "/var"]
        .iter()
        .map(|d| Path::new(d).join(".stackclone").exists())
        .collect();
    assert_eq!(before, after, "a refused root must not get a state dir");
    // Below a system dir is fine: that is where stacks live.
    let ok = tempfile::tempdir().unwrap();
    drop(StackStore::open(StoreConfig::new(STACK, ok.path().join("live"))).unwrap());
}

#[test]
fn a_state_dir_on_another_file_system_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir_in("/dev/shm").unwrap();
    if fs::metadata(other.path()).unwrap().dev() == fs::metadata(tmp.path()).unwrap().dev() {
        eprintln!("SKIPPED: /dev/shm is on the same file system as the temp dir here");
        return;
    }
    let mut cfg = StoreConfig::new(STACK, tmp.path().join("live"));
    cfg.state_dir = Some(other.path().join("state"));
    let err = StackStore::open(cfg).unwrap_err();
    assert!(matches!(err, StoreError::OtherFilesystem { .. }), "{err}");
    assert!(err.to_string().contains("renames must be atomic"), "{err}");
    assert!(!other.path().join("state").exists());

    let mut inside = StoreConfig::new(STACK, tmp.path().join("live"));
    inside.state_dir = Some(tmp.path().join("live/.state"));
    assert!(matches!(
        StackStore::open(inside),
        Err(StoreError::StateInsideLive { .. })
    ));
}

#[test]
fn one_process_per_stack() {
    let e = env();
    let _store = open(&e.live, 3);
    let err = StackStore::open(StoreConfig::new(STACK, &e.live)).unwrap_err();
    assert!(matches!(err, StoreError::Busy { .. }), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Downtime

/// Prints the commit time for 1,000 changed files, small and 64× larger: it must not grow with
/// the bytes. `cargo test -p stackclone-target --test store commit_downtime -- --nocapture`
#[test]
fn commit_downtime_does_not_grow_with_transfer_size() {
    let mut times = Vec::new();
    for size in [1usize << 10, 64 << 10] {
        let e = env();
        let mut b = Builder::new(&e.src);
        for d in 0..10 {
            b.dir(format!("d{d}"), 0o755, 999);
            for f in 0..100 {
                b.file(
                    format!("d{d}/f{f}"),
                    &noise((d * 100 + f) as u64, size),
                    0o644,
                    999,
                );
            }
        }
        b.finish();
        let mut store = open(&e.live, 3);
        push(&mut store, &e.src, 1);
        for d in 0..10 {
            for f in 0..100 {
                b.file(
                    format!("d{d}/f{f}"),
                    &noise((d * 100 + f) as u64 + 7, size),
                    0o644,
                    999,
                );
            }
        }
        b.finish();
        let c = cycle(&mut store, &e.src, 2).unwrap();
        let t = Instant::now();
        let p = store.prepare(&c).unwrap();
        let prepare = t.elapsed();
        // The source tree written above (same file system, not fsynced) must not be flushed
        // on the commit's clock: on ext4 the first fsync of a transaction writes back all of it.
        rustix::fs::sync();
        let r = store.commit(p, NOW).unwrap();
        assert_same_tree(&e.live, &scan_tree(&e.src));
        eprintln!(
            "1,000 changed files of {} KiB: prepare (stack running) {:?}, commit apply {:?}, commit total {:?}, {} ops",
            size >> 10,
            prepare,
            r.apply,
            r.total,
            r.ops
        );
        times.push(r.apply);
    }
    // Generous: 64× the bytes must not cost anywhere near 64× the time.
    assert!(
        times[1] < times[0] * 8 + std::time::Duration::from_millis(200),
        "{times:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// Write only what changed: in-place patches

/// Two big files: one with random data, one sparse.
fn pgen1(root: &Path) -> Builder {
    let mut b = Builder::new(root);
    b.dir("db", 0o755, 999)
        .file("db/big.bin", &noise(11, 4 << 20), 0o640, 999)
        .file("db/small", b"small", 0o644, 999);
    let mut sparse = vec![0u8; 4 << 20];
    sparse[1 << 20..(1 << 20) + 100_000].copy_from_slice(&noise(12, 100_000));
    b.file("db/sparse.bin", &sparse, 0o640, 999);
    b.finish();
    b
}

/// A few changed blocks in each big file (one region becomes a hole), a new mode and mtime.
fn pgen2(root: &Path) -> Builder {
    let mut b = pgen1(root);
    let mut big = noise(11, 4 << 20);
    big[1 << 20..(1 << 20) + 100].copy_from_slice(&[7u8; 100]);
    big[3 << 20..(3 << 20) + 4096].copy_from_slice(&noise(13, 4096));
    big.extend_from_slice(b"appended");
    b.file("db/big.bin", &big, 0o600, 999);
    let mut sparse = vec![0u8; 4 << 20];
    sparse[2 << 20..(2 << 20) + 5000].copy_from_slice(&noise(14, 5000));
    b.file("db/sparse.bin", &sparse, 0o640, 0);
    b.finish();
    b
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        total += if md.is_dir() {
            dir_bytes(&e.path())
        } else {
            md.len()
        };
    }
    total
}

#[test]
fn a_big_file_with_a_few_changed_blocks_is_patched_in_place() {
    let e = env();
    pgen1(&e.src);
    let g1 = scan_tree(&e.src);
    let src2 = e.src.with_file_name("src2");
    pgen2(&src2);
    let g2 = scan_tree(&src2);
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    let ino = lstat(&e.live.join("db/big.bin")).ino();

    let mut patches = Vec::new();
    let c = cycle_with(&mut store, &src2, 2, &mut patches).unwrap();
    assert_eq!(patches.len(), 2, "both big files go in place: {patches:?}");
    assert!(
        patches.iter().all(|&n| n <= 32 << 10),
        "patches hold only the change: {patches:?}"
    );
    let in_place = store.staged_in_place().unwrap();
    assert_eq!(in_place.len(), 2);
    assert!(in_place.values().any(|p| *p == sp("db/big.bin")));
    assert!(store.staged().unwrap().is_empty(), "no whole copies staged");

    let p = store.prepare(&c).unwrap();
    let r = store.commit(p, NOW).unwrap();
    assert_eq!(r.patched, 2, "{r:?}");
    assert_same_tree(&e.live, &g2);
    let big = lstat(&e.live.join("db/big.bin"));
    assert_eq!(big.ino(), ino, "patched in place, not replaced");
    assert_eq!(big.mode() & 0o7777, 0o600);
    let sparse = lstat(&e.live.join("db/sparse.bin"));
    assert!(
        sparse.blocks() * 512 <= 64 << 10,
        "the zeroed region became a hole: {} blocks",
        sparse.blocks()
    );
    // The generation keeps the replaced blocks, not the files.
    let kept = dir_bytes(&store.state_path().join("generations/2"));
    assert!(kept < 512 << 10, "generation 2 keeps {kept} bytes");
    assert!(store.staged_in_place().unwrap().is_empty());

    store.rollback(None).unwrap();
    assert_same_tree(&e.live, &g1);
}

#[test]
fn a_crash_at_any_op_of_an_in_place_commit_recovers() {
    let e = env();
    pgen1(&e.src);
    let src2 = e.src.with_file_name("src2");
    pgen2(&src2);
    let (g1, g2) = (scan_tree(&e.src), scan_tree(&src2));
    let mut k = 0;
    loop {
        let live = e.src.with_file_name(format!("pcrash-{k}/live"));
        let mut store = open(&live, 3);
        push(&mut store, &e.src, 1);
        let c = cycle(&mut store, &src2, 2).unwrap();
        let p = store.prepare(&c).unwrap();
        let ops = p.ops();
        store.inject_crash_after_ops(Some(k));
        assert!(matches!(
            store.commit(p, NOW),
            Err(StoreError::InjectedCrash { .. })
        ));
        drop(store);
        let mut store = open(&live, 3);
        assert_same_tree(&live, &g2);
        store.rollback(None).unwrap();
        assert_same_tree(&live, &g1);
        fs::remove_dir_all(live.parent().unwrap()).unwrap();
        k += 1;
        if k > ops {
            break;
        }
    }
}

#[test]
fn a_patch_whose_file_changed_is_not_used() {
    let e = env();
    pgen1(&e.src);
    let src2 = e.src.with_file_name("src2");
    pgen2(&src2);
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    let g1_live = scan_tree(&e.live);

    // Changed after the commit was prepared (the stack was still running): refused at commit.
    let c = cycle(&mut store, &src2, 2).unwrap();
    let p = store.prepare(&c).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(e.live.join("db/big.bin"))
        .unwrap();
    f.write_all(b"container write").unwrap();
    drop(f);
    let err = store.commit(p, NOW).unwrap_err();
    assert!(matches!(err, StoreError::NotPrepared { .. }), "{err}");
    assert_eq!(store.last_generation(), 1);
    let now = scan_tree(&e.live);
    let unchanged = |m: &Manifest, p: &str| m.get(&sp(p)).cloned();
    assert_eq!(
        unchanged(&now, "db/sparse.bin"),
        unchanged(&g1_live, "db/sparse.bin")
    );
    // The stale patch no longer counts as staged; the next cycle transfers the file again.
    let in_place = store.staged_in_place().unwrap();
    assert!(
        in_place.values().all(|p| *p != sp("db/big.bin")),
        "{in_place:?}"
    );
    let mut patches = Vec::new();
    let c = cycle_with(&mut store, &src2, 2, &mut patches).unwrap();
    assert_eq!(patches.len(), 1, "only the changed file is sent again");
    let p = store.prepare(&c).unwrap();
    store.commit(p, NOW).unwrap();
    assert_same_tree(&e.live, &scan_tree(&src2));
}

/// Regression: the standby's own containers wrote to a file after generation 1 was committed,
/// then generation 2 replaced it. Generation 1's exact bytes of that file exist nowhere any
/// more; rollback must still work, restoring what commit 2 replaced (the standby's version),
/// and every other file exactly as generation 1 had it.
#[test]
fn rollback_after_the_standby_changed_a_file_restores_what_the_commit_replaced() {
    let e = env();
    gen1(&e.src);
    let mut store = open(&e.live, 3);
    push(&mut store, &e.src, 1);
    // The standby's app appends to a file the next generation also changes.
    let diverged = e.live.join("app/config.yml");
    let mut standby_version = std::fs::read(&diverged).unwrap();
    standby_version.extend_from_slice(b"# written on the standby\n");
    std::fs::write(&diverged, &standby_version).unwrap();
    let before_commit_2 = scan_tree(&e.live);
    let src2 = e.src.with_file_name("src2");
    gen2(&src2);
    std::fs::write(src2.join("app/config.yml"), b"listen: 9090\n").unwrap();
    push(&mut store, &src2, 2);
    assert_eq!(std::fs::read(&diverged).unwrap(), b"listen: 9090\n");

    let rb = store.rollback(None).unwrap();
    assert_eq!((rb.from, rb.to), (2, 1));
    assert_eq!(std::fs::read(&diverged).unwrap(), standby_version);
    assert_same_tree(&e.live, &before_commit_2);
    assert!(
        store.verify().unwrap().is_empty(),
        "the restored tree is what the store records"
    );
}

/// The stack dir swapped for a symlink to another directory: the store recorded which
/// directory the live dir is, and refuses to open the other one as the stack's.
#[test]
fn a_live_dir_swapped_for_a_symlink_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    fs::create_dir_all(&live).unwrap();
    fs::write(live.join("f"), b"stack data").unwrap();
    drop(open(&live, 2));
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join("precious"), b"not the stack's").unwrap();
    fs::rename(&live, tmp.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &live).unwrap();
    let err = StackStore::open(StoreConfig::new(STACK, &live)).unwrap_err();
    assert!(matches!(err, StoreError::LiveRootChanged { .. }), "{err}");
    assert!(err.to_string().contains("live-root"), "{err}");
    assert_eq!(
        fs::read(elsewhere.join("precious")).unwrap(),
        b"not the stack's"
    );
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 1);
    // Moved on purpose: the record removed, the store opens the new directory.
    fs::remove_file(tmp.path().join(".stackclone").join(STACK).join("live-root")).unwrap();
    drop(open(&live, 2));
}

/// The same swap with the symlink pointing into another parent directory: the default state
/// dir sits beside the path as written, so the record is still found.
#[test]
fn a_live_dir_swapped_for_a_symlink_elsewhere_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("stacks/live");
    fs::create_dir_all(&live).unwrap();
    drop(open(&live, 2));
    let elsewhere = tmp.path().join("other/home");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::remove_dir(&live).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &live).unwrap();
    let err = StackStore::open(StoreConfig::new(STACK, &live)).unwrap_err();
    assert!(matches!(err, StoreError::LiveRootChanged { .. }), "{err}");
    assert!(!tmp.path().join("other/.stackclone").exists());
}
