//! A hostile (but authenticated and allowed) source, and a full target disk.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use stackclone_certs::{Identity, Role, StateDir, Trust};
use stackclone_common::net;
use stackclone_proto::manifest::{EntryKind, Hash, Meta, Xattr};
use stackclone_proto::msg::{Mode, PROTOCOL_VERSION, Pass, Refusal, SourceMsg, TargetMsg};
use stackclone_proto::wire;
use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{Tree, assert_same, snapshot};
use stackclone_tests::{Pair, PairOptions, STACK};

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

/// Connects as the (allowed) source, says Hello for `web`, then sends `frames` raw and returns
/// how the target ended the cycle.
async fn hostile_cycle(src_id: &Path, addr: SocketAddr, frames: &[Vec<u8>]) -> End {
    let dir = StateDir::new(src_id);
    let identity = Identity::load(&dir).expect("source identity");
    let trust = Trust::load(&dir).expect("trust");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(
        stackclone_certs::client_config(&identity, &trust).expect("client config"),
    );
    // The previous cycle's stack lock may outlive its last message by a moment: retry `Busy`.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (conn, mut send, mut recv) = loop {
        let (conn, admission) = stackclone_certs::connect(&ep, addr, &trust, Role::Target)
            .await
            .expect("connect");
        assert_eq!(admission.peer.name, "standby");
        let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
        let hello = SourceMsg::Hello {
            version: PROTOCOL_VERSION,
            stack: STACK.into(),
            mode: Mode::Sync,
            max_delete: 0.5,
        };
        net::send(&mut send, &hello).await.expect("hello");
        match net::recv::<TargetMsg>(&mut recv).await {
            Ok(Some(TargetMsg::Welcome { .. })) => break (conn, send, recv),
            Ok(Some(TargetMsg::Refused(Refusal::Busy { .. })))
                if std::time::Instant::now() < deadline =>
            {
                conn.close(0u32.into(), b"retry");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    };
    for f in frames {
        if send.write_all(f).await.is_err() {
            break;
        }
    }
    let end = match tokio::time::timeout(Duration::from_secs(20), net::recv::<TargetMsg>(&mut recv))
        .await
    {
        Ok(Ok(Some(m))) => End::Told(m),
        Ok(Ok(None)) => End::Silent("control stream finished".into()),
        Ok(Err(e)) => End::Silent(e.to_string()),
        Err(_) => End::Silent("no answer within 20 s".into()),
    };
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    end
}

/// Everything in the pair's temp dir except the target's state dir (a failed cycle may record
/// its error there) and the source's.
fn world(p: &Pair) -> Tree {
    snapshot(p.tmp.path()).without(&["tgt/.stackclone", "src-state"])
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
    fsx::write(p.src.join("data/g"), "after the attack\n");
    p.push_ok();
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "a normal push after the attacks",
    );
    p.stop_target();
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
