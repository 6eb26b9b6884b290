//! End-to-end test helpers, in the spirit of ripgrep's `Dir`/`TestCommand`: a [`Pair`] is a
//! temp world with a source identity, an enrolled target, both agents' config files, and the
//! real `stackclone-target run` as a child process; [`tree`] snapshots and compares trees
//! independently of the agents' own scanner; [`fsx`] builds test trees.
//!
//! The binaries under test are the workspace's own `stackclone-certs`, `stackclone-source` and
//! `stackclone-target`. Cargo only builds binaries of the package under test, so [`bin`] runs
//! `cargo build --bins` for the three agent packages once per test process (a no-op when they
//! are fresh) and resolves them next to the test executable (`target/debug/`). Set
//! `STACKCLONE_TESTS_NO_BUILD=1` to skip that build and use whatever binaries are there.

pub mod compose;
pub mod faults;
pub mod fsx;
pub mod proxy;
pub mod tree;

use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The stack every [`Pair`] configures.
pub const STACK: &str = "web";
/// The source's certificate name.
pub const SOURCE_NAME: &str = "primary";
/// The target's certificate name.
pub const TARGET_NAME: &str = "standby";

/// The directory holding the workspace's binaries (`target/debug`), built once per process.
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/debug/deps/<test> -> target/debug
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in <target>/<profile>/deps")
            .to_path_buf();
        if std::env::var_os("STACKCLONE_TESTS_NO_BUILD").is_none() {
            build_bins(&dir);
        }
        for b in ["stackclone-certs", "stackclone-source", "stackclone-target"] {
            assert!(
                dir.join(b).is_file(),
                "{} is missing; run `cargo build --bins`",
                dir.join(b).display()
            );
        }
        dir
    })
}

fn build_bins(dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).args([
        "build",
        "--bins",
        "-p",
        "stackclone-certs",
        "-p",
        "stackclone-source",
        "-p",
        "stackclone-target",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target_dir) = dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let out = cmd
        .output()
        .expect("running cargo build for the agent binaries");
    assert!(
        out.status.success(),
        "cargo build of the agent binaries failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Path of one of the workspace's binaries.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A finished command: exit status and output.
#[derive(Debug)]
pub struct Run {
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the whole output unless the command exited 0.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "`{}` failed ({}):\n{}",
            self.cmd,
            self.status,
            self.dump()
        );
        self
    }

    /// stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("`{}`: stdout is not JSON ({e}):\n{}", self.cmd, self.dump())
        })
    }

    pub fn dump(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Spawns `cmd`, retrying for a while if the binary is missing or busy: the target dir is
/// shared, and another `cargo build` may be relinking it right now.
pub fn spawn(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e)
                if (e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(26))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("spawning {cmd:?}: {e}"),
        }
    }
}

/// Waits for `child` to exit, at most `limit`; past it, kills it and panics: `what` says what
/// should have ended it ("the push did not end within 60 s of SIGHUP").
#[track_caller]
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to its end.
pub fn run(mut cmd: Command) -> Run {
    let desc = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = spawn(&mut cmd)
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {desc}: {e}"));
    Run {
        cmd: desc,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// How the target gets its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enroll {
    /// `csr` → `sign` → `install`: no server process, fast.
    Offline,
    /// `token create` + `serve` as a real process + `enroll`.
    Token,
}

/// Options of a [`Pair`].
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub enroll: Enroll,
    /// `allow` of the target's stack file.
    pub allow: Vec<String>,
    /// Extra lines for the target's stack file.
    pub target_extra: String,
    /// Extra lines for the source's stack file.
    pub source_extra: String,
    /// Directory that holds the target's live dir (`<base>/web`) and default state dir
    /// (`<base>/.stackclone/web`); default `<tmp>/tgt`.
    pub target_base: Option<PathBuf>,
    /// `docker` of both stack files (default false: the stack is only a directory). With
    /// true, the stack files' Compose settings go into `target_extra` / `source_extra`.
    pub docker: bool,
    /// Environment variables for every agent process the pair starts.
    pub env: Vec<(String, String)>,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            enroll: Enroll::Offline,
            allow: vec![SOURCE_NAME.to_string()],
            target_extra: String::new(),
            source_extra: String::new(),
            target_base: None,
            docker: false,
            env: Vec::new(),
        }
    }
}

