//! The enrollment service (`serve`) and its clients (`enroll`, `renew`).
//!
//! One request per bi stream, JSON, ALPN [`crate::ENROLL_ALPN`]:
//!
//! ```text
//! joiner                                   CA host (serve)
//!   ── TLS 1.3: server cert chain [host, CA] ──►  CA pin checked in the verifier;
//!                                                  a mismatch aborts here, before any stream
//!   Join { token_id, name, csr, flag_key,
//!          proof = MAC_k(id, name, csr, flag_key, TLS exporter) } ──►
//!                                     ◄── Issued { bundle } | Refused { refusal }
//! renewing host (client cert = current one)
//!   Renew { csr, flag_key } ──►        ◄── Issued { bundle } | Refused { refusal }
//! ```
//!
//! A renewal keeps the name, the role and the flag key. A certificate that carries no flag key
//! (a target enrolled before every host got one) gains the one the renewing host sends. An
//! older client sends no `flag_key`; the field is optional on the wire for it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{Ca, CertProfile, Csr, HostKey, validate_name};
use crate::deny::{DenyList, Revocation, SignedDenyList};
use crate::error::{Refusal, TrustError};
use crate::files::{StateDir, generate_flag_key};
use crate::identity::{Identity, PeerIdentity, fmt_time};
use crate::name::{CaPin, Fingerprint, Role};
use crate::tls::{
    ClientAuth, SNI, Trust, connection_error, fleet_server_verifier, provider, recv_json,
    rustls_client_config, rustls_server_config, send_json,
};
use crate::token::{EXPORTER_LABEL, TokenSecret, TokenStore, proof};
use crate::{DEFAULT_CERT_DAYS, ENROLL_ALPN};

/// Everything a host receives when it is issued a certificate; also the file `sign` writes and
/// `install` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    /// Host name in the certificate.
    pub name: String,
    /// Role in the certificate.
    pub role: Role,
    /// The host certificate, PEM.
    pub certificate: String,
    /// The fleet CA certificate, PEM.
    pub ca: String,
    /// Flag public keys (hex) of the fleet's hosts with a live certificate, by name: the pins
    /// the receiving host starts from (see the `pins` module).
    pub flag_keys: BTreeMap<String, String>,
    /// The CA's newest deny list.
    pub deny_list: Option<SignedDenyList>,
}

impl Bundle {
    /// Checks the bundle against the key (and flag key) this host made, and writes the identity.
    pub(crate) fn install(
        &self,
        dir: &StateDir,
        key: &HostKey,
        flag: Option<&SigningKey>,
        expected_pin: Option<CaPin>,
    ) -> Result<Identity, TrustError> {
        let bad = |detail: String| TrustError::BadCertificate { detail };
        let ca = CertificateDer::from_pem_slice(self.ca.as_bytes())
            .map_err(|e| bad(format!("bundle CA certificate: {e}")))?;
        let pin = CaPin::of_certificate(&ca)?;
        if let Some(expected) = expected_pin
            && pin != expected
        {
            return Err(TrustError::CaPinMismatch {
                expected,
                presented: pin.to_string(),
            });
        }
        let cert = CertificateDer::from_pem_slice(self.certificate.as_bytes())
            .map_err(|e| bad(format!("bundle certificate: {e}")))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let parsed = ParsedCertificate::try_from(&cert)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| {
            bad(format!(
                "issued certificate does not verify against its CA: {e}"
            ))
        })?;
        let identity = Identity::from_der(cert, key.private_key_der(), ca.clone())?;
        let flag_to_keep = match (identity.role(), &identity.info().flag_key, flag) {
            (_, Some(in_cert), Some(ours)) if *in_cert == ours.verifying_key() => Some(ours),
            (Role::Source, _, _) | (_, Some(_), _) => {
                return Err(bad(format!(
                    "{} certificate for `{}` does not carry this host's flag key",
                    identity.role(),
                    identity.name()
                )));
            }
            // A target certificate from a CA that predates flag keys for every host: installed
            // as it is; this host cannot push until a renewal by a newer CA gives it one.
            (Role::Target, None, _) => None,
        };
        let deny = match &self.deny_list {
            Some(signed) => Some(DenyList::verify_signed(signed, &ca)?),
            None => None,
        };
        dir.create()?;
        dir.write_secret(&dir.host_key(), key.to_pem().as_bytes())?;
        if let Some(flag) = flag_to_keep {
            dir.write_seed(&dir.flag_key(), flag)?;
        }
        dir.write_public(&dir.ca_cert(), self.ca.as_bytes())?;
        dir.write_public(&dir.host_cert(), self.certificate.as_bytes())?;
        dir.write_json(&dir.flag_keys(), &self.flag_keys, false)?;
        if let Some(deny) = deny {
            let current = DenyList::load(dir.root()).unwrap_or_default();
            if deny.newer_than(&current) {
                deny.save(dir)?;
            }
        }
        Ok(identity)
    }
}

