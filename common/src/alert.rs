//! Alerts: tell a person when a stack failed, went stale, synced (if asked) or when a certificate
//! is about to expire, over Telegram, ntfy and a generic JSON webhook.
//!
//! An agent embeds [`AlertConfig`] under `[alerts]` in its main file, builds one [`Notifier`] and
//! calls [`Notifier::send`] with an [`Alert`]. Every configured channel gets its request at the
//! same time, each bounded by a short timeout ([`DEFAULT_TIMEOUT`]).
//!
//! ```toml
//! [alerts]
//! on_success = false                       # failures, staleness and certificates always alert
//! telegram = { bot_token = "123:abc", chat_id = -1001234 }
//! ntfy = { server = "https://ntfy.home.lan", topic = "stackclone", priority = "high", token = "tk_…" }
//! webhook = { url = "https://hooks.home.lan/stackclone", headers = { "X-Token" = "…" } }
//! ```
//!
//! Request shapes:
//! - **Telegram**: `POST {api_url}/bot{bot_token}/sendMessage`, JSON
//!   `{"chat_id": …, "text": "<the alert line>", "disable_web_page_preview": true}`. `chat_id` is
//!   sent as written: a number stays a number, `"@channel"` stays a string.
//! - **ntfy**: `POST {server}/{topic}`, body = the alert line (UTF-8 text), headers `Title`
//!   (ASCII), `Priority` (1–5), `Tags` (an emoji short code, `stackclone`, the stack), and
//!   `Authorization: Bearer {token}` or HTTP basic auth from `user`/`password`.
//! - **Webhook**: `POST {url}` with the configured headers and a JSON object with these fields:
//!   `kind` (`"failure"`, `"staleness"`, `"success"`, `"cert_expiry"`), `host`, `peer`, `stack`,
//!   `generation`, `phase` (each `null` when unknown), `message`, `at` (RFC 3339, UTC),
//!   `at_unix` (seconds since the epoch) and `text` (the alert line, so a Slack- or
//!   Mattermost-style incoming webhook shows it as is).
//!
//! Decisions worth knowing:
//! - **A failing channel never fails a cycle.** [`Notifier::send`] cannot return an error: what
//!   went wrong is logged (`warn`, with the channel and the cause) and handed back as
//!   [`ChannelError`]s for `stackclone_alert_failures_total`. The other channels are unaffected.
//! - **Secrets stay out of logs.** Bot tokens, ntfy tokens and passwords are [`Secret`]s whose
//!   `Debug` prints `"***"`; webhook header values are not printed; request errors are reported
//!   without their URL (the Telegram URL holds the bot token, webhook URLs often hold one).
//! - ntfy `priority` applies to failures, staleness and certificate warnings (default `high`);
//!   successes always go at `low`, so a nightly "all good" never pages anyone.
//! - HTTP is reqwest over rustls with the *ring* provider, which is installed as the process
//!   default on first use if the binary has not installed one.
//!
//! What it does not do: no retries or queueing (the next cycle's alert is the retry), no
//! de-duplication (the staleness watch decides to alert once), no rate limiting.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::error::Error as _;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// How long one channel's request may take, connecting included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where Telegram's Bot API lives unless `api_url` says otherwise.
pub const DEFAULT_TELEGRAM_API: &str = "https://api.telegram.org";

/// The longest `message` (in characters) an alert carries; longer ones are cut with `…`.
/// Telegram refuses texts over 4096 characters and ntfy turns bodies over 4096 bytes into
/// attachments.
pub const MAX_MESSAGE_CHARS: usize = 3000;

/// How much of an error response's body is kept in a [`DeliveryError::Status`].
const MAX_ERROR_BODY: usize = 300;

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The `[alerts]` table of an agent's main file. With no channel configured, alerts are off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    #[serde(default)]
    pub telegram: Option<TelegramConfig>,
    #[serde(default)]
    pub ntfy: Option<NtfyConfig>,
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// Also alert when a cycle succeeds. Failures, staleness and certificate warnings always
    /// alert.
    #[serde(default)]
    pub on_success: bool,
}

