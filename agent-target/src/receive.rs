//! The file side of a cycle: each file the session wants arrives on its own unidirectional
//! stream (`FileBegin`, `FileData`…, `FileEnd` or `FileAbort`) and is rebuilt in staging on a
//! blocking thread, against the live basis when the session sent a signature, and verified by
//! its BLAKE3 before it counts. A stream that is no valid transfer is reported to the session as
//! a [`BadStream`], which decides what it means. Also the basis signatures the session asks for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use stackclone_common::net::{self, ControlEnd};
use stackclone_proto::delta::{FileReceiver, SignatureBuilder, Verified};
use stackclone_proto::msg::SourceMsg;
use stackclone_proto::path::StackPath;
use stackclone_proto::session::{BadStream, StageOutcome};

use crate::store::{BasisFile, PatchFile, StackStore, StagingFile, StoreError};

/// Bytes read at a time to compute a basis signature.
const SIGNATURE_READ: usize = 1 << 20;

pub(crate) fn with_store<T>(
    store: &Mutex<Option<StackStore>>,
    f: impl FnOnce(&StackStore) -> Result<T, StoreError>,
) -> Result<T, String> {
    let guard = store
        .lock()
        .map_err(|_| "stack store lock poisoned".to_string())?;
    let st = guard.as_ref().ok_or("the stack store is not open")?;
    f(st).map_err(|e| e.to_string())
}

/// The delta signature of a live file, read in chunks (memory: the signature only).
pub(crate) fn signature(
    store: &Mutex<Option<StackStore>>,
    path: &StackPath,
) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let basis = with_store(store, |s| s.open_basis(path))?;
    let mut builder = SignatureBuilder::new(basis.len());
    // Whole blocks, about 1 MiB at a time, and never more than the file.
    let block = builder.block_size() as usize;
    let chunk = (SIGNATURE_READ / block).max(1) * block;
    let mut buf = vec![0u8; chunk.min(basis.len() as usize)];
    let mut at = 0u64;
    while at < basis.len() {
        let n = ((basis.len() - at) as usize).min(chunk);
        basis
            .file()
            .read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("{path}: {e}"))?;
        builder.update(&buf[..n]);
        at += n as u64;
    }
    Ok(builder.finish())
}

/// How one data stream ended: a file staged (or not), or a stream that is no valid transfer,
/// for the session to judge.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    Staged { id: u32, outcome: StageOutcome },
    Bad(BadStream),
}

/// Accepts the source's file streams for the whole connection, rebuilding each in staging;
/// `report` hears how each ended. `received` counts the bytes of file data that arrived.
pub(crate) async fn accept_files(
    conn: quinn::Connection,
    store: Arc<Mutex<Option<StackStore>>>,
    wanted: Arc<Mutex<HashMap<u32, Wanted>>>,
    received: Arc<AtomicU64>,
    report: impl Fn(StreamEnd) + Clone + Send + 'static,
) {
    while let Ok(stream) = conn.accept_uni().await {
        let (store, wanted, report) = (store.clone(), wanted.clone(), report.clone());
        let received = received.clone();
        tokio::spawn(async move {
            if let Some(end) = receive_file(stream, store, wanted, received).await {
                report(end);
            }
        });
    }
}

/// Receives one file stream into staging. `None` if the stream ended before its first frame
/// (the connection went; the control stream tells the session).
async fn receive_file(
    mut stream: quinn::RecvStream,
    store: Arc<Mutex<Option<StackStore>>>,
    wanted: Arc<Mutex<HashMap<u32, Wanted>>>,
    received: Arc<AtomicU64>,
) -> Option<StreamEnd> {
    let first = match net::recv::<SourceMsg>(&mut stream).await {
        Ok(Some(first)) => first,
        Ok(None) => return None,
        Err(e) => {
            return match ControlEnd::of(Err(e)) {
                ControlEnd::Malformed(what) => Some(StreamEnd::Bad(BadStream::NoBegin(what))),
                ControlEnd::Lost(_) => None,
            };
        }
    };
    let SourceMsg::FileBegin { id, len } = first else {
        return Some(StreamEnd::Bad(BadStream::NoBegin(first.name().into())));
    };
    let Some(wanted) = wanted.lock().ok()?.remove(&id) else {
        return Some(StreamEnd::Bad(BadStream::NotWanted { id }));
    };
    // Frames go to the blocking worker through an async channel: a full channel waits without
    // holding a runtime thread while the worker is in disk I/O.
    let (tx, rx) = tokio::sync::mpsc::channel::<SourceMsg>(4);
    let worker = tokio::task::spawn_blocking(move || rebuild(&store, wanted, len, rx));
    let mut outcome = None;
    loop {
        match net::recv::<SourceMsg>(&mut stream).await {
            Ok(Some(msg)) => {
                let stream_id = match &msg {
                    SourceMsg::FileData { id, chunk } => {
                        received.fetch_add(chunk.wire_len() as u64 + 1, Ordering::Relaxed);
                        Some(*id)
                    }
                    SourceMsg::FileEnd { id, .. } | SourceMsg::FileAbort { id, .. } => Some(*id),
                    _ => None,
                };
                if stream_id != Some(id) {
                    // Another file's message, or a control message, on this file's stream.
                    drop(tx);
                    let _ = worker.await;
                    return Some(StreamEnd::Bad(BadStream::Foreign {
                        id,
                        got: msg.name(),
                    }));
                }
                let last = !matches!(msg, SourceMsg::FileData { .. });
                if tx.send(msg).await.is_err() {
                    break;
                }
                if last {
                    break;
                }
            }
            Ok(None) | Err(_) => {
                outcome = Some(StageOutcome::SourceAborted(
                    "the file stream ended early".into(),
                ));
                break;
            }
        }
    }
    drop(tx);
    let rebuilt = worker
        .await
        .unwrap_or_else(|e| StageOutcome::Failed(e.to_string()));
    let outcome = outcome
        .filter(|_| !matches!(rebuilt, StageOutcome::Failed(_)))
        .unwrap_or(rebuilt);
    Some(StreamEnd::Staged { id, outcome })
}

