//! The tree comparison the other tests rely on must see every attribute it claims to.

use stackclone_tests::fsx;
use stackclone_tests::tree::{diff, snapshot};

#[test]
fn the_tree_comparison_sees_every_attribute() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for root in [&a, &b] {
        fsx::write(root.join("content"), "same");
        fsx::write(root.join("mode"), "m");
        fsx::write(root.join("owner"), "o");
        fsx::write(root.join("mtime"), "t");
        fsx::write(root.join("xattr"), "x");
        fsx::write(root.join("h1"), "h");
        fsx::write(root.join("h2"), "h");
        fsx::write(root.join("kind"), "k");
        fsx::mkdir(root.join("d"));
        fsx::ln_s("target-a", root.join("link"));
        fsx::ln_s("same", root.join("link-time"));
        fsx::write(
            root.join(std::str::from_utf8(b"only-in-a").expect("utf-8")),
            "",
        );
        stamp(root);
    }
    assert_eq!(diff(&snapshot(&a), &snapshot(&b)), Vec::<String>::new());
    fsx::write(b.join("content"), "diff");
    fsx::chmod(b.join("mode"), 0o4755);
    fsx::chown(b.join("owner"), 999, 999);
    fsx::set_xattr(b.join("xattr"), "user.k", b"v");
    fsx::rm(b.join("h2"));
    fsx::ln(b.join("h1"), b.join("h2"));
    fsx::rm(b.join("kind"));
    fsx::mkdir(b.join("kind"));
    fsx::rm(b.join("link"));
    fsx::ln_s("target-b", b.join("link"));
    fsx::rm(b.join("only-in-a"));
    // Only the deliberate mtime differences remain.
    stamp(&a);
    stamp(&b);
    fsx::set_mtime(b.join("mtime"), 1_000_000_000_000_000_002);
    fsx::set_mtime(b.join("link-time"), 1_000_000_000_000_000_002);
    fsx::set_mtime(b.join("d"), 1_000_000_000_000_000_002);
    let d = diff(&snapshot(&a), &snapshot(&b)).join("\n");
    for want in [
        "content: kind/content",
        "mode: mode 644 != 4755",
        "owner: owner 0:0 != 999:999",
        "mtime: mtime_ns",
        "link-time: mtime_ns",
        "d: mtime_ns",
        "xattr: xattrs",
        "h1: hardlinked with [] != [\"h2\"]",
        "kind: kind/content",
        "link: kind/content \"symlink -> target-a\" != \"symlink -> target-b\"",
        "only-in-a: missing",
    ] {
        assert!(d.contains(want), "diff lacks {want:?}:\n{d}");
    }
}

/// Sets every entry's mtime to one constant.
fn stamp(root: &std::path::Path) {
    for name in std::fs::read_dir(root).expect("read_dir") {
        fsx::set_mtime(name.expect("entry").path(), 1_000_000_000_000_000_001);
    }
}