impl AlertConfig {
    /// The channels this config sends to, in a fixed order.
    pub fn channels(&self) -> Vec<Channel> {
        let mut out = Vec::new();
        if self.telegram.is_some() {
            out.push(Channel::Telegram);
        }
        if self.ntfy.is_some() {
            out.push(Channel::Ntfy);
        }
        if self.webhook.is_some() {
            out.push(Channel::Webhook);
        }
        out
    }

    /// Whether an alert of this kind is sent at all (to whichever channels are configured).
    pub fn wants(&self, kind: AlertKind) -> bool {
        match kind {
            AlertKind::Success => self.on_success,
            AlertKind::Failure
            | AlertKind::Staleness
            | AlertKind::CertExpiry
            | AlertKind::Warning
            | AlertKind::PeerRefused => true,
        }
    }
}

/// `telegram = { bot_token, chat_id, api_url }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    /// The token BotFather gave, `123456:ABC…`.
    pub bot_token: Secret,
    pub chat_id: ChatId,
    /// The Bot API's base URL, [`DEFAULT_TELEGRAM_API`] unless overridden (a local Bot API
    /// server, or a test).
    #[serde(default = "default_telegram_api", deserialize_with = "http_url")]
    pub api_url: Url,
}

fn default_telegram_api() -> Url {
    Url::parse(DEFAULT_TELEGRAM_API).expect("DEFAULT_TELEGRAM_API is a valid URL")
}

/// A Telegram chat: a numeric id (`-1001234567890` for a group or channel) or a public
/// channel's `@name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a Telegram chat id: an integer like -1001234567890 or a string like \"@channel\""
)]
pub enum ChatId {
    Id(i64),
    Name(String),
}

/// `ntfy = { server, topic, priority, token | user + password }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NtfyToml")]
pub struct NtfyConfig {
    /// The ntfy server's base URL, e.g. `https://ntfy.sh` (it may have a path prefix).
    pub server: Url,
    /// The topic: 1 to 64 letters, digits, `-` and `_`.
    pub topic: String,
    /// Priority of failures, staleness and certificate warnings; `None` means `high`.
    pub priority: Option<NtfyPriority>,
    pub auth: Option<NtfyAuth>,
}

/// How the agent authenticates to an ntfy server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtfyAuth {
    /// `token = "tk_…"`: `Authorization: Bearer tk_…`.
    Token(Secret),
    /// `user` and `password`: HTTP basic auth.
    Basic { user: String, password: Secret },
}

/// The `ntfy` table as written, before its keys are checked against each other.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NtfyToml {
    #[serde(deserialize_with = "http_url")]
    server: Url,
    topic: String,
    #[serde(default)]
    priority: Option<NtfyPriority>,
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<Secret>,
}

impl TryFrom<NtfyToml> for NtfyConfig {
    type Error = String;

    fn try_from(raw: NtfyToml) -> Result<Self, String> {
        let topic_ok = !raw.topic.is_empty()
            && raw.topic.len() <= 64
            && raw
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !topic_ok {
            return Err(format!(
                "invalid ntfy topic {:?}: use 1 to 64 letters, digits, `-` and `_`",
                raw.topic
            ));
        }
        if is_placeholder(&raw.topic) {
            return Err(format!(
                "ntfy topic {:?} is the example's placeholder: {PLACEHOLDER_HINT}",
                raw.topic
            ));
        }
        let auth = match (raw.token, raw.user, raw.password) {
            (None, None, None) => None,
            (Some(token), None, None) => Some(NtfyAuth::Token(token)),
            (None, Some(user), Some(password)) => Some(NtfyAuth::Basic { user, password }),
            (Some(_), _, _) => {
                return Err("ntfy: set either `token` or `user` and `password`, not both".into());
            }
            (None, Some(_), None) => return Err("ntfy: `user` needs a `password`".into()),
            (None, None, Some(_)) => return Err("ntfy: `password` needs a `user`".into()),
        };
        Ok(NtfyConfig {
            server: raw.server,
            topic: raw.topic,
            priority: raw.priority,
            auth,
        })
    }
}

