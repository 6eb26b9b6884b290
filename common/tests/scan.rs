//! The scanner against real trees in temporary directories.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use rustix::fs::{FileType, Mode, XattrFlags};
use stackclone_common::{CacheStatus, ScanConfig, ScanError, SkipReason, scan};
use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest, Xattr};
use stackclone_proto::path::StackPath;

fn sp(p: impl AsRef<[u8]>) -> StackPath {
    StackPath::new(p.as_ref()).unwrap()
}

fn os(p: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(p))
}

fn write(root: &Path, rel: impl AsRef<[u8]>, data: &[u8]) -> PathBuf {
    let path = root.join(os(rel.as_ref()));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, data).unwrap();
    path
}

fn set_mtime(path: &Path, secs: u64, nanos: u32) {
    let t = UNIX_EPOCH + Duration::new(secs, nanos);
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

fn paths(m: &Manifest) -> BTreeSet<Vec<u8>> {
    m.entries()
        .iter()
        .map(|e| e.path.as_bytes().to_vec())
        .collect()
}

fn entry(m: &Manifest, p: impl AsRef<[u8]>) -> &Entry {
    let p = p.as_ref();
    m.get(&sp(p))
        .unwrap_or_else(|| panic!("no entry {}", String::from_utf8_lossy(p)))
}

fn file_kind(e: &Entry) -> (u64, Hash, Option<u32>) {
    match e.kind {
        EntryKind::File {
            size,
            hash,
            link_group,
        } => (size, hash, link_group),
        ref k => panic!("{:?} is {k:?}, not a file", e.path),
    }
}

/// Lets the file system clock move past every timestamp written so far, so the next scan's start
/// is strictly later and its cache entries are not racily clean.
fn tick() {
    std::thread::sleep(Duration::from_millis(50));
}

#[test]
fn captures_types_metadata_names_links_and_xattrs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stack");
    fs::create_dir(&root).unwrap();

    write(&root, "a/b/c.txt", b"nested");
    fs::create_dir(root.join("empty")).unwrap();
    let suid = write(&root, "suid-bin", b"#!/bin/sh\n");
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(root.join("sticky")).unwrap();
    fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    write(&root, b"bad-\xff\xfe.bin", b"not utf-8 name");
    write(&root, b"new\nline", b"newline name");
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("/etc/passwd", root.join("absolute")).unwrap();
    let h1 = write(&root, "hard1", b"shared inode");
    fs::hard_link(&h1, root.join("a/hard2")).unwrap();
    // A link whose other path is outside the tree is not a group.
    let lone = write(&root, "lone", b"other link outside");
    fs::hard_link(&lone, dir.path().join("outside-link")).unwrap();
    let timed = write(&root, "timed", b"t");
    set_mtime(&timed, 1_600_000_000, 123_456_789);
    let owned = write(&root, "owned", b"postgres");
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    write(&root, "big.bin", &big);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("a/fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let xattr_file = write(&root, "tagged", b"x");
    let xattrs_supported =
        match rustix::fs::lsetxattr(&xattr_file, "user.comment", b"hello", XattrFlags::empty()) {
            Ok(()) => {
                rustix::fs::lsetxattr(&xattr_file, "user.a", b"first", XattrFlags::empty())
                    .unwrap();
                true
            }
            Err(rustix::io::Errno::NOTSUP) => {
                println!("SKIPPED xattr assertions: this file system does not support user xattrs");
                false
            }
            Err(e) => panic!("setting xattr: {e}"),
        };
    // Only root may give a file away; elsewhere the numbers are just our own.
    let chowned = std::os::unix::fs::chown(&owned, Some(999), Some(999)).is_ok();

    let scan = scan(&ScanConfig::new(&root)).unwrap();
    let m = &scan.manifest;

    let expected: BTreeSet<Vec<u8>> = [
        &b"a"[..],
        b"a/b",
        b"a/b/c.txt",
        b"a/hard2",
        b"absolute",
        b"bad-\xff\xfe.bin",
        b"big.bin",
        b"dangling",
        b"empty",
        b"hard1",
        b"lone",
        b"new\nline",
        b"owned",
        b"sticky",
        b"suid-bin",
        b"tagged",
        b"timed",
    ]
    .iter()
    .map(|p| p.to_vec())
    .collect();
    assert_eq!(paths(m), expected, "root is not an entry, fifo is not one");
    assert_eq!(scan.stats.entries, expected.len() as u64);
    assert_eq!(
        scan.stats.skipped,
        vec![stackclone_common::Skipped {
            path: sp("a/fifo"),
            reason: SkipReason::Fifo
        }]
    );

    assert_eq!(
        file_kind(entry(m, "a/b/c.txt")),
        (6, Hash::of(b"nested"), None)
    );
    assert!(entry(m, "empty").is_dir());
    assert_eq!(entry(m, "suid-bin").meta.mode, 0o4755);
    assert!(entry(m, "sticky").is_dir());
    assert_eq!(entry(m, "sticky").meta.mode, 0o1777);
    assert_eq!(
        file_kind(entry(m, b"bad-\xff\xfe.bin")).1,
        Hash::of(b"not utf-8 name")
    );
    assert_eq!(
        file_kind(entry(m, b"new\nline")).1,
        Hash::of(b"newline name")
    );
    assert_eq!(
        entry(m, "dangling").kind,
        EntryKind::Symlink {
            target: b"does/not/exist".to_vec()
        }
    );
    assert_eq!(
        entry(m, "absolute").kind,
        EntryKind::Symlink {
            target: b"/etc/passwd".to_vec()
        }
    );

    let (size1, hash1, g1) = file_kind(entry(m, "hard1"));
    let (size2, hash2, g2) = file_kind(entry(m, "a/hard2"));
    // "a/hard2" sorts before "hard1", so the group is numbered from it; it is the only group.
    assert_eq!((g1, g2), (Some(0), Some(0)));
    assert_eq!((size1, hash1), (size2, hash2));
    assert_eq!(hash1, Hash::of(b"shared inode"));
    assert_eq!(file_kind(entry(m, "lone")).2, None);
    assert_eq!(file_kind(entry(m, "timed")).2, None);
    // One read for the shared inode.
    assert_eq!(scan.stats.files_hashed, 10);

    assert_eq!(entry(m, "timed").meta.mtime_ns, 1_600_000_000_123_456_789);
    let md = fs::symlink_metadata(&owned).unwrap();
    let meta = entry(m, "owned").meta;
    assert_eq!((meta.uid, meta.gid), (md.uid(), md.gid()));
    if chowned {
        assert_eq!((meta.uid, meta.gid), (999, 999));
    }
    assert_eq!(meta.mode, md.mode() & 0o7777);
    assert_eq!(
        file_kind(entry(m, "big.bin")),
        (big.len() as u64, Hash::of(&big), None)
    );

    if xattrs_supported {
        assert_eq!(
            entry(m, "tagged").xattrs,
            vec![
                Xattr {
                    name: b"user.a".to_vec(),
                    value: b"first".to_vec()
                },
                Xattr {
                    name: b"user.comment".to_vec(),
                    value: b"hello".to_vec()
                },
            ]
        );
        let no_xattrs = scan_with(&root, |c| c.xattrs = false);
        assert!(entry(&no_xattrs.manifest, "tagged").xattrs.is_empty());
    }
    assert!(entry(m, "timed").xattrs.is_empty());

    // Local facts are recorded for every entry and detect a change with one lstat.
    let facts = *scan.local(&sp("timed")).unwrap();
    assert_eq!(facts.ino, fs::symlink_metadata(&timed).unwrap().ino());
    assert_eq!(scan.entries_with_facts().count(), expected.len());
    assert!(facts.still_match(&root, &sp("timed")).unwrap());
    fs::write(&timed, b"u").unwrap();
    assert!(!facts.still_match(&root, &sp("timed")).unwrap());
    fs::remove_file(&timed).unwrap();
    assert!(!facts.still_match(&root, &sp("timed")).unwrap());
}

fn scan_with(root: &Path, f: impl FnOnce(&mut ScanConfig)) -> stackclone_common::Scan {
    let mut cfg = ScanConfig::new(root);
    f(&mut cfg);
    scan(&cfg).unwrap()
}

#[test]
fn symlinks_to_directories_outside_are_never_descended() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    write(&outside, "secret", b"do not sync");
    let root = dir.path().join("stack");
    write(&root, "inside", b"ok");
    symlink(&outside, root.join("abs-link")).unwrap();
    symlink("../outside", root.join("rel-link")).unwrap();
    symlink("..", root.join("up")).unwrap();

    let scan = scan(&ScanConfig::new(&root)).unwrap();
    let m = &scan.manifest;
    assert_eq!(
        paths(m),
        [&b"abs-link"[..], b"inside", b"rel-link", b"up"]
            .iter()
            .map(|p| p.to_vec())
            .collect()
    );
    assert!(
        matches!(entry(m, "rel-link").kind, EntryKind::Symlink { ref target } if target == b"../outside")
    );
    assert_eq!(scan.stats.files_hashed, 1);
}

