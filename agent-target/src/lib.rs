//! `stackclone-target`: the target agent, which receives a stack's generations from a source,
//! stages them beside the live data dir and commits each one atomically.
//!
//! - [`store`]: the on-disk side of one stack (staging, journaled commit, generations,
//!   rollback, verify), without network or Docker.
//! - [`ctx`]: what the running target knows across connections: the stacks it serves, who
//!   holds each, refused peers, shutdown.
//! - [`serve`]: the QUIC side: accepts and admits sources, one cycle per connection.
//! - `cycle`: the driver of one cycle, a struct that does what the `TargetSession` asks, one
//!   event at a time; `receive`: the file streams, rebuilt and verified in staging;
//!   `report`: the log line, metrics, staleness and alerts of a cycle.
//! - `standby`: the standby's stack around a cycle (stop, commit, bring up, roll back).
//! - [`app`]: the commands of the binary, as library calls.
//! - [`daemon`]: `run` as a service: config reload on SIGHUP, the staleness watch
//!   ([`staleness`]), metrics, alerts and certificate renewal around [`serve`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod app;
pub mod ctx;
mod cycle;
pub mod daemon;
mod receive;
mod report;
pub mod serve;
pub mod staleness;
mod standby;
pub mod store;