/// An ntfy priority, written `1` to `5` or `"min"`, `"low"`, `"default"`, `"high"`, `"max"` /
/// `"urgent"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NtfyPriority(u8);

impl NtfyPriority {
    pub const MIN: NtfyPriority = NtfyPriority(1);
    pub const LOW: NtfyPriority = NtfyPriority(2);
    pub const DEFAULT: NtfyPriority = NtfyPriority(3);
    pub const HIGH: NtfyPriority = NtfyPriority(4);
    pub const MAX: NtfyPriority = NtfyPriority(5);

    /// `1..=5`, or `None` outside that range.
    pub fn new(level: u8) -> Option<NtfyPriority> {
        (1..=5).contains(&level).then_some(NtfyPriority(level))
    }

    /// The number ntfy's `Priority` header takes.
    pub fn level(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for NtfyPriority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NtfyPriority;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an ntfy priority: 1 to 5, or \"min\", \"low\", \"default\", \"high\", \
                     \"max\" or \"urgent\"",
                )
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NtfyPriority, E> {
                u8::try_from(v)
                    .ok()
                    .and_then(NtfyPriority::new)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Signed(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NtfyPriority, E> {
                u8::try_from(v)
                    .ok()
                    .and_then(NtfyPriority::new)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<NtfyPriority, E> {
                match v {
                    "min" => Ok(NtfyPriority::MIN),
                    "low" => Ok(NtfyPriority::LOW),
                    "default" => Ok(NtfyPriority::DEFAULT),
                    "high" => Ok(NtfyPriority::HIGH),
                    "max" | "urgent" => Ok(NtfyPriority::MAX),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `webhook = { url, headers = { NAME = VALUE, … } }`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    #[serde(deserialize_with = "http_url")]
    pub url: Url,
    /// Sent with every request, e.g. an `Authorization` header. Names and values are checked
    /// when the config is read.
    #[serde(default, deserialize_with = "header_map")]
    pub headers: HeaderMap,
}

impl fmt::Debug for WebhookConfig {
    /// Shows the URL's origin and the header names only: either may carry a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field(
                "url",
                &format_args!("{}/…", self.url.origin().ascii_serialization()),
            )
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A credential from the config. `Debug` never shows it; [`Secret::expose`] does.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Secret {
    type Error = &'static str;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        if value.is_empty() {
            Err("a credential must not be empty")
        } else if is_placeholder(&value) {
            Err(
                "this credential is the example's placeholder: put your own value, or comment \
                 the channel out",
            )
        } else {
            Ok(Secret(value))
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

fn http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let s = String::deserialize(d)?;
    let url = Url::parse(&s).map_err(|e| de::Error::custom(format!("invalid URL {s:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(de::Error::custom(format!(
            "invalid URL {s:?}: only http:// and https:// are supported"
        )));
    }
    if let Some(host) = url.host_str()
        && is_example_host(host)
    {
        return Err(de::Error::custom(format!(
            "{s:?} is an example address, not yours: {PLACEHOLDER_HINT}"
        )));
    }
    Ok(url)
}

/// What to do about a placeholder left in an alert channel.
const PLACEHOLDER_HINT: &str =
    "put your own value, or comment the channel out (alerts would go to a stranger)";

/// Whether `value` is still one of the placeholders the example configs carry
/// (`replace-with-…`, `replace-me`, `changeme`).
fn is_placeholder(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    v.contains("replace-with")
        || v.contains("replace-me")
        || v.contains("replace_me")
        || v == "changeme"
}

/// The names RFC 2606 reserves for examples: `example.com`, `.net`, `.org` and their
/// subdomains, and the `.example` and `.invalid` top-level domains.
fn is_example_host(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    ["example.com", "example.net", "example.org"]
        .iter()
        .any(|d| h == *d || h.ends_with(&format!(".{d}")))
        || h.ends_with(".example")
        || h.ends_with(".invalid")
}

fn header_map<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderMap, D::Error> {
    let raw = BTreeMap::<String, String>::deserialize(d)?;
    let mut map = HeaderMap::with_capacity(raw.len());
    for (name, value) in raw {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| de::Error::custom(format!("invalid HTTP header name {name:?}")))?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            de::Error::custom(format!(
                "invalid value for HTTP header {name:?}: use visible ASCII characters only"
            ))
        })?;
        value.set_sensitive(true);
        map.insert(header, value);
    }
    Ok(map)
}

// ---------------------------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------------------------

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A cycle failed.
    Failure,
    /// The target committed no generation of a stack within its `max_age`.
    Staleness,
    /// A cycle committed a generation (sent only with `on_success = true`).
    Success,
    /// A certificate expires soon (or could not be renewed).
    CertExpiry,
    /// Something a person must know although no cycle failed: a service Docker had to kill at
    /// its stop timeout (the copy is crash-consistent only), a stack a killed process left
    /// stopped and that was started again.
    Warning,
    /// A peer was refused: a revoked certificate, a pusher presenting another flag key for its
    /// name or none at all, a certificate of another CA.
    PeerRefused,
}

