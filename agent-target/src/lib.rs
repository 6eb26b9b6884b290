//! `stackclone-target`: the target agent, which receives a stack's generations from a source,
//! stages them beside the live data dir and commits each one atomically.
//!
//! - [`store`]: the on-disk side of one stack (staging, journaled commit, generations,
//!   rollback, verify), without network or Docker.
//! - [`serve`]: the QUIC side: accepts sources and drives a `TargetSession` per connection.
//! - `standby`: the standby's stack around a cycle (stop, commit, bring up, roll back).
//! - [`app`]: the commands of the binary, as library calls.
//! - [`daemon`]: `run` as a service: config reload on SIGHUP, the staleness watch
//!   ([`staleness`]), metrics, alerts and certificate renewal around [`serve`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod app;
pub mod daemon;
pub mod serve;
pub mod staleness;
mod standby;
pub mod store;