#[test]
fn the_root_may_be_a_symlink_but_must_be_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    write(&real, "f", b"1");
    symlink(&real, dir.path().join("via-link")).unwrap();
    let m = scan(&ScanConfig::new(dir.path().join("via-link")))
        .unwrap()
        .manifest;
    assert_eq!(paths(&m), [b"f".to_vec()].into_iter().collect());

    let missing = dir.path().join("nope");
    match scan(&ScanConfig::new(&missing)) {
        Err(ScanError::RootMissing { root }) => assert_eq!(root, missing),
        other => panic!("{other:?}"),
    }
    let file = real.join("f");
    match scan(&ScanConfig::new(&file)) {
        Err(ScanError::RootNotDir { root }) => assert_eq!(root, file),
        other => panic!("{other:?}"),
    }
}

#[test]
fn excludes_follow_gitignore_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for p in [
        "@eaDir/thumb.jpg",
        "photos/@eaDir/thumb.jpg",
        "photos/img.jpg",
        ".DS_Store",
        "photos/.DS_Store",
        "x.tmp",
        "photos/y.tmp",
        "keep.tmp",
        "photos/keep.tmp",
        "cache/blob",
        "photos/cache/blob",
        "app/logs/today.log",
        "logs/old.log",
        "notes/@eaDir",
    ] {
        write(root, p, p.as_bytes());
    }
    let mut cfg = ScanConfig::new(root);
    cfg.exclude = [
        "@eaDir/",
        ".DS_Store",
        "*.tmp",
        "!keep.tmp",
        "/cache",
        "**/logs",
    ]
    .map(String::from)
    .to_vec();
    let scan = scan(&cfg).unwrap();
    let expected: BTreeSet<Vec<u8>> = [
        "app",
        "keep.tmp",
        "notes",
        // `@eaDir/` matches directories only; this one is a file.
        "notes/@eaDir",
        "photos",
        // `/cache` is anchored at the root.
        "photos/cache",
        "photos/cache/blob",
        "photos/img.jpg",
        "photos/keep.tmp",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();
    assert_eq!(paths(&scan.manifest), expected);
    // @eaDir x2, .DS_Store x2, x.tmp, y.tmp, cache, app/logs, logs.
    assert_eq!(scan.stats.excluded, 9);
    // Excluded directories are not descended: nothing below them was hashed.
    assert_eq!(scan.stats.files_hashed, 5);
}

