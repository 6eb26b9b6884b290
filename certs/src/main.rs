//! `stackclone-certs`: the fleet PKI command line. Parses flags, calls the library, maps the
//! result to an exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use stackclone_certs::cli::{self as cli_docs, CompletionsArgs, ManArgs};
use stackclone_certs::{
    self as certs, CaPin, DEFAULT_CERT_DAYS, DEFAULT_ENROLL_PORT, EnrollOptions, EnrollServer,
    Installed, RenewOptions, Role, StateDir, TokenSecret,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "stackclone fleet PKI: CA, join tokens, enrollment, revocation"
)]
struct Cli {
    /// State directory (keys, certificates, tokens, deny list).
    #[arg(long, global = true, env = "STACKCLONE_DIR", default_value = certs::DEFAULT_DIR)]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// On the CA host (usually the source): create the fleet CA, this host's source identity and
    /// its flag key.
    Init {
        #[arg(long)]
        name: String,
        /// Validity of this host's certificate, in days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: i64,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// On the CA host: run the enrollment endpoint (QUIC).
    Serve {
        #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_ENROLL_PORT)))]
        listen: SocketAddr,
        /// Validity of the certificates it issues, in days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: i64,
    },
    /// On the joining host: make a key, check the CA pin, prove the token, get a certificate.
    Enroll {
        #[arg(long)]
        name: String,
        #[arg(long)]
        server: String,
        /// The join token. Prefer `--token-file`: a command-line argument is visible to every
        /// local user in `/proc` while enrolling runs.
        #[arg(
            long,
            conflicts_with = "token_file",
            required_unless_present = "token_file"
        )]
        token: Option<TokenSecret>,
        /// Read the join token from this file (`-`: standard input), as the command `token
        /// create` prints does.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[arg(long)]
        ca_pin: CaPin,
    },
    /// Offline: make a key and a request file to carry to the CA host.
    Csr {
        #[arg(long)]
        name: String,
        /// Where to write the request (default `NAME.csr.json`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Offline, on the CA host: issue a certificate for a request file.
    Sign {
        file: PathBuf,
        #[arg(long, default_value = "target")]
        role: Role,
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: i64,
        /// Where to write the bundle (default `NAME.bundle.json`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The request replaces the host of that name: its live certificates are revoked. Without
        /// it, a name that has a live certificate is refused.
        #[arg(long)]
        replace: bool,
    },
    /// Offline: install a bundle made by `sign`, or a signed deny list (`deny.json`).
    Install {
        file: PathBuf,
        /// The fleet CA's pin (`show` on the CA host prints it); required for a bundle, which
        /// is refused if its CA has another pin. A deny list needs none: it is checked against
        /// the CA this host already trusts.
        #[arg(long)]
        ca_pin: Option<CaPin>,
    },
    /// Renew this host's certificate before it expires (over mutual TLS with the CA's `serve`;
    /// locally on the CA host). Name, role and flag key stay; a certificate without a flag key
    /// (a target enrolled before every host got one) gains one, so that the host can push.
    Renew {
        /// `HOST:PORT` of `serve` (default: the one `enroll` used).
        #[arg(long)]
        server: Option<String>,
        /// Validity, in days (CA host only; `serve --days` decides otherwise).
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: i64,
    },
    /// On the CA host: put every certificate issued to NAME on the signed deny list, or only the
    /// one with fingerprint `sha256:…` (see `show`).
    Revoke {
        #[arg(value_name = "NAME|FINGERPRINT")]
        name: String,
    },
    /// On a receiving host: forget the flag key pinned for NAME, so that a host replaced on
    /// purpose (new host, new key) is accepted and pinned the next time it pushes.
    ForgetFlagKey { name: String },
    /// Names, roles, fingerprints and expiry.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script to stdout.
    Completions(CompletionsArgs),
    /// Write man pages (one per command) into a directory.
    Man(ManArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// A single-use, expiring join token; prints the `enroll` command to paste.
    Create {
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long, default_value = "target")]
        role: Role,
        /// Where joiners reach `serve` (default: this host's name, port 7443).
        #[arg(long)]
        server: Option<String>,
        /// Bind the token to this host name.
        #[arg(long)]
        name: Option<String>,
        /// Replace the host `--name` names: enrolling revokes its live certificates. Without
        /// it, a name that has a live certificate cannot be enrolled again.
        #[arg(long, requires = "name")]
        replace: bool,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = StateDir::new(&cli.dir);
    match cli.command {
        Command::Completions(args) => {
            cli_docs::completions(Cli::command(), args.shell, &mut std::io::stdout());
        }
        Command::Man(args) => {
            for page in cli_docs::man_pages(Cli::command(), &args.dir)? {
                stackclone_certs::outln!("{}", page.display());
            }
        }
        Command::Init { name, days } => {
            let identity = certs::init(&dir, &name, days)?;
            let pin = CaPin::of_certificate(identity.ca_certificate())?;
            stackclone_certs::outln!(
                "created fleet CA in {} (pin {pin})\nthis host: `{}` ({}, {}), valid until {}",
                dir.root().display(),
                identity.name(),
                identity.role(),
                identity.info().fingerprint,
                rfc3339(identity.info().not_after),
            );
            stackclone_certs::outln!(
                "next: `stackclone-certs serve` and `stackclone-certs token create`"
            );
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    ttl,
                    role,
                    server,
                    name,
                    replace,
                    json,
                },
        } => {
            let server =
                server.unwrap_or_else(|| format!("{}:{DEFAULT_ENROLL_PORT}", local_host_name()));
            let token = certs::token_create(
                &dir,
                role,
                certs::parse_ttl(&ttl)?,
                &server,
                name.as_deref(),
                replace,
            )?;
            if json {
                stackclone_certs::outln!(
                    "{}",
                    serde_json::json!({
                        "token": token.token,
                        "ca_pin": token.ca_pin.to_string(),
                        "server": token.server,
                        "expires_at": token.expires_at,
                        "role": token.role,
                    })
                );
            } else {
                eprintln!(
                    "single-use {} token, expires at {}. Until then it can mint a certificate: \
                     keep it secret (the CA host keeps a key derived from it in {}, mode 0600). \
                     On the joining host run:",
                    token.role,
                    token.expires_at,
                    dir.tokens().display()
                );
                stackclone_certs::outln!("{}", token.enroll_command());
            }
        }
        Command::Serve { listen, days } => {
            let server = Arc::new(EnrollServer::load(&dir)?.with_days(days));
            runtime()?.block_on(async move {
                let endpoint = server.bind(listen)?;
                let addr = endpoint.local_addr().context("cannot read the bound address")?;
                stackclone_certs::outln!("listening on {addr}");
                let shutdown = async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                    }
                };
                certs::serve(server, endpoint, shutdown).await?;
                anyhow::Ok(())
            })?;
        }
        Command::Enroll {
            name,
            server,
            token,
            token_file,
            ca_pin,
        } => {
            let token = match (token, token_file) {
                (Some(token), _) => token,
                (None, Some(file)) => read_token(&file)?,
                (None, None) => anyhow::bail!("give the join token with `--token-file FILE`"),
            };
            let opts = EnrollOptions {
                dir: dir.clone(),
                name,
                server,
                token,
                ca_pin,
            };
            let identity = runtime()?.block_on(certs::enroll(&opts))?;
            stackclone_certs::outln!(
                "enrolled `{}` as {} ({}), valid until {}",
                identity.name(),
                identity.role(),
                identity.info().fingerprint,
                rfc3339(identity.info().not_after)
            );
        }
        Command::Csr { name, out } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.csr.json")));
            certs::make_csr(&dir, &name, &out)?;
            stackclone_certs::outln!(
                "wrote {}; on the CA host run `stackclone-certs sign {}`, then bring the bundle back and run `stackclone-certs install FILE`",
                out.display(),
                out.display()
            );
        }
        Command::Sign {
            file,
            role,
            days,
            out,
            replace,
        } => {
            let tmp_out = out.clone().unwrap_or_else(|| PathBuf::from("bundle.json"));
            let bundle = certs::sign_request(&dir, &file, role, days, &tmp_out, replace)?;
            let out = match out {
                Some(out) => out,
                None => {
                    let named = PathBuf::from(format!("{}.bundle.json", bundle.name));
                    std::fs::rename(&tmp_out, &named)
                        .with_context(|| format!("cannot rename bundle to {}", named.display()))?;
                    named
                }
            };
            stackclone_certs::outln!(
                "issued a {} certificate for `{}`; wrote {} — carry it back and run `stackclone-certs install {}`",
                bundle.role,
                bundle.name,
                out.display(),
                out.display()
            );
        }
        Command::Install { file, ca_pin } => match certs::install(&dir, &file, ca_pin)? {
            Installed::Identity(info) => stackclone_certs::outln!(
                "installed `{}` as {} ({}), valid until {}",
                info.name,
                info.role,
                info.fingerprint,
                rfc3339(info.not_after)
            ),
            Installed::DenyList { version, adopted } => stackclone_certs::outln!(
                "deny list v{version} {}",
                if adopted {
                    "adopted"
                } else {
                    "is not newer than the one in force; kept the current one"
                }
            ),
            other => stackclone_certs::outln!("{other:?}"),
        },
        Command::Renew { server, days } => {
            let had_flag_key = certs::Identity::load(&dir)
                .map(|id| id.info().flag_key.is_some())
                .unwrap_or(true);
            let identity = if server.is_none() && dir.ca_key().exists() {
                certs::renew_local(&dir, days)?
            } else {
                let opts = RenewOptions {
                    dir: dir.clone(),
                    server,
                };
                runtime()?.block_on(certs::renew(&opts))?
            };
            stackclone_certs::outln!(
                "renewed `{}` ({}), valid until {}",
                identity.name(),
                identity.info().fingerprint,
                rfc3339(identity.info().not_after)
            );
            if let (false, Some(key)) = (had_flag_key, identity.info().flag_key) {
                stackclone_certs::outln!(
                    "`{}` now has a flag key ({}): it can push where a stack's `allow` names it",
                    identity.name(),
                    hex::encode(key.as_bytes())
                );
            }
        }
        Command::ForgetFlagKey { name } => {
            if certs::forget_flag_key(&dir, &name)? {
                stackclone_certs::outln!(
                    "forgot the flag key of `{name}`; the next host pushing as `{name}` is pinned"
                );
            } else {
                stackclone_certs::outln!("no flag key was pinned for `{name}`");
            }
        }
        Command::Revoke { name } => {
            let list = certs::revoke(&dir, &name)?;
            stackclone_certs::outln!(
                "revoked `{name}`: deny list v{} now names {} certificate(s). It reaches peers through `serve`, through the source agent's hello, or as a file: `stackclone-certs install {}`",
                list.version(),
                list.entries().len(),
                dir.deny_list().display()
            );
        }
        Command::Show { json } => {
            let status = certs::show(&dir)?;
            if json {
                stackclone_certs::outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
    }
    Ok(())
}

