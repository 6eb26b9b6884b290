//! A hostile (but authenticated) target, against the real `stackclone-source push` (issue 7).
//!
//! The fake target below speaks the real protocol with the pair's real target identity: it
//! welcomes the push, reads the manifest and answers with a `Want` whose basis signature is
//! malformed (a zero block size, above all: `fast_rsync` panics on it). The source must end the
//! push with a clear error, tell the target why, and leave its data alone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stackclone_certs::{Identity, StateDir, Trust};
use stackclone_common::net;
use stackclone_proto::msg::{PROTOCOL_VERSION, SourceMsg, TargetMsg};
use stackclone_proto::path::StackPath;
use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{assert_same, snapshot};
use stackclone_tests::{Pair, SOURCE_NAME, STACK};

const MD4_MAGIC: u32 = 0x7273_0136;

/// A signature header (magic, block size, strong-hash size) followed by `body`.
fn signature(magic: u32, block_size: u32, hash_size: u32, body: &[u8]) -> Vec<u8> {
    let mut s = magic.to_be_bytes().to_vec();
    s.extend_from_slice(&block_size.to_be_bytes());
    s.extend_from_slice(&hash_size.to_be_bytes());
    s.extend_from_slice(body);
    s
}

fn want(basis: Vec<u8>) -> Vec<u8> {
    stackclone_proto::wire::encode_frame(&TargetMsg::Want {
        id: 0,
        path: StackPath::new(b"data/f".to_vec()).expect("path"),
        basis: Some(basis),
    })
    .expect("encode")
}

/// What the fake target saw of one push.
#[derive(Debug)]
struct Seen {
    /// Regular files in the manifest.
    files: Vec<String>,
    /// What the source sent after the bad `Want` (its `Abort`, hopefully).
    answer: Result<Option<SourceMsg>, String>,
}

/// Accepts one push, welcomes it, reads its manifest, sends `want_frame` and returns what the
/// source answers.
async fn serve_once(
    ep: &quinn::Endpoint,
    trust: &Trust,
    want_frame: &[u8],
) -> Result<Seen, String> {
    let incoming = tokio::time::timeout(Duration::from_secs(60), ep.accept())
        .await
        .map_err(|_| "no push within 60 s".to_string())?
        .ok_or("endpoint closed")?;
    let (conn, admission) = stackclone_certs::accept(incoming, trust)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(admission.peer.name, SOURCE_NAME);
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    match net::recv::<SourceMsg>(&mut recv).await {
        Ok(Some(SourceMsg::Hello { stack, .. })) if stack == STACK => {}
        other => return Err(format!("expected Hello for {STACK}, got {other:?}")),
    }
    match net::recv::<SourceMsg>(&mut recv).await {
        Ok(Some(SourceMsg::Claim(_))) => {}
        other => return Err(format!("expected the Claim after Hello, got {other:?}")),
    }
    let welcome = TargetMsg::Welcome {
        version: PROTOCOL_VERSION,
        last_generation: 0,
    };
    net::send(&mut send, &welcome)
        .await
        .map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    loop {
        match net::recv::<SourceMsg>(&mut recv).await {
            Ok(Some(SourceMsg::ManifestPart { entries })) => files.extend(
                entries
                    .into_iter()
                    .filter(|e| e.file().is_some())
                    .map(|e| e.path.to_string()),
            ),
            Ok(Some(SourceMsg::ManifestEnd { .. })) => break,
            // A data-only stack has no pre-copy pass: the final pass begins at once.
            Ok(Some(SourceMsg::FinalPass)) => {}
            other => return Err(format!("expected the manifest, got {other:?}")),
        }
    }
    send.write_all(want_frame)
        .await
        .map_err(|e| e.to_string())?;
    let answer = match tokio::time::timeout(
        Duration::from_secs(20),
        net::recv::<SourceMsg>(&mut recv),
    )
    .await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 20 s".into()),
    };
    conn.close(0u32.into(), b"done");
    Ok(Seen { files, answer })
}

