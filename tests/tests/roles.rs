//! A host enrolled once acts in both roles. At fail-back the standby (enrolled as `target`)
//! pushes a stack to the old primary (enrolled as `source`, the CA host), which runs
//! `stackclone-target` for it, with the certificates both already hold. What decides is the
//! receiving stack's `allow` list and the name the pushing side dialled, not the role in a
//! certificate; and the pusher's flag, signed with the flag key its certificate carries, must
//! verify on the receiving host for the generation to commit.
//!
//! Real processes and real QUIC on 127.0.0.1: a [`Pair`] makes A (`primary`, `p.src_id`) and B
//! (`standby`, `p.tgt_id`); here A serves a data-only stack `back` and B pushes it.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{Tree, assert_same, snapshot};
use stackclone_tests::{Enroll, Pair, PairOptions, Run, SOURCE_NAME, TARGET_NAME, bin, run, spawn};

/// The stack the standby pushes back.
const BACK: &str = "back";

/// A `stackclone-target run` on A, with A's identity.
struct Receiver {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The reverse direction set up beside a [`Pair`]: A's target config and copy of `back`, B's
/// source config and data.
struct Reverse {
    p: Pair,
    /// A's `target.toml` (`identity_dir` = A's identity, the one `init` made: role source).
    a_config: PathBuf,
    /// Where A keeps its copies (the live dir and, by default, the state dir beneath).
    a_base: PathBuf,
    /// A's live copy of `back`.
    a_live: PathBuf,
    /// A's state dir for `back`.
    a_state: PathBuf,
    /// B's `source.toml` (`identity_dir` = B's identity, enrolled as target).
    b_config: PathBuf,
    /// B's data of `back`.
    b_data: PathBuf,
    /// B's `--state-dir`.
    b_state: PathBuf,
    port: u16,
    receiver: Option<Receiver>,
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind UDP")
        .local_addr()
        .expect("local_addr")
        .port()
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("test paths are UTF-8"))
}

/// The data B pushes: regular files of several modes, an empty file, a nested dir, a symlink,
/// a name with a space and one that is not ASCII.
fn data(root: &Path) {
    fsx::write(root.join("README"), "pushed back by the standby\n");
    fsx::write(root.join("bin/run.sh"), "#!/bin/sh\necho back\n");
    fsx::chmod(root.join("bin/run.sh"), 0o755);
    fsx::write(root.join("db/secret"), "only the owner\n");
    fsx::chmod(root.join("db/secret"), 0o600);
    fsx::chmod(root.join("db"), 0o700);
    fsx::write(root.join("data/blob.bin"), Rng::new(7).bytes(300_000));
    fsx::write(root.join("data/empty"), "");
    fsx::write(root.join("data/with space.txt"), "a space\n");
    fsx::write(root.join("data/café.txt"), "not ascii\n");
    fsx::mkdir(root.join("data/nested/deeper"));
    fsx::ln_s("../README", root.join("data/readme-link"));
}

impl Reverse {
    fn new(enroll: Enroll, allow: &[&str]) -> Reverse {
        let p = Pair::with(PairOptions {
            enroll,
            ..PairOptions::default()
        });
        let t = p.tmp.path().to_path_buf();
        let a_base = t.join("a-copies");
        fsx::mkdir(&a_base);
        let b_data = t.join("b-data").join(BACK);
        fsx::mkdir(&b_data);
        let r = Reverse {
            a_config: t.join("a-etc-target/target.toml"),
            a_live: a_base.join(BACK),
            a_state: a_base.join(".stackclone").join(BACK),
            a_base,
            b_config: t.join("b-etc-source/source.toml"),
            b_data,
            b_state: t.join("b-state"),
            port: free_udp_port(),
            receiver: None,
            p,
        };
        r.write_configs(allow);
        r
    }

    /// Writes A's target config (stack `back`, `allow` as given) and B's source config (stack
    /// `back` to `[targets.<target>]` at A's address).
    fn write_configs(&self, allow: &[&str]) {
        self.write_receiver_config(allow);
        self.write_pusher_config(SOURCE_NAME);
    }

    fn write_receiver_config(&self, allow: &[&str]) {
        fsx::write(
            &self.a_config,
            format!(
                "listen = \"127.0.0.1:{}\"\nidentity_dir = {}\n",
                self.port,
                toml_str(&self.p.src_id)
            ),
        );
        let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
        fsx::write(
            self.a_config.with_file_name("conf.d/back.toml"),
            format!(
                "stack = \"{BACK}\"\npath = {}\nallow = [{}]\ndocker = false\n",
                toml_str(&self.a_live),
                allow.join(", ")
            ),
        );
    }

    /// B's source config, naming A's address as the target `target`.
    fn write_pusher_config(&self, target: &str) {
        fsx::write(
            &self.b_config,
            format!(
                "identity_dir = {}\n\n[targets.{target}]\naddress = \"127.0.0.1:{}\"\n",
                toml_str(&self.p.tgt_id),
                self.port
            ),
        );
        fsx::write(
            self.b_config.with_file_name("conf.d/back.toml"),
            format!(
                "stack = \"{BACK}\"\npath = {}\ntarget = \"{target}\"\ndocker = false\n",
                toml_str(&self.b_data)
            ),
        );
    }

