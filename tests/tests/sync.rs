//! End-to-end sync: real `stackclone-source push` against a real `stackclone-target run`.

use std::path::Path;

use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{self, Tree, assert_same, snapshot};
use stackclone_tests::{Enroll, Pair, PairOptions, STACK, run};

const MIB: u64 = 1 << 20;
/// A fixed, recognisable time: 2021-05-06T07:08:09.123456789Z.
const T0: i64 = 1_620_284_889_123_456_789;

/// Generation 1: every kind of entry the issue lists.
fn gen1(root: &Path) {
    let r = |p: &str| root.join(p);
    // Nested and empty dirs.
    fsx::write(r("data/a/b/c/deep.txt"), "deep\n");
    fsx::mkdir(r("data/a/empty2"));
    fsx::mkdir(r("empty"));
    fsx::write(r("data/x.txt"), "x marks the spot\n");
    fsx::set_xattr(r("data/x.txt"), "user.comment", b"hello \x00\xff xattr");
    fsx::set_xattr(r("data/a"), "user.dir-note", b"on a dir");
    // Special permission bits, numeric owners.
    fsx::write(r("bin/suid"), "#!/bin/sh\necho suid\n");
    fsx::chown(r("bin/suid"), 0, 0);
    fsx::chmod(r("bin/suid"), 0o4755);
    fsx::mkdir(r("shared"));
    fsx::write(r("shared/readme"), "group dir\n");
    fsx::chmod(r("shared"), 0o2755);
    fsx::mkdir(r("tmp"));
    fsx::chmod(r("tmp"), 0o1777);
    fsx::write(r("db/pg/secret"), "postgres owns this\n");
    fsx::chown(r("db/pg/secret"), 999, 999);
    fsx::chmod(r("db/pg/secret"), 0o600);
    fsx::chown(r("db/pg"), 999, 999);
    fsx::chmod(r("db/pg"), 0o700);
    fsx::write(r("db/root-owned"), "root\n");
    fsx::chown(r("db/root-owned"), 0, 0);
    // Symlinks: dangling, absolute, relative.
    fsx::mkdir(r("links"));
    fsx::ln_s("does/not/exist", r("links/dangling"));
    fsx::ln_s("/etc/passwd", r("links/abs"));
    fsx::ln_s("../data/a/b/c/deep.txt", r("links/rel"));
    // A hardlink pair.
    fsx::write(r("hl/one"), "one inode, two names\n");
    fsx::ln(r("hl/one"), r("hl/two"));
    // A sparse file: 64 MiB, four written blocks.
    fsx::sparse(
        r("sparse.img"),
        64 * MIB,
        &[
            (0, b"head"),
            (16 * MIB, &[7u8; 4096]),
            (40 * MIB + 123, b"middle"),
            (64 * MIB - 4096, &[9u8; 4096]),
        ],
    );
    // Names that are not UTF-8 or contain a newline.
    fsx::write(
        root.join(std::ffi::OsStr::from_bytes_compat(b"names/caf\xe9.txt")),
        "latin-1 name\n",
    );
    fsx::write(r("names/new\nline"), "newline in name\n");
    // Type changes to come.
    fsx::write(r("t/file2dir"), "a file for now\n");
    fsx::write(r("t/dir2file/child"), "a dir for now\n");
    fsx::write(r("t/file2link"), "a file for now\n");
    // A ~20 MiB random file.
    fsx::write(r("big.bin"), Rng::new(1).bytes(20 * MIB as usize));
    // ns mtimes on a file, a dir and a symlink (dirs last: creating entries changes them).
    fsx::set_mtime(r("data/x.txt"), T0);
    fsx::set_mtime(r("links/abs"), T0 + 1);
    fsx::set_mtime(r("links/dangling"), T0 + 2);
    fsx::set_mtime(r("data/a/b"), T0 + 3);
    fsx::set_mtime(r("empty"), T0 + 4);
    fsx::set_mtime(r("hl/one"), T0 + 5);
}