/// One certificate the CA issued (`issued.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IssuedRecord {
    pub name: String,
    pub role: Role,
    pub fingerprint: Fingerprint,
    pub serial: String,
    pub not_after: String,
    pub issued_at: String,
    pub flag_key: Option<String>,
    /// `init`, `enroll`, `renew` or `sign`.
    pub via: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct IssuedStore {
    pub certs: Vec<IssuedRecord>,
}

impl IssuedStore {
    pub fn load(dir: &StateDir) -> Result<IssuedStore, TrustError> {
        Ok(dir
            .read_json(&dir.issued(), "register of issued certificates")?
            .unwrap_or_default())
    }
    pub fn save(&self, dir: &StateDir) -> Result<(), TrustError> {
        dir.write_json(&dir.issued(), self, false)
    }
}

/// What an issuance may do to a name that already has a live certificate (one that has not
/// expired and is not on the deny list).
///
/// Host names are the fleet's identities: the target's `allow` list, the source's
/// `[targets.NAME]` and revocation all go by name. So a name with a live certificate belongs to
/// the host holding it, and only a renewal by that host (which proves it holds the current
/// certificate) or an explicit replacement may get another certificate for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Issuance {
    /// A new host (`init`, `enroll`, `sign`): refused if the name has a live certificate.
    New,
    /// A host that proved it holds the name's current certificate (`renew`).
    Renew,
    /// A replacement (`token create --replace`, `sign --replace`): every live certificate of the
    /// name is put on the deny list once the new one is issued.
    Replace,
}

/// Whether `r` is live at `now` under `deny`.
fn is_live(r: &IssuedRecord, deny: &DenyList, now: OffsetDateTime) -> bool {
    crate::token::parse_time(&r.not_after).is_some_and(|t| t > now)
        && !deny.contains(&r.fingerprint)
}

/// Refuses a new host whose name a live certificate holds (see [`Issuance`]).
pub(crate) fn check_name_free(dir: &StateDir, name: &str) -> Result<(), TrustError> {
    let issued = IssuedStore::load(dir)?;
    let deny = DenyList::load(dir.root())?;
    let now = OffsetDateTime::now_utc();
    match issued
        .certs
        .iter()
        .rev()
        .find(|r| r.name == name && is_live(r, &deny, now))
    {
        Some(live) => Err(TrustError::NameTaken {
            name: name.to_owned(),
            fingerprint: live.fingerprint,
            not_after: live.not_after.clone(),
        }),
        None => Ok(()),
    }
}

/// Issues a certificate on the CA host, records it and builds the bundle for it.
pub(crate) fn issue_bundle(
    dir: &StateDir,
    ca: &Ca,
    csr: &Csr,
    profile: &CertProfile,
    via: &str,
    issuance: Issuance,
) -> Result<(Bundle, IssuedRecord), TrustError> {
    if issuance == Issuance::New {
        check_name_free(dir, &profile.name)?;
    }
    let (cert, cert_pem) = ca.issue(csr, profile)?;
    let info = PeerIdentity::from_certificate(&cert)?;
    let record = IssuedRecord {
        name: info.name.clone(),
        role: info.role,
        fingerprint: info.fingerprint,
        serial: info.serial.clone(),
        not_after: fmt_time(info.not_after),
        issued_at: fmt_time(OffsetDateTime::now_utc()),
        flag_key: info.flag_key.map(|k| hex::encode(k.as_bytes())),
        via: via.to_owned(),
    };
    let mut issued = IssuedStore::load(dir)?;
    let now = OffsetDateTime::now_utc();
    let mut deny = DenyList::load(dir.root())?;
    // The replaced certificates, revoked only once their successor exists and is recorded.
    let replaced: Vec<Revocation> = match issuance {
        Issuance::Replace => issued
            .certs
            .iter()
            .filter(|r| r.name == record.name && is_live(r, &deny, now))
            .map(|r| Revocation {
                name: r.name.clone(),
                fingerprint: r.fingerprint,
                serial: r.serial.clone(),
                revoked_at: fmt_time(now),
            })
            .collect(),
        Issuance::New | Issuance::Renew => Vec::new(),
    };
    issued.certs.push(record.clone());
    issued.save(dir)?;
    if !replaced.is_empty() {
        tracing::info!(name = %record.name, revoked = replaced.len(), "replaced host: its earlier certificates are revoked");
        deny = deny.revoke(ca, replaced)?;
        deny.save(dir)?;
    }
    // Every role: a target may push too (fail-back), and its flag key is pinned like a source's.
    let mut flag_keys = BTreeMap::new();
    for r in &issued.certs {
        if let (Some(k), true) = (&r.flag_key, is_live(r, &deny, now)) {
            flag_keys.insert(r.name.clone(), k.clone());
        }
    }
    let bundle = Bundle {
        name: info.name,
        role: info.role,
        certificate: cert_pem,
        ca: ca.certificate_pem().to_owned(),
        flag_keys,
        deny_list: deny.signed().cloned(),
    };
    Ok((bundle, record))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
enum Request {
    Join {
        token_id: String,
        name: String,
        /// CSR DER, hex.
        csr: String,
        /// Flag public key, hex.
        flag_key: Option<String>,
        /// BLAKE3 keyed MAC, hex.
        proof: String,
    },
    Renew {
        csr: String,
        /// Flag public key, hex: the one the current certificate carries, or the one a
        /// certificate without any should gain. Absent from older clients.
        #[serde(default)]
        flag_key: Option<String>,
    },
    DenyList,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Issued { bundle: Bundle },
    DenyList { deny_list: Option<SignedDenyList> },
    Refused { refusal: Refusal },
}

/// Counters of the enrollment service, for logs and tests.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Handshakes completed.
    pub connections: AtomicU64,
    /// Requests received (any kind).
    pub requests: AtomicU64,
    /// Certificates issued.
    pub issued: AtomicU64,
    /// Requests refused.
    pub refused: AtomicU64,
}

