//! What the daemon tests share: a [`World`] (a fleet CA with a source identity, an enrolled
//! target, the target's config files in a temp dir), a minimal in-process [`Source`] that drives
//! proto's `SourceSession` over real QUIC, a plain HTTP GET, and a recording webhook server.
//!
//! The source here is deliberately small (files sent literally, one at a time, no Docker): the
//! real `stackclone-source` is tested end to end in `tests/`; these tests are about what the
//! target does around its cycles.
#![allow(dead_code)]

/// The recording HTTP server (and log capture) `common`'s tests use.
#[path = "../../../common/tests/support/mod.rs"]
pub mod webhook;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use stackclone_certs::{CertProfile, Role, StateDir, Trust};
use stackclone_common::net::{self, ControlEnd, ControlStream};
use stackclone_common::{ScanConfig, scan};
use stackclone_proto::delta::{FileSender, SenderConfig};
use stackclone_proto::msg::{Mode, SourceMsg, TargetMsg};
use stackclone_proto::session::{
    CycleError, OnStopTimeout, SourceAction, SourceConfig, SourceReport, SourceSession,
};
use stackclone_target::app::Common;
use stackclone_target::daemon::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub const SOURCE: &str = "primary";
pub const TARGET: &str = "standby";
/// The history the tests' sources claim.
pub const HISTORY: stackclone_proto::lineage::HistoryId =
    stackclone_proto::lineage::HistoryId([5; 16]);

/// A temp dir with a fleet: `src-id` is the CA host and the source, `tgt-id` the target;
/// `etc/target.toml` and `etc/conf.d/` its config; `tgt/<stack>` the live dirs and `src/<stack>`
/// the source trees.
pub struct World {
    pub tmp: tempfile::TempDir,
    pub src_id: StateDir,
    pub tgt_id: StateDir,
    pub config: PathBuf,
}

impl World {
    /// A fleet with a target certificate valid for 60 days.
    pub fn new() -> World {
        let now = time::OffsetDateTime::now_utc();
        World::with_target_validity(
            now - time::Duration::minutes(5),
            now + time::Duration::days(60),
        )
    }