/// Generation 2: block edits, type changes, a rename, deletes, metadata-only changes.
fn gen2(root: &Path) {
    let r = |p: &str| root.join(p);
    // A few blocks of the big file, in place.
    for (i, at) in [MIB, 9 * MIB + 17, 17 * MIB].into_iter().enumerate() {
        fsx::patch(r("big.bin"), at, &Rng::new(100 + i as u64).bytes(4096));
    }
    // file -> dir, dir -> file, file -> symlink.
    fsx::rm(r("t/file2dir"));
    fsx::write(r("t/file2dir/inside"), "now a dir\n");
    fsx::rm(r("t/dir2file"));
    fsx::write(r("t/dir2file"), "now a file\n");
    fsx::rm(r("t/file2link"));
    fsx::ln_s("file2dir/inside", r("t/file2link"));
    // A rename (content, xattr and mtime travel with it).
    std::fs::rename(r("data/x.txt"), r("data/x-renamed.txt")).expect("rename");
    // Deletes: a file, an empty dir, one name of the hardlink pair.
    fsx::rm(r("data/a/b/c/deep.txt"));
    fsx::rm(r("empty"));
    fsx::rm(r("hl/two"));
    // Metadata only.
    fsx::chmod(r("shared"), 0o2775);
    fsx::chown(r("db/pg/secret"), 1000, 1001);
    fsx::chmod(r("db/pg/secret"), 0o640);
    fsx::set_mtime(r("hl/one"), T0 + 50);
    fsx::set_xattr(r("data/a"), "user.dir-note", b"changed");
    fsx::set_mtime(r("links/abs"), T0 + 51);
    fsx::set_mtime(r("data/a/b/c"), T0 + 52);
}

