//! One cycle of one stack against one target: the driver around [`SourceSession`].
//!
//! The session decides; this module does what it asks: scans (on a blocking thread, with the
//! stack's hash cache), stops and starts the stack through a [`StackControl`], streams the wanted
//! files on QUIC unidirectional streams (a few at once, windows read with `pread`, deltas made on
//! blocking threads; a big file or a delta alone on its stream, small files up to
//! 128 in a row on one), and carries control messages on one bidirectional stream.
//!
//! Files are opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to the stack
//! root, so a path the target asks for can never lead out of the stack, even if a symlink
//! appeared in the tree after the scan.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use stackclone_common::ScanConfig;
use stackclone_common::coverage::{CoverageError, MountLine};
use stackclone_common::lineage_file;
use stackclone_common::net::{ControlEnd, ControlStream};
use stackclone_common::trees::{Graft, StackTrees};
use stackclone_proto::delta::{CheckedSignature, FileSender, SenderConfig};
use stackclone_proto::lineage::{Claim, HistoryId};
use stackclone_proto::manifest::Manifest;
use stackclone_proto::msg::{Mode, Pass, SourceMsg, TargetMsg};
use stackclone_proto::path::StackPath;
use stackclone_proto::session::{
    CycleError, OnStopTimeout, SourceAction, SourceConfig, SourceReport, SourceSession,
};
use stackclone_proto::wire;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::progress::{CycleProgress, Stage};
use crate::rate::RateLimit;
use stackclone_common::control::StackControl;
use stackclone_common::docker::{StartReport, StopReport};

/// Files streamed at once. Enough to keep a LAN link busy with small files.
const PARALLEL_FILES: usize = 8;

/// Window bytes in flight over all files, in KiB: a file holds `min(size, WINDOW)` of it while
/// it streams. A file with a full 16 MiB window also holds that window's chunks and their frames
/// until they are on the stream, up to about 3 windows in all, so 8 big files at once would need
/// some 400 MiB; this budget lets 3 big files (or any number of small ones up to
/// [`PARALLEL_FILES`]) stream together, which keeps both cores busy and the source's peak RSS
/// under 256 MiB (measured: bench/README.md).
const WINDOW_BUDGET_KIB: u32 = 48 << 10;

/// Messages queued between a file's reader thread and its stream writer: each can be a 4 MiB
/// chunk, and one queued while the writer sends the other is all the overlap there is to gain.
const FILE_QUEUE: usize = 2;

/// Files sent without a basis and at most this long share data streams, up to [`BATCH_FILES`]
/// in a row on one: a stream, a task and a blocking thread per file cost more than the file itself
/// (a first copy of 20,000 small files: bench/README.md, "Issue 18, fourth round").
const SMALL_FILE: u64 = 256 << 10;

/// Most files on one shared data stream.
const BATCH_FILES: usize = 128;

/// Most file bytes on one shared data stream.
const BATCH_BYTES: u64 = 4 << 20;

/// Encoded frames a shared stream's reader gathers before it hands them to the stream writer.
const BATCH_HANDOFF: usize = 256 << 10;

/// Everything one cycle needs to know about its stack.
#[derive(Debug, Clone)]
pub struct StackJob {
    pub stack: String,
    pub path: PathBuf,
    pub exclude: Vec<String>,
    pub precopy: bool,
    pub stop: bool,
    pub allow_empty: bool,
    pub max_delete: f64,
    pub on_stop_timeout: OnStopTimeout,
    pub checksum: bool,
    pub compress: bool,
    /// Bytes per second, or `None` for no limit.
    pub bandwidth_limit: Option<u64>,
    /// Where the stack's hash cache lives.
    pub cache: Option<PathBuf>,
    /// The Compose project to stop and start around the final pass; `None` for data only.
    pub compose: Option<stackclone_common::docker::ComposeConfig>,
    /// `ignore_mounts`: mount (host path or volume) → why the standby does without it.
    pub ignore_mounts: std::collections::BTreeMap<String, String>,
    /// `extra_paths`: outside directories replicated with `path`.
    pub extra_paths: Vec<PathBuf>,
    /// The target's certificate name and address.
    pub target_name: String,
    pub target_addr: std::net::SocketAddr,
    /// `push --replace-diverged` (and every fail-back): replace a target copy of another
    /// history, which the target keeps as a generation.
    pub replace_diverged: bool,
    /// `push --fail-back`: hand the stack over; the target's copy becomes the primary and this
    /// host's stack stays stopped once the target committed.
    pub hand_over: bool,
    /// `on_superseded`: what to do when the target says the stack was promoted there.
    pub on_superseded: stackclone_common::config::OnSuperseded,
    /// This source's record of the data's history, in its state dir (used while the data dir
    /// has no lineage file of its own; see `lineage_file::claim`).
    pub lineage: PathBuf,
    /// The manifest the target last committed from this host, with its generation, in the state
    /// dir: the base the next cycle's manifest goes as changes against (see
    /// `stackclone_proto::manifest::Changes`). Missing or unreadable, the manifest goes whole.
    pub base_record: Option<PathBuf>,
}