/// The CA host's enrollment service.
#[derive(Debug)]
pub struct EnrollServer {
    dir: StateDir,
    ca: Ca,
    identity: Identity,
    trust: Trust,
    days: i64,
    /// Serialises token and register updates within this process.
    lock: tokio::sync::Mutex<()>,
    stats: Arc<ServeStats>,
}

impl EnrollServer {
    /// Loads the CA, this host's identity and trust from the CA host's state directory.
    pub fn load(dir: &StateDir) -> Result<EnrollServer, TrustError> {
        Ok(EnrollServer {
            ca: Ca::load(dir)?,
            identity: Identity::load(dir)?,
            trust: Trust::load(dir)?,
            dir: dir.clone(),
            days: DEFAULT_CERT_DAYS,
            lock: tokio::sync::Mutex::new(()),
            stats: Arc::default(),
        })
    }

    /// Validity of the certificates it issues.
    pub fn with_days(mut self, days: i64) -> Self {
        self.days = days;
        self
    }

    /// Counters.
    pub fn stats(&self) -> Arc<ServeStats> {
        self.stats.clone()
    }

    /// Binds a QUIC endpoint for the service (port 0 picks a free one).
    pub fn bind(&self, addr: SocketAddr) -> Result<quinn::Endpoint, TrustError> {
        let config = rustls_server_config(
            &self.identity,
            &self.trust,
            ClientAuth::Optional,
            ENROLL_ALPN,
        )?;
        quinn::Endpoint::server(config, addr).map_err(|source| TrustError::Io {
            action: "bind UDP socket",
            path: addr.to_string().into(),
            source,
        })
    }

    async fn handle(&self, conn: &quinn::Connection, request: Request) -> Reply {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let peer = conn.remote_address();
        let result = match request {
            Request::Join {
                token_id,
                name,
                csr,
                flag_key,
                proof,
            } => {
                self.join(conn, &token_id, &name, &csr, flag_key.as_deref(), &proof)
                    .await
            }
            Request::Renew { csr, flag_key } => self.renew(conn, &csr, flag_key.as_deref()).await,
            // Only a fleet member (its certificate checked, and not revoked, by the verifier)
            // may read who is revoked.
            Request::DenyList => match crate::tls::peer_identity(conn) {
                Ok(_) => {
                    return Reply::DenyList {
                        deny_list: DenyList::load(self.dir.root())
                            .ok()
                            .and_then(|d| d.signed().cloned()),
                    };
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok((bundle, record)) => {
                self.stats.issued.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, name = %record.name, role = %record.role, fingerprint = %record.fingerprint, via = %record.via, "issued certificate");
                Reply::Issued { bundle }
            }
            Err(err) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                // The error may quote what the peer sent (a name, say).
                let error = crate::error::peer_text(&err.to_string());
                tracing::warn!(%peer, %error, "refused request");
                Reply::Refused {
                    refusal: Refusal::from_error(&err),
                }
            }
        }
    }

