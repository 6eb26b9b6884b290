//! The pure core of a commit: the journal ops that turn the live tree into the wanted one, in
//! order. No file system: the wanted manifest, the [`Changes`] and what is staged are data the
//! store gathered first. The store then makes what the plan names (a prepared file for each
//! `Place`, an undo copy for each `Patch`), checks the ops against the live dir and journals
//! them; why each op is safe to replay is in the store's module doc.
//!
//! The order:
//!
//! 1. `Backup` moves live entries out of the way, and only that: every delete in the order of
//!    [`Changes::deletes`] (children before their parents), then every path to create or replace,
//!    children before parents (whatever occupies it goes, even what appeared since the scan) —
//!    but not a file patched in place, which stays. Then `EndBackups`.
//! 2. The upserts in their order, parents first, so a directory exists before what goes into it:
//!    `Mkdir` for a new directory; `Symlink` for a new or retargeted symlink; `Place` for a new or
//!    replaced file that is alone or leads its hardlink group; `Link` to the leader for the other
//!    members of a group (the leader is first in manifest order, so it is placed before them, or
//!    is live already); `Patch` for a replaced file whose new content is staged only as an
//!    in-place patch of that very path; `Meta` / `SymlinkMeta` for a change of metadata only. A
//!    type change is a delete and a create, a move is a delete and a create elsewhere. A live
//!    file with a hard link outside the stack comes as a replacement
//!    ([`Changes::between_with_outside`]) and never has a patch staged, so it is backed up and
//!    placed anew, never written or chmodded through its link.
//! 3. Directory metadata last, deepest first: every wanted directory that was created, changed,
//!    or had a child created, replaced or deleted (that moves its mtime).
//!
//! A new directory whose parent is not new is placed whole: everything below it is new too, so
//! the store builds it in staging (directories, files as `Place` would prepare them, symlinks)
//! and one `PlaceTree` renames it into the live dir, where the upserts below it would each have
//! been an op. Nothing below it needs a `Backup` (the directory's own backup takes whatever is
//! there with all it holds). Only the hard links to a group's leader stay `Link` ops, after
//! the tree: the leader may be elsewhere. A first copy of 20,000 files in 200 directories is
//! then a few hundred ops, not 40,000, and a few renames with the standby stopped.

use std::collections::{BTreeSet, HashMap, HashSet};

use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest};
use stackclone_proto::path::StackPath;
use stackclone_proto::plan::{Changes, Upsert, link_leaders};

use crate::store::journal::Op;
use crate::store::patch::PatchHeader;

/// What is staged, as far as planning needs it; the store reads it before it plans.
#[derive(Debug, Default)]
pub(super) struct Staged {
    /// In-place patches, by the hash of the content each one makes.
    pub(super) patches: HashMap<Hash, PatchHeader>,
    /// Of the contents of `patches`, those also staged whole: a whole object is placed, not
    /// patched in.
    pub(super) whole: HashSet<Hash>,
}

/// The ops of one commit, and what the store must make before it may journal them.
#[derive(Debug)]
pub(super) struct CommitPlan<'a> {
    /// In journal order.
    pub(super) ops: Vec<Op>,
    /// `Place { prep: n, .. }` puts `prep[n]` in place: the store makes `staging/prep/<n>` from
    /// it (content and metadata), in this order.
    pub(super) prep: Vec<&'a Entry>,
    /// `PlaceTree { prep: n, .. }` puts `trees[n]` in place: the store makes
    /// `staging/prep/tree-<n>` and, in this order (parents first), each entry below it.
    pub(super) trees: Vec<TreePlan<'a>>,
    /// The patch of each `Patch` op, in op order: the store checks that each still applies to
    /// the live file, and saves what the `n`th overwrites as undo copy `n`.
    pub(super) patches: Vec<&'a PatchHeader>,
}

/// A new directory placed whole, and what the store makes below it.
#[derive(Debug)]
pub(super) struct TreePlan<'a> {
    pub(super) root: &'a StackPath,
    /// Directories, files (alone or leading their hardlink group) and symlinks below `root`,
    /// parents first.
    pub(super) entries: Vec<&'a Entry>,
}

