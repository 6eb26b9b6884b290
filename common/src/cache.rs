//! The persisted hash cache: what a file's BLAKE3 was the last time its stat looked like this.
//!
//! Like git's index, the cache lets an unchanged tree cost one `lstat` per file and no reads. A
//! cached hash is trusted only when every part of the key still matches — path, size, mtime and
//! ctime in nanoseconds, inode and device — and the entry is not *racily clean*: a file whose
//! mtime or ctime is not older than the moment the scan that recorded it started may have been
//! written again within the same timestamp tick after it was hashed, so it is hashed again.
//! ctime is what catches a content change hidden behind a reset mtime (`touch -d`): any write or
//! `utimensat` moves it, and it cannot be set back from user space.
//!
//! The scan start is read from the file system's own clock (the mtime of the temporary file the
//! next cache is written to, created when the scan starts) and from the system clock, whichever
//! is earlier, so a file system with coarse timestamps (1 s, 2 s) cannot make a racy entry look
//! older than it is. The two must be on the same machine's clock: keep the cache file on a local
//! file system. A file whose mtime lies in the future is never trusted, so it is hashed every time.
//!
//! An entry also keeps the file's `user.*` xattrs as the scan that recorded it read them (from
//! format version 2 on), under the same key: setting or removing an xattr moves the ctime, so an
//! entry the scan trusts for the content it trusts for the xattrs too, and the scan skips the
//! file's `llistxattr`. An entry that does not know them (a version-1 file, a seeded file, a
//! scan without xattrs) still vouches for the content only.
//!
//! On disk: `MAGIC`, a `u32` format version, the body length as `u64`, the body (serde + bincode,
//! `standard()`), and the BLAKE3 of the body. A file that is missing, truncated, of another
//! version, for another root or whose checksum fails is ignored (the scan hashes everything) and
//! the reason is reported; it is never an error. A new cache is written atomically: temporary
//! file in the same directory, then a rename. It is not fsynced: after a power loss the file is
//! the old cache, the new one, or damaged — and a damaged one fails its checksum and is only
//! discarded. A cache that is simply older is still right, since every entry is keyed by the
//! full stat. A scan in which every file's hash came from the cache, for exactly the paths the
//! cache holds, leaves the file as it is (the old scan start vouches for every entry already).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stackclone_proto::manifest::{Hash, Xattr};

const MAGIC: &[u8; 8] = b"SCHCACHE";
const VERSION: u32 = 2;
/// The format before entries kept xattrs: still read, so an upgrade does not re-hash the tree.
const VERSION_1: u32 = 1;
const HEADER_LEN: usize = MAGIC.len() + 4 + 8;
const TRAILER_LEN: usize = 32;
/// Upper bound for decoding, so a corrupt length inside a body that passed its checksum (which
/// would take a bug, not bit rot) still cannot make us allocate without limit.
const DECODE_LIMIT: usize = 1 << 32;

/// What the stat of a file looked like when its hash was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl StatKey {
    pub(crate) fn of(md: &fs::Metadata) -> Self {
        Self {
            size: md.size(),
            mtime_ns: timestamp_ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: timestamp_ns(md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
            dev: md.dev(),
        }
    }
}

/// Seconds and nanoseconds as one count of nanoseconds since the epoch (saturating far outside
/// the years 1678–2262, where no real timestamp lies).
pub(crate) fn timestamp_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedHash {
    key: StatKey,
    hash: [u8; 32],
    /// The file's `user.*` xattrs, sorted, when the recording scan read them.
    xattrs: Option<Vec<Xattr>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    /// The root the entries were recorded for, as bytes.
    root: Vec<u8>,
    /// When the scan that recorded the entries started, ns since the epoch.
    scan_start_ns: i64,
    entries: Vec<(Vec<u8>, CachedHash)>,
}

/// An entry of format version 1.
#[derive(Debug, Deserialize)]
struct CachedHashV1 {
    key: StatKey,
    hash: [u8; 32],
}

/// The body of format version 1.
#[derive(Debug, Deserialize)]
struct BodyV1 {
    root: Vec<u8>,
    scan_start_ns: i64,
    entries: Vec<(Vec<u8>, CachedHashV1)>,
}

impl From<BodyV1> for Body {
    fn from(v1: BodyV1) -> Self {
        Body {
            root: v1.root,
            scan_start_ns: v1.scan_start_ns,
            entries: v1
                .entries
                .into_iter()
                .map(|(p, c)| {
                    let c = CachedHash {
                        key: c.key,
                        hash: c.hash,
                        xattrs: None,
                    };
                    (p, c)
                })
                .collect(),
        }
    }
}