impl AlertKind {
    /// The name used in the webhook's `kind` field.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Failure => "failure",
            AlertKind::Staleness => "staleness",
            AlertKind::Success => "success",
            AlertKind::CertExpiry => "cert_expiry",
            AlertKind::Warning => "warning",
            AlertKind::PeerRefused => "peer_refused",
        }
    }
}

/// One thing to tell a person. Build it with a constructor and the `with_*` methods; `at` is
/// set to now unless [`Alert::with_time`] says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    /// The host the alert comes from (the agent's own name).
    pub host: String,
    /// The other side of the pair, when there is one (`primary → standby`).
    pub peer: Option<String>,
    /// The stack; `None` only for what is not about one stack (a certificate).
    pub stack: Option<String>,
    pub generation: Option<u64>,
    /// The phase of the cycle that failed (`connect`, `scan`, `transfer`, `commit`, …).
    pub phase: Option<String>,
    /// What happened and, where known, what to do next.
    pub message: String,
    pub at: SystemTime,
}

impl Alert {
    fn new(kind: AlertKind, host: &str, stack: Option<&str>, message: &str) -> Alert {
        Alert {
            kind,
            host: host.to_owned(),
            peer: None,
            stack: stack.map(str::to_owned),
            generation: None,
            phase: None,
            message: message.to_owned(),
            at: SystemTime::now(),
        }
    }

    /// A cycle of `stack` failed in `phase`.
    pub fn failure(host: &str, stack: &str, phase: &str, message: &str) -> Alert {
        Alert::new(AlertKind::Failure, host, Some(stack), message).with_phase(phase)
    }

    /// No generation of `stack` was committed in time.
    pub fn staleness(host: &str, stack: &str, message: &str) -> Alert {
        Alert::new(AlertKind::Staleness, host, Some(stack), message)
    }

    /// A cycle of `stack` committed `generation`.
    pub fn success(host: &str, stack: &str, generation: u64, message: &str) -> Alert {
        Alert::new(AlertKind::Success, host, Some(stack), message).with_generation(generation)
    }

    /// Something about `stack` a person must know, although no cycle failed.
    pub fn warning(host: &str, stack: &str, message: &str) -> Alert {
        Alert::new(AlertKind::Warning, host, Some(stack), message)
    }

    /// A peer was refused (see [`AlertKind::PeerRefused`]); `peer` is its address and, when it
    /// presented one, its certificate's name.
    pub fn peer_refused(host: &str, peer: &str, message: &str) -> Alert {
        Alert::new(AlertKind::PeerRefused, host, None, message).with_peer(peer)
    }

