//! Metrics over real TCP on 127.0.0.1: record cycles and failures, scrape `/metrics`, parse the
//! exposition and check every series and value; the Pushgateway request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use stackclone_common::alert::{Channel, ChannelError, DeliveryError};
use stackclone_common::metrics::{
    self, CycleStats, Metrics, OPENMETRICS_CONTENT_TYPE, PushError, TEXT_0_0_4_CONTENT_TYPE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

mod support;

use support::{FAIL_BODY, Recorder, Reply};

/// Sends `request` as is and returns (status line, headers, body) of the answer.
async fn http(addr: SocketAddr, request: &str) -> (String, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    let answer = String::from_utf8(answer).expect("UTF-8 answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.split("\r\n");
    let status = lines.next().expect("status line").to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().expect("length"))
        .expect("content-length");
    assert_eq!(body.len(), len, "body length matches Content-Length");
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The exposition as `name{labels}` → value, plus each family's `# TYPE`.
struct Parsed {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

fn parse(text: &str) -> Parsed {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            types.insert(name.to_owned(), kind.to_owned());
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample value");
            let value: f64 = value.parse().expect("numeric value");
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "duplicate series {series}"
            );
        }
    }
    Parsed { samples, types }
}

impl Parsed {
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {:#?}", self.samples))
    }
}

const AT: u64 = 1_795_255_200;

fn recorded() -> Arc<Metrics> {
    let m = Arc::new(Metrics::new());
    m.register_stack("nextcloud");
    m.register_stack("gitea");
    m.record_cycle(
        "nextcloud",
        UNIX_EPOCH + Duration::from_secs(AT - 3600),
        &CycleStats {
            generation: 41,
            duration: Duration::from_millis(30_000),
            source_downtime: Duration::from_millis(9_000),
            target_downtime: Duration::from_millis(4_000),
            bytes_sent: 1_000,
            bytes_matched: 50_000,
            bytes_literal: 800,
            files_changed: 7,
        },
    );
    m.set_stale("nextcloud", true);
    m.record_cycle(
        "nextcloud",
        UNIX_EPOCH + Duration::from_secs(AT),
        &CycleStats {
            generation: 42,
            duration: Duration::from_millis(12_500),
            source_downtime: Duration::from_millis(3_250),
            target_downtime: Duration::from_millis(1_500),
            bytes_sent: 24,
            bytes_matched: 0,
            bytes_literal: 200,
            files_changed: 1,
        },
    );
    m.record_failure("nextcloud", "commit", "commit_failed");
    m.record_failure("nextcloud", "commit", "commit_failed");
    m.record_failure("gitea", "connect", "connect");
    m.record_stop_killed("nextcloud", "db");
    m.record_stop_killed("nextcloud", "db");
    m.set_stale("gitea", true);
    m.set_certificate_expiry(
        "identity",
        UNIX_EPOCH + Duration::from_secs(AT + 86_400 * 90),
    );
    m.record_alert_errors(&[
        ChannelError {
            channel: Channel::Telegram,
            error: DeliveryError::Timeout(Duration::from_secs(10)),
        },
        ChannelError {
            channel: Channel::Webhook,
            error: DeliveryError::Status {
                status: 500,
                body: String::new(),
            },
        },
    ]);
    m.record_alert_failure(Channel::Telegram);
    m
}

