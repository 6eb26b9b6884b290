//! The lineage file (see `stackclone_proto::lineage`). The target writes a forked history into
//! the root of the live dir when it promotes a stack (`.stackclone-lineage`); from then on it
//! travels with the data, so a host that was a standby and becomes the primary (or receives a
//! fail-back) reads the history its data really has. A source **never writes the data dir**
//! (its hardened unit may not): it claims the data's own file where there is one, else its own
//! record in its state dir, made at the first push ([`claim`]).

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use stackclone_proto::lineage::{HistoryId, LINEAGE_FILE, Lineage};

/// A new random history.
pub fn new_history() -> io::Result<HistoryId> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(HistoryId(bytes))
}

/// Reads the lineage file in `dir`; `Ok(None)` if there is none. A file that is not a lineage
/// file (or a symlink in its place) is an error that names it: a history is never guessed.
pub fn read(dir: &Path) -> io::Result<Option<Lineage>> {
    read_named(dir, LINEAGE_FILE)
}

/// The history a source claims for the data in `dir`: the data's own lineage file if it has
/// one, else the source's record `state_file`, which is written the first time unless `write`
/// is false (a dry run: a new history for that one look).
pub fn claim(dir: &Path, state_file: &Path, write: bool) -> io::Result<Lineage> {
    if let Some(l) = read(dir)? {
        return Ok(l);
    }
    let (Some(state_dir), Some(name)) = (state_file.parent(), state_file.file_name()) else {
        return Err(io::Error::other(
            "a state file needs a directory and a name",
        ));
    };
    let name = name.to_string_lossy().into_owned();
    if let Some(l) = read_named(state_dir, &name)? {
        return Ok(l);
    }
    let l = Lineage::new(new_history()?);
    if write {
        std::fs::create_dir_all(state_dir)?;
        write_named(state_dir, &name, &l)?;
    }
    Ok(l)
}

/// Writes `l` into `dir` as its lineage file.
pub fn write(dir: &Path, l: &Lineage) -> io::Result<()> {
    write_named(dir, LINEAGE_FILE, l)
}

fn read_named(dir: &Path, name: &str) -> io::Result<Option<Lineage>> {
    let path = dir.join(name);
    let md = match std::fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !md.is_file() || md.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a stackclone lineage file (not a small regular file)",
                path.display()
            ),
        ));
    }
    let text = std::fs::read_to_string(&path)?;
    Lineage::parse(&text).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// Writes `l` as `dir/name` atomically (a temporary file, fsync, rename, fsync of the dir),
/// mode 0644: it is no secret.
fn write_named(dir: &Path, name: &str, l: &Lineage) -> io::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)?;
    f.write_all(l.to_text().as_bytes())?;
    f.sync_all()?;
    drop(f);
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_claims_its_own_record_until_the_data_carries_a_history() {
        let data = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let record = state.path().join("web.lineage");
        // A dry run claims a history but writes nothing.
        claim(data.path(), &record, false).unwrap();
        assert!(!record.exists());
        let l = claim(data.path(), &record, true).unwrap();
        assert_eq!(claim(data.path(), &record, true).unwrap(), l);
        // The data dir is never written.
        assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0);
        // Data that carries a history (promoted, or received by a fail-back) wins.
        let forked = l.fork(new_history().unwrap(), 3);
        write(data.path(), &forked).unwrap();
        assert_eq!(claim(data.path(), &record, true).unwrap(), forked);
        let leftovers: Vec<_> = std::fs::read_dir(data.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [LINEAGE_FILE]);
    }

    #[test]
    fn garbage_or_a_symlink_is_an_error_not_a_new_history() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("state/web.lineage");
        std::fs::write(dir.path().join(LINEAGE_FILE), "hello").unwrap();
        assert!(claim(dir.path(), &record, true).is_err());
        std::fs::remove_file(dir.path().join(LINEAGE_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(LINEAGE_FILE)).unwrap();
        let e = claim(dir.path(), &record, true).unwrap_err();
        assert!(
            e.to_string().contains("not a stackclone lineage file"),
            "{e}"
        );
    }
}