/// What one cycle came to, with what the driver measured. A cycle that failed has measured
/// something too: the downtime it caused, the bytes it sent before it ended.
#[derive(Debug, Clone, Default)]
pub struct CycleStats {
    /// The session's report (a failed cycle's has only what was known when it ended).
    pub report: SourceReport,
    /// Payload bytes of file data sent (after compression).
    pub bytes_sent: u64,
    /// From the stop request to the stack running again, when it was stopped.
    pub source_downtime: Option<Duration>,
    /// Services Docker had to kill at their stop timeout when the stack was stopped.
    pub stop_killed: Vec<String>,
    pub duration: Duration,
    /// The stack's mounts as this cycle judged them (empty for a data-only stack, or when
    /// Docker could not be asked).
    pub mounts: Vec<MountLine>,
    /// The history this host's data belongs to, as the cycle claimed it.
    pub history: Option<HistoryId>,
}

/// Why a cycle could not even start, or how it ended badly.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("stack `{stack}`: cannot reach target `{target}` at {addr}: {source}")]
    Connect {
        stack: String,
        target: String,
        addr: std::net::SocketAddr,
        source: stackclone_certs::TrustError,
    },
    #[error("stack `{stack}`: target at {addr} is `{got}`, expected `{expected}`")]
    WrongTarget {
        stack: String,
        addr: std::net::SocketAddr,
        got: String,
        expected: String,
    },
    #[error("stack `{stack}`, peer `{peer}`: connection failed: {source}")]
    Connection {
        stack: String,
        peer: String,
        source: quinn::ConnectionError,
    },
    #[error("stack `{stack}`: cannot control its containers: {cause}")]
    Docker { stack: String, cause: String },
    /// The lineage file at the root of the stack's path could not be read or written.
    #[error(
        "stack `{stack}`: its lineage file ({}) cannot be used: {cause}",
        stackclone_proto::lineage::LINEAGE_FILE
    )]
    Lineage { stack: String, cause: String },
    /// A mount that holds data is neither replicated nor ignored: nothing was stopped.
    #[error(transparent)]
    Mounts(#[from] CoverageError),
    #[error(transparent)]
    Cycle(#[from] CycleError),
}

impl PushError {
    /// The phase the cycle failed in, for metrics and alerts: `connect`, `docker`, or the
    /// protocol phase (`scan`, `transfer`, `commit`, `health`, …).
    pub fn phase(&self) -> String {
        match self {
            PushError::Connect { .. } | PushError::WrongTarget { .. } => "connect".into(),
            PushError::Connection { .. } => "transfer".into(),
            PushError::Docker { .. } => "docker".into(),
            PushError::Lineage { .. } => "lineage".into(),
            PushError::Mounts(_) => "mounts".into(),
            PushError::Cycle(e) => e.phase.to_string(),
        }
    }

    /// The kind of failure, for metrics and logs (see [`Cause::kind`](stackclone_proto::session::Cause::kind)).
    pub fn cause(&self) -> &'static str {
        match self {
            PushError::Connect { .. } => "connect",
            PushError::WrongTarget { .. } => "wrong_target",
            PushError::Connection { .. } => "connection_lost",
            PushError::Docker { .. } => "docker",
            PushError::Lineage { .. } => "lineage",
            PushError::Mounts(_) => "uncovered_mount",
            PushError::Cycle(e) => e.cause.kind(),
        }
    }
}

/// Events from helper tasks back to the session loop.
enum Event {
    Scanned(Pass, Result<Manifest, String>),
    Stopped(Result<StopReport, String>),
    Started(Result<StartReport, String>),
    FileSent {
        id: u32,
        size: u64,
        result: Result<u64, String>,
    },
}

/// The agent-wide things a cycle uses.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub endpoint: quinn::Endpoint,
    /// The client TLS config new connections use; replaced when the certificate is renewed.
    pub client_config: Arc<std::sync::RwLock<quinn::ClientConfig>>,
    pub trust: stackclone_certs::Trust,
    pub source_name: String,
    pub flag_key: SigningKey,
}

