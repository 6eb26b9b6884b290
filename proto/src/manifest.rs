//! The manifest: what a stack's data dir holds, entry by entry, and the root hash the flag signs.
//!
//! An entry records exactly what `rsync -aHAXS --numeric-ids` would restore: type, permission bits
//! (with setuid/setgid/sticky), numeric owner, mtime in nanoseconds, content hash and size for
//! files, the target bytes of a symlink, hardlink groups and `user.*` xattrs. Entries are sorted
//! by path bytes, so a parent always comes before what it contains (it is a strict prefix).
//!
//! A [`Manifest`] is only made through [`Manifest::new`], which checks what a peer could get
//! wrong: order and duplicates, a parent that is missing or not a directory, hardlink groups whose
//! members disagree. The root ([`Manifest::root`]) is a domain-separated BLAKE3 over the canonical
//! encoding of the sorted entries.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::path::StackPath;
use crate::wire::{self, FrameDecoder, MAX_FRAME};

/// The top-level directory under which a stack's named volumes travel: the volume with Compose
/// key `db` is the tree `.stackclone-volumes/db`, its root directory an entry of its own (owner
/// and mode of the volume), its content below it. Both agents agree on this name: the source
/// grafts each replicated volume there, and the target keeps the tree there in its live dir,
/// where the standby's volume of that key points. A data dir's own `.stackclone-volumes` is
/// data like any other, unless a volume would be grafted onto the same key (the source refuses).
pub const VOLUMES_DIR: &str = ".stackclone-volumes";

/// The top-level directory under which a stack's outside paths travel (`extra_paths` in the
/// source's stack file): the host directory `/srv/media` is the tree
/// `.stackclone-paths/srv%2Fmedia` (see [`extra_path_key`]). The target keeps the tree there in
/// its live dir and links the path its own stack file maps it to.
pub const PATHS_DIR: &str = ".stackclone-paths";

/// The one-component key of the outside path `path` (absolute, as the source's stack file gives
/// it) under [`PATHS_DIR`]: the path without its leading `/`, with `%` written `%25` and `/`
/// written `%2F`, so that distinct paths have distinct keys and the key gives the path back
/// ([`extra_path_of_key`]).
pub fn extra_path_key(path: &str) -> String {
    path.trim_start_matches('/')
        .replace('%', "%25")
        .replace('/', "%2F")
}

/// The absolute path an [`extra_path_key`] was made from; `None` if `key` is not one.
pub fn extra_path_of_key(key: &str) -> Option<String> {
    let mut out = String::from("/");
    let mut rest = key;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("%25") => out.push('%'),
            Some("%2F") => out.push('/'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (out.len() > 1 && !key.contains('/')).then_some(out)
}

/// A BLAKE3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, as used in file names and messages.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Self(*h.as_bytes()))
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

/// Ownership, permissions and modification time, shared by every entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// One extended attribute (only the `user.` namespace is synced).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// What kind of entry, with the data that kind carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File {
        size: u64,
        hash: Hash,
        /// Hardlink group: every entry with the same group id is one inode. Ids are assigned in
        /// path order starting at 0, and only for inodes with more than one path in the tree.
        link_group: Option<u32>,
    },
    Dir,
    /// A symlink. The target is stored as bytes and never followed.
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
}

/// One path in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: StackPath,
    pub kind: EntryKind,
    pub meta: Meta,
    /// Sorted by name, no duplicates.
    pub xattrs: Vec<Xattr>,
}

impl Entry {
    /// About how much memory this entry holds: the struct and what its path, symlink target
    /// and xattrs keep on the heap (see [`crate::msg::MAX_MANIFEST_BYTES`]).
    pub fn held_bytes(&self) -> u64 {
        let xattrs: usize = self
            .xattrs
            .iter()
            .map(|x| std::mem::size_of::<Xattr>() + x.name.len() + x.value.len())
            .sum();
        let target = match &self.kind {
            EntryKind::Symlink { target } => target.len(),
            _ => 0,
        };
        (std::mem::size_of::<Entry>() + self.path.as_bytes().len() + target + xattrs) as u64
    }