/// The join token from a file, or standard input for `-` (the first non-empty line).
fn read_token(file: &std::path::Path) -> anyhow::Result<TokenSecret> {
    let text = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read the token from stdin")?
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the token from {}", file.display()))?
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .context("the token file is empty")?;
    Ok(line.parse()?)
}

fn print_status(s: &certs::Status) {
    stackclone_certs::outln!("state directory: {}", s.dir.display());
    match &s.ca {
        Some(ca) => stackclone_certs::outln!(
            "fleet CA: {} (until {}){}",
            ca.pin,
            ca.not_after,
            if ca.is_ca_host {
                ", CA key on this host"
            } else {
                ""
            }
        ),
        None => stackclone_certs::outln!("fleet CA: none (run `init` or `enroll`)"),
    }
    if let Some(h) = &s.host {
        stackclone_certs::outln!(
            "this host: `{}` {} {} until {} ({} days left){}",
            h.name,
            h.role,
            h.fingerprint,
            h.not_after,
            h.days_left,
            if h.revoked { " REVOKED" } else { "" }
        );
        if let Some(k) = &h.flag_key {
            stackclone_certs::outln!("flag key: {k}");
        }
    }
    stackclone_certs::outln!(
        "deny list: v{} ({} revoked)",
        s.deny_list_version,
        s.revoked.len()
    );
    for (name, key) in &s.trusted_flag_keys {
        stackclone_certs::outln!("source flag key: `{name}` {key}");
    }
    for c in &s.issued {
        stackclone_certs::outln!(
            "issued: `{}` {} {} until {} via {}{}",
            c.name,
            c.role,
            c.fingerprint,
            c.not_after,
            c.via,
            if c.revoked { " REVOKED" } else { "" }
        );
    }
    for t in &s.tokens {
        stackclone_certs::outln!(
            "token: {} {} expires {} {}{}",
            t.id,
            t.role,
            t.expires_at,
            t.state,
            t.used_by
                .as_deref()
                .map(|n| format!(" by `{n}`"))
                .unwrap_or_default()
        );
    }
}