    /// A certificate of `host` expires soon.
    pub fn cert_expiry(host: &str, message: &str) -> Alert {
        Alert::new(AlertKind::CertExpiry, host, None, message)
    }

    pub fn with_peer(mut self, peer: &str) -> Alert {
        self.peer = Some(peer.to_owned());
        self
    }

    pub fn with_generation(mut self, generation: u64) -> Alert {
        self.generation = Some(generation);
        self
    }

    pub fn with_phase(mut self, phase: &str) -> Alert {
        self.phase = Some(phase.to_owned());
        self
    }

    pub fn with_stack(mut self, stack: &str) -> Alert {
        self.stack = Some(stack.to_owned());
        self
    }

    pub fn with_time(mut self, at: SystemTime) -> Alert {
        self.at = at;
        self
    }

    /// `host → peer`, or `host` alone.
    fn place(&self) -> Cow<'_, str> {
        match &self.peer {
            Some(peer) => Cow::Owned(format!("{} → {peer}", self.host)),
            None => Cow::Borrowed(&self.host),
        }
    }

    /// A short ASCII title (ntfy's `Title` header cannot carry UTF-8).
    pub fn title(&self) -> String {
        let stack = self.stack.as_deref().unwrap_or("-");
        let title = match self.kind {
            AlertKind::Failure => format!("stackclone: {stack} failed on {}", self.host),
            AlertKind::Staleness => format!("stackclone: {stack} is stale on {}", self.host),
            AlertKind::Success => format!("stackclone: {stack} synced"),
            AlertKind::CertExpiry => format!("stackclone: certificate expiring on {}", self.host),
            AlertKind::Warning => format!("stackclone: {stack} needs attention on {}", self.host),
            AlertKind::PeerRefused => format!("stackclone: a peer was refused on {}", self.host),
        };
        title
            .chars()
            .map(|c| {
                if c == ' ' || c.is_ascii_graphic() {
                    c
                } else {
                    '?'
                }
            })
            .collect()
    }

    fn at_unix(&self) -> i64 {
        match self.at.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }

    fn at_rfc3339(&self) -> String {
        let at = time::OffsetDateTime::from(self.at);
        let at = at.replace_nanosecond(0).unwrap_or(at);
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| self.at_unix().to_string())
    }

    /// The webhook body (see the module docs for its fields).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind.as_str(),
            "host": self.host,
            "peer": self.peer,
            "stack": self.stack,
            "generation": self.generation,
            "phase": self.phase,
            "message": self.message,
            "at": self.at_rfc3339(),
            "at_unix": self.at_unix(),
            "text": self.to_string(),
        })
    }
}

impl fmt::Display for Alert {
    /// The line a person reads:
    /// ``stackclone: stack `nextcloud` failed on primary → standby in phase commit: …``.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = self.place();
        let stack = self.stack.as_deref().unwrap_or("-");
        f.write_str("stackclone: ")?;
        match self.kind {
            AlertKind::Failure => {
                write!(f, "stack `{stack}` failed on {place}")?;
                if let Some(phase) = &self.phase {
                    write!(f, " in phase {phase}")?;
                }
                if let Some(generation) = self.generation {
                    write!(f, " (generation {generation})")?;
                }
            }
            AlertKind::Staleness => {
                write!(f, "stack `{stack}` is stale on {place}")?;
                if let Some(generation) = self.generation {
                    write!(f, " (last generation {generation})")?;
                }
            }
            AlertKind::Success => {
                write!(f, "stack `{stack}` synced {place}")?;
                if let Some(generation) = self.generation {
                    write!(f, " (generation {generation})")?;
                }
            }
            AlertKind::Warning => {
                write!(f, "stack `{stack}` needs attention on {place}")?;
                if let Some(generation) = self.generation {
                    write!(f, " (generation {generation})")?;
                }
            }
            AlertKind::PeerRefused => {
                write!(f, "{place} refused a peer")?;
            }
            AlertKind::CertExpiry => {
                write!(f, "certificate of {place} expires soon")?;
                if let Some(stack) = &self.stack {
                    write!(f, " (stack `{stack}`)")?;
                }
            }
        }
        if !self.message.is_empty() {
            write!(f, ": {}", truncate(&self.message, MAX_MESSAGE_CHARS))?;
        }
        Ok(())
    }
}