/// What a rebuild writes into: a whole file in staging, or a patch of the live file.
trait Staged: stackclone_proto::delta::Sink {
    fn persist(self, v: &Verified) -> Result<stackclone_proto::manifest::Hash, StoreError>;
    fn discard(self) -> Option<StoreError>;
}

impl Staged for StagingFile {
    fn persist(self, v: &Verified) -> Result<stackclone_proto::manifest::Hash, StoreError> {
        StagingFile::persist(self, v)
    }
    fn discard(self) -> Option<StoreError> {
        StagingFile::discard(self)
    }
}

impl Staged for PatchFile {
    fn persist(self, v: &Verified) -> Result<stackclone_proto::manifest::Hash, StoreError> {
        PatchFile::persist(self, v)
    }
    fn discard(self) -> Option<StoreError> {
        PatchFile::discard(self)
    }
}

/// Where one wanted file goes, as the session asked.
#[derive(Debug, Clone)]
pub(crate) struct Wanted {
    pub(crate) path: StackPath,
    pub(crate) basis: Option<StackPath>,
    pub(crate) in_place: bool,
}

/// Applies a file's chunks into staging (a new file, or a patch of the live file) and verifies
/// it.
fn rebuild(
    store: &Mutex<Option<StackStore>>,
    wanted: Wanted,
    len: u64,
    rx: tokio::sync::mpsc::Receiver<SourceMsg>,
) -> StageOutcome {
    let opened = with_store(store, |s| match (&wanted.basis, wanted.in_place) {
        (Some(_), true) => {
            let (basis, patch) = s.create_patch_file(&wanted.path)?;
            Ok((Some(basis), Err(patch)))
        }
        (basis, _) => {
            let basis = basis.as_ref().map(|b| s.open_basis(b)).transpose()?;
            Ok((basis, Ok(s.create_staging_file()?)))
        }
    });
    match opened {
        Ok((basis, Ok(file))) => apply(basis, file, len, rx),
        Ok((basis, Err(patch))) => apply(basis, patch, len, rx),
        Err(e) => StageOutcome::Failed(e),
    }
}

fn apply(
    mut basis: Option<BasisFile>,
    mut sink: impl Staged,
    len: u64,
    mut rx: tokio::sync::mpsc::Receiver<SourceMsg>,
) -> StageOutcome {
    let mut receiver = FileReceiver::new(basis.as_ref().map(|b| b.len()), len);
    let mut no_basis = NoBasis;
    while let Some(msg) = rx.blocking_recv() {
        let chunk = match msg {
            SourceMsg::FileData { chunk, .. } => chunk,
            SourceMsg::FileEnd { hash, .. } => {
                return match receiver.finish(&mut sink, hash) {
                    Ok(v) => match sink.persist(&v) {
                        Ok(_) => StageOutcome::Staged(v),
                        Err(e) => StageOutcome::Failed(e.to_string()),
                    },
                    Err(_) => match sink.discard() {
                        Some(local) => StageOutcome::Failed(local.to_string()),
                        None => StageOutcome::Mismatch,
                    },
                };
            }
            SourceMsg::FileAbort { reason, .. } => return StageOutcome::SourceAborted(reason),
            _ => return StageOutcome::Mismatch,
        };
        let applied = match basis.as_mut() {
            Some(b) => receiver.handle_chunk(chunk, b, &mut sink),
            None => receiver.handle_chunk(chunk, &mut no_basis, &mut sink),
        };
        if applied.is_err() {
            return match sink.discard() {
                Some(local) => StageOutcome::Failed(local.to_string()),
                None => StageOutcome::Mismatch,
            };
        }
    }
    StageOutcome::SourceAborted("the file stream ended early".into())
}

/// A literal-only transfer never reads a basis.
struct NoBasis;

impl stackclone_proto::delta::Basis for NoBasis {
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no basis",
        ))
    }
}