#[test]
fn an_invalid_exclude_pattern_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ScanConfig::new(dir.path());
    cfg.exclude = vec!["ok.txt".into(), "data/[abc".into()];
    match scan(&cfg) {
        Err(e @ ScanError::BadExclude { .. }) => {
            let ScanError::BadExclude { ref pattern, .. } = e else {
                unreachable!()
            };
            assert_eq!(pattern, "data/[abc");
            assert!(e.to_string().contains("data/[abc"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

fn cache_tree(root: &Path) -> u64 {
    write(root, "a.txt", b"alpha");
    write(root, "d/b.txt", b"bravo");
    write(root, "d/e/c.txt", b"charlie");
    let h = write(root, "h1", b"hard");
    fs::hard_link(&h, root.join("d/h2")).unwrap();
    // Inodes to hash: a, b, c, h.
    4
}

fn cached_cfg(dir: &Path) -> ScanConfig {
    let mut cfg = ScanConfig::new(dir.join("stack"));
    cfg.cache = Some(dir.join("state/hash-cache"));
    fs::create_dir_all(dir.join("state")).unwrap();
    cfg
}

#[test]
fn second_scan_of_an_unchanged_tree_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    let inodes = cache_tree(&cfg.root);
    tick();

    let first = scan(&cfg).unwrap();
    assert_eq!(first.stats.cache, CacheStatus::Missing);
    assert_eq!(first.stats.files_hashed, inodes);
    assert_eq!(first.stats.files_from_cache, 0);

    let second = scan(&cfg).unwrap();
    assert_eq!(second.stats.cache, CacheStatus::Loaded { entries: 5 });
    assert_eq!(second.stats.files_hashed, 0);
    assert_eq!(second.stats.bytes_hashed, 0);
    assert_eq!(second.stats.files_from_cache, inodes);
    assert_eq!(second.manifest, first.manifest);
    assert_eq!(second.manifest.root(), first.manifest.root());

    // No temporary file is left next to the cache.
    let names: Vec<_> = fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsStr::new("hash-cache").to_os_string()]);
}

#[test]
fn same_size_rewrite_with_reset_mtime_is_rehashed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    cache_tree(&cfg.root);
    let path = cfg.root.join("d/b.txt");
    set_mtime(&path, 1_700_000_000, 5);
    tick();
    let first = scan(&cfg).unwrap();
    let before = entry(&first.manifest, "d/b.txt").clone();
    tick();

    // Same size, same mtime afterwards: only ctime and inode-level facts tell.
    fs::write(&path, b"BRAVO").unwrap();
    set_mtime(&path, 1_700_000_000, 5);
    tick();
    let second = scan(&cfg).unwrap();
    let after = entry(&second.manifest, "d/b.txt");
    assert_eq!(after.meta.mtime_ns, before.meta.mtime_ns);
    assert_eq!(file_kind(after).0, file_kind(&before).0);
    assert_eq!(file_kind(after).1, Hash::of(b"BRAVO"));
    assert_eq!(second.stats.files_hashed, 1);
    assert_eq!(second.stats.files_from_cache, 3);
}

