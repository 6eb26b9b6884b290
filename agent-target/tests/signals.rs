//! The real `stackclone-target run` process and its signals: SIGHUP reloads the config (a bad
//! one is logged and changes nothing), SIGTERM stops it cleanly.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stackclone_proto::msg::Refusal;
use stackclone_proto::session::Cause;
use support::World;

/// A running `stackclone-target run`, killed if the test ends early.
struct Target {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Target {
    fn spawn(w: &World) -> Target {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stackclone-target"))
            .arg("--config")
            .arg(&w.config)
            .args(["--log-format", "json", "run"])
            .env_remove("STACKCLONE_LOG")
            .env_remove("STACKCLONE_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stackclone-target run");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "fields": { "message": line } }));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Target {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next log line whose message is `message` (within 20 s).
    fn wait_for(&mut self, message: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line["fields"]["message"] == message {
                        return line;
                    }
                }
                Err(_) => panic!("no log line {message:?}; saw:\n{:#?}", self.seen),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn refused(result: Result<impl std::fmt::Debug, stackclone_proto::session::CycleError>) -> Refusal {
    match result {
        Err(e) => match e.cause {
            Cause::Refused(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        },
        Ok(r) => panic!("expected a refusal, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_and_sigterm_stops_the_process() {
    let w = World::new();
    w.write_stack("web", "");
    let db = w.source_tree("db", &[("pg.conf", "db v1")]);
    let mut target = Target::spawn(&w);
    let listening = target.wait_for("target listening");
    let addr: SocketAddr = listening["fields"]["listen"]
        .as_str()
        .expect("listen field")
        .parse()
        .expect("listen address");
    let src = w.source();

    assert_eq!(
        refused(src.push(addr, "db", &db).await),
        Refusal::UnknownStack { stack: "db".into() }
    );

    w.write_stack("db", "");
    target.signal("HUP");
    let reloaded = target.wait_for("config reloaded");
    assert_eq!(reloaded["fields"]["added"], r#"["db"]"#, "{reloaded}");
    assert_eq!(reloaded["fields"]["removed"], "[]", "{reloaded}");
    let done = src
        .push(addr, "db", &db)
        .await
        .expect("db served after SIGHUP");
    assert_eq!(done.generation, 1);
    assert_eq!(
        std::fs::read_to_string(w.live("db").join("pg.conf")).unwrap(),
        "db v1"
    );

    // A broken file: logged with the loader's message, and nothing changes.
    std::fs::write(w.conf_d().join("web.toml"), "stack = \"web\"\nbogus = 1\n").unwrap();
    target.signal("HUP");
    let failed = target.wait_for("config reload failed; the running config stays");
    assert_eq!(failed["level"], "ERROR", "{failed}");
    let error = failed["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("web.toml:2"), "{error}");
    assert!(error.contains("bogus"), "{error}");
    std::fs::write(w.source_tree("db", &[]).join("pg.conf"), "db v2").unwrap();
    let done = src.push(addr, "db", &db).await.expect("still served");
    assert_eq!(done.generation, 2);

    target.signal("TERM");
    target.wait_for("target stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = target.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the target did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