    /// Size and hash if this is a regular file.
    pub fn file(&self) -> Option<(u64, Hash)> {
        match self.kind {
            EntryKind::File { size, hash, .. } => Some((size, hash)),
            _ => None,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }

    /// True if `other` has the same content (type, file hash, link target), ignoring metadata.
    pub fn same_content(&self, other: &Entry) -> bool {
        match (&self.kind, &other.kind) {
            (EntryKind::File { hash: a, .. }, EntryKind::File { hash: b, .. }) => a == b,
            (EntryKind::Dir, EntryKind::Dir) => true,
            (EntryKind::Symlink { target: a }, EntryKind::Symlink { target: b }) => a == b,
            _ => false,
        }
    }
}

/// Why a list of entries is not a valid manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest entries out of order or duplicated at {path}")]
    Unsorted { path: StackPath },
    #[error("manifest entry {path} has no parent directory entry")]
    MissingParent { path: StackPath },
    #[error("manifest entry {path} lies below {parent}, which is not a directory")]
    ParentNotDir { path: StackPath, parent: StackPath },
    #[error("hardlink group {group} has members with different size or hash ({path})")]
    InconsistentLinkGroup { group: u32, path: StackPath },
    #[error("hardlink group {group} has a single member ({path})")]
    LonelyLinkGroup { group: u32, path: StackPath },
    #[error("xattrs of {path} are unsorted or duplicated")]
    UnsortedXattrs { path: StackPath },
}

/// A checked, sorted list of entries. Immutable once made, so its root hash is computed once.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    entries: Vec<Entry>,
    /// [`Manifest::root`], once asked for.
    root: OnceLock<Hash>,
}

/// Two manifests are equal when their entries are (the cached root follows from them).
impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for Manifest {}

impl Manifest {
    /// Checks `entries` (sorted strictly by path, parents present and directories, consistent
    /// hardlink groups, sorted xattrs) and wraps them.
    pub fn new(entries: Vec<Entry>) -> Result<Self, ManifestError> {
        let mut kinds: HashMap<&StackPath, bool> = HashMap::with_capacity(entries.len());
        let mut groups: HashMap<u32, (u64, Hash, u32, &StackPath)> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if i > 0 && entries[i - 1].path >= e.path {
                return Err(ManifestError::Unsorted {
                    path: e.path.clone(),
                });
            }
            if let Some(parent) = e.path.parent() {
                match kinds.get(&parent) {
                    None => {
                        return Err(ManifestError::MissingParent {
                            path: e.path.clone(),
                        });
                    }
                    Some(false) => {
                        return Err(ManifestError::ParentNotDir {
                            path: e.path.clone(),
                            parent,
                        });
                    }
                    Some(true) => {}
                }
            }
            if e.xattrs.windows(2).any(|w| w[0].name >= w[1].name) {
                return Err(ManifestError::UnsortedXattrs {
                    path: e.path.clone(),
                });
            }
            if let EntryKind::File {
                size,
                hash,
                link_group: Some(g),
            } = e.kind
            {
                let slot = groups.entry(g).or_insert((size, hash, 0, &e.path));
                if (slot.0, slot.1) != (size, hash) {
                    return Err(ManifestError::InconsistentLinkGroup {
                        group: g,
                        path: e.path.clone(),
                    });
                }
                slot.2 += 1;
            }
            kinds.insert(&e.path, e.is_dir());
        }
        if let Some((g, (_, _, _, path))) = groups.iter().find(|(_, m)| m.2 < 2) {
            return Err(ManifestError::LonelyLinkGroup {
                group: *g,
                path: (*path).clone(),
            });
        }
        drop(kinds);
        drop(groups);
        Ok(Self {
            entries,
            root: OnceLock::new(),
        })
    }

    /// Sorts `entries` by path first, then checks them as [`Manifest::new`] does.
    pub fn from_unsorted(mut entries: Vec<Entry>) -> Result<Self, ManifestError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Self::new(entries)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry at `path`, by binary search.
    pub fn get(&self, path: &StackPath) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Number of regular files and their total size in bytes (hardlinks counted once).
    pub fn file_totals(&self) -> (u64, u64) {
        let mut seen = std::collections::HashSet::new();
        let (mut files, mut bytes) = (0u64, 0u64);
        for e in &self.entries {
            if let EntryKind::File {
                size, link_group, ..
            } = e.kind
            {
                files += 1;
                if link_group.is_none_or(|g| seen.insert(g)) {
                    bytes = bytes.saturating_add(size);
                }
            }
        }
        (files, bytes)
    }

    /// The first path, in manifest order, where `self` and `other` differ: an entry only one of
    /// them has, or one whose type, content, metadata or xattrs differ. `None` if they are equal.
    pub fn first_difference<'a>(&'a self, other: &'a Manifest) -> Option<&'a StackPath> {
        differences(&self.entries, &other.entries)
            .next()
            .map(|d| match d {
                Difference::Only(e, _) | Difference::Changed(e) => &e.path,
            })
    }

    /// The root hash: BLAKE3 in derive-key mode (so it can never collide with a content hash)
    /// over the entry count and each entry's canonical encoding, length-prefixed. Computed at the
    /// first call, then remembered.
    pub fn root(&self) -> Hash {
        *self.root.get_or_init(|| self.compute_root())
    }

    fn compute_root(&self) -> Hash {
        let mut h = blake3::Hasher::new_derive_key("stackclone 2026-11 manifest root v1");
        h.update(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            let bytes = wire::canonical(e);
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
        h.finalize().into()
    }
}

