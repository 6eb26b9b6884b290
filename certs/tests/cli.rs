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
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path) -> Serve {
        let log = dir.with_extension("serve.log");
        let mut child = bin(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("serve log"))
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
        Serve { child, addr, log }
    }

    /// What `serve` logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The one answer a joiner gets for every token failure.
const TOKEN_REJECTED: &str = "did not accept the join token";

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
        let result = stackclone_certs::accept(incoming, &target_trust).await;
        if let Ok((conn, _)) = &result {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
        }
        result.map(|(_, a)| a)
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config(&source, &source_trust)?);
    let dialed = connect(&client, addr, &source_trust).await;
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
    // The token reaches `enroll` on stdin: never as an argument, which `/proc` shows to all.
    assert!(line.starts_with("echo "), "{line}");
    assert!(
        line.contains("| stackclone-certs enroll --name standby ")
            && line.contains("--token-file -"),
        "{line}"
    );
    assert!(line.contains("--ca-pin sha256:"), "{line}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_stackclone-certs"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-c", line.trim()])
        .env("PATH", path)
        .env("STACKCLONE_DIR", &h.joiner)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.contains("enrolled `standby` as target"), "{out}");

    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = StateDir::new(&h.joiner);
    assert_eq!(mode(dir.host_key()), 0o600);
    assert_eq!(mode(h.joiner.clone()), 0o700);
    // Every host gets a flag key, a target too (it pushes at fail-back), in its certificate.
    assert_eq!(mode(dir.flag_key()), 0o600);
    let target_flag = load_flag_key(&h.joiner).unwrap().verifying_key();
    assert_eq!(
        Identity::load(&dir).unwrap().info().flag_key,
        Some(target_flag)
    );

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
    assert_eq!(on_source.peer.flag_key, Some(target_flag));
    assert_eq!(load_trusted_flag_keys(&h.joiner).unwrap()["primary"], flag);

    let status = show(&h.joiner);
    assert_eq!(status["host"]["name"], "standby");
    assert_eq!(status["host"]["role"], "target");
    assert_eq!(
        status["host"]["flag_key"],
        hex::encode(target_flag.as_bytes())
    );
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
    assert!(err.contains(TOKEN_REJECTED), "{err}");
    assert!(
        serve.log().contains("token already used"),
        "{}",
        serve.log()
    );
    assert!(!StateDir::new(&other).host_cert().exists());
}