    async fn join(
        &self,
        conn: &quinn::Connection,
        token_id: &str,
        name: &str,
        csr_hex: &str,
        flag_hex: Option<&str>,
        proof_hex: &str,
    ) -> Result<(Bundle, IssuedRecord), TrustError> {
        // The id is the peer's string and goes into the log: only the shape a token id has.
        if token_id.len() != 12 || !token_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TrustError::TokenMalformed);
        }
        validate_name(name)?;
        let csr = hex::decode(csr_hex).map_err(|_| TrustError::BadCertificate {
            detail: "CSR is not hex".into(),
        })?;
        let flag_key = flag_hex.map(parse_flag_key).transpose()?;
        let given =
            blake3::Hash::from_hex(proof_hex).map_err(|_| TrustError::TokenProofInvalid {
                id: token_id.to_owned(),
            })?;
        let binding = channel_binding(conn)?;
        let _guard = self.lock.lock().await;
        let mut tokens = TokenStore::load(&self.dir)?;
        let redeemed = tokens.redeem(token_id, name, OffsetDateTime::now_utc(), |key| {
            // blake3::Hash equality is constant-time.
            proof(
                key,
                token_id,
                name,
                &csr,
                flag_key.as_ref().map(VerifyingKey::as_bytes),
                &binding,
            ) == given
        })?;
        let profile = CertProfile::new(name, redeemed.role, flag_key, self.days);
        let issuance = if redeemed.replace {
            Issuance::Replace
        } else {
            Issuance::New
        };
        let issued = issue_bundle(
            &self.dir,
            &self.ca,
            &Csr::from_der(csr),
            &profile,
            "enroll",
            issuance,
        )?;
        // Persisted only once the certificate exists; a token is spent by a successful join.
        tokens.save(&self.dir)?;
        Ok(issued)
    }

    async fn renew(
        &self,
        conn: &quinn::Connection,
        csr_hex: &str,
        flag_hex: Option<&str>,
    ) -> Result<(Bundle, IssuedRecord), TrustError> {
        // The TLS verifier already checked the chain, validity and the deny list.
        let current = crate::tls::peer_identity(conn)?;
        if let Some(leaf) = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().cloned())
        {
            self.trust.check_not_revoked(&leaf)?;
        }
        let csr = hex::decode(csr_hex).map_err(|_| TrustError::BadCertificate {
            detail: "CSR is not hex".into(),
        })?;
        let offered = flag_hex.map(parse_flag_key).transpose()?;
        // A renewal keeps the flag key (pins depend on it); a certificate without one gains the
        // key its holder, proven by the TLS handshake, sends.
        let flag_key = match (current.flag_key, offered) {
            (Some(kept), Some(offered)) if kept != offered => {
                return Err(TrustError::BadCertificate {
                    detail: format!(
                        "`{}` asked to renew with another flag key than its certificate \
                         carries; a renewal keeps the flag key",
                        current.name
                    ),
                });
            }
            (Some(kept), _) => Some(kept),
            (None, offered) => offered,
        };
        let profile = CertProfile::new(&current.name, current.role, flag_key, self.days);
        let _guard = self.lock.lock().await;
        issue_bundle(
            &self.dir,
            &self.ca,
            &Csr::from_der(csr),
            &profile,
            "renew",
            Issuance::Renew,
        )
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let peer = incoming.remote_address();
        // `revoke` may have run beside us: the handshake below must already know.
        if let Err(e) = self.trust.reload() {
            tracing::warn!(error = %e, "cannot reload the deny list");
        }
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "enrollment handshake failed");
                return;
            }
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let request = match recv_json::<Request>(peer, "enrollment", &mut recv).await {
                Ok(r) => r,
                Err(e) => {
                    let error = crate::error::peer_text(&e.to_string());
                    tracing::warn!(%peer, %error, "bad enrollment request");
                    break;
                }
            };
            let reply = self.handle(&conn, request).await;
            if send_json(peer, "enrollment", &mut send, &reply)
                .await
                .is_ok()
            {
                let _ = send.stopped().await;
            }
        }
    }
}

/// Runs the enrollment service on `endpoint` until `shutdown` resolves.
pub async fn serve(
    server: Arc<EnrollServer>,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TrustError> {
    tokio::pin!(shutdown);
    if let Ok(addr) = endpoint.local_addr() {
        tracing::info!(%addr, ca_pin = %server.ca.pin(), "enrollment service listening");
    }
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(server.clone().connection(incoming));
                }
                None => break,
            },
        }
    }
    endpoint.close(0u32.into(), b"shutting down");
    Ok(())
}

