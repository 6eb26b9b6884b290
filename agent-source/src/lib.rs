//! # stackclone-source: the source agent
//!
//! Drives [`stackclone_proto::session::SourceSession`] over mutual-TLS QUIC: scans the stack,
//! stops it for the final pass, streams what the target asks for, signs the generation with the
//! flag key and starts the stack again. `main.rs` parses flags and calls into this library.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod app;
pub mod daemon;
pub mod lock;
pub mod progress;
pub mod push;
pub mod rate;
pub mod status;