/// The new directories to place whole: created, with a parent that is not created too.
fn tree_roots(changes: &Changes) -> HashSet<&StackPath> {
    let created: HashSet<&StackPath> = changes
        .upserts
        .iter()
        .filter_map(|u| match u {
            Upsert::Create(e) if e.is_dir() => Some(&e.path),
            _ => None,
        })
        .collect();
    created
        .iter()
        .filter(|p| p.parent().is_none_or(|parent| !created.contains(&parent)))
        .copied()
        .collect()
}

/// The root of the tree placed whole that `path` lies strictly below, if any.
fn root_above(path: &StackPath, roots: &HashSet<&StackPath>) -> Option<StackPath> {
    let mut up = path.parent();
    while let Some(p) = up {
        if roots.contains(&p) {
            return Some(p);
        }
        up = p.parent();
    }
    None
}

/// The ops that turn a live tree into `want`, given `changes` between them and what is
/// `staged`. See the module doc for the order.
pub(super) fn plan<'a>(
    want: &Manifest,
    changes: &'a Changes,
    staged: &'a Staged,
) -> CommitPlan<'a> {
    // Replacements written in place: an unlinked file whose content is staged as a patch of
    // exactly this path, and not whole.
    let mut in_place: HashMap<&StackPath, (&Hash, &PatchHeader)> = HashMap::new();
    for u in &changes.upserts {
        if let Upsert::Replace(e) = u
            && let EntryKind::File {
                hash,
                link_group: None,
                ..
            } = &e.kind
            && !staged.whole.contains(hash)
            && let Some((hash, h)) = staged.patches.get_key_value(hash)
            && h.path == e.path
        {
            in_place.insert(&e.path, (hash, h));
        }
    }

    let roots = tree_roots(changes);
    let occupied = changes.upserts.iter().rev().filter_map(|u| match u {
        Upsert::Create(e) if root_above(&e.path, &roots).is_some() => None,
        Upsert::Create(e) | Upsert::Replace(e) if !in_place.contains_key(&e.path) => Some(&e.path),
        _ => None,
    });
    let mut ops: Vec<Op> = changes
        .deletes
        .iter()
        .chain(occupied)
        .zip(0..)
        .map(|(path, slot)| Op::Backup {
            path: path.clone(),
            slot,
        })
        .collect();
    ops.push(Op::EndBackups);

    let leaders = link_leaders(want);
    let mut prep: Vec<&Entry> = Vec::new();
    let mut trees: Vec<TreePlan> = Vec::new();
    let mut tree_index: HashMap<StackPath, usize> = HashMap::new();
    // Where each tree's `PlaceTree` is in `ops`, to count its files.
    let mut tree_op: Vec<usize> = Vec::new();
    let mut patches: Vec<&PatchHeader> = Vec::new();
    let mut dirs: BTreeSet<StackPath> = changes.deletes.iter().filter_map(|p| p.parent()).collect();
    for u in &changes.upserts {
        let e = u.entry();
        dirs.extend(e.path.parent());
        let path = e.path.clone();
        if roots.contains(&e.path) {
            tree_index.insert(path.clone(), trees.len());
            tree_op.push(ops.len());
            ops.push(Op::PlaceTree {
                prep: trees.len() as u64,
                path: path.clone(),
                files: 0,
            });
            trees.push(TreePlan {
                root: &e.path,
                entries: Vec::new(),
            });
            dirs.insert(path);
            continue;
        }
        if let Some(root) = root_above(&e.path, &roots) {
            let n = tree_index[&root];
            let leader = leaders.get(&e.path).filter(|&&l| *l != e.path);
            match (&e.kind, leader) {
                // A member of a hardlink group: linked to its leader once the tree is in place.
                (EntryKind::File { .. }, Some(&leader)) => ops.push(Op::Link {
                    leader: leader.clone(),
                    path,
                }),
                (EntryKind::File { .. }, None) => {
                    trees[n].entries.push(e);
                    if let Op::PlaceTree { files, .. } = &mut ops[tree_op[n]] {
                        *files += 1;
                    }
                }
                (EntryKind::Dir, _) => {
                    trees[n].entries.push(e);
                    dirs.insert(path);
                }
                (EntryKind::Symlink { .. }, _) => trees[n].entries.push(e),
            }
            continue;
        }
        match (&e.kind, u) {
            (EntryKind::Dir, Upsert::Create(_)) => {
                ops.push(Op::Mkdir { path: path.clone() });
                dirs.insert(path);
            }
            (EntryKind::Dir, _) => {
                dirs.insert(path);
            }
            (EntryKind::Symlink { target }, Upsert::Create(_) | Upsert::Replace(_)) => {
                ops.push(Op::Symlink {
                    path,
                    target: target.clone(),
                    meta: e.meta,
                });
            }
            (EntryKind::Symlink { .. }, Upsert::Meta(_)) => {
                ops.push(Op::SymlinkMeta { path, meta: e.meta });
            }
            (EntryKind::File { .. }, Upsert::Replace(_))
                if let Some(&(hash, h)) = in_place.get(&e.path) =>
            {
                patches.push(h);
                ops.push(Op::Patch {
                    patch: hash.to_hex(),
                    path,
                    base: h.base,
                    meta: e.meta,
                    xattrs: e.xattrs.clone(),
                });
            }
            (EntryKind::File { .. }, Upsert::Create(_) | Upsert::Replace(_)) => {
                match leaders.get(&e.path) {
                    Some(&leader) if *leader != e.path => ops.push(Op::Link {
                        leader: leader.clone(),
                        path,
                    }),
                    _ => {
                        ops.push(Op::Place {
                            prep: prep.len() as u64,
                            path,
                        });
                        prep.push(e);
                    }
                }
            }
            (EntryKind::File { .. }, Upsert::Meta(_)) => ops.push(Op::Meta {
                path,
                dir: false,
                meta: e.meta,
                xattrs: e.xattrs.clone(),
            }),
        }
    }
    let mut dir_entries: Vec<&Entry> = dirs
        .iter()
        .filter_map(|p| want.get(p))
        .filter(|e| e.is_dir())
        .collect();
    dir_entries.sort_by(|a, b| {
        b.path
            .depth()
            .cmp(&a.path.depth())
            .then_with(|| a.path.cmp(&b.path))
    });
    ops.extend(dir_entries.into_iter().map(|e| Op::Meta {
        path: e.path.clone(),
        dir: true,
        meta: e.meta,
        xattrs: e.xattrs.clone(),
    }));
    CommitPlan {
        ops,
        prep,
        trees,
        patches,
    }
}