fn truncate(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => Cow::Owned(format!("{}…", &s[..cut])),
    }
}

// ---------------------------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------------------------

/// An alert channel; [`Channel::as_str`] is the `channel` label of
/// `stackclone_alert_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Telegram,
    Ntfy,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Telegram => "telegram",
            Channel::Ntfy => "ntfy",
            Channel::Webhook => "webhook",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one HTTP request (an alert, a Pushgateway push) did not get through. Never holds the
/// request's URL, which may carry a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The HTTP client could not be built (no TLS roots, …).
    #[error("no HTTP client: {0}")]
    Client(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
    /// The server answered with a non-success status; `body` is the start of its answer.
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
}

/// An alert one channel did not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{channel} alert not delivered: {error}")]
pub struct ChannelError {
    pub channel: Channel,
    pub error: DeliveryError,
}

/// Sends [`Alert`]s to the channels of one [`AlertConfig`].
#[derive(Debug, Clone)]
pub struct Notifier {
    config: AlertConfig,
    /// Built at the first send: building it reads the system's CA certificates (some 15 ms),
    /// which a push that sends no alert should not pay.
    client: std::sync::OnceLock<Result<reqwest::Client, DeliveryError>>,
    timeout: Duration,
}

impl Notifier {
    /// A notifier with [`DEFAULT_TIMEOUT`] per request.
    pub fn new(config: AlertConfig) -> Notifier {
        Notifier::with_timeout(config, DEFAULT_TIMEOUT)
    }

    /// A notifier whose requests each give up after `timeout`, connecting included.
    pub fn with_timeout(config: AlertConfig, timeout: Duration) -> Notifier {
        // The client is built at the first send, so a TLS problem shows in that send's errors
        // rather than as a failed start: alerts must never stop an agent.
        Notifier {
            config,
            client: std::sync::OnceLock::new(),
            timeout,
        }
    }

    pub fn config(&self) -> &AlertConfig {
        &self.config
    }

    /// Sends `alert` to every configured channel at once and waits for all of them (each
    /// bounded by the timeout). Returns what failed, after logging it; an empty list when
    /// everything was delivered, or when the alert's kind is not wanted (a success without
    /// `on_success`) or no channel is configured.
    pub async fn send(&self, alert: &Alert) -> Vec<ChannelError> {
        if !self.config.wants(alert.kind) {
            return Vec::new();
        }
        let telegram = async {
            match &self.config.telegram {
                Some(cfg) => Some(self.send_telegram(cfg, alert).await),
                None => None,
            }
        };
        let ntfy = async {
            match &self.config.ntfy {
                Some(cfg) => Some(self.send_ntfy(cfg, alert).await),
                None => None,
            }
        };
        let webhook = async {
            match &self.config.webhook {
                Some(cfg) => Some(self.send_webhook(cfg, alert).await),
                None => None,
            }
        };
        let (telegram, ntfy, webhook) = tokio::join!(telegram, ntfy, webhook);
        let mut errors = Vec::new();
        for (channel, result) in [
            (Channel::Telegram, telegram),
            (Channel::Ntfy, ntfy),
            (Channel::Webhook, webhook),
        ] {
            if let Some(Err(error)) = result {
                tracing::warn!(
                    channel = channel.as_str(),
                    kind = alert.kind.as_str(),
                    stack = alert.stack.as_deref().unwrap_or("-"),
                    error = %error,
                    "alert not delivered"
                );
                errors.push(ChannelError { channel, error });
            }
        }
        errors
    }

    fn client(&self) -> Result<&reqwest::Client, DeliveryError> {
        self.client
            .get_or_init(|| http_client(self.timeout))
            .as_ref()
            .map_err(Clone::clone)
    }