fn parse_flag_key(hex_key: &str) -> Result<VerifyingKey, TrustError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes)
        .ok()
        .and_then(|()| VerifyingKey::from_bytes(&bytes).ok())
        .ok_or_else(|| TrustError::BadCertificate {
            detail: "flag key is not a valid ed25519 public key".into(),
        })
}

fn channel_binding(conn: &quinn::Connection) -> Result<[u8; 32], TrustError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| TrustError::Protocol {
            peer: conn.remote_address(),
            phase: "enrollment",
            detail: "TLS exporter unavailable".into(),
        })?;
    Ok(out)
}

/// Accepts the server only if its chain carries the pinned CA and the server certificate
/// verifies against it. Remembers what it saw, so a mismatch is reported as such.
#[derive(Debug)]
struct PinVerifier {
    pin: CaPin,
    provider: Arc<CryptoProvider>,
    mismatch: Mutex<Option<String>>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = intermediates
            .iter()
            .chain(std::iter::once(end_entity))
            .find(|c| CaPin::of_certificate(c).ok() == Some(self.pin));
        let Some(ca) = pinned else {
            let presented = intermediates
                .last()
                .or(Some(end_entity))
                .and_then(|c| CaPin::of_certificate(c).ok())
                .map_or_else(
                    || "no parseable CA certificate".to_owned(),
                    |p| p.to_string(),
                );
            if let Ok(mut slot) = self.mismatch.lock() {
                *slot = Some(presented.clone());
            }
            return Err(rustls::Error::Other(OtherError(Arc::new(
                TrustError::CaPinMismatch {
                    expected: self.pin,
                    presented,
                },
            ))));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn resolve(server: &str) -> Result<SocketAddr, TrustError> {
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| TrustError::Resolve {
            server: server.to_owned(),
            detail: e.to_string(),
        })?
        .next()
        .ok_or_else(|| TrustError::Resolve {
            server: server.to_owned(),
            detail: "no address".into(),
        })
}

fn client_endpoint(
    peer: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, TrustError> {
    let local: SocketAddr = if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(local).map_err(|source| TrustError::Io {
        action: "bind UDP socket",
        path: local.to_string().into(),
        source,
    })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// One request/reply exchange with the enrollment service.
async fn exchange(conn: &quinn::Connection, request: &Request) -> Result<Reply, TrustError> {
    let peer = conn.remote_address();
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| connection_error(peer, "enrollment", &e))?;
    send_json(peer, "enrollment", &mut send, request).await?;
    recv_json(peer, "enrollment", &mut recv).await
}

async fn finish(conn: quinn::Connection, endpoint: quinn::Endpoint) {
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// What `enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// Where to write the identity.
    pub dir: StateDir,
    /// This host's name.
    pub name: String,
    /// `HOST:PORT` of `stackclone-certs serve`.
    pub server: String,
    /// The join token.
    pub token: TokenSecret,
    /// The CA pin printed by `token create`.
    pub ca_pin: CaPin,
}

/// Joins the fleet: makes this host's key (and flag key) here, checks the server's CA against
/// the pin inside the handshake, proves the token without sending it, and installs the
/// certificate, CA, flag keys and deny list it receives. Nothing is written unless it succeeds.
pub async fn enroll(opts: &EnrollOptions) -> Result<Identity, TrustError> {
    validate_name(&opts.name)?;
    let addr = resolve(&opts.server).await?;
    let key = HostKey::generate()?;
    let flag = generate_flag_key()?;
    let csr = key.csr(&opts.name)?;
    let verifier = Arc::new(PinVerifier {
        pin: opts.ca_pin,
        provider: provider(),
        mismatch: Mutex::new(None),
    });
    let config = rustls_client_config(None, verifier.clone(), ENROLL_ALPN)?;
    let endpoint = client_endpoint(addr, config)?;
    let connecting = endpoint
        .connect(addr, SNI)
        .map_err(|e| TrustError::Handshake {
            peer: addr,
            reason: e.to_string(),
        })?;
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(e) => {
            let presented = verifier.mismatch.lock().ok().and_then(|m| m.clone());
            return Err(match presented {
                Some(presented) => TrustError::CaPinMismatch {
                    expected: opts.ca_pin,
                    presented,
                },
                None => connection_error(addr, "handshake", &e),
            });
        }
    };
    let binding = channel_binding(&conn)?;
    let flag_public = flag.verifying_key();
    let request = Request::Join {
        token_id: opts.token.id().to_owned(),
        name: opts.name.clone(),
        csr: hex::encode(csr.der()),
        flag_key: Some(hex::encode(flag_public.as_bytes())),
        proof: proof(
            &opts.token.key(),
            opts.token.id(),
            &opts.name,
            csr.der(),
            Some(flag_public.as_bytes()),
            &binding,
        )
        .to_hex()
        .to_string(),
    };
    let reply = exchange(&conn, &request).await;
    finish(conn, endpoint).await;
    match reply? {
        Reply::Issued { bundle } => {
            let identity = bundle.install(&opts.dir, &key, Some(&flag), Some(opts.ca_pin))?;
            opts.dir
                .write_public(&opts.dir.server(), format!("{}\n", opts.server).as_bytes())?;
            Ok(identity)
        }
        Reply::Refused { refusal } => Err(refusal.into_error(addr)),
        Reply::DenyList { .. } => Err(TrustError::Protocol {
            peer: addr,
            phase: "enrollment",
            detail: "unexpected reply to a join request".into(),
        }),
    }
}

/// What `renew` needs.
#[derive(Debug, Clone)]
pub struct RenewOptions {
    /// This host's state directory.
    pub dir: StateDir,
    /// `HOST:PORT` of the CA's `serve`; defaults to the one `enroll` remembered.
    pub server: Option<String>,
}

/// Renews this host's certificate over mutual TLS with its current one (so only before it
/// expires or is revoked), with a fresh key made here. Name, role and flag key stay; a
/// certificate without a flag key (a target enrolled before every host got one) gains one,
/// made here (or the one already in `flag.key`).
pub async fn renew(opts: &RenewOptions) -> Result<Identity, TrustError> {
    let dir = &opts.dir;
    let server = match &opts.server {
        Some(s) => s.clone(),
        None => dir
            .read_optional(&dir.server())?
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .ok_or_else(|| TrustError::Missing {
                what: "enrollment server address",
                dir: dir.root().to_owned(),
                file: dir.server(),
                hint: "pass --server HOST:PORT",
            })?,
    };
    let identity = Identity::load(dir)?;
    crate::identity::check_expiry(identity.info(), OffsetDateTime::now_utc())?;
    let trust = Trust::load(dir)?;
    let flag = crate::files::flag_key_for_renewal(dir, identity.info())?;
    let addr = resolve(&server).await?;
    let key = HostKey::generate()?;
    let csr = key.csr(identity.name())?;
    let config = rustls_client_config(Some(&identity), fleet_server_verifier(&trust), ENROLL_ALPN)?;
    let endpoint = client_endpoint(addr, config)?;
    let connecting = endpoint
        .connect(addr, SNI)
        .map_err(|e| TrustError::Handshake {
            peer: addr,
            reason: e.to_string(),
        })?;
    let conn = connecting
        .await
        .map_err(|e| connection_error(addr, "handshake", &e))?;
    let reply = exchange(
        &conn,
        &Request::Renew {
            csr: hex::encode(csr.der()),
            flag_key: Some(hex::encode(flag.verifying_key().as_bytes())),
        },
    )
    .await;
    finish(conn, endpoint).await;
    match reply? {
        Reply::Issued { bundle } => bundle.install(dir, &key, Some(&flag), Some(trust.ca_pin())),
        Reply::Refused { refusal } => Err(refusal.into_error(addr)),
        Reply::DenyList { .. } => Err(TrustError::Protocol {
            peer: addr,
            phase: "renewal",
            detail: "unexpected reply to a renew request".into(),
        }),
    }
}

/// Fetches the CA's newest deny list over mutual TLS and adopts it if newer.
pub async fn fetch_deny_list(dir: &StateDir, server: &str) -> Result<bool, TrustError> {
    let identity = Identity::load(dir)?;
    let trust = Trust::load(dir)?;
    let addr = resolve(server).await?;
    let config = rustls_client_config(Some(&identity), fleet_server_verifier(&trust), ENROLL_ALPN)?;
    let endpoint = client_endpoint(addr, config)?;
    let conn = endpoint
        .connect(addr, SNI)
        .map_err(|e| TrustError::Handshake {
            peer: addr,
            reason: e.to_string(),
        })?
        .await
        .map_err(|e| connection_error(addr, "handshake", &e))?;
    let reply = exchange(&conn, &Request::DenyList).await;
    finish(conn, endpoint).await;
    match reply? {
        Reply::DenyList {
            deny_list: Some(signed),
        } => trust.adopt(&signed),
        Reply::DenyList { deny_list: None } => Ok(false),
        Reply::Refused { refusal } => Err(refusal.into_error(addr)),
        Reply::Issued { .. } => Err(TrustError::Protocol {
            peer: addr,
            phase: "deny list",
            detail: "unexpected reply".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running `serve` on 127.0.0.1 for a fresh fleet, and a client with no certificate that
    /// pins its CA (what a joiner has).
    async fn serve_and_anonymous_client() -> (tempfile::TempDir, SocketAddr, quinn::Connection) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("ca"));
        crate::init(&dir, "primary", 30).unwrap();
        let server = Arc::new(EnrollServer::load(&dir).unwrap());
        let endpoint = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        tokio::spawn(serve(server, endpoint, std::future::pending()));
        let verifier = Arc::new(PinVerifier {
            pin: Ca::load(&dir).unwrap().pin(),
            provider: provider(),
            mismatch: Mutex::new(None),
        });
        let config = rustls_client_config(None, verifier, ENROLL_ALPN).unwrap();
        let client = client_endpoint(addr, config).unwrap();
        let conn = client.connect(addr, SNI).unwrap().await.unwrap();
        (tmp, addr, conn)
    }

    /// A running `serve` for a fresh fleet whose CA host is `primary`: the CA dir and address.
    fn serve_fleet(tmp: &tempfile::TempDir) -> (StateDir, SocketAddr) {
        let dir = StateDir::new(tmp.path().join("ca"));
        crate::init(&dir, "primary", 30).unwrap();
        let server = Arc::new(EnrollServer::load(&dir).unwrap());
        let endpoint = server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        tokio::spawn(serve(server, endpoint, std::future::pending()));
        (dir, addr)
    }

    /// `standby`, enrolled as a target the way the CA did before every host got a flag key:
    /// recorded on the CA host, installed in `<tmp>/standby`, no flag key anywhere.
    fn old_target(tmp: &tempfile::TempDir, ca_dir: &StateDir) -> StateDir {
        let ca = Ca::load(ca_dir).unwrap();
        let dir = StateDir::new(tmp.path().join("standby"));
        let key = HostKey::generate().unwrap();
        let profile = CertProfile::new("standby", Role::Target, None, 30);
        let (bundle, _) = issue_bundle(
            ca_dir,
            &ca,
            &key.csr("standby").unwrap(),
            &profile,
            "enroll",
            Issuance::New,
        )
        .unwrap();
        let old = bundle.install(&dir, &key, None, Some(ca.pin())).unwrap();
        assert_eq!((old.role(), old.info().flag_key), (Role::Target, None));
        assert!(!dir.flag_key().exists());
        dir
    }

    #[tokio::test]
    async fn renewing_a_target_without_a_flag_key_gives_it_one_and_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca_dir, addr) = serve_fleet(&tmp);
        let dir = old_target(&tmp, &ca_dir);
        let opts = RenewOptions {
            dir: dir.clone(),
            server: Some(addr.to_string()),
        };
        let renewed = renew(&opts).await.unwrap();
        let flag = crate::load_flag_key(dir.root()).unwrap().verifying_key();
        assert_eq!(renewed.role(), Role::Target);
        assert_eq!(renewed.info().flag_key, Some(flag));
        assert_eq!(Identity::load(&dir).unwrap().info().flag_key, Some(flag));
        // The CA recorded it, and lists it to hosts that enroll from now on (their pin for it).
        let issued = IssuedStore::load(&ca_dir).unwrap();
        let last = issued.certs.last().unwrap();
        assert_eq!(
            (last.name.as_str(), last.via.as_str(), last.flag_key.clone()),
            ("standby", "renew", Some(hex::encode(flag.as_bytes())))
        );
        let ca = Ca::load(&ca_dir).unwrap();
        let newcomer = HostKey::generate().unwrap();
        let (bundle, _) = issue_bundle(
            &ca_dir,
            &ca,
            &newcomer.csr("third").unwrap(),
            &CertProfile::new("third", Role::Target, Some(flag), 30),
            "enroll",
            Issuance::New,
        )
        .unwrap();
        assert_eq!(bundle.flag_keys["standby"], hex::encode(flag.as_bytes()));
        assert!(bundle.flag_keys.contains_key("primary"));
        // Renewed again: a new certificate, the same flag key (pins survive renewals).
        let again = renew(&opts).await.unwrap();
        assert_ne!(again.info().fingerprint, renewed.info().fingerprint);
        assert_eq!(again.info().flag_key, Some(flag));
        assert_eq!(
            crate::load_flag_key(dir.root()).unwrap().verifying_key(),
            flag
        );
    }

