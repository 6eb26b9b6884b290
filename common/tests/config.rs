//! Loading `source.toml` / `target.toml` and their `conf.d/` stack files: defaults, every error a
//! person can make (each named by file, line and key), and the shipped examples.

use std::collections::BTreeMap;
use std::fs;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use stackclone_common::alert::Channel;
use stackclone_common::config::{
    Address, ConfigError, DEFAULT_MAX_DELETE, Fraction, Hook, LoadOptions, OverrideProblem,
    SkippedStack, SourceConfig, SourceStack, TargetConfig, TargetPeer, TargetStack,
    parse_bandwidth, parse_duration,
};
use stackclone_proto::session::OnStopTimeout;
use tempfile::TempDir;

/// A config dir in a temp dir: the main file, `conf.d/`, and data dirs under `data/`.
struct Dir {
    tmp: TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            tmp: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("has a parent")).expect("mkdir");
        fs::write(&p, text).expect("write");
        p
    }

    /// Makes `data/NAME` and returns its absolute path as TOML wants it.
    fn data(&self, name: &str) -> String {
        let p = self.path("data").join(name);
        fs::create_dir_all(&p).expect("mkdir data");
        p.to_str().expect("utf-8 temp path").to_owned()
    }

    fn source(&self, main: &str) -> Result<SourceConfig, ConfigError> {
        SourceConfig::load(self.write("source.toml", main))
    }

    fn target(&self, main: &str) -> Result<TargetConfig, ConfigError> {
        TargetConfig::load(self.write("target.toml", main))
    }

    fn target_with_options(
        &self,
        main: &str,
        options: &LoadOptions,
    ) -> Result<TargetConfig, ConfigError> {
        TargetConfig::load_with(self.write("target.toml", main), options)
    }
}

const SOURCE_MAIN: &str = "[targets.standby]\naddress = \"standby.example.net:4433\"\n";
const TARGET_MAIN: &str = "listen = \"0.0.0.0:4433\"\n";

/// Asserts that `err` displays the file, `line`, and the key, and returns the message.
#[track_caller]
fn assert_names(err: &ConfigError, file: &str, line: usize, key: &str) -> String {
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{file}:{line}:")),
        "{msg:?} should name {file}:{line}"
    );
    assert!(
        msg.contains(&format!("\"{key}\"")),
        "{msg:?} should name key {key:?}"
    );
    let at = err.location().expect("error has a location");
    assert_eq!(at.line, line, "{msg}");
    assert!(at.file.ends_with(file), "{msg}");
    msg
}

#[track_caller]
fn source_err(dir: &Dir, main: &str) -> ConfigError {
    dir.source(main).expect_err("config should be refused")
}

#[track_caller]
fn target_err(dir: &Dir, main: &str) -> ConfigError {
    dir.target(main).expect_err("config should be refused")
}

// ---- Good configs ------------------------------------------------------------------------------

#[test]
fn source_minimal_stack_gets_every_default() {
    let dir = Dir::new();
    let data = dir.data("nextcloud");
    let stack_file = dir.write(
        "conf.d/nextcloud.toml",
        &format!("stack = \"nextcloud\"\npath = \"{data}/\"\ntarget = \"standby\"\n"),
    );
    let cfg = dir.source(SOURCE_MAIN).expect("loads");

    assert_eq!(cfg.file, dir.path("source.toml"));
    assert_eq!(cfg.identity_dir, PathBuf::from("/etc/stackclone"));
    assert_eq!(cfg.metrics_listen, None);
    let peer = TargetPeer {
        name: "standby".into(),
        address: Address {
            host: "standby.example.net".into(),
            port: 4433,
        },
    };
    assert_eq!(
        cfg.targets,
        BTreeMap::from([("standby".to_owned(), peer.clone())])
    );
    assert_eq!(cfg.skipped, vec![]);
    assert_eq!(cfg.warnings, vec![]);
    let expected = SourceStack {
        name: "nextcloud".into(),
        file: stack_file,
        path: PathBuf::from(&data), // trailing slash normalised away
        target: "standby".into(),
        exclude: vec![],
        precopy: true,
        docker: true,
        stop: true,
        max_delete: DEFAULT_MAX_DELETE,
        allow_empty: false,
        bandwidth_limit: None,
        compress: true,
        checksum: false,
        compose_project: "nextcloud".into(),
        depends_on: BTreeMap::new(),
        order: vec![],
        stop_timeout: Duration::from_secs(30),
        on_stop_timeout: OnStopTimeout::Warn,
        on_superseded: stackclone_common::config::OnSuperseded::Alert,
        pre_stop: vec![],
        post_start: vec![],
        schedule: None,
        random_delay: None,
        ignore_mounts: BTreeMap::new(),
        extra_paths: vec![],
    };
    assert_eq!(cfg.stacks, vec![expected.clone()]);
    assert_eq!(cfg.stack("nextcloud"), Some(&expected));
    assert_eq!(cfg.target_of(&expected), Some(&peer));
    assert_eq!(DEFAULT_MAX_DELETE.get(), 0.5);
}

/// A data-only stack stops nothing, so a pre-copy pass would only read and send everything
/// twice: it is off unless asked for.
#[test]
fn a_data_only_stack_skips_the_precopy_pass_unless_asked() {
    let dir = Dir::new();
    let data = dir.data("files");
    let stack = |extra: &str| {
        format!("stack = \"files\"\npath = \"{data}\"\ntarget = \"standby\"\n{extra}")
    };
    dir.write("conf.d/files.toml", &stack("docker = false\n"));
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    assert!(!cfg.stacks[0].docker);
    assert!(!cfg.stacks[0].precopy, "{:?}", cfg.stacks[0]);

    dir.write(
        "conf.d/files.toml",
        &stack("docker = false\nprecopy = true\n"),
    );
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    assert!(cfg.stacks[0].precopy, "{:?}", cfg.stacks[0]);
}

#[test]
fn source_every_key_is_read() {
    let dir = Dir::new();
    let data = dir.data("app");
    let main = format!(
        "identity_dir = \"/srv/id\"\nmetrics_listen = \"127.0.0.1:9651\"\n{SOURCE_MAIN}\
         [targets.offsite]\naddress = \"[2001:db8::7]:4433\"\n"
    );
    dir.write(
        "conf.d/app.toml",
        &format!(
            r#"stack = "app"
path = "{data}"
target = "offsite"
exclude = ["*.tmp", "/cache/"]
precopy = false
docker = true
stop = true
max_delete = "12.5%"
allow_empty = true
bandwidth_limit = "20MiB/s"
compress = false
checksum = true
compose_project = "app-prod"
depends_on = {{ web = ["db", "redis"] }}
order = ["db", "redis", "web"]
stop_timeout = "1m30s"
on_stop_timeout = "fail"
pre_stop = {{ service = "db", command = ["sh", "-c", "sync"] }}
schedule = "15 3 * * *"
random_delay = 600

[[post_start]]
service = "web"
command = ["true"]

[[post_start]]
service = "web"
command = ["echo", "up"]
"#
        ),
    );
    let cfg = dir.source(&main).expect("loads");
    assert_eq!(cfg.identity_dir, PathBuf::from("/srv/id"));
    assert_eq!(
        cfg.metrics_listen,
        Some(Address {
            host: "127.0.0.1".into(),
            port: 9651
        })
    );
    assert_eq!(cfg.targets["offsite"].address.host, "2001:db8::7");
    assert_eq!(
        cfg.targets["offsite"].address.to_string(),
        "[2001:db8::7]:4433"
    );
    let s = &cfg.stacks[0];
    assert_eq!(s.target, "offsite");
    assert_eq!(s.exclude, vec!["*.tmp", "/cache/"]);
    assert!(!s.precopy);
    assert!(s.docker && s.stop && s.allow_empty && !s.compress && s.checksum);
    assert_eq!(s.max_delete.get(), 0.125);
    assert_eq!(s.bandwidth_limit, NonZeroU64::new(20 * 1024 * 1024));
    assert_eq!(s.compose_project, "app-prod");
    assert_eq!(
        s.depends_on,
        BTreeMap::from([("web".to_owned(), vec!["db".to_owned(), "redis".to_owned()])])
    );
    assert_eq!(s.order, vec!["db", "redis", "web"]);
    assert_eq!(s.stop_timeout, Duration::from_secs(90));
    assert_eq!(s.on_stop_timeout, OnStopTimeout::Fail);
    assert_eq!(
        s.pre_stop,
        vec![Hook {
            service: "db".into(),
            command: vec!["sh".into(), "-c".into(), "sync".into()]
        }]
    );
    assert_eq!(s.post_start.len(), 2);
    assert_eq!(s.post_start[1].command, vec!["echo", "up"]);
    assert_eq!(s.schedule.as_ref().map(|s| s.as_str()), Some("15 3 * * *"));
    assert_eq!(s.random_delay, Some(Duration::from_secs(600)));
    assert!(cfg.warnings.is_empty());
}

