//! A hostile (but authenticated and allowed) source, and a full target disk (issue 7).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use stackclone_certs::{Identity, StateDir, Trust};
use stackclone_common::net;
use stackclone_proto::delta::Chunk;
use stackclone_proto::flag::{SignedStatus, Status};
use stackclone_proto::lineage::{Claim, HistoryId};
use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest, Meta, Xattr};
use stackclone_proto::msg::{
    CycleResult, Mode, Outcome, PROTOCOL_VERSION, Pass, Refusal, SourceMsg, TargetMsg,
};
use stackclone_proto::path::StackPath;
use stackclone_proto::wire;
use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{self, Tree, assert_same, snapshot, snapshot_without};
use stackclone_tests::{Pair, PairOptions, SOURCE_NAME, STACK, TARGET_NAME};

/// [`stackclone_proto::manifest::Entry`] with a raw path: `StackPath` serialises as its bytes,
/// so this has the same bincode layout but can carry a path `StackPath::new` refuses.
#[derive(Serialize)]
struct RawEntry {
    path: Vec<u8>,
    kind: EntryKind,
    meta: Meta,
    xattrs: Vec<Xattr>,
}

/// The first variants of [`SourceMsg`], in the same order (bincode encodes the index).
#[derive(Serialize)]
#[allow(dead_code)]
enum RawSourceMsg {
    Hello {
        version: u32,
        stack: String,
        mode: Mode,
        max_delete: f64,
    },
    ManifestPart {
        entries: Vec<RawEntry>,
    },
    ManifestEnd {
        pass: Pass,
        entries: u64,
        root: Hash,
    },
}

fn entry(path: &[u8], content: &[u8]) -> RawEntry {
    RawEntry {
        path: path.to_vec(),
        kind: EntryKind::File {
            size: content.len() as u64,
            hash: Hash::of(content),
            link_group: None,
        },
        meta: Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1_600_000_000_000_000_000,
        },
        xattrs: Vec::new(),
    }
}

fn dir_entry(path: &[u8]) -> RawEntry {
    RawEntry {
        path: path.to_vec(),
        kind: EntryKind::Dir,
        meta: Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 1_600_000_000_000_000_000,
        },
        xattrs: Vec::new(),
    }
}

fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    wire::encode_frame(msg).expect("encode")
}

/// How one hostile cycle ended, seen from the client.
#[derive(Debug)]
enum End {
    /// The target said why.
    Told(TargetMsg),
    /// The stream or connection ended without a message (the why is shown through `Debug`).
    #[allow(dead_code)]
    Silent(String),
}

/// A client endpoint with the source's identity from `src_id`, and the source's trust.
fn source_endpoint(src_id: &Path) -> (quinn::Endpoint, Trust) {
    let dir = StateDir::new(src_id);
    let identity = Identity::load(&dir).expect("source identity");
    let trust = Trust::load(&dir).expect("trust");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(
        stackclone_certs::client_config(&identity, &trust).expect("client config"),
    );
    (ep, trust)
}

