//! The file side of a cycle: the files the session wants arrive on unidirectional data streams,
//! a big file or a delta alone on its stream, small files several in a row on one (each
//! `FileBegin`, `FileData`…, `FileEnd` or `FileAbort`). Each stream's files are rebuilt in
//! staging in order on one blocking thread, against the live basis when the session sent a
//! signature, and verified by their BLAKE3 before they count. A stream that is no valid transfer
//! is reported to the session as a [`BadStream`], which decides what it means. Also the basis
//! signatures the session asks for.

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

/// How one file on a data stream ended: staged (or not), or a stream that is no valid transfer,
/// for the session to judge.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    Staged { id: u32, outcome: StageOutcome },
    Bad(BadStream),
}

/// Frame bytes of small files the stream reader gathers before it hands them to the stream's
/// rebuild thread in one go: one handoff per small file, or per this many bytes of a big one.
/// Each frame counts at least [`ITEM_BYTES`], so a stream of tiny frames cannot pile up items.
/// With [`STREAM_QUEUE`] it bounds what a stream holds in memory (a chunk is at most 4 MiB, so a
/// batch is at most this plus one chunk).
const HANDOFF_BYTES: usize = 256 << 10;

/// What a frame counts towards [`HANDOFF_BYTES`] at least (about what an item costs in memory).
const ITEM_BYTES: usize = 128;

/// Batches queued between a stream's reader and its rebuild thread.
const STREAM_QUEUE: usize = 4;

/// Accepts the source's data streams for the whole connection, rebuilding each file in staging;
/// `report` hears how each file ended, and of a stream that is no valid transfer. `received`
/// counts the bytes of file data that arrived.
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
        tokio::spawn(receive_stream(stream, store, wanted, received, report));
    }
}

/// What a stream's reader hands its rebuild thread.
enum Item {
    /// The next file starts (its `FileBegin`, checked against what the session wants).
    Begin { id: u32, wanted: Wanted, len: u64 },
    /// One of the current file's frames: `FileData`, then `FileEnd` or `FileAbort`.
    Frame(SourceMsg),
}

/// Receives one data stream: one file or several in a row, each `FileBegin`, `FileData`…,
/// `FileEnd` or `FileAbort`. Files are rebuilt in order on one blocking thread, which reports
/// each as it is done. A stream that ends between files is over; one that ends inside a file
/// reports that file as cut off; a frame that breaks the layout ends the stream with a
/// [`BadStream`] (and the file it interrupted is not reported). A stream that ends before its
/// first frame reports nothing: the connection went, and the control stream tells the session.
async fn receive_stream(
    mut stream: quinn::RecvStream,
    store: Arc<Mutex<Option<StackStore>>>,
    wanted: Arc<Mutex<HashMap<u32, Wanted>>>,
    received: Arc<AtomicU64>,
    report: impl Fn(StreamEnd) + Clone + Send + 'static,
) {
    // Batches go to the blocking thread through an async channel: a full channel waits without
    // holding a runtime thread while the rebuild is in disk I/O. The thread starts with the
    // first wanted file: a stream that never brings one holds none.
    let mut rebuilder: Option<Rebuilder> = None;
    let mut batch: Vec<Item> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut current: Option<u32> = None;
    let mut bad = None;
    loop {
        let msg = match net::recv::<SourceMsg>(&mut stream).await {
            Ok(Some(msg)) => msg,
            // Finished between files: the stream is done.
            Ok(None) if current.is_none() => break,
            Err(e) if current.is_none() => {
                if let ControlEnd::Malformed(what) = ControlEnd::of(Err(e)) {
                    bad = Some(BadStream::NoBegin(what));
                }
                break;
            }
            // Inside a file: the rebuild thread finds its frames cut short.
            Ok(None) | Err(_) => break,
        };
        let last = match current {
            None => {
                let SourceMsg::FileBegin { id, len } = msg else {
                    bad = Some(BadStream::NoBegin(msg.name().into()));
                    break;
                };
                let Some(w) = wanted.lock().ok().and_then(|mut w| w.remove(&id)) else {
                    bad = Some(BadStream::NotWanted { id });
                    break;
                };
                current = Some(id);
                rebuilder.get_or_insert_with(|| Rebuilder::start(&store, &report));
                batch.push(Item::Begin { id, wanted: w, len });
                batch_bytes += ITEM_BYTES;
                false
            }
            Some(id) => {
                let stream_id = match &msg {
                    SourceMsg::FileData { id, chunk } => {
                        let n = chunk.wire_len() + 1;
                        received.fetch_add(n as u64, Ordering::Relaxed);
                        batch_bytes += n.max(ITEM_BYTES);
                        Some(*id)
                    }
                    SourceMsg::FileEnd { id, .. } | SourceMsg::FileAbort { id, .. } => Some(*id),
                    _ => None,
                };
                if stream_id != Some(id) {
                    // Another file's message, or a control message, on this file's stream.
                    bad = Some(BadStream::Foreign {
                        id,
                        got: msg.name(),
                    });
                    break;
                }
                let last = !matches!(msg, SourceMsg::FileData { .. });
                if last {
                    batch_bytes += ITEM_BYTES;
                }
                batch.push(Item::Frame(msg));
                if last {
                    current = None;
                }
                last
            }
        };
        if last || batch_bytes >= HANDOFF_BYTES {
            batch_bytes = 0;
            let Some(r) = &rebuilder else { break };
            if r.tx.send(std::mem::take(&mut batch)).await.is_err() {
                break;
            }
        }
    }
    if let Some(Rebuilder { tx, worker }) = rebuilder {
        // A file interrupted by a bad frame is dropped with the stream; its partial batch goes
        // nowhere and the rebuild thread sees its frames end.
        if bad.is_none() && !batch.is_empty() {
            let _ = tx.send(batch).await;
        }
        drop(tx);
        let cut = worker.await.unwrap_or_else(|e| {
            // The rebuild thread is gone (the runtime is shutting down): what it held is lost.
            current.map(|id| (id, StageOutcome::Failed(e.to_string())))
        });
        if let Some((id, outcome)) = cut
            && bad.is_none()
        {
            report(StreamEnd::Staged { id, outcome });
        }
    }
    if let Some(bad) = bad {
        report(StreamEnd::Bad(bad));
    }
}

