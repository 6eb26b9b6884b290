//! # stackclone-proto: the sans-IO core of stackclone
//!
//! This crate decides what a sync cycle sends, how a file is rebuilt from a delta, and how the
//! target proves that what it staged is exactly what the source signed. It owns:
//!
//! - [`path`]: [`path::StackPath`], a checked relative path (bytes, not UTF-8).
//! - [`manifest`]: the sorted list of entries of a stack's data dir and its root hash.
//! - [`delta`]: the rsync-style delta engine on `fast_rsync`, in bounded windows.
//! - [`wire`] and [`msg`]: length-prefixed bincode frames and the messages of a cycle.
//! - [`flag`]: the ed25519-signed status flag; [`flag::VerifiedStatus`] only through `verify`.
//! - [`lineage`]: histories and roles: who may write a stack's next generation.
//! - [`plan`]: what a commit changes (deletes, creations, replacements, metadata).
//! - [`session`]: [`session::SourceSession`] and [`session::TargetSession`], one cycle each.
//!
//! It does **not** perform I/O: no sockets, no files, no clock, no Docker, no async runtime. A
//! driver (the agents) hands it bytes, scan results and the time, and carries out the actions it
//! returns. `cargo tree -p stackclone-proto -e normal` shows no tokio, quinn or bollard.
//!
//! ## One cycle
//!
//! ```text
//!  source session                                      target session
//!  ──────────────                                      ──────────────
//!  Hello{version, stack, mode}
//!  Claim{history, replace_diverged}    ─────────────────────►  allow? role, lineage? → LoadStack → Welcome
//!  [Scan(Precopy) → manifest   ─────────────────────►  needs = not live, not staged
//!                   serve wants ◄─────────────────────  Want{id, path, signature of basis?}
//!                   file data   ─────────────────────►  rebuild in staging, BLAKE3 check
//!                               ◄─────────────────────  PassDone]
//!  StopStack
//!  Scan(Final) → manifest       ─────────────────────►  needs (usually few: pre-copy staged)
//!  serve wants / file data      ◄────────────────────►  …
//!                               ◄─────────────────────  PassDone
//!  StartStack (downtime ends)
//!  Flag{stack, generation, root, source, target, time} ►  verify → Commit(VerifiedStatus)
//!                               ◄─────────────────────  Result{committed, downtime}
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod delta;
pub mod flag;
pub mod lineage;
pub mod manifest;
pub mod msg;
pub mod path;
pub mod plan;
pub mod session;
pub mod text;
pub mod wire;