#[test]
fn a_corrupt_or_truncated_cache_means_a_full_rehash_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    let inodes = cache_tree(&cfg.root);
    tick();
    let first = scan(&cfg).unwrap();
    let cache_path = cfg.cache.clone().unwrap();
    let good = fs::read(&cache_path).unwrap();

    for damaged in [
        good[..good.len() / 2].to_vec(),
        {
            let mut b = good.clone();
            let i = b.len() - 40;
            b[i] ^= 1;
            b
        },
        b"garbage".to_vec(),
    ] {
        fs::write(&cache_path, &damaged).unwrap();
        let rescan = scan(&cfg).unwrap();
        assert!(
            matches!(rescan.stats.cache, CacheStatus::Discarded { .. }),
            "{:?}",
            rescan.stats.cache
        );
        assert_eq!(rescan.stats.files_hashed, inodes);
        assert_eq!(rescan.manifest, first.manifest);
    }
    // The rescan rewrote a good cache.
    assert_eq!(scan(&cfg).unwrap().stats.files_hashed, 0);
}

#[test]
fn checksum_mode_hashes_everything_and_refreshes_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cached_cfg(dir.path());
    let inodes = cache_tree(&cfg.root);
    tick();
    scan(&cfg).unwrap();
    cfg.checksum = true;
    let forced = scan(&cfg).unwrap();
    assert_eq!(forced.stats.cache, CacheStatus::Bypassed);
    assert_eq!(forced.stats.files_hashed, inodes);
    assert_eq!(forced.stats.files_from_cache, 0);
    cfg.checksum = false;
    assert_eq!(scan(&cfg).unwrap().stats.files_hashed, 0);
}

