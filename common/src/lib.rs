//! The I/O both stackclone agents share, written once: the tree scanner and its hash cache, the
//! config files, QUIC framing, Docker control, alerts and metrics.
//!
//! `stackclone-proto` is sans-IO and never touches the disk, the network or Docker; this crate is
//! where a stack's data dir on disk becomes a [`Manifest`](stackclone_proto::manifest::Manifest). The source scans to
//! decide what to send; the target scans to know what its basis is and whether its own
//! containers changed files since the last commit.
//!
//! What it owns:
//! - [`scan`](fn@scan): walk a root, never following a symlink below it and staying on the root's file
//!   system (`rsync -x`), apply gitignore-style excludes, read metadata, `user.*` xattrs and
//!   hardlinks, and hash content with BLAKE3 in a fixed 1 MiB buffer (no mmap).
//! - [`cache`]: the persisted hash cache ([`CacheStatus`] reports what happened to it), so a scan of
//!   an unchanged tree costs one `lstat` per path and no reads.
//! - [`LocalFacts`]: device, inode, size, mtime and ctime behind each entry, kept in the [`Scan`]
//!   so a later "did this path change since the scan" check is one `lstat`
//!   ([`LocalFacts::still_match`]).
//! - [`alert`] and [`metrics`]: Telegram / ntfy / webhook alerts; Prometheus metrics on
//!   `/metrics` and a Pushgateway push.
//! - [`config`]: load and check `source.toml` / `target.toml` and their `conf.d/` stack files.
//! - [`compose_file`]: what Compose reads in a project dir (which files, `.env`), and from those
//!   files the services' dependencies and the named volumes, without running Compose.
//! - [`docker`]: stop, start, health-check and create a Compose stack through the Docker API;
//!   [`control`]: the trait both agents drive a stack through, with its reports and errors.
//! - [`net`]: wire frames over QUIC streams, bounded before allocation.
//!
//! What it does not do: no writes below a scanned root (the scanner's only write is its cache
//! file, atomically; the target's writes live in `stackclone-target`'s store), and no decisions
//! about what to sync — that is `proto`'s.
//!
//! Decisions worth knowing:
//! - Sockets, fifos and block/char devices are not entries: a data dir holds them only as
//!   run-time artefacts of a live process (a Postgres socket, a pipe), recreating them on the
//!   standby is meaningless or harmful, and `Manifest` has no kind for them. They are listed in
//!   [`ScanStats::skipped`] with the reason, so a person can see they were left out.
//! - A directory on another file system (a mount point below the root) is an empty directory
//!   entry and is listed in `skipped`; its content is not scanned. A *file* on another file
//!   system (a single-file bind mount) is an ordinary entry.
//! - A file that cannot be opened or read is an error, not a skip: the sync must never send a
//!   tree with holes. A path that disappears between `readdir` and `lstat` is simply gone
//!   (listed as [`SkipReason::Vanished`]).
//! - The root itself may be reached through symlinks (it is canonicalised once); nothing below it
//!   is followed: `lstat` for metadata, directories and files opened with `O_NOFOLLOW` and checked
//!   by `fstat` to be the inode `lstat` saw.
//! - A hardlinked inode is hashed once; its paths share a `link_group` only if at least two of
//!   them are in the tree.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod alert;
pub mod cache;
pub mod compose_file;
pub mod config;
pub mod control;
pub mod coverage;
pub mod docker;
pub mod lineage_file;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod scan;
pub mod schedule;
pub mod trees;

pub use cache::CacheStatus;
pub use scan::{
    LocalFacts, Scan, ScanConfig, ScanError, ScanStats, SkipReason, Skipped, Unchanged, scan,
};
