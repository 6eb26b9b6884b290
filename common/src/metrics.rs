//! Prometheus metrics both agents expose: one [`Metrics`] registry, a minimal `/metrics` HTTP
//! server ([`serve`]) and a Pushgateway push for one-shot runs ([`push_gateway`]).
//!
//! The series (all per `stack` unless said otherwise):
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `stackclone_last_success_timestamp_seconds` | gauge | when the last cycle committed (Unix seconds) |
//! | `stackclone_generation` | gauge | the last committed generation |
//! | `stackclone_cycle_duration_seconds` | gauge | wall time of the last successful cycle |
//! | `stackclone_source_downtime_seconds` | gauge | how long the last cycle kept the source stack stopped |
//! | `stackclone_target_downtime_seconds` | gauge | how long the last commit kept the target stack stopped |
//! | `stackclone_bytes_sent_total` | counter | bytes put on the wire |
//! | `stackclone_bytes_matched_total` | counter | file bytes the target rebuilt from its basis |
//! | `stackclone_bytes_literal_total` | counter | file bytes sent as literal data |
//! | `stackclone_files_changed_total` | counter | files created, changed or deleted by commits |
//! | `stackclone_cycle_failures_total` | counter | failed cycles, labelled `stack`, `phase` and `cause` (the kind of failure: `peer_misbehaved`, `local`, `connect`, …) |
//! | `stackclone_stop_killed_total` | counter | containers Docker had to kill at their stop timeout when this host stopped the stack, labelled `stack` and `service` |
//! | `stackclone_stale` | gauge | 1 while the stack is past its `max_age`, else 0 |
//! | `stackclone_certificate_expiry_timestamp_seconds` | gauge | a certificate's `notAfter`, labelled `cert` |
//! | `stackclone_alert_failures_total` | counter | undelivered alerts, labelled `channel` |
//!
//! Decisions worth knowing:
//! - **Durations are gauges of the last cycle, not histograms.** A one-shot `push` reports one
//!   cycle per process, where a histogram says nothing a gauge does not; a daemon's history is
//!   what Prometheus keeps anyway.
//! - **Timestamps are whole seconds**; durations keep milliseconds.
//! - A successful cycle clears `stackclone_stale` for its stack: a fresh generation is by
//!   definition not stale.
//! - Certificates are labelled `cert` (e.g. `identity`, `ca`, a peer's name), not `stack`: an
//!   agent's certificates are shared by all its stacks.
//! - `/metrics` answers in the OpenMetrics text format (what `prometheus-client` writes, and
//!   what Prometheus asks for first). The Pushgateway only parses the classic text format
//!   0.0.4, so [`push_gateway`] sends that ([`Metrics::encode_text_0_0_4`]).
//! - The server is deliberately tiny: one request per connection, `GET /metrics` (a query string
//!   is ignored), `404` for any other path, `405` for another method, a bounded request head
//!   and a read timeout. It binds only what the caller passes (`metrics_listen`; off unless
//!   configured).
//!
//! What it does not do: decide when to record (the agents call it), or authenticate scrapers
//! (bind it to a loopback or management address).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::alert::{self, Channel, ChannelError, DeliveryError};