#[cfg(test)]
mod tests {
    use stackclone_proto::manifest::Meta;

    use super::*;
    use crate::store::patch::BaseFacts;

    fn sp(p: &str) -> StackPath {
        StackPath::new(p).unwrap()
    }

    fn entry(p: &str, kind: EntryKind) -> Entry {
        Entry {
            path: sp(p),
            kind,
            meta: Meta {
                mode: 0o644,
                uid: 999,
                gid: 999,
                mtime_ns: 1_700_000_000_000_000_000,
            },
            xattrs: vec![],
        }
    }

    fn dir(p: &str) -> Entry {
        entry(p, EntryKind::Dir)
    }

    fn file(p: &str, data: &[u8]) -> Entry {
        entry(
            p,
            EntryKind::File {
                size: data.len() as u64,
                hash: Hash::of(data),
                link_group: None,
            },
        )
    }

    fn linked(p: &str, data: &[u8], group: u32) -> Entry {
        entry(
            p,
            EntryKind::File {
                size: data.len() as u64,
                hash: Hash::of(data),
                link_group: Some(group),
            },
        )
    }

    fn symlink(p: &str, target: &str) -> Entry {
        entry(
            p,
            EntryKind::Symlink {
                target: target.as_bytes().to_vec(),
            },
        )
    }

