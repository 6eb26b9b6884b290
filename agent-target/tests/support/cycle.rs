//! One honest cycle against a target's store, up to its `Commit`: a real `TargetSession` is
//! driven through Hello, the stack's live scan, the manifest of a source tree (scanned by the
//! real scanner) and a signed flag; wanted files go through the real delta engine (with the live
//! file as basis where the session asks for one) into the store's staging, so each commit passed
//! the real verification. The stack is data-only: a stop or start it asks for does nothing.
//!
//! Shared, through `#[path]`, by the store's tests (`tests/store.rs`) and the standby's unit
//! tests (`src/standby/tests.rs`); the including module has the target's `store` module in
//! scope under that name.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ed25519_dalek::SigningKey;
use stackclone_common::{ScanConfig, scan};
use stackclone_proto::delta::{Basis, Sink, Verified};
use stackclone_proto::delta::{
    CheckedSignature, FileReceiver, FileSender, SenderConfig, SignatureBuilder,
};
use stackclone_proto::flag::{SignedStatus, Status};
use stackclone_proto::lineage::HistoryId;
use stackclone_proto::manifest::Manifest;
use stackclone_proto::msg::{
    MANIFEST_PART_ENTRIES, Mode, PROTOCOL_VERSION, Pass, SourceMsg, TargetMsg,
};
use stackclone_proto::session::{
    Commit, StackPolicy, StageOutcome, TargetAction, TargetConfig, TargetSession,
};

use super::store::{BasisFile, CommitReport, LocalStage, StackStore, StoreError};

/// The history the honest source of these cycles claims.
const HISTORY: HistoryId = HistoryId([5; 16]);
/// The time every cycle runs at (Unix seconds).
pub const NOW: i64 = 1_800_000_000;
/// The stack every cycle is for.
pub const STACK: &str = "web";