#[test]
fn a_bad_basis_signature_ends_the_push_with_a_clear_error() {
    let p = Pair::new();
    fsx::write(p.src.join("data/f"), Rng::new(3).bytes(100_000));
    fsx::write(p.src.join("conf"), "v1\n");
    let src_before = snapshot(&p.src);
    let entry = [0u8; 12];
    // A `Want` whose basis byte string declares 2^62 bytes and carries none.
    let mut huge = vec![2u8, 0, 6];
    huge.extend_from_slice(b"data/f");
    huge.extend_from_slice(&[1, 253]);
    huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let mut huge_frame = (huge.len() as u32).to_be_bytes().to_vec();
    huge_frame.extend_from_slice(&huge);
    // A frame announcing 9 MiB: a signature of more blocks than a frame may carry.
    let mut too_big = (9u32 << 20).to_be_bytes().to_vec();
    too_big.extend_from_slice(&[0; 1024]);
    let bad = "bad basis signature for data/f: ";
    // (what, the frame the fake target sends, what the source's error must say)
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "block size 0",
            want(signature(MD4_MAGIC, 0, 8, &entry)),
            format!("{bad}signature block size 0 is outside [1024, 1048576]"),
        ),
        (
            "block size 0 and no blocks",
            want(signature(MD4_MAGIC, 0, 8, &[])),
            format!("{bad}signature block size 0 is outside [1024, 1048576]"),
        ),
        (
            "block size u32::MAX",
            want(signature(MD4_MAGIC, u32::MAX, 8, &entry)),
            format!("{bad}signature block size 4294967295 is outside [1024, 1048576]"),
        ),
        (
            "hash size 0",
            want(signature(MD4_MAGIC, 4096, 0, &entry)),
            format!("{bad}signature hash size 0 is outside [4, 16]"),
        ),
        (
            "a foreign magic",
            want(signature(0xdead_beef, 4096, 8, &entry)),
            format!("{bad}signature magic 0xdeadbeef is not the MD4 signature magic 0x72730136"),
        ),
        (
            "a body that is no whole number of blocks",
            want(signature(MD4_MAGIC, 4096, 8, &[0; 13])),
            format!("{bad}signature body of 13 bytes is not a whole number of 12-byte entries"),
        ),
        (
            "a truncated header",
            want(vec![0x72, 0x73]),
            format!("{bad}signature of 2 bytes is shorter than its 12-byte header"),
        ),
        (
            "a signature declaring 2^62 bytes",
            huge_frame,
            "malformed message".to_string(),
        ),
        (
            "a signature too big for a frame",
            too_big,
            "frame of 9437184 bytes is larger than the limit of 8388608".to_string(),
        ),
    ];

    let dir = StateDir::new(&p.tgt_id);
    let identity = Identity::load(&dir).expect("target identity");
    let trust = Trust::load(&dir).expect("trust");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let ep = {
        let _rt = rt.enter();
        quinn::Endpoint::server(
            stackclone_certs::server_config(&identity, &trust).expect("server config"),
            addr,
        )
        .expect("bind the fake target")
    };
    let mut failures = Vec::new();
    for (what, want_frame, expected) in cases {
        let cmd = p.push_cmd(&["--json"]);
        let push = std::thread::spawn(move || {
            let started = Instant::now();
            (stackclone_tests::run(cmd), started.elapsed())
        });
        let seen = rt.block_on(serve_once(&ep, &trust, &want_frame));
        let (r, took) = push.join().expect("push thread");
        let mut fail = |why: String| {
            failures.push(format!(
                "{what}: {why}\n  fake target saw {seen:?}\n{}",
                r.dump()
            ))
        };
        match &seen {
            Err(e) => fail(format!("the fake target failed: {e}")),
            Ok(s) => {
                if !s.files.iter().any(|f| f == "data/f") {
                    fail("data/f is not in the manifest".into());
                }
                match &s.answer {
                    Ok(Some(SourceMsg::Abort { reason, .. })) if reason.contains(&expected) => {}
                    other => fail(format!(
                        "the source did not abort naming {expected:?}: {other:?}"
                    )),
                }
            }
        }
        if r.code() != Some(1) {
            fail(format!("push exited with {:?}, expected 1", r.code()));
        }
        match serde_json::from_str::<serde_json::Value>(&r.stdout) {
            Err(e) => fail(format!("push --json printed no JSON: {e}")),
            Ok(j) => {
                let err = j[0]["error"].as_str().unwrap_or_default();
                if j[0]["ok"] != false || !err.contains(&expected) || !err.contains("web") {
                    fail(format!(
                        "the push's error does not name stack and cause: {:?}",
                        j[0]
                    ));
                }
            }
        }
        if r.stderr.contains("panicked") {
            fail("the source panicked".into());
        }
        if took > Duration::from_secs(30) {
            fail(format!("the push took {took:?}"));
        }
        assert_same(
            &src_before,
            &snapshot(&p.src),
            &format!("source data after {what}"),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