/// A running `stackclone-target run`.
#[derive(Debug)]
struct TargetProc {
    child: Child,
    log: Arc<Mutex<String>>,
}

/// A source and a target in one temp dir.
#[derive(Debug)]
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub src_id: PathBuf,
    pub tgt_id: PathBuf,
    /// The source stack's data dir.
    pub src: PathBuf,
    /// The target's live copy.
    pub live: PathBuf,
    /// The target's state dir (journal, staging, generations).
    pub state: PathBuf,
    /// The source's `--state-dir`.
    pub src_state: PathBuf,
    pub target_config: PathBuf,
    pub source_config: PathBuf,
    pub port: u16,
    pub opts: PairOptions,
    target: Option<TargetProc>,
    /// Logs of target processes that ended.
    past_logs: String,
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind UDP")
        .local_addr()
        .expect("local_addr")
        .port()
}

fn certs(dir: &Path) -> Command {
    let mut c = Command::new(bin("stackclone-certs"));
    c.arg("--dir").arg(dir);
    c
}

impl Pair {
    /// A pair with default options (offline enrollment).
    pub fn new() -> Pair {
        Pair::with(PairOptions::default())
    }

    pub fn with(opts: PairOptions) -> Pair {
        let tmp = tempfile::Builder::new()
            .prefix("stackclone-e2e-")
            .tempdir()
            .expect("tempdir");
        let t = tmp.path().to_path_buf();
        let base = opts.target_base.clone().unwrap_or_else(|| t.join("tgt"));
        fsx::mkdir(&base);
        let pair = Pair {
            src_id: t.join("src-id"),
            tgt_id: t.join("tgt-id"),
            src: t.join("src").join(STACK),
            live: base.join(STACK),
            state: base.join(".stackclone").join(STACK),
            src_state: t.join("src-state"),
            target_config: t.join("etc-target/target.toml"),
            source_config: t.join("etc-source/source.toml"),
            port: free_udp_port(),
            tmp,
            opts,
            target: None,
            past_logs: String::new(),
        };
        fsx::mkdir(&pair.src);
        run(certs(&pair.src_id)
            .args(["init", "--name", SOURCE_NAME])
            .take_cmd())
        .ok();
        match pair.opts.enroll {
            Enroll::Offline => pair.enroll_offline(),
            Enroll::Token => pair.enroll_with_token(),
        }
        pair.write_configs();
        pair
    }

    fn enroll_offline(&self) {
        let t = self.tmp.path();
        let (csr, bundle) = (t.join("standby.csr.json"), t.join("standby.bundle.json"));
        run(certs(&self.tgt_id)
            .args(["csr", "--name", TARGET_NAME, "--out"])
            .arg(&csr)
            .take_cmd())
        .ok();
        run(certs(&self.src_id)
            .arg("sign")
            .arg(&csr)
            .args(["--role", "target", "--out"])
            .arg(&bundle)
            .take_cmd())
        .ok();
        let shown = run(certs(&self.src_id).args(["show", "--json"]).take_cmd());
        let pin = shown.ok().json()["ca"]["pin"]
            .as_str()
            .expect("ca.pin in `show --json`")
            .to_string();
        run(certs(&self.tgt_id)
            .arg("install")
            .arg(&bundle)
            .args(["--ca-pin", &pin])
            .take_cmd())
        .ok();
    }