/// The cache file's inode: a rewrite is a rename of a new file, so it changes the inode.
fn cache_ino(cfg: &ScanConfig) -> u64 {
    fs::metadata(cfg.cache.as_ref().unwrap()).unwrap().ino()
}

#[test]
fn a_scan_that_learned_nothing_leaves_the_cache_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    let inodes = cache_tree(&cfg.root);
    tick();
    scan(&cfg).unwrap();
    let written = cache_ino(&cfg);

    // Every hash from the cache, the same paths: the file is not written again.
    let again = scan(&cfg).unwrap();
    assert_eq!(again.stats.files_from_cache, inodes);
    assert_eq!(cache_ino(&cfg), written);
    let names: Vec<_> = fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsStr::new("hash-cache").to_os_string()]);

    // A changed file: rewritten, and the next scan trusts the new hash.
    write(&cfg.root, "d/b.txt", b"bravo two");
    tick();
    let changed = scan(&cfg).unwrap();
    assert_eq!(changed.stats.files_hashed, 1);
    let rewritten = cache_ino(&cfg);
    assert_ne!(rewritten, written);
    let after = scan(&cfg).unwrap();
    assert_eq!(after.stats.files_hashed, 0);
    assert_eq!(after.manifest, changed.manifest);
    assert_eq!(cache_ino(&cfg), rewritten);

    // A new file and a deleted one: each makes the cache differ, so each rewrites it.
    write(&cfg.root, "new.txt", b"new");
    tick();
    scan(&cfg).unwrap();
    let with_new = cache_ino(&cfg);
    assert_ne!(with_new, rewritten);
    fs::remove_file(cfg.root.join("new.txt")).unwrap();
    let after_delete = scan(&cfg).unwrap();
    assert_eq!(after_delete.stats.files_hashed, 0);
    assert_ne!(cache_ino(&cfg), with_new);
    assert_eq!(
        scan(&cfg).unwrap().stats.cache,
        CacheStatus::Loaded { entries: 5 }
    );

    // --checksum hashes everything and always writes a fresh cache.
    let before_forced = cache_ino(&cfg);
    let mut forced = cfg.clone();
    forced.checksum = true;
    scan(&forced).unwrap();
    assert_ne!(cache_ino(&cfg), before_forced);
}

#[test]
fn deleted_paths_leave_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    cache_tree(&cfg.root);
    tick();
    scan(&cfg).unwrap();
    fs::remove_dir_all(cfg.root.join("d/e")).unwrap();
    let after_delete = scan(&cfg).unwrap();
    assert_eq!(after_delete.stats.cache, CacheStatus::Loaded { entries: 5 });
    assert!(after_delete.manifest.get(&sp("d/e/c.txt")).is_none());
    assert_eq!(
        scan(&cfg).unwrap().stats.cache,
        CacheStatus::Loaded { entries: 4 }
    );
}

#[test]
fn a_cache_file_inside_the_root_is_not_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "data", b"1");
    let mut cfg = ScanConfig::new(root);
    cfg.cache = Some(root.join(".stackclone-cache"));
    tick();
    scan(&cfg).unwrap();
    let second = scan(&cfg).unwrap();
    assert_eq!(
        paths(&second.manifest),
        [b"data".to_vec()].into_iter().collect()
    );
    assert_eq!(second.stats.files_hashed, 0);
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn other_filesystems_are_an_empty_dir_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "local", b"1");
    let mnt = root.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "stackclone-test", mnt.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("SKIPPED other_filesystems_are_an_empty_dir_and_listed: cannot mount tmpfs here");
        return;
    }
    let _guard = Mount(mnt.clone());
    write(&mnt, "elsewhere", b"not ours");

    let scan = scan(&ScanConfig::new(root)).unwrap();
    assert_eq!(
        paths(&scan.manifest),
        [b"local".to_vec(), b"mnt".to_vec()].into_iter().collect()
    );
    assert!(entry(&scan.manifest, "mnt").is_dir());
    assert_eq!(
        scan.stats.skipped,
        vec![stackclone_common::Skipped {
            path: sp("mnt"),
            reason: SkipReason::OtherFilesystem
        }]
    );
}

