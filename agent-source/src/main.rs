//! `stackclone-source`: parses flags, calls the library, maps the result to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use stackclone_certs::cli::{self, CompletionsArgs, ManArgs};
use stackclone_common::logging::LogFormat;
use stackclone_proto::msg::Mode;
use stackclone_source::app::{self, Common, PushOptions};
use stackclone_source::progress::{self, Style};

#[derive(Parser, Debug)]
#[command(
    name = "stackclone-source",
    version,
    about = "stackclone source agent: push compose stacks to a standby"
)]
struct Cli {
    /// Main config file; conf.d/*.toml beside it holds one stack each.
    #[arg(long, global = true, default_value = "/etc/stackclone/source.toml")]
    config: PathBuf,
    /// Identity dir (keys, certificates); replaces the config's identity_dir.
    #[arg(long, global = true, env = "STACKCLONE_DIR")]
    dir: Option<PathBuf>,
    /// Where status files and hash caches live.
    #[arg(long, global = true, env = "STACKCLONE_STATE_DIR", default_value = app::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: each stack's cycles on its `schedule`; SIGHUP reloads the config,
    /// SIGTERM ends cycles under way cleanly and exits.
    Run,
    /// Run one cycle of each named stack now; exit 0 only if every one committed on its target.
    /// A stack whose cycle is already running (the daemon's or another push) is refused unless
    /// --wait is given.
    Push {
        #[arg(required = true)]
        stacks: Vec<String>,
        /// List what would be sent and deleted; change nothing anywhere.
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON document instead of progress and a table.
        #[arg(long)]
        json: bool,
        /// Wait for a running cycle of the same stack to end instead of refusing.
        #[arg(long)]
        wait: bool,
        /// Push to this `[targets.NAME]` instead of the stack's own `target` (for a fail-back:
        /// the old primary, enrolled and configured as a target of this stack).
        #[arg(long, value_name = "NAME")]
        to: Option<String>,
        /// Fail back: hand the stack over to the target. Its copy is replaced by this host's
        /// (the copy it had is kept as a generation there, which `rollback` restores), it
        /// becomes the primary, and this host's stack stays stopped once the target committed.
        #[arg(long, conflicts_with = "dry_run")]
        fail_back: bool,
        /// Replace a target copy that holds another history (a split brain) with this host's
        /// data; the target keeps its copy as a generation, which `rollback` restores.
        #[arg(long)]
        replace_diverged: bool,
    },
    /// Start what a push or daemon that died mid-cycle (SIGKILL, out of memory, power loss)
    /// left stopped, from the restart record each cycle writes before it stops a stack. A stack
    /// whose cycle is still running is left to it. The daemon does this on its own every few
    /// seconds; use it by hand, or as the unit's `ExecStopPost=`. Exit 0 unless a stack could not
    /// be started again.
    Recover {
        /// The stacks to look at (default: every configured stack).
        stacks: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show each stack's last cycle.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script to stdout.
    Completions(CompletionsArgs),
    /// Write man pages (one per command) into a directory.
    Man(ManArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log = stackclone_common::logging::init(cli.log_format);
    let common = Common {
        config: cli.config,
        identity_dir: cli.dir,
        state_dir: cli.state_dir,
    };
    let result = match cli.command {
        Command::Run => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(stackclone_source::daemon::run(&common)))
            .map(|()| ExitCode::SUCCESS),
        Command::Push {
            stacks,
            dry_run,
            json,
            wait,
            to,
            fail_back,
            replace_diverged,
        } => push(
            &common,
            &stacks,
            dry_run,
            json,
            PushFlags {
                wait,
                to,
                fail_back,
                replace_diverged,
            },
        ),
        Command::Recover { stacks, json } => recover(&common, &stacks, json),
        Command::Status { json } => status(&common, json),
        Command::Completions(args) => {
            cli::completions(Cli::command(), args.shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man(args) => cli::man_pages(Cli::command(), &args.dir)
            .map(|pages| {
                for p in pages {
                    stackclone_certs::outln!("{}", p.display());
                }
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

struct PushFlags {
    wait: bool,
    to: Option<String>,
    fail_back: bool,
    replace_diverged: bool,
}

fn push(
    common: &Common,
    stacks: &[String],
    dry_run: bool,
    json: bool,
    flags: PushFlags,
) -> anyhow::Result<ExitCode> {
    let mode = if dry_run { Mode::DryRun } else { Mode::Sync };
    let opts = PushOptions {
        mode,
        wait: flags.wait,
        style: Style::detect(json),
        to: flags.to,
        fail_back: flags.fail_back,
        replace_diverged: flags.replace_diverged,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let outcomes = rt.block_on(app::push(common, stacks, opts))?;
    if json {
        stackclone_certs::outln!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        for o in &outcomes {
            if dry_run {
                for m in &o.mounts {
                    stackclone_certs::outln!("{}: mount  {m}", o.stack);
                }
            }
            match (&o.error, &o.plan) {
                (Some(e), _) if dry_run => stackclone_certs::outln!("{}: FAILED: {e}", o.stack),
                (None, Some(plan)) => {
                    stackclone_certs::outln!(
                        "{}: dry run: would transfer {} file(s) ({} bytes before delta); copy {} locally; delete {}; change metadata of {}; leave {} unchanged",
                        o.stack,
                        plan["send_count"],
                        plan["send_bytes"],
                        plan["copy_local"],
                        plan["delete_count"],
                        plan["meta_only"],
                        plan["unchanged"]
                    );
                    for s in plan["send"].as_array().into_iter().flatten() {
                        stackclone_certs::outln!(
                            "  send   {} ({} bytes)",
                            s["path"].as_str().unwrap_or("?"),
                            s["bytes"]
                        );
                    }
                    for d in plan["delete"].as_array().into_iter().flatten() {
                        stackclone_certs::outln!("  delete {}", d.as_str().unwrap_or("?"));
                    }
                }
                _ => {}
            }
        }
        if !dry_run {
            let rows: Vec<progress::Row> = outcomes.iter().map(row).collect();
            stackclone_certs::out!("{}", progress::table(&rows));
        }
        for o in &outcomes {
            if let Some(r) = &o.replaced {
                stackclone_certs::outln!(
                    "{}: the target's own copy differed in {} path(s); it is kept there: \
                     `stackclone-target rollback {} --to {}` on `{}` restores it",
                    o.stack,
                    r.paths,
                    o.stack,
                    r.rollback_to,
                    o.target
                );
            }
            if o.handed_over {
                stackclone_certs::outln!(
                    "{}: handed over: `{}` runs the stack as its primary now; it stays stopped \
                     here. Once clients use `{}`, run `stackclone-target demote {}` on this host",
                    o.stack,
                    o.target,
                    o.target,
                    o.stack
                );
            }
        }
    }
    Ok(if outcomes.iter().all(|o| o.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn row(o: &app::PushOutcome) -> progress::Row {
    let ms = |v: Option<u64>| v.map(std::time::Duration::from_millis);
    progress::Row {
        stack: o.stack.clone(),
        result: if o.ok { "committed" } else { "FAILED" }.to_owned(),
        generation: o.ok.then_some(o.generation),
        files_sent: o.files_sent,
        bytes_sent: o.bytes_sent,
        source_down: ms(o.source_downtime_ms),
        target_down: ms(o.target_downtime_ms),
        took: std::time::Duration::from_millis(o.duration_ms),
        error: o.error.clone(),
    }
}

fn recover(common: &Common, stacks: &[String], json: bool) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let all = rt.block_on(app::recover(common, stacks))?;
    if json {
        let doc: Vec<serde_json::Value> = all
            .iter()
            .map(|(stack, r)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["stack"] = serde_json::Value::from(stack.as_str());
                v
            })
            .collect();
        stackclone_certs::outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for (stack, r) in &all {
            match r {
                app::Recovery::Nothing => {
                    stackclone_certs::outln!("{stack}: nothing left stopped")
                }
                app::Recovery::Busy => stackclone_certs::outln!(
                    "{stack}: a cycle is running; it starts the stack again itself"
                ),
                app::Recovery::Started { containers } => stackclone_certs::outln!(
                    "{stack}: a cycle that died left it stopped; started {}",
                    containers.join(", ")
                ),
                app::Recovery::Failed { error } => {
                    stackclone_certs::outln!("{stack}: FAILED to start it again: {error}")
                }
            }
        }
    }
    let failed = all
        .iter()
        .any(|(_, r)| matches!(r, app::Recovery::Failed { .. }));
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn status(common: &Common, json: bool) -> anyhow::Result<ExitCode> {
    let all = app::status(common)?;
    if json {
        stackclone_certs::outln!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        stackclone_certs::outln!(
            "{:<20} {:<14} {:<10} {:>5} {:<20} {:>8} {:>10} {:>14} {:>10} {:>10}  last error",
            "STACK",
            "TARGET",
            "ROLE",
            "GEN",
            "COMMITTED (UTC)",
            "AGE",
            "FILES",
            "BYTES",
            "SRC-DOWN",
            "TGT-DOWN"
        );
        for s in &all {
            let when = s
                .committed_at
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .map(|t| t.replace('T', " ").trim_end_matches('Z').to_owned())
                .unwrap_or_else(|| "never".to_owned());
            let age = s.committed_at.map_or("-".to_owned(), |t| {
                human_secs(u64::try_from(now.saturating_sub(t)).unwrap_or(0))
            });
            stackclone_certs::outln!(
                "{:<20} {:<14} {:<10} {:>5} {:<20} {:>8} {:>10} {:>14} {:>8}ms {:>8}ms  {}",
                s.stack,
                s.target,
                s.role,
                s.generation,
                when,
                age,
                s.files,
                s.bytes,
                s.source_downtime_ms.unwrap_or(0),
                s.target_downtime_ms.unwrap_or(0),
                s.last_error.as_deref().unwrap_or("-")
            );
        }
        for s in &all {
            match s.role.as_str() {
                "superseded" => stackclone_certs::outln!(
                    "{}: superseded: promoted on `{}`{}; this host is no longer its primary{}",
                    s.stack,
                    s.target,
                    s.promoted_at.map_or(String::new(), |t| format!(
                        " at {}",
                        stackclone_proto::lineage::utc(t)
                    )),
                    if s.fenced_at.is_some() {
                        " (its local stack was stopped: on_superseded = \"stop\")"
                    } else {
                        ""
                    }
                ),
                "diverged" => stackclone_certs::outln!(
                    "{}: diverged: `{}` holds another history of this stack (a split brain); see the last error",
                    s.stack,
                    s.target
                ),
                _ => {}
            }
            if s.handed_over_at.is_some() {
                stackclone_certs::outln!(
                    "{}: handed over to `{}` by the last push (fail-back)",
                    s.stack,
                    s.target
                );
            }
        }
        for s in all.iter().filter(|s| !s.mounts.is_empty()) {
            stackclone_certs::outln!("\n{} mounts (as of the last cycle):", s.stack);
            for m in &s.mounts {
                stackclone_certs::outln!("  {m}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `42 s`, `7 min`, `3 h`, `2 d`.
fn human_secs(s: u64) -> String {
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}