/// The manifest of `root`, every file hashed.
pub fn scan_tree(root: &Path) -> Manifest {
    let mut cfg = ScanConfig::new(root);
    cfg.checksum = true;
    scan(&cfg).unwrap().manifest
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// Drives a `TargetSession` for `src` against `store` up to the `Commit`.
pub fn cycle(store: &mut StackStore, src: &Path, generation: u64) -> Result<Commit, StoreError> {
    cycle_with(store, src, generation, &mut Vec::new())
}

/// A whole cycle: [`cycle`], then the commit, prepared and committed at [`NOW`].
pub fn push(store: &mut StackStore, src: &Path, generation: u64) -> CommitReport {
    let c = cycle(store, src, generation).unwrap();
    let p = store.prepare(&c).unwrap();
    store.commit(p, NOW).unwrap()
}

/// As [`cycle`], recording the size of every in-place patch staged.
pub fn cycle_with(
    store: &mut StackStore,
    src: &Path,
    generation: u64,
    patches: &mut Vec<u64>,
) -> Result<Commit, StoreError> {
    let want = scan_tree(src);
    let mut session = TargetSession::new(
        TargetConfig {
            target_id: "standby".into(),
            peer: "primary".into(),
            peer_flag_key: Some(key().verifying_key()),
            max_skew_secs: 600,
        },
        std::time::Instant::now(),
    );
    session.handle_message(
        SourceMsg::Hello {
            version: PROTOCOL_VERSION,
            stack: STACK.into(),
            mode: Mode::Sync,
            max_delete: 1.0,
        },
        NOW,
    );
    session.handle_message(
        SourceMsg::Claim(stackclone_proto::lineage::Claim {
            history: HISTORY,
            replace_diverged: false,
            hand_over: false,
        }),
        NOW,
    );
    let mut manifest_sent = false;
    let mut wants: HashMap<u32, Option<Vec<u8>>> = HashMap::new();
    for _ in 0..100_000 {
        while let Some(msg) = session.poll_message() {
            match msg {
                TargetMsg::Welcome { .. } => {}
                TargetMsg::Want { id, basis, .. } => {
                    wants.insert(id, basis);
                }
                TargetMsg::PassDone { missing, .. } => {
                    assert!(missing.is_empty(), "{missing:?}");
                    let status = Status {
                        stack: STACK.into(),
                        generation,
                        history: HISTORY,
                        manifest_root: want.root(),
                        source_id: "primary".into(),
                        target_id: "standby".into(),
                        created_at: NOW,
                    };
                    session
                        .handle_message(SourceMsg::Flag(SignedStatus::sign(status, &key())), NOW);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let Some(action) = session.poll_action() else {
            if !manifest_sent {
                manifest_sent = true;
                for part in want.entries().chunks(MANIFEST_PART_ENTRIES) {
                    session.handle_message(
                        SourceMsg::ManifestPart {
                            entries: part.to_vec(),
                        },
                        NOW,
                    );
                }
                session.handle_message(
                    SourceMsg::ManifestEnd {
                        pass: Pass::Final,
                        entries: want.len() as u64,
                        root: want.root(),
                    },
                    NOW,
                );
                continue;
            }
            panic!("session stalled");
        };
        match action {
            TargetAction::LookupStack { .. } => {
                session.handle_policy(Ok(StackPolicy {
                    allow: vec!["primary".into()],
                    held: store.state().held(),
                    keeps_generations: true,
                }));
            }
            TargetAction::LoadStack { .. } => {
                session.handle_stack(Ok(store.stack_state()?));
            }
            // A data-only stack: nothing to stop or start.
            TargetAction::StopStack => session.handle_stack_stopped(Ok(vec![])),
            TargetAction::StartStack => session.handle_stack_started(Ok(())),
            TargetAction::ScanStopped => {
                session.handle_stopped_scan(Ok(store.stack_state()?));
            }
            TargetAction::Signature { id, basis } => {
                let b = store.open_basis(&basis)?;
                let mut data = Vec::new();
                b.file().read_to_end(&mut data).unwrap();
                let mut sig = SignatureBuilder::new(b.len());
                sig.update(&data);
                session.handle_signature(id, Ok(sig.finish()));
            }
            TargetAction::StageLocal { id, from, hash } => {
                let outcome = match store.stage_local(&from, hash)? {
                    LocalStage::Staged(v) => StageOutcome::Staged(v),
                    LocalStage::Mismatch => StageOutcome::Mismatch,
                };
                session.handle_staged(id, outcome);
            }
            TargetAction::Receive {
                id,
                path,
                basis,
                in_place,
            } => {
                let data = fs::read(src.join(OsStr::from_bytes(path.as_bytes()))).unwrap();
                let sig = wants
                    .remove(&id)
                    .flatten()
                    .map(|s| CheckedSignature::parse(s).unwrap());
                let cfg = SenderConfig::default();
                let mut sender = FileSender::new(sig.as_ref(), cfg).unwrap();
                let mut chunks = Vec::new();
                for w in data.chunks(cfg.window) {
                    chunks.extend(sender.send_window(w).unwrap());
                }
                let sent = sender.finish();
                let outcome = if in_place {
                    let (mut b, mut patch) = store.create_patch_file(&path)?;
                    match receive(chunks, Some(&mut b), sent.len, sent.hash, &mut patch) {
                        Ok(v) => {
                            patches.push(patch.patch_bytes());
                            patch.persist(&v)?;
                            StageOutcome::Staged(v)
                        }
                        Err(_) => match patch.discard() {
                            Some(e) => return Err(e),
                            None => StageOutcome::Mismatch,
                        },
                    }
                } else {
                    let mut b = match &basis {
                        Some(b) => Some(store.open_basis(b)?),
                        None => None,
                    };
                    let mut staging = store.create_staging_file()?;
                    match receive(chunks, b.as_mut(), sent.len, sent.hash, &mut staging) {
                        Ok(v) => {
                            staging.persist(&v)?;
                            StageOutcome::Staged(v)
                        }
                        Err(_) => match staging.discard() {
                            Some(e) => return Err(e),
                            None => StageOutcome::Mismatch,
                        },
                    }
                };
                assert!(
                    outcome != StageOutcome::Mismatch,
                    "an honest transfer failed"
                );
                session.handle_staged(id, outcome);
            }
            TargetAction::Commit(c) => return Ok(*c),
            TargetAction::Done(r) => panic!("cycle ended without a commit: {r:?}"),
        }
    }
    panic!("cycle did not finish")
}

struct NoBasis;
impl Basis for NoBasis {
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        unreachable!("literal transfer read a basis")
    }
}

/// Feeds `chunks` through a real `FileReceiver` into `sink`.
fn receive(
    chunks: Vec<stackclone_proto::delta::Chunk>,
    basis: Option<&mut BasisFile>,
    len: u64,
    hash: stackclone_proto::manifest::Hash,
    sink: &mut impl Sink,
) -> Result<Verified, stackclone_proto::delta::DeltaError> {
    let mut receiver = FileReceiver::new(basis.as_ref().map(|b| b.len()), len);
    match basis {
        Some(b) => {
            for c in chunks {
                receiver.handle_chunk(c, b, sink)?;
            }
        }
        None => {
            for c in chunks {
                receiver.handle_chunk(c, &mut NoBasis, sink)?;
            }
        }
    }
    receiver.finish(sink, hash)
}