#[test]
fn target_minimal_stack_gets_every_default() {
    let dir = Dir::new();
    let data = dir.data("nextcloud");
    let stack_file = dir.write(
        "conf.d/nextcloud.toml",
        &format!("stack = \"nextcloud\"\npath = \"{data}\"\nallow = [\"primary\"]\n"),
    );
    let cfg = dir.target(TARGET_MAIN).expect("loads");
    assert_eq!(
        cfg.listen,
        Address {
            host: "0.0.0.0".into(),
            port: 4433
        }
    );
    assert_eq!(cfg.name, None);
    assert_eq!(cfg.identity_dir, PathBuf::from("/etc/stackclone"));
    assert_eq!(cfg.metrics_listen, None);
    assert_eq!(cfg.max_skew, Duration::from_secs(600));
    assert!(cfg.skipped.is_empty() && cfg.warnings.is_empty());
    assert_eq!(
        cfg.stacks,
        vec![TargetStack {
            name: "nextcloud".into(),
            file: stack_file,
            path: PathBuf::from(&data),
            allow: vec!["primary".into()],
            keep_generations: NonZeroU32::new(3).expect("3"),
            docker: true,
            compose_project: "nextcloud".into(),
            compose_dir: PathBuf::from(&data),
            state_dir: None,
            health_timeout: Duration::from_secs(120),
            auto_rollback: true,
            allow_dangerous_root: false,
            depends_on: Default::default(),
            order: vec![],
            stop_timeout: Duration::from_secs(30),
            max_age: None,
            compose_policy: stackclone_common::config::ComposePolicy::Trusted,
            extra_paths: BTreeMap::new(),
            compose_override: None,
            compose_env: BTreeMap::new(),
            standby_stopped: vec![],
        }]
    );
}

#[test]
fn target_every_key_is_read_and_a_missing_path_is_fine() {
    let dir = Dir::new();
    // Not created: the target creates its copy on the first push.
    let live = dir.path("data/not-yet").to_str().expect("utf-8").to_owned();
    dir.write(
        "conf.d/app.toml",
        &format!(
            "stack = \"app\"\npath = \"{live}\"\nallow = [\"a\", \"b.example\"]\n\
             keep_generations = 7\ndocker = false\ncompose_project = \"app-standby\"\n\
             compose_dir = \"/srv/compose/app\"\nstate_dir = \"/var/lib/stackclone/app\"\n\
             health_timeout = \"5m\"\nauto_rollback = false\n\
             order = [\"db\", \"app\"]\ndepends_on = {{ app = [\"db\"] }}\nstop_timeout = \"10s\"\n"
        ),
    );
    let main = "listen = \"[::]:4433\"\nname = \"standby\"\nidentity_dir = \"/srv/id\"\n\
                metrics_listen = \"localhost:9652\"\nmax_skew = 30\n";
    let cfg = dir.target(main).expect("loads");
    assert_eq!(cfg.listen.host, "::");
    assert_eq!(cfg.name.as_deref(), Some("standby"));
    assert_eq!(cfg.identity_dir, PathBuf::from("/srv/id"));
    assert_eq!(cfg.metrics_listen.as_ref().map(|a| a.port), Some(9652));
    assert_eq!(cfg.max_skew, Duration::from_secs(30));
    let s = cfg.stack("app").expect("stack app");
    assert_eq!(s.path, PathBuf::from(&live));
    assert_eq!(s.allow, vec!["a", "b.example"]);
    assert_eq!(s.keep_generations.get(), 7);
    assert!(!s.docker && !s.auto_rollback && !s.allow_dangerous_root);
    assert_eq!(s.compose_project, "app-standby");
    assert_eq!(s.compose_dir, PathBuf::from("/srv/compose/app"));
    assert_eq!(s.state_dir, Some(PathBuf::from("/var/lib/stackclone/app")));
    assert_eq!(s.health_timeout, Duration::from_secs(300));
    assert_eq!(s.order, vec!["db", "app"]);
    assert_eq!(s.depends_on.get("app"), Some(&vec!["db".to_string()]));
    assert_eq!(s.stop_timeout, Duration::from_secs(10));
}