impl Ctx {
    /// Makes new connections use `config` (a renewed certificate).
    pub fn set_client_config(&self, config: quinn::ClientConfig) {
        *self
            .client_config
            .write()
            .unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// An endpoint handle whose connections use the current client config.
    fn endpoint(&self) -> quinn::Endpoint {
        let mut endpoint = self.endpoint.clone();
        endpoint.set_default_client_config(
            self.client_config
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
        endpoint
    }
}

/// Runs one cycle of `job` in `mode`, keeping `progress` up to date. What was measured comes
/// back however the cycle ended.
pub async fn run_cycle(
    ctx: &Ctx,
    job: &StackJob,
    mode: Mode,
    control: Arc<dyn StackControl>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    progress: &Arc<CycleProgress>,
) -> (CycleStats, Result<(), PushError>) {
    let started = Instant::now();
    let mut stats = CycleStats::default();
    let result = drive(ctx, job, mode, control, shutdown, progress, &mut stats).await;
    stats.duration = started.elapsed();
    progress.set_stage(Stage::Done);
    (stats, result)
}

async fn drive(
    ctx: &Ctx,
    job: &StackJob,
    mode: Mode,
    control: Arc<dyn StackControl>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    progress: &Arc<CycleProgress>,
    stats: &mut CycleStats,
) -> Result<(), PushError> {
    // Before anything connects or stops: which of the stack's mounts the generation carries,
    // and which history the data belongs to.
    let trees = Arc::new(discover(job, control.as_ref(), stats).await?);
    let history = claim_history(job, mode).map_err(|e| PushError::Lineage {
        stack: job.stack.clone(),
        cause: e.to_string(),
    })?;
    stats.history = Some(history);
    progress.set_stage(Stage::Connect);
    // The server may be of either enrolled role (at fail-back, the old primary receives): what
    // makes it this stack's target is its name, checked below.
    let (conn, admission) = stackclone_certs::connect(&ctx.endpoint(), job.target_addr, &ctx.trust)
        .await
        .map_err(|source| PushError::Connect {
            stack: job.stack.clone(),
            target: job.target_name.clone(),
            addr: job.target_addr,
            source,
        })?;
    if admission.peer.name != job.target_name {
        conn.close(0u32.into(), b"wrong target");
        return Err(PushError::WrongTarget {
            stack: job.stack.clone(),
            addr: job.target_addr,
            got: admission.peer.name,
            expected: job.target_name.clone(),
        });
    }
    let connection_error = |source| PushError::Connection {
        stack: job.stack.clone(),
        peer: job.target_name.clone(),
        source,
    };
    let (ctl_send, ctl_recv) = conn.open_bi().await.map_err(connection_error)?;
    // Control messages from the target are read in their own task so the loop can select on
    // them.
    let mut ctl = ControlStream::<TargetMsg>::new(ctl_send, ctl_recv);

    let mut session = SourceSession::new(
        SourceConfig {
            stack: job.stack.clone(),
            source_id: ctx.source_name.clone(),
            target_id: job.target_name.clone(),
            mode,
            precopy: job.precopy,
            stop_stack: job.stop,
            allow_empty: job.allow_empty,
            max_delete: job.max_delete,
            on_stop_timeout: job.on_stop_timeout,
            claim: Claim {
                history,
                replace_diverged: job.replace_diverged || job.hand_over,
                hand_over: job.hand_over,
            },
            base: job
                .base_record
                .as_deref()
                .and_then(|p| read_base(&job.stack, p)),
        },
        ctx.flag_key.clone(),
    );
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let files = Arc::new(Semaphore::new(PARALLEL_FILES));
    let window_budget = Arc::new(Semaphore::new(WINDOW_BUDGET_KIB as usize));
    let rate = job.bandwidth_limit.map(|bps| Arc::new(RateLimit::new(bps)));
    let mut stopped_at: Option<Instant> = None;
    let mut stop_report: Option<StopReport> = None;
    let mut current_pass = Pass::Precopy;
    let mut shutting_down = *shutdown.borrow();
    if shutting_down {
        session.handle_shutdown();
    }
    let file_ctx = || FileCtx {
        conn: conn.clone(),
        trees: trees.clone(),
        compress: job.compress,
        rate: rate.clone(),
        permits: files.clone(),
        window_budget: window_budget.clone(),
        progress: progress.clone(),
    };
    let small = Arc::new(SmallQueue::default());
    let outcome = loop {
        while let Some(msg) = session.poll_message() {
            if ctl.is_up()
                && let Err(e) = ctl.send(&msg).await
            {
                session.handle_connection_lost(&e.to_string());
            }
        }
        let mut done = None;
        while let Some(action) = session.poll_action() {
            match action {
                SourceAction::Scan { pass } => {
                    progress.set_stage(match pass {
                        Pass::Precopy => Stage::Scan,
                        Pass::Final => Stage::FinalScan,
                    });
                    current_pass = pass;
                    let cfg = ScanConfig {
                        root: job.path.clone(),
                        exclude: job.exclude.clone(),
                        cache: job.cache.clone(),
                        checksum: job.checksum,
                        xattrs: true,
                    };
                    let (tx, trees) = (events_tx.clone(), trees.clone());
                    let allow_empty = job.allow_empty;
                    tokio::task::spawn_blocking(move || {
                        let started = Instant::now();
                        let result = trees
                            .scan(&cfg, allow_empty)
                            .inspect(|m| {
                                debug!(
                                    ?pass,
                                    ms = started.elapsed().as_millis() as u64,
                                    entries = m.len(),
                                    volumes = trees.grafts.len(),
                                    "scanned"
                                );
                            })
                            .map_err(|e| e.to_string());
                        let _ = tx.send(Event::Scanned(pass, result));
                    });
                }
                SourceAction::StopStack => {
                    progress.set_stage(Stage::Stop);
                    stopped_at = Some(Instant::now());
                    let (tx, control) = (events_tx.clone(), control.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Event::Stopped(
                            control.stop().await.map_err(|e| e.to_string()),
                        ));
                    });
                }
                SourceAction::StartStack => {
                    progress.set_stage(Stage::Start);
                    let (tx, control) = (events_tx.clone(), control.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Event::Started(
                            control.start().await.map_err(|e| e.to_string()),
                        ));
                    });
                }
                SourceAction::SendFile {
                    id,
                    path,
                    basis,
                    size,
                    ..
                } => {
                    progress.set_stage(match current_pass {
                        Pass::Precopy => Stage::Transfer,
                        Pass::Final => Stage::FinalTransfer,
                    });
                    progress.file_queued(size);
                    if basis.is_none() && size <= SMALL_FILE {
                        if small.push(Small { id, path, size }) {
                            spawn_batches(file_ctx(), small.clone(), events_tx.clone());
                        }
                        continue;
                    }
                    let ctx = file_ctx();
                    let tx = events_tx.clone();
                    tokio::spawn(async move {
                        let result = send_file(ctx, id, path, size, basis).await;
                        let _ = tx.send(Event::FileSent { id, size, result });
                    });
                }
                SourceAction::Done(result) => done = Some(result),
            }
        }
        if let Some(result) = done {
            // Flush whatever the session queued last (an Abort, say).
            while let Some(msg) = session.poll_message() {
                let _ = ctl.send(&msg).await;
            }
            break result;
        }
        tokio::select! {
            Some(ev) = events.recv() => match ev {
                Event::Scanned(pass, r) => session.handle_scanned(pass, r),
                Event::Stopped(r) => {
                    stop_report = r.as_ref().ok().cloned();
                    if let Some(stop) = &stop_report {
                        stats.stop_killed = stop.killed_services();
                    }
                    session.handle_stack_stopped(r.map(|stop| stop.killed_services()))
                }
                Event::Started(r) => {
                    // The containers' own stop and start times where there are containers;
                    // otherwise the final-pass window.
                    let measured = match (&r, &stop_report) {
                        (Ok(start), Some(stop)) => start.downtime_since(stop),
                        _ => None,
                    };
                    if let Some(at) = stopped_at.take() {
                        stats.source_downtime = Some(measured.unwrap_or_else(|| at.elapsed()));
                    }
                    // The stack is back; what is left is the target's commit.
                    progress.set_stage(Stage::Commit);
                    session.handle_stack_started(r.map(drop))
                }
                Event::FileSent { id, size, result } => {
                    if let Ok(n) = &result {
                        stats.bytes_sent += n;
                        progress.file_done(size);
                    }
                    session.handle_file_sent(id, result.map(|_| ()))
                }
            },
            Ok(()) = shutdown.changed(), if !shutting_down => {
                // SIGTERM or Ctrl-C: end the cycle through the session, which restarts the
                // stack if it is down and tells the target (which commits nothing).
                shutting_down = true;
                session.handle_shutdown();
            },
            msg = ctl.recv() => match msg {
                Ok(m) => session.handle_message(m, unix_now()),
                Err(ControlEnd::Malformed(e)) => session.handle_malformed(&e),
                Err(ControlEnd::Lost(e)) => session.handle_connection_lost(&e),
            },
        }
    };
    // Give the last message (an Abort that tells the target why) a moment to be delivered:
    // closing the connection at once discards what is still unsent. `stopped` resolves when
    // the target has read the stream to its end, or at once if the link is gone.
    let linger = if ctl.is_up() {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    };
    ctl.close(linger).await;
    conn.close(0u32.into(), b"cycle over");
    match outcome {
        Ok(report) if mode == Mode::DryRun => {
            info!(stack = %job.stack, "dry run done");
            stats.report = report;
            Ok(())
        }
        Ok(report) => {
            if let (Some(path), Some(manifest)) = (&job.base_record, session.signed_manifest()) {
                write_base(&job.stack, path, report.generation, manifest);
            }
            info!(
                stack = %job.stack,
                peer = %job.target_name,
                generation = report.generation,
                files = report.files,
                files_sent = report.files_sent,
                bytes_sent = stats.bytes_sent,
                source_downtime_ms = stats.source_downtime.map(|d| d.as_millis() as u64),
                target_downtime_ms = report.target_downtime_ms,
                stop_killed = ?report.stop_killed,
                standby_killed = ?report.standby_killed,
                "cycle committed"
            );
            if report.handed_over {
                // The target runs the stack now: it stays stopped here, for good.
                if let Err(e) = control.hand_over().await {
                    warn!(stack = %job.stack, error = %e, "the stack was handed over, but its restart record could not be removed: remove it, or a recovery starts the stack again");
                }
                warn!(stack = %job.stack, peer = %job.target_name, "handed over: the target runs the stack as its primary now; it stays stopped here");
            }
            stats.report = report;
            Ok(())
        }
        Err(e) => {
            // Logged by the caller, with every other way a cycle can fail.
            Err(e.into())
        }
    }
}