#[test]
fn expired_token_is_refused() {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    let t = token_json(&h.ca, serve.addr, &["--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let err = fails(&h.joiner, &enroll_args("standby", &t));
    assert!(err.contains(TOKEN_REJECTED), "{err}");
    let expired = format!("token expired at {}", t["expires_at"].as_str().unwrap());
    assert!(serve.log().contains(&expired), "{}", serve.log());
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
    assert!(err.contains(TOKEN_REJECTED), "{err}");
    // An id that does not exist gets the very same answer.
    let mut unknown = t.clone();
    unknown["token"] = format!("{}.{}", "a".repeat(12), "0".repeat(32)).into();
    let err_unknown = fails(&h.joiner, &enroll_args("standby", &unknown));
    assert_eq!(err, err_unknown);
    let log = serve.log();
    assert!(
        log.contains("token proof") && log.contains("does not verify"),
        "{log}"
    );
    assert!(log.contains("unknown token"), "{log}");
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
    assert!(before["host"]["flag_key"].is_string(), "{before}");

    let out = ok(&h.joiner, &["renew"]);
    assert!(out.contains("renewed `standby`"), "{out}");
    let after = show(&h.joiner);
    assert_ne!(after["host"]["fingerprint"], before["host"]["fingerprint"]);
    assert_eq!(after["host"]["name"], "standby");
    assert_eq!(after["host"]["role"], "target");
    // A renewal keeps the flag key: pins on other hosts survive it.
    assert_eq!(after["host"]["flag_key"], before["host"]["flag_key"]);
    assert!(!out.contains("now has a flag key"), "{out}");
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
    // Without the pin, the bundle's CA would be whatever the file says: refused, nothing
    // written.
    let err = fails(&h.joiner, &["install", bundle.to_str().unwrap()]);
    assert!(err.contains("without `--ca-pin`"), "{err}");
    assert!(!StateDir::new(&h.joiner).host_cert().exists());
    assert!(!StateDir::new(&h.joiner).ca_cert().exists());
    let out = ok(
        &h.joiner,
        &["install", bundle.to_str().unwrap(), "--ca-pin", &pin],
    );
    assert!(out.contains("installed `standby` as target"), "{out}");
    let dir = StateDir::new(&h.joiner);
    assert!(!dir.pending_key().exists());
    assert!(!dir.pending_flag_key().exists());
    let id = Identity::load(&dir).unwrap();
    assert_eq!((id.name(), id.role()), ("standby", Role::Target));
    // The flag key `csr` made is the target's now, and its certificate carries it.
    let flag = load_flag_key(&h.joiner).unwrap().verifying_key();
    assert_eq!(id.info().flag_key, Some(flag));
}

#[test]
fn show_json_without_state_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let status = show(tmp.path());
    assert!(status["host"].is_null());
    assert_eq!(status["deny_list_version"], 0);
}

#[test]
fn csr_and_sign_write_their_default_files_in_the_current_directory() {
    let h = hosts();
    let work = h.joiner.with_file_name("work");
    std::fs::create_dir_all(&work).unwrap();
    // Run where the files land, as a person at a shell would.
    let ok_in = |dir: &Path, args: &[&str]| {
        let out = bin(dir).current_dir(&work).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let out = ok_in(&h.joiner, &["csr", "--name", "standby"]);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(work.join("standby.csr.json").is_file());
    ok_in(&h.ca, &["sign", "standby.csr.json"]);
    assert!(work.join("standby.bundle.json").is_file());
    assert!(!work.join("bundle.json").exists());
}

/// Fleet hosts with `serve` running and the standby enrolled over the network.
fn standby_enrolled() -> (Hosts, Serve) {
    let h = hosts();
    let serve = Serve::start(&h.ca);
    ok(
        &h.joiner,
        &enroll_args("standby", &token_json(&h.ca, serve.addr, &[])),
    );
    (h, serve)
}

fn fingerprint_of(dir: &Path) -> String {
    show(dir)["host"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_name_with_a_live_certificate_is_not_enrolled_again() {
    let (h, serve) = standby_enrolled();
    let real = fingerprint_of(&h.joiner);

    // An unbound token cannot take `standby` nor `primary`; the token stays unused.
    let impostor = h.joiner.with_file_name("impostor");
    let t = token_json(&h.ca, serve.addr, &[]);
    for name in ["standby", "primary"] {
        let err = fails(&impostor, &enroll_args(name, &t));
        assert!(
            err.contains(&format!("`{name}` already has a live certificate")),
            "{err}"
        );
        assert!(err.contains("--replace"), "{err}");
    }
    assert!(!StateDir::new(&impostor).host_cert().exists());
    assert_eq!(show(&h.ca)["tokens"][1]["state"], "unused");
    // Nor offline, nor a token bound to the name without `--replace`.
    let err = fails(
        &h.ca,
        &["token", "create", "--name", "standby", "--server", "x:1"],
    );
    assert!(err.contains("already has a live certificate"), "{err}");
    let request = impostor.with_file_name("standby.csr.json");
    ok(
        &impostor,
        &[
            "csr",
            "--name",
            "standby",
            "--out",
            request.to_str().unwrap(),
        ],
    );
    let err = fails(
        &h.ca,
        &["sign", request.to_str().unwrap(), "--out", "/dev/null"],
    );
    assert!(err.contains("already has a live certificate"), "{err}");
    assert!(
        pair(&h.ca, &h.joiner).await.is_ok(),
        "the real standby still works"
    );

    // A replacement on purpose: the old standby is revoked, the new one works.
    let t = token_json(&h.ca, serve.addr, &["--name", "standby", "--replace"]);
    let replacement = h.joiner.with_file_name("replacement");
    ok(&replacement, &enroll_args("standby", &t));
    let ca = show(&h.ca);
    let revoked: Vec<&str> = ca["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(revoked, [real.as_str()]);
    let err = pair(&h.ca, &h.joiner)
        .await
        .expect_err("old standby refused")
        .to_string();
    assert!(err.contains("revoked"), "{err}");
    assert!(pair(&h.ca, &replacement).await.is_ok());
}

#[tokio::test]
async fn revoke_by_fingerprint_names_one_certificate() {
    let (h, _serve) = standby_enrolled();
    let first = fingerprint_of(&h.joiner);
    ok(&h.joiner, &["renew"]);
    let second = fingerprint_of(&h.joiner);
    assert_ne!(first, second);
    let out = ok(&h.ca, &["revoke", &first]);
    assert!(out.contains("names 1 certificate"), "{out}");
    // The standby's current certificate is not the one revoked.
    assert!(pair(&h.ca, &h.joiner).await.is_ok());
    let err = fails(&h.ca, &["revoke", "sha256:xyz"]);
    assert!(err.contains("sha256:"), "{err}");
}

/// A second certificate for `primary` that the CA should never have issued (a mistake on the CA
/// host): it carries another flag key, and a target that already accepted `primary` refuses it.
#[tokio::test]
async fn a_source_presenting_another_flag_key_for_its_name_is_refused_until_forgotten() {
    let (h, _serve) = standby_enrolled();
    let (_, on_target) = pair(&h.ca, &h.joiner).await.unwrap();
    assert_eq!(on_target.peer.name, "primary");

    let twin = h.ca.with_file_name("twin");
    let ca = stackclone_certs::Ca::load(&StateDir::new(&h.ca)).unwrap();
    let other_flag = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let host = ca
        .new_host(&stackclone_certs::CertProfile::new(
            "primary",
            Role::Source,
            Some(other_flag),
            30,
        ))
        .unwrap();
    host.save(&StateDir::new(&twin)).unwrap();
    let err = pair(&twin, &h.joiner)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("host `primary` presents flag key") && err.contains("forget-flag-key primary"),
        "{err}"
    );
    // The real primary still gets in.
    assert!(pair(&h.ca, &h.joiner).await.is_ok());
    let out = ok(&h.joiner, &["forget-flag-key", "primary"]);
    assert!(out.contains("forgot"), "{out}");
    assert!(
        pair(&twin, &h.joiner).await.is_ok(),
        "pinned afresh after forgetting"
    );
    assert!(
        pair(&h.ca, &h.joiner).await.is_err(),
        "and now the other key is the stranger"
    );
}