#[test]
fn conf_d_is_read_in_name_order_and_other_files_are_ignored() {
    let dir = Dir::new();
    for name in ["b", "a", "c"] {
        let data = dir.data(name);
        dir.write(
            &format!("conf.d/{name}.toml"),
            &format!("stack = \"{name}\"\npath = \"{data}\"\ntarget = \"standby\"\n"),
        );
    }
    dir.write("conf.d/README", "not toml");
    dir.write("conf.d/d.toml.disabled", "pathh = 1");
    dir.write("conf.d/.#a.toml", "pathh = 1");
    fs::create_dir_all(dir.path("conf.d/dir.toml")).expect("mkdir");
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    let names: Vec<_> = cfg.stacks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn missing_conf_d_means_no_stacks() {
    let dir = Dir::new();
    assert!(dir.source(SOURCE_MAIN).expect("loads").stacks.is_empty());
    assert!(dir.target(TARGET_MAIN).expect("loads").stacks.is_empty());
}

#[test]
fn skipped_stack_is_kept_but_its_path_and_target_are_not_checked() {
    let dir = Dir::new();
    let file = dir.write(
        "conf.d/old.toml",
        "stack = \"old\"\npath = \"/nonexistent/old\"\ntarget = \"gone\"\nskip = true\n",
    );
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    assert!(cfg.stacks.is_empty());
    assert_eq!(
        cfg.skipped,
        vec![SkippedStack {
            name: "old".into(),
            file: file.clone()
        }]
    );
    assert_eq!(cfg.stack("old"), None);

    let dir = Dir::new();
    dir.write(
        "conf.d/old.toml",
        "stack = \"old\"\npath = \"/etc\"\nallow = []\nskip = true\n",
    );
    let cfg = dir.target(TARGET_MAIN).expect("loads");
    assert!(cfg.stacks.is_empty());
    assert_eq!(cfg.skipped[0].name, "old");
}

#[test]
fn skipped_stack_still_has_its_keys_checked() {
    let dir = Dir::new();
    dir.write(
        "conf.d/old.toml",
        "stack = \"old\"\npath = \"/x\"\ntarget = \"standby\"\nskip = true\nsckip = 1\n",
    );
    let err = source_err(&dir, SOURCE_MAIN);
    assert_names(&err, "conf.d/old.toml", 5, "sckip");
}

#[test]
fn stop_false_loads_with_a_loud_warning() {
    let dir = Dir::new();
    let data = dir.data("db");
    dir.write(
        "conf.d/db.toml",
        &format!("stack = \"db\"\npath = \"{data}\"\ntarget = \"standby\"\nstop = false\n"),
    );
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    assert!(!cfg.stacks[0].stop);
    assert_eq!(cfg.warnings.len(), 1);
    let w = cfg.warnings[0].to_string();
    assert!(w.contains("conf.d/db.toml:4:"), "{w}");
    assert!(
        w.contains("stop = false") && w.contains("crash-consistent"),
        "{w}"
    );
    assert!(w.contains("\"db\""), "{w}");
}

#[test]
fn max_delete_accepts_percent_and_fraction() {
    for (value, want) in [
        ("\"50%\"", 0.5),
        ("0.5", 0.5),
        ("\"12.5%\"", 0.125),
        ("\"0.25\"", 0.25),
        ("0", 0.0),
        ("1", 1.0),
        ("\"100%\"", 1.0),
    ] {
        let dir = Dir::new();
        let data = dir.data("s");
        dir.write(
            "conf.d/s.toml",
            &format!(
                "stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\nmax_delete = {value}\n"
            ),
        );
        let cfg = dir
            .source(SOURCE_MAIN)
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(cfg.stacks[0].max_delete.get(), want, "{value}");
    }
    assert_eq!("50%".parse::<Fraction>().map(Fraction::get), Ok(0.5));
    assert_eq!(
        Fraction::new(0.5).map(|f| f.to_string()).as_deref(),
        Some("50%")
    );
}

#[test]
fn durations_parse() {
    let secs = Duration::from_secs;
    assert_eq!(parse_duration("30s"), Ok(secs(30)));
    assert_eq!(parse_duration("5m"), Ok(secs(300)));
    assert_eq!(parse_duration("26h"), Ok(secs(26 * 3600)));
    assert_eq!(parse_duration("1d"), Ok(secs(86_400)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1h30m"), Ok(secs(5400)));
    assert_eq!(parse_duration(" 1h 30m 5s "), Ok(secs(5405)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));

    let err = parse_duration("30").expect_err("no unit");
    assert!(err.contains("no unit") && err.contains("30s"), "{err}");
    let err = parse_duration("5x").expect_err("bad unit");
    assert!(err.contains("unknown unit \"x\""), "{err}");
    assert!(parse_duration("").is_err());
    assert!(parse_duration("h").is_err());
    assert!(parse_duration("-5s").is_err());
    assert!(parse_duration("1.5h").is_err());
    assert!(parse_duration("99999999999999999999s").is_err());
    assert!(parse_duration("999999999999999d").is_err());
}

#[test]
fn durations_in_config_accept_strings_and_integer_seconds() {
    let dir = Dir::new();
    let data = dir.data("s");
    dir.write(
        "conf.d/s.toml",
        &format!(
            "stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\nstop_timeout = 45\n\
             random_delay = \"2h\"\n"
        ),
    );
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    assert_eq!(cfg.stacks[0].stop_timeout, Duration::from_secs(45));
    assert_eq!(cfg.stacks[0].random_delay, Some(Duration::from_secs(7200)));
}

#[test]
fn bandwidths_parse() {
    let n = |v: u64| NonZeroU64::new(v).expect("non-zero");
    assert_eq!(parse_bandwidth("20MiB/s"), Ok(n(20 << 20)));
    assert_eq!(parse_bandwidth("20 MiB/s"), Ok(n(20 << 20)));
    assert_eq!(parse_bandwidth("20M"), Ok(n(20 << 20)));
    assert_eq!(parse_bandwidth("20MB/s"), Ok(n(20_000_000)));
    assert_eq!(parse_bandwidth("1.5KiB"), Ok(n(1536)));
    assert_eq!(parse_bandwidth("800"), Ok(n(800)));
    assert_eq!(parse_bandwidth("1G"), Ok(n(1 << 30)));
    assert!(
        parse_bandwidth("0MiB/s")
            .expect_err("zero")
            .contains("more than 0")
    );
    assert!(
        parse_bandwidth("20 parsecs")
            .expect_err("unit")
            .contains("unknown unit")
    );
    assert!(parse_bandwidth("fast").is_err());
}

#[test]
fn addresses_parse() {
    let a: Address = "standby:4433".parse().expect("host:port");
    assert_eq!((a.host.as_str(), a.port), ("standby", 4433));
    let a: Address = "[::1]:1".parse().expect("ipv6");
    assert_eq!(a.host, "::1");
    assert_eq!(a.to_string(), "[::1]:1");
    for bad in [
        "standby",
        ":4433",
        "::1:4433",
        "host:99999",
        "host:",
        "[nope]:1",
        "a b:1",
    ] {
        assert!(bad.parse::<Address>().is_err(), "{bad} should be refused");
    }
    let resolved: Vec<_> =
        std::net::ToSocketAddrs::to_socket_addrs(&"127.0.0.1:7".parse::<Address>().expect("v4"))
            .expect("resolves")
            .collect();
    assert_eq!(resolved, vec!["127.0.0.1:7".parse().expect("socket addr")]);
}

// ---- Errors: each names the file, the line and the key ------------------------------------------

#[test]
fn unknown_key_in_a_stack_file() {
    let dir = Dir::new();
    let data = dir.data("nextcloud");
    dir.write(
        "conf.d/nextcloud.toml",
        &format!("stack = \"nextcloud\"\ntarget = \"standby\"\npathh = \"{data}\"\n"),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/nextcloud.toml", 3, "pathh");
    assert!(
        msg.contains("nextcloud.toml:3:1: unknown key \"pathh\""),
        "{msg}"
    );
    assert!(
        msg.contains("expected one of") && msg.contains("`path`"),
        "{msg}"
    );
    assert!(matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "pathh"));
}

#[test]
fn unknown_key_in_the_main_files() {
    let dir = Dir::new();
    let err = source_err(
        &dir,
        "identity_dir = \"/x\"\n[stacks.nextcloud]\npath = \"/x\"\n",
    );
    assert_names(&err, "source.toml", 2, "stacks");

    let dir = Dir::new();
    let err = source_err(
        &dir,
        "[targets.standby]\naddress = \"h:1\"\nadress = \"h:1\"\n",
    );
    let msg = assert_names(&err, "source.toml", 3, "adress");
    assert!(msg.contains("`address`"), "{msg}");

    let dir = Dir::new();
    let err = target_err(&dir, "listen = \"0.0.0.0:1\"\nmax_scew = 5\n");
    assert_names(&err, "target.toml", 2, "max_scew");
}

#[test]
fn unknown_key_in_a_hook() {
    let dir = Dir::new();
    let data = dir.data("s");
    dir.write(
        "conf.d/s.toml",
        &format!(
            "stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\n\n[[pre_stop]]\n\
             service = \"db\"\ncmd = [\"true\"]\n"
        ),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    assert_names(&err, "conf.d/s.toml", 7, "cmd");
}

#[test]
fn ignore_mounts_needs_a_host_path_or_volume_name_and_a_reason() {
    let dir = Dir::new();
    let data = dir.data("s");
    let stack = |mounts: &str| {
        format!(
            "stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\nignore_mounts = {mounts}\n"
        )
    };
    dir.write(
        "conf.d/s.toml",
        &stack(r#"{ "/srv/media" = "on the NAS", cache = "rebuilt on start" }"#),
    );
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    assert_eq!(cfg.stacks[0].ignore_mounts.len(), 2);
    assert_eq!(cfg.stacks[0].ignore_mounts["cache"], "rebuilt on start");

    dir.write("conf.d/s.toml", &stack(r#"{ "/srv/media" = " " }"#));
    let msg = assert_names(
        &source_err(&dir, SOURCE_MAIN),
        "conf.d/s.toml",
        4,
        "ignore_mounts",
    );
    assert!(msg.contains("no reason"), "{msg}");

    dir.write("conf.d/s.toml", &stack(r#"{ "srv/media" = "relative" }"#));
    let msg = assert_names(
        &source_err(&dir, SOURCE_MAIN),
        "conf.d/s.toml",
        4,
        "ignore_mounts",
    );
    assert!(
        msg.contains("neither an absolute host path nor a volume name"),
        "{msg}"
    );
}

#[test]
fn extra_paths_must_exist_and_not_be_system_dirs_or_overlap() {
    let dir = Dir::new();
    let data = dir.data("s");
    let media = dir.data("media");
    let stack = |extra: &str| {
        format!("stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\nextra_paths = {extra}\n")
    };
    dir.write("conf.d/s.toml", &stack(&format!("[\"{media}\"]")));
    let cfg = dir.source(SOURCE_MAIN).expect("loads");
    assert_eq!(cfg.stacks[0].extra_paths, vec![PathBuf::from(&media)]);

    dir.write("conf.d/s.toml", &stack("[\"/etc\"]"));
    let msg = assert_names(
        &source_err(&dir, SOURCE_MAIN),
        "conf.d/s.toml",
        4,
        "extra_paths",
    );
    assert!(msg.contains("system directory"), "{msg}");

    dir.write("conf.d/s.toml", &stack(&format!("[\"{media}/nope\"]")));
    let msg = source_err(&dir, SOURCE_MAIN).to_string();
    assert!(msg.contains("nope"), "{msg}");

    dir.write("conf.d/s.toml", &stack(&format!("[\"{data}/sub\"]")));
    fs::create_dir_all(format!("{data}/sub")).expect("mkdir");
    let msg = source_err(&dir, SOURCE_MAIN).to_string();
    assert!(msg.contains("inside"), "{msg}");
}

#[test]
fn target_extra_paths_map_absolute_source_paths_outside_the_stack() {
    let dir = Dir::new();
    let data = dir.data("t");
    let stack = |extra: &str| {
        format!("stack = \"t\"\npath = \"{data}\"\nallow = [\"primary\"]\nextra_paths = {extra}\n")
    };
    dir.write(
        "conf.d/t.toml",
        &stack(r#"{ "/srv/media" = "/srv/standby-media" }"#),
    );
    let cfg = dir.target(TARGET_MAIN).expect("loads");
    assert_eq!(
        cfg.stacks[0].extra_paths["/srv/media"],
        PathBuf::from("/srv/standby-media")
    );
    for (extra, needle) in [
        (r#"{ "srv/media" = "/srv/media" }"#.to_owned(), "absolute"),
        (
            r#"{ "/srv/media" = "/etc/media" }"#.to_owned(),
            "system directory",
        ),
        (
            format!(r#"{{ "/srv/media" = "{data}/media" }}"#),
            "inside the stack's path",
        ),
    ] {
        dir.write("conf.d/t.toml", &stack(&extra));
        let msg = assert_names(
            &target_err(&dir, TARGET_MAIN),
            "conf.d/t.toml",
            4,
            "extra_paths",
        );
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
}

#[test]
fn missing_key_names_file_key_and_table() {
    let dir = Dir::new();
    dir.write("conf.d/s.toml", "stack = \"s\"\ntarget = \"standby\"\n");
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 1, "path");
    assert!(msg.contains("missing key \"path\""), "{msg}");

    let dir = Dir::new();
    let err = source_err(&dir, "\n[targets.standby]\nport = 1\n");
    let msg = err.to_string();
    assert!(msg.contains("unknown key \"port\""), "{msg}");
    let err = source_err(&dir, "\n[targets.standby]\n");
    let msg = assert_names(&err, "source.toml", 2, "address");
    assert!(
        msg.contains("missing key \"address\" in [targets.standby]"),
        "{msg}"
    );

    let dir = Dir::new();
    let err = target_err(&dir, "name = \"t\"\n");
    assert_names(&err, "target.toml", 1, "listen");
}

#[test]
fn wrong_type_names_key_and_line() {
    let dir = Dir::new();
    let data = dir.data("s");
    dir.write(
        "conf.d/s.toml",
        &format!("stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\nprecopy = \"yes\"\n"),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 4, "precopy");
    assert!(msg.contains("boolean"), "{msg}");
}

#[test]
fn toml_syntax_error_names_file_and_line() {
    let dir = Dir::new();
    dir.write("conf.d/s.toml", "stack = \"s\"\n\npath = \"/x\n");
    let err = source_err(&dir, SOURCE_MAIN);
    let at = err.location().expect("located");
    assert!(at.file.ends_with("conf.d/s.toml"));
    assert_eq!(at.line, 3, "{err}");

    let dir = Dir::new();
    let err = target_err(&dir, "listen = \"0.0.0.0:1\"\nlisten = \"0.0.0.0:2\"\n");
    let msg = err.to_string();
    assert!(
        msg.contains("target.toml:2:") && msg.contains("duplicate key \"listen\""),
        "{msg}"
    );
}

#[test]
fn missing_source_path_is_an_error_that_says_the_source_never_creates_it() {
    let dir = Dir::new();
    let gone = dir.path("data/gone");
    dir.write(
        "conf.d/s.toml",
        &format!(
            "stack = \"s\"\ntarget = \"standby\"\npath = \"{}\"\n",
            gone.display()
        ),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 3, "path");
    assert!(
        matches!(err, ConfigError::SourcePathMissing { .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&gone.display().to_string()) && msg.contains("never creates"),
        "{msg}"
    );
}

#[test]
fn source_path_that_is_a_file_is_an_error() {
    let dir = Dir::new();
    let file = dir.write("data/file", "x");
    dir.write(
        "conf.d/s.toml",
        &format!(
            "stack = \"s\"\npath = \"{}\"\ntarget = \"standby\"\n",
            file.display()
        ),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 2, "path");
    assert!(msg.contains("not a directory"), "{msg}");
}

#[test]
fn target_path_that_is_a_file_is_an_error_that_says_a_missing_one_would_be_created() {
    let dir = Dir::new();
    let file = dir.write("data/file", "x");
    dir.write(
        "conf.d/s.toml",
        &format!(
            "stack = \"s\"\nallow = [\"p\"]\npath = \"{}\"\n",
            file.display()
        ),
    );
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 3, "path");
    assert!(
        msg.contains("not a directory") && msg.contains("creates a missing path"),
        "{msg}"
    );
}

#[test]
fn relative_or_dotdot_path_is_an_error() {
    for (path, why) in [("data/s", "absolute"), ("/opt/../etc", "..")] {
        let dir = Dir::new();
        dir.write(
            "conf.d/s.toml",
            &format!("stack = \"s\"\ntarget = \"standby\"\npath = \"{path}\"\n"),
        );
        let err = source_err(&dir, SOURCE_MAIN);
        let msg = assert_names(&err, "conf.d/s.toml", 3, "path");
        assert!(msg.contains(why), "{msg}");
    }
}

#[test]
fn two_stacks_on_one_path_name_both_files() {
    let dir = Dir::new();
    let data = dir.data("shared");
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\npath = \"{data}\"\ntarget = \"standby\"\n"),
    );
    dir.write(
        "conf.d/b.toml",
        &format!("stack = \"b\"\ntarget = \"standby\"\npath = \"{data}/\"\n"),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/b.toml", 3, "path");
    assert!(msg.contains("conf.d/a.toml:2:"), "{msg}");
    assert!(msg.contains("\"a\"") && msg.contains("\"b\""), "{msg}");
    assert!(matches!(err, ConfigError::SamePath { .. }), "{msg}");
}

#[test]
fn two_stacks_on_one_path_through_a_symlink_are_caught() {
    let dir = Dir::new();
    let data = dir.data("real");
    let link = dir.path("data/link");
    std::os::unix::fs::symlink(&data, &link).expect("symlink");
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\npath = \"{data}\"\nallow = [\"p\"]\n"),
    );
    dir.write(
        "conf.d/b.toml",
        &format!(
            "stack = \"b\"\npath = \"{}\"\nallow = [\"p\"]\n",
            link.display()
        ),
    );
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/b.toml", 2, "path");
    assert!(msg.contains("conf.d/a.toml:2:"), "{msg}");
}

#[test]
fn nested_stack_paths_are_an_error() {
    let dir = Dir::new();
    let outer = dir.data("outer");
    let inner = dir.data("outer/inner");
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\npath = \"{inner}\"\nallow = [\"p\"]\n"),
    );
    dir.write(
        "conf.d/b.toml",
        &format!("stack = \"b\"\npath = \"{outer}\"\nallow = [\"p\"]\n"),
    );
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/b.toml", 2, "path");
    assert!(
        msg.contains("conf.d/a.toml:2:") && msg.contains("must not nest"),
        "{msg}"
    );

    // A sibling that shares a name prefix is not nested.
    let dir = Dir::new();
    let a = dir.data("app");
    let b = dir.data("app2");
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\npath = \"{a}\"\nallow = [\"p\"]\n"),
    );
    dir.write(
        "conf.d/b.toml",
        &format!("stack = \"b\"\npath = \"{b}\"\nallow = [\"p\"]\n"),
    );
    assert_eq!(dir.target(TARGET_MAIN).expect("loads").stacks.len(), 2);
}

#[test]
fn two_stacks_with_one_name_name_both_files() {
    let dir = Dir::new();
    let a = dir.data("a");
    let b = dir.data("b");
    dir.write(
        "conf.d/one.toml",
        &format!("stack = \"app\"\npath = \"{a}\"\ntarget = \"standby\"\n"),
    );
    // Skipped stacks count too: `status` lists them by name.
    dir.write(
        "conf.d/two.toml",
        &format!("skip = true\npath = \"{b}\"\ntarget = \"standby\"\nstack = \"app\"\n"),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/two.toml", 4, "stack");
    assert!(msg.contains("conf.d/one.toml:1:"), "{msg}");
    assert!(matches!(err, ConfigError::DuplicateStack { .. }), "{msg}");
}

#[test]
fn target_that_names_no_targets_table_is_an_error() {
    let dir = Dir::new();
    let data = dir.data("s");
    dir.write(
        "conf.d/s.toml",
        &format!("stack = \"s\"\npath = \"{data}\"\n\ntarget = \"offsite\"\n"),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 4, "target");
    assert!(
        msg.contains("[targets.offsite]") && msg.contains("source.toml"),
        "{msg}"
    );
    assert!(msg.contains("declared: standby"), "{msg}");
}

#[test]
fn bad_addresses_name_key_and_line() {
    let dir = Dir::new();
    let err = source_err(&dir, "[targets.standby]\n\naddress = \"standby\"\n");
    let msg = assert_names(&err, "source.toml", 3, "address");
    assert!(
        msg.contains("HOST:PORT") && msg.contains("no port"),
        "{msg}"
    );

    let dir = Dir::new();
    let err = source_err(&dir, "[targets.standby]\naddress = \"standby:0\"\n");
    let msg = assert_names(&err, "source.toml", 2, "targets.standby.address");
    assert!(msg.contains("port 0"), "{msg}");

    let dir = Dir::new();
    let err = target_err(&dir, "# comment\nlisten = \"::1:4433\"\n");
    let msg = assert_names(&err, "target.toml", 2, "listen");
    assert!(msg.contains("brackets"), "{msg}");

    let dir = Dir::new();
    let err = target_err(&dir, "listen = \"0.0.0.0:1\"\nmetrics_listen = 9100\n");
    assert_names(&err, "target.toml", 2, "metrics_listen");
}

#[test]
fn bad_names_name_key_and_line() {
    let dir = Dir::new();
    let err = source_err(&dir, "[targets.Standby_1]\naddress = \"h:1\"\n");
    let msg = assert_names(&err, "source.toml", 1, "targets.Standby_1");
    assert!(msg.contains("lowercase"), "{msg}");

    let dir = Dir::new();
    dir.write(
        "conf.d/s.toml",
        "stack = \"my stack\"\npath = \"/x\"\ntarget = \"standby\"\n",
    );
    let err = source_err(&dir, SOURCE_MAIN);
    assert_names(&err, "conf.d/s.toml", 1, "stack");
}

#[test]
fn bad_durations_name_key_and_line() {
    let dir = Dir::new();
    let data = dir.data("s");
    dir.write(
        "conf.d/s.toml",
        &format!("stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\nstop_timeout = \"30\"\n"),
    );
    let err = source_err(&dir, SOURCE_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 4, "stop_timeout");
    assert!(msg.contains("no unit"), "{msg}");

    let dir = Dir::new();
    let err = target_err(&dir, "listen = \"0.0.0.0:1\"\nmax_skew = -5\n");
    let msg = assert_names(&err, "target.toml", 2, "max_skew");
    assert!(msg.contains("negative"), "{msg}");

    let dir = Dir::new();
    dir.write(
        "conf.d/s.toml",
        "stack = \"s\"\npath = \"/x\"\nallow = [\"p\"]\nhealth_timeout = true\n",
    );
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 4, "health_timeout");
    assert!(msg.contains("duration"), "{msg}");
}

#[test]
fn bad_percentages_name_key_and_line() {
    for (value, why) in [
        ("\"150%\"", "out of range"),
        ("1.5", "out of range"),
        ("50", "out of range"),
        ("\"half\"", "not a share"),
        ("-0.1", "out of range"),
    ] {
        let dir = Dir::new();
        let data = dir.data("s");
        dir.write(
            "conf.d/s.toml",
            &format!(
                "stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\n\nmax_delete = {value}\n"
            ),
        );
        let err = source_err(&dir, SOURCE_MAIN);
        let msg = assert_names(&err, "conf.d/s.toml", 5, "max_delete");
        assert!(msg.contains(why), "{value}: {msg}");
    }
}

#[test]
fn bad_bandwidth_exclude_order_and_hook_name_key_and_line() {
    let cases = [
        ("bandwidth_limit = \"0\"", "bandwidth_limit", "more than 0"),
        (
            "bandwidth_limit = \"9 furlongs\"",
            "bandwidth_limit",
            "unknown unit",
        ),
        ("exclude = [\"ok\", \"data/[abc\"]", "exclude", "data/[abc"),
        ("order = [\"db\", \"app\", \"db\"]", "order", "listed twice"),
        (
            "pre_stop = { service = \"db\", command = [] }",
            "pre_stop.command",
            "empty command",
        ),
        (
            "post_start = { service = \"\", command = [\"x\"] }",
            "service",
            "service name",
        ),
        ("schedule = \" \"", "schedule", "empty schedule"),
        (
            "schedule = \"every day\"",
            "schedule",
            "not a cron expression",
        ),
        (
            "schedule = \"61 * * * *\"",
            "schedule",
            "not a cron expression",
        ),
        ("schedule = \"0 0 30 2 *\"", "schedule", "never fires"),
    ];
    for (line, key, why) in cases {
        let dir = Dir::new();
        let data = dir.data("s");
        dir.write(
            "conf.d/s.toml",
            &format!("stack = \"s\"\npath = \"{data}\"\ntarget = \"standby\"\n{line}\n"),
        );
        let err = source_err(&dir, SOURCE_MAIN);
        let msg = assert_names(&err, "conf.d/s.toml", 4, key);
        assert!(msg.contains(why), "{line}: {msg}");
    }
}

#[test]
fn target_stack_needs_a_non_empty_allow_and_at_least_one_generation() {
    let dir = Dir::new();
    dir.write(
        "conf.d/s.toml",
        "stack = \"s\"\npath = \"/srv/s\"\nallow = []\n",
    );
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 3, "allow");
    assert!(msg.contains("at least one source"), "{msg}");

    let dir = Dir::new();
    dir.write(
        "conf.d/s.toml",
        "stack = \"s\"\npath = \"/srv/s\"\nallow = [\"p\"]\n",
    );
    // /srv is refused, but /srv/s is fine: only the system directories themselves are.
    assert_eq!(dir.target(TARGET_MAIN).expect("loads").stacks.len(), 1);

    let dir = Dir::new();
    dir.write(
        "conf.d/s.toml",
        "stack = \"s\"\npath = \"/nonexistent/s\"\nallow = [\"p\"]\nkeep_generations = 0\n",
    );
    let err = target_err(&dir, TARGET_MAIN);
    assert_names(&err, "conf.d/s.toml", 4, "keep_generations");

    let dir = Dir::new();
    dir.write(
        "conf.d/s.toml",
        "stack = \"s\"\npath = \"/nonexistent/s\"\nallow = [\"p\"]\nmax_age = 0\n",
    );
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/s.toml", 4, "max_age");
    assert!(msg.contains("staleness watch off"), "{msg}");
}

#[test]
fn main_files_take_alerts_and_a_pushgateway_and_refuse_bad_ones() {
    let dir = Dir::new();
    let main = format!(
        "push_gateway = \"http://127.0.0.1:9091\"\n{SOURCE_MAIN}\n[alerts]\non_success = true\n\
         webhook = {{ url = \"http://127.0.0.1:1/hook\" }}\n"
    );
    let cfg = dir.source(&main).expect("loads");
    assert_eq!(cfg.push_gateway.as_deref(), Some("http://127.0.0.1:9091"));
    assert_eq!(cfg.alerts.channels(), [Channel::Webhook]);
    assert!(cfg.alerts.on_success);

    let bad = format!("push_gateway = \"127.0.0.1:9091\"\n{SOURCE_MAIN}");
    let err = source_err(&dir, &bad);
    let msg = assert_names(&err, "source.toml", 1, "push_gateway");
    assert!(msg.contains("base URL"), "{msg}");

    let bad = format!("{SOURCE_MAIN}[alerts]\npager = true\n");
    let err = source_err(&dir, &bad);
    assert!(err.to_string().contains("pager"), "{err}");

    let target = format!(
        "{TARGET_MAIN}[alerts]\nntfy = {{ server = \"http://127.0.0.1:1\", topic = \"t\" }}\n"
    );
    let cfg = dir.target(&target).expect("loads");
    assert_eq!(cfg.alerts.channels(), [Channel::Ntfy]);
}

#[test]
fn dangerous_target_path_is_refused_unless_allowed() {
    use stackclone_common::config::is_dangerous_root;
    for fine in [
        "/opt/containers/nextcloud",
        "/srv/gitea",
        "/home/alice/stacks/x",
        "/var/lib/docker/volumes/x/_data",
        "/tmp/test-stack",
        "/library/x",
    ] {
        assert!(!is_dangerous_root(Path::new(fine)), "{fine}");
    }
    // Whole subtrees count: a push into /etc/cron.d writes cron jobs.
    for path in [
        "/",
        "/etc",
        "/var/",
        "/usr",
        "/home",
        "/root",
        "/etc/cron.d",
        "/usr/local/bin",
        "/root/.ssh",
        "/var/spool/cron",
        "/boot/grub",
        "/lib/systemd",
    ] {
        let dir = Dir::new();
        dir.write(
            "conf.d/s.toml",
            &format!("stack = \"s\"\nallow = [\"p\"]\npath = \"{path}\"\n"),
        );
        let err = target_err(&dir, TARGET_MAIN);
        let msg = assert_names(&err, "conf.d/s.toml", 3, "path");
        assert!(msg.contains("allow_dangerous_root"), "{msg}");
        assert!(matches!(err, ConfigError::DangerousPath { .. }), "{msg}");
    }

    let dir = Dir::new();
    dir.write(
        "conf.d/s.toml",
        "stack = \"s\"\nallow = [\"p\"]\npath = \"/var\"\nallow_dangerous_root = true\n",
    );
    let cfg = dir
        .target_with_options(TARGET_MAIN, &LoadOptions { check_paths: false })
        .expect("overridden");
    assert!(cfg.stacks[0].allow_dangerous_root);
    let w = cfg.warnings[0].to_string();
    assert!(w.contains("conf.d/s.toml:3:") && w.contains("/var"), "{w}");
}

#[test]
fn dangerous_target_path_behind_a_symlink_is_refused() {
    let dir = Dir::new();
    let link = dir.path("data/etc-link");
    fs::create_dir_all(dir.path("data")).expect("mkdir");
    std::os::unix::fs::symlink("/etc", &link).expect("symlink");
    dir.write(
        "conf.d/s.toml",
        &format!(
            "stack = \"s\"\nallow = [\"p\"]\npath = \"{}\"\n",
            link.display()
        ),
    );
    let err = target_err(&dir, TARGET_MAIN);
    assert!(matches!(err, ConfigError::DangerousPath { .. }), "{err}");
}

#[test]
fn unreadable_main_file_names_it() {
    let dir = Dir::new();
    let err = SourceConfig::load(dir.path("nope.toml")).expect_err("missing");
    let msg = err.to_string();
    assert!(
        msg.contains("nope.toml") && msg.contains("cannot read"),
        "{msg}"
    );
    assert!(matches!(err, ConfigError::Read { .. }));
}

#[test]
fn identity_dir_override_is_the_callers_job() {
    // The loader reads no environment; a CLI's --dir / STACKCLONE_DIR replaces the field.
    let dir = Dir::new();
    let mut cfg = dir
        .target("listen = \"0.0.0.0:1\"\nidentity_dir = \"/from/file\"\n")
        .expect("loads");
    assert_eq!(cfg.identity_dir, PathBuf::from("/from/file"));
    cfg.identity_dir = PathBuf::from("/from/flag");
    assert_eq!(cfg.identity_dir, PathBuf::from("/from/flag"));
}

// ---- What the standby may do differently -----------------------------------------------------

#[test]
fn target_compose_override_and_compose_env_are_read() {
    let dir = Dir::new();
    let data = dir.data("app");
    let over = dir.write("overrides/app.yml", "services: {}\n");
    dir.write(
        "conf.d/app.toml",
        &format!(
            "stack = \"app\"\npath = \"{data}\"\nallow = [\"primary\"]\n\
             compose_override = \"{}\"\n\
             compose_env = {{ HTTP_PORT = 18080, _Name = \"standby copy\", EMPTY = \"\" }}\n",
            over.display()
        ),
    );
    let cfg = dir.target(TARGET_MAIN).expect("loads");
    let s = cfg.stack("app").expect("app");
    assert_eq!(s.compose_override, Some(over));
    assert_eq!(
        s.compose_env,
        BTreeMap::from([
            ("EMPTY".to_owned(), String::new()),
            ("HTTP_PORT".to_owned(), "18080".to_owned()),
            ("_Name".to_owned(), "standby copy".to_owned()),
        ])
    );
}

#[test]
fn a_compose_override_that_is_relative_missing_or_not_a_file_is_refused() {
    let dir = Dir::new();
    let data = dir.data("app");
    let stack = |over: &str| {
        format!(
            "stack = \"app\"\npath = \"{data}\"\nallow = [\"primary\"]\n\
             compose_override = \"{over}\"\n"
        )
    };

    dir.write("conf.d/app.toml", &stack("overrides/app.yml"));
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/app.toml", 4, "compose_override");
    assert!(msg.contains("not an absolute path"), "{msg}");

    let missing = dir.path("overrides/missing.yml");
    dir.write("conf.d/app.toml", &stack(&missing.display().to_string()));
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/app.toml", 4, "compose_override");
    assert!(
        matches!(
            &err,
            ConfigError::ComposeOverride { problem: OverrideProblem::Unreadable(e), path, .. }
                if e.kind() == std::io::ErrorKind::NotFound && *path == missing
        ),
        "{err:?}"
    );
    assert!(
        msg.contains("cannot be read") && msg.contains("create it"),
        "{msg}"
    );
    // A config written for another host is checked without its files.
    let unchecked = LoadOptions { check_paths: false };
    let cfg = dir
        .target_with_options(TARGET_MAIN, &unchecked)
        .expect("loads unchecked");
    assert_eq!(cfg.stacks[0].compose_override, Some(missing));

    let a_dir = dir.path("overrides");
    fs::create_dir_all(&a_dir).expect("mkdir");
    dir.write("conf.d/app.toml", &stack(&a_dir.display().to_string()));
    let err = target_err(&dir, TARGET_MAIN);
    assert_names(&err, "conf.d/app.toml", 4, "compose_override");
    assert!(
        matches!(
            &err,
            ConfigError::ComposeOverride {
                problem: OverrideProblem::NotAFile,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_compose_override_inside_a_synced_path_is_refused_even_through_a_symlink() {
    let dir = Dir::new();
    let app = dir.data("app");
    let other = dir.data("other");
    let write_stacks = |over: &Path| {
        dir.write(
            "conf.d/app.toml",
            &format!(
                "stack = \"app\"\npath = \"{app}\"\nallow = [\"primary\"]\n\
                 compose_override = \"{}\"\n",
                over.display()
            ),
        );
        dir.write(
            "conf.d/other.toml",
            &format!("stack = \"other\"\npath = \"{other}\"\nallow = [\"primary\"]\n"),
        );
    };
    let refused_for = |err: &ConfigError| match err {
        ConfigError::ComposeOverride {
            problem: OverrideProblem::InsideStackPath { stack, path },
            ..
        } => (stack.clone(), path.clone()),
        other => panic!("expected InsideStackPath, got {other:?}"),
    };

    // Its own path: the next commit would delete it.
    let own = dir.write("data/app/standby.yml", "services: {}\n");
    write_stacks(&own);
    let err = target_err(&dir, TARGET_MAIN);
    let msg = assert_names(&err, "conf.d/app.toml", 4, "compose_override");
    assert_eq!(refused_for(&err), ("app".to_owned(), PathBuf::from(&app)));
    assert!(
        msg.contains("every commit replaces") && msg.contains("/etc/stackclone/overrides/app.yml"),
        "{msg}"
    );
    // Even unchecked: that much is visible in the text.
    let unchecked = LoadOptions { check_paths: false };
    let err = dir
        .target_with_options(TARGET_MAIN, &unchecked)
        .expect_err("refused unchecked");
    assert_eq!(refused_for(&err).0, "app");

    // Another stack's path, declared in a later file.
    let theirs = dir.write("data/other/app.yml", "services: {}\n");
    write_stacks(&theirs);
    let err = target_err(&dir, TARGET_MAIN);
    assert_eq!(
        refused_for(&err),
        ("other".to_owned(), PathBuf::from(&other))
    );

    // Through a symlink to the stack's directory.
    std::os::unix::fs::symlink(dir.path("data/app"), dir.path("via-link")).expect("symlink");
    write_stacks(&dir.path("via-link/standby.yml"));
    let err = target_err(&dir, TARGET_MAIN);
    assert_eq!(refused_for(&err).0, "app");

    // Beside the stacks is fine.
    let beside = dir.write("overrides/app.yml", "services: {}\n");
    write_stacks(&beside);
    dir.target(TARGET_MAIN)
        .expect("an override outside every path loads");
}

#[test]
fn compose_env_names_must_be_variable_names() {
    let dir = Dir::new();
    let data = dir.data("app");
    dir.write(
        "conf.d/app.toml",
        &format!(
            "stack = \"app\"\npath = \"{data}\"\nallow = [\"primary\"]\n\
             compose_env = {{ \"HTTP-PORT\" = \"1\" }}\n"
        ),
    );
    let err = target_err(&dir, TARGET_MAIN);
    let msg = err.to_string();
    assert!(msg.contains("conf.d/app.toml:4:"), "{msg}");
    assert!(msg.contains("invalid variable name \"HTTP-PORT\""), "{msg}");
}

// ---- The shipped examples ---------------------------------------------------------------------

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

#[test]
fn example_source_config_loads() {
    let options = LoadOptions { check_paths: false };
    let cfg = SourceConfig::load_with(examples().join("source/source.toml"), &options)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.targets.contains_key("standby"));
    let names: Vec<_> = cfg.stacks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["gitea", "nextcloud"]);
    assert_eq!(cfg.skipped.len(), 1);
    assert_eq!(cfg.skipped[0].name, "old-wiki");
    let nc = cfg.stack("nextcloud").expect("nextcloud");
    assert_eq!(nc.path, PathBuf::from("/opt/containers/nextcloud"));
    assert_eq!(nc.bandwidth_limit, NonZeroU64::new(20 << 20));
    assert_eq!(nc.pre_stop.len(), 1);
    assert_eq!(cfg.stack("gitea").expect("gitea").pre_stop.len(), 2);
    assert_eq!(
        cfg.stack("gitea").expect("gitea").ignore_mounts["/srv/gitea-lfs"],
        "LFS objects are on the NAS, mounted on both hosts"
    );
    assert_eq!(nc.schedule.as_ref().map(|s| s.as_str()), Some("15 3 * * *"));
    assert_eq!(nc.random_delay, Some(Duration::from_secs(600)));
    // Seeded by install.sh as is: no channel may be live.
    assert_eq!(cfg.alerts.channels(), [], "{:?}", cfg.alerts);
    assert!(!cfg.alerts.on_success);
    assert_eq!(cfg.push_gateway, None);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn example_target_config_loads() {
    let options = LoadOptions { check_paths: false };
    let cfg = TargetConfig::load_with(examples().join("target/target.toml"), &options)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.listen.port, 4433);
    let names: Vec<_> = cfg.stacks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["gitea", "nextcloud"]);
    let nc = cfg.stack("nextcloud").expect("nextcloud");
    assert_eq!(nc.allow, vec!["primary"]);
    assert_eq!(nc.health_timeout, Duration::from_secs(180));
    assert_eq!(
        cfg.stack("gitea").expect("gitea").compose_project,
        "gitea-standby"
    );
    assert_eq!(nc.max_age, Some(Duration::from_secs(26 * 3600)));
    assert_eq!(cfg.stack("gitea").expect("gitea").max_age, None);
    assert_eq!(nc.standby_stopped, ["cron"]);
    assert!(
        cfg.stack("gitea")
            .expect("gitea")
            .standby_stopped
            .is_empty()
    );
    assert_eq!(
        cfg.alerts.channels(),
        [],
        "seeded by install.sh: no live channel"
    );
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn example_override_is_a_compose_file() {
    use stackclone_common::compose_file::{ComposeFile, ProjectEnv};
    let file = examples().join("target/overrides/nextcloud.yml");
    let read = ComposeFile::read(std::slice::from_ref(&file), &ProjectEnv::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let services: Vec<&str> = read.services.keys().map(String::as_str).collect();
    assert_eq!(services, ["app", "cron"]);
    let example =
        fs::read_to_string(examples().join("target/conf.d/nextcloud.toml")).expect("read");
    assert!(
        example.contains("# compose_override = \"/etc/stackclone/overrides/nextcloud.yml\""),
        "the stack example names the override example's place"
    );
}

/// Each channel of the example configs, uncommented as a tired admin would: refused, naming the
/// placeholder, instead of sending alerts to a public ntfy topic or an example host.
#[test]
fn example_alert_channels_uncommented_with_their_placeholders_are_refused() {
    let d = Dir::new();
    let example = std::fs::read_to_string(examples().join("source/source.toml")).expect("read");
    let uncomment = |table: &str| -> String {
        let mut out = String::new();
        let mut inside = false;
        for line in example.lines() {
            if line.starts_with("# [") {
                inside = line == format!("# [{table}]") || line == "# [alerts]";
            }
            let setting = |l: &str| {
                l.starts_with('[')
                    || l.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    })
            };
            match line.strip_prefix("# ") {
                Some(l) if inside && setting(l) && !l.starts_with("token") => out.push_str(l),
                _ => out.push_str(line),
            }
            out.push('\n');
        }
        out
    };
    for (table, says) in [
        ("alerts.telegram", "placeholder"),
        ("alerts.ntfy", "placeholder"),
    ] {
        let text = uncomment(table);
        assert!(text.contains(&format!("\n[{table}]")), "{text}");
        let err = d.source(&text).expect_err(table).to_string();
        assert!(
            err.contains(says) && err.contains("comment"),
            "{table}: {err}"
        );
    }
    let target = std::fs::read_to_string(examples().join("target/target.toml")).expect("read");
    let text = target
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest.starts_with("url")
                    || rest.starts_with("headers") =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let err = d.target(&text).expect_err("webhook").to_string();
    assert!(err.contains("example address"), "{err}");
}

#[test]
fn a_state_dir_overlapping_a_live_dir_or_another_state_dir_is_refused() {
    let dir = Dir::new();
    let a = dir.data("a");
    let b = dir.data("b");
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\nallow = [\"p\"]\npath = \"{a}\"\n"),
    );
    // b's journal and generations inside a's live dir: a's next push would sync them.
    dir.write(
        "conf.d/b.toml",
        &format!("stack = \"b\"\nallow = [\"p\"]\npath = \"{b}\"\nstate_dir = \"{a}/state\"\n"),
    );
    let err = target_err(&dir, TARGET_MAIN);
    assert!(matches!(err, ConfigError::StateDirOverlap { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("conf.d/b.toml") && msg.contains("stack \"a\""),
        "{msg}"
    );
    // Two stacks sharing one state dir.
    let shared = dir.path("shared").to_str().unwrap().to_owned();
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\nallow = [\"p\"]\npath = \"{a}\"\nstate_dir = \"{shared}\"\n"),
    );
    dir.write(
        "conf.d/b.toml",
        &format!("stack = \"b\"\nallow = [\"p\"]\npath = \"{b}\"\nstate_dir = \"{shared}\"\n"),
    );
    let err = target_err(&dir, TARGET_MAIN);
    assert!(matches!(err, ConfigError::StateDirOverlap { .. }), "{err}");
    // Their own state dirs, side by side: fine.
    dir.write(
        "conf.d/b.toml",
        &format!("stack = \"b\"\nallow = [\"p\"]\npath = \"{b}\"\n"),
    );
    dir.target(TARGET_MAIN).expect("separate state dirs");
}

#[test]
fn a_config_file_or_conf_d_writable_by_group_or_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new();
    let a = dir.data("a");
    let stack = dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\nallow = [\"p\"]\npath = \"{a}\"\n"),
    );
    dir.target(TARGET_MAIN).expect("0644 is fine");
    let chmod = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    for (path, mode) in [
        (dir.path("target.toml"), 0o666),
        (stack.clone(), 0o664),
        (dir.path("conf.d"), 0o777),
    ] {
        let restore = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        // `target` writes target.toml afresh, so chmod it after writing.
        dir.write("target.toml", TARGET_MAIN);
        chmod(&path, mode);
        let err = TargetConfig::load(dir.path("target.toml")).expect_err("refused");
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::WritableByOthers { .. }), "{msg}");
        assert!(
            msg.contains(&format!("chmod go-w {}", path.display())),
            "{msg}"
        );
        chmod(&path, restore);
    }
}

#[test]
fn compose_policy_is_trusted_by_default_strict_on_request_and_checked() {
    use stackclone_common::config::ComposePolicy;
    let dir = Dir::new();
    let a = dir.data("a");
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\nallow = [\"p\"]\npath = \"{a}\"\n"),
    );
    let cfg = dir.target(TARGET_MAIN).expect("default");
    assert_eq!(cfg.stacks[0].compose_policy, ComposePolicy::Trusted);
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\nallow = [\"p\"]\npath = \"{a}\"\ncompose_policy = \"strict\"\n"),
    );
    let cfg = dir.target(TARGET_MAIN).expect("strict");
    assert_eq!(cfg.stacks[0].compose_policy, ComposePolicy::Strict);
    dir.write(
        "conf.d/a.toml",
        &format!("stack = \"a\"\nallow = [\"p\"]\npath = \"{a}\"\ncompose_policy = \"paranoid\"\n"),
    );
    let err = target_err(&dir, TARGET_MAIN).to_string();
    assert!(
        err.contains("compose_policy") || err.contains("paranoid"),
        "{err}"
    );
    assert!(err.contains("strict"), "{err}");
}