#[tokio::test]
async fn scrape_serves_every_series_with_the_recorded_values() {
    let metrics = recorded();
    let (stop, stopped) = oneshot::channel::<()>();
    let addr = metrics::serve("127.0.0.1:0".parse().expect("addr"), metrics, async {
        let _ = stopped.await;
    })
    .await
    .expect("serve");

    let (status, headers, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header(&headers, "content-type"),
        Some(OPENMETRICS_CONTENT_TYPE)
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    let p = parse(&body);
    let expected: &[(&str, f64)] = &[
        (
            r#"stackclone_last_success_timestamp_seconds{stack="nextcloud"}"#,
            AT as f64,
        ),
        (r#"stackclone_generation{stack="nextcloud"}"#, 42.0),
        (
            r#"stackclone_cycle_duration_seconds{stack="nextcloud"}"#,
            12.5,
        ),
        (
            r#"stackclone_source_downtime_seconds{stack="nextcloud"}"#,
            3.25,
        ),
        (
            r#"stackclone_target_downtime_seconds{stack="nextcloud"}"#,
            1.5,
        ),
        (r#"stackclone_bytes_sent_total{stack="nextcloud"}"#, 1_024.0),
        (
            r#"stackclone_bytes_matched_total{stack="nextcloud"}"#,
            50_000.0,
        ),
        (
            r#"stackclone_bytes_literal_total{stack="nextcloud"}"#,
            1_000.0,
        ),
        (r#"stackclone_files_changed_total{stack="nextcloud"}"#, 8.0),
        (r#"stackclone_bytes_sent_total{stack="gitea"}"#, 0.0),
        (r#"stackclone_bytes_matched_total{stack="gitea"}"#, 0.0),
        (r#"stackclone_bytes_literal_total{stack="gitea"}"#, 0.0),
        (r#"stackclone_files_changed_total{stack="gitea"}"#, 0.0),
        (
            r#"stackclone_cycle_failures_total{stack="nextcloud",phase="commit",cause="commit_failed"}"#,
            2.0,
        ),
        (
            r#"stackclone_cycle_failures_total{stack="gitea",phase="connect",cause="connect"}"#,
            1.0,
        ),
        (
            r#"stackclone_stop_killed_total{stack="nextcloud",service="db"}"#,
            2.0,
        ),
        // A committed cycle clears staleness that was set before it.
        (r#"stackclone_stale{stack="nextcloud"}"#, 0.0),
        (r#"stackclone_stale{stack="gitea"}"#, 1.0),
        (
            r#"stackclone_certificate_expiry_timestamp_seconds{cert="identity"}"#,
            (AT + 86_400 * 90) as f64,
        ),
        (
            r#"stackclone_alert_failures_total{channel="telegram"}"#,
            2.0,
        ),
        (r#"stackclone_alert_failures_total{channel="webhook"}"#, 1.0),
    ];
    for &(series, value) in expected {
        assert_eq!(p.value(series), value, "{series}");
    }
    // Nothing else: gitea never succeeded, so it has no timestamp, generation or durations.
    assert_eq!(p.samples.len(), expected.len(), "{:#?}", p.samples);

    let types: Vec<(&str, &str)> = p
        .types
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        types,
        [
            ("stackclone_alert_failures", "counter"),
            ("stackclone_bytes_literal", "counter"),
            ("stackclone_bytes_matched", "counter"),
            ("stackclone_bytes_sent", "counter"),
            ("stackclone_certificate_expiry_timestamp_seconds", "gauge"),
            ("stackclone_cycle_duration_seconds", "gauge"),
            ("stackclone_cycle_failures", "counter"),
            ("stackclone_files_changed", "counter"),
            ("stackclone_generation", "gauge"),
            ("stackclone_last_success_timestamp_seconds", "gauge"),
            ("stackclone_source_downtime_seconds", "gauge"),
            ("stackclone_stale", "gauge"),
            ("stackclone_stop_killed", "counter"),
            ("stackclone_target_downtime_seconds", "gauge"),
        ]
    );
    assert!(
        body.contains("# UNIT stackclone_cycle_duration_seconds seconds\n"),
        "{body}"
    );

    let _ = stop.send(());
}

#[tokio::test]
async fn other_paths_and_methods_are_refused() {
    let (stop, stopped) = oneshot::channel::<()>();
    let addr = metrics::serve(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::new(Metrics::new()),
        async {
            let _ = stopped.await;
        },
    )
    .await
    .expect("serve");

    let (status, _, body) = http(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(body.contains("/metrics"), "{body}");
    let (status, _, _) = http(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _, _) = http(addr, "nonsense\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    // A query string does not change the answer.
    let (status, _, body) = http(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "# EOF\n");
    let _ = stop.send(());
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let (stop, stopped) = oneshot::channel::<()>();
    let addr = metrics::serve(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::new(Metrics::new()),
        async {
            let _ = stopped.await;
        },
    )
    .await
    .expect("serve");
    let (status, _, _) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");

    stop.send(()).expect("server still running");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Pushgateway
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn push_gateway_puts_the_classic_text_format_to_the_job() {
    let metrics = recorded();
    let gateway = Recorder::start(Reply::Status(200)).await;

    metrics::push_gateway(
        &format!("{}/", gateway.url()),
        "stackclone-primary",
        &metrics,
    )
    .await
    .expect("push");

    let r = gateway.only_request();
    let body = r.body_text();
    assert_eq!(r.method, "PUT");
    assert_eq!(r.path, "/metrics/job/stackclone-primary");
    assert_eq!(r.header("content-type"), Some(TEXT_0_0_4_CONTENT_TYPE));
    assert_eq!(body, metrics.encode_text_0_0_4());
    assert!(!body.contains("# EOF"), "{body}");
    assert!(!body.contains("# UNIT"), "{body}");

    // In 0.0.4 a counter's family is named like its samples.
    let p = parse(body);
    assert_eq!(
        p.types
            .get("stackclone_bytes_sent_total")
            .map(String::as_str),
        Some("counter")
    );
    assert!(body.contains("# HELP stackclone_bytes_sent_total Bytes put on the wire.\n"));
    for series in p.samples.keys() {
        let family = series.split('{').next().expect("name");
        assert!(p.types.contains_key(family), "{family} has no # TYPE");
    }
    assert_eq!(
        p.value(r#"stackclone_bytes_sent_total{stack="nextcloud"}"#),
        1_024.0
    );
    assert_eq!(p.value(r#"stackclone_generation{stack="nextcloud"}"#), 42.0);
    assert_eq!(
        p.value(r#"stackclone_cycle_failures_total{stack="nextcloud",phase="commit",cause="commit_failed"}"#),
        2.0
    );
}

#[tokio::test]
async fn push_gateway_reports_bad_jobs_and_server_errors() {
    let metrics = Metrics::new();
    let gateway = Recorder::start(Reply::Status(500)).await;
    let url = gateway.url();

    for job in ["", "a/b", "..", "job name"] {
        assert_eq!(
            metrics::push_gateway(&url, job, &metrics).await,
            Err(PushError::InvalidJob { job: job.into() })
        );
    }
    assert!(gateway.requests().is_empty());

    assert_eq!(
        metrics::push_gateway(&url, "stackclone", &metrics).await,
        Err(PushError::Delivery(DeliveryError::Status {
            status: 500,
            body: FAIL_BODY.into()
        }))
    );
    assert_eq!(gateway.requests().len(), 1);
}