    fn mode(mut e: Entry, mode: u32) -> Entry {
        e.meta.mode = mode;
        e
    }

    fn m(entries: Vec<Entry>) -> Manifest {
        Manifest::from_unsorted(entries).unwrap()
    }

    /// A staged in-place patch of `path` that makes `data`.
    fn patch_of(path: &str, data: &[u8]) -> (Hash, PatchHeader) {
        let h = PatchHeader {
            path: sp(path),
            base: BaseFacts {
                dev: 1,
                ino: 2,
                size: 3,
                mtime_ns: 4,
                ctime_ns: 5,
            },
            new_len: data.len() as u64,
            extents: vec![],
        };
        (Hash::of(data), h)
    }

    /// Plans `live` → `want` with nothing staged in place, as a list of readable ops.
    fn ops(live: &Manifest, want: &Manifest) -> Vec<String> {
        let changes = Changes::between(live, want);
        show(&plan(want, &changes, &Staged::default()))
    }

    fn show(plan: &CommitPlan) -> Vec<String> {
        plan.ops
            .iter()
            .map(|op| match op {
                Op::Backup { path, slot } => format!("backup {path} #{slot}"),
                Op::EndBackups => "end backups".into(),
                Op::Mkdir { path } => format!("mkdir {path}"),
                Op::Place { prep, path } => format!("place {path} from prep {prep}"),
                Op::Symlink { path, target, .. } => {
                    format!("symlink {path} -> {}", String::from_utf8_lossy(target))
                }
                Op::Link { leader, path } => format!("link {path} to {leader}"),
                Op::Meta {
                    path, dir: true, ..
                } => format!("dir meta {path}"),
                Op::Meta {
                    path, dir: false, ..
                } => format!("meta {path}"),
                Op::SymlinkMeta { path, .. } => format!("symlink meta {path}"),
                Op::Patch { path, .. } => format!("patch {path}"),
                Op::PlaceTree { prep, path, files } => {
                    let below: Vec<String> = plan.trees[*prep as usize]
                        .entries
                        .iter()
                        .map(|e| e.path.to_string())
                        .collect();
                    format!(
                        "place tree {path} from prep tree-{prep} ({files} files): {}",
                        below.join(", ")
                    )
                }
            })
            .collect()
    }

    #[test]
    fn directories_are_made_before_their_files_and_get_their_metadata_last_deepest_first() {
        let want = m(vec![
            dir("a"),
            dir("a/b"),
            file("a/b/f", b"f"),
            file("a/g", b"g"),
            file("top", b"t"),
        ]);
        let changes = Changes::between(&Manifest::default(), &want);
        let nothing = Staged::default();
        let p = plan(&want, &changes, &nothing);
        assert_eq!(
            show(&p),
            [
                // Whatever appeared at a path to create since the scan goes first; below a
                // new directory, its own backup takes all of it.
                "backup top #0",
                "backup a #1",
                "end backups",
                // A new directory is made whole in staging and placed by one rename.
                "place tree a from prep tree-0 (2 files): a/b, a/b/f, a/g",
                "place top from prep 0",
                "dir meta a/b",
                "dir meta a",
            ]
        );
        let prep: Vec<String> = p.prep.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(prep, ["top"]);
        assert!(p.patches.is_empty());
    }

    #[test]
    fn deletes_go_children_first_and_their_surviving_parent_gets_its_metadata_again() {
        let live = m(vec![
            dir("gone"),
            dir("gone/sub"),
            file("gone/sub/f", b"1"),
            dir("keep"),
            file("keep/old", b"2"),
            file("keep/stays", b"3"),
        ]);
        let want = m(vec![dir("keep"), file("keep/stays", b"3")]);
        assert_eq!(
            ops(&live, &want),
            [
                "backup keep/old #0",
                "backup gone/sub/f #1",
                "backup gone/sub #2",
                "backup gone #3",
                "end backups",
                "dir meta keep",
            ]
        );
    }