/// Lists the stack's mounts and judges them ([`coverage`](stackclone_common::coverage)): a
/// mount that holds data and is neither replicated nor ignored ends the cycle here, before
/// anything is connected or stopped. The named volumes it replicates become grafts of the
/// stack's tree. A stack without containers yet has no mounts to judge.
/// The base record at `path` (see [`StackJob::base_record`]), if it is there and whole.
fn read_base(stack: &str, path: &Path) -> Option<(u64, Arc<Manifest>)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(stack, path = %path.display(), error = %e, "cannot read the record of the last commit; this cycle sends its whole manifest");
            return None;
        }
    };
    match stackclone_proto::manifest::decode_file(&bytes) {
        Ok((generation, m)) => Some((generation, Arc::new(m))),
        Err(e) => {
            warn!(stack, path = %path.display(), error = %e, "the record of the last commit is damaged; this cycle sends its whole manifest");
            None
        }
    }
}

/// Records `manifest` as committed at `generation` (a temp file renamed over the old record;
/// not synced: a record lost in a crash costs one whole manifest, a torn one is detected).
fn write_base(stack: &str, path: &Path, generation: u64, manifest: &Manifest) {
    let tmp = path.with_extension("manifest.tmp");
    let written = stackclone_proto::manifest::encode_file(generation, manifest)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        warn!(stack, path = %path.display(), error = %e, "cannot record the committed manifest; the next cycle sends its whole manifest");
    }
}