    /// A renewal of the identity in `dir`, sent by hand with `flag_key` (`None`: what an older
    /// client sends): the bundle and the key it certifies, or the refusal.
    async fn renew_request(
        addr: SocketAddr,
        dir: &StateDir,
        flag_key: Option<VerifyingKey>,
    ) -> Result<(Bundle, HostKey, PeerIdentity), String> {
        let identity = Identity::load(dir).unwrap();
        let trust = Trust::load(dir).unwrap();
        let config =
            rustls_client_config(Some(&identity), fleet_server_verifier(&trust), ENROLL_ALPN)
                .unwrap();
        let endpoint = client_endpoint(addr, config).unwrap();
        let conn = endpoint.connect(addr, SNI).unwrap().await.unwrap();
        let key = HostKey::generate().unwrap();
        let request = Request::Renew {
            csr: hex::encode(key.csr(identity.name()).unwrap().der()),
            flag_key: flag_key.map(|k| hex::encode(k.as_bytes())),
        };
        let reply = exchange(&conn, &request).await.unwrap();
        finish(conn, endpoint).await;
        match reply {
            Reply::Issued { bundle } => {
                let cert = CertificateDer::from_pem_slice(bundle.certificate.as_bytes()).unwrap();
                let info = PeerIdentity::from_certificate(&cert).unwrap();
                Ok((bundle, key, info))
            }
            Reply::Refused { refusal } => Err(refusal.to_string()),
            Reply::DenyList { .. } => panic!("a deny list for a renewal"),
        }
    }