/// The `Content-Type` of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `Content-Type` of a Pushgateway push.
pub const TEXT_0_0_4_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a scraper may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head the server reads.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a Pushgateway push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StackLabels {
    stack: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    stack: String,
    phase: String,
    cause: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    stack: String,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    stack: String,
    service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertLabels {
    cert: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

type IntGauge = Family<StackLabels, Gauge>;
type FloatGauge = Family<StackLabels, Gauge<f64, AtomicU64>>;
type StackCounter = Family<StackLabels, Counter>;

/// What one successful cycle did, in plain numbers. Fields an agent does not know stay `0`
/// (`..Default::default()`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CycleStats {
    /// The generation the cycle committed.
    pub generation: u64,
    /// Wall time of the whole cycle.
    pub duration: Duration,
    /// How long the source stack was stopped.
    pub source_downtime: Duration,
    /// How long the target stack was stopped for the commit.
    pub target_downtime: Duration,
    /// Bytes put on the wire (after compression).
    pub bytes_sent: u64,
    /// File bytes the target copied from its basis.
    pub bytes_matched: u64,
    /// File bytes sent as literal data.
    pub bytes_literal: u64,
    /// Files created, changed or deleted.
    pub files_changed: u64,
}

/// The registry both agents share: create one, keep it in an `Arc`, record into it from any
/// task and serve or push it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    last_success: IntGauge,
    generation: IntGauge,
    cycle_duration: FloatGauge,
    source_downtime: FloatGauge,
    target_downtime: FloatGauge,
    bytes_sent: StackCounter,
    bytes_matched: StackCounter,
    bytes_literal: StackCounter,
    files_changed: StackCounter,
    failures: Family<FailureLabels, Counter>,
    stop_killed: Family<ServiceLabels, Counter>,
    stale: IntGauge,
    promoted: IntGauge,
    superseded: IntGauge,
    diverged: IntGauge,
    refusals: Family<RefusalLabels, Counter>,
    cert_expiry: Family<CertLabels, Gauge>,
    alert_failures: Family<ChannelLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            last_success: Family::default(),
            generation: Family::default(),
            cycle_duration: Family::default(),
            source_downtime: Family::default(),
            target_downtime: Family::default(),
            bytes_sent: Family::default(),
            bytes_matched: Family::default(),
            bytes_literal: Family::default(),
            files_changed: Family::default(),
            failures: Family::default(),
            stop_killed: Family::default(),
            stale: Family::default(),
            promoted: Family::default(),
            superseded: Family::default(),
            diverged: Family::default(),
            refusals: Family::default(),
            cert_expiry: Family::default(),
            alert_failures: Family::default(),
        };
        // Counters are registered without `_total` and units are given as units: the
        // encoder appends both (`stackclone_bytes_sent` → `stackclone_bytes_sent_total`).
        let r = &mut m.registry;
        r.register_with_unit(
            "stackclone_last_success_timestamp",
            "Unix time of the last committed cycle",
            Unit::Seconds,
            m.last_success.clone(),
        );
        r.register(
            "stackclone_generation",
            "Last committed generation",
            m.generation.clone(),
        );
        r.register_with_unit(
            "stackclone_cycle_duration",
            "Wall time of the last successful cycle",
            Unit::Seconds,
            m.cycle_duration.clone(),
        );
        r.register_with_unit(
            "stackclone_source_downtime",
            "How long the last cycle kept the source stack stopped",
            Unit::Seconds,
            m.source_downtime.clone(),
        );
        r.register_with_unit(
            "stackclone_target_downtime",
            "How long the last commit kept the target stack stopped",
            Unit::Seconds,
            m.target_downtime.clone(),
        );
        r.register(
            "stackclone_bytes_sent",
            "Bytes put on the wire",
            m.bytes_sent.clone(),
        );
        r.register(
            "stackclone_bytes_matched",
            "File bytes the target rebuilt from its basis",
            m.bytes_matched.clone(),
        );
        r.register(
            "stackclone_bytes_literal",
            "File bytes sent as literal data",
            m.bytes_literal.clone(),
        );
        r.register(
            "stackclone_files_changed",
            "Files created, changed or deleted by commits",
            m.files_changed.clone(),
        );
        r.register(
            "stackclone_cycle_failures",
            "Failed cycles by phase",
            m.failures.clone(),
        );
        r.register(
            "stackclone_stop_killed",
            "Containers Docker had to kill at their stop timeout when this host stopped the stack",
            m.stop_killed.clone(),
        );
        r.register(
            "stackclone_stale",
            "1 while no generation was committed within the stack's max_age",
            m.stale.clone(),
        );
        r.register(
            "stackclone_promoted",
            "1 while the stack is the primary on this target host (promoted, or handed over to \
             by a fail-back): pushes for it are refused",
            m.promoted.clone(),
        );
        r.register(
            "stackclone_superseded",
            "1 while the standby refuses this source's pushes because the stack was promoted there",
            m.superseded.clone(),
        );
        r.register(
            "stackclone_diverged",
            "1 while the target refuses this source's pushes because the two copies hold different \
             histories (a split brain)",
            m.diverged.clone(),
        );
        r.register(
            "stackclone_pushes_refused",
            "Pushes this target refused before anything was staged, by reason",
            m.refusals.clone(),
        );
        r.register_with_unit(
            "stackclone_certificate_expiry_timestamp",
            "Unix time a certificate expires",
            Unit::Seconds,
            m.cert_expiry.clone(),
        );
        r.register(
            "stackclone_alert_failures",
            "Alerts a channel did not deliver",
            m.alert_failures.clone(),
        );
        m
    }

    /// Makes `stack`'s series exist before its first cycle: counters, failures-free, at 0 and
    /// `stackclone_stale` at 0, so dashboards and `absent()` rules see the stack from the start.
    /// Timestamps and the generation stay absent until known.
    pub fn register_stack(&self, stack: &str) {
        let l = labels(stack);
        for counter in [
            &self.bytes_sent,
            &self.bytes_matched,
            &self.bytes_literal,
            &self.files_changed,
        ] {
            counter.get_or_create_owned(&l);
        }
        self.stale.get_or_create_owned(&l);
    }

    /// Records a cycle of `stack` that committed at `at`: sets the last-success time, the
    /// generation, the durations, adds the byte and file counts, and clears staleness.
    pub fn record_cycle(&self, stack: &str, at: SystemTime, stats: &CycleStats) {
        let l = labels(stack);
        self.record_generation(stack, stats.generation, at);
        self.cycle_duration
            .get_or_create(&l)
            .set(stats.duration.as_secs_f64());
        self.source_downtime
            .get_or_create(&l)
            .set(stats.source_downtime.as_secs_f64());
        self.target_downtime
            .get_or_create(&l)
            .set(stats.target_downtime.as_secs_f64());
        self.bytes_sent.get_or_create(&l).inc_by(stats.bytes_sent);
        self.bytes_matched
            .get_or_create(&l)
            .inc_by(stats.bytes_matched);
        self.bytes_literal
            .get_or_create(&l)
            .inc_by(stats.bytes_literal);
        self.files_changed
            .get_or_create(&l)
            .inc_by(stats.files_changed);
        self.stale.get_or_create(&l).set(0);
    }

    /// Sets the generation and last-success time without a cycle, e.g. from the target's
    /// on-disk state when it starts.
    pub fn record_generation(&self, stack: &str, generation: u64, at: SystemTime) {
        let l = labels(stack);
        self.generation
            .get_or_create(&l)
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.last_success.get_or_create(&l).set(unix_seconds(at));
    }

    /// Counts a failed cycle of `stack` in `phase`, for a `cause` of a fixed set (the kind of
    /// the cause, e.g. `peer_misbehaved`, `local`, `connect`; never text from a peer).
    pub fn record_failure(&self, stack: &str, phase: &str, cause: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                stack: stack.to_owned(),
                phase: phase.to_owned(),
                cause: cause.to_owned(),
            })
            .inc();
    }

    /// Counts a container of `service` that Docker had to kill at its stop timeout when this
    /// host stopped `stack`.
    pub fn record_stop_killed(&self, stack: &str, service: &str) {
        self.stop_killed
            .get_or_create(&ServiceLabels {
                stack: stack.to_owned(),
                service: service.to_owned(),
            })
            .inc();
    }

    /// Sets `stackclone_promoted` for `stack` (target side).
    pub fn set_promoted(&self, stack: &str, promoted: bool) {
        self.promoted
            .get_or_create(&labels(stack))
            .set(i64::from(promoted));
    }

    /// Sets `stackclone_superseded` for `stack` (source side).
    pub fn set_superseded(&self, stack: &str, superseded: bool) {
        self.superseded
            .get_or_create(&labels(stack))
            .set(i64::from(superseded));
    }

    /// Sets `stackclone_diverged` for `stack` (source side).
    pub fn set_diverged(&self, stack: &str, diverged: bool) {
        self.diverged
            .get_or_create(&labels(stack))
            .set(i64::from(diverged));
    }

    /// Counts a push of `stack` this target refused, for a `reason` of a fixed set (the
    /// refusal's kind, e.g. `promoted`, `diverged`; never text from a peer).
    pub fn record_refusal(&self, stack: &str, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                stack: stack.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Sets `stackclone_stale` for `stack`.
    pub fn set_stale(&self, stack: &str, stale: bool) {
        self.stale
            .get_or_create(&labels(stack))
            .set(i64::from(stale));
    }

    /// Sets when the certificate called `cert` (`identity`, `ca`, a peer's name) expires.
    pub fn set_certificate_expiry(&self, cert: &str, not_after: SystemTime) {
        self.cert_expiry
            .get_or_create(&CertLabels {
                cert: cert.to_owned(),
            })
            .set(unix_seconds(not_after));
    }

    /// Counts an alert `channel` did not deliver.
    pub fn record_alert_failure(&self, channel: Channel) {
        self.alert_failures
            .get_or_create(&ChannelLabels {
                channel: channel.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts what [`Notifier::send`](crate::alert::Notifier::send) returned.
    pub fn record_alert_errors(&self, errors: &[ChannelError]) {
        for e in errors {
            self.record_alert_failure(e.channel);
        }
    }

    /// The OpenMetrics text exposition, `# EOF` included.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; the encoder's only errors come from the writer.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format 0.0.4, which the Pushgateway parses: the OpenMetrics
    /// text without `# EOF` and `# UNIT`, and with a counter's `# HELP`/`# TYPE` named like its
    /// samples (`…_total`).
    pub fn encode_text_0_0_4(&self) -> String {
        let open = self.encode();
        let counters: Vec<&str> = open
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
            .collect();
        let mut out = String::with_capacity(open.len());
        for line in open.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters
                    .contains(&name)
                    .then(|| format!("{prefix}{name}_total {tail}"))
            });
            match renamed {
                Some(line) => out.push_str(&line),
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }
}

fn labels(stack: &str) -> StackLabels {
    StackLabels {
        stack: stack.to_owned(),
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// Binds `addr` and serves `metrics` on it in a spawned task until `shutdown` resolves.
/// Returns the bound address (useful with port 0). Must be called inside a tokio runtime.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving metrics");
    tokio::spawn(run(listener, metrics, shutdown));
    Ok(bound)
}

/// Serves `metrics` on `listener` until `shutdown` resolves, then drops the listener. Requests
/// already being answered finish on their own (each is bounded by a read timeout).
pub async fn run(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(handle_connection(stream, metrics.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn handle_connection(mut stream: TcpStream, metrics: Arc<Metrics>) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => respond(&head, &metrics),
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            response(400, "Bad Request", "text/plain", "bad request\n".into())
        }
        Ok(Err(_)) | Err(_) => return,
    };
    // The scraper may be gone already; there is nobody to tell.
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

/// Reads up to the end of the request head (`\r\n\r\n`), at most [`MAX_REQUEST_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the request head",
            ));
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return response(400, "Bad Request", "text/plain", "bad request\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return response(400, "Bad Request", "text/plain", "bad request\n".into());
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => response(200, "OK", OPENMETRICS_CONTENT_TYPE, metrics.encode()),
        (_, "/metrics") => response(
            405,
            "Method Not Allowed",
            "text/plain",
            "only GET is allowed\n".into(),
        ),
        _ => response(
            404,
            "Not Found",
            "text/plain",
            "not found; metrics are at /metrics\n".into(),
        ),
    }
}

fn response(status: u16, reason: &str, content_type: &str, body: String) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Pushgateway
// ---------------------------------------------------------------------------------------------

/// Why [`push_gateway`] did not push.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("invalid Pushgateway job name {job:?}: use 1 to 128 letters, digits, `-`, `_` and `.`")]
    InvalidJob { job: String },
    #[error("Pushgateway push failed: {0}")]
    Delivery(#[from] DeliveryError),
}

/// Pushes `metrics` to the Pushgateway at `url` (`http://pushgateway:9091`): `PUT
/// {url}/metrics/job/{job}` with the text format 0.0.4, which replaces what the job pushed last.
/// For one-shot runs; a host that pushes alongside others should put its name in `job`.
pub async fn push_gateway(url: &str, job: &str, metrics: &Metrics) -> Result<(), PushError> {
    let job_ok = !job.is_empty()
        && job.len() <= 128
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !job_ok || job == "." || job == ".." {
        return Err(PushError::InvalidJob {
            job: job.to_owned(),
        });
    }
    let client = alert::http_client(PUSH_TIMEOUT)?;
    let request = client
        .put(format!("{}/metrics/job/{job}", url.trim_end_matches('/')))
        .header(reqwest::header::CONTENT_TYPE, TEXT_0_0_4_CONTENT_TYPE)
        .body(metrics.encode_text_0_0_4());
    alert::execute(request, PUSH_TIMEOUT).await?;
    Ok(())
}
