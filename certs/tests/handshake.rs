//! The agents' endpoint configs over real QUIC on 127.0.0.1: who gets in, who is refused, and
//! what each side is told.

use std::net::SocketAddr;
use std::sync::Arc;

use stackclone_certs::{
    Admission, Ca, CertProfile, Csr, DenyList, Identity, NewHost, Revocation, Role, Trust,
    TrustError, accept, check_expiry, client_config, connect, server_config,
};
use time::{Duration, OffsetDateTime};

fn fleet() -> (Ca, Trust) {
    let ca = Ca::create("test", 30).unwrap();
    let trust = Trust::new(ca.certificate().clone(), DenyList::empty()).unwrap();
    (ca, trust)
}

fn host(ca: &Ca, name: &str, role: Role) -> NewHost {
    ca.new_host(&CertProfile::new(name, role, None, 10))
        .unwrap()
}

fn host_valid(ca: &Ca, name: &str, role: Role, from: Duration, to: Duration) -> Identity {
    let now = OffsetDateTime::now_utc();
    let profile = CertProfile {
        not_before: now + from,
        not_after: now + to,
        ..CertProfile::new(name, role, None, 10)
    };
    ca.new_host(&profile).unwrap().identity
}

type ServerResult = Result<(quinn::Connection, Admission), TrustError>;

/// A server that admits one pushing connection, and reports the outcome.
fn listen(
    identity: &Identity,
    trust: &Trust,
) -> (SocketAddr, tokio::task::JoinHandle<ServerResult>) {
    let endpoint = quinn::Endpoint::server(
        server_config(identity, trust).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let trust = trust.clone();
    let task = tokio::spawn(async move {
        let incoming = endpoint.accept().await.expect("endpoint open");
        let result = accept(incoming, &trust).await;
        if let Ok((conn, _)) = &result {
            // Keep the connection until the client has read the ack.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
        }
        result
    });
    (addr, task)
}

async fn dial(
    identity: &Identity,
    trust: &Trust,
    addr: SocketAddr,
) -> Result<(quinn::Connection, Admission), TrustError> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(identity, trust).unwrap());
    connect(&endpoint, addr, trust).await
}