    /// What the server does with a renewal's flag key: keeps the one the certificate carries
    /// (an older client sends none), refuses another, and gives the offered one to a certificate
    /// without any.
    #[tokio::test]
    async fn serve_keeps_the_flag_key_a_certificate_carries() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca_dir, addr) = serve_fleet(&tmp);
        let dir = old_target(&tmp, &ca_dir);
        // An older client renewing a certificate without a flag key: it stays without one.
        let (bundle, key, info) = renew_request(addr, &dir, None).await.unwrap();
        assert_eq!(info.flag_key, None);
        bundle.install(&dir, &key, None, None).unwrap();
        // A newer one offers a key: the certificate gains it.
        let ours = generate_flag_key().unwrap();
        let (bundle, key, info) = renew_request(addr, &dir, Some(ours.verifying_key()))
            .await
            .unwrap();
        assert_eq!(info.flag_key, Some(ours.verifying_key()));
        bundle.install(&dir, &key, Some(&ours), None).unwrap();
        // From then on it stays: not offered (an older client), the same key; another, refused.
        let (_, _, info) = renew_request(addr, &dir, None).await.unwrap();
        assert_eq!(info.flag_key, Some(ours.verifying_key()));
        let other = generate_flag_key().unwrap().verifying_key();
        let refused = renew_request(addr, &dir, Some(other))
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            refused.contains("a renewal keeps the flag key"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn the_deny_list_is_not_handed_to_a_client_without_a_certificate() {
        let (tmp, _, conn) = serve_and_anonymous_client().await;
        crate::revoke(&StateDir::new(tmp.path().join("ca")), "primary").unwrap();
        match exchange(&conn, &Request::DenyList).await.unwrap() {
            Reply::Refused { refusal } => assert_eq!(refusal, Refusal::NotAuthorised),
            Reply::DenyList { deny_list } => panic!("handed out {deny_list:?}"),
            Reply::Issued { .. } => panic!("issued"),
        }
    }

    #[tokio::test]
    async fn every_token_failure_gets_the_same_answer() {
        let (tmp, _, conn) = serve_and_anonymous_client().await;
        let dir = StateDir::new(tmp.path().join("ca"));
        let token = crate::token_create(
            &dir,
            Role::Target,
            time::Duration::hours(1),
            "x:1",
            None,
            false,
        )
        .unwrap();
        let real_id = token.token.split_once('.').unwrap().0.to_owned();
        let csr = HostKey::generate().unwrap().csr("standby").unwrap();
        let mut answers = Vec::new();
        // A malformed id (with a newline a log would print), an unknown id, a known id with a
        // wrong proof.
        for id in ["12\ninjected", "0123456789ab", real_id.as_str()] {
            let reply = exchange(
                &conn,
                &Request::Join {
                    token_id: id.to_owned(),
                    name: "standby".into(),
                    csr: hex::encode(csr.der()),
                    flag_key: None,
                    proof: blake3::hash(b"wrong").to_hex().to_string(),
                },
            )
            .await
            .unwrap();
            match reply {
                Reply::Refused { refusal } => answers.push(refusal),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(answers, vec![Refusal::TokenRejected; 3]);
    }
}