/// A stream's rebuild thread and the channel to it.
struct Rebuilder {
    tx: tokio::sync::mpsc::Sender<Vec<Item>>,
    worker: tokio::task::JoinHandle<Option<(u32, StageOutcome)>>,
}

impl Rebuilder {
    fn start(
        store: &Arc<Mutex<Option<StackStore>>>,
        report: &(impl Fn(StreamEnd) + Clone + Send + 'static),
    ) -> Rebuilder {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Item>>(STREAM_QUEUE);
        let (store, report) = (store.clone(), report.clone());
        let worker = tokio::task::spawn_blocking(move || rebuild_stream(&store, rx, &report));
        Rebuilder { tx, worker }
    }
}

/// The rebuild thread of one stream: rebuilds its files in order and reports each that ends
/// (`FileEnd`, `FileAbort`, or a frame the rebuild refuses); returns the file whose frames were
/// cut off by the end of the stream, if one was, for the reader to judge.
fn rebuild_stream(
    store: &Mutex<Option<StackStore>>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Item>>,
    report: &impl Fn(StreamEnd),
) -> Option<(u32, StageOutcome)> {
    let mut frames = Frames {
        rx: &mut rx,
        batch: std::collections::VecDeque::new(),
    };
    while let Some(item) = frames.next_item() {
        // Frames of a file whose rebuild already ended (a bad chunk) are skipped.
        let Item::Begin { id, wanted, len } = item else {
            continue;
        };
        let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rebuild(store, wanted, len, &mut frames)
        }))
        .unwrap_or_else(|_| {
            Rebuilt::Ended(StageOutcome::Failed(format!(
                "rebuilding file {id} in staging panicked"
            )))
        });
        match rebuilt {
            Rebuilt::Ended(outcome) => report(StreamEnd::Staged { id, outcome }),
            Rebuilt::Cut(outcome) => return Some((id, outcome)),
        }
    }
    None
}

/// The items of a stream, one at a time, as batches arrive.
struct Frames<'a> {
    rx: &'a mut tokio::sync::mpsc::Receiver<Vec<Item>>,
    batch: std::collections::VecDeque<Item>,
}

impl Frames<'_> {
    fn next_item(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.batch.pop_front() {
                return Some(item);
            }
            self.batch = self.rx.blocking_recv()?.into();
        }
    }

    /// The current file's next frame; `None` where its frames end without `FileEnd` or
    /// `FileAbort` (the stream was cut; the reader never puts another `Begin` before those).
    fn next_frame(&mut self) -> Option<SourceMsg> {
        match self.next_item()? {
            Item::Frame(msg) => Some(msg),
            Item::Begin { .. } => None,
        }
    }
}

/// How the rebuild of one file ended.
enum Rebuilt {
    /// At its `FileEnd` or `FileAbort`, or at a frame it refused.
    Ended(StageOutcome),
    /// Its frames stopped short: the stream ended inside the file.
    Cut(StageOutcome),
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
    frames: &mut Frames<'_>,
) -> Rebuilt {
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
        Ok((basis, Ok(file))) => apply(basis, file, len, frames),
        Ok((basis, Err(patch))) => apply(basis, patch, len, frames),
        Err(e) => Rebuilt::Ended(StageOutcome::Failed(e)),
    }
}

fn apply(
    mut basis: Option<BasisFile>,
    mut sink: impl Staged,
    len: u64,
    frames: &mut Frames<'_>,
) -> Rebuilt {
    let mut receiver = FileReceiver::new(basis.as_ref().map(|b| b.len()), len);
    let mut no_basis = NoBasis;
    while let Some(msg) = frames.next_frame() {
        let chunk = match msg {
            SourceMsg::FileData { chunk, .. } => chunk,
            SourceMsg::FileEnd { hash, .. } => {
                return Rebuilt::Ended(match receiver.finish(&mut sink, hash) {
                    Ok(v) => match sink.persist(&v) {
                        Ok(_) => StageOutcome::Staged(v),
                        Err(e) => StageOutcome::Failed(e.to_string()),
                    },
                    Err(_) => match sink.discard() {
                        Some(local) => StageOutcome::Failed(local.to_string()),
                        None => StageOutcome::Mismatch,
                    },
                });
            }
            SourceMsg::FileAbort { reason, .. } => {
                return Rebuilt::Ended(StageOutcome::SourceAborted(reason));
            }
            _ => return Rebuilt::Ended(StageOutcome::Mismatch),
        };
        let applied = match basis.as_mut() {
            Some(b) => receiver.handle_chunk(chunk, b, &mut sink),
            None => receiver.handle_chunk(chunk, &mut no_basis, &mut sink),
        };
        if applied.is_err() {
            return Rebuilt::Ended(match sink.discard() {
                Some(local) => StageOutcome::Failed(local.to_string()),
                None => StageOutcome::Mismatch,
            });
        }
    }
    // Cut off: a local failure on the way still says more than the cut.
    Rebuilt::Cut(match sink.discard() {
        Some(local) => StageOutcome::Failed(local.to_string()),
        None => StageOutcome::SourceAborted("the file stream ended early".into()),
    })
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
