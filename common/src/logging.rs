//! Logging set-up for the agents: tracing to stderr (journald picks it up under systemd), quiet
//! by default (`warn`, and `info` for stackclone itself: one line per cycle), `STACKCLONE_LOG`
//! to change that with `tracing_subscriber::EnvFilter` syntax.

/// How log lines look (`--log-format` of both agents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Keeps the log writer's thread until dropped; dropping it flushes what is queued. Hold it
/// in `main` for the life of the process.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogGuard")
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
///
/// Lines are written to stderr by a thread of their own, never by the task that logs: a
/// stderr that blocks (a pipe nobody reads, a slow journal) must not stall a cycle that has a
/// stack stopped. If that thread falls behind by more than its buffer, lines are dropped
/// rather than waited for; a stderr that is gone (EPIPE, a closed terminal) loses them.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STACKCLONE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,stackclone=info"));
    // Colour only on a terminal: the journal and `docker logs` would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    LogGuard { _writer: guard }
}
