//! Alerts against recording HTTP servers on 127.0.0.1: the exact Telegram, ntfy and webhook
//! requests, `on_success`, failing and hanging channels, and the config as an admin writes it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use stackclone_common::alert::{
    Alert, AlertConfig, AlertKind, Channel, ChatId, DEFAULT_TELEGRAM_API, DeliveryError, Notifier,
    NtfyAuth, NtfyPriority, Secret,
};

mod support;

use support::{FAIL_BODY, LogCapture, Recorder, Reply, refused_url};

const TOKEN: &str = "123456:ABC-secret-token";

fn config(telegram: &str, ntfy: &str, webhook: &str, on_success: bool) -> AlertConfig {
    let text = format!(
        r#"
        on_success = {on_success}
        telegram = {{ bot_token = "{TOKEN}", chat_id = -1001234567890, api_url = "{telegram}" }}
        ntfy = {{ server = "{ntfy}/prefix", topic = "stackclone-alerts", priority = "urgent", token = "tk_ntfy" }}
        webhook = {{ url = "{webhook}/hooks/stackclone", headers = {{ "X-Token" = "hook-secret", "X-Env" = "prod" }} }}
        "#
    );
    toml::from_str(&text).expect("alert config")
}

/// 2026-11-21T10:00:00Z.
fn fixed_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_255_200)
}

fn failure() -> Alert {
    Alert::failure(
        "primary",
        "nextcloud",
        "commit",
        "target disk full; free space on standby:/srv and run `stackclone-source push nextcloud`",
    )
    .with_peer("standby")
    .with_generation(42)
    .with_time(fixed_time())
}

const FAILURE_TEXT: &str = "stackclone: stack `nextcloud` failed on primary → standby in phase \
     commit (generation 42): target disk full; free space on standby:/srv and run \
     `stackclone-source push nextcloud`";

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn failure_reaches_telegram_ntfy_and_webhook_in_their_shapes() {
    let (telegram, ntfy, webhook) = (
        Recorder::start(Reply::Status(200)).await,
        Recorder::start(Reply::Status(200)).await,
        Recorder::start(Reply::Status(200)).await,
    );
    let notifier = Notifier::new(config(&telegram.url(), &ntfy.url(), &webhook.url(), false));

    let errors = notifier.send(&failure()).await;
    assert!(errors.is_empty(), "{errors:?}");

    let t = telegram.only_request();
    assert_eq!(t.method, "POST");
    assert_eq!(t.path, format!("/bot{TOKEN}/sendMessage"));
    assert_eq!(t.header("content-type"), Some("application/json"));
    assert_eq!(
        t.json(),
        json!({
            "chat_id": -1001234567890_i64,
            "text": FAILURE_TEXT,
            "disable_web_page_preview": true,
        })
    );

    let n = ntfy.only_request();
    assert_eq!(n.method, "POST");
    assert_eq!(n.path, "/prefix/stackclone-alerts");
    assert_eq!(n.body_text(), FAILURE_TEXT);
    assert_eq!(
        n.header("title"),
        Some("stackclone: nextcloud failed on primary")
    );
    assert_eq!(n.header("priority"), Some("5"));
    assert_eq!(
        n.header("tags"),
        Some("rotating_light,stackclone,nextcloud")
    );
    assert_eq!(n.header("authorization"), Some("Bearer tk_ntfy"));
    assert_eq!(n.header("content-type"), Some("text/plain; charset=utf-8"));

    let w = webhook.only_request();
    assert_eq!(w.method, "POST");
    assert_eq!(w.path, "/hooks/stackclone");
    assert_eq!(w.header("x-token"), Some("hook-secret"));
    assert_eq!(w.header("x-env"), Some("prod"));
    assert_eq!(w.header("content-type"), Some("application/json"));
    assert_eq!(
        w.json(),
        json!({
            "kind": "failure",
            "host": "primary",
            "peer": "standby",
            "stack": "nextcloud",
            "generation": 42,
            "phase": "commit",
            "message": "target disk full; free space on standby:/srv and run \
                        `stackclone-source push nextcloud`",
            "at": "2026-11-21T10:00:00Z",
            "at_unix": 1_795_255_200_i64,
            "text": FAILURE_TEXT,
        })
    );
}