    #[test]
    fn a_file_that_becomes_a_directory_is_moved_away_before_the_directory_is_made() {
        let live = m(vec![file("x", b"was a file")]);
        let want = m(vec![dir("x"), file("x/inside", b"now inside")]);
        assert_eq!(
            ops(&live, &want),
            [
                "backup x #0",
                // The create's own backup finds nothing left: a no-op, and harmless on replay.
                "backup x #1",
                "end backups",
                "place tree x from prep tree-0 (1 files): x/inside",
                "dir meta x",
            ]
        );
    }

    #[test]
    fn a_directory_that_becomes_a_file_is_moved_away_whole_before_the_file_is_placed() {
        let live = m(vec![dir("y"), file("y/inside", b"1")]);
        let want = m(vec![file("y", b"now a file")]);
        assert_eq!(
            ops(&live, &want),
            [
                "backup y/inside #0",
                "backup y #1",
                "backup y #2",
                "end backups",
                "place y from prep 0",
            ]
        );
    }

    #[test]
    fn a_move_is_a_delete_and_a_create_elsewhere() {
        let live = m(vec![dir("d"), file("d/old", b"same bytes")]);
        let want = m(vec![dir("d"), file("d/new", b"same bytes")]);
        assert_eq!(
            ops(&live, &want),
            [
                "backup d/old #0",
                "backup d/new #1",
                "end backups",
                "place d/new from prep 0",
                "dir meta d",
            ]
        );
    }

    #[test]
    fn hardlink_followers_are_linked_to_their_leader_after_it_is_placed() {
        let want = m(vec![
            linked("h1", b"shared", 0),
            linked("h2", b"shared", 0),
            linked("h3", b"shared", 0),
            file("other", b"shared"),
        ]);
        let changes = Changes::between(&Manifest::default(), &want);
        let nothing = Staged::default();
        let p = plan(&want, &changes, &nothing);
        let shown = show(&p);
        assert_eq!(
            shown[shown.len() - 4..],
            [
                "place h1 from prep 0",
                "link h2 to h1",
                "link h3 to h1",
                // Same content but not in the group: a file of its own.
                "place other from prep 1",
            ]
        );
        let prep: Vec<String> = p.prep.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(
            prep,
            ["h1", "other"],
            "only leaders and unlinked files are prepared"
        );
    }

    #[test]
    fn a_new_directory_is_placed_whole_and_links_into_it_follow_it() {
        let live = m(vec![dir("old"), file("old/kept", b"k")]);
        let want = m(vec![
            dir("n1"),
            linked("n1/lead", b"shared", 0),
            dir("n1/sub"),
            symlink("n1/sub/to-lead", "../lead"),
            dir("n2"),
            linked("n2/member", b"shared", 0),
            dir("old"),
            file("old/kept", b"k"),
            linked("old/member", b"shared", 0),
        ]);
        let changes = Changes::between(&live, &want);
        let nothing = Staged::default();
        let p = plan(&want, &changes, &nothing);
        assert_eq!(
            show(&p),
            [
                "backup old/member #0",
                "backup n2 #1",
                "backup n1 #2",
                "end backups",
                "place tree n1 from prep tree-0 (1 files): n1/lead, n1/sub, n1/sub/to-lead",
                // The leader is placed with its tree; its other paths are linked to it after.
                "place tree n2 from prep tree-1 (0 files): ",
                "link n2/member to n1/lead",
                "link old/member to n1/lead",
                "dir meta n1/sub",
                "dir meta n1",
                "dir meta n2",
                "dir meta old",
            ]
        );
        assert!(p.prep.is_empty());
        assert_eq!(p.trees.len(), 2);
    }

    #[test]
    fn a_new_member_of_a_live_hardlink_group_is_only_linked() {
        let live = m(vec![linked("h1", b"shared", 0), linked("h2", b"shared", 0)]);
        let want = m(vec![
            linked("h1", b"shared", 0),
            linked("h2", b"shared", 0),
            linked("h3", b"shared", 0),
        ]);
        assert_eq!(
            ops(&live, &want),
            ["backup h3 #0", "end backups", "link h3 to h1"]
        );
    }

