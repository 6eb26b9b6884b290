//! The command-line conventions the three binaries (`stackclone-source`, `stackclone-target`,
//! `stackclone-certs`) share: shell completions and man pages made from each one's clap
//! definition, so they never drift from the real flags, and stdout that never panics.
//!
//! Each binary has `completions SHELL` (to stdout) and `man DIR` (one page per command and
//! subcommand, e.g. `stackclone-source.1`, `stackclone-source-push.1`); `deploy/install.sh`
//! and packagers call them.
//!
//! Output to stdout goes through [`outln!`](crate::outln) and [`out!`](crate::out), which never
//! panic: once stdout is gone (`… | head -3`, a closed terminal) the rest of the output is
//! dropped and the command ends with the exit code its work earned. `println!` would panic on
//! the broken pipe instead, and a command that panics has not said whether it succeeded.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub use clap_complete::Shell;

/// `completions SHELL`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `man DIR`.
#[derive(clap::Args, Debug, Clone)]
pub struct ManArgs {
    /// Directory to write the pages to (created if missing).
    pub dir: PathBuf,
}

/// Writes the completion script for `cmd` to `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Writes one man page per command and visible subcommand of `cmd` into `dir`; returns the
/// files written.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    written.sort();
    Ok(written)
}

static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Writes to stdout; after the first failed write (the reader is gone) writes nothing more.
/// Use it through [`outln!`](crate::outln) and [`out!`](crate::out).
pub fn write_out(args: std::fmt::Arguments<'_>) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out.write_fmt(args).and_then(|()| out.flush()).is_err() {
        STDOUT_GONE.store(true, Ordering::Relaxed);
    }
}

/// `println!` that never panics: see [`write_out`](crate::cli::write_out).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that never panics: see [`write_out`](crate::cli::write_out).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}