/// A hostile source connected to the target and welcomed for `web`.
struct Peer {
    ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Peer {
    /// Connects as the (allowed) source and says Hello for `web` in `mode`, retrying while the
    /// stack is busy.
    async fn connect(src_id: &Path, addr: SocketAddr, mode: Mode) -> Peer {
        let (ep, trust) = source_endpoint(src_id);
        // The previous cycle's stack lock may outlive its last message by a moment: retry `Busy`.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (conn, admission) = stackclone_certs::connect(&ep, addr, &trust)
                .await
                .expect("connect");
            assert_eq!(admission.peer.name, "standby");
            let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
            let hello = SourceMsg::Hello {
                version: PROTOCOL_VERSION,
                stack: STACK.into(),
                mode,
                max_delete: 0.5,
            };
            net::send(&mut send, &hello).await.expect("hello");
            net::send(&mut send, &claim(src_id)).await.expect("claim");
            match net::recv::<TargetMsg>(&mut recv).await {
                Ok(Some(TargetMsg::Welcome { .. })) => {
                    return Peer {
                        ep,
                        conn,
                        send,
                        recv,
                    };
                }
                Ok(Some(TargetMsg::Refused(Refusal::Busy { .. })))
                    if std::time::Instant::now() < deadline =>
                {
                    conn.close(0u32.into(), b"retry");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("expected Welcome, got {other:?}"),
            }
        }
    }

    /// The target's next control message, or why none came within 20 s.
    async fn next(&mut self) -> Result<TargetMsg, String> {
        match tokio::time::timeout(
            Duration::from_secs(20),
            net::recv::<TargetMsg>(&mut self.recv),
        )
        .await
        {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err("control stream finished".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 20 s".into()),
        }
    }

    /// Sends `frames` on the control stream; false once the target stopped reading.
    async fn ctl(&mut self, frames: &[Vec<u8>]) -> bool {
        for f in frames {
            if self.send.write_all(f).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Sends `frames` on a new file (unidirectional) stream and finishes it.
    async fn file(&self, frames: &[Vec<u8>]) {
        let Ok(mut s) = self.conn.open_uni().await else {
            return;
        };
        for f in frames {
            if s.write_all(f).await.is_err() {
                return;
            }
        }
        let _ = s.finish();
    }

    async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.ep.wait_idle().await;
    }
}

/// Connects as the (allowed) source, says Hello for `web`, then sends `frames` raw and returns
/// how the target ended the cycle.
async fn hostile_cycle(src_id: &Path, addr: SocketAddr, frames: &[Vec<u8>]) -> End {
    let mut peer = Peer::connect(src_id, addr, Mode::Sync).await;
    peer.ctl(frames).await;
    let end = match peer.next().await {
        Ok(m) => End::Told(m),
        Err(why) => End::Silent(why),
    };
    peer.close().await;
    end
}

/// Everything in the pair's temp dir except the target's state dir (a failed cycle may record
/// its error there) and the source's. Neither is walked: the target writes its hash cache there
/// (a temporary file, renamed into place) while a case runs.
fn world(p: &Pair) -> Tree {
    snapshot_without(p.tmp.path(), &["tgt/.stackclone", "src-state"])
}

#[track_caller]
fn assert_nothing_staged(p: &Pair) {
    for d in ["staging/objects", "staging/tmp", "staging/prep"] {
        let n = std::fs::read_dir(p.state.join(d))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(n, 0, "{d} holds {n} entries after a hostile cycle");
    }
    assert!(
        !p.state.join("journal").exists(),
        "a journal after a hostile cycle"
    );
}

#[test]
fn the_raw_manifest_twin_encodes_like_the_real_one() {
    // Guards the hostile test's premise: with a valid path, the twin's frame is the real frame.
    let real = stackclone_proto::manifest::Entry {
        path: stackclone_proto::path::StackPath::new(b"ok/name".to_vec()).expect("valid"),
        kind: EntryKind::File {
            size: 3,
            hash: Hash::of(b"abc"),
            link_group: None,
        },
        meta: Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1_600_000_000_000_000_000,
        },
        xattrs: Vec::new(),
    };
    let a = frame(&SourceMsg::ManifestPart {
        entries: vec![real],
    });
    let b = frame(&RawSourceMsg::ManifestPart {
        entries: vec![entry(b"ok/name", b"abc")],
    });
    assert_eq!(a, b);
    let a = frame(&SourceMsg::ManifestEnd {
        pass: Pass::Final,
        entries: 7,
        root: Hash::of(b"r"),
    });
    let b = frame(&RawSourceMsg::ManifestEnd {
        pass: Pass::Final,
        entries: 7,
        root: Hash::of(b"r"),
    });
    assert_eq!(a, b);
}

/// The target still serves the stack after the attacks (not left busy by a failed or crashed
/// cycle): a normal push commits and the live dir equals the source. Stops the target.
fn still_serves(p: &mut Pair) {
    fsx::write(p.src.join("data/g"), "after the attacks\n");
    p.push_ok();
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "a normal push after the attacks",
    );
    p.stop_target();
}

/// A pair with generation 1 committed and the target running.
fn attacked_pair() -> Pair {
    let mut p = Pair::new();
    fsx::write(p.src.join("data/f"), "legit\n");
    p.start_target();
    p.push_ok();
    p
}

/// Runs every hostile cycle against `p`, checking after each that nothing was written outside
/// the stack, in the live dir or in staging. Returns how each ended, with what the target's log
/// must say about it.
fn attack(p: &Pair) -> Vec<(&'static str, &'static str, End)> {
    let outside = p.tmp.path().join("outside");
    fsx::write(outside.join("precious"), "untouched\n");
    let abs = outside.join("abs-escape");
    let abs = abs.to_str().expect("utf-8").as_bytes().to_vec();
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");

    let end_of = |entries: Vec<RawEntry>| {
        let n = entries.len() as u64;
        vec![
            frame(&RawSourceMsg::ManifestPart { entries }),
            frame(&RawSourceMsg::ManifestEnd {
                pass: Pass::Final,
                entries: n,
                root: Hash::of(b"whatever"),
            }),
        ]
    };
    // A ManifestPart that declares 2^62 entries and carries none.
    let mut huge_part = vec![1u8]; // variant ManifestPart
    huge_part.push(253); // bincode varint: a u64 follows
    huge_part.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let mut huge_frame = (huge_part.len() as u32).to_be_bytes().to_vec();
    huge_frame.extend_from_slice(&huge_part);

    // (what, what the target's log must say, frames)
    let cases: Vec<(&str, &str, Vec<Vec<u8>>)> = vec![
        (
            "`../escape`",
            "path ../escape has a `..` component",
            end_of(vec![entry(b"../escape", b"pwned")]),
        ),
        (
            "`data/../../escape2`",
            "path data/../../escape2 has a `..` component",
            end_of(vec![
                dir_entry(b"data"),
                entry(b"data/../../escape2", b"pwned"),
            ]),
        ),
        (
            "an absolute path",
            "absolute path /",
            end_of(vec![entry(&abs, b"pwned")]),
        ),
        (
            "a declared entry count of 2^62",
            "malformed message",
            vec![huge_frame],
        ),
        (
            "ManifestEnd announcing u64::MAX entries",
            "manifest announced 18446744073709551615 entries, 1 arrived",
            vec![
                frame(&RawSourceMsg::ManifestPart {
                    entries: vec![entry(b"zzz", b"x")],
                }),
                frame(&RawSourceMsg::ManifestEnd {
                    pass: Pass::Final,
                    entries: u64::MAX,
                    root: Hash::of(b"r"),
                }),
            ],
        ),
    ];
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut out = Vec::new();
    for (what, logged, frames) in cases {
        let before = world(p);
        let live = snapshot(&p.live);
        let end = rt.block_on(hostile_cycle(&p.src_id, addr, &frames));
        assert_same(&before, &world(p), &format!("everything after {what}"));
        assert_same(&live, &snapshot(&p.live), &format!("live dir after {what}"));
        assert!(!p.tmp.path().join("tgt/escape").exists() && !p.tmp.path().join("escape").exists());
        assert!(!outside.join("abs-escape").exists());
        assert_nothing_staged(p);
        out.push((what, logged, end));
    }
    out
}

#[test]
fn a_hostile_client_cannot_write_outside_the_stack() {
    let mut p = attacked_pair();
    let ends = attack(&p);
    // Every cycle ended, and the target's log names the stack, the peer, the phase and the cause.
    std::thread::sleep(Duration::from_millis(200));
    let log = p.target_log();
    for (what, logged, end) in &ends {
        let line = log
            .lines()
            .find(|l| l.contains("cycle failed") && l.contains(logged))
            .unwrap_or_else(|| panic!("{what} ({end:?}): no `cycle failed` line with {logged:?} in the target log:\n{log}"));
        for want in ["stack=web", "peer=primary", "phase=manifest"] {
            assert!(line.contains(want), "{what}: {want} missing from {line}");
        }
    }
    // The target is still serving and the stack is not left busy.
    still_serves(&mut p);
}

#[test]
fn a_hostile_client_is_told_why_its_cycle_ended() {
    let p = attacked_pair();
    let untold: Vec<String> = attack(&p)
        .into_iter()
        .filter(|(_, _, end)| !matches!(end, End::Told(TargetMsg::Abort { .. })))
        .map(|(what, _, end)| {
            format!("{what}: the target ended the cycle without an Abort: {end:?}")
        })
        .collect();
    assert!(untold.is_empty(), "{}", untold.join("\n"));
}

/// Unmounts (lazily, if still busy) when dropped.
struct Mount(tempfile::TempDir);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(self.0.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }
}

/// A tmpfs of `size` at a fresh temp dir, or why not.
fn tmpfs(size: &str) -> Result<Mount, String> {
    let dir = tempfile::Builder::new()
        .prefix("stackclone-tmpfs-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir.path())
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount -t tmpfs refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Mount(dir))
}

#[test]
fn a_full_target_disk_ends_the_cycle_cleanly() {
    let mount = match tmpfs("8m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED a_full_target_disk_ends_the_cycle_cleanly: {why}");
            return;
        }
    };
    // Declared after `mount`, so dropped (target killed) before the unmount.
    let mut p = Pair::with(PairOptions {
        target_base: Some(mount.0.path().to_path_buf()),
        ..Default::default()
    });
    assert!(p.live.starts_with(mount.0.path()) && p.state.starts_with(mount.0.path()));
    fsx::write(p.src.join("data/small"), Rng::new(1).bytes(100_000));
    fsx::write(p.src.join("conf"), "v1\n");
    p.start_target();
    p.push_ok();
    let gen1 = snapshot(&p.live);
    assert_same(&snapshot(&p.src), &gen1, "generation 1 on the tmpfs");

    // 12 MiB of incompressible data cannot be staged in an 8 MiB file system.
    fsx::write(p.src.join("data/huge"), Rng::new(2).bytes(12 << 20));
    fsx::write(p.src.join("conf"), "v2\n");
    let r = p.push(&["--json"]);
    assert_eq!(
        r.code(),
        Some(1),
        "a push that fills the target's disk must fail:\n{}",
        r.dump()
    );
    let o = &r.json()[0];
    assert_eq!(o["ok"], false, "{}", r.stdout);
    let err = o["error"].as_str().expect("error").to_string();
    eprintln!("full disk: {err}");
    assert!(
        err.to_lowercase().contains("no space"),
        "the error should say the disk is full: {err:?}"
    );
    assert!(
        err.contains("web"),
        "the error should name the stack: {err:?}"
    );
    assert_same(&gen1, &snapshot(&p.live), "live dir after the failed push");
    assert_eq!(p.target_generation(), 1);
    let st = p.target_status();
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("no space")),
        "{st}"
    );

    // Without the huge file the next push fits and converges: staging left behind by the
    // failed cycle must not keep the disk full.
    fsx::rm(p.src.join("data/huge"));
    let o = p.push_ok();
    assert_eq!(o["generation"], 2, "{o}");
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "the push after the full disk",
    );
    p.stop_target();
    drop(p);
    drop(mount);
}