#[tokio::test]
async fn success_is_sent_only_with_on_success() {
    let success =
        Alert::success("primary", "nextcloud", 43, "12 files, 3.1 MB in 8 s").with_peer("standby");

    let (telegram, ntfy, webhook) = (
        Recorder::start(Reply::Status(200)).await,
        Recorder::start(Reply::Status(200)).await,
        Recorder::start(Reply::Status(200)).await,
    );
    let quiet = Notifier::new(config(&telegram.url(), &ntfy.url(), &webhook.url(), false));
    assert!(quiet.send(&success).await.is_empty());
    assert!(telegram.requests().is_empty());
    assert!(ntfy.requests().is_empty());
    assert!(webhook.requests().is_empty());

    // Staleness is not a success: it always goes out.
    let stale = Alert::staleness("standby", "nextcloud", "no generation committed for 26h");
    assert!(quiet.send(&stale).await.is_empty());
    assert_eq!(telegram.requests().len(), 1);
    assert_eq!(ntfy.requests().len(), 1);
    assert_eq!(webhook.only_request().json()["kind"], "staleness");

    let (telegram, ntfy, webhook) = (
        Recorder::start(Reply::Status(200)).await,
        Recorder::start(Reply::Status(200)).await,
        Recorder::start(Reply::Status(200)).await,
    );
    let chatty = Notifier::new(config(&telegram.url(), &ntfy.url(), &webhook.url(), true));
    assert!(chatty.send(&success).await.is_empty());
    let text = "stackclone: stack `nextcloud` synced primary → standby (generation 43): \
                12 files, 3.1 MB in 8 s";
    assert_eq!(telegram.only_request().json()["text"], text);
    let n = ntfy.only_request();
    assert_eq!(n.body_text(), text);
    // A success never pages, whatever the configured priority.
    assert_eq!(n.header("priority"), Some("2"));
    assert_eq!(
        n.header("tags"),
        Some("white_check_mark,stackclone,nextcloud")
    );
    let w = webhook.only_request().json();
    assert_eq!(w["kind"], "success");
    assert_eq!(w["generation"], 43);
    assert_eq!(w["phase"], serde_json::Value::Null);
}

#[tokio::test]
async fn failing_channels_are_logged_and_returned_and_the_others_still_deliver() {
    let logs = LogCapture::start();
    let telegram = Recorder::start(Reply::Status(500)).await;
    let ntfy = refused_url().await;
    let webhook = Recorder::start(Reply::Status(200)).await;
    let notifier = Notifier::new(config(&telegram.url(), &ntfy, &webhook.url(), false));

    let mut errors = notifier.send(&failure()).await;
    errors.sort_by_key(|e| e.channel);

    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].channel, Channel::Telegram);
    assert_eq!(
        errors[0].error,
        DeliveryError::Status {
            status: 500,
            body: FAIL_BODY.into()
        }
    );
    assert_eq!(errors[1].channel, Channel::Ntfy);
    assert!(
        matches!(&errors[1].error, DeliveryError::Connect(cause) if cause.contains("refused")),
        "{:?}",
        errors[1].error
    );
    // The failing channels did not stop the working one.
    assert_eq!(webhook.only_request().json()["stack"], "nextcloud");
    assert_eq!(telegram.requests().len(), 1);

    let log = logs.text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("alert not delivered"))
        .collect();
    assert_eq!(warnings.len(), 2, "{log}");
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("channel=\"telegram\"") && l.contains("HTTP status 500")),
        "{log}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("channel=\"ntfy\"") && l.contains("refused")),
        "{log}"
    );
    // The Telegram URL holds the bot token: neither the log nor the errors may show it.
    assert!(!log.contains(TOKEN), "{log}");
    for e in &errors {
        assert!(!e.to_string().contains(TOKEN), "{e}");
    }
}

#[tokio::test]
async fn a_refused_telegram_does_not_leak_the_token() {
    let url = refused_url().await;
    let cfg: AlertConfig = toml::from_str(&format!(
        r#"telegram = {{ bot_token = "{TOKEN}", chat_id = "@ops", api_url = "{url}" }}"#
    ))
    .expect("config");
    let errors = Notifier::new(cfg).send(&failure()).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].channel, Channel::Telegram);
    assert!(matches!(errors[0].error, DeliveryError::Connect(_)));
    let shown = format!("{} {:?}", errors[0], errors[0]);
    assert!(!shown.contains(TOKEN), "{shown}");
}