/// What a running database does to its data dir while it is scanned (the target scans its
/// standby's running tree): files and whole directories appear and disappear between the
/// listing, the `lstat`, the read and the xattrs. Every scan must succeed; what vanished is
/// simply not in the manifest (it was once reported "reading extended attributes of
/// pg_wal/…: No such file or directory", which refused the cycle).
#[test]
fn files_and_dirs_that_vanish_while_the_tree_is_scanned_are_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    for i in 0..200 {
        write(&root, format!("stable/{i}"), b"kept");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            // New names only: a directory *replaced* by another of the same name mid-scan is
            // still an error (see `ScanError::Changed`), one that is gone is not.
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let d = root.join(format!("wal/{}", n / 16));
                let _ = fs::create_dir_all(&d);
                let _ = fs::write(d.join(format!("seg{n}")), vec![7u8; 8192]);
                let _ = fs::remove_file(d.join(format!("seg{}", n.saturating_sub(4))));
                if n.is_multiple_of(16) && n >= 32 {
                    let _ = fs::remove_dir_all(root.join(format!("wal/{}", n / 16 - 2)));
                }
                n += 1;
            }
        })
    };
    for _ in 0..200 {
        let scanned = scan_with(&root, |_| {});
        assert!(
            scanned
                .manifest
                .entries()
                .iter()
                .filter(|e| e.path.as_bytes().starts_with(b"stable/"))
                .count()
                == 200,
            "a stable file went missing"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
}

#[test]
fn files_with_links_outside_the_tree_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = write(tmp.path(), "outside.txt", b"shared");
    let inside = root.join("in.txt");
    fs::create_dir_all(&root).unwrap();
    fs::hard_link(&outside, &inside).unwrap();
    // Two links both inside: a hardlink group, not an outside link.
    write(&root, "a", b"pair");
    fs::hard_link(root.join("a"), root.join("b")).unwrap();
    // Three links, two inside and one outside.
    write(&root, "c", b"triple");
    fs::hard_link(root.join("c"), root.join("d")).unwrap();
    fs::hard_link(root.join("c"), tmp.path().join("c-outside")).unwrap();
    write(&root, "lone", b"lone");
    let scan = scan_with(&root, |_| {});
    assert_eq!(scan.outside_links(), vec![sp("c"), sp("d"), sp("in.txt")]);
}

/// A scan's stat facts prove the tree unchanged only where they can: a tree left alone holds, a
/// write after the scan does not, a path written as the scan began cannot be told (it answers
/// "no", and the caller scans), another manifest is not this scan's, and without a cache there
/// is no scan start to judge by.
#[test]
fn a_scan_tells_later_whether_the_tree_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    cache_tree(&cfg.root);
    tick();
    let first = scan(&cfg).unwrap();
    let check = first.unchanged_check().expect("a cached scan has a start");
    assert!(check.holds(&cfg.root, &first.manifest).unwrap());

    // Another manifest (a different tree) is never vouched for.
    let other = scan(&ScanConfig::new(dir.path().join("state"))).unwrap();
    assert!(!check.holds(&cfg.root, &other.manifest).unwrap());

    // Nothing to judge by without a cache.
    assert!(
        scan(&ScanConfig::new(&cfg.root))
            .unwrap()
            .unchanged_check()
            .is_none()
    );

    // A name added at the top moves only the root's times.
    write(&cfg.root, "new", b"n");
    assert!(!check.holds(&cfg.root, &first.manifest).unwrap());
    fs::remove_file(cfg.root.join("new")).unwrap();

    // A path whose times are not older than the scan's start cannot be vouched for by its
    // stat (a write in the same clock tick leaves the stat as it was): "cannot tell", though
    // nothing changed since.
    let later = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    set_mtime(&cfg.root.join("d/b.txt"), later, 0);
    tick();
    let racy = scan(&cfg).unwrap();
    assert!(
        !racy
            .unchanged_check()
            .unwrap()
            .holds(&cfg.root, &racy.manifest)
            .unwrap()
    );
    set_mtime(&cfg.root.join("d/b.txt"), 1_700_000_000, 0);
    tick();
    let fresh = scan(&cfg).unwrap();
    assert!(
        fresh
            .unchanged_check()
            .unwrap()
            .holds(&cfg.root, &fresh.manifest)
            .unwrap()
    );
    // Content written after the scan, deep down.
    fs::write(cfg.root.join("d/e/c.txt"), b"CHARLIE").unwrap();
    assert!(
        !fresh
            .unchanged_check()
            .unwrap()
            .holds(&cfg.root, &fresh.manifest)
            .unwrap()
    );
}