    /// Starts `stackclone-target run` with A's config and waits for `target listening`.
    fn start_receiver(&mut self, allow: &[&str]) {
        assert!(self.receiver.is_none(), "A's target is already running");
        for _attempt in 0..3 {
            let mut child = spawn(
                Command::new(bin("stackclone-target"))
                    .arg("--config")
                    .arg(&self.a_config)
                    .arg("run")
                    .env_remove("STACKCLONE_DIR")
                    .env("STACKCLONE_LOG", "warn,stackclone=debug")
                    .env("NO_COLOR", "1")
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
            let mut receiver = Receiver { child, log };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if receiver.log().contains("target listening") {
                    self.receiver = Some(receiver);
                    return;
                }
                if let Some(status) = receiver.child.try_wait().expect("try_wait") {
                    std::thread::sleep(Duration::from_millis(100));
                    let text = receiver.log();
                    assert!(
                        text.contains("binding UDP"),
                        "A's stackclone-target run exited ({status}) before listening:\n{text}"
                    );
                    // Someone took the port: another one, for both configs.
                    self.port = free_udp_port();
                    self.write_configs(allow);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "A's stackclone-target run did not log `target listening` in 30 s:\n{}",
                    receiver.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not bind a UDP port for A's target");
    }

    fn stop_receiver(&mut self) {
        self.receiver = None;
    }

    fn receiver_log(&self) -> String {
        self.receiver
            .as_ref()
            .map(Receiver::log)
            .unwrap_or_default()
    }

    /// `stackclone-source push back ARGS…` on B.
    fn push(&self, args: &[&str]) -> Run {
        let mut c = Command::new(bin("stackclone-source"));
        c.arg("--config")
            .arg(&self.b_config)
            .arg("--state-dir")
            .arg(&self.b_state)
            .args(["push", BACK])
            .args(args)
            .env_remove("STACKCLONE_DIR")
            .env_remove("STACKCLONE_STATE_DIR")
            .stdin(Stdio::null());
        run(c)
    }

    /// A push that must commit: its `--json` outcome for `back`.
    #[track_caller]
    fn push_ok(&self) -> serde_json::Value {
        let r = self.push(&["--json"]);
        assert!(
            r.status.success(),
            "B's push to A failed ({}):\n{}\n--- A's target log\n{}",
            r.status,
            r.dump(),
            self.receiver_log()
        );
        let o = r.json()[0].clone();
        assert_eq!((&o["stack"], &o["ok"]), (&BACK.into(), &true.into()), "{o}");
        o
    }

    /// `stackclone-target status back --json` on A: the stack's object.
    #[track_caller]
    fn receiver_status(&self) -> serde_json::Value {
        let mut c = Command::new(bin("stackclone-target"));
        c.arg("--config")
            .arg(&self.a_config)
            .args(["status", BACK, "--json"])
            .env_remove("STACKCLONE_DIR")
            .stdin(Stdio::null());
        let r = run(c);
        r.ok();
        let j = r.json();
        assert_eq!(j.as_array().map(Vec::len), Some(1), "{}", r.stdout);
        j[0].clone()
    }

    /// A's copies, everything A holds for `back` (live dir and state dir).
    fn a_world(&self) -> Tree {
        snapshot(&self.a_base)
    }
}

impl Receiver {
    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }
}

/// `stackclone-certs show --json` for an identity dir.
fn show(dir: &Path) -> serde_json::Value {
    let mut c = Command::new(bin("stackclone-certs"));
    c.arg("--dir").arg(dir).args(["show", "--json"]);
    run(c).ok().json()
}

fn pushes_back(enroll: Enroll) {
    let mut w = Reverse::new(enroll, &[TARGET_NAME]);
    // The certificates as enrolment made them: A a source, B a target, each with a flag key.
    let (a, b) = (
        show(&w.p.src_id)["host"].clone(),
        show(&w.p.tgt_id)["host"].clone(),
    );
    assert_eq!(
        (&a["name"], &a["role"]),
        (&SOURCE_NAME.into(), &"source".into())
    );
    assert_eq!(
        (&b["name"], &b["role"]),
        (&TARGET_NAME.into(), &"target".into())
    );
    let b_flag = b["flag_key"]
        .as_str()
        .unwrap_or_else(|| panic!("a target certificate carries a flag key now: {b}"))
        .to_owned();
    assert_eq!(b_flag.len(), 64, "{b}");
    assert_ne!(a["flag_key"], b["flag_key"]);

    data(&w.b_data);
    let sent = snapshot(&w.b_data);
    w.start_receiver(&[TARGET_NAME]);
    let o = w.push_ok();
    assert_same(&sent, &snapshot(&w.a_live), "A's copy after B's push");
    // The same bytes and modes, looked at directly as well.
    let live = |p: &str| w.a_live.join(p);
    let mode = |p: &str| {
        std::fs::symlink_metadata(live(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        std::fs::read(live("data/blob.bin")).expect("blob"),
        Rng::new(7).bytes(300_000)
    );
    assert_eq!(
        std::fs::read_to_string(live("bin/run.sh")).expect("run.sh"),
        "#!/bin/sh\necho back\n"
    );
    assert_eq!(mode("bin/run.sh"), 0o755);
    assert_eq!(mode("db/secret"), 0o600);
    assert_eq!(mode("db"), 0o700);
    assert_eq!(
        std::fs::read_to_string(live("data/café.txt")).expect("café"),
        "not ascii\n"
    );
    assert!(live("data/with space.txt").is_file());
    assert!(live("data/nested/deeper").is_dir());
    assert_eq!(
        std::fs::read_link(live("data/readme-link")).expect("symlink"),
        Path::new("../README")
    );

    // The generation committed, so A verified the flag B signed; with the flag key B's
    // certificate carries, which A pinned for the name `standby` when it admitted B.
    let status = w.receiver_status();
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(status["role"], "standby", "{status}");
    assert_eq!(
        (&o["generation"], &o["target"]),
        (&1.into(), &SOURCE_NAME.into()),
        "{o}"
    );
    let pins: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.p.src_id.join("flag-pins.json")).expect("A's flag-pins.json"),
    )
    .expect("flag-pins.json is JSON");
    assert_eq!(pins[TARGET_NAME]["key"], b_flag.as_str(), "{pins}");

    // A second cycle: a change arrives as generation 2.
    fsx::write(w.b_data.join("README"), "changed on the standby\n");
    fsx::rm(w.b_data.join("data/empty"));
    let sent = snapshot(&w.b_data);
    w.push_ok();
    assert_same(
        &sent,
        &snapshot(&w.a_live),
        "A's copy after B's second push",
    );
    assert_eq!(w.receiver_status()["generation"], 2);
    w.stop_receiver();
}

/// B, enrolled offline as a target (`csr` / `sign --role target` / `install`), pushes a stack
/// to A, the CA host enrolled as a source, whose stack names B in `allow`.
#[test]
fn the_standby_pushes_a_stack_to_the_primary() {
    pushes_back(Enroll::Offline);
}

/// The same with B enrolled over the network with a target token (`token create` / `serve` /
/// `enroll`).
#[test]
fn a_standby_enrolled_with_a_token_pushes_to_the_primary() {
    pushes_back(Enroll::Token);
}

/// The allow list still decides: a stack on A that does not name B refuses B's push, naming B,
/// and nothing is written on A. The same push is accepted once the list names B, so it was the
/// list that refused it, not B's role.
#[test]
fn a_stack_that_does_not_allow_the_standby_refuses_it_and_writes_nothing() {
    let mut w = Reverse::new(Enroll::Offline, &["someone-else"]);
    data(&w.b_data);
    w.start_receiver(&["someone-else"]);
    let before = w.a_world();

    let r = w.push(&["--json"]);
    assert_eq!(r.code(), Some(1), "a refused push must fail:\n{}", r.dump());
    let o = &r.json()[0];
    assert_eq!(o["ok"], false, "{}", r.stdout);
    let err = o["error"].as_str().expect("error message");
    for want in [BACK, TARGET_NAME, "not allowed"] {
        assert!(err.contains(want), "error {err:?} should mention {want:?}");
    }
    assert_same(&before, &w.a_world(), "A's copies after a refused push");
    // The target made the (empty) live dir when it started; the refused push put nothing in it.
    assert!(
        std::fs::read_dir(&w.a_live).map_or(true, |mut d| d.next().is_none()),
        "A's live dir stays empty"
    );
    assert!(
        std::fs::read_dir(w.a_state.join("staging/objects"))
            .map_or(true, |mut d| d.next().is_none()),
        "nothing staged"
    );
    let log = w.receiver_log();
    assert!(
        log.contains("not allowed") && log.contains(TARGET_NAME),
        "A logs the refusal and names the peer:\n{log}"
    );
    w.stop_receiver();

    w.write_receiver_config(&[TARGET_NAME]);
    let sent = snapshot(&w.b_data);
    w.start_receiver(&[TARGET_NAME]);
    w.push_ok();
    assert_same(&sent, &snapshot(&w.a_live), "A's copy once `allow` names B");
    assert_eq!(w.receiver_status()["generation"], 1);
}

/// The pushing side still checks the name of the host it reached: B configured to push `back`
/// to a target named `elsewhere`, at A's address, refuses to talk to A (`primary`), whatever A's
/// role, and A receives nothing.
#[test]
fn the_pusher_still_refuses_a_server_with_another_name() {
    let mut w = Reverse::new(Enroll::Offline, &[TARGET_NAME]);
    data(&w.b_data);
    w.start_receiver(&[TARGET_NAME]);
    w.write_pusher_config("elsewhere");
    let before = w.a_world();
    let r = w.push(&["--json"]);
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    let err = r.json()[0]["error"].as_str().expect("error").to_owned();
    assert!(
        err.contains("is `primary`, expected `elsewhere`"),
        "{err}\n{}",
        r.dump()
    );
    assert_same(
        &before,
        &w.a_world(),
        "A's copies after a push to the wrong name",
    );
    w.stop_receiver();
}