    /// A fleet whose target certificate is valid from `not_before` to `not_after`.
    pub fn with_target_validity(
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> World {
        let tmp = tempfile::Builder::new()
            .prefix("stackclone-daemon-")
            .tempdir()
            .expect("tempdir");
        let src_id = StateDir::new(tmp.path().join("src-id"));
        let tgt_id = StateDir::new(tmp.path().join("tgt-id"));
        stackclone_certs::init(&src_id, SOURCE, 60).expect("init the fleet");
        let ca = stackclone_certs::Ca::load(&src_id).expect("load CA");
        let profile = CertProfile {
            not_before,
            not_after,
            ..CertProfile::new(TARGET, Role::Target, None, 1)
        };
        ca.new_host(&profile)
            .expect("issue target")
            .save(&tgt_id)
            .expect("save target identity");
        std::fs::create_dir_all(tmp.path().join("etc/conf.d")).expect("conf.d");
        std::fs::create_dir_all(tmp.path().join("tgt")).expect("tgt");
        let config = tmp.path().join("etc/target.toml");
        let world = World {
            tmp,
            src_id,
            tgt_id,
            config,
        };
        world.write_main("");
        world
    }

    /// (Re)writes `target.toml`: port 0, metrics on port 0, and `extra` lines (e.g. `[alerts]`).
    pub fn write_main(&self, extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "listen = \"127.0.0.1:0\"\nidentity_dir = {:?}\nmetrics_listen = \"127.0.0.1:0\"\n{extra}\n",
                self.tgt_id.root()
            ),
        )
        .expect("write target.toml");
    }

    /// `[alerts]` with a webhook at `url`.
    pub fn write_main_with_webhook(&self, url: &str, on_success: bool) {
        self.write_main(&format!(
            "[alerts]\non_success = {on_success}\nwebhook = {{ url = \"{url}/hook\" }}\n"
        ));
    }

    /// (Re)writes `conf.d/<stack>.toml`: a data-only stack the source may push, plus `extra`.
    pub fn write_stack(&self, stack: &str, extra: &str) {
        std::fs::write(
            self.conf_d().join(format!("{stack}.toml")),
            format!(
                "stack = \"{stack}\"\npath = {:?}\nallow = [\"{SOURCE}\"]\ndocker = false\n{extra}\n",
                self.live(stack)
            ),
        )
        .expect("write stack file");
    }

    pub fn remove_stack(&self, stack: &str) {
        std::fs::remove_file(self.conf_d().join(format!("{stack}.toml"))).expect("remove");
    }

    pub fn conf_d(&self) -> PathBuf {
        self.tmp.path().join("etc/conf.d")
    }

    /// The target's live dir of `stack`.
    pub fn live(&self, stack: &str) -> PathBuf {
        self.tmp.path().join("tgt").join(stack)
    }

    /// The source tree of `stack`, created with `files` (path, content).
    pub fn source_tree(&self, stack: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = self.tmp.path().join("src").join(stack);
        for (path, content) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, content).expect("write source file");
        }
        root
    }

    pub fn common(&self) -> Common {
        Common {
            config: self.config.clone(),
            identity_dir: None,
        }
    }

    /// Starts the daemon in-process and serves it until the returned [`Running`] is stopped.
    pub async fn start(&self) -> Running {
        let daemon = Arc::new(Daemon::start(&self.common()).await.expect("daemon start"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon.clone().run(async move {
            let _ = stopped.await;
        }));
        Running {
            addr: daemon.local_addr().expect("local addr"),
            daemon,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn source(&self) -> Source {
        Source::new(&self.src_id)
    }
}

/// A daemon served in-process.
pub struct Running {
    pub daemon: Arc<Daemon>,
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Shuts down as SIGTERM would and waits for `run` to return (at most `limit`).
    pub async fn shutdown(&mut self, limit: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(limit, task)
                .await
                .expect("run returns after shutdown")
                .expect("run task");
        }
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        let addr = self.daemon.metrics_addr().expect("metrics are served");
        http_get(addr, "/metrics").await
    }
}

/// A plain HTTP/1.1 GET; returns the body (panics on a non-200 answer).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .expect("read answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the sample `name{labels}` in an OpenMetrics text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

/// Where the test [`Source`] stops on its way, and what it does differently.
#[derive(Default)]
pub struct Script {
    /// Told when the flag is about to be sent; the source then waits for `resume` (a dropped
    /// sender resumes too).
    pub before_flag: Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>,
    /// Signs the flag with this key instead of the one in the source's certificate.
    pub flag_key: Option<SigningKey>,
}

/// A minimal source: one QUIC client endpoint with the source identity of a [`World`].
pub struct Source {
    endpoint: quinn::Endpoint,
    trust: Trust,
    flag_key: SigningKey,
}

impl Source {
    pub fn new(dir: &StateDir) -> Source {
        let identity = stackclone_certs::Identity::load(dir).expect("source identity");
        let trust = Trust::load(dir).expect("source trust");
        let flag_key = stackclone_certs::load_flag_key(dir.root()).expect("flag key");
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        endpoint.set_default_client_config(
            stackclone_certs::client_config(&identity, &trust).expect("client config"),
        );
        Source {
            endpoint,
            trust,
            flag_key,
        }
    }

    /// One cycle of `stack` from `root` to the target at `addr`.
    pub async fn push(
        &self,
        addr: std::net::SocketAddr,
        stack: &str,
        root: &Path,
    ) -> Result<SourceReport, CycleError> {
        self.push_with(addr, stack, root, Script::default()).await
    }

    pub async fn push_with(
        &self,
        addr: std::net::SocketAddr,
        stack: &str,
        root: &Path,
        mut script: Script,
    ) -> Result<SourceReport, CycleError> {
        let (conn, _) = stackclone_certs::connect(&self.endpoint, addr, &self.trust)
            .await
            .expect("connect to the target");
        let (ctl_send, ctl_recv) = conn.open_bi().await.expect("control stream");
        let mut ctl = ControlStream::<TargetMsg>::new(ctl_send, ctl_recv);
        let mut session = SourceSession::new(
            SourceConfig {
                stack: stack.to_owned(),
                source_id: SOURCE.to_owned(),
                target_id: TARGET.to_owned(),
                mode: Mode::Sync,
                precopy: false,
                stop_stack: true,
                allow_empty: true,
                max_delete: 1.0,
                on_stop_timeout: OnStopTimeout::Warn,
                claim: stackclone_proto::lineage::Claim {
                    history: HISTORY,
                    replace_diverged: false,
                    hand_over: false,
                },
                // Whole manifests: the changes against a base are the pair tests' and the
                // end-to-end tests' (the real source records its base).
                base: None,
            },
            script
                .flag_key
                .take()
                .unwrap_or_else(|| self.flag_key.clone()),
        );
        let outcome = loop {
            let mut progress = false;
            while let Some(msg) = session.poll_message() {
                progress = true;
                if matches!(msg, SourceMsg::Flag(_))
                    && let Some((reached, resume)) = script.before_flag.take()
                {
                    let _ = reached.send(());
                    let _ = resume.await;
                }
                if ctl.is_up()
                    && let Err(e) = ctl.send(&msg).await
                {
                    session.handle_connection_lost(&e.to_string());
                }
            }
            let mut done = None;
            while let Some(action) = session.poll_action() {
                progress = true;
                match action {
                    SourceAction::Scan { pass } => {
                        let cfg = ScanConfig {
                            root: root.to_path_buf(),
                            exclude: Vec::new(),
                            cache: None,
                            checksum: false,
                            xattrs: true,
                        };
                        let scanned = scan(&cfg).map(|s| s.manifest).map_err(|e| e.to_string());
                        session.handle_scanned(pass, scanned);
                    }
                    SourceAction::StopStack => session.handle_stack_stopped(Ok(vec![])),
                    SourceAction::StartStack => session.handle_stack_started(Ok(())),
                    SourceAction::SendFile { id, path, .. } => {
                        let file = root.join(std::ffi::OsStr::from_bytes(path.as_bytes()));
                        let sent = send_literal(&conn, &file, id).await;
                        session.handle_file_sent(id, sent);
                    }
                    SourceAction::Done(result) => done = Some(result),
                }
            }
            if let Some(result) = done {
                while let Some(msg) = session.poll_message() {
                    let _ = ctl.send(&msg).await;
                }
                break result;
            }
            if progress {
                continue;
            }
            match ctl.recv().await {
                Ok(m) => session.handle_message(m, unix_now()),
                Err(ControlEnd::Malformed(e)) => session.handle_malformed(&e),
                Err(ControlEnd::Lost(e)) => session.handle_connection_lost(&e),
            }
        };
        let link_up = ctl.is_up();
        ctl.close(Duration::ZERO).await;
        // The target updates its metrics and staleness watch after sending the result and
        // before it closes the connection: return once it has, so the tests read them settled.
        if link_up {
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        }
        conn.close(0u32.into(), b"cycle over");
        outcome
    }
}

/// Streams one file literally on its own uni stream.
async fn send_literal(conn: &quinn::Connection, path: &Path, id: u32) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
    let cfg = SenderConfig::default();
    let mut sender = FileSender::new(None, cfg).map_err(|e| e.to_string())?;
    let mut msgs = vec![SourceMsg::FileBegin {
        id,
        len: data.len() as u64,
    }];
    for window in data.chunks(cfg.window) {
        for chunk in sender.send_window(window).map_err(|e| e.to_string())? {
            msgs.push(SourceMsg::FileData { id, chunk });
        }
    }
    let sent = sender.finish();
    msgs.push(SourceMsg::FileEnd {
        id,
        hash: sent.hash,
        len: sent.len,
    });
    for msg in &msgs {
        net::send(&mut stream, msg)
            .await
            .map_err(|e| e.to_string())?;
    }
    stream.finish().map_err(|e| e.to_string())?;
    let _ = stream.stopped().await;
    Ok(())
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
