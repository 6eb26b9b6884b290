//! One cycle per stack at a time, across processes: the daemon's scheduled cycles and any
//! number of one-shot `push` runs take the same lock before touching a stack.
//!
//! The lock is an `flock` on `<state_dir>/<stack>.lock`. The kernel drops it when the holder's
//! file is closed, so a killed process never leaves a stack locked; no stale-lock cleanup is
//! needed. Locks are per open file, so two tasks of one process exclude each other too. The file
//! holds the holder's pid and start time (informational only: it makes the "busy" message say
//! who holds the lock).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{FlockOperation, flock};

/// A held stack lock; released when dropped.
#[derive(Debug)]
pub struct StackLock {
    file: File,
    path: PathBuf,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "stack `{stack}` is busy: another cycle of it is running{holder}; try again when it has \
         ended (or pass --wait)"
    )]
    Busy { stack: String, holder: String },
    #[error("stack `{stack}`: cannot open its lock file {}: {source}", path.display())]
    Io {
        stack: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StackLock {
    /// Takes the lock of `stack` or says at once who holds it.
    pub fn try_acquire(state_dir: &Path, stack: &str) -> Result<StackLock, LockError> {
        let path = state_dir.join(format!("{stack}.lock"));
        let io = |source| LockError::Io {
            stack: stack.to_owned(),
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let text = text.trim();
                let holder = if text.is_empty() {
                    String::new()
                } else {
                    format!(" ({text})")
                };
                return Err(LockError::Busy {
                    stack: stack.to_owned(),
                    holder,
                });
            }
            Err(e) => return Err(io(e.into())),
        }
        // Best effort: the note is only for the message above.
        let note = format!(
            "pid {} since {}",
            std::process::id(),
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        );
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(note.as_bytes());
        Ok(StackLock { file, path })
    }

    /// Takes the lock, waiting (polling every `poll`) while another cycle holds it, until
    /// `give_up` turns true.
    pub async fn acquire_waiting(
        state_dir: &Path,
        stack: &str,
        poll: Duration,
        mut give_up: tokio::sync::watch::Receiver<bool>,
    ) -> Result<StackLock, LockError> {
        let mut said = false;
        loop {
            match StackLock::try_acquire(state_dir, stack) {
                Err(LockError::Busy { holder, .. }) if !*give_up.borrow() => {
                    if !said {
                        tracing::info!(stack, "waiting for the cycle under way{holder} to end");
                        said = true;
                    }
                }
                other => return other,
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                _ = give_up.changed() => {}
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StackLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        // Closing the file releases the lock; unlock first so a waiter never reads our note.
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StackLock::try_acquire(dir.path(), "app").expect("free");
        let err = StackLock::try_acquire(dir.path(), "app").expect_err("held");
        let text = err.to_string();
        assert!(matches!(err, LockError::Busy { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("stack `app` is busy"), "{text}");
        // Another stack is independent.
        let _other = StackLock::try_acquire(dir.path(), "db").expect("other stack");
        drop(first);
        let _again = StackLock::try_acquire(dir.path(), "app").expect("released on drop");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_when_it_is_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StackLock::try_acquire(dir.path(), "app").expect("free");
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let path = dir.path().to_owned();
        let waiter = tokio::spawn(async move {
            StackLock::acquire_waiting(&path, "app", Duration::from_millis(10), rx).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "took a held lock");
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("in time")
            .expect("joined");
        assert!(got.is_ok(), "{got:?}");
    }

    #[tokio::test]
    async fn a_waiter_gives_up_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = StackLock::try_acquire(dir.path(), "app").expect("free");
        let (tx, rx) = tokio::sync::watch::channel(false);
        let path = dir.path().to_owned();
        let waiter = tokio::spawn(async move {
            StackLock::acquire_waiting(&path, "app", Duration::from_secs(60), rx).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("in time")
            .expect("joined");
        assert!(matches!(got, Err(LockError::Busy { .. })), "{got:?}");
    }
}