/// What happened to the cache file when the scan read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// No cache path was configured.
    Disabled,
    /// The cache was not consulted (`checksum` was set); a fresh one was written.
    Bypassed,
    /// The cache file did not exist yet (first scan).
    Missing,
    /// The cache file was read; this many entries were in it.
    Loaded { entries: u64 },
    /// The cache file existed but was unusable, so every file was hashed. Never an error.
    Discarded { reason: String },
}

/// The previous scan's hashes, as loaded.
#[derive(Debug, Default)]
pub(crate) struct LoadedCache {
    scan_start_ns: i64,
    entries: HashMap<Vec<u8>, CachedHash>,
    /// Read from a file (not a stand-in for a missing, discarded or bypassed one).
    from_file: bool,
}

impl LoadedCache {
    /// The cached hash for `path`, if the key matches and the entry is not racily clean.
    #[cfg(test)]
    pub(crate) fn lookup(&self, path: &[u8], key: &StatKey) -> Option<Hash> {
        self.lookup_with_xattrs(path, key).map(|(h, _)| h)
    }

    /// [`lookup`](Self::lookup), with the file's xattrs if the entry knows them.
    pub(crate) fn lookup_with_xattrs(
        &self,
        path: &[u8],
        key: &StatKey,
    ) -> Option<(Hash, Option<&[Xattr]>)> {
        let cached = self.entries.get(path)?;
        let trusted = cached.key == *key
            && key.mtime_ns < self.scan_start_ns
            && key.ctime_ns < self.scan_start_ns;
        trusted.then_some((Hash(cached.hash), cached.xattrs.as_deref()))
    }
}

/// Reads the cache at `path` for `root`. Every failure becomes a [`CacheStatus`], not an error.
pub(crate) fn load(path: &Path, root: &Path) -> (LoadedCache, CacheStatus) {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return (LoadedCache::default(), CacheStatus::Missing);
        }
        Err(e) => return discarded(format!("reading {}: {e}", path.display())),
    };
    match parse(&bytes, root) {
        Ok(cache) => {
            let entries = cache.entries.len() as u64;
            (cache, CacheStatus::Loaded { entries })
        }
        Err(reason) => discarded(reason),
    }
}

fn discarded(reason: String) -> (LoadedCache, CacheStatus) {
    (LoadedCache::default(), CacheStatus::Discarded { reason })
}

fn parse(bytes: &[u8], root: &Path) -> Result<LoadedCache, String> {
    if bytes.len() < HEADER_LEN + TRAILER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a stackclone hash cache (bad magic or too short)".into());
    }
    let (version, rest) = bytes[MAGIC.len()..].split_at(4);
    let version = u32::from_le_bytes(version.try_into().map_err(|_| "short header")?);
    if version != VERSION && version != VERSION_1 {
        return Err(format!(
            "cache format version {version}, expected {VERSION}"
        ));
    }
    let (len, rest) = rest.split_at(8);
    let len = u64::from_le_bytes(len.try_into().map_err(|_| "short header")?);
    if len != (rest.len() - TRAILER_LEN) as u64 {
        return Err(format!(
            "body length {len} does not match the file ({} bytes): truncated?",
            rest.len() - TRAILER_LEN
        ));
    }
    let (body, sum) = rest.split_at(rest.len() - TRAILER_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch: the cache file is corrupt".into());
    }
    let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
    let undecodable = |e: bincode::error::DecodeError| format!("undecodable body: {e}");
    let (body, used): (Body, usize) = if version == VERSION_1 {
        let (v1, used): (BodyV1, usize) =
            bincode::serde::decode_from_slice(body, config).map_err(undecodable)?;
        (v1.into(), used)
    } else {
        bincode::serde::decode_from_slice(body, config).map_err(undecodable)?
    };
    if used != len as usize {
        return Err("trailing bytes after the body".into());
    }
    if body.root != root.as_os_str().as_bytes() {
        return Err(format!(
            "recorded for root {}, not {}",
            String::from_utf8_lossy(&body.root),
            root.display()
        ));
    }
    Ok(LoadedCache {
        scan_start_ns: body.scan_start_ns,
        entries: body.entries.into_iter().collect(),
        from_file: true,
    })
}

/// The next cache file, begun when the scan starts: its temporary file is created first, so its
/// mtime is the scan start on the file system's clock.
#[derive(Debug)]
pub(crate) struct PendingCache {
    path: PathBuf,
    tmp_path: PathBuf,
    tmp: File,
    pub(crate) scan_start_ns: i64,
    entries: Vec<(Vec<u8>, CachedHash)>,
    /// Entries recorded that the loaded cache did not vouch for.
    misses: usize,
}