/// The history of the data in `job.path`: its lineage file, else this source's own record (see
/// `lineage_file::claim`). A dry run writes nothing.
fn claim_history(job: &StackJob, mode: Mode) -> std::io::Result<HistoryId> {
    Ok(lineage_file::claim(&job.path, &job.lineage, mode == Mode::Sync)?.history)
}

async fn discover(
    job: &StackJob,
    control: &dyn StackControl,
    stats: &mut CycleStats,
) -> Result<StackTrees, PushError> {
    let mounts = control.mounts().await.map_err(|e| PushError::Docker {
        stack: job.stack.clone(),
        cause: format!("listing the containers' mounts: {e}"),
    })?;
    let path = std::fs::canonicalize(&job.path).unwrap_or_else(|_| job.path.clone());
    let coverage =
        stackclone_common::coverage::classify(&path, &job.extra_paths, &mounts, &job.ignore_mounts);
    for line in &coverage.lines {
        debug!(stack = %job.stack, mount = %line, "mount");
    }
    stats.mounts = coverage.lines.clone();
    coverage.check(&job.stack)?;
    let volumes = coverage
        .volumes
        .into_iter()
        .map(|v| Graft::volume(v.key, v.dir));
    let extra = job.extra_paths.iter().map(|p| Graft::extra_path(p));
    Ok(StackTrees {
        root: job.path.clone(),
        grafts: volumes.chain(extra).collect(),
    })
}

pub(crate) fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

struct FileCtx {
    conn: quinn::Connection,
    trees: Arc<StackTrees>,
    compress: bool,
    rate: Option<Arc<RateLimit>>,
    permits: Arc<Semaphore>,
    window_budget: Arc<Semaphore>,
    progress: Arc<CycleProgress>,
}

/// Streams one file: `FileBegin`, `FileData`…, `FileEnd` (or `FileAbort`) on a new uni stream.
/// Returns the payload bytes sent.
async fn send_file(
    ctx: FileCtx,
    id: u32,
    path: StackPath,
    size: u64,
    basis: Option<CheckedSignature>,
) -> Result<u64, String> {
    // The manifest's size; a file that grew since is still read in windows of at most WINDOW.
    let kib = size
        .min(stackclone_proto::delta::WINDOW as u64)
        .div_ceil(1024)
        .max(1) as u32;
    let mut slot = Slot::open(&ctx, kib).await?;
    let (tx, mut rx) = mpsc::channel::<SourceMsg>(FILE_QUEUE);
    let (trees, compress) = (ctx.trees.clone(), ctx.compress);
    let reader =
        tokio::task::spawn_blocking(move || read_and_diff(&trees, &path, basis, compress, id, &tx));
    let mut sent = 0u64;
    while let Some(msg) = rx.recv().await {
        let frame = wire::encode_frame(&msg).map_err(|e| e.to_string())?;
        sent += frame.len() as u64;
        slot.write(&ctx, &frame).await?;
    }
    let read_result = reader.await.map_err(|e| e.to_string())?;
    slot.close().await?;
    read_result.map(|()| sent)
}

/// One data stream being sent: a place among the [`PARALLEL_FILES`], its share of the window
/// budget, and the stream.
struct Slot<'a> {
    permit: tokio::sync::SemaphorePermit<'a>,
    window: tokio::sync::SemaphorePermit<'a>,
    stream: quinn::SendStream,
}