/// `OsStr` from raw bytes (the tests run on Unix only).
trait FromBytes {
    fn from_bytes_compat(b: &[u8]) -> &Self;
}
impl FromBytes for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &Self {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

/// Regular files (paths) and their bytes (a hardlinked inode counted once, like `du`).
fn totals(t: &Tree) -> (u64, u64) {
    let mut inodes = std::collections::HashSet::new();
    t.nodes
        .values()
        .fold((0, 0), |(n, b), node| match node.kind {
            tree::Kind::File { size, .. } if inodes.insert(node.ino) => (n + 1, b + size),
            tree::Kind::File { .. } => (n + 1, b),
            _ => (n, b),
        })
}

#[track_caller]
fn assert_sparse(path: &Path) {
    let alloc = fsx::allocated(path);
    assert!(
        alloc < MIB,
        "{} should stay sparse: {alloc} bytes allocated for 64 MiB",
        path.display()
    );
}

const STATUS_FIELDS: &[&str] = &[
    "stack",
    "generation",
    "committed_at",
    "files",
    "bytes",
    "bytes_sent",
    "source_downtime_ms",
    "target_downtime_ms",
    "last_error",
];

#[track_caller]
fn assert_status(s: &serde_json::Value, generation: u64, tree: &Tree, who: &str) {
    for f in STATUS_FIELDS {
        assert!(s.get(f).is_some(), "{who} status --json lacks `{f}`: {s}");
    }
    let (files, bytes) = totals(tree);
    assert_eq!(s["stack"], STACK, "{who}: {s}");
    assert_eq!(s["generation"], generation, "{who}: {s}");
    assert!(
        s["committed_at"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000),
        "{who} committed_at: {s}"
    );
    assert_eq!(s["files"], files, "{who} files: {s}");
    assert_eq!(s["bytes"], bytes, "{who} bytes: {s}");
    assert!(s["last_error"].is_null(), "{who} last_error: {s}");
    assert!(s["target_downtime_ms"].is_u64(), "{who}: {s}");
}

#[test]
fn every_kind_of_entry_arrives_identical_then_generation_two_then_rollback() {
    // The token path with a real `serve` process, once.
    let mut p = Pair::with(PairOptions {
        enroll: Enroll::Token,
        ..Default::default()
    });
    gen1(&p.src);
    let g1 = snapshot(&p.src);
    assert_eq!(
        g1.get("hl/one").map(|n| n.ino),
        g1.get("hl/two").map(|n| n.ino),
        "test setup: hardlink"
    );
    p.start_target();

    let o1 = p.push_ok();
    assert_eq!(o1["generation"], 1, "{o1}");
    let live1 = snapshot(&p.live);
    assert_same(&g1, &live1, "generation 1");
    assert_sparse(&p.live.join("sparse.img"));
    assert!(o1["bytes_sent"].as_u64().expect("bytes_sent") > 0, "{o1}");
    // The source tree is untouched by the push.
    assert_same(&g1, &snapshot(&p.src), "source after push 1");
    assert_status(&p.target_status(), 1, &g1, "target");
    let ss = run(p.source_cmd(&["status", "--json"]));
    ss.ok();
    assert_status(&ss.json()[0], 1, &g1, "source");
    assert_eq!(
        run(p.target_cmd(&["verify", STACK])).code(),
        Some(0),
        "verify after generation 1"
    );

    gen2(&p.src);
    let g2 = snapshot(&p.src);
    let o2 = p.push_ok();
    assert_eq!(o2["generation"], 2, "{o2}");
    assert_same(&g2, &snapshot(&p.live), "generation 2");
    assert_sparse(&p.live.join("sparse.img"));
    // Three 4 KiB blocks of a 20 MiB file changed: the delta, not the file, travels.
    let sent = o2["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(
        sent < 2 * MIB,
        "generation 2 sent {sent} bytes for a few changed blocks: {o2}"
    );
    assert_status(&p.target_status(), 2, &g2, "target");
    let ss = run(p.source_cmd(&["status", "--json"]));
    ss.ok();
    assert_status(&ss.json()[0], 2, &g2, "source");

    // Not on a terminal and no --yes: nothing is asked, nothing changes.
    let rb = run(p.target_cmd(&["rollback", STACK]));
    assert!(!rb.status.success(), "{}", rb.dump());
    assert!(rb.stderr.contains("pass --yes"), "{}", rb.dump());
    assert!(
        rb.stderr.contains("from generation 2 to 1"),
        "{}",
        rb.dump()
    );
    assert_same(
        &g2,
        &snapshot(&p.live),
        "a refused rollback changes nothing",
    );
    // Back to the empty standby deletes every file: the max_delete valve refuses it.
    let rb = run(p.target_cmd(&["rollback", STACK, "--to", "0", "--yes"]));
    assert!(!rb.status.success(), "{}", rb.dump());
    assert!(rb.stderr.contains("--force"), "{}", rb.dump());
    assert_same(
        &g2,
        &snapshot(&p.live),
        "a refused rollback to 0 changes nothing",
    );

    // On a terminal (script(1) gives it one), it asks; "n" changes nothing.
    let cmdline = format!(
        "{} --config {} rollback {STACK}",
        stackclone_tests::bin("stackclone-target").display(),
        p.target_config.display()
    );
    let mut asked = std::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script");
    {
        use std::io::Write;
        let mut stdin = asked.stdin.take().expect("stdin");
        stdin.write_all(b"n\n").expect("answer");
    }
    let asked = asked.wait_with_output().expect("script output");
    let said = String::from_utf8_lossy(&asked.stdout);
    assert!(said.contains("roll back? [y/N]"), "{said}");
    assert!(said.contains("nothing changed"), "{said}");
    assert!(!asked.status.success(), "{said}");
    assert_same(&g2, &snapshot(&p.live), "answered no: nothing changed");

    let rb = run(p.target_cmd(&["rollback", STACK, "--yes"]));
    rb.ok();
    assert!(
        rb.stdout.contains("from generation 2 to 1"),
        "{}",
        rb.dump()
    );
    assert_same(&g1, &snapshot(&p.live), "after rollback to generation 1");
    assert_sparse(&p.live.join("sparse.img"));
    let st = p.target_status();
    assert_eq!(st["generation"], 1, "{st}");
    assert_eq!(
        run(p.target_cmd(&["verify", STACK])).code(),
        Some(0),
        "verify after rollback"
    );

    // The next push brings generation 2's content back, as generation 3: the number 2 named
    // the tree that was rolled back, and numbers are never reused.
    let o3 = p.push_ok();
    assert_same(&g2, &snapshot(&p.live), "push after rollback");
    assert_eq!(o3["generation"], 3, "{o3}");
    assert_eq!(p.target_status()["generation"], 3);
}

/// A small tree for the tests that are about something else than fidelity.
fn small(root: &Path) {
    fsx::write(root.join("data/f1"), "one\n");
    fsx::write(root.join("data/sub/f2"), "two\n");
    fsx::write(root.join("keep"), "kept\n");
    fsx::write(root.join("old"), "to be deleted\n");
    fsx::write(root.join("edit"), "before\n");
    fsx::set_mtime(root.join("edit"), T0);
}

#[test]
fn target_status_counts_the_bytes_it_received() {
    let mut p = Pair::new();
    fsx::write(p.src.join("payload"), Rng::new(7).bytes(256 << 10));
    p.start_target();
    let o = p.push_ok();
    let sent = o["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(sent >= 256 << 10, "the source sent {sent} bytes: {o}");
    let st = p.target_status();
    let got = st["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(
        got >= 256 << 10,
        "target status after receiving 256 KiB says bytes_sent = {got}: {st}"
    );
}

/// The source records each committed manifest in its state dir and sends the next one as
/// changes against it. A damaged record costs bytes, never the cycle: the manifest goes whole
/// and the record is written again.
#[test]
fn the_record_of_the_last_commit_is_a_base_and_a_damaged_one_costs_nothing() {
    let mut p = Pair::new();
    small(&p.src);
    p.start_target();
    p.push_ok();
    let record = p.src_state.join(format!(
        "{STACK}.to-{}.manifest",
        stackclone_tests::TARGET_NAME
    ));
    let (generation, _) =
        stackclone_proto::manifest::decode_file(&std::fs::read(&record).expect("the record"))
            .expect("a whole record");
    assert_eq!(generation, 1);

    // A change, sent as changes against the record.
    fsx::write(p.src.join("edit"), "after\n");
    let o = p.push_ok();
    assert_eq!(o["generation"], 2, "{o}");
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "changes against the record",
    );

    // A torn record: the next push still commits exactly the source's tree.
    let bytes = std::fs::read(&record).expect("the record");
    fsx::write(&record, &bytes[..bytes.len() / 2]);
    std::fs::remove_file(p.src.join("old")).expect("rm old");
    let o = p.push_ok();
    assert_eq!(o["generation"], 3, "{o}");
    assert_same(&snapshot(&p.src), &snapshot(&p.live), "after a torn record");
    let (generation, m) =
        stackclone_proto::manifest::decode_file(&std::fs::read(&record).expect("the record"))
            .expect("written again, whole");
    assert_eq!(generation, 3);
    assert!(m.entries().iter().all(|e| e.path.as_bytes() != b"old"));
}

#[test]
fn dry_run_changes_nothing_anywhere() {
    let mut p = Pair::new();
    small(&p.src);
    p.start_target();
    p.push_ok();
    // What a real push would do: send `new` and `edit`, delete `old`.
    fsx::write(p.src.join("new"), "brand new\n");
    fsx::write(p.src.join("edit"), "after, and longer\n");
    fsx::rm(p.src.join("old"));
    // The hash caches (the target's `hashcache` of its live dir, the source's
    // `web.hashcache`) are rewritten by any scan; they are the only files a dry run may touch.
    let state = || snapshot(&p.state).without(&["hashcache"]);
    let src_state = || snapshot(&p.src_state).without(&["web.hashcache"]);
    let before = [snapshot(&p.src), snapshot(&p.live), state(), src_state()];
    let status_before = p.target_status();

    let r = p.push(&["--dry-run", "--json"]);
    r.ok();
    let o = &r.json()[0];
    assert_eq!(o["ok"], true, "{}", r.stdout);
    let plan = &o["plan"];
    let mut sends: Vec<&str> = plan["send"]
        .as_array()
        .expect("plan.send")
        .iter()
        .map(|s| s["path"].as_str().expect("path"))
        .collect();
    sends.sort();
    assert_eq!(sends, ["edit", "new"], "{plan}");
    let deletes: Vec<&str> = plan["delete"]
        .as_array()
        .expect("plan.delete")
        .iter()
        .map(|s| s.as_str().expect("path"))
        .collect();
    assert_eq!(deletes, ["old"], "{plan}");
    assert_eq!(plan["send_count"], 2, "{plan}");
    assert_eq!(plan["delete_count"], 1, "{plan}");
    assert_eq!(plan["send_bytes"], 10 + 18, "{plan}");

    // The human-readable form lists the same.
    let text = p.push(&["--dry-run"]);
    text.ok();
    assert!(
        text.stdout.contains("send   new (10 bytes)"),
        "{}",
        text.dump()
    );
    assert!(text.stdout.contains("delete old"), "{}", text.dump());

    let after = [snapshot(&p.src), snapshot(&p.live), state(), src_state()];
    for (what, (b, a)) in [
        "source tree",
        "target live dir",
        "target state dir",
        "source state dir",
    ]
    .iter()
    .zip(before.iter().zip(after.iter()))
    {
        assert_same(b, a, &format!("{what} after --dry-run"));
    }
    // The age is the clock's, not the dry run's doing.
    let without_age = |mut s: serde_json::Value| {
        s.as_object_mut().expect("status object").remove("age_secs");
        s
    };
    assert_eq!(
        without_age(p.target_status()),
        without_age(status_before),
        "target status after --dry-run"
    );
}

#[test]
fn symlink_planted_where_the_source_has_a_directory_is_replaced_not_followed() {
    let mut p = Pair::new();
    small(&p.src);
    p.start_target();
    p.push_ok();
    let outside_parent = p.tmp.path().join("outside-parent");
    let outside = outside_parent.join("outside");
    fsx::write(outside.join("precious"), "must not change\n");
    fsx::mkdir(outside.join("sub"));
    let outside_before = snapshot(&outside_parent);
    // A container on the target replaced `data/` by a symlink out of the stack.
    fsx::rm(p.live.join("data"));
    fsx::ln_s(&outside, p.live.join("data"));
    let v = run(p.target_cmd(&["verify", STACK]));
    assert_eq!(
        v.code(),
        Some(1),
        "verify must report the planted symlink:\n{}",
        v.dump()
    );
    assert!(v.stdout.contains("data"), "{}", v.dump());

    let o = p.push_ok();
    assert_eq!(o["generation"], 2, "{o}");
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "live dir after the push",
    );
    assert!(
        std::fs::symlink_metadata(p.live.join("data"))
            .expect("lstat")
            .is_dir()
    );
    assert_same(
        &outside_before,
        &snapshot(&outside_parent),
        "the symlink's target outside the stack",
    );
}

