//! The real `stackclone-certs` binary in temp dirs: enrollment, refusals, renew, revoke, the
//! offline path and `show --json`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use stackclone_certs::{
    DenyList, EnrollServer, Identity, Role, StateDir, Trust, TrustError, client_config, connect,
    load_flag_key, load_trusted_flag_keys, server_config,
};

fn bin(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stackclone-certs"));
    cmd.arg("--dir").arg(dir).env_remove("STACKCLONE_DIR");
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Output {
    bin(dir).args(args).output().expect("run stackclone-certs")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "stackclone-certs {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        !out.status.success(),
        "stackclone-certs {args:?} should fail"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `serve` as a real process on an ephemeral port; killed on drop.
struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Serve {
    fn start(dir: &Path) -> Serve {
        let mut child = bin(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected serve output: {line:?}"))
            .parse()
            .unwrap();
        Serve { child, addr }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Hosts {
    _tmp: tempfile::TempDir,
    ca: PathBuf,
    joiner: PathBuf,
}

fn hosts() -> Hosts {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("primary");
    let joiner = tmp.path().join("standby");
    ok(&ca, &["init", "--name", "primary"]);
    Hosts {
        ca,
        joiner,
        _tmp: tmp,
    }
}

fn token_json(dir: &Path, server: SocketAddr, extra: &[&str]) -> serde_json::Value {
    let server = server.to_string();
    let mut args = vec!["token", "create", "--server", &server, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(dir, &args)).unwrap()
}

fn enroll_args<'a>(name: &'a str, t: &'a serde_json::Value) -> Vec<&'a str> {
    vec![
        "enroll",
        "--name",
        name,
        "--server",
        t["server"].as_str().unwrap(),
        "--token",
        t["token"].as_str().unwrap(),
        "--ca-pin",
        t["ca_pin"].as_str().unwrap(),
    ]
}

fn show(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(dir, &["show", "--json"])).expect("show --json is JSON")
}

/// Connects the two hosts' identities over the agents' QUIC configs; returns what each saw.
async fn pair(
    source_dir: &Path,
    target_dir: &Path,
) -> Result<(stackclone_certs::Admission, stackclone_certs::Admission), TrustError> {
    let source = Identity::load(&StateDir::new(source_dir))?;
    let target = Identity::load(&StateDir::new(target_dir))?;
    let source_trust = Trust::load(&StateDir::new(source_dir))?;
    let target_trust = Trust::load(&StateDir::new(target_dir))?;
    let server = quinn::Endpoint::server(
        server_config(&target, &target_trust)?,
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let incoming = server.accept().await.expect("open");
        let result = stackclone_certs::accept(incoming, &target_trust, Role::Source).await;
        if let Ok((conn, _)) = &result {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
        }
        result.map(|(_, a)| a)
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config(&source, &source_trust)?);
    let dialed = connect(&client, addr, &source_trust, Role::Target).await;
    if let Ok((conn, _)) = &dialed {
        conn.close(0u32.into(), b"bye");
    }
    let accepted = accepting.await.expect("join");
    Ok((dialed?.1, accepted?))
}

#[tokio::test]
async fn token_create_and_enroll_pair_connects() {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    // The printed command line is pasted as is.
    let server = serve.addr.to_string();
    let line = ok(
        &h.ca,
        &["token", "create", "--server", &server, "--name", "standby"],
    );
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&words[..2], ["stackclone-certs", "enroll"], "{line}");
    assert!(line.contains("--ca-pin sha256:"), "{line}");
    let out = ok(&h.joiner, &words[1..]);
    assert!(out.contains("enrolled `standby` as target"), "{out}");

    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = StateDir::new(&h.joiner);
    assert_eq!(mode(dir.host_key()), 0o600);
    assert_eq!(mode(h.joiner.clone()), 0o700);
    assert!(!dir.flag_key().exists(), "a target keeps no flag key");

    let (on_source, on_target) = pair(&h.ca, &h.joiner).await.unwrap();
    assert_eq!(
        (on_source.peer.name.as_str(), on_source.peer.role),
        ("standby", Role::Target)
    );
    assert_eq!(
        (on_target.peer.name.as_str(), on_target.peer.role),
        ("primary", Role::Source)
    );
    let flag = load_flag_key(&h.ca).unwrap().verifying_key();
    assert_eq!(on_target.peer.flag_key, Some(flag));
    assert_eq!(load_trusted_flag_keys(&h.joiner).unwrap()["primary"], flag);

    let status = show(&h.joiner);
    assert_eq!(status["host"]["name"], "standby");
    assert_eq!(status["host"]["role"], "target");
    assert_eq!(status["ca"]["pin"], show(&h.ca)["ca"]["pin"]);
    let ca_status = show(&h.ca);
    assert_eq!(ca_status["tokens"][0]["state"], "used");
    assert_eq!(ca_status["tokens"][0]["used_by"], "standby");
}

#[test]
fn reused_token_is_refused() {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    let t = token_json(&h.ca, serve.addr, &[]);
    ok(&h.joiner, &enroll_args("standby", &t));
    let other = h.joiner.with_file_name("standby2");
    let err = fails(&other, &enroll_args("standby2", &t));
    assert!(err.contains("token already used"), "{err}");
    assert!(!StateDir::new(&other).host_cert().exists());
}

#[test]
fn expired_token_is_refused() {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    let t = token_json(&h.ca, serve.addr, &["--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let err = fails(&h.joiner, &enroll_args("standby", &t));
    assert!(
        err.contains(&format!(
            "token expired at {}",
            t["expires_at"].as_str().unwrap()
        )),
        "{err}"
    );
    assert!(!StateDir::new(&h.joiner).host_key().exists());
}

#[test]
fn wrong_token_secret_is_refused() {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    let mut t = token_json(&h.ca, serve.addr, &[]);
    let token = t["token"].as_str().unwrap().to_owned();
    let (id, _) = token.split_once('.').unwrap();
    t["token"] = format!("{id}.{}", "0".repeat(32)).into();
    let err = fails(&h.joiner, &enroll_args("standby", &t));
    assert!(
        err.contains("token proof") && err.contains("does not verify"),
        "{err}"
    );
    assert_eq!(show(&h.ca)["tokens"][0]["state"], "unused");
}

#[tokio::test]
async fn ca_pin_mismatch_sends_nothing() {
    let h = hosts();
    // Another fleet's CA answers at the address the joiner was given.
    let rogue = h.ca.with_file_name("rogue");
    ok(&rogue, &["init", "--name", "rogue"]);
    let rogue_server = Arc::new(EnrollServer::load(&StateDir::new(&rogue)).unwrap());
    let stats = rogue_server.stats();
    let endpoint = rogue_server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(stackclone_certs::serve(rogue_server, endpoint, async {
        let _ = stopped.await;
    }));

    let t = token_json(&h.ca, addr, &[]);
    let joiner = h.joiner.clone();
    let args: Vec<String> = enroll_args("standby", &t)
        .into_iter()
        .map(String::from)
        .collect();
    let out = tokio::task::spawn_blocking(move || bin(&joiner).args(&args).output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let rogue_pin = show(&rogue)["ca"]["pin"].as_str().unwrap().to_owned();
    assert!(
        err.contains(&format!(
            "CA pin mismatch: the server presented {rogue_pin}, expected {} — refusing to send the CSR",
            t["ca_pin"].as_str().unwrap()
        )),
        "{err}"
    );
    // Nothing reached the rogue server beyond the TLS handshake it failed.
    assert_eq!(stats.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(
        stats.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // The token is still good and nothing was written on the joining host.
    assert_eq!(show(&h.ca)["tokens"][0]["state"], "unused");
    assert!(!StateDir::new(&h.joiner).host_key().exists());
    assert!(!StateDir::new(&h.joiner).host_cert().exists());
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let h = hosts();
    let dir = StateDir::new(&h.ca);
    std::fs::set_permissions(dir.host_key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(
        matches!(err, TrustError::KeyFileTooOpen { mode: 0o644, .. }),
        "{err}"
    );
    let msg = err.to_string();
    let path = dir.host_key().display().to_string();
    assert!(msg.contains(&path) && msg.contains("0644"), "{msg}");
    assert!(msg.contains(&format!("chmod 600 {path}")), "{msg}");
    // Through the binary too.
    let err = fails(&h.ca, &["renew"]);
    assert!(
        err.contains("mode 0644") && err.contains("chmod 600"),
        "{err}"
    );
    // Same for the flag key.
    std::fs::set_permissions(dir.flag_key(), std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        load_flag_key(&h.ca),
        Err(TrustError::KeyFileTooOpen { mode: 0o640, .. })
    ));
}

#[test]
fn renew_issues_a_fresh_certificate_over_mtls() {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    let t = token_json(&h.ca, serve.addr, &[]);
    ok(&h.joiner, &enroll_args("standby", &t));
    let before = show(&h.joiner);
    let key_before = std::fs::read(StateDir::new(&h.joiner).host_key()).unwrap();

    let out = ok(&h.joiner, &["renew"]);
    assert!(out.contains("renewed `standby`"), "{out}");
    let after = show(&h.joiner);
    assert_ne!(after["host"]["fingerprint"], before["host"]["fingerprint"]);
    assert_eq!(after["host"]["name"], "standby");
    assert_eq!(after["host"]["role"], "target");
    assert_ne!(
        std::fs::read(StateDir::new(&h.joiner).host_key()).unwrap(),
        key_before
    );
    let issued = show(&h.ca)["issued"].as_array().unwrap().clone();
    assert!(
        issued
            .iter()
            .any(|c| c["via"] == "renew" && c["fingerprint"] == after["host"]["fingerprint"])
    );

    // A source renewing keeps its flag key in the new certificate (CA host: local renew).
    let flag = load_flag_key(&h.ca).unwrap().verifying_key();
    ok(&h.ca, &["renew"]);
    let id = Identity::load(&StateDir::new(&h.ca)).unwrap();
    assert_eq!(id.info().flag_key, Some(flag));
}

#[tokio::test]
async fn revoked_host_is_refused_by_peers_that_learned_the_list() {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    let t = token_json(&h.ca, serve.addr, &[]);
    ok(&h.joiner, &enroll_args("standby", &t));
    assert!(pair(&h.ca, &h.joiner).await.is_ok());

    let out = ok(&h.ca, &["revoke", "standby"]);
    assert!(out.contains("deny list v1"), "{out}");
    // The CA host (the source) now refuses the standby at the handshake.
    let err = pair(&h.ca, &h.joiner)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("certificate for `standby`") && err.contains("revoked"),
        "{err}"
    );
    // Renewal over mTLS is refused as well.
    let err = fails(&h.joiner, &["renew"]);
    assert!(err.contains("revoked"), "{err}");

    // A third host learns the list from a file.
    let third = h.ca.with_file_name("third");
    let t = token_json(&h.ca, serve.addr, &[]);
    ok(&third, &enroll_args("third", &t));
    assert_eq!(
        show(&third)["deny_list_version"],
        1,
        "serve hands out the list too"
    );
    let copy = h.ca.with_file_name("deny-copy.json");
    std::fs::copy(StateDir::new(&h.ca).deny_list(), &copy).unwrap();
    let out = ok(&third, &["install", copy.to_str().unwrap()]);
    assert!(out.contains("not newer"), "{out}");
    let list = DenyList::load(&third).unwrap();
    let standby_fp: stackclone_certs::Fingerprint = show(&h.joiner)["host"]["fingerprint"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(list.contains(&standby_fp));
    assert_eq!(show(&h.ca)["issued"][1]["revoked"], true);
}

#[test]
fn offline_csr_sign_install() {
    let h = hosts();
    let request = h.joiner.with_file_name("standby.csr.json");
    let bundle = h.joiner.with_file_name("standby.bundle.json");
    ok(
        &h.joiner,
        &[
            "csr",
            "--name",
            "standby",
            "--out",
            request.to_str().unwrap(),
        ],
    );
    ok(
        &h.ca,
        &[
            "sign",
            request.to_str().unwrap(),
            "--role",
            "target",
            "--out",
            bundle.to_str().unwrap(),
        ],
    );
    let pin = show(&h.ca)["ca"]["pin"].as_str().unwrap().to_owned();
    let out = ok(
        &h.joiner,
        &["install", bundle.to_str().unwrap(), "--ca-pin", &pin],
    );
    assert!(out.contains("installed `standby` as target"), "{out}");
    let dir = StateDir::new(&h.joiner);
    assert!(!dir.pending_key().exists());
    let id = Identity::load(&dir).unwrap();
    assert_eq!((id.name(), id.role()), ("standby", Role::Target));
}

#[test]
fn show_json_without_state_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let status = show(tmp.path());
    assert!(status["host"].is_null());
    assert_eq!(status["deny_list_version"], 0);
}
