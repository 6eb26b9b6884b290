//! The connection cut at random points of a cycle, through a UDP proxy on loopback that drops
//! packets: both ways, one way only, for good or for a moment. After each cut: the target's live
//! dir is exactly one whole generation, and the next push converges.

use std::process::Child;
use std::time::{Duration, Instant};

use stackclone_tests::faults::{self, one_generation, spawn_push, version, wait_until};
use stackclone_tests::fsx::Rng;
use stackclone_tests::proxy::{Link, UdpProxy};
use stackclone_tests::tree::{diff, snapshot};
use stackclone_tests::{Pair, PairOptions, STACK, run};

/// The QUIC idle timeout both agents run with here: a cut for good is noticed after this.
const IDLE_MS: u64 = 1500;

/// Waits for `push` to end (at most `limit`); its exit status and output.
fn finish(mut push: Child, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    while push.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = push.kill();
            let out = push.wait_with_output().expect("output");
            panic!(
                "the push did not end within {limit:?} of a cut:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = push.wait_with_output().expect("output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until no cycle holds the target's stack (the target ends a dead peer's session after
/// the idle timeout).
fn wait_not_busy(p: &Pair) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.target_status()["busy"] == true {
        assert!(
            Instant::now() < deadline,
            "the target still holds the stack 30 s after a cut:\n{}",
            p.target_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One kind of cut.
#[derive(Debug, Clone, Copy)]
struct Cut {
    link: Link,
    /// `None`: for good (until the push ended); else restored after this long.
    outage: Option<Duration>,
}

#[test]
fn a_cut_connection_leaves_one_generation_and_the_next_push_converges() {
    let mut p = Pair::with(PairOptions {
        // The bandwidth limit stretches the transfer so byte offsets spread over time.
        source_extra: "bandwidth_limit = \"8MiB/s\"\n".into(),
        env: vec![(
            stackclone_certs::IDLE_TIMEOUT_ENV.into(),
            IDLE_MS.to_string(),
        )],
        ..Default::default()
    });
    let (files, blob) = (40, 1 << 20);
    version(&p.src, 1, files, blob);
    p.start_target();
    let target = format!("127.0.0.1:{}", p.port).parse().expect("addr");
    let proxy = UdpProxy::start(target);
    let cfg = std::fs::read_to_string(&p.source_config).expect("source config");
    let dialled = cfg.replace(
        &format!("127.0.0.1:{}", p.port),
        &format!("127.0.0.1:{}", proxy.port),
    );
    assert_ne!(cfg, dialled, "the source config names the target's port");
    std::fs::write(&p.source_config, dialled).expect("point the source at the proxy");

    p.push_ok();
    let full_cycle = proxy.to_target();
    assert!(
        full_cycle > 1 << 20,
        "the first push went through the proxy"
    );
    let mut committed = snapshot(&p.src);
    let mut generation = 1;
    let journal = p.state.join("journal");
    let mut rng = Rng::new(0x5eed_0005);
    let cuts = faults::points();
    let (mut survived_by_quic, mut failed_cleanly, mut advanced, mut after_flag) = (0, 0, 0, 0);
    for k in 0..cuts {
        version(&p.src, 200 + k as u64, files, blob);
        let new = snapshot(&p.src);
        let link = [Link::Down, Link::ToTargetOnly, Link::ToSourceOnly][k % 3];
        let outage = (k % 2 == 1).then(|| Duration::from_millis(100 + rng.below(900)));
        let cut = Cut { link, outage };
        // Where: a byte offset of the transfer, or (every fourth cut) once the commit began.
        let base = proxy.to_target();
        let at_flag = k % 4 == 3;
        let offset = rng.below(full_cycle);
        let mut push = spawn_push(&p);
        let where_ = if at_flag {
            let seen = wait_until(&mut push, Duration::from_secs(60), || journal.exists());
            std::thread::sleep(Duration::from_millis(rng.below(20)));
            format!("after the journal appeared (seen: {seen})")
        } else {
            let reached = wait_until(&mut push, Duration::from_secs(60), || {
                proxy.to_target() >= base + offset
            });
            format!("after {offset} bytes to the target (reached: {reached})")
        };
        let journal_seen = journal.exists();
        proxy.set(cut.link);
        if let Some(d) = cut.outage {
            std::thread::sleep(d);
            proxy.set(Link::Up);
        }
        let (ok, out) = finish(push, Duration::from_secs(60));
        proxy.set(Link::Up);
        wait_not_busy(&p);
        let what = format!("cut {k}: {cut:?} {where_}; push ok: {ok}");
        let moved = one_generation(&p, generation, &committed, &new, &what);
        if ok {
            survived_by_quic += 1;
            assert!(moved, "{what}: the push said it committed:\n{out}");
        } else {
            failed_cleanly += 1;
            assert!(
                out.contains("\"ok\": false") || out.contains("\"ok\":false"),
                "{what}: a failed push must still report its outcome:\n{out}"
            );
        }
        if journal_seen {
            after_flag += 1;
            assert!(moved, "{what}: the commit had begun, it must finish");
        }
        if moved {
            advanced += 1;
            generation += 1;
        }
        // The next push converges.
        let o = p.push_ok();
        assert_eq!(o["generation"], generation + 1, "{what}: {o}");
        generation += 1;
        committed = snapshot(&p.src);
        let d = diff(&committed, &snapshot(&p.live));
        assert!(
            d.is_empty(),
            "{what}: after the converging push:\n  {}",
            d.join("\n  ")
        );
    }
    faults::report(
        "connection cut",
        cuts,
        cuts,
        &format!(
            "{survived_by_quic} pushes rode out the cut, {failed_cleanly} failed cleanly; {advanced} \
             cycles committed, {after_flag} cuts after the commit began; {} datagrams dropped",
            proxy.dropped()
        ),
    );
    assert!(
        failed_cleanly >= cuts / 4,
        "only {failed_cleanly} cuts broke a push"
    );
    assert!(proxy.dropped() > 0);
    assert_eq!(run(p.target_cmd(&["verify", STACK])).code(), Some(0));
    p.stop_target();
}