#[test]
fn standby_stopped_is_empty_by_default_and_names_each_service_once() {
    let dir = Dir::new();
    let a = dir.data("a");
    let file = |extra: &str| format!("stack = \"a\"\nallow = [\"p\"]\npath = \"{a}\"\n{extra}\n");
    dir.write("conf.d/a.toml", &file(""));
    let cfg = dir.target(TARGET_MAIN).expect("default");
    assert_eq!(cfg.stacks[0].standby_stopped, Vec::<String>::new());
    dir.write(
        "conf.d/a.toml",
        &file("standby_stopped = [\"cron\", \"mailer\"]"),
    );
    let cfg = dir.target(TARGET_MAIN).expect("two services");
    assert_eq!(cfg.stacks[0].standby_stopped, ["cron", "mailer"]);
    for (line, why) in [
        (
            "standby_stopped = [\"cron\", \"mailer\", \"cron\"]",
            "\"cron\" is listed twice",
        ),
        ("standby_stopped = \"cron\"", "standby_stopped"),
    ] {
        dir.write("conf.d/a.toml", &file(line));
        let err = target_err(&dir, TARGET_MAIN);
        let msg = assert_names(&err, "conf.d/a.toml", 4, "standby_stopped");
        assert!(msg.contains(why), "{line}: {msg}");
    }
    // As in `order`, a bad name is pointed at where it is written.
    dir.write("conf.d/a.toml", &file("standby_stopped = [\"cron job\"]"));
    let msg = target_err(&dir, TARGET_MAIN).to_string();
    assert!(
        msg.contains("conf.d/a.toml:4:20: invalid service name \"cron job\""),
        "{msg}"
    );
}