#[tokio::test]
async fn the_timeout_bounds_a_hanging_server() {
    let hanging = Recorder::start(Reply::Hang).await;
    let webhook = Recorder::start(Reply::Status(200)).await;
    let cfg: AlertConfig = toml::from_str(&format!(
        r#"
        ntfy = {{ server = "{}", topic = "t" }}
        webhook = {{ url = "{}" }}
        "#,
        hanging.url(),
        webhook.url()
    ))
    .expect("config");
    let timeout = Duration::from_millis(300);
    let notifier = Notifier::with_timeout(cfg, timeout);

    let started = Instant::now();
    let errors = notifier.send(&failure()).await;
    let took = started.elapsed();

    assert!(took >= timeout, "returned before the timeout: {took:?}");
    assert!(took < Duration::from_secs(5), "not bounded: {took:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].channel, Channel::Ntfy);
    assert_eq!(errors[0].error, DeliveryError::Timeout(timeout));
    // The hanging server did get the request; the webhook was not held up by it.
    assert_eq!(hanging.requests().len(), 1);
    assert_eq!(webhook.requests().len(), 1);
}

#[tokio::test]
async fn ntfy_basic_auth_and_default_priority() {
    let ntfy = Recorder::start(Reply::Status(200)).await;
    let cfg: AlertConfig = toml::from_str(&format!(
        r#"ntfy = {{ server = "{}/", topic = "ops", user = "alice", password = "s3cret" }}"#,
        ntfy.url()
    ))
    .expect("config");
    let alert = Alert::cert_expiry("standby", "identity certificate expires in 9 days")
        .with_time(fixed_time());
    assert!(Notifier::new(cfg).send(&alert).await.is_empty());

    let n = ntfy.only_request();
    assert_eq!(n.path, "/ops");
    // base64("alice:s3cret")
    assert_eq!(n.header("authorization"), Some("Basic YWxpY2U6czNjcmV0"));
    assert_eq!(n.header("priority"), Some("4"));
    assert_eq!(n.header("tags"), Some("warning,stackclone"));
    assert_eq!(
        n.header("title"),
        Some("stackclone: certificate expiring on standby")
    );
    assert_eq!(
        n.body_text(),
        "stackclone: certificate of standby expires soon: identity certificate expires in 9 days"
    );
}

#[tokio::test]
async fn no_channel_means_no_request_and_no_error() {
    let notifier = Notifier::new(AlertConfig::default());
    assert!(notifier.config().channels().is_empty());
    assert!(notifier.send(&failure()).await.is_empty());
}

#[test]
fn config_reads_every_spelling_and_refuses_mistakes() {
    let cfg: AlertConfig = toml::from_str(
        r#"
        telegram = { bot_token = "1:x", chat_id = "@ops" }
        ntfy = { server = "https://ntfy.home.lan", topic = "a_b-1", priority = 2 }
        "#,
    )
    .expect("config");
    let telegram = cfg.telegram.as_ref().expect("telegram");
    assert_eq!(telegram.chat_id, ChatId::Name("@ops".into()));
    assert_eq!(
        telegram.api_url.as_str(),
        format!("{DEFAULT_TELEGRAM_API}/")
    );
    assert_eq!(telegram.bot_token.expose(), "1:x");
    let ntfy = cfg.ntfy.as_ref().expect("ntfy");
    assert_eq!(ntfy.priority, Some(NtfyPriority::LOW));
    assert_eq!(ntfy.auth, None);
    assert!(!cfg.on_success);
    assert_eq!(cfg.channels(), [Channel::Telegram, Channel::Ntfy]);
    assert!(cfg.wants(AlertKind::Failure));
    assert!(cfg.wants(AlertKind::Staleness));
    assert!(cfg.wants(AlertKind::CertExpiry));
    assert!(!cfg.wants(AlertKind::Success));

    for (name, level) in [
        ("min", 1),
        ("low", 2),
        ("default", 3),
        ("high", 4),
        ("max", 5),
    ] {
        let cfg: AlertConfig = toml::from_str(&format!(
            r#"ntfy = {{ server = "http://n", topic = "t", priority = "{name}", token = "x" }}"#
        ))
        .expect(name);
        let ntfy = cfg.ntfy.expect("ntfy");
        assert_eq!(ntfy.priority.map(NtfyPriority::level), Some(level));
        assert_eq!(ntfy.auth, Some(NtfyAuth::Token(Secret::new("x"))));
    }

    let refused = [
        (
            r#"telegram = { bot_token = "1:x", chat_id = 1, chat = 2 }"#,
            "unknown field",
        ),
        // Placeholders of the example configs, and RFC 2606 example hosts.
        (
            r#"telegram = { bot_token = "123:replace-with-your-bot-token", chat_id = 1 }"#,
            "placeholder",
        ),
        (
            r#"ntfy = { server = "https://ntfy.sh", topic = "stackclone-replace-with-a-secret-topic" }"#,
            "placeholder",
        ),
        (
            r#"webhook = { url = "https://hooks.example.net/stackclone" }"#,
            "example address",
        ),
        (
            r#"webhook = { url = "https://a.b.example/x" }"#,
            "example address",
        ),
        (
            r#"telegram = { bot_token = "", chat_id = 1 }"#,
            "must not be empty",
        ),
        (
            r#"telegram = { bot_token = "1:x", chat_id = 1.5 }"#,
            "chat id",
        ),
        (
            r#"telegram = { bot_token = "1:x", chat_id = 1, api_url = "ftp://x" }"#,
            "http",
        ),
        (
            r#"ntfy = { server = "http://n", topic = "t", priority = 6 }"#,
            "priority",
        ),
        (
            r#"ntfy = { server = "http://n", topic = "t", priority = "loud" }"#,
            "priority",
        ),
        (r#"ntfy = { server = "http://n", topic = "a/b" }"#, "topic"),
        (
            r#"ntfy = { server = "http://n", topic = "t", user = "u" }"#,
            "password",
        ),
        (
            r#"ntfy = { server = "http://n", topic = "t", password = "p" }"#,
            "user",
        ),
        (
            r#"ntfy = { server = "http://n", topic = "t", token = "x", user = "u", password = "p" }"#,
            "not both",
        ),
        (
            r#"ntfy = { server = "not a url", topic = "t" }"#,
            "invalid URL",
        ),
        (
            r#"webhook = { url = "http://w", headers = { "bad header" = "x" } }"#,
            "header name",
        ),
        (
            r#"webhook = { url = "http://w", headers = { "X-A" = "line\nbreak" } }"#,
            "visible ASCII",
        ),
        (
            r#"webhook = { url = "http://w", method = "PUT" }"#,
            "unknown field",
        ),
        (r#"on_succes = true"#, "unknown field"),
    ];
    for (text, expected) in refused {
        let err = toml::from_str::<AlertConfig>(text)
            .expect_err(text)
            .to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn debug_output_hides_credentials() {
    let cfg = config(
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
        "http://127.0.0.1:3",
        true,
    );
    let mut cfg = cfg;
    if let Some(ntfy) = cfg.ntfy.as_mut() {
        ntfy.auth = Some(NtfyAuth::Basic {
            user: "alice".into(),
            password: Secret::new("pw-secret"),
        });
    }
    let shown = format!("{cfg:?} {:?}", Notifier::new(cfg.clone()));
    for secret in [TOKEN, "pw-secret", "hook-secret", "/hooks/stackclone"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("x-token"), "{shown}");
}

#[test]
fn alert_lines_name_stack_place_phase_and_cut_long_messages() {
    assert_eq!(failure().to_string(), FAILURE_TEXT);

    let no_peer = Alert::failure("primary", "gitea", "connect", "standby:4433 unreachable");
    assert_eq!(
        no_peer.to_string(),
        "stackclone: stack `gitea` failed on primary in phase connect: standby:4433 unreachable"
    );
    let stale =
        Alert::staleness("standby", "gitea", "no generation committed for 26h").with_generation(7);
    assert_eq!(
        stale.to_string(),
        "stackclone: stack `gitea` is stale on standby (last generation 7): \
         no generation committed for 26h"
    );

    let long = "é".repeat(5000);
    let cut = Alert::failure("h", "s", "scan", &long).to_string();
    assert!(cut.ends_with('…'), "not marked as cut");
    assert_eq!(cut.chars().filter(|&c| c == 'é').count(), 3000);

    // ntfy titles are HTTP headers: ASCII only.
    let odd = Alert::failure("hôst", "s", "scan", "x");
    assert_eq!(odd.title(), "stackclone: s failed on h?st");

    assert_eq!(
        Alert::cert_expiry("h", "").to_string(),
        "stackclone: certificate of h expires soon"
    );
}