    fn enroll_with_token(&self) {
        let server = format!("127.0.0.1:{}", free_udp_port());
        let tok = run(certs(&self.src_id)
            .args([
                "token", "create", "--role", "target", "--server", &server, "--json",
            ])
            .take_cmd());
        let tok = tok.ok().json();
        let token = tok["token"]
            .as_str()
            .expect("token in `token create --json`")
            .to_string();
        let pin = tok["ca_pin"]
            .as_str()
            .expect("ca_pin in `token create --json`")
            .to_string();
        assert!(pin.starts_with("sha256:"), "ca_pin {pin}");
        let mut serve = spawn(
            certs(&self.src_id)
                .args(["serve", "--listen", &server])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let stdout = serve.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let listening = rx.recv_timeout(Duration::from_secs(30));
        if listening.is_err() {
            let _ = serve.kill();
            let out = serve.wait_with_output().expect("wait serve");
            panic!(
                "`stackclone-certs serve` did not say `listening on`: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let enrolled = run(certs(&self.tgt_id)
            .args([
                "enroll",
                "--name",
                TARGET_NAME,
                "--server",
                &server,
                "--token",
                &token,
                "--ca-pin",
                &pin,
            ])
            .take_cmd());
        let _ = serve.kill();
        let _ = serve.wait();
        enrolled.ok();
    }

    /// (Re)writes both agents' config files from the current options and port.
    pub fn write_configs(&self) {
        let q = |p: &Path| toml_str(p);
        fsx::write(
            &self.target_config,
            format!(
                "listen = \"127.0.0.1:{}\"\nidentity_dir = {}\n",
                self.port,
                q(&self.tgt_id)
            ),
        );
        self.write_target_stack(&self.opts.target_extra);
        fsx::write(
            &self.source_config,
            format!(
                "identity_dir = {}\n\n[targets.{TARGET_NAME}]\naddress = \"127.0.0.1:{}\"\n",
                q(&self.src_id),
                self.port
            ),
        );
        self.write_source_stack(&self.opts.source_extra);
    }

    /// Rewrites the target's stack file with `extra` lines.
    pub fn write_target_stack(&self, extra: &str) {
        let allow: Vec<String> = self.opts.allow.iter().map(|a| format!("{a:?}")).collect();
        fsx::write(
            self.target_config
                .parent()
                .expect("parent")
                .join("conf.d/web.toml"),
            format!(
                "stack = \"{STACK}\"\npath = {}\nallow = [{}]\ndocker = {}\n{extra}\n",
                toml_str(&self.live),
                allow.join(", "),
                self.opts.docker
            ),
        );
    }

    /// Rewrites the source's stack file with `extra` lines.
    pub fn write_source_stack(&self, extra: &str) {
        fsx::write(
            self.source_config
                .parent()
                .expect("parent")
                .join("conf.d/web.toml"),
            format!(
                "stack = \"{STACK}\"\npath = {}\ntarget = \"{TARGET_NAME}\"\ndocker = {}\n{extra}\n",
                toml_str(&self.src),
                self.opts.docker
            ),
        );
    }

    /// Starts `stackclone-target run` and waits until it logs `target listening`.
    pub fn start_target(&mut self) {
        assert!(self.target.is_none(), "the target is already running");
        for attempt in 0..3 {
            let mut child = spawn(
                Command::new(bin("stackclone-target"))
                    .arg("--config")
                    .arg(&self.target_config)
                    .arg("run")
                    .env("STACKCLONE_LOG", "warn,stackclone=debug")
                    .env("NO_COLOR", "1")
                    .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            );
            let stderr = child.stderr.take().expect("piped stderr");
            let log = Arc::new(Mutex::new(String::new()));
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut l = sink.lock().expect("log lock");
                    l.push_str(&line);
                    l.push('\n');
                }
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if log.lock().expect("log").contains("target listening") {
                    self.target = Some(TargetProc { child, log });
                    return;
                }
                if let Some(status) = child.try_wait().expect("try_wait") {
                    // Give the reader a moment to collect the last lines.
                    std::thread::sleep(Duration::from_millis(100));
                    let text = log.lock().expect("log").clone();
                    if text.contains("binding UDP") && attempt < 2 {
                        self.port = free_udp_port();
                        self.write_configs();
                        break;
                    }
                    panic!("stackclone-target run exited ({status}) before listening:\n{text}");
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "stackclone-target run did not log `target listening` in 30 s:\n{}",
                        log.lock().expect("log")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not bind a UDP port for the target");
    }

    /// The running target's pid.
    pub fn target_pid(&self) -> u32 {
        self.target.as_ref().expect("target running").child.id()
    }

    /// SIGKILLs the target and reaps it.
    pub fn kill_target(&mut self) {
        if let Some(mut t) = self.target.take() {
            let _ = t.child.kill();
            let _ = t.child.wait();
            self.keep_log(&t);
        }
    }

    /// SIGTERMs the target and waits (up to 30 s, then SIGKILL and panic) for it to exit.
    pub fn stop_target(&mut self) {
        let Some(mut t) = self.target.take() else {
            return;
        };
        signal(t.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = t.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(20));
                self.keep_log(&t);
                assert!(
                    status.success(),
                    "stackclone-target run exited with {status} on SIGTERM:\n{}",
                    self.target_log()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = t.child.kill();
                let _ = t.child.wait();
                self.keep_log(&t);
                panic!(
                    "stackclone-target run did not stop within 30 s of SIGTERM:\n{}",
                    self.target_log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn keep_log(&mut self, t: &TargetProc) {
        self.past_logs.push_str(&t.log.lock().expect("log"));
        self.past_logs.push_str("--- (target process ended)\n");
    }

    /// Everything the target processes of this pair logged so far.
    pub fn target_log(&self) -> String {
        let mut s = self.past_logs.clone();
        if let Some(t) = &self.target {
            s.push_str(&t.log.lock().expect("log"));
        }
        s
    }

    /// `stackclone-source --config … --state-dir … push web ARGS…`, to its end.
    pub fn push(&self, args: &[&str]) -> Run {
        run(self.push_cmd(args))
    }

    /// A push that must commit; returns its `--json` outcome for the stack.
    #[track_caller]
    pub fn push_ok(&self) -> serde_json::Value {
        let r = self.push(&["--json"]);
        assert!(
            r.status.success(),
            "push failed ({}):\n{}\n--- target log\n{}",
            r.status,
            r.dump(),
            self.target_log()
        );
        let j = r.json();
        let o = j[0].clone();
        assert_eq!(o["stack"], STACK, "{}", r.stdout);
        assert_eq!(o["ok"], true, "{}", r.stdout);
        o
    }

    pub fn push_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.source_cmd(&["push", STACK]);
        c.args(args);
        c
    }

    /// `stackclone-source --config … --state-dir … ARGS…`.
    pub fn source_cmd(&self, args: &[&str]) -> Command {
        let mut c = source_command(&self.source_config, &self.src_state, args);
        c.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `stackclone-target --config … ARGS…`.
    pub fn target_cmd(&self, args: &[&str]) -> Command {
        target_command(&self.target_config, args)
    }

    /// `stackclone-target status web --json`, the stack's object.
    #[track_caller]
    pub fn target_status(&self) -> serde_json::Value {
        let r = run(self.target_cmd(&["status", STACK, "--json"]));
        r.ok();
        let j = r.json();
        let arr = j
            .as_array()
            .unwrap_or_else(|| panic!("status --json is not an array: {}", r.stdout));
        assert_eq!(arr.len(), 1, "{}", r.stdout);
        arr[0].clone()
    }

    /// The target's last committed generation.
    pub fn target_generation(&self) -> u64 {
        self.target_status()["generation"]
            .as_u64()
            .expect("generation is a number")
    }
}

/// The pair the other way round, for a fail-back: the primary serves as a target of the stack
/// at its own data dir (allowing the standby), the standby pushes its live copy to it. Each
/// host uses the identity it already has.
#[derive(Debug)]
pub struct Reverse {
    /// `stackclone-target` config on the primary.
    pub target_config: PathBuf,
    /// `stackclone-source` config and state dir on the standby.
    pub source_config: PathBuf,
    pub source_state: PathBuf,
    pub port: u16,
}

impl Reverse {
    /// `stackclone-target --config … ARGS…` on the primary.
    pub fn target_cmd(&self, args: &[&str]) -> Command {
        target_command(&self.target_config, args)
    }

    /// `stackclone-source --config … --state-dir … ARGS…` on the standby.
    pub fn source_cmd(&self, args: &[&str]) -> Command {
        source_command(&self.source_config, &self.source_state, args)
    }
}

/// `stackclone-source --config CONFIG --state-dir STATE ARGS…`, with no identity or state dir
/// from the environment.
fn source_command(config: &Path, state: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("stackclone-source"));
    c.arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("STACKCLONE_DIR")
        .env_remove("STACKCLONE_STATE_DIR")
        .stdin(Stdio::null());
    c
}

/// `stackclone-target --config CONFIG ARGS…`, with no identity dir from the environment.
fn target_command(config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("stackclone-target"));
    c.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("STACKCLONE_DIR")
        .stdin(Stdio::null());
    c
}

impl Pair {
    /// Writes the [`Reverse`] configs (data-only stacks, `extra` lines in both stack files).
    pub fn reverse(&self, extra: &str) -> Reverse {
        let t = self.tmp.path();
        let r = Reverse {
            target_config: t.join("rev-target/target.toml"),
            source_config: t.join("rev-source/source.toml"),
            source_state: t.join("rev-source-state"),
            port: free_udp_port(),
        };
        fsx::write(
            &r.target_config,
            format!(
                "listen = \"127.0.0.1:{}\"\nidentity_dir = {}\n",
                r.port,
                toml_str(&self.src_id)
            ),
        );
        fsx::write(
            t.join("rev-target/conf.d/web.toml"),
            format!(
                "stack = \"{STACK}\"\npath = {}\nallow = [\"{TARGET_NAME}\"]\ndocker = false\n{extra}\n",
                toml_str(&self.src)
            ),
        );
        fsx::write(
            &r.source_config,
            format!(
                "identity_dir = {}\n\n[targets.{SOURCE_NAME}]\naddress = \"127.0.0.1:{}\"\n",
                toml_str(&self.tgt_id),
                r.port
            ),
        );
        fsx::write(
            t.join("rev-source/conf.d/web.toml"),
            format!(
                "stack = \"{STACK}\"\npath = {}\ntarget = \"{SOURCE_NAME}\"\ndocker = false\n{extra}\n",
                toml_str(&self.live)
            ),
        );
        r
    }
}

impl Default for Pair {
    fn default() -> Self {
        Pair::new()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(mut t) = self.target.take() {
            let _ = t.child.kill();
            let _ = t.child.wait();
        }
    }
}

/// Sends `SIG<sig>` to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A path as a TOML basic string.
fn toml_str(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("test paths are UTF-8"))
}

/// Lets `run(certs(..).args(..).take_cmd())` take the `Command` out of a `&mut` builder chain.
trait TakeCmd {
    fn take_cmd(&mut self) -> Command;
}

impl TakeCmd for Command {
    fn take_cmd(&mut self) -> Command {
        std::mem::replace(self, Command::new("false"))
    }
}

/// A running agent daemon (`stackclone-source run` of a [`Pair`], or any agent command), its
/// stderr collected.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts the pair's source daemon and waits until it says it runs.
    pub fn start(p: &Pair) -> Daemon {
        Daemon::spawn(p.source_cmd(&["run"]), "source daemon running")
    }

    /// Starts `cmd` (an agent's `run`) and waits until its log contains `ready`.
    pub fn spawn(mut cmd: Command, ready: &str) -> Daemon {
        let mut child = spawn(
            cmd.env("STACKCLONE_LOG", "info,stackclone=debug")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let mut stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("log")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let d = Daemon { child, log };
        d.wait_log(ready, Duration::from_secs(30));
        d
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Waits until its log contains `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the daemon's log within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How often its log contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// SIGTERM, then the exit status (within `limit`).
    #[track_caller]
    pub fn terminate(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader thread drain the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the daemon did not exit within {limit:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