    #[test]
    fn a_change_of_metadata_only_backs_up_and_places_nothing() {
        let live = m(vec![
            dir("d"),
            file("d/f", b"1"),
            symlink("s", "d/f"),
            dir("untouched"),
        ]);
        let mut owner = symlink("s", "d/f");
        owner.meta.uid = 0;
        let want = m(vec![
            mode(dir("d"), 0o700),
            mode(file("d/f", b"1"), 0o600),
            owner,
            dir("untouched"),
        ]);
        assert_eq!(
            ops(&live, &want),
            ["end backups", "meta d/f", "symlink meta s", "dir meta d"]
        );
    }

    #[test]
    fn a_retargeted_symlink_is_replaced() {
        let live = m(vec![symlink("current", "v1")]);
        let want = m(vec![symlink("current", "v2")]);
        assert_eq!(
            ops(&live, &want),
            ["backup current #0", "end backups", "symlink current -> v2"]
        );
    }

    #[test]
    fn a_file_linked_outside_the_stack_is_replaced_never_given_metadata_in_place() {
        let live = m(vec![
            file("a", b"same"),
            mode(file("b", b"same too"), 0o600),
        ]);
        let want = m(vec![file("a", b"same"), file("b", b"same too")]);
        assert_eq!(ops(&live, &want), ["end backups", "meta b"]);
        let outside: HashSet<StackPath> = [sp("a"), sp("b")].into();
        let changes = Changes::between_with_outside(&live, &want, &outside);
        assert_eq!(
            show(&plan(&want, &changes, &Staged::default())),
            [
                "backup b #0",
                "backup a #1",
                "end backups",
                "place a from prep 0",
                "place b from prep 1",
            ]
        );
    }

    #[test]
    fn a_patch_is_written_in_place_only_where_it_is_staged_for_that_path_and_nothing_whole() {
        let live = m(vec![
            file("patched", b"old 1"),
            file("whole-too", b"old 2"),
            file("other-path", b"old 3"),
            linked("grouped", b"old 4", 0),
            linked("grouped-2", b"old 4", 0),
        ]);
        let want = m(vec![
            file("patched", b"new 1"),
            file("whole-too", b"new 2"),
            file("other-path", b"new 3"),
            linked("grouped", b"new 4", 0),
            linked("grouped-2", b"new 4", 0),
        ]);
        let changes = Changes::between(&live, &want);
        let patched = patch_of("patched", b"new 1");
        let whole_too = patch_of("whole-too", b"new 2");
        let staged = Staged {
            patches: [
                patched.clone(),
                whole_too.clone(),
                patch_of("somewhere-else", b"new 3"),
                patch_of("grouped", b"new 4"),
            ]
            .into(),
            whole: [whole_too.0].into(),
        };
        let p = plan(&want, &changes, &staged);
        assert_eq!(
            show(&p),
            [
                "backup whole-too #0",
                "backup other-path #1",
                "backup grouped-2 #2",
                "backup grouped #3",
                "end backups",
                "place grouped from prep 0",
                "link grouped-2 to grouped",
                "place other-path from prep 1",
                "patch patched",
                "place whole-too from prep 2",
            ]
        );
        assert_eq!(p.patches, [&patched.1]);
        let Some(Op::Patch { patch, base, .. }) =
            p.ops.iter().find(|op| matches!(op, Op::Patch { .. }))
        else {
            panic!("no patch op in {p:?}");
        };
        assert_eq!(
            (patch.as_str(), *base),
            (patched.0.to_hex().as_str(), patched.1.base)
        );
    }

    #[test]
    fn a_plan_without_changes_is_only_the_end_of_backups() {
        let t = m(vec![dir("d"), file("d/f", b"1")]);
        assert_eq!(ops(&t, &t), ["end backups"]);
    }
}
