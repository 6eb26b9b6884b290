//! What a commit must change to turn the live tree into the wanted one.
//!
//! [`Changes::between`] compares the target's live manifest (a fresh scan, so it includes whatever
//! the target's own containers changed: that is divergence, and it is undone here like any other
//! difference) with the manifest the source sent. It is pure: the driver carries the changes out
//! inside the commit, in the order given:
//!
//! 1. `deletes`, deepest first: paths absent from the wanted tree, and paths whose type changes
//!    (a file that becomes a directory is removed before the directory is made). Children always
//!    come before their parents.
//! 2. `upserts`, parents first: creations, content replacements, metadata-only changes.
//! 3. Directory metadata last, deepest first (creating children changes a directory's mtime), which
//!    the driver derives from `upserts`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::manifest::{Entry, EntryKind, Manifest, pair_by_path};
use crate::path::StackPath;

/// What happens to one wanted entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Upsert {
    /// Nothing is at this path on the target (or it was deleted for a type change).
    Create(Entry),
    /// Same type, different content (file hash, symlink target or hardlink membership).
    Replace(Entry),
    /// Same content; mode, owner, mtime or xattrs differ.
    Meta(Entry),
}

impl Upsert {
    pub fn entry(&self) -> &Entry {
        match self {
            Upsert::Create(e) | Upsert::Replace(e) | Upsert::Meta(e) => e,
        }
    }
}

/// The difference between the live tree and the wanted tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Deepest first.
    pub deletes: Vec<StackPath>,
    /// Parents first.
    pub upserts: Vec<Upsert>,
    /// Wanted entries that are already exactly right.
    pub unchanged: u64,
    /// Live non-directory entries that the wanted tree no longer has (for the `max_delete` valve).
    pub removed_files: u64,
    /// Live non-directory entries in all.
    pub live_files: u64,
}

/// The leader of each hardlinked file of `m`: every path of a hardlink group maps to the group's
/// first path in manifest order (the leader maps to itself); a file outside any group is not in
/// the map.
///
/// Two manifests whose leaders agree for a path have the same hardlink membership there, which
/// is how [`Changes::between`] sees a membership change. A commit makes the leader from content
/// and links every other member to it; since a manifest is sorted parents first, as
/// [`Changes::upserts`] are, the leader comes before its followers.
pub fn link_leaders(m: &Manifest) -> HashMap<&StackPath, &StackPath> {
    let mut first: HashMap<u32, &StackPath> = HashMap::new();
    let mut leaders = HashMap::new();
    for e in m.entries() {
        if let EntryKind::File {
            link_group: Some(g),
            ..
        } = e.kind
        {
            let leader = *first.entry(g).or_insert(&e.path);
            leaders.insert(&e.path, leader);
        }
    }
    leaders
}

impl Changes {
    /// Compares `live` with `want`.
    pub fn between(live: &Manifest, want: &Manifest) -> Self {
        Self::between_with_outside(live, want, &HashSet::new())
    }

    /// Compares `live` with `want`, where the live files at `outside` have hard links outside
    /// the live dir ([`StackState::outside_links`](crate::session::StackState::outside_links)): such a
    /// file is drift. Writing into it, or setting its owner or mode, would change a file
    /// outside the stack, so a wanted file at its path is always a [`Upsert::Replace`] (a new
    /// inode, renamed into place), even when content and metadata already match.
    pub fn between_with_outside(
        live: &Manifest,
        want: &Manifest,
        outside: &HashSet<StackPath>,
    ) -> Self {
        let live_leaders = link_leaders(live);
        let want_leaders = link_leaders(want);
        let mut changes = Changes::default();
        let mut deletes = Vec::new();
        for (l, w) in pair_by_path(live.entries(), want.entries()) {
            if let Some(l) = l {
                if !l.is_dir() {
                    changes.live_files += 1;
                }
                match w {
                    None => {
                        if !l.is_dir() {
                            changes.removed_files += 1;
                        }
                        deletes.push(l.path.clone());
                    }
                    Some(w)
                        if std::mem::discriminant(&w.kind) != std::mem::discriminant(&l.kind) =>
                    {
                        deletes.push(l.path.clone());
                    }
                    Some(_) => {}
                }
            }
            let Some(w) = w else { continue };
            let upsert = match l {
                None => Upsert::Create(w.clone()),
                Some(l) if std::mem::discriminant(&w.kind) != std::mem::discriminant(&l.kind) => {
                    Upsert::Create(w.clone())
                }
                Some(l) => {
                    let same_links = want_leaders.get(&w.path) == live_leaders.get(&l.path);
                    if !w.same_content(l) || !same_links || outside.contains(&l.path) {
                        Upsert::Replace(w.clone())
                    } else if w.meta != l.meta || w.xattrs != l.xattrs {
                        Upsert::Meta(w.clone())
                    } else {
                        changes.unchanged += 1;
                        continue;
                    }
                }
            };
            changes.upserts.push(upsert);
        }
        // Live entries are sorted parents first; reversed, children come before their parents.
        deletes.reverse();
        changes.deletes = deletes;
        changes
    }