#[test]
fn a_peer_not_in_allow_is_refused_and_nothing_is_staged() {
    let mut p = Pair::new();
    small(&p.src);
    p.start_target();
    p.push_ok();
    p.stop_target();
    p.opts.allow = vec!["someone-else".into()];
    p.write_target_stack("");
    p.start_target();
    fsx::write(p.src.join("new"), Rng::new(3).bytes(100_000));
    // `hashcache` and `state` are checked in `a_refused_peer_writes_nothing_in_the_state_dir`.
    let state = || snapshot(&p.state).without(&["hashcache", "state"]);
    let (live, state_before, gen_before) = (snapshot(&p.live), state(), p.target_generation());

    let r = p.push(&["--json"]);
    assert_eq!(r.code(), Some(1), "a refused push must fail:\n{}", r.dump());
    let o = &r.json()[0];
    assert_eq!(o["ok"], false, "{}", r.stdout);
    let err = o["error"].as_str().expect("error message");
    for want in ["web", "primary", "not allowed"] {
        assert!(err.contains(want), "error {err:?} should mention {want:?}");
    }
    let text = p.push(&[]);
    assert_eq!(text.code(), Some(1), "{}", text.dump());
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("web ") && l.contains("FAILED"))
            && text.stdout.contains("not allowed"),
        "{}",
        text.dump()
    );

    assert_same(&live, &snapshot(&p.live), "live dir after a refused push");
    assert_same(
        &state_before,
        &state(),
        "target state dir after a refused push",
    );
    assert!(
        std::fs::read_dir(p.state.join("staging/objects")).map_or(true, |mut d| d.next().is_none()),
        "nothing staged"
    );
    assert_eq!(p.target_generation(), gen_before);
    let log = p.target_log();
    assert!(
        log.contains("not allowed"),
        "the target logs the refusal:\n{log}"
    );
}