// ---------------------------------------------------------------------------------------------
// Changes against a base

/// Which of two sorted entry lists an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Left,
    Right,
}

/// Where two sorted entry lists differ: a path only one side has, or one both have with
/// different entries (the left side's entry).
enum Difference<'a> {
    Only(&'a Entry, Side),
    Changed(&'a Entry),
}

/// Every path of two lists sorted by path, in path order, with its entry on each side (`None`
/// where that side lacks the path): one merge walk, one comparison per step, where looking each
/// path up in the other list would cost a binary search.
pub fn pair_by_path<'a>(
    left: &'a [Entry],
    right: &'a [Entry],
) -> impl Iterator<Item = (Option<&'a Entry>, Option<&'a Entry>)> {
    let (mut a, mut b) = (left.iter().peekable(), right.iter().peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (None, None) => None,
        (Some(_), None) => Some((a.next(), None)),
        (None, Some(_)) => Some((None, b.next())),
        (Some(x), Some(y)) => match x.path.cmp(&y.path) {
            std::cmp::Ordering::Less => Some((a.next(), None)),
            std::cmp::Ordering::Greater => Some((None, b.next())),
            std::cmp::Ordering::Equal => Some((a.next(), b.next())),
        },
    })
}

/// The differences between two lists sorted by path, in path order (shared by
/// [`Manifest::first_difference`] and [`Manifest::changes_from`]).
fn differences<'a>(left: &'a [Entry], right: &'a [Entry]) -> impl Iterator<Item = Difference<'a>> {
    pair_by_path(left, right).filter_map(|pair| match pair {
        (Some(x), None) => Some(Difference::Only(x, Side::Left)),
        (None, Some(y)) => Some(Difference::Only(y, Side::Right)),
        (Some(x), Some(y)) if x != y => Some(Difference::Changed(x)),
        _ => None,
    })
}

/// How a manifest differs from a base manifest both peers hold: the entries it has that the
/// base lacks or holds differently, and the paths the base has that it lacks, both in path
/// order. A source sends these instead of the whole manifest when the target holds the base
/// (its committed manifest, or the previous manifest of the same cycle), so a cycle in which
/// little changed sends little more than a root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub upsert: Vec<Entry>,
    pub remove: Vec<StackPath>,
}