impl<'a> Slot<'a> {
    /// Waits for a place and `kib` of the window budget (at most all of it), then opens a stream.
    async fn open(ctx: &'a FileCtx, kib: u32) -> Result<Slot<'a>, String> {
        let permit = ctx.permits.acquire().await.map_err(|e| e.to_string())?;
        let window = ctx
            .window_budget
            .acquire_many(kib.min(WINDOW_BUDGET_KIB))
            .await
            .map_err(|e| e.to_string())?;
        let stream = ctx.conn.open_uni().await.map_err(|e| e.to_string())?;
        Ok(Slot {
            permit,
            window,
            stream,
        })
    }

    /// Writes encoded frames, within the bandwidth limit, counting them for the progress.
    async fn write(&mut self, ctx: &FileCtx, frames: &[u8]) -> Result<(), String> {
        if let Some(rate) = &ctx.rate {
            rate.acquire(frames.len() as u64).await;
        }
        ctx.progress.wire_bytes(frames.len() as u64);
        self.stream
            .write_all(frames)
            .await
            .map_err(|e| e.to_string())
    }

    /// Finishes the stream, frees the place and the budget, then waits until the target has
    /// everything, so "sent" means sent.
    async fn close(self) -> Result<(), String> {
        let Slot {
            permit,
            window,
            mut stream,
        } = self;
        stream.finish().map_err(|e| e.to_string())?;
        // Everything is with QUIC now (its send window bounds what is unacknowledged): the next
        // stream may start. Holding the slot until the target acknowledged made each file cost
        // a round trip, which capped small files at PARALLEL_FILES per RTT (≈ 185 files/s on a
        // 40 ms link, bench/README.md).
        drop(window);
        drop(permit);
        let _ = stream.stopped().await;
        Ok(())
    }
}

/// Reads `path` in windows and turns them into messages. On a read error it sends `FileAbort`
/// (the session decides whether that ends the cycle) and reports the error.
fn read_and_diff(
    trees: &StackTrees,
    path: &StackPath,
    basis: Option<CheckedSignature>,
    compress: bool,
    id: u32,
    tx: &mpsc::Sender<SourceMsg>,
) -> Result<(), String> {
    let mut begun = false;
    let mut send = |m| {
        begun |= matches!(m, SourceMsg::FileBegin { .. });
        tx.blocking_send(m)
            .map_err(|_| "the stream writer stopped".to_string())
    };
    let result = read_file(trees, path, basis.as_ref(), compress, id, &mut send).map(drop);
    if let Err(reason) = &result {
        // A file that could not even be opened still begins: a stream must start with
        // `FileBegin`, or the target takes it for a broken peer and ends the cycle.
        if !begun {
            let _ = tx.blocking_send(SourceMsg::FileBegin { id, len: 0 });
        }
        let _ = tx.blocking_send(SourceMsg::FileAbort {
            id,
            reason: reason.clone(),
        });
    }
    result
}

/// Turns the file at `path` into `FileBegin`, `FileData`…, `FileEnd`, handed to `emit` in order
/// (read in windows with `pread`; a delta against `basis` if there is one). Returns whether zstd
/// shrank any of its data. On an error the caller ends the file with `FileAbort`.
fn read_file(
    trees: &StackTrees,
    path: &StackPath,
    basis: Option<&CheckedSignature>,
    compress: bool,
    id: u32,
    emit: &mut impl FnMut(SourceMsg) -> Result<(), String>,
) -> Result<bool, String> {
    let file = trees.open_file(path).map_err(|e| format!("{path}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
    let cfg = SenderConfig {
        zstd_level: compress.then_some(3),
        ..SenderConfig::default()
    };
    let mut sender = FileSender::new(basis, cfg).map_err(|e| e.to_string())?;
    emit(SourceMsg::FileBegin { id, len })?;
    // Never more than the file needs: a 16 MiB buffer per small file is mostly memset.
    let mut window = vec![0u8; (len as usize).min(cfg.window)];
    let mut offset = 0u64;
    let mut shrank = false;
    while offset < len {
        let want = ((len - offset) as usize).min(cfg.window);
        let n =
            read_full_at(&file, &mut window[..want], offset).map_err(|e| format!("{path}: {e}"))?;
        if n == 0 {
            break; // The file shrank while we read it; the hash says what was sent.
        }
        for chunk in sender
            .send_window(&window[..n])
            .map_err(|e| e.to_string())?
        {
            shrank |= chunk.is_zstd();
            emit(SourceMsg::FileData { id, chunk })?;
        }
        offset += n as u64;
    }
    let sent = sender.finish();
    debug!(%path, mode = ?sent.mode, literal = sent.stats.literal, matched = sent.stats.matched, "file sent");
    emit(SourceMsg::FileEnd {
        id,
        hash: sent.hash,
        len: sent.len,
    })?;
    Ok(shrank)
}

/// A small file waiting for a shared stream.
struct Small {
    id: u32,
    path: StackPath,
    size: u64,
}

/// Small files waiting for a shared stream, and how many senders take from them. A sender takes
/// whatever is waiting (up to [`BATCH_FILES`] or [`BATCH_BYTES`]) for its next stream, so the
/// streams get fuller as the target's requests outrun the sending, without a timer.
#[derive(Default)]
struct SmallQueue(std::sync::Mutex<SmallState>);

#[derive(Default)]
struct SmallState {
    files: std::collections::VecDeque<Small>,
    senders: usize,
}

impl SmallQueue {
    /// Queues `f`; true if a sender must be started for it (fewer than [`PARALLEL_FILES`] run).
    fn push(&self, f: Small) -> bool {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        st.files.push_back(f);
        if st.senders < PARALLEL_FILES {
            st.senders += 1;
            return true;
        }
        false
    }

    /// The files for a sender's next stream; empty when there are none, and the sender is
    /// counted out.
    fn take(&self) -> Vec<Small> {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut files = Vec::new();
        let mut bytes = 0u64;
        while files.len() < BATCH_FILES && bytes < BATCH_BYTES {
            let Some(f) = st.files.pop_front() else { break };
            bytes += f.size;
            files.push(f);
        }
        if files.is_empty() {
            st.senders -= 1;
        }
        files
    }
}

/// A sender of small files: streams what is queued, a shared stream at a time, until nothing
/// is; reports each file as sent (or not).
fn spawn_batches(ctx: FileCtx, queue: Arc<SmallQueue>, events: mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        loop {
            let files = queue.take();
            if files.is_empty() {
                return;
            }
            let sizes: Vec<(u32, u64)> = files.iter().map(|f| (f.id, f.size)).collect();
            match send_batch(&ctx, files).await {
                Ok(results) => {
                    for ((id, size), result) in sizes.into_iter().zip(results) {
                        let _ = events.send(Event::FileSent { id, size, result });
                    }
                }
                Err(e) => {
                    for (id, size) in sizes {
                        let result = Err(e.clone());
                        let _ = events.send(Event::FileSent { id, size, result });
                    }
                }
            }
        }
    });
}

/// Streams small files one after the other on one uni stream, read and encoded on one blocking
/// thread. Returns each file's payload bytes, or why it was not sent (it then ended with
/// `FileAbort`); `Err` if the stream itself failed.
async fn send_batch(ctx: &FileCtx, files: Vec<Small>) -> Result<Vec<Result<u64, String>>, String> {
    // The reader holds one file and one handoff at a time.
    let biggest = files.iter().map(|f| f.size).max().unwrap_or(0);
    let kib = (biggest + BATCH_HANDOFF as u64).div_ceil(1024) as u32;
    let mut slot = Slot::open(ctx, kib).await?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(FILE_QUEUE);
    let (trees, compress) = (ctx.trees.clone(), ctx.compress);
    let reader = tokio::task::spawn_blocking(move || read_batch(&trees, &files, compress, &tx));
    while let Some(frames) = rx.recv().await {
        slot.write(ctx, &frames).await?;
    }
    let results = reader.await.map_err(|e| e.to_string())??;
    slot.close().await?;
    Ok(results)
}

/// Reads and encodes the files of one shared stream, handing the frames over in pieces of about
/// [`BATCH_HANDOFF`] bytes (a file that grew since the scan is still read in windows). A file
/// that cannot be read ends with `FileAbort` and the next one follows. Where zstd shrank none
/// of the last [`COMPRESS_MISSES`] files, only every [`COMPRESS_PROBE_EVERY`]th file tries it
/// until one shrinks again: on incompressible data (media, encrypted or already compressed
/// files) zstd costs as long as it does on text.
fn read_batch(
    trees: &StackTrees,
    files: &[Small],
    compress: bool,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Result<Vec<Result<u64, String>>, String> {
    let mut out = Frames {
        buf: Vec::new(),
        sent: 0,
        tx,
    };
    let mut results = Vec::with_capacity(files.len());
    let mut misses = 0usize;
    for (i, f) in files.iter().enumerate() {
        let before = out.sent + out.buf.len() as u64;
        let mut begun = false;
        let mut emit = |m: SourceMsg| -> Result<(), String> {
            begun |= matches!(m, SourceMsg::FileBegin { .. });
            out.push(&m)
        };
        let try_zstd = compress && (misses < COMPRESS_MISSES || i % COMPRESS_PROBE_EVERY == 0);
        match read_file(trees, &f.path, None, try_zstd, f.id, &mut emit) {
            Ok(shrank) => {
                if shrank {
                    misses = 0;
                } else if try_zstd {
                    misses += 1;
                }
                results.push(Ok(out.sent + out.buf.len() as u64 - before));
            }
            Err(reason) => {
                if !begun {
                    out.push(&SourceMsg::FileBegin { id: f.id, len: 0 })?;
                }
                out.push(&SourceMsg::FileAbort {
                    id: f.id,
                    reason: reason.clone(),
                })?;
                results.push(Err(reason));
            }
        }
    }
    out.flush()?;
    Ok(results)
}

/// Encoded frames on their way to a shared stream's writer.
struct Frames<'a> {
    buf: Vec<u8>,
    /// Bytes handed over so far.
    sent: u64,
    tx: &'a mpsc::Sender<Vec<u8>>,
}

impl Frames<'_> {
    fn push(&mut self, m: &SourceMsg) -> Result<(), String> {
        let frame = wire::encode_frame(m).map_err(|e| e.to_string())?;
        self.buf.extend_from_slice(&frame);
        if self.buf.len() >= BATCH_HANDOFF {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        self.sent += buf.len() as u64;
        self.tx
            .blocking_send(buf)
            .map_err(|_| "the stream writer stopped".to_string())
    }
}

/// Files in a row on a shared stream whose data zstd did not shrink before it is tried only on
/// every [`COMPRESS_PROBE_EVERY`]th.
const COMPRESS_MISSES: usize = 8;

/// While zstd does not pay on a shared stream, one file in this many still tries it.
const COMPRESS_PROBE_EVERY: usize = 16;

fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the frames `read_batch` handed over, in order.
    fn decode(pieces: Vec<Vec<u8>>) -> Vec<SourceMsg> {
        let bytes = pieces.concat();
        let mut msgs = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let header: [u8; wire::HEADER_LEN] =
                bytes[at..at + wire::HEADER_LEN].try_into().unwrap();
            let len = wire::frame_len(header, wire::MAX_FRAME).unwrap();
            at += wire::HEADER_LEN;
            msgs.push(wire::decode(&bytes[at..at + len]).unwrap());
            at += len;
        }
        msgs
    }

    /// Runs `read_batch` over `names` in `dir` (ids 0, 1, …) and returns its results and the
    /// messages it produced.
    fn batch(
        dir: &Path,
        names: &[String],
        compress: bool,
    ) -> (Vec<Result<u64, String>>, Vec<SourceMsg>) {
        let trees = StackTrees::data_dir(dir);
        let files: Vec<Small> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Small {
                id: i as u32,
                path: StackPath::new(n.as_bytes().to_vec()).unwrap(),
                size: 0,
            })
            .collect();
        // Room for everything, so the reader never waits on a writer.
        let (tx, mut rx) = mpsc::channel(1024);
        let results = read_batch(&trees, &files, compress, &tx).unwrap();
        drop(tx);
        let mut pieces = Vec::new();
        while let Ok(p) = rx.try_recv() {
            pieces.push(p);
        }
        (results, decode(pieces))
    }

    /// Bytes zstd cannot shrink (an xorshift stream).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_shared_stream_carries_its_files_in_order_and_aborts_only_the_unreadable_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = noise(1, 3000);
        let c = b"third file\n".repeat(50);
        std::fs::write(dir.path().join("a"), &a).unwrap();
        std::fs::write(dir.path().join("c"), &c).unwrap();
        // "b" is in the batch but gone from the disk, as if deleted after the scan.
        let names = ["a", "b", "c"].map(String::from);
        let (results, msgs) = batch(dir.path(), &names, true);

        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        let err = results[1].as_ref().unwrap_err();
        assert!(err.starts_with("b: "), "the error names the file: {err}");

        // Each file: FileBegin, data, then FileEnd (or FileAbort), never interleaved.
        let mut files: Vec<(u32, Vec<&SourceMsg>)> = Vec::new();
        for m in &msgs {
            match m {
                SourceMsg::FileBegin { id, .. } => files.push((*id, vec![m])),
                SourceMsg::FileData { id, .. }
                | SourceMsg::FileEnd { id, .. }
                | SourceMsg::FileAbort { id, .. } => {
                    let (cur, frames) = files.last_mut().expect("a frame before any FileBegin");
                    assert_eq!(cur, id, "file {id}'s frame inside file {cur}");
                    frames.push(m);
                }
                other => panic!("unexpected {other:?} on a data stream"),
            }
        }
        assert_eq!(
            files.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        for (id, content) in [(0usize, &a), (2, &c)] {
            let frames = &files[id].1;
            let Some(SourceMsg::FileEnd { hash, len, .. }) = frames.last() else {
                panic!("file {id} does not end with FileEnd: {frames:?}");
            };
            assert_eq!(*len, content.len() as u64);
            assert_eq!(*hash, stackclone_proto::manifest::Hash::of(content));
        }
        assert!(
            matches!(
                files[1].1[..],
                [
                    SourceMsg::FileBegin { len: 0, .. },
                    SourceMsg::FileAbort { .. }
                ]
            ),
            "{:?}",
            files[1].1
        );
        // The results count each file's frame bytes: together, everything handed over.
        let total: u64 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
        let framed: u64 = [&files[0].1, &files[2].1]
            .iter()
            .flat_map(|f| f.iter())
            .map(|m| wire::encode_frame(*m).unwrap().len() as u64)
            .sum();
        assert_eq!(total, framed);
    }

    #[test]
    fn a_file_that_cannot_be_opened_still_begins_before_it_aborts() {
        let dir = tempfile::tempdir().unwrap();
        let trees = StackTrees::data_dir(dir.path());
        let (tx, mut rx) = mpsc::channel(16);
        let gone = StackPath::new(b"gone".to_vec()).unwrap();
        let err = read_and_diff(&trees, &gone, None, true, 7, &tx).unwrap_err();
        assert!(err.starts_with("gone: "), "{err}");
        drop(tx);
        let mut msgs = Vec::new();
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        assert!(
            matches!(
                msgs[..],
                [
                    SourceMsg::FileBegin { id: 7, len: 0 },
                    SourceMsg::FileAbort { id: 7, .. }
                ]
            ),
            "{msgs:?}"
        );
    }

    #[test]
    fn zstd_is_tried_on_every_sixteenth_file_while_it_does_not_pay_and_again_once_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"the same line, over and over\n".repeat(40);
        let mut names = Vec::new();
        for i in 0..40 {
            let name = format!("f{i:02}");
            // Noise, except files 20, 32 and 33, which compress well.
            let content = if [20, 32, 33].contains(&i) {
                text.clone()
            } else {
                noise(i as u64 + 7, text.len())
            };
            std::fs::write(dir.path().join(&name), content).unwrap();
            names.push(name);
        }
        let (results, msgs) = batch(dir.path(), &names, true);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let zstd_files: Vec<u32> = msgs
            .iter()
            .filter_map(|m| match m {
                SourceMsg::FileData { id, chunk } if chunk.is_zstd() => Some(*id),
                _ => None,
            })
            .collect();
        // 8 misses in a row stop the tries; file 20 is no probe (20 % 16 ≠ 0) and goes raw,
        // file 32 is one and shrinks, so file 33 is tried again.
        assert_eq!(zstd_files, [32, 33]);

        // Without compression nothing is tried at all.
        let (_, msgs) = batch(dir.path(), &names, false);
        assert!(
            msgs.iter()
                .all(|m| !matches!(m, SourceMsg::FileData { chunk, .. } if chunk.is_zstd()))
        );
    }
}
