//! Damaged staging: a staged file corrupted on disk before the flag arrives, and a target that
//! restarts over a half-written staging area. Neither may put wrong content into the live dir,
//! and the next push converges.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use stackclone_proto::manifest::Hash;
use stackclone_tests::faults::{self, one_generation, spawn_push, staged, version, wait_until};
use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{diff, snapshot};
use stackclone_tests::{Pair, PairOptions, STACK, run};

fn objects(p: &Pair) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(p.state.join("staging/objects"))
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_staged_file_corrupted_before_the_flag_is_never_committed() {
    let mut p = Pair::with(PairOptions {
        source_extra: "bandwidth_limit = \"1MiB/s\"\n".into(),
        ..Default::default()
    });
    let (files, blob) = (30, 3 << 20);
    version(&p.src, 1, files, blob);
    p.start_target();
    p.push_ok();
    let mut generation = 1;
    let mut rng = Rng::new(0x5eed_0006);
    let tries = 3;
    for k in 0..tries {
        let old = snapshot(&p.live);
        version(&p.src, 300 + k, files, blob);
        let new = snapshot(&p.src);
        let mut push = spawn_push(&p);
        assert!(
            wait_until(&mut push, Duration::from_secs(60), || staged(&p) >= 2),
            "nothing staged"
        );
        // Flip bytes in the middle of a staged object, keeping its length.
        let objs = objects(&p);
        let victim = &objs[rng.below(objs.len() as u64) as usize];
        let len = std::fs::metadata(victim).expect("stat").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(victim)
            .expect("open object");
        f.write_all_at(b"\xde\xad\xbe\xef", len / 2)
            .expect("corrupt object");
        drop(f);
        let out = push.wait_with_output().expect("push");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let what = format!("try {k}: corrupted {}", victim.display());
        assert!(
            !out.status.success(),
            "{what}: the push committed over a corrupt staged object:\n{stdout}"
        );
        assert!(
            stdout.contains("corrupt on disk"),
            "{what}: the error should say so:\n{stdout}\n{}",
            p.target_log()
        );
        assert!(
            !one_generation(&p, generation, &old, &new, &what),
            "{what}: the target moved on"
        );
        assert!(
            !victim.exists(),
            "{what}: the corrupt object was not removed"
        );
        let o = p.push_ok();
        generation += 1;
        assert_eq!(o["generation"], generation, "{o}");
        let d = diff(&new, &snapshot(&p.live));
        assert!(
            d.is_empty(),
            "{what}: after the next push:\n  {}",
            d.join("\n  ")
        );
    }
    faults::report(
        "staged object corrupted before the flag",
        tries as usize,
        tries as usize,
        "each commit refused before the live dir changed; the next push converged",
    );
    assert_eq!(run(p.target_cmd(&["verify", STACK])).code(), Some(0));
}

#[test]
fn a_target_restarted_over_a_half_written_staging_area_converges() {
    let mut p = Pair::new();
    let (files, blob) = (30, 1 << 20);
    version(&p.src, 1, files, blob);
    p.start_target();
    p.push_ok();
    version(&p.src, 2, files, blob);
    let new = snapshot(&p.src);
    p.kill_target();

    // What a crash can leave: a half-written transfer in tmp, a prepared file, and objects
    // named for contents generation 2 needs but holding only part of them (a torn write the
    // disk reordered) or other bytes altogether, plus a stray name.
    let staging = p.state.join("staging");
    fsx::write(staging.join("tmp/12345"), Rng::new(9).bytes(100_000));
    fsx::write(staging.join("prep/7"), "half a prepared file");
    let blob_bytes = std::fs::read(p.src.join("blob.bin")).expect("blob");
    let torn = staging.join("objects").join(Hash::of(&blob_bytes).to_hex());
    fsx::write(&torn, &blob_bytes[..blob_bytes.len() / 2]);
    let small = std::fs::read(p.src.join("many/d3/f0003")).expect("small file");
    let wrong = staging.join("objects").join(Hash::of(&small).to_hex());
    fsx::write(&wrong, b"not what the name says");
    fsx::write(staging.join("objects/not-a-hash"), "junk");

    p.start_target();
    let log = p.target_log();
    assert!(
        log.contains("staging checked") && log.contains("removed=3"),
        "the restarted target should check staging and drop the 3 bad entries:\n{log}"
    );
    assert!(!torn.exists() && !wrong.exists());
    let o = p.push_ok();
    assert_eq!(o["generation"], 2, "{o}");
    let d = diff(&new, &snapshot(&p.live));
    assert!(d.is_empty(), "after the push:\n  {}", d.join("\n  "));
    assert_eq!(run(p.target_cmd(&["verify", STACK])).code(), Some(0));
    faults::report(
        "target restarted over a half-written staging area",
        1,
        1,
        "3 bad objects dropped at start; the first push converged",
    );
}
