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

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STACKCLONE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,stackclone=info"));
    // Colour only on a terminal: the journal and `docker logs` would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
