//! `stackclone-target`: parses flags, calls the library, maps the result to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use stackclone_certs::cli::{self, CompletionsArgs, ManArgs};
use stackclone_common::logging::LogFormat;
use stackclone_target::app::{self, Common};

#[derive(Parser, Debug)]
#[command(
    name = "stackclone-target",
    version,
    about = "stackclone target agent: keeps a standby copy of compose stacks"
)]
struct Cli {
    /// Main config file; conf.d/*.toml beside it holds one stack each.
    #[arg(long, global = true, default_value = "/etc/stackclone/target.toml")]
    config: PathBuf,
    /// Identity dir (keys, certificates); replaces the config's identity_dir.
    #[arg(long, global = true, env = "STACKCLONE_DIR")]
    dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve pushes until SIGTERM; SIGHUP reloads the config.
    Run,
    /// Show each stack's last committed generation and whether it is stale.
    Status {
        stack: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash the live dir against the last committed manifest; exit 1 on any drift.
    Verify { stack: String },
    /// Restore the previous generation (or generation G) exactly. Asks first on a terminal;
    /// refuses to delete more than half of the standby's files without --force.
    Rollback {
        stack: String,
        #[arg(long)]
        to: Option<u64>,
        /// Roll back even if it deletes more than half of the standby's files (the `max_delete`
        /// valve pushes have too); `--to 0` empties the standby.
        #[arg(long)]
        force: bool,
        /// Do not ask (needed when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Make this host's copy of STACK the primary (the primary died, or a planned switch-over):
    /// records it (refusing every push for the stack from then on), starts a new history, and
    /// brings the stack up on the last committed generation, health-checked.
    Promote {
        stack: String,
        #[arg(long)]
        json: bool,
    },
    /// Make STACK a standby again here, once its primary is primary again (after a fail-back):
    /// pushes that continue this copy's history are accepted from then on.
    Demote {
        stack: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Write man pages into a directory.
    Man(ManArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log = stackclone_common::logging::init(cli.log_format);
    let common = Common {
        config: cli.config,
        identity_dir: cli.dir,
    };
    let result = match cli.command {
        Command::Run => run(&common),
        Command::Status { stack, json } => status(&common, stack.as_deref(), json),
        Command::Verify { stack } => verify(&common, &stack),
        Command::Rollback {
            stack,
            to,
            force,
            yes,
        } => rollback(&common, &stack, to, force, yes),
        Command::Promote { stack, json } => promote(&common, &stack, json),
        Command::Demote { stack, json } => demote(&common, &stack, json),
        Command::Completions(args) => {
            cli::completions(Cli::command(), args.shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man(args) => man(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(common: &Common) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(stackclone_target::daemon::run(common))?;
    Ok(ExitCode::SUCCESS)
}

fn promote(common: &Common, stack: &str, json: bool) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let r = rt.block_on(app::promote(common, stack))?;
    if json {
        stackclone_certs::outln!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    if r.promoted_now {
        stackclone_certs::outln!(
            "{stack}: promoted at {}: this host's copy is the primary now; every push for it is refused",
            utc(r.promoted_at)
        );
    } else {
        stackclone_certs::outln!(
            "{stack}: already promoted (since {}); brought up again",
            utc(r.promoted_at)
        );
    }
    stackclone_certs::outln!(
        "{stack}: runs generation {} (committed {}){}",
        r.generation,
        r.committed_at.map_or("never".to_string(), utc),
        if r.services.is_empty() {
            String::new()
        } else {
            format!("; healthy: {}", r.services.join(", "))
        }
    );
    stackclone_certs::outln!(
        "{stack}: history {}{}",
        r.history.as_deref().unwrap_or("-"),
        r.forked_from
            .as_deref()
            .map_or(String::new(), |f| format!(" (forked from {f})"))
    );
    stackclone_certs::outln!(
        "to return: on this host, `stackclone-source push {stack} --fail-back` (to the old primary, \
         once it is back), then `stackclone-target demote {stack}` here"
    );
    Ok(ExitCode::SUCCESS)
}

fn demote(common: &Common, stack: &str, json: bool) -> anyhow::Result<ExitCode> {
    let was = app::demote(common, stack)?;
    if json {
        stackclone_certs::outln!(
            "{}",
            serde_json::json!({"stack": stack, "was_promoted_at": was, "role": "standby"})
        );
        return Ok(ExitCode::SUCCESS);
    }
    match was {
        Some(at) => stackclone_certs::outln!(
            "{stack}: a standby again (it was promoted at {}); pushes that continue its history \
             are accepted, others are refused as diverged",
            utc(at)
        ),
        None => stackclone_certs::outln!("{stack}: was not promoted; nothing changed"),
    }
    Ok(ExitCode::SUCCESS)
}

fn status(common: &Common, stack: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let mut all = app::status(common, stack)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(app::containers(
        common,
        &mut all,
        std::time::Duration::from_secs(3),
    ))?;
    if json {
        stackclone_certs::outln!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        stackclone_certs::outln!(
            "{:<20} {:<9} {:>5} {:<20} {:>8} {:>10} {:>14} {:>10} {:<12}  last error",
            "STACK",
            "ROLE",
            "GEN",
            "COMMITTED (UTC)",
            "AGE",
            "FILES",
            "BYTES",
            "TGT-DOWN",
            "STALE"
        );
        for s in &all {
            let st = &s.state;
            let stale = match s.max_age_secs {
                None => "-".to_string(),
                Some(max) => format!(
                    "{} (>{})",
                    if s.stale { "yes" } else { "no" },
                    stackclone_target::staleness::human(std::time::Duration::from_secs(max))
                ),
            };
            stackclone_certs::outln!(
                "{:<20} {:<9} {:>5} {:<20} {:>8} {:>10} {:>14} {:>8}ms {:<12}  {}",
                st.stack,
                s.role,
                st.generation,
                st.committed_at.map_or("-".to_string(), utc),
                s.age_secs.map_or("-".to_string(), |a| {
                    stackclone_target::staleness::human(std::time::Duration::from_secs(a))
                }),
                st.files,
                st.bytes,
                st.target_downtime_ms,
                stale,
                if s.busy {
                    "(busy: a cycle is running)"
                } else {
                    st.last_error.as_deref().unwrap_or("-")
                }
            );
        }
        for s in &all {
            if let Some(c) = &s.containers {
                stackclone_certs::outln!("{}: containers {}", s.state.stack, c.summary());
            }
            if let Some(at) = s.state.promoted_at {
                stackclone_certs::outln!(
                    "{}: promoted at {}: the primary on this host; pushes for it are refused",
                    s.state.stack,
                    utc(at)
                );
            }
        }
        for s in all.iter().filter(|s| !s.standby_stopped.is_empty()) {
            stackclone_certs::outln!(
                "{}: kept stopped on purpose on this standby (standby_stopped): {}",
                s.state.stack,
                s.standby_stopped.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn man(args: &ManArgs) -> anyhow::Result<ExitCode> {
    for page in cli::man_pages(Cli::command(), &args.dir)? {
        stackclone_certs::outln!("{}", page.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(common: &Common, stack: &str) -> anyhow::Result<ExitCode> {
    let drift = app::verify(common, stack)?;
    for d in &drift {
        stackclone_certs::outln!("{}: {:?}", d.path, d.what);
    }
    if drift.is_empty() {
        stackclone_certs::outln!("{stack}: live dir matches the last committed generation");
        Ok(ExitCode::SUCCESS)
    } else {
        stackclone_certs::outln!("{stack}: {} path(s) drifted", drift.len());
        Ok(ExitCode::FAILURE)
    }
}

fn rollback(
    common: &Common,
    stack: &str,
    to: Option<u64>,
    force: bool,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, IsTerminal, Write};
    let plan = app::rollback_plan(common, stack, to)?;
    let summary = format!(
        "{stack}: roll back from generation {} to {}: deletes {} of {} files, writes {}, {} unchanged{}",
        plan.from,
        plan.to,
        plan.changes.removed_files,
        plan.changes.live_files,
        plan.changes.upserts.len(),
        plan.changes.unchanged,
        if plan.to == 0 {
            " (generation 0 is what the directory held before the first push)"
        } else {
            ""
        }
    );
    let share = plan.changes.delete_share();
    if share > stackclone_common::config::DEFAULT_MAX_DELETE.get() && !force {
        anyhow::bail!(
            "{summary}\nrefusing: that deletes {:.0}% of the standby's files, more than the {:.0}% \
             a push may (max_delete); pass --force if that is really what you want",
            share * 100.0,
            stackclone_common::config::DEFAULT_MAX_DELETE.get() * 100.0
        );
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "{summary}\nrefusing to roll back without a terminal to ask on: pass --yes"
            );
        }
        eprint!("{summary}\nroll back? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            eprintln!("nothing changed");
            return Ok(ExitCode::FAILURE);
        }
    }
    let rt = tokio::runtime::Runtime::new()?;
    let r = rt.block_on(app::rollback(common, stack, Some(plan.to)))?;
    stackclone_certs::outln!(
        "{stack}: rolled back from generation {} to {}",
        r.from,
        r.to
    );
    Ok(ExitCode::SUCCESS)
}

/// Unix seconds as `2026-11-22T01:29:10Z`.
fn utc(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}
