//! Shared parts of the fault campaign (`tests/tests/crash.rs`, `tests/tests/cuts.rs`,
//! `tests/tests/staging_faults.rs`): versions of a test tree, the "exactly one whole generation"
//! check, and how many fault points a run tries.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::Pair;
use crate::fsx::{self, Rng};
use crate::tree::{Tree, diff, snapshot};

/// How many points each fault kind is tried at: 20 (the CI size) unless
/// `STACKCLONE_FAULT_POINTS` says more (`STACKCLONE_FAULT_POINTS=200 ./tests/run.sh --test crash`).
pub fn points() -> usize {
    std::env::var("STACKCLONE_FAULT_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(20)
}

/// Writes version `seed` of a tree: `files` small files and a `blob` of random bytes, all with
/// content that differs from every other seed.
pub fn version(root: &Path, seed: u64, files: usize, blob: usize) {
    let mut rng = Rng::new(seed);
    for i in 0..files {
        let mut content = format!("file {i} of version {seed}\n").into_bytes();
        content.extend(rng.bytes(64 + (i % 7) * 50));
        fsx::write(root.join(format!("many/d{}/f{i:04}", i % 10)), content);
    }
    if blob > 0 {
        fsx::write(root.join("blob.bin"), rng.bytes(blob));
    }
    fsx::write(root.join("version"), format!("{seed}\n"));
}

/// `push --json` of the pair's stack, as a child with piped output.
pub fn spawn_push(p: &Pair) -> Child {
    crate::spawn(
        p.push_cmd(&["--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
}

/// SIGKILLs `child` (if it still runs) and says whether it had already exited.
pub fn kill(mut child: Child) -> bool {
    let done = child.try_wait().expect("try_wait").is_some();
    let _ = child.kill();
    let _ = child.wait_with_output();
    done
}

/// Checks that the live dir is exactly the generation the target's state says is committed,
/// and that this is `old` (unchanged generation) or `new` (one more). Returns whether it
/// advanced.
#[track_caller]
pub fn one_generation(p: &Pair, gen_before: u64, old: &Tree, new: &Tree, what: &str) -> bool {
    let live = snapshot(&p.live);
    let generation = p.target_generation();
    let (want, name) = match generation {
        g if g == gen_before => (old, "the old generation"),
        g if g == gen_before + 1 => (new, "the new generation"),
        g => panic!("{what}: generation went from {gen_before} to {g}"),
    };
    let d = diff(want, &live);
    assert!(
        d.is_empty(),
        "{what}: target says generation {generation} ({name}), but its live dir differs from it in {} way(s) \
         ({} from the other one):\n  {}\n--- target log\n{}",
        d.len(),
        diff(if generation == gen_before { new } else { old }, &live).len(),
        d.join("\n  "),
        p.target_log()
    );
    generation == gen_before + 1
}

/// Polls `cond` until it holds, `child` exits or `limit` passes; true if `cond` held.
pub fn wait_until(child: &mut Child, limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        if child.try_wait().expect("try_wait").is_some() {
            return cond();
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    false
}

/// Contents staged (verified) on the target so far.
pub fn staged(p: &Pair) -> usize {
    std::fs::read_dir(p.state.join("staging/objects")).map_or(0, |d| d.count())
}

/// One line of the campaign's summary, as RELIABILITY.md quotes it: `FAULTS kind: tried N,
/// survived N, data lost 0 (...)`. Printed, and appended to `<target>/<profile>/faults.txt`,
/// which `.ci/run` shows after the tests (cargo hides a passing test's output).
pub fn report(kind: &str, tried: usize, survived: usize, detail: &str) {
    use std::io::Write;
    let line = format!("FAULTS {kind}: tried {tried}, survived {survived}, data lost 0 ({detail})");
    eprintln!("{line}");
    let file = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("faults.txt")));
    if let Some(file) = file
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
    {
        let _ = writeln!(f, "{line}");
    }
}
