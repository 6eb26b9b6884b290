//! SIGKILL at random points: the target's live dir is always exactly one generation.

use std::process::Child;
use std::time::Duration;

use stackclone_tests::faults::{
    self, kill, one_generation, spawn_push, staged, version, wait_until,
};
use stackclone_tests::fsx::Rng;
use stackclone_tests::tree::{diff, snapshot};
use stackclone_tests::{Pair, PairOptions, STACK, run};

/// Where a kill lands. Anchored on what the target's state dir shows rather than on wall-clock
/// guesses, so the spread holds on a loaded machine.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// A random moment in the first `ms` milliseconds: connect, scan, manifest.
    Early { ms: u64 },
    /// Once `n` more contents are staged: somewhere in the transfer.
    Staged { n: usize },
    /// Once the commit journal is published (the flag went out), plus `ms` milliseconds.
    Journal { ms: u64 },
}

impl KillPoint {
    /// The `k`-th kill point of a run: one early, two in the transfer, one on the journal.
    fn pick(k: usize, rng: &mut Rng, files: usize, commit_ms: u64) -> KillPoint {
        match k % 4 {
            0 => KillPoint::Early { ms: rng.below(300) },
            1 | 2 => KillPoint::Staged {
                n: 1 + rng.below(files as u64) as usize,
            },
            _ => KillPoint::Journal {
                ms: rng.below(commit_ms.max(1)),
            },
        }
    }

    /// Waits for this point of `push`'s cycle (at most `limit`).
    fn wait(self, p: &Pair, push: &mut Child, limit: Duration) -> String {
        match self {
            KillPoint::Early { ms } => {
                std::thread::sleep(Duration::from_millis(ms));
                format!("{ms} ms into the push")
            }
            KillPoint::Staged { n } => {
                let base = staged(p);
                let reached = wait_until(push, limit, || staged(p) >= base + n);
                format!("after {n} more staged contents (reached: {reached})")
            }
            KillPoint::Journal { ms } => {
                let journal = p.state.join("journal");
                let seen = wait_until(push, limit, || journal.exists());
                std::thread::sleep(Duration::from_millis(ms));
                format!("{ms} ms after the journal appeared (seen: {seen})")
            }
        }
    }
}

#[test]
fn killed_source_leaves_the_target_at_the_old_generation() {
    // A bandwidth limit stretches the transfer so kills land all over it.
    let mut p = Pair::with(PairOptions {
        source_extra: "bandwidth_limit = \"4MiB/s\"\n".into(),
        ..Default::default()
    });
    let (files, blob) = (60, 3 << 19);
    version(&p.src, 1, files, blob);
    p.start_target();
    p.push_ok();
    let mut committed = snapshot(&p.src);
    let mut generation = 1;
    let mut rng = Rng::new(0x5eed_0003);
    let (mut stayed, mut advanced, mut finished, mut after_flag) = (0, 0, 0, 0);
    let journal = p.state.join("journal");
    let kills = faults::points();
    for k in 0..kills {
        version(&p.src, 100 + k as u64, files, blob);
        let new = snapshot(&p.src);
        // `files` small files and the blob are the contents to stage.
        let point = KillPoint::pick(k, &mut rng, files + 1, 20);
        let mut push = spawn_push(&p);
        let how = point.wait(&p, &mut push, Duration::from_secs(60));
        let journal_seen = journal.exists();
        if kill(push) {
            finished += 1;
        }
        // A clean stop lets a commit that had begun finish; then look.
        p.stop_target();
        let what = format!("source killed {how} (kill {k})");
        let moved = one_generation(&p, generation, &committed, &new, &what);
        if journal_seen {
            after_flag += 1;
            assert!(
                moved,
                "{what}: the flag went out and the commit began, the target must finish it"
            );
        }
        if moved {
            advanced += 1;
            generation += 1;
            committed = new;
        } else {
            stayed += 1;
        }
        p.start_target();
    }
    faults::report(
        "source SIGKILL",
        kills,
        kills,
        &format!(
            "{stayed} left the old generation, {advanced} the new one; {after_flag} after the \
             commit began, {finished} pushes had already ended"
        ),
    );
    assert!(
        stayed >= kills / 2,
        "only {stayed} kills landed before the flag"
    );
    assert!(
        after_flag >= 2,
        "only {after_flag} kills landed after the flag"
    );
    // One normal push converges.
    version(&p.src, 999, files, blob);
    let o = p.push_ok();
    assert_eq!(o["generation"], generation + 1, "{o}");
    let d = diff(&snapshot(&p.src), &snapshot(&p.live));
    assert!(
        d.is_empty(),
        "after the converging push:\n  {}",
        d.join("\n  ")
    );
    assert_eq!(run(p.target_cmd(&["verify", STACK])).code(), Some(0));
}

#[test]
fn killed_target_repairs_itself_to_one_generation() {
    // Many changed files make the commit window (renames and metadata per path) long enough
    // to aim at.
    let mut p = Pair::new();
    let files = 300;
    version(&p.src, 1, files, 0);
    p.start_target();
    p.push_ok();
    let commit_ms = p.target_status()["commit_ms"]
        .as_u64()
        .expect("commit_ms")
        .max(5);
    let mut committed = snapshot(&p.src);
    let mut generation = 1;
    let mut rng = Rng::new(0x5eed_0004);
    let (mut stayed, mut advanced, mut in_commit) = (0, 0, 0);
    let journal = p.state.join("journal");
    let kills = faults::points();
    for k in 0..kills {
        version(&p.src, 100 + k as u64, files, 0);
        let new = snapshot(&p.src);
        let point = KillPoint::pick(k, &mut rng, files, commit_ms);
        let mut push = spawn_push(&p);
        let how = point.wait(&p, &mut push, Duration::from_secs(60));
        let pid = p.target_pid();
        p.kill_target();
        let journal_at_kill = journal.exists();
        // The source would wait for the QUIC idle timeout; it has had its own test.
        kill(push);
        let what = format!(
            "target (pid {pid}) killed {how} (kill {k}, journal present: {journal_at_kill})"
        );
        p.start_target();
        assert!(
            !journal.exists(),
            "{what}: the journal is still there after recovery"
        );
        let moved = one_generation(&p, generation, &committed, &new, &what);
        if journal_at_kill {
            in_commit += 1;
            assert!(
                moved,
                "{what}: a published journal must roll forward to the new generation"
            );
        }
        let v = run(p.target_cmd(&["verify", STACK]));
        assert_eq!(
            v.code(),
            Some(0),
            "{what}: verify after recovery:\n{}",
            v.dump()
        );
        if moved {
            advanced += 1;
            generation += 1;
            committed = new;
        } else {
            stayed += 1;
        }
    }
    faults::report(
        "target SIGKILL",
        kills,
        kills,
        &format!(
            "commit {commit_ms} ms: {stayed} recovered to the old generation, {advanced} to the \
             new one; {in_commit} landed inside a commit (journal published)"
        ),
    );
    assert!(
        in_commit >= 2,
        "only {in_commit} kills landed inside a commit"
    );
    assert!(
        stayed >= kills / 2,
        "only {stayed} kills landed before a commit"
    );
    version(&p.src, 999, files, 0);
    let o = p.push_ok();
    assert_eq!(o["generation"], generation + 1, "{o}");
    let d = diff(&snapshot(&p.src), &snapshot(&p.live));
    assert!(
        d.is_empty(),
        "after the converging push:\n  {}",
        d.join("\n  ")
    );
}