fn text<T>(r: Result<T, TrustError>) -> String {
    match r {
        Ok(_) => panic!("expected a refusal"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn pair_connects_and_both_sides_see_name_role_and_flag_key() {
    let (ca, trust) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let target = host(&ca, "standby", Role::Target);
    let (addr, server) = listen(&target.identity, &trust);

    let (conn, admitted) = dial(&source.identity, &trust, addr).await.unwrap();
    assert_eq!(admitted.peer.name, "standby");
    assert_eq!(admitted.peer.role, Role::Target);
    // Every host has a flag key, a target too.
    let target_flag = target.flag_key.as_ref().unwrap().verifying_key();
    assert_eq!(admitted.peer.flag_key, Some(target_flag));
    let peer = stackclone_certs::peer_identity(&conn).unwrap();
    assert_eq!(peer.fingerprint, target.identity.info().fingerprint);
    conn.close(0u32.into(), b"bye");

    let (_, on_target) = server.await.unwrap().unwrap();
    assert_eq!(on_target.peer.name, "primary");
    assert_eq!(on_target.peer.role, Role::Source);
    // The target learns the one flag key it accepts from this source from the certificate.
    let flag = source.flag_key.as_ref().unwrap().verifying_key();
    assert_eq!(on_target.peer.flag_key, Some(flag));
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let (ca, trust) = fleet();
    let (other_ca, _) = fleet();
    let target = host(&ca, "standby", Role::Target);
    let intruder = host(&other_ca, "primary", Role::Source);
    let (addr, server) = listen(&target.identity, &trust);

    // The intruder trusts our CA, so only the server's verdict can stop it.
    let err = text(dial(&intruder.identity, &trust, addr).await);
    assert!(err.contains("refused by"), "{err}");
    assert!(
        err.contains("certificate for `primary` is not signed by this fleet's CA"),
        "{err}"
    );
    let err = text(server.await.unwrap());
    assert!(err.contains("not signed by this fleet's CA"), "{err}");
}

#[tokio::test]
async fn server_from_another_ca_is_refused_by_the_client() {
    let (ca, trust) = fleet();
    let (other_ca, other_trust) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let impostor = host(&other_ca, "standby", Role::Target);
    let (addr, _server) = listen(&impostor.identity, &other_trust);

    let err = text(dial(&source.identity, &trust, addr).await);
    assert!(err.contains("handshake with"), "{err}");
    assert!(
        err.contains("certificate for `standby` is not signed by this fleet's CA"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let (ca, trust) = fleet();
    let target = host(&ca, "standby", Role::Target);
    let old = host_valid(
        &ca,
        "primary",
        Role::Source,
        Duration::days(-10),
        Duration::days(-1),
    );
    let (addr, server) = listen(&target.identity, &trust);

    let err = text(dial(&old, &trust, addr).await);
    assert!(
        err.contains("certificate for `primary` expired on"),
        "{err}"
    );
    let err = text(server.await.unwrap());
    assert!(
        err.contains("certificate for `primary` expired on"),
        "{err}"
    );
    assert!(matches!(
        check_expiry(old.info(), OffsetDateTime::now_utc()),
        Err(TrustError::CertificateExpired { .. })
    ));
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused() {
    let (ca, trust) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let future = host_valid(
        &ca,
        "standby",
        Role::Target,
        Duration::days(1),
        Duration::days(9),
    );
    let (addr, _server) = listen(&future, &trust);

    // Here the server's certificate is the bad one: the client refuses it.
    let err = text(dial(&source.identity, &trust, addr).await);
    assert!(
        err.contains("certificate for `standby` is not valid before"),
        "{err}"
    );
}

#[tokio::test]
async fn revoked_certificate_is_refused() {
    let (ca, _) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let target = host(&ca, "standby", Role::Target);
    let revoked = DenyList::empty()
        .revoke(
            &ca,
            vec![Revocation {
                name: "primary".into(),
                fingerprint: source.identity.info().fingerprint,
                serial: source.identity.info().serial.clone(),
                revoked_at: "now".into(),
            }],
        )
        .unwrap();
    let target_trust = Trust::new(ca.certificate().clone(), revoked).unwrap();
    let source_trust = Trust::new(ca.certificate().clone(), DenyList::empty()).unwrap();
    let (addr, server) = listen(&target.identity, &target_trust);

    let err = text(dial(&source.identity, &source_trust, addr).await);
    assert!(err.contains("certificate for `primary`"), "{err}");
    assert!(err.contains("is revoked (deny list v1)"), "{err}");
    let err = text(server.await.unwrap());
    assert!(err.contains("is revoked"), "{err}");
}

#[tokio::test]
async fn deny_list_carried_in_the_source_hello_reaches_the_target() {
    let (ca, _) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let target = host(&ca, "standby", Role::Target);
    let stolen = host(&ca, "laptop", Role::Source);
    let list = DenyList::empty()
        .revoke(
            &ca,
            vec![Revocation {
                name: "laptop".into(),
                fingerprint: stolen.identity.info().fingerprint,
                serial: stolen.identity.info().serial.clone(),
                revoked_at: "now".into(),
            }],
        )
        .unwrap();
    let source_trust = Trust::new(ca.certificate().clone(), list).unwrap();
    let target_trust = Trust::new(ca.certificate().clone(), DenyList::empty()).unwrap();

    // Before it learns the list, the target would admit the stolen certificate.
    let (addr, server) = listen(&target.identity, &target_trust);
    let (conn, _) = dial(&source.identity, &source_trust, addr).await.unwrap();
    conn.close(0u32.into(), b"bye");
    let (_, admitted) = server.await.unwrap().unwrap();
    assert!(admitted.learned_deny_list);
    assert_eq!(target_trust.deny_list().version(), 1);

    // Now it refuses it at the handshake.
    let (addr, server) = listen(&target.identity, &target_trust);
    let stolen_trust = Trust::new(ca.certificate().clone(), DenyList::empty()).unwrap();
    let err = text(dial(&stolen.identity, &stolen_trust, addr).await);
    assert!(
        err.contains("certificate for `laptop`") && err.contains("revoked"),
        "{err}"
    );
    assert!(text(server.await.unwrap()).contains("revoked"));
}

/// A host enrolled once acts in both roles: at fail-back the standby (a target) pushes to the
/// old primary (a source), so the role in a certificate is not what admits a pusher or a
/// server; the flag key is (and, in the agents, each stack's `allow` list and the name).
#[tokio::test]
async fn either_role_pushes_to_either_role() {
    let (ca, trust) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let target = host(&ca, "standby", Role::Target);
    let other_target = host(&ca, "standby2", Role::Target);

    // The standby pushes to the primary, which admits it with its flag key.
    let (addr, server) = listen(&source.identity, &trust);
    let (conn, on_standby) = dial(&target.identity, &trust, addr).await.unwrap();
    assert_eq!(
        (on_standby.peer.name.as_str(), on_standby.peer.role),
        ("primary", Role::Source)
    );
    conn.close(0u32.into(), b"bye");
    let (_, on_primary) = server.await.unwrap().unwrap();
    assert_eq!(
        (on_primary.peer.name.as_str(), on_primary.peer.role),
        ("standby", Role::Target)
    );
    let flag = target.flag_key.as_ref().unwrap().verifying_key();
    assert_eq!(on_primary.peer.flag_key, Some(flag));

    // A target to a target, and a source to a source: the role decides nothing here either.
    let (addr, server) = listen(&target.identity, &trust);
    let (conn, _) = dial(&other_target.identity, &trust, addr).await.unwrap();
    conn.close(0u32.into(), b"bye");
    assert_eq!(server.await.unwrap().unwrap().1.peer.name, "standby2");
    let other_source = host(&ca, "primary2", Role::Source);
    let (addr, server) = listen(&other_source.identity, &trust);
    let (conn, _) = dial(&source.identity, &trust, addr).await.unwrap();
    conn.close(0u32.into(), b"bye");
    assert_eq!(server.await.unwrap().unwrap().1.peer.name, "primary");
}

/// A target certificate from before every host got a flag key: made the way the old CA made it
/// (rcgen key, CSR, no flag key in the profile).
fn legacy_target(ca: &Ca, name: &str) -> Identity {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params.serialize_request(&key).unwrap();
    let (cert, _) = ca
        .issue(
            &Csr::from_der(csr.der().to_vec()),
            &CertProfile::new(name, Role::Target, None, 10),
        )
        .unwrap();
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    Identity::from_der(cert, der.into(), ca.certificate().clone()).unwrap()
}

#[tokio::test]
async fn a_peer_without_a_flag_key_is_refused_as_a_pusher_but_may_receive() {
    let (ca, trust) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let old = legacy_target(&ca, "standby");
    assert_eq!(old.info().flag_key, None);

    let (addr, server) = listen(&source.identity, &trust);
    let err = text(dial(&old, &trust, addr).await);
    let want = "`standby` has no flag key in its certificate: it cannot sign generations";
    assert!(err.contains(want), "{err}");
    assert!(err.contains("run `stackclone-certs renew` on it"), "{err}");
    let err = server.await.unwrap().err().unwrap();
    assert!(matches!(err, TrustError::NoFlagKey { .. }), "{err}");
    assert!(err.to_string().contains(want), "{err}");

    // It still receives: the primary pushes to it as before.
    let (addr, server) = listen(&old, &trust);
    let (conn, admitted) = dial(&source.identity, &trust, addr).await.unwrap();
    assert_eq!(admitted.peer.flag_key, None);
    conn.close(0u32.into(), b"bye");
    assert_eq!(server.await.unwrap().unwrap().1.peer.name, "primary");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let (ca, trust) = fleet();
    let target = host(&ca, "standby", Role::Target);
    let (addr, server) = listen(&target.identity, &trust);

    // A well-behaved TLS client that trusts the fleet CA but has no certificate.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.certificate().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![stackclone_proto::msg::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let outcome = async {
        let conn = endpoint.connect(addr, "standby")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"{}").await?;
        send.finish()?;
        recv.read_to_end(1024).await?;
        anyhow::Ok(())
    }
    .await;
    let err = format!("{:#}", outcome.expect_err("refused"));
    assert!(err.contains("peer sent no certificates"), "{err}");
    let err = text(server.await.unwrap());
    assert!(err.contains("peer sent no certificates"), "{err}");
}

#[test]
fn check_expiry_counts_days_left() {
    let (ca, _) = fleet();
    let id = host(&ca, "standby", Role::Target).identity;
    let days = check_expiry(id.info(), OffsetDateTime::now_utc()).unwrap();
    assert!((9..=10).contains(&days), "{days}");
    let later = OffsetDateTime::now_utc() + Duration::days(8);
    assert!(check_expiry(id.info(), later).unwrap() < stackclone_certs::RENEW_WARN_DAYS);
}

/// A client endpoint dials twice, the server's certificate revoked in between. TLS 1.3 session
/// resumption would skip the verifier on the second connection (and the deny list with it):
/// resumption is off, so the second connection is refused.
#[tokio::test]
async fn a_second_connection_from_the_same_endpoint_meets_the_deny_list_again() {
    let (ca, trust) = fleet();
    let source = host(&ca, "primary", Role::Source);
    let target = host(&ca, "standby", Role::Target);
    let server_trust = Trust::new(ca.certificate().clone(), DenyList::empty()).unwrap();
    let endpoint = quinn::Endpoint::server(
        server_config(&target.identity, &server_trust).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let trust = server_trust.clone();
            tokio::spawn(async move {
                if let Ok((conn, _)) = accept(incoming, &trust).await {
                    let _ = conn.closed().await;
                }
            });
        }
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config(&source.identity, &trust).unwrap());
    let (conn, _) = connect(&client, addr, &trust).await.unwrap();
    conn.close(0u32.into(), b"bye");

    let revoked = DenyList::empty()
        .revoke(
            &ca,
            vec![Revocation {
                name: "standby".into(),
                fingerprint: target.identity.info().fingerprint,
                serial: target.identity.info().serial.clone(),
                revoked_at: "2026-01-01T00:00:00Z".into(),
            }],
        )
        .unwrap();
    assert!(trust.adopt(revoked.signed().unwrap()).unwrap());
    let err = text(connect(&client, addr, &trust).await);
    assert!(
        err.contains("certificate for `standby`") && err.contains("revoked"),
        "{err}"
    );
}