    /// Share of the live files (non-directories) this commit would delete, 0.0 to 1.0.
    pub fn delete_share(&self) -> f64 {
        if self.live_files == 0 {
            0.0
        } else {
            self.removed_files as f64 / self.live_files as f64
        }
    }

    /// True if nothing changes.
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.upserts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::{dir, file};
    use crate::manifest::{Hash, Meta};

    fn m(entries: Vec<Entry>) -> Manifest {
        Manifest::from_unsorted(entries).unwrap()
    }

    #[test]
    fn a_live_file_linked_outside_is_replaced_never_patched_or_chmodded() {
        let mode = |mut e: Entry, mode: u32| {
            e.meta.mode = mode;
            e
        };
        let live = m(vec![
            file("a", b"same"),
            mode(file("b", b"same too"), 0o600),
            file("c", b"old"),
        ]);
        let want = m(vec![
            file("a", b"same"),
            file("b", b"same too"),
            file("c", b"new"),
        ]);
        let plain = Changes::between(&live, &want);
        assert_eq!(plain.unchanged, 1, "{plain:?}");
        assert!(matches!(plain.upserts[0], Upsert::Meta(_)), "{plain:?}");
        let outside: HashSet<StackPath> = ["a", "b", "c"]
            .iter()
            .map(|p| StackPath::new(*p).unwrap())
            .collect();
        let c = Changes::between_with_outside(&live, &want, &outside);
        assert_eq!(c.upserts.len(), 3, "{c:?}");
        assert!(
            c.upserts.iter().all(|u| matches!(u, Upsert::Replace(_))),
            "{c:?}"
        );
        assert_eq!(c.unchanged, 0);
    }

    fn paths(v: &[StackPath]) -> Vec<String> {
        v.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn identical_trees_need_nothing() {
        let t = m(vec![dir("a"), file("a/x", b"1")]);
        let c = Changes::between(&t, &t);
        assert!(c.is_empty());
        assert_eq!(c.unchanged, 2);
    }

    #[test]
    fn create_replace_meta_and_delete_children_first() {
        let live = m(vec![
            dir("a"),
            file("a/x", b"1"),
            dir("gone"),
            file("gone/y", b"2"),
            file("m", b"3"),
        ]);
        let mut meta_changed = file("m", b"3");
        meta_changed.meta = Meta {
            uid: 999,
            ..meta_changed.meta
        };
        let want = m(vec![
            dir("a"),
            file("a/x", b"changed"),
            file("new", b"n"),
            meta_changed,
        ]);
        let c = Changes::between(&live, &want);
        assert_eq!(paths(&c.deletes), ["gone/y", "gone"]);
        assert_eq!(c.removed_files, 1);
        assert_eq!(c.live_files, 3);
        let kinds: Vec<_> = c
            .upserts
            .iter()
            .map(|u| match u {
                Upsert::Create(e) => format!("create {}", e.path),
                Upsert::Replace(e) => format!("replace {}", e.path),
                Upsert::Meta(e) => format!("meta {}", e.path),
            })
            .collect();
        assert_eq!(kinds, ["replace a/x", "meta m", "create new"]);
    }

    #[test]
    fn type_changes_delete_then_create() {
        // A symlink planted where a directory belongs (divergence) is removed, never followed.
        let mut planted = file("data", b"");
        planted.kind = EntryKind::Symlink {
            target: b"/etc".to_vec(),
        };
        let live = m(vec![planted, dir("f"), file("f/inner", b"x")]);
        let want = m(vec![
            dir("data"),
            file("data/db", b"rows"),
            file("f", b"now a file"),
        ]);
        let c = Changes::between(&live, &want);
        assert_eq!(paths(&c.deletes), ["f/inner", "f", "data"]);
        assert!(matches!(&c.upserts[0], Upsert::Create(e) if e.is_dir()));
        assert!(c.upserts.iter().all(|u| matches!(u, Upsert::Create(_))));
    }

    #[test]
    fn hardlink_membership_change_is_a_replacement() {
        let h = Hash::of(b"same");
        let mut a = file("a", b"same");
        let mut b = file("b", b"same");
        let live = m(vec![a.clone(), b.clone()]);
        a.kind = EntryKind::File {
            size: 4,
            hash: h,
            link_group: Some(0),
        };
        b.kind = EntryKind::File {
            size: 4,
            hash: h,
            link_group: Some(0),
        };
        let want = m(vec![a, b]);
        let c = Changes::between(&live, &want);
        assert_eq!(c.upserts.len(), 2);
        assert!(c.upserts.iter().all(|u| matches!(u, Upsert::Replace(_))));
    }
}