/// A tree with work for several threads: many directories, one with more names than a thread
/// takes at once, hard links across directories, symlinks, xattrs, something skipped.
fn wide_tree(root: &Path) -> u64 {
    let mut files = 0;
    for d in 0..30 {
        for f in 0..7 {
            write(
                root,
                format!("d{d:02}/s{}/f{f}", d % 3),
                format!("{d}/{f}").as_bytes(),
            );
            files += 1;
        }
    }
    let names = stackclone_common::scan::NAMES_PER_TASK * 3 + 5;
    for f in 0..names {
        write(root, format!("huge/{f:05}"), format!("huge {f}").as_bytes());
        files += 1;
    }
    let h = write(root, "d03/s0/linked", b"one inode, three paths");
    fs::hard_link(&h, root.join("huge/linked")).unwrap();
    fs::hard_link(&h, root.join("d29/s2/linked")).unwrap();
    files += 1;
    symlink("../huge/00001", root.join("d07/to-huge")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("d11/fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let _ = rustix::fs::lsetxattr(
        root.join("huge/00007"),
        "user.tag",
        b"seven",
        XattrFlags::empty(),
    );
    files
}

#[test]
fn a_scan_finds_the_same_whatever_the_number_of_threads() {
    use stackclone_common::scan::scan_with_threads;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    let mut excluding = ScanConfig::new(&cfg.root);
    excluding.exclude = vec!["d1*/".into(), "*.skip".into()];
    let inodes = wide_tree(&cfg.root);
    write(&cfg.root, "huge/x.skip", b"excluded");
    tick();

    let one = scan_with_threads(&ScanConfig::new(&cfg.root), 1).unwrap();
    assert_eq!(one.stats.files_hashed, inodes + 1);
    for threads in [2, 3, 8] {
        let many = scan_with_threads(&ScanConfig::new(&cfg.root), threads).unwrap();
        assert_eq!(many.manifest, one.manifest, "{threads} threads");
        assert_eq!(many.manifest.root(), one.manifest.root());
        assert_eq!(many.stats, one.stats, "{threads} threads");
        // The local facts line up with the entries as they do with one thread.
        for ((e1, f1), (e2, f2)) in one.entries_with_facts().zip(many.entries_with_facts()) {
            assert_eq!((&e1.path, f1), (&e2.path, f2));
        }
    }
    // The three paths of one inode are one link group, with one content.
    let groups: BTreeSet<_> = ["d03/s0/linked", "huge/linked", "d29/s2/linked"]
        .iter()
        .map(|p| file_kind(entry(&one.manifest, p)))
        .collect();
    assert_eq!(groups.len(), 1);
    assert!(groups.iter().all(|(_, _, g)| g.is_some()));
    assert_eq!(
        one.stats
            .skipped
            .iter()
            .map(|s| s.reason)
            .collect::<Vec<_>>(),
        vec![SkipReason::Fifo]
    );

    // Excludes apply in every thread.
    let ex1 = scan_with_threads(&excluding, 1).unwrap();
    let ex8 = scan_with_threads(&excluding, 8).unwrap();
    assert_eq!(ex8.manifest, ex1.manifest);
    assert_eq!(ex8.stats, ex1.stats);
    assert_eq!(ex8.stats.excluded, 11);
    assert!(paths(&ex8.manifest).iter().all(|p| !p.starts_with(b"d1")));

    // The cache written by a scan of many threads vouches for every file in the next one.
    let first = scan_with_threads(&cfg, 8).unwrap();
    assert_eq!(first.stats.files_hashed, inodes + 1);
    let second = scan_with_threads(&cfg, 8).unwrap();
    assert_eq!(second.stats.files_hashed, 0);
    assert_eq!(second.stats.files_from_cache, inodes + 1);
    assert_eq!(second.manifest, one.manifest);

    // The stat check of a tree this wide runs on several threads: a change in the first piece
    // of the entries, or in the last, is seen.
    let check = second.unchanged_check().unwrap();
    assert!(check.holds(&cfg.root, &second.manifest).unwrap());
    for changed in ["d00/s0/f0", "huge/00771"] {
        let path = cfg.root.join(changed);
        let before = fs::read(&path).unwrap();
        fs::write(&path, b"changed").unwrap();
        assert!(
            !check.holds(&cfg.root, &second.manifest).unwrap(),
            "{changed}"
        );
        fs::write(&path, before).unwrap();
    }
}

#[test]
fn a_failure_in_one_thread_ends_the_scan_with_it() {
    use stackclone_common::scan::scan_with_threads;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stack");
    wide_tree(&root);
    // A chain of directories deeper than a path may be, made relative to each parent.
    let mut fd = rustix::fs::open(&root, rustix::fs::OFlags::DIRECTORY, Mode::empty()).unwrap();
    let name = "n".repeat(200);
    for _ in 0..25 {
        rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(
            &fd,
            name.as_str(),
            rustix::fs::OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
    }
    for threads in [1, 2, 8] {
        let err = scan_with_threads(&ScanConfig::new(&root), threads).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(&name), "{threads} threads: {shown}");
        assert!(
            matches!(err, ScanError::BadPath { .. } | ScanError::Stat { .. }),
            "{threads} threads: {err:?}"
        );
    }
}

#[test]
fn a_cached_file_keeps_its_xattrs_unread_until_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cached_cfg(dir.path());
    cache_tree(&cfg.root);
    let tagged = write(&cfg.root, "d/tagged", b"t");
    if rustix::fs::lsetxattr(&tagged, "user.one", b"1", XattrFlags::empty()).is_err() {
        eprintln!("no user xattrs on this file system; skipping");
        return;
    }
    let xattr = |n: &str, v: &str| Xattr {
        name: n.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
    };
    tick();
    let first = scan(&cfg).unwrap();
    assert_eq!(first.stats.xattrs_read, first.stats.entries);
    let dirs = first
        .manifest
        .entries()
        .iter()
        .filter(|e| e.is_dir())
        .count() as u64;

    // The next scan reads only the directories' xattrs (directories are not in the cache).
    let second = scan(&cfg).unwrap();
    assert_eq!(second.stats.xattrs_read, dirs);
    assert_eq!(second.manifest, first.manifest);
    assert_eq!(
        entry(&second.manifest, "d/tagged").xattrs,
        vec![xattr("user.one", "1")]
    );

    // Setting or removing one moves the file's ctime: it is read again, and seen.
    rustix::fs::lsetxattr(&tagged, "user.two", b"2", XattrFlags::empty()).unwrap();
    tick();
    let third = scan(&cfg).unwrap();
    assert_eq!(third.stats.xattrs_read, dirs + 1);
    assert_eq!(
        entry(&third.manifest, "d/tagged").xattrs,
        vec![xattr("user.one", "1"), xattr("user.two", "2")]
    );
    rustix::fs::lremovexattr(&tagged, "user.one").unwrap();
    tick();
    let fourth = scan(&cfg).unwrap();
    assert_eq!(
        entry(&fourth.manifest, "d/tagged").xattrs,
        vec![xattr("user.two", "2")]
    );
    assert_eq!(scan(&cfg).unwrap().stats.xattrs_read, dirs);

    // A scan without xattrs reads none, and records none.
    let mut off = cfg.clone();
    off.xattrs = false;
    let without = scan(&off).unwrap();
    assert_eq!(without.stats.xattrs_read, 0);
    assert!(entry(&without.manifest, "d/tagged").xattrs.is_empty());
}