impl PendingCache {
    pub(crate) fn begin(path: &Path) -> io::Result<Self> {
        let system_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        // Unique per process and per scan, so two scans sharing a cache path never share a
        // temporary file; the last rename wins.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        name.push(format!(".tmp.{}.{seq}", std::process::id()));
        let tmp_path = path.with_file_name(name);
        let tmp = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp_path)?;
        let md = tmp.metadata()?;
        let fs_now = timestamp_ns(md.mtime(), md.mtime_nsec())
            .min(timestamp_ns(md.ctime(), md.ctime_nsec()));
        Ok(Self {
            path: path.to_path_buf(),
            tmp_path,
            tmp,
            scan_start_ns: system_now.min(fs_now),
            entries: Vec::new(),
            misses: 0,
        })
    }

    /// Records a file's hash; `from_cache` says the loaded cache vouched for exactly this key
    /// and hash at this path (and for `xattrs`, when they are known).
    pub(crate) fn record(
        &mut self,
        path: &[u8],
        key: StatKey,
        hash: Hash,
        xattrs: Option<Vec<Xattr>>,
        from_cache: bool,
    ) {
        if !from_cache {
            self.misses += 1;
        }
        let cached = CachedHash {
            key,
            hash: hash.0,
            xattrs,
        };
        self.entries.push((path.to_vec(), cached));
    }

    /// Whether the cache this scan would write holds exactly what `loaded` holds: every
    /// recorded entry came from it, and it has no others. Writing it again would change only the
    /// scan start, which the entries do not need.
    pub(crate) fn same_as(&self, loaded: &LoadedCache) -> bool {
        loaded.from_file && self.misses == 0 && self.entries.len() == loaded.entries.len()
    }

    /// Writes and renames into place (not synced; see the module doc). Only paths recorded in
    /// this scan are kept, so entries for paths that no longer exist are dropped.
    pub(crate) fn commit(mut self, root: &Path) -> io::Result<()> {
        let body = Body {
            root: root.as_os_str().as_bytes().to_vec(),
            scan_start_ns: self.scan_start_ns,
            entries: std::mem::take(&mut self.entries),
        };
        let body = bincode::serde::encode_to_vec(&body, bincode::config::standard())
            .map_err(io::Error::other)?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        self.tmp.write_all(&out)?;
        fs::rename(&self.tmp_path, &self.path)
    }

    /// Removes the temporary file of a scan that failed.
    pub(crate) fn abandon(self) {
        // Best effort: a stale temporary file is harmless and replaced by the next scan.
        let _ = fs::remove_file(&self.tmp_path);
    }
}

/// A file a writer vouches for ([`seed`]): its path relative to the root, its content, and its
/// `user.*` xattrs if the writer set exactly these.
#[derive(Debug, Clone, Copy)]
pub struct Seeded<'a> {
    pub path: &'a [u8],
    pub hash: Hash,
    pub xattrs: Option<&'a [Xattr]>,
}