impl Changes {
    /// How many entries and paths these changes carry.
    pub fn len(&self) -> usize {
        self.upsert.len() + self.remove.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// Why a base and its changes do not make a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangesError {
    #[error("manifest changes out of order or duplicated at {path}")]
    Unsorted { path: StackPath },
    #[error("manifest changes both replace and remove {path}")]
    Conflict { path: StackPath },
    #[error("manifest changes remove {path}, which the base does not hold")]
    NotInBase { path: StackPath },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl Manifest {
    /// What turns `base` into `self` (see [`Changes`]).
    pub fn changes_from(&self, base: &Manifest) -> Changes {
        let mut out = Changes::default();
        for d in differences(&self.entries, &base.entries) {
            match d {
                Difference::Only(e, Side::Left) | Difference::Changed(e) => {
                    out.upsert.push(e.clone())
                }
                Difference::Only(e, Side::Right) => out.remove.push(e.path.clone()),
            }
        }
        out
    }

    /// `base` with `changes` applied, checked as [`Manifest::new`] checks a whole one. The
    /// changes must be in path order, without duplicates, remove only what `base` holds and
    /// not both replace and remove a path.
    pub fn apply(base: &Manifest, changes: Changes) -> Result<Manifest, ChangesError> {
        use std::cmp::Ordering;
        let Changes { upsert, remove } = changes;
        if let Some(w) = upsert.windows(2).find(|w| w[0].path >= w[1].path) {
            return Err(ChangesError::Unsorted {
                path: w[1].path.clone(),
            });
        }
        if let Some(w) = remove.windows(2).find(|w| w[0] >= w[1]) {
            return Err(ChangesError::Unsorted { path: w[1].clone() });
        }
        let mut out = Vec::with_capacity(base.len() + upsert.len());
        let mut up = upsert.into_iter().peekable();
        let mut rm = remove.iter().peekable();
        for e in &base.entries {
            while up.peek().is_some_and(|u| u.path < e.path) {
                out.push(up.next().expect("peeked"));
            }
            if let Some(&r) = rm.peek()
                && *r < e.path
            {
                return Err(ChangesError::NotInBase { path: r.clone() });
            }
            let removed = rm.peek().is_some_and(|r| **r == e.path);
            let replaced = up.peek().is_some_and(|u| u.path == e.path);
            match (removed, replaced) {
                (true, true) => {
                    return Err(ChangesError::Conflict {
                        path: e.path.clone(),
                    });
                }
                (true, false) => {
                    rm.next();
                }
                (false, true) => out.push(up.next().expect("peeked")),
                (false, false) => out.push(e.clone()),
            }
        }
        if let Some(r) = rm.next() {
            return Err(ChangesError::NotInBase { path: r.clone() });
        }
        out.extend(up);
        debug_assert!(
            out.windows(2)
                .all(|w| w[0].path.cmp(&w[1].path) == Ordering::Less)
        );
        Ok(Manifest::new(out)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Manifest files

/// The header frame of a manifest file.
#[derive(Debug, Serialize, Deserialize)]
struct ManifestHeader {
    generation: u64,
    entries: u64,
    root: Hash,
}

/// Entries per frame are cut at this many encoded bytes, well under [`MAX_FRAME`].
const FRAME_BUDGET: usize = 4 << 20;

/// Encodes a manifest as a file of wire frames: a header (generation, entry count, root), then
/// entry batches. The target's `manifests/<G>` and the source's record of the last committed
/// manifest (the base of its next manifest, see [`Changes`]) are such files.
pub fn encode_file(generation: u64, m: &Manifest) -> Result<Vec<u8>, String> {
    let header = ManifestHeader {
        generation,
        entries: m.len() as u64,
        root: m.root(),
    };
    let mut out = wire::encode_frame(&header).map_err(|e| e.to_string())?;
    let mut batch: Vec<&Entry> = Vec::new();
    let mut size = 0usize;
    for e in m.entries() {
        let len = wire::canonical(e).len();
        if !batch.is_empty() && size + len > FRAME_BUDGET {
            out.extend(wire::encode_frame(&batch).map_err(|e| e.to_string())?);
            batch.clear();
            size = 0;
        }
        batch.push(e);
        size += len;
    }
    if !batch.is_empty() {
        out.extend(wire::encode_frame(&batch).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// Decodes and checks a file of [`encode_file`]: frame bounds, entry count, manifest rules,
/// root.
pub fn decode_file(bytes: &[u8]) -> Result<(u64, Manifest), String> {
    let mut dec = FrameDecoder::new(MAX_FRAME);
    let mut frames = Vec::new();
    for piece in bytes.chunks(1 << 20) {
        dec.push(piece).map_err(|e| e.to_string())?;
        while let Some(f) = dec.next_frame().map_err(|e| e.to_string())? {
            frames.push(f);
        }
    }
    if dec.buffered() != 0 {
        return Err(format!(
            "{} bytes of a truncated frame at the end",
            dec.buffered()
        ));
    }
    let mut frames = frames.into_iter();
    let header: ManifestHeader = match frames.next() {
        Some(f) => wire::decode(&f).map_err(|e| e.to_string())?,
        None => return Err("empty file".into()),
    };
    let mut entries = Vec::new();
    for f in frames {
        let batch: Vec<Entry> = wire::decode(&f).map_err(|e| e.to_string())?;
        entries.extend(batch);
    }
    if entries.len() as u64 != header.entries {
        return Err(format!(
            "{} entries, header says {}",
            entries.len(),
            header.entries
        ));
    }
    let m = Manifest::new(entries).map_err(|e| e.to_string())?;
    if m.root() != header.root {
        return Err("entries do not hash to the recorded root".into());
    }
    Ok((header.generation, m))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn extra_path_keys_are_one_component_and_give_the_path_back() {
        for path in [
            "/srv/media",
            "/srv/a-b",
            "/srv/a/b",
            "/x%2Fy",
            "/100%",
            "/a%25b/c",
        ] {
            let key = extra_path_key(path);
            assert!(!key.contains('/'), "{key}");
            assert_eq!(extra_path_of_key(&key).as_deref(), Some(path), "{key}");
        }
        assert_eq!(extra_path_key("/srv/media"), "srv%2Fmedia");
        assert_ne!(extra_path_key("/srv/a/b"), extra_path_key("/srv/a%2Fb"));
        assert_eq!(extra_path_of_key("bad%2"), None);
        assert_eq!(extra_path_of_key("bad%41"), None);
        assert_eq!(extra_path_of_key(""), None);
    }

    /// A manifest from a bit mask over a fixed set of paths (parents added as needed), with
    /// content that depends on `salt` for some files.
    fn masked(mask: u32, salt: u8) -> Manifest {
        let files = ["a", "b/c", "b/d", "b/e/f", "g", "h/i", "h/j", "k"];
        let mut entries = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if mask & (1 << i) == 0 {
                continue;
            }
            let mut parent = String::new();
            for part in f.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(part);
                entries.push(dir(&parent));
            }
            let data = [if (mask >> (8 + i)) & 1 == 1 { salt } else { 0 }];
            entries.push(file(f, &data));
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        Manifest::new(entries).unwrap()
    }

    #[test]
    fn changes_from_a_base_rebuild_the_manifest_exactly() {
        let mut seed = 0x9e37_79b9_u32;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let (a, b) = (masked(seed, 1), masked(seed.rotate_left(11), 2));
            let changes = b.changes_from(&a);
            assert_eq!(changes.is_empty(), a == b);
            assert_eq!(Manifest::apply(&a, changes).unwrap(), b);
        }
    }

    #[test]
    fn changes_that_do_not_fit_their_base_are_refused() {
        let base = masked(0xff, 1);
        let p = |s: &str| StackPath::new(s).unwrap();
        let apply = |upsert: Vec<Entry>, remove: Vec<StackPath>| {
            Manifest::apply(&base, Changes { upsert, remove }).unwrap_err()
        };
        assert!(matches!(
            apply(vec![], vec![p("zzz")]),
            ChangesError::NotInBase { .. }
        ));
        assert!(matches!(
            apply(vec![], vec![p("0")]),
            ChangesError::NotInBase { .. }
        ));
        assert!(matches!(
            apply(vec![file("g", b"x")], vec![p("g")]),
            ChangesError::Conflict { .. }
        ));
        assert!(matches!(
            apply(vec![file("k", b"x"), file("a", b"x")], vec![]),
            ChangesError::Unsorted { .. }
        ));
        assert!(matches!(
            apply(vec![], vec![p("g"), p("a")]),
            ChangesError::Unsorted { .. }
        ));
        // Removing a directory but not what it holds leaves an orphan: the manifest's own rule.
        assert!(matches!(
            apply(vec![], vec![p("b")]),
            ChangesError::Manifest(ManifestError::MissingParent { .. })
        ));
    }

    #[test]
    fn a_manifest_file_round_trips_and_a_torn_one_is_refused() {
        let m = masked(0xffff, 3);
        let bytes = encode_file(7, &m).unwrap();
        assert_eq!(decode_file(&bytes).unwrap(), (7, m));
        assert!(decode_file(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_file(&[]).is_err());
    }

    pub(crate) fn meta() -> Meta {
        Meta {
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime_ns: 1_700_000_000_123_456_789,
        }
    }

    pub(crate) fn dir(p: &str) -> Entry {
        Entry {
            path: StackPath::new(p).unwrap(),
            kind: EntryKind::Dir,
            meta: Meta {
                mode: 0o755,
                ..meta()
            },
            xattrs: vec![],
        }
    }

    pub(crate) fn file(p: &str, data: &[u8]) -> Entry {
        Entry {
            path: StackPath::new(p).unwrap(),
            kind: EntryKind::File {
                size: data.len() as u64,
                hash: Hash::of(data),
                link_group: None,
            },
            meta: meta(),
            xattrs: vec![],
        }
    }

    #[test]
    fn accepts_a_sorted_tree_and_finds_entries() {
        let m =
            Manifest::from_unsorted(vec![file("a/x", b"1"), dir("a"), file("b", b"22")]).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m.get(&StackPath::new("a/x").unwrap())
                .unwrap()
                .file()
                .unwrap()
                .0,
            1
        );
        assert_eq!(m.file_totals(), (2, 3));
    }

    #[test]
    fn rejects_what_a_peer_could_get_wrong() {
        assert!(matches!(
            Manifest::new(vec![file("b", b""), file("a", b"")]),
            Err(ManifestError::Unsorted { .. })
        ));
        assert!(matches!(
            Manifest::new(vec![file("a", b""), file("a", b"")]),
            Err(ManifestError::Unsorted { .. })
        ));
        assert!(matches!(
            Manifest::new(vec![file("a/x", b"")]),
            Err(ManifestError::MissingParent { .. })
        ));
        assert!(matches!(
            Manifest::new(vec![file("a", b""), file("a/x", b"")]),
            Err(ManifestError::ParentNotDir { .. })
        ));
        let mut a = file("a", b"same");
        let mut b = file("b", b"other");
        a.kind = EntryKind::File {
            size: 4,
            hash: Hash::of(b"same"),
            link_group: Some(0),
        };
        b.kind = EntryKind::File {
            size: 5,
            hash: Hash::of(b"other"),
            link_group: Some(0),
        };
        assert!(matches!(
            Manifest::new(vec![a.clone(), b]),
            Err(ManifestError::InconsistentLinkGroup { .. })
        ));
        assert!(matches!(
            Manifest::new(vec![a]),
            Err(ManifestError::LonelyLinkGroup { .. })
        ));
    }

    #[test]
    fn first_difference_names_the_first_path_that_differs() {
        let a = Manifest::new(vec![dir("a"), file("a/x", b"1"), file("b", b"2")]).unwrap();
        assert_eq!(a.first_difference(&a), None);
        let changed = Manifest::new(vec![dir("a"), file("a/x", b"9"), file("b", b"3")]).unwrap();
        assert_eq!(
            a.first_difference(&changed).map(|p| p.to_string()),
            Some("a/x".into())
        );
        let fewer = Manifest::new(vec![dir("a"), file("b", b"2")]).unwrap();
        assert_eq!(
            a.first_difference(&fewer).map(|p| p.to_string()),
            Some("a/x".into())
        );
        assert_eq!(
            fewer.first_difference(&a).map(|p| p.to_string()),
            Some("a/x".into())
        );
        let more = Manifest::new(vec![
            dir("a"),
            file("a/x", b"1"),
            file("b", b"2"),
            file("c", b""),
        ])
        .unwrap();
        assert_eq!(
            a.first_difference(&more).map(|p| p.to_string()),
            Some("c".into())
        );
    }

    #[test]
    fn root_changes_with_any_field() {
        let base = Manifest::new(vec![dir("d"), file("d/f", b"data")]).unwrap();
        let mut variants = Vec::new();
        let mut m = base.clone().into_entries();
        m[1].meta.mode = 0o4755;
        variants.push(m);
        let mut m = base.clone().into_entries();
        m[1].meta.uid = 999;
        variants.push(m);
        let mut m = base.clone().into_entries();
        m[1].meta.mtime_ns += 1;
        variants.push(m);
        let mut m = base.clone().into_entries();
        m[1].xattrs.push(Xattr {
            name: b"user.k".to_vec(),
            value: b"v".to_vec(),
        });
        variants.push(m);
        let mut m = base.clone().into_entries();
        m[1] = file("d/f", b"datb");
        variants.push(m);
        for v in variants {
            assert_ne!(Manifest::new(v).unwrap().root(), base.root());
        }
        assert_eq!(base.root(), base.clone().root());
    }
}
