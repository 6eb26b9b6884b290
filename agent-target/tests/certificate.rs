//! The running target's own certificate: the expiry metric, the alert when it is due and cannot
//! be renewed, and a real renewal from `stackclone-certs serve`'s service that new connections
//! then see.

mod support;

use std::sync::Arc;
use std::time::Duration;

use stackclone_certs::renewal::Renewal;
use stackclone_certs::{EnrollServer, Identity, Role};
use support::webhook::{Recorder, Reply};
use support::{World, eventually, sample};
use time::OffsetDateTime;

/// A target certificate 20 days into a 22-day life: due (less than a third left).
fn due_world() -> World {
    let now = OffsetDateTime::now_utc();
    World::with_target_validity(
        now - time::Duration::days(20),
        now + time::Duration::days(2),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_certificate_without_a_server_alerts_once_and_sets_the_expiry_metric() {
    let hook = Recorder::start(Reply::Status(200)).await;
    let w = due_world();
    w.write_main_with_webhook(&hook.url(), false);
    w.write_stack("web", "");
    let not_after = Identity::load(&w.tgt_id).unwrap().info().not_after;
    let mut t = w.start().await;

    // The check at start.
    let got = hook.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let alert = got[0].json();
    assert_eq!(alert["kind"], "cert_expiry");
    assert_eq!(alert["host"], "standby");
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains("stackclone-certs renew --server"),
        "{message}"
    );
    let m = t.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"stackclone_certificate_expiry_timestamp_seconds{cert="host"}"#
        ),
        Some(not_after.unix_timestamp() as f64),
        "{m}"
    );

    // The hourly check finds the same: no second alert, nothing renewed.
    match t.daemon.check_certificate().await.unwrap() {
        Renewal::DueButNoServer { expires } => assert_eq!(expires, not_after),
        other => panic!("expected DueButNoServer, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.requests().len(), 1, "{:?}", hook.requests());
    assert_eq!(
        Identity::load(&w.tgt_id).unwrap().info().not_after,
        not_after
    );
    t.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_certificate_is_renewed_and_new_connections_get_the_new_one() {
    let w = due_world();
    w.write_stack("web", "");
    let web = w.source_tree("web", &[("a.txt", "v1")]);
    // The CA host's enrollment service, as `stackclone-certs serve` runs it.
    let server = Arc::new(EnrollServer::load(&w.src_id).unwrap());
    let endpoint = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server_addr = endpoint.local_addr().unwrap();
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(stackclone_certs::serve(server, endpoint, async move {
        let _ = server_stopped.await;
    }));
    w.tgt_id
        .write_public(&w.tgt_id.server(), format!("{server_addr}\n").as_bytes())
        .unwrap();
    let old = Identity::load(&w.tgt_id).unwrap().info().clone();

    let mut t = w.start().await;
    // The check at start renews; the metric then shows the new expiry (~90 days out).
    let renewed_expiry = eventually(Duration::from_secs(15), async || {
        let m = t.metrics().await;
        let at = sample(
            &m,
            r#"stackclone_certificate_expiry_timestamp_seconds{cert="host"}"#,
        )?;
        (at > (old.not_after + time::Duration::days(30)).unix_timestamp() as f64).then_some(at)
    })
    .await
    .expect("the certificate was renewed at start");
    let on_disk = Identity::load(&w.tgt_id).unwrap().info().clone();
    assert_eq!(on_disk.name, "standby");
    assert_eq!(on_disk.role, Role::Target);
    assert_ne!(on_disk.fingerprint, old.fingerprint);
    assert_eq!(on_disk.not_after.unix_timestamp() as f64, renewed_expiry);

    // A new connection is served with the new certificate, and a cycle works over it.
    let src = w.source();
    let source_identity = Identity::load(&w.src_id).unwrap();
    let trust = stackclone_certs::Trust::load(&w.src_id).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(
        stackclone_certs::client_config(&source_identity, &trust).unwrap(),
    );
    let (conn, admission) = stackclone_certs::connect(&client, t.addr, &trust)
        .await
        .unwrap();
    assert_eq!(admission.peer.fingerprint, on_disk.fingerprint);
    conn.close(0u32.into(), b"done");
    let done = src
        .push(t.addr, "web", &web)
        .await
        .expect("push after renewal");
    assert_eq!(done.generation, 1);

    // Not due any more.
    assert!(matches!(
        t.daemon.check_certificate().await.unwrap(),
        Renewal::NotDue { .. }
    ));
    t.shutdown(Duration::from_secs(10)).await;
    let _ = stop_server.send(());
    let _ = serving.await;
}
