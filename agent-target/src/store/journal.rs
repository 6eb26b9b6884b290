//! The redo journal of a commit (or rollback) and its on-disk format.
//!
//! ```text
//! journal := MAGIC (8 bytes "SCJRNL01") | len (u64 LE) | payload (len bytes) | blake3(payload)
//! payload := bincode(serde, standard config) of Journal
//! ```
//! It is written as `journal.tmp`, fsynced, renamed to `journal` and the state dir fsynced, and
//! only then is the first op applied. A `journal.tmp` found on open was never published (no op
//! ran): it is deleted. A `journal` that does not check out is [`super::StoreError::JournalCorrupt`]
//! (this protocol never produces one; the disk or a person damaged it) and the store refuses to
//! guess.

use serde::{Deserialize, Serialize};
use stackclone_proto::manifest::{Meta, Xattr};
use stackclone_proto::path::StackPath;

use super::patch::BaseFacts;
use super::state::StoreState;

const MAGIC: &[u8; 8] = b"SCJRNL01";

/// One idempotent step. Ops before [`Op::EndBackups`] only move live entries out of the way;
/// ops after it only create, write patches and set metadata. See the module doc of [`super`] for why each is safe to
/// repeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Op {
    /// Move the live entry at `path` (whatever it is, with all it contains) to the backup dir as
    /// `slot`. Done if `slot` exists; nothing to do if `path` does not exist.
    Backup { path: StackPath, slot: u64 },
    /// Record that every `Backup` ran (the marker names this journal by hash), so a replay never
    /// runs a `Backup` again after creation started: it would move new entries away.
    EndBackups,
    /// Create a directory (mode 0700 until its metadata op at the end). Done if a directory is
    /// there.
    Mkdir { path: StackPath },
    /// Rename the prepared file `staging/prep/<prep>` (content and metadata ready) to `path`.
    /// Done if the prepared file is gone.
    Place { prep: u64, path: StackPath },
    /// Create a symlink and set its owner and mtime. Done if that symlink is there.
    Symlink {
        path: StackPath,
        target: Vec<u8>,
        meta: Meta,
    },
    /// Hardlink `path` to `leader` (same hardlink group). Done if `path` is that inode.
    Link { leader: StackPath, path: StackPath },
    /// Set owner, mode, xattrs and mtime of a file or directory.
    Meta {
        path: StackPath,
        dir: bool,
        meta: Meta,
        xattrs: Vec<Xattr>,
    },
    /// Set owner and mtime of a symlink.
    SymlinkMeta { path: StackPath, meta: Meta },
    /// Write the in-place patch `staging/patches/<patch>` into the live file at `path` (its
    /// undo was saved by `prepare`), fdatasync it, then set its metadata. Repeating it writes
    /// the same bytes at the same offsets.
    Patch {
        patch: String,
        path: StackPath,
        base: BaseFacts,
        meta: Meta,
        xattrs: Vec<Xattr>,
    },
    /// Rename the prepared directory `staging/prep/tree-<prep>` (everything below it made, with
    /// its metadata: files, symlinks, directories) to `path`, which must not exist: a new
    /// directory placed whole, `files` regular files in it. Its directories' own metadata are
    /// `Meta` ops at the end, like any new directory's. Done if the prepared directory is gone.
    PlaceTree {
        prep: u64,
        path: StackPath,
        files: u64,
    },
}

/// A whole commit, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Journal {
    /// Backup dir, relative to `generations/` (e.g. `7/data`, or `7/undo` for a rollback).
    pub(crate) backup: String,
    pub(crate) ops: Vec<Op>,
    /// The state once the ops ran (the commit time is in it; the apply time is added when known).
    pub(crate) state_after: StoreState,
    /// Generation dirs (and their manifests) to drop once the state is written: a rollback
    /// consumes the generation it undid.
    pub(crate) drop_generations: Vec<u64>,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl Journal {
    /// The file bytes and the payload hash (which names this journal in the backup marker).
    pub(crate) fn encode(&self) -> Result<(Vec<u8>, blake3::Hash), String> {
        let payload = bincode::serde::encode_to_vec(self, config()).map_err(|e| e.to_string())?;
        let hash = blake3::hash(&payload);
        let mut out = Vec::with_capacity(payload.len() + 48);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(hash.as_bytes());
        Ok((out, hash))
    }

    /// Checks magic, length and hash before decoding anything.
    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, blake3::Hash), String> {
        let Some(rest) = bytes.strip_prefix(MAGIC) else {
            return Err("bad magic".into());
        };
        let Some((len, rest)) = rest.split_first_chunk::<8>() else {
            return Err("truncated header".into());
        };
        let len = u64::from_le_bytes(*len);
        if len.checked_add(32) != Some(rest.len() as u64) {
            return Err(format!(
                "length {len} does not match the {} bytes that follow (torn write?)",
                rest.len()
            ));
        }
        let (payload, sum) = rest.split_at(len as usize);
        let hash = blake3::hash(payload);
        if hash.as_bytes() != sum {
            return Err("checksum mismatch".into());
        }
        let (journal, used) = bincode::serde::decode_from_slice(payload, config())
            .map_err(|e| format!("undecodable: {e}"))?;
        if used != payload.len() {
            return Err("trailing bytes".into());
        }
        Ok((journal, hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        Journal {
            backup: "3/data".into(),
            ops: vec![
                Op::Backup {
                    path: StackPath::new("a/b").unwrap(),
                    slot: 0,
                },
                Op::EndBackups,
                Op::Mkdir {
                    path: StackPath::new(b"\xff\n".to_vec()).unwrap(),
                },
            ],
            state_after: StoreState {
                stack: "web".into(),
                generation: 3,
                ..StoreState::default()
            },
            drop_generations: vec![],
        }
    }

    #[test]
    fn round_trips_and_rejects_any_damage() {
        let (bytes, hash) = sample().encode().unwrap();
        let (back, h2) = Journal::decode(&bytes).unwrap();
        assert_eq!(back, sample());
        assert_eq!(hash, h2);
        for cut in [0, 7, 8, 15, 16, bytes.len() / 2, bytes.len() - 1] {
            assert!(Journal::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Journal::decode(&b).is_err(), "flip at {i}");
        }
    }
}
