//! The lineage file at the root of a stack's data dir (`.stackclone-lineage`, see
//! `stackclone_proto::lineage`): the source reads it before every cycle (and writes a new
//! history there the first time), the target writes a forked history there when it promotes the
//! stack. It lives with the data so that it travels with every generation, and so that a host
//! that was a standby and becomes the primary (or the other way round) reads the history its
//! data really has.

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
    let path = dir.join(LINEAGE_FILE);
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

/// The lineage of the data in `dir`: the file's, or a new history written there now (the
/// first cycle of a stack). `true` if it was written.
pub fn ensure(dir: &Path) -> io::Result<(Lineage, bool)> {
    if let Some(l) = read(dir)? {
        return Ok((l, false));
    }
    let l = Lineage::new(new_history()?);
    write(dir, &l)?;
    Ok((l, true))
}

/// Writes `l` into `dir` atomically (a temporary file, fsync, rename, fsync of the dir), mode
/// 0644: it is no secret, and containers that read the data dir may see it.
pub fn write(dir: &Path, l: &Lineage) -> io::Result<()> {
    let path = dir.join(LINEAGE_FILE);
    let tmp = dir.join(format!("{LINEAGE_FILE}.tmp.{}", std::process::id()));
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
    fn ensure_writes_once_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let (l, written) = ensure(dir.path()).unwrap();
        assert!(written);
        let (again, written) = ensure(dir.path()).unwrap();
        assert!(!written);
        assert_eq!(again, l);
        let forked = l.fork(new_history().unwrap(), 3);
        write(dir.path(), &forked).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(forked));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [LINEAGE_FILE]);
    }

    #[test]
    fn garbage_or_a_symlink_is_an_error_not_a_new_history() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LINEAGE_FILE), "hello").unwrap();
        assert!(ensure(dir.path()).is_err());
        std::fs::remove_file(dir.path().join(LINEAGE_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(LINEAGE_FILE)).unwrap();
        let e = ensure(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("not a stackclone lineage file"),
            "{e}"
        );
    }
}