// ---------------------------------------------------------------------------------------------
// Scripted hostile cycles: a source that speaks the protocol far enough to reach the transfer,
// the flag or the commit, and misbehaves there.

/// Answers one `Want` (`id`, path, whether it carried a basis signature) with the frames of one
/// file stream (none: no stream).
type AnswerFn = Box<dyn Fn(u32, &StackPath, bool) -> Vec<Vec<u8>>>;

/// What a script sends right after `Welcome`.
enum Out {
    /// A frame on the control stream.
    Ctl(Vec<u8>),
    /// A file stream with these frames.
    File(Vec<Vec<u8>>),
}

/// One scripted cycle: `out` after `Welcome`, each `Want` answered by `answer` (or left
/// unanswered), `after_pass` on the control stream once the first `PassDone` arrived. The first
/// message from the target that is neither `Want` nor `PassDone` ends the script.
struct Script {
    mode: Mode,
    out: Vec<Out>,
    answer: Option<AnswerFn>,
    after_pass: Vec<Vec<u8>>,
}

impl Script {
    fn ctl(frames: Vec<Vec<u8>>) -> Script {
        Script {
            mode: Mode::Sync,
            out: frames.into_iter().map(Out::Ctl).collect(),
            answer: None,
            after_pass: Vec::new(),
        }
    }

    fn answer(mut self, answer: AnswerFn) -> Script {
        self.answer = Some(answer);
        self
    }

    fn after_pass(mut self, frames: Vec<Vec<u8>>) -> Script {
        self.after_pass = frames;
        self
    }
}

/// Runs `script`. `on_welcome` runs once the target said `Welcome` (its scan of the live dir may
/// still be running then: the target welcomes first and scans while the source does), and
/// `after_scan` once the target answered the manifest with its first `Want` or `PassDone`,
/// which it can only do after its scan. Returns how the cycle ended and every earlier message
/// of the target.
async fn run_script(
    src_id: &Path,
    addr: SocketAddr,
    script: &Script,
    on_welcome: &dyn Fn(),
    after_scan: &dyn Fn(),
) -> (End, Vec<TargetMsg>) {
    let mut peer = Peer::connect(src_id, addr, script.mode).await;
    on_welcome();
    let mut scanned = false;
    let mut after_scan = || {
        if !std::mem::replace(&mut scanned, true) {
            after_scan();
        }
    };
    for out in &script.out {
        match out {
            Out::Ctl(f) => {
                if !peer.ctl(std::slice::from_ref(f)).await {
                    break;
                }
            }
            Out::File(frames) => peer.file(frames).await,
        }
    }
    let mut seen = Vec::new();
    let mut passed = false;
    let end = loop {
        match peer.next().await {
            Err(why) => break End::Silent(why),
            Ok(TargetMsg::Want { id, path, basis }) => {
                after_scan();
                if let Some(answer) = &script.answer {
                    peer.file(&answer(id, &path, basis.is_some())).await;
                }
                seen.push(TargetMsg::Want {
                    id,
                    path,
                    basis: basis.map(|b| b[..12.min(b.len())].to_vec()),
                });
            }
            Ok(m @ TargetMsg::PassDone { .. }) => {
                after_scan();
                if !passed {
                    passed = true;
                    peer.ctl(&script.after_pass).await;
                }
                seen.push(m);
            }
            Ok(m) => break End::Told(m),
        }
    };
    peer.close().await;
    (end, seen)
}

/// How the target must have told the client that its cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// `Abort` (nothing committed).
    Abort,
    /// `Result` with a failed outcome (the commit was refused).
    CommitFailed,
}

/// One hostile cycle and what must come of it.
struct Case {
    what: &'static str,
    script: Script,
    /// Changes the live dir once the target scanned it (a container racing the cycle).
    after_scan: Option<Box<dyn Fn()>>,
    /// What the target's `cycle failed` line (and what the client is told) must say.
    logged: String,
    /// The phase the `cycle failed` line names (empty: any).
    phase: &'static str,
    told: Told,
    /// Whether content may be left staged (a verified object; the next cycle may use it).
    may_stage: bool,
}

impl Case {
    fn new(
        what: &'static str,
        phase: &'static str,
        logged: impl Into<String>,
        script: Script,
    ) -> Case {
        Case {
            what,
            script,
            after_scan: None,
            logged: logged.into(),
            phase,
            told: Told::Abort,
            may_stage: false,
        }
    }

    fn may_stage(mut self) -> Case {
        self.may_stage = true;
        self
    }

    fn told(mut self, told: Told) -> Case {
        self.told = told;
        self
    }

    fn after_scan(mut self, f: impl Fn() + 'static) -> Case {
        self.after_scan = Some(Box::new(f));
        self
    }
}

/// What went wrong with staging after a hostile cycle, if anything. Verified objects may stay
/// where `may_stage`; prepared files stay after a refused commit (the next cycle's `open`
/// clears them).
fn staging_problem(p: &Pair, may_stage: bool, prepared: bool) -> Option<String> {
    let mut dirs = vec!["staging/tmp"];
    if !may_stage {
        dirs.push("staging/objects");
    }
    if !prepared {
        dirs.push("staging/prep");
    }
    for d in dirs {
        let n = std::fs::read_dir(p.state.join(d))
            .map(|d| d.count())
            .unwrap_or(0);
        if n != 0 {
            return Some(format!("{d} holds {n} entries"));
        }
    }
    p.state
        .join("journal")
        .exists()
        .then(|| "a journal was left behind".to_string())
}