    async fn send_telegram(
        &self,
        cfg: &TelegramConfig,
        alert: &Alert,
    ) -> Result<(), DeliveryError> {
        let url = format!(
            "{}/bot{}/sendMessage",
            cfg.api_url.as_str().trim_end_matches('/'),
            cfg.bot_token.expose()
        );
        let body = serde_json::json!({
            "chat_id": cfg.chat_id,
            "text": alert.to_string(),
            "disable_web_page_preview": true,
        });
        let request = self.client()?.post(url).json(&body);
        execute(request, self.timeout).await
    }

    async fn send_ntfy(&self, cfg: &NtfyConfig, alert: &Alert) -> Result<(), DeliveryError> {
        let url = format!(
            "{}/{}",
            cfg.server.as_str().trim_end_matches('/'),
            cfg.topic
        );
        let priority = match alert.kind {
            AlertKind::Success => NtfyPriority::LOW,
            _ => cfg.priority.unwrap_or(NtfyPriority::HIGH),
        };
        let emoji = match alert.kind {
            AlertKind::Failure => "rotating_light",
            AlertKind::Staleness => "hourglass",
            AlertKind::Success => "white_check_mark",
            AlertKind::CertExpiry | AlertKind::Warning => "warning",
            AlertKind::PeerRefused => "no_entry",
        };
        let mut tags = format!("{emoji},stackclone");
        if let Some(stack) = &alert.stack {
            tags.push(',');
            tags.push_str(stack);
        }
        let mut request = self
            .client()?
            .post(url)
            .header("Title", alert.title())
            .header("Priority", priority.level().to_string())
            .header("Tags", tags)
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(alert.to_string());
        request = match &cfg.auth {
            None => request,
            Some(NtfyAuth::Token(token)) => request.bearer_auth(token.expose()),
            Some(NtfyAuth::Basic { user, password }) => {
                request.basic_auth(user, Some(password.expose()))
            }
        };
        execute(request, self.timeout).await
    }

    async fn send_webhook(&self, cfg: &WebhookConfig, alert: &Alert) -> Result<(), DeliveryError> {
        let request = self
            .client()?
            .post(cfg.url.clone())
            .headers(cfg.headers.clone())
            .json(&alert.to_json());
        execute(request, self.timeout).await
    }
}

/// Makes the process-wide rustls provider *ring* unless one is installed already (by the
/// binary, or by an earlier call): reqwest is built without a provider of its own so that
/// aws-lc-rs stays out of the build.
fn install_ring_provider() {
    // An error only says a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client for alerts and Pushgateway pushes.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, DeliveryError> {
    install_ring_provider();
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .user_agent(concat!("stackclone/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DeliveryError::Client(cause_chain(&e.without_url())))
}

/// Sends `request` with `timeout` over the whole exchange, body included, and maps every way it
/// can fail to a [`DeliveryError`].
pub(crate) async fn execute(
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<(), DeliveryError> {
    let exchange = async {
        let response = request
            .send()
            .await
            .map_err(|e| request_error(e, timeout))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // The body is only for the log; a server that cannot send it still gets its status shown.
        let body = response.text().await.unwrap_or_default();
        Err(DeliveryError::Status {
            status: status.as_u16(),
            body: truncate(body.trim(), MAX_ERROR_BODY).into_owned(),
        })
    };
    // One bound over the whole exchange, body included, so a server that accepts and then
    // trickles or hangs costs `timeout` and no more.
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(DeliveryError::Timeout(timeout)))
}

fn request_error(e: reqwest::Error, timeout: Duration) -> DeliveryError {
    let e = e.without_url();
    if e.is_timeout() {
        DeliveryError::Timeout(timeout)
    } else if e.is_connect() {
        DeliveryError::Connect(cause_chain(&e))
    } else {
        DeliveryError::Request(cause_chain(&e))
    }
}

/// `outer: inner: innermost`, skipping a cause whose text its parent already shows.
fn cause_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