/// Adds what a writer knows to the cache at `path` for the tree at `root`: each of `files`
/// (paths relative to `root`) holds exactly the content `hash` now, because the caller just put
/// it there and nothing else writes the tree meanwhile (the target's commit, with its standby
/// stopped). Each is `lstat`ed now and recorded under that stat, so the next scan reads none of
/// them. The old cache's entries for other paths stay if they were trusted where they were
/// recorded; the cache's scan start becomes now, which keeps both kinds honest: a later write
/// moves a file's ctime to now or later, which no entry then matches. Returns how many files
/// were seeded. Best effort, like any cache: an error leaves the old file (or none).
pub fn seed(path: &Path, root: &Path, files: &[Seeded<'_>]) -> io::Result<usize> {
    // Nothing to add: the cache as it is stays right (rewriting it would only cost a read and
    // a write of the whole file).
    if files.is_empty() {
        return Ok(0);
    }
    // The caller's last writes (the commit's unlinks move the placed files' ctimes) carry the
    // kernel's coarse clock, which ticks every 1-10 ms: a file whose ctime is the scan start's
    // tick is not trusted, so let the tick pass first.
    std::thread::sleep(std::time::Duration::from_millis(10));
    let mut pending = PendingCache::begin(path)?;
    let seeded: std::collections::HashSet<&[u8]> = files.iter().map(|f| f.path).collect();
    let (old, _) = load(path, root);
    for (p, cached) in &old.entries {
        let trusted =
            cached.key.mtime_ns < old.scan_start_ns && cached.key.ctime_ns < old.scan_start_ns;
        if trusted && !seeded.contains(p.as_slice()) {
            pending.record(
                p,
                cached.key,
                Hash(cached.hash),
                cached.xattrs.clone(),
                true,
            );
        }
    }
    let mut count = 0;
    for f in files {
        let md = match fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(f.path))) {
            Ok(md) if md.is_file() => md,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                pending.abandon();
                return Err(e);
            }
        };
        let key = StatKey::of(&md);
        // Written in the same clock tick as now: the next scan would not trust it anyway.
        if key.mtime_ns < pending.scan_start_ns && key.ctime_ns < pending.scan_start_ns {
            pending.record(f.path, key, f.hash, f.xattrs.map(<[Xattr]>::to_vec), false);
            count += 1;
        }
    }
    match pending.commit(root) {
        Ok(()) => Ok(count),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StatKey {
        StatKey {
            size: 5,
            mtime_ns: 100,
            ctime_ns: 200,
            ino: 7,
            dev: 8,
        }
    }

    fn write_cache(dir: &Path, root: &Path) -> PathBuf {
        let path = dir.join("cache");
        let mut p = PendingCache::begin(&path).unwrap();
        p.record(b"a/b", key(), Hash::of(b"hello"), None, false);
        p.commit(root).unwrap();
        path
    }

    #[test]
    fn round_trips_and_rejects_changed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_cache(dir.path(), Path::new("/srv/stack"));
        let (cache, status) = load(&path, Path::new("/srv/stack"));
        assert_eq!(status, CacheStatus::Loaded { entries: 1 });
        assert_eq!(cache.lookup(b"a/b", &key()), Some(Hash::of(b"hello")));
        assert_eq!(cache.lookup(b"a/c", &key()), None);
        for changed in [
            StatKey { size: 6, ..key() },
            StatKey {
                mtime_ns: 101,
                ..key()
            },
            StatKey {
                ctime_ns: 201,
                ..key()
            },
            StatKey { ino: 9, ..key() },
            StatKey { dev: 9, ..key() },
        ] {
            assert_eq!(cache.lookup(b"a/b", &changed), None, "{changed:?}");
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    /// A cache written before entries kept xattrs still vouches for content after an upgrade
    /// (no tree is re-hashed for it), and knows no xattrs.
    #[test]
    fn a_version_1_cache_still_vouches_for_content() {
        #[derive(Serialize)]
        struct V1Entry {
            key: StatKey,
            hash: [u8; 32],
        }
        #[derive(Serialize)]
        struct V1Body {
            root: Vec<u8>,
            scan_start_ns: i64,
            entries: Vec<(Vec<u8>, V1Entry)>,
        }
        let body = V1Body {
            root: b"/srv/stack".to_vec(),
            scan_start_ns: 1000,
            entries: vec![(
                b"a/b".to_vec(),
                V1Entry {
                    key: key(),
                    hash: [5; 32],
                },
            )],
        };
        let body = bincode::serde::encode_to_vec(&body, bincode::config::standard()).unwrap();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&VERSION_1.to_le_bytes());
        file.extend_from_slice(&(body.len() as u64).to_le_bytes());
        file.extend_from_slice(&body);
        file.extend_from_slice(blake3::hash(&body).as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        fs::write(&path, file).unwrap();

        let (cache, status) = load(&path, Path::new("/srv/stack"));
        assert_eq!(status, CacheStatus::Loaded { entries: 1 });
        assert_eq!(
            cache.lookup_with_xattrs(b"a/b", &key()),
            Some((Hash([5; 32]), None))
        );
        // What this version writes, it reads back with the xattrs.
        let mut p = PendingCache::begin(&path).unwrap();
        let x = vec![Xattr {
            name: b"user.a".to_vec(),
            value: b"1".to_vec(),
        }];
        p.record(b"a/b", key(), Hash([5; 32]), Some(x.clone()), false);
        p.scan_start_ns = 1000;
        p.commit(Path::new("/srv/stack")).unwrap();
        let (cache, _) = load(&path, Path::new("/srv/stack"));
        assert_eq!(
            cache.lookup_with_xattrs(b"a/b", &key()),
            Some((Hash([5; 32]), Some(&x[..])))
        );
    }

    #[test]
    fn racily_clean_entries_are_not_trusted() {
        let cache = LoadedCache {
            scan_start_ns: 200,
            entries: [(
                b"f".to_vec(),
                CachedHash {
                    key: key(),
                    hash: [1; 32],
                    xattrs: None,
                },
            )]
            .into_iter()
            .collect(),
            from_file: true,
        };
        // ctime == scan start: written in the same tick the scan began.
        assert_eq!(cache.lookup(b"f", &key()), None);
        let older = LoadedCache {
            scan_start_ns: 201,
            ..cache
        };
        assert_eq!(older.lookup(b"f", &key()), Some(Hash([1; 32])));
    }

    /// Seeded files are trusted by the next load under the stat they had when seeded; a
    /// write after that moves the ctime, which no entry matches. An old entry that was
    /// trusted stays; one that was racily clean where it was recorded does not.
    #[test]
    fn seeded_files_are_trusted_until_they_are_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("a"), b"alpha").unwrap();
        fs::write(root.join("b"), b"beta").unwrap();
        let path = dir.path().join("cache");
        // An old cache: `kept` trusted where it was recorded, `racy` not.
        let old = Body {
            root: root.as_os_str().as_bytes().to_vec(),
            scan_start_ns: 1000,
            entries: vec![
                (
                    b"kept".to_vec(),
                    CachedHash {
                        key: StatKey {
                            mtime_ns: 10,
                            ctime_ns: 10,
                            ..key()
                        },
                        hash: [3; 32],
                        xattrs: None,
                    },
                ),
                (
                    b"racy".to_vec(),
                    CachedHash {
                        key: StatKey {
                            mtime_ns: 1000,
                            ctime_ns: 1000,
                            ..key()
                        },
                        hash: [4; 32],
                        xattrs: None,
                    },
                ),
            ],
        };
        let mut p = PendingCache::begin(&path).unwrap();
        p.entries = old.entries.clone();
        p.scan_start_ns = old.scan_start_ns;
        p.commit(&root).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));

        let tag = [Xattr {
            name: b"user.t".to_vec(),
            value: b"v".to_vec(),
        }];
        let files = [
            Seeded {
                path: b"a",
                hash: Hash::of(b"alpha"),
                xattrs: None,
            },
            Seeded {
                path: b"b",
                hash: Hash::of(b"beta"),
                xattrs: Some(&tag),
            },
        ];
        assert_eq!(seed(&path, &root, &files).unwrap(), 2);
        let (loaded, status) = load(&path, &root);
        assert_eq!(status, CacheStatus::Loaded { entries: 3 });
        let stat = |name: &str| StatKey::of(&fs::symlink_metadata(root.join(name)).unwrap());
        assert_eq!(loaded.lookup(b"a", &stat("a")), Some(Hash::of(b"alpha")));
        assert_eq!(loaded.lookup(b"b", &stat("b")), Some(Hash::of(b"beta")));
        assert_eq!(
            loaded.lookup_with_xattrs(b"b", &stat("b")).unwrap().1,
            Some(&tag[..])
        );
        assert_eq!(loaded.lookup_with_xattrs(b"a", &stat("a")).unwrap().1, None);
        let kept = StatKey {
            mtime_ns: 10,
            ctime_ns: 10,
            ..key()
        };
        assert_eq!(loaded.lookup(b"kept", &kept), Some(Hash([3; 32])));
        assert!(!loaded.entries.contains_key(&b"racy"[..]));

        // Written again after the seed: its stat no longer matches.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(root.join("a"), b"ALPHA").unwrap();
        let (loaded, _) = load(&path, &root);
        assert_eq!(loaded.lookup(b"a", &stat("a")), None);
    }

    #[test]
    fn damaged_files_are_discarded_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/srv/stack");
        let path = write_cache(dir.path(), root);
        let good = fs::read(&path).unwrap();

        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() - 3].to_vec()),
            ("flipped", flipped),
            ("empty", Vec::new()),
            ("garbage", b"not a cache at all, just text".to_vec()),
        ];
        for (what, bytes) in cases {
            fs::write(&path, bytes).unwrap();
            let (cache, status) = load(&path, root);
            assert!(
                matches!(status, CacheStatus::Discarded { .. }),
                "{what}: {status:?}"
            );
            assert_eq!(cache.lookup(b"a/b", &key()), None);
        }

        fs::write(&path, &good).unwrap();
        let (_, status) = load(&path, Path::new("/srv/other"));
        assert!(
            matches!(status, CacheStatus::Discarded { .. }),
            "{status:?}"
        );
        fs::remove_file(&path).unwrap();
        assert_eq!(load(&path, root).1, CacheStatus::Missing);
    }
}