#[test]
fn a_refused_peer_writes_nothing_in_the_state_dir() {
    let mut p = Pair::new();
    small(&p.src);
    p.start_target();
    p.push_ok();
    p.stop_target();
    p.opts.allow = vec!["someone-else".into()];
    p.write_target_stack("");
    p.start_target();
    fsx::write(p.src.join("data/new"), "new\n");
    let state = snapshot(&p.state);
    let r = p.push(&[]);
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    assert_same(
        &state,
        &snapshot(&p.state),
        "target state dir after a refused push",
    );
}

/// A live file on the standby that is a hard link to a file outside the stack (a container, or
/// a careless admin, linked it there) is replaced by a new file, never written through: neither
/// an in-place patch of a big file nor a metadata-only change reaches the outside file.
#[test]
fn a_standby_file_hardlinked_outside_the_stack_is_replaced_not_written_through() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut p = Pair::new();
    let big = Rng::new(11).bytes(4 * MIB as usize);
    fsx::write(p.src.join("big.bin"), &big);
    fsx::write(p.src.join("meta.txt"), "same content\n");
    fsx::write(p.src.join("same.txt"), "unchanged\n");
    p.start_target();
    p.push_ok();

    // Outside the stack, on the same file system: files the standby's live files now share.
    let outside = p.tmp.path().join("outside");
    fsx::mkdir(&outside);
    let mode = |path: &Path, m: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    for name in ["big.bin", "meta.txt", "same.txt"] {
        let victim = outside.join(name);
        std::fs::copy(p.live.join(name), &victim).expect("copy");
        mode(&victim, 0o600);
        std::fs::remove_file(p.live.join(name)).expect("unlink live");
        std::fs::hard_link(&victim, p.live.join(name)).expect("link");
    }
    let before: Vec<(Vec<u8>, u32)> = ["big.bin", "meta.txt", "same.txt"]
        .iter()
        .map(|n| {
            let path = outside.join(n);
            let md = std::fs::metadata(&path).expect("stat");
            (std::fs::read(&path).expect("read"), md.mode())
        })
        .collect();

    // The source changes 64 KiB of the big file (an in-place patch if the live file were the
    // stack's own) and only the mode of meta.txt.
    let mut changed = big.clone();
    changed[MIB as usize..MIB as usize + 65536].copy_from_slice(&Rng::new(12).bytes(65536));
    fsx::write(p.src.join("big.bin"), &changed);
    mode(&p.src.join("meta.txt"), 0o640);
    p.push_ok();

    // (The old live inode is kept in the generation's backup, for a rollback to restore.)
    for (name, (data, m)) in ["big.bin", "meta.txt", "same.txt"].iter().zip(&before) {
        let path = outside.join(name);
        let md = std::fs::metadata(&path).expect("stat outside");
        assert!(
            std::fs::read(&path).expect("read") == *data,
            "{name} outside the stack was written through its hard link"
        );
        assert_eq!(md.mode(), *m, "{name} outside: mode");
        let live = std::fs::metadata(p.live.join(name)).expect("stat live");
        assert_eq!(live.nlink(), 1, "{name} live");
        assert_ne!(live.ino(), md.ino(), "{name}: a new inode");
    }
    assert_same(&snapshot(&p.src), &snapshot(&p.live), "live");
}