/// The target's log from byte `from` on, once it holds a `cycle failed` or `cycle done` line
/// (waits up to 10 s for it).
fn log_since(p: &Pair, from: usize) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = p.target_log();
        let new = log.get(from..).unwrap_or_default().to_string();
        if new.contains("cycle failed")
            || new.contains("cycle done")
            || std::time::Instant::now() > deadline
        {
            return new;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Peak resident memory of process `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// [`check_cases`], panicking with every failure.
fn run_cases(p: &Pair, cases: Vec<Case>) {
    let failures = check_cases(p, cases);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Runs every case against the running target of `p` and checks after each: nothing written
/// outside the stack or in the live dir, the generation unchanged, nothing prepared or
/// journaled (and nothing staged unless the case allows verified content), a `cycle failed`
/// line with stack, peer, phase and cause, and the client told why. Returns every failure.
fn check_cases(p: &Pair, cases: Vec<Case>) -> Vec<String> {
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut failures = Vec::new();
    for case in cases {
        let what = case.what;
        let generation = p.target_generation();
        let from = p.target_log().len();
        let before = std::cell::RefCell::new(None);
        let on_welcome = || {
            *before.borrow_mut() = Some((world(p), snapshot(&p.live)));
        };
        // What the racing "container" did is not the cycle's doing: the reference is taken
        // again after it.
        let after_scan = || {
            if let Some(f) = &case.after_scan {
                f();
                on_welcome();
            }
        };
        let (end, seen) = rt.block_on(run_script(
            &p.src_id,
            addr,
            &case.script,
            &on_welcome,
            &after_scan,
        ));
        let (world_before, live_before) = before.into_inner().expect("welcomed");
        let mut fail = |why: String| {
            failures.push(format!(
                "{what}: {why}\n  ended with {end:?}\n  after {seen:?}"
            ))
        };
        let diff = tree::diff(&world_before, &world(p));
        if !diff.is_empty() {
            fail(format!("written outside the stack or its state: {diff:?}"));
        }
        let diff = tree::diff(&live_before, &snapshot(&p.live));
        if !diff.is_empty() {
            fail(format!("live dir changed: {diff:?}"));
        }
        let log = log_since(p, from);
        match log.lines().find(|l| l.contains("cycle failed")) {
            None => fail(format!(
                "no `cycle failed` line in the target's log:\n{log}"
            )),
            Some(line) => {
                let phase = format!("phase={}", case.phase);
                for want in ["stack=web", "peer=primary", &phase, &case.logged] {
                    if !line.contains(want) && want != "phase=" {
                        fail(format!(
                            "{want:?} missing from the target's log line: {line}"
                        ));
                    }
                }
                // The line names the kind of the cause, for filters and alerts; a message out
                // of place is a violation of its own kind.
                if !line.contains("cause=") {
                    fail(format!("no cause kind in the target's log line: {line}"));
                }
                if case.logged.starts_with("unexpected ")
                    && !(line.contains("cause=peer_misbehaved")
                        && line.contains("detail=unexpected_message"))
                {
                    fail(format!(
                        "an unexpected message is not logged as one: {line}"
                    ));
                }
            }
        }
        let reason = match (&end, case.told) {
            (End::Told(TargetMsg::Abort { reason, .. }), Told::Abort) => Some(reason),
            (
                End::Told(TargetMsg::Result(CycleResult {
                    outcome: Outcome::Failed { reason, .. },
                    ..
                })),
                Told::CommitFailed,
            ) => Some(reason),
            _ => None,
        };
        match reason {
            None => fail(format!("the client was not told with {:?}", case.told)),
            Some(r) if !r.contains(&case.logged) => fail(format!(
                "the client was told {r:?}, without {:?}",
                case.logged
            )),
            Some(_) => {}
        }
        let prepared = matches!(
            &end,
            End::Told(TargetMsg::Result(CycleResult {
                outcome: Outcome::Failed { .. },
                ..
            }))
        );
        if let Some(why) = staging_problem(p, case.may_stage, prepared) {
            fail(why);
        }
        let now = p.target_generation();
        if now != generation {
            fail(format!("generation {generation} became {now}"));
        }
    }
    failures
}

/// The current user's metadata with `mode`, so that a commit of it can apply it.
fn meta_of(p: &Pair, mode: u32) -> Meta {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&p.live).expect("live dir");
    Meta {
        mode,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: 1_600_000_000_000_000_000,
    }
}

fn path(p: &str) -> StackPath {
    StackPath::new(p.as_bytes().to_vec()).expect("valid path")
}

/// Builds manifests of real entries.
struct Entries<'a> {
    p: &'a Pair,
    entries: Vec<Entry>,
}

impl<'a> Entries<'a> {
    /// `data/` and `data/f` as generation 1 has them (content-wise).
    fn base(p: &'a Pair) -> Self {
        Entries {
            p,
            entries: Vec::new(),
        }
        .dir("data")
        .file("data/f", b"legit\n")
    }

    fn dir(mut self, p: &str) -> Self {
        self.entries.push(Entry {
            path: path(p),
            kind: EntryKind::Dir,
            meta: meta_of(self.p, 0o755),
            xattrs: Vec::new(),
        });
        self
    }

    fn file(self, p: &str, content: &[u8]) -> Self {
        self.sized(p, content.len() as u64, content)
    }

    /// A file whose declared size need not be its content's.
    fn sized(mut self, p: &str, size: u64, content: &[u8]) -> Self {
        self.entries.retain(|e| e.path != path(p));
        self.entries.push(Entry {
            path: path(p),
            kind: EntryKind::File {
                size,
                hash: Hash::of(content),
                link_group: None,
            },
            meta: meta_of(self.p, 0o644),
            xattrs: Vec::new(),
        });
        self
    }

    fn symlink(mut self, p: &str, target: &[u8]) -> Self {
        self.entries.push(Entry {
            path: path(p),
            kind: EntryKind::Symlink {
                target: target.to_vec(),
            },
            meta: meta_of(self.p, 0o777),
            xattrs: Vec::new(),
        });
        self
    }

    /// The final-pass manifest frames (entries sorted) and their root (a dummy if the entries
    /// are no valid manifest).
    fn frames(mut self) -> (Vec<Vec<u8>>, Hash) {
        self.entries.sort_by(|a, b| a.path.cmp(&b.path));
        let root = Manifest::new(self.entries.clone())
            .map(|m| m.root())
            .unwrap_or_else(|_| Hash::of(b"not a manifest"));
        let n = self.entries.len() as u64;
        let frames = vec![
            frame(&SourceMsg::ManifestPart {
                entries: self.entries,
            }),
            frame(&SourceMsg::ManifestEnd {
                pass: Pass::Final,
                entries: n,
                root,
            }),
        ];
        (frames, root)
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The history of the source's data, as the real source would claim it for the pair whose
/// source identity is `src_id` (`<tmp>/src-id` beside `<tmp>/src/<stack>` and its state dir
/// `<tmp>/src-state`): the data's lineage file, else the source's record, made if needed.
fn history_of(src_id: &Path) -> HistoryId {
    let src = src_id.with_file_name("src").join(STACK);
    let record = src_id
        .with_file_name("src-state")
        .join(format!("{STACK}.lineage"));
    stackclone_common::lineage_file::claim(&src, &record, true)
        .expect("lineage")
        .history
}

/// The `Claim` the real source sends after `Hello`.
fn claim(src_id: &Path) -> SourceMsg {
    SourceMsg::Claim(Claim {
        history: history_of(src_id),
        replace_diverged: false,
        hand_over: false,
    })
}

/// What the real source would sign for generation `generation` of a manifest with `root` (the
/// history is filled in by [`flag`]).
fn status(generation: u64, root: Hash) -> Status {
    Status {
        stack: STACK.into(),
        generation,
        history: HistoryId([0; 16]),
        manifest_root: root,
        source_id: SOURCE_NAME.into(),
        target_id: TARGET_NAME.into(),
        created_at: unix_now(),
    }
}

/// A `Flag` frame: `status` signed with the flag key of the identity in `key_dir`, for the
/// history of that source's data.
fn flag(key_dir: &Path, mut status: Status) -> Vec<u8> {
    let key = stackclone_certs::load_flag_key(key_dir).expect("flag key");
    status.history = history_of(key_dir);
    frame(&SourceMsg::Flag(SignedStatus::sign(status, &key)))
}

/// The frames of one honest file stream: `content` literally.
fn literal(id: u32, content: &[u8]) -> Vec<Vec<u8>> {
    let len = content.len() as u64;
    let mut frames = vec![frame(&SourceMsg::FileBegin { id, len })];
    if !content.is_empty() {
        frames.push(frame(&SourceMsg::FileData {
            id,
            chunk: Chunk::Literal {
                zstd: false,
                out_len: content.len() as u32,
                bytes: content.to_vec(),
            },
        }));
    }
    frames.push(frame(&SourceMsg::FileEnd {
        id,
        hash: Hash::of(content),
        len,
    }));
    frames
}

/// Answers every `Want` honestly from `files` (path, content).
fn honest(files: &[(&str, &[u8])]) -> AnswerFn {
    let files: Vec<(StackPath, Vec<u8>)> =
        files.iter().map(|(p, c)| (path(p), c.to_vec())).collect();
    Box::new(move |id, want, _| {
        let content = files
            .iter()
            .find(|(p, _)| p == want)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("the target wants {want}, which the script does not have"));
        literal(id, &content)
    })
}

/// Answers every `Want` with `frames(id)`.
fn always(frames: impl Fn(u32) -> Vec<Vec<u8>> + 'static) -> AnswerFn {
    Box::new(move |id, _, _| frames(id))
}

#[test]
fn the_raw_file_data_twin_encodes_like_the_real_one() {
    // Guards the premise of the raw frames below: FileData is variant 4, Chunk::Literal is
    // variant 1, and the byte string's length is a varint right before its bytes.
    let real = wire::encode_frame(&SourceMsg::FileData {
        id: 0,
        chunk: Chunk::Literal {
            zstd: false,
            out_len: 16,
            bytes: vec![7; 16],
        },
    })
    .expect("encode");
    assert_eq!(
        &real[4..],
        &[&[4u8, 0, 1, 0, 16, 16][..], &[7; 16]].concat()
    );
    let real = wire::encode_frame(&TargetMsg::Want {
        id: 0,
        path: path("data/f"),
        basis: Some(vec![9; 3]),
    })
    .expect("encode");
    assert_eq!(
        &real[4..],
        &[2u8, 0, 6, b'd', b'a', b't', b'a', b'/', b'f', 1, 3, 9, 9, 9]
    );
}

/// A frame whose payload is `payload`.
fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// `FileData { id, Literal { out_len: 16, bytes } }` whose byte string declares 2^62 bytes and
/// carries none.
fn file_data_declaring_2_62(id: u8) -> Vec<u8> {
    let mut payload = vec![4u8, id, 1, 0, 16, 253];
    payload.extend_from_slice(&(1u64 << 62).to_le_bytes());
    raw_frame(&payload)
}

#[test]
fn out_of_order_messages_end_the_cycle() {
    let p = attacked_pair();
    let new = b"new content\n".as_slice();
    let (with_new, _) = Entries::base(&p).file("data/new", new).frames();
    // Another content for a second case that stages: a staged content is not asked for again.
    let other = b"other new content\n".as_slice();
    let (with_other, _) = Entries::base(&p).file("data/other", other).frames();
    let (as_live, _) = Entries::base(&p).frames();
    let data = |id| {
        frame(&SourceMsg::FileData {
            id,
            chunk: Chunk::Literal {
                zstd: false,
                out_len: 3,
                bytes: b"abc".to_vec(),
            },
        })
    };
    let end = |id| {
        frame(&SourceMsg::FileEnd {
            id,
            hash: Hash::of(b"abc"),
            len: 3,
        })
    };
    let hello = frame(&SourceMsg::Hello {
        version: PROTOCOL_VERSION,
        stack: STACK.into(),
        mode: Mode::Sync,
        max_delete: 1.0,
    });
    let flag = flag(&p.src_id, status(2, Hash::of(b"nothing")));
    let cat = |a: &[Vec<u8>], b: &[Vec<u8>]| [a, b].concat();
    let cases = vec![
        Case::new(
            "FileData before any manifest",
            "manifest",
            "unexpected FileData while Manifest",
            Script::ctl(vec![data(0)]),
        ),
        Case::new(
            "FileEnd before any manifest",
            "manifest",
            "unexpected FileEnd while Manifest",
            Script::ctl(vec![end(0)]),
        ),
        Case::new(
            "FileBegin on the control stream",
            "manifest",
            "unexpected FileBegin while Manifest",
            Script::ctl(vec![frame(&SourceMsg::FileBegin { id: 0, len: 3 })]),
        ),
        Case::new(
            "a second Hello",
            "manifest",
            "unexpected Hello while Manifest",
            Script::ctl(vec![hello]),
        ),
        Case::new(
            "a second Claim",
            "manifest",
            "unexpected Claim while Manifest",
            Script::ctl(vec![frame(&claim(&p.src_id))]),
        ),
        Case::new(
            "a Flag before ManifestEnd",
            "manifest",
            "unexpected Flag while Manifest",
            Script::ctl(vec![with_new[0].clone(), flag.clone()]),
        ),
        Case::new(
            "ManifestPart after the final ManifestEnd",
            "flag",
            "unexpected ManifestPart while AwaitFlag",
            // After the target's PassDone, so that it is past its scan whatever the timing: a
            // part that comes while the end still waits for the scan is "while
            // Transfer(Final)", which the next case covers.
            Script::ctl(as_live.clone()).after_pass(as_live[..1].to_vec()),
        ),
        Case::new(
            "ManifestEnd twice",
            "transfer",
            "unexpected ManifestEnd while Transfer(Final)",
            Script::ctl(cat(&with_new, &with_new[1..])),
        ),
        Case::new(
            "FileEnd on the control stream during the transfer",
            "transfer",
            "unexpected FileEnd while Transfer(Final)",
            Script::ctl(cat(&with_new, &[end(0)])),
        ),
        Case::new(
            "a file stream for an id never wanted",
            "transfer",
            "data for file id 999, which was not wanted",
            Script::ctl(with_new.clone()).answer(always(|_| literal(999, b"abc"))),
        ),
        // The session, not the driver, judges a data stream that is no valid transfer (it
        // used to be dropped silently, or retried literally).
        Case::new(
            "a file stream that does not begin with FileBegin",
            "transfer",
            "a file stream that is no valid transfer: a file on it does not begin with FileBegin: \
             FileData",
            Script::ctl(with_new.clone()).answer(always(move |id| vec![data(id)])),
        ),
        Case::new(
            "another file's frame on a file stream",
            "transfer",
            "a file stream that is no valid transfer: FileData on the stream of file id",
            Script::ctl(with_new.clone()).answer(always(move |id| {
                let mut frames = literal(id, b"abc");
                frames[1] = data(id + 1);
                frames
            })),
        ),
        Case::new(
            "a file stream before any manifest",
            "manifest",
            "data for file id 0 outside a transfer (nothing was wanted)",
            Script {
                mode: Mode::Sync,
                out: vec![Out::File(literal(0, b"abc"))],
                answer: None,
                after_pass: Vec::new(),
            },
        ),
        // Last, since they leave content staged. A stream may carry several files in a row;
        // each must be wanted and begin properly, and the files before the bad one stay staged
        // (verified). The good file may end the transfer before the bad one is read (then the
        // cycle ends waiting for the flag).
        Case::new(
            "a second file on a stream, never wanted",
            "",
            "the peer broke the protocol: data for file id 999",
            Script::ctl(with_new.clone()).answer(always(move |id| {
                cat(&literal(id, new), &literal(999, b"abc"))
            })),
        )
        .may_stage(),
        Case::new(
            "a frame after a file's end that is no FileBegin",
            "",
            "a file stream that is no valid transfer: a file on it does not begin with FileBegin: \
             FileEnd",
            Script::ctl(with_other.clone())
                .answer(always(move |id| cat(&literal(id, other), &[end(id)]))),
        )
        .may_stage(),
    ];
    run_cases(&p, cases);
    // Only the two cases with a second file on a stream send `new` and `other` whole: the file
    // before the bad frame was staged.
    for content in [new, other] {
        let object = p
            .state
            .join("staging/objects")
            .join(Hash::of(content).to_hex());
        assert!(
            object.is_file(),
            "the file before the bad frame on a shared stream was not staged ({})",
            String::from_utf8_lossy(content).trim_end()
        );
    }
    let mut p = p;
    still_serves(&mut p);
}

/// A second fleet's source identity, named like ours: its flag key is a random one.
fn forger(p: &Pair) -> std::path::PathBuf {
    let dir = p.tmp.path().join("forger-id");
    stackclone_tests::run({
        let mut c = std::process::Command::new(stackclone_tests::bin("stackclone-certs"));
        c.arg("--dir")
            .arg(&dir)
            .args(["init", "--name", SOURCE_NAME]);
        c
    })
    .ok();
    dir
}

#[test]
fn a_forged_replayed_or_misaddressed_flag_commits_nothing() {
    let mut p = attacked_pair();
    let new = b"new content\n".as_slice();
    let (manifest, root) = Entries::base(&p).file("data/new", new).frames();
    let forger = forger(&p);
    let key = p.src_id.clone();
    // A plausible cycle: the manifest, the wanted file honestly, then the flag.
    let cycle = |flag: Vec<u8>| {
        Script::ctl(manifest.clone())
            .answer(honest(&[("data/new", new)]))
            .after_pass(vec![flag])
    };
    let flag_case =
        |what, logged: String, flag| Case::new(what, "flag", logged, cycle(flag)).may_stage();
    let mut short = SignedStatus::sign(
        status(2, root),
        &stackclone_certs::load_flag_key(&key).expect("flag key"),
    );
    short.signature.pop();
    let cases = vec![
        flag_case(
            "a flag signed with another key",
            "flag signature does not verify against the flag key of source `primary`".into(),
            flag(&forger, status(2, root)),
        ),
        flag_case(
            "a replayed flag (generation 1 again)",
            "flag generation 1 is not above the last applied generation 1 (replay?)".into(),
            flag(&key, status(1, root)),
        ),
        flag_case(
            "a flag for generation 0",
            "flag generation 0 is not above the last applied generation 1 (replay?)".into(),
            flag(&key, status(0, root)),
        ),
        flag_case(
            "a flag for another target",
            "flag is for target `standby-2`, this is `standby`".into(),
            flag(
                &key,
                Status {
                    target_id: "standby-2".into(),
                    ..status(2, root)
                },
            ),
        ),
        flag_case(
            "a flag for another stack",
            "flag is for stack `db`, expected `web`".into(),
            flag(
                &key,
                Status {
                    stack: "db".into(),
                    ..status(2, root)
                },
            ),
        ),
        flag_case(
            "a flag naming another source",
            "flag names source `mallory`, but the peer is `primary`".into(),
            flag(
                &key,
                Status {
                    source_id: "mallory".into(),
                    ..status(2, root)
                },
            ),
        ),
        flag_case(
            "a day-old flag",
            "s away from this host's clock".into(),
            flag(
                &key,
                Status {
                    created_at: unix_now() - 86_400,
                    ..status(2, root)
                },
            ),
        ),
        flag_case(
            "a flag for another manifest",
            format!("differs from the staged manifest root {}", root.to_hex()),
            flag(&key, status(2, Hash::of(b"another tree"))),
        ),
        flag_case(
            "a truncated signature",
            "flag signature is 63 bytes, expected 64".into(),
            frame(&SourceMsg::Flag(short)),
        ),
    ];
    run_cases(&p, cases);
    // The same cycle with a good flag commits: the cases above failed for their flag alone.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let good = cycle(flag(&key, status(2, root)));
    let (end, seen) = rt.block_on(run_script(&p.src_id, addr, &good, &|| {}, &|| {}));
    assert!(
        matches!(
            &end,
            End::Told(TargetMsg::Result(CycleResult {
                generation: 2,
                outcome: Outcome::Committed { .. }
            }))
        ),
        "the good flag: {end:?} after {seen:?}\n{}",
        p.target_log()
    );
    assert_eq!(
        std::fs::read(p.live.join("data/new")).expect("committed"),
        new
    );
    fsx::write(p.src.join("data/new"), new);
    fsx::write(p.src.join("data/g"), "after the attacks\n");
    assert_eq!(p.push_ok()["generation"], 3);
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "a normal push after the attacks",
    );
    p.stop_target();
}

/// A librsync delta: COPY `copy` bytes from offset 0 of the basis, then `literal`.
fn delta(copy: u8, literal: &[u8]) -> Vec<u8> {
    assert!((1..=64).contains(&literal.len()));
    let mut d = 0x7273_0236u32.to_be_bytes().to_vec();
    d.extend_from_slice(&[0x45, 0, copy]);
    d.push(literal.len() as u8);
    d.extend_from_slice(literal);
    d.push(0);
    d
}

#[test]
fn a_file_that_rebuilds_the_wrong_content_is_refused() {
    let mut p = attacked_pair();
    let key = p.src_id.clone();
    let new = b"new content\n".as_slice();
    let wrong = b"NEW CONTENT\n".as_slice();
    let (with_new, new_root) = Entries::base(&p).file("data/new", new).frames();
    // data/f changes from "legit\n" to "legit\nmore\n": the target offers it as a delta basis.
    let grown = b"legit\nmore\n".as_slice();
    let (with_grown, _) = Entries::base(&p).file("data/f", grown).frames();
    let cases = vec![
        Case::new(
            "wrong bytes under the declared hash",
            "transfer",
            "the rebuilt content of data/new did not match its hash, twice",
            Script::ctl(with_new.clone()).answer(always(move |id| {
                let mut frames = literal(id, wrong);
                // FileEnd declares what the manifest wants, not what was sent.
                *frames.last_mut().expect("FileEnd") = frame(&SourceMsg::FileEnd {
                    id,
                    hash: Hash::of(new),
                    len: new.len() as u64,
                });
                frames
            })),
        ),
        Case::new(
            "a delta against the live basis that rebuilds the wrong content",
            "transfer",
            "the rebuilt content of data/f did not match its hash, twice",
            Script::ctl(with_grown).answer(always(move |id| {
                let d = delta(6, b"MORE\n");
                vec![
                    frame(&SourceMsg::FileBegin {
                        id,
                        len: grown.len() as u64,
                    }),
                    frame(&SourceMsg::FileData {
                        id,
                        chunk: Chunk::Delta {
                            zstd: false,
                            last: true,
                            out_len: grown.len() as u32,
                            bytes: d,
                        },
                    }),
                    frame(&SourceMsg::FileEnd {
                        id,
                        hash: Hash::of(grown),
                        len: grown.len() as u64,
                    }),
                ]
            })),
        ),
        // Wrong bytes that are honest about their own hash are staged as what they are, the
        // file is reported missing, and a flag for the manifest is then out of order.
        Case::new(
            "wrong bytes with their own hash, then a valid flag",
            "manifest",
            "unexpected Flag while Manifest",
            Script::ctl(with_new.clone())
                .answer(always(move |id| literal(id, wrong)))
                .after_pass(vec![flag(&key, status(2, new_root))]),
        )
        .may_stage(),
    ];
    run_cases(&p, cases);
    still_serves(&mut p);
}

#[test]
fn huge_declared_lengths_allocate_nothing_and_end_the_cycle() {
    let mut p = attacked_pair();
    let key = p.src_id.clone();
    let new = b"new content\n".as_slice();
    let (with_new, new_root) = Entries::base(&p).file("data/new", new).frames();
    let (with_huge, huge_root) = Entries::base(&p)
        .sized("data/huge", u64::MAX, b"abc")
        .frames();
    let begin = |id, len| frame(&SourceMsg::FileBegin { id, len });
    let end = |id, content: &[u8]| {
        frame(&SourceMsg::FileEnd {
            id,
            hash: Hash::of(content),
            len: content.len() as u64,
        })
    };
    let data = |id, out_len, bytes: &[u8]| {
        frame(&SourceMsg::FileData {
            id,
            chunk: Chunk::Literal {
                zstd: false,
                out_len,
                bytes: bytes.to_vec(),
            },
        })
    };
    let four_mib = Rng::new(7).bytes(4 << 20);
    let twice = |p: &str| format!("the rebuilt content of {p} did not match its hash, twice");
    let cases = vec![
        Case::new(
            "FileBegin declaring u64::MAX bytes",
            "transfer",
            twice("data/new"),
            Script::ctl(with_new.clone()).answer(always(move |id| {
                vec![
                    begin(id, u64::MAX),
                    data(id, new.len() as u32, new),
                    end(id, new),
                ]
            })),
        ),
        Case::new(
            "a literal chunk declaring u32::MAX bytes of output",
            "transfer",
            twice("data/new"),
            Script::ctl(with_new.clone()).answer(always(move |id| {
                vec![
                    begin(id, new.len() as u64),
                    data(id, u32::MAX, new),
                    end(id, new),
                ]
            })),
        ),
        Case::new(
            "a delta window declaring u32::MAX bytes of output",
            "transfer",
            twice("data/new"),
            Script::ctl(with_new.clone()).answer(always(move |id| {
                vec![
                    begin(id, u64::MAX),
                    frame(&SourceMsg::FileData {
                        id,
                        chunk: Chunk::Delta {
                            zstd: false,
                            last: true,
                            out_len: u32::MAX,
                            bytes: delta(1, b"x"),
                        },
                    }),
                    end(id, new),
                ]
            })),
        ),
        Case::new(
            "FileBegin declaring 1 TiB, 4 MiB arriving, then the stream ending",
            "manifest",
            "unexpected Flag while Manifest",
            Script::ctl(with_new.clone())
                .answer(always(move |id| {
                    vec![begin(id, 1 << 40), data(id, 4 << 20, &four_mib)]
                }))
                .after_pass(vec![flag(&key, status(2, new_root))]),
        ),
        Case::new(
            "FileData on a file stream declaring 2^62 bytes",
            "manifest",
            "unexpected Flag while Manifest",
            Script::ctl(with_new.clone())
                .answer(always(move |id| {
                    vec![
                        begin(id, new.len() as u64),
                        file_data_declaring_2_62(id as u8),
                    ]
                }))
                .after_pass(vec![flag(&key, status(2, new_root))]),
        ),
        Case::new(
            "a manifest entry of u64::MAX bytes",
            "transfer",
            twice("data/huge"),
            Script::ctl(with_huge.clone()).answer(always(move |id| {
                vec![begin(id, u64::MAX), data(id, 3, b"abc"), end(id, b"abc")]
            })),
        ),
        Case::new(
            "FileData on the control stream declaring 2^62 bytes",
            "manifest",
            "malformed message",
            Script::ctl(vec![file_data_declaring_2_62(0)]),
        ),
        Case::new(
            "a frame declaring 4 GiB",
            "manifest",
            "frame of 4294967295 bytes is larger than the limit of 8388608",
            Script::ctl(vec![vec![0xff; 4]]),
        ),
        // The 3 bytes hash as declared, but are not the u64::MAX bytes the manifest (and the
        // flag) promise: committing them would record a generation that is not what is live.
        // Last, because its verified 3 bytes may stay staged.
        Case::new(
            "a manifest entry of u64::MAX bytes sent as 3 bytes, then a valid flag",
            "transfer",
            "data/huge is declared as 18446744073709551615 bytes, but the content with its hash has 3",
            Script::ctl(with_huge.clone())
                .answer(always(move |id| literal(id, b"abc")))
                .after_pass(vec![flag(&key, status(2, huge_root))]),
        )
        .may_stage(),
    ];
    let pid = p.target_pid();
    let before = vm_hwm_kib(pid);
    let mut failures = check_cases(&p, cases);
    let after = vm_hwm_kib(pid);
    eprintln!("target VmHWM: {before} KiB before the attacks, {after} KiB after");
    if after > before + (64 << 10) {
        failures.push(format!(
            "the target's peak memory grew from {before} KiB to {after} KiB"
        ));
    }

    // A dry run adds up the sizes of what it would send: two files of u64::MAX bytes must
    // neither crash the target nor go unanswered.
    let (dry, _) = Entries::base(&p)
        .sized("data/huge1", u64::MAX, b"dry 1")
        .sized("data/huge2", u64::MAX, b"dry 2")
        .frames();
    let from = p.target_log().len();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let script = Script {
        mode: Mode::DryRun,
        ..Script::ctl(dry)
    };
    let (end, _) = rt.block_on(run_script(&p.src_id, addr, &script, &|| {}, &|| {}));
    let log = log_since(&p, from);
    match &end {
        End::Told(TargetMsg::Plan(plan)) if plan.send_count == 2 => {}
        End::Told(TargetMsg::Abort { .. }) => {}
        other => failures.push(format!(
            "a dry run of two files of u64::MAX bytes: ended with {other:?}\n{log}"
        )),
    }
    if log.contains("panicked") {
        failures.push(format!(
            "a dry run of two files of u64::MAX bytes: the target panicked:\n{log}"
        ));
    }
    // The target still serves the stack (not left busy by a failed or crashed cycle).
    still_serves(&mut p);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_symlink_in_the_live_dir_redirects_no_write() {
    let mut p = Pair::new();
    fsx::write(p.src.join("data/f"), "legit\n");
    fsx::write(p.src.join("data/sub/x"), "x\n");
    p.start_target();
    p.push_ok();
    let key = p.src_id.clone();
    let outside = p.tmp.path().join("outside");
    fsx::write(outside.join("precious"), "untouched\n");
    let outside_bytes = outside.to_str().expect("utf-8").as_bytes().to_vec();
    // What a container could do to the live dir between cycles.
    fsx::ln_s(&outside, p.live.join("data/evil"));
    let gen1 = || {
        Entries::base(&p)
            .dir("data/sub")
            .file("data/sub/x", b"x\n")
            .symlink("data/evil", &outside_bytes)
    };
    let (through_evil, _) = Entries::base(&p)
        .dir("data/sub")
        .file("data/sub/x", b"x\n")
        .file("data/evil/file", b"pwned\n")
        .frames();
    let (through_root_link, _) = gen1()
        .symlink("x", b"/")
        .dir("x/etc")
        .file("x/etc/passwd", b"pwned\n")
        .frames();
    let (into_sub, sub_root) = gen1().file("data/sub/y", b"pwned\n").frames();
    let (live_sub, outside2) = (p.live.join("data/sub"), outside.clone());
    let cases = vec![
        Case::new(
            "data/evil/file below the planted symlink",
            "manifest",
            "manifest entry data/evil/file has no parent directory entry",
            Script::ctl(through_evil),
        ),
        Case::new(
            "x -> / and then x/etc/passwd",
            "manifest",
            "manifest entry x/etc lies below x, which is not a directory",
            Script::ctl(through_root_link),
        ),
        // data/sub is a real directory when the target scans, and a symlink to `outside` by the
        // time it commits data/sub/y into it.
        Case::new(
            "a directory swapped for a symlink after the scan",
            "commit",
            "data/sub is not a plain directory inside the live dir",
            Script::ctl(into_sub)
                .answer(honest(&[("data/sub/y", b"pwned\n")]))
                .after_pass(vec![flag(&key, status(2, sub_root))]),
        )
        .told(Told::CommitFailed)
        .may_stage()
        .after_scan(move || {
            std::fs::remove_dir_all(&live_sub).expect("rm data/sub");
            fsx::ln_s(&outside2, &live_sub);
        }),
    ];
    run_cases(&p, cases);
    assert!(!outside.join("y").exists() && !outside.join("file").exists());

    // A validly flagged generation that makes data/evil and data/sub (both symlinks to
    // `outside` now) real directories with files in them: committed, and all of it inside the
    // stack.
    let outside_before = snapshot(&outside);
    let (real_dirs, root) = Entries::base(&p)
        .dir("data/evil")
        .file("data/evil/file", b"inside\n")
        .dir("data/sub")
        .file("data/sub/x", b"x\n")
        .frames();
    let script = Script::ctl(real_dirs)
        .answer(honest(&[
            ("data/evil/file", b"inside\n"),
            ("data/sub/x", b"x\n"),
        ]))
        .after_pass(vec![flag(&key, status(2, root))]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let (end, seen) = rt.block_on(run_script(&p.src_id, addr, &script, &|| {}, &|| {}));
    assert!(
        matches!(
            &end,
            End::Told(TargetMsg::Result(CycleResult {
                generation: 2,
                outcome: Outcome::Committed { .. }
            }))
        ),
        "{end:?} after {seen:?}\n{}",
        p.target_log()
    );
    assert_same(
        &outside_before,
        &snapshot(&outside),
        "outside after the commit",
    );
    for dir in ["data/evil", "data/sub"] {
        let md = std::fs::symlink_metadata(p.live.join(dir)).expect("lstat");
        assert!(md.is_dir(), "{dir} is no real directory after the commit");
    }
    assert_eq!(
        std::fs::read(p.live.join("data/evil/file")).expect("file"),
        b"inside\n"
    );
    assert_eq!(p.target_generation(), 2);
    // And the real source puts its tree back.
    p.push_ok();
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "a normal push after the attacks",
    );
    assert_same(
        &outside_before,
        &snapshot(&outside),
        "outside after the last push",
    );
    p.stop_target();
}

/// What a source sends is the source's text: an abort reason or a QUIC close reason with a
/// newline and terminal escapes cannot forge a line in the target's log, nor reach a terminal
/// raw.
#[test]
fn a_peer_cannot_forge_log_lines_or_send_terminal_escapes() {
    let mut p = attacked_pair();
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let forged = "INFO stackclone_target::serve: cycle committed stack=web generation=99";
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut peer = Peer::connect(&p.src_id, addr, Mode::Sync).await;
        let abort = SourceMsg::Abort {
            phase: stackclone_proto::msg::Phase::Transfer,
            reason: format!("gave up\n{forged}\u{1b}[2J"),
        };
        peer.ctl(&[frame(&abort)]).await;
        let _ = peer.next().await;
        peer.close().await;
        let peer = Peer::connect(&p.src_id, addr, Mode::Sync).await;
        peer.conn.close(
            7u32.into(),
            format!("bye\n{forged}\u{1b}]0;owned\u{7}").as_bytes(),
        );
        peer.ep.wait_idle().await;
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Both cycles ended (the abort's reason is logged; the close may be logged as a lost
    // connection only).
    while p.target_log().matches("cycle failed").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the target did not log both ends:\n{}",
            p.target_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = p.target_log();
    assert!(log.contains("gave up\\nINFO stackclone_target"), "{log}");
    for line in log.lines() {
        assert!(
            !line.starts_with("INFO stackclone_target"),
            "forged: {line}\n{log}"
        );
    }
    assert!(
        !log.contains('\u{1b}'),
        "a terminal escape reached the log:\n{log}"
    );
    assert!(log.contains("\\u{1b}"), "{log}");
    still_serves(&mut p);
}

/// An admitted source that opens no control stream, keeping the connection alive with QUIC
/// keep-alives only, is closed by the target.
#[test]
fn an_admitted_source_that_sends_nothing_is_disconnected() {
    let mut p = Pair::new();
    p.start_target();
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let closed = rt.block_on(async {
        let (ep, trust) = source_endpoint(&p.src_id);
        let (conn, _) = stackclone_certs::connect(&ep, addr, &trust)
            .await
            .expect("admitted");
        let started = std::time::Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(40), conn.closed())
            .await
            .expect("the target closed the idle connection");
        (started.elapsed(), why)
    });
    let (after, why) = closed;
    assert!(
        after < Duration::from_secs(30),
        "closed only after {after:?}"
    );
    assert!(
        format!("{why}").contains("no control stream"),
        "closed with {why}"
    );
    // The target logged it before it closed, but the harness reads its stderr on another
    // thread: under load the line arrives a moment after the close does.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !p.target_log().contains("opened no control stream") {
        assert!(std::time::Instant::now() < deadline, "{}", p.target_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
