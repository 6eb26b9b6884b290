//! QUIC endpoint configs (TLS 1.3, mutual auth, fleet CA only, deny list on every handshake),
//! the peer's identity after the handshake, and the application-level hello/ack.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use serde::{Deserialize, Serialize};
use stackclone_proto::msg::ALPN;

use crate::deny::{DenyList, SignedDenyList};
use crate::error::{TrustError, peer_text};
use crate::files::StateDir;
use crate::identity::{Identity, PeerIdentity, fmt_time};
use crate::name::{CaPin, Fingerprint};
use crate::pins::{PinCheck, PinStore};

/// Application close code: the peer was refused after the TLS handshake (no flag key, a flag
/// key other than the pinned one, deny list, …).
pub const REFUSED: quinn::VarInt = quinn::VarInt::from_u32(0x5c01);

/// The SNI both agents send; not checked against certificates (the dialer checks the server's
/// name with [`PeerIdentity::expect_name`]; the receiving side goes by the pushing peer's name in
/// each stack's `allow` list).
pub(crate) const SNI: &str = "stackclone";

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_MAX: usize = 1 << 20;

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What this host trusts: the fleet CA alone, minus the certificates on its deny list.
///
/// Cheap to clone; clones share the deny list, so a list adopted through one clone
/// ([`Trust::adopt`], [`hello`], [`admit`]) applies to every endpoint built from any of them, on
/// the next handshake.
#[derive(Clone)]
pub struct Trust {
    inner: Arc<TrustInner>,
}

struct TrustInner {
    ca: CertificateDer<'static>,
    pin: CaPin,
    roots: Arc<RootCertStore>,
    deny: RwLock<DenyList>,
    dir: Option<StateDir>,
    pins: PinStore,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("ca_pin", &self.inner.pin)
            .field("deny_list_version", &self.deny_list().version())
            .finish()
    }
}

impl Trust {
    /// Trust in `ca`, with a deny list; nothing is persisted.
    pub fn new(ca: CertificateDer<'static>, deny: DenyList) -> Result<Trust, TrustError> {
        Self::build(ca, deny, None)
    }

    /// `ca.crt` and `deny.json` from the state directory; deny lists adopted later are written
    /// back there.
    pub fn load(dir: &StateDir) -> Result<Trust, TrustError> {
        let ca = dir.load_ca_cert()?;
        let deny = DenyList::load(dir.root())?;
        Self::build(ca, deny, Some(dir.clone()))
    }

    fn build(
        ca: CertificateDer<'static>,
        deny: DenyList,
        dir: Option<StateDir>,
    ) -> Result<Trust, TrustError> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        Ok(Trust {
            inner: Arc::new(TrustInner {
                pin: CaPin::of_certificate(&ca)?,
                ca,
                roots: Arc::new(roots),
                deny: RwLock::new(deny),
                dir,
                pins: PinStore::default(),
            }),
        })
    }

    /// The fleet CA certificate.
    pub fn ca_certificate(&self) -> &CertificateDer<'static> {
        &self.inner.ca
    }

    /// The fleet CA pin.
    pub fn ca_pin(&self) -> CaPin {
        self.inner.pin
    }

    /// A copy of the deny list in force.
    pub fn deny_list(&self) -> DenyList {
        match self.inner.deny.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Verifies `signed` against the fleet CA and, if it is newer than the list in force,
    /// replaces it (and writes it to `deny.json` when loaded from a directory). Returns whether
    /// it was adopted.
    pub fn adopt(&self, signed: &SignedDenyList) -> Result<bool, TrustError> {
        self.adopt_list(DenyList::verify_signed(signed, &self.inner.ca)?, true)
    }

    /// Re-reads `deny.json` from the state directory this trust was loaded from and adopts it if
    /// newer (without writing). [`accept`], [`connect`] and `serve` call it before every
    /// handshake, so a `stackclone-certs revoke` on the CA host, or an `install` of a new list,
    /// reaches a running agent on its next connection: no restart, no SIGHUP.
    pub fn reload(&self) -> Result<bool, TrustError> {
        let Some(dir) = &self.inner.dir else {
            return Ok(false);
        };
        let Some(signed) = dir.read_json::<SignedDenyList>(&dir.deny_list(), "signed deny list")?
        else {
            return Ok(false);
        };
        self.adopt_list(DenyList::verify_signed(&signed, &self.inner.ca)?, false)
    }

    fn adopt_list(&self, list: DenyList, persist: bool) -> Result<bool, TrustError> {
        let mut current = match self.inner.deny.write() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !list.newer_than(&current) {
            return Ok(false);
        }
        if persist && let Some(dir) = &self.inner.dir {
            list.save(dir)?;
        }
        tracing::info!(
            version = list.version(),
            revoked = list.entries().len(),
            "adopted deny list"
        );
        *current = list;
        Ok(true)
    }

    /// Refuses a certificate on the deny list.
    pub fn check_not_revoked(&self, cert: &[u8]) -> Result<(), TrustError> {
        let fingerprint = Fingerprint::of(cert);
        let deny = self.deny_list();
        if deny.contains(&fingerprint) {
            let name = PeerIdentity::from_certificate(cert)
                .map(|p| p.name)
                .unwrap_or_else(|_| "<unparseable>".into());
            return Err(TrustError::Revoked {
                name,
                fingerprint,
                version: deny.version(),
            });
        }
        Ok(())
    }

    /// Checks a pushing peer's flag key against the pin for its name (see the `pins` module),
    /// pinning it on first use; the same for either role. A peer whose certificate carries no
    /// flag key is refused with [`TrustError::NoFlagKey`]: it could not sign a generation.
    pub fn check_flag_pin(&self, peer: &PeerIdentity) -> Result<(), TrustError> {
        let Some(key) = &peer.flag_key else {
            return Err(TrustError::NoFlagKey {
                name: peer.name.clone(),
                role: peer.role,
            });
        };
        if self
            .inner
            .pins
            .check(self.inner.dir.as_ref(), &peer.name, key)?
            == PinCheck::Pinned
        {
            tracing::info!(peer = %peer.name, role = %peer.role, flag_key = %hex::encode(key.as_bytes()),
                "pinned the flag key of a host seen pushing for the first time");
        }
        Ok(())
    }

    /// Whether the peer whose certificate is `leaf` (already verified against the fleet CA) may
    /// push to this host: not on the deny list in force (which the peer may just have taught
    /// us), and a flag key in its certificate that matches the pin for its name. Its role is not
    /// looked at: which stacks it may push is each stack's `allow` list.
    pub(crate) fn admit_pusher(&self, leaf: &[u8]) -> Result<PeerIdentity, TrustError> {
        // Revocation first: a revoked certificate must not get its flag key pinned.
        self.check_not_revoked(leaf)?;
        let peer = PeerIdentity::from_certificate(leaf)?;
        self.check_flag_pin(&peer)?;
        Ok(peer)
    }

    /// [`Trust::reload`], logging a failure (the list in force stays).
    fn refresh(&self) {
        if let Err(e) = self.reload() {
            tracing::warn!(error = %e, "cannot re-read the deny list; the one in force stays");
        }
    }

    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        self.inner.roots.clone()
    }
}

/// Turns webpki's terse errors into ones that name the certificate and what to do.
fn explain(err: rustls::Error, cert: &[u8]) -> rustls::Error {
    let info = PeerIdentity::from_certificate(cert).ok();
    let name = info
        .as_ref()
        .map_or_else(|| "<unparseable>".to_owned(), |p| p.name.clone());
    let friendly = match (&err, &info) {
        (
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ),
            Some(info),
        ) => TrustError::CertificateExpired {
            name,
            not_after: fmt_time(info.not_after),
        },
        (
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ),
            Some(info),
        ) => TrustError::CertificateNotYetValid {
            name,
            not_before: fmt_time(info.not_before),
        },
        (
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ),
            _,
        ) => TrustError::UnknownCa {
            name,
            detail: err.to_string(),
        },
        _ => return err,
    };
    other(friendly)
}

fn other(err: TrustError) -> rustls::Error {
    rustls::Error::Other(OtherError(Arc::new(err)))
}

/// Verifies a server against the fleet CA and the deny list. The server name is not matched:
/// see [`SNI`].
#[derive(Debug)]
struct FleetServerVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FleetServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| explain(e, end_entity))?;
        self.trust.check_not_revoked(end_entity).map_err(other)?;
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

/// Verifies a client with webpki (fleet CA, clientAuth EKU, validity), then the deny list.
#[derive(Debug)]
struct FleetClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust: Trust,
    mandatory: bool,
}

impl ClientCertVerifier for FleetClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| explain(e, end_entity))?;
        self.trust.check_not_revoked(end_entity).map_err(other)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientAuth {
    Required,
    /// The enrollment service: joiners have no certificate yet, renewals present theirs.
    Optional,
}

pub(crate) fn rustls_server_config(
    identity: &Identity,
    trust: &Trust,
    client_auth: ClientAuth,
    alpn: &[u8],
) -> Result<quinn::ServerConfig, TrustError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(trust.roots(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let verifier = Arc::new(FleetClientVerifier {
        inner,
        trust: trust.clone(),
        mandatory: client_auth == ClientAuth::Required,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![
                identity.certificate().clone(),
                identity.ca_certificate().clone(),
            ],
            identity.private_key(),
        )?;
    // No session resumption: a resumed TLS 1.3 session skips the certificate verifiers, and
    // with them the deny list. Every connection is a full handshake (one per cycle: cheap).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

pub(crate) fn rustls_client_config(
    identity: Option<&Identity>,
    verifier: Arc<dyn ServerCertVerifier>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TrustError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(
            vec![id.certificate().clone(), id.ca_certificate().clone()],
            id.private_key(),
        )?,
        None => builder.with_no_client_auth(),
    };
    // See the server side: a resumed session would not meet the verifier (nor the deny list).
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

pub(crate) fn fleet_server_verifier(trust: &Trust) -> Arc<dyn ServerCertVerifier> {
    Arc::new(FleetServerVerifier {
        trust: trust.clone(),
        provider: provider(),
    })
}

/// The agents' server config: TLS 1.3 only, a fleet client certificate required and checked
/// against the deny list on every handshake, ALPN [`ALPN`].
pub fn server_config(
    identity: &Identity,
    trust: &Trust,
) -> Result<quinn::ServerConfig, TrustError> {
    let mut config = rustls_server_config(identity, trust, ClientAuth::Required, ALPN)?;
    config.transport_config(agent_transport());
    Ok(config)
}

/// How long a connection may go without a packet before it is considered dead.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Keep-alive interval: a cycle can be quiet for a long time (a big signature being computed,
/// a commit under way) while both peers are alive; keep-alives stop the idle timer from firing
/// then, and a peer that really vanished is noticed after [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(4);

/// The environment variable that overrides [`IDLE_TIMEOUT`], in milliseconds (at least 500;
/// the keep-alive becomes a fifth of it). QUIC uses the smaller of both peers' values. For links
/// where 20 s is wrong, and for the fault tests, which cut connections by the dozen.
pub const IDLE_TIMEOUT_ENV: &str = "STACKCLONE_IDLE_TIMEOUT_MS";

/// The idle timeout and keep-alive interval in force: [`IDLE_TIMEOUT`] and [`KEEP_ALIVE`] unless
/// [`IDLE_TIMEOUT_ENV`] holds a number of milliseconds (one that does not parse is logged and
/// the defaults stay).
pub fn idle_timeout() -> (std::time::Duration, std::time::Duration) {
    let Ok(value) = std::env::var(IDLE_TIMEOUT_ENV) else {
        return (IDLE_TIMEOUT, KEEP_ALIVE);
    };
    match value.trim().parse::<u64>() {
        Ok(ms) => {
            let idle = std::time::Duration::from_millis(ms.clamp(500, 600_000));
            (idle, idle / 5)
        }
        Err(e) => {
            tracing::warn!(variable = IDLE_TIMEOUT_ENV, %value, error = %e,
                "not a number of milliseconds; using the default idle timeout");
            (IDLE_TIMEOUT, KEEP_ALIVE)
        }
    }
}

/// What the agents ask the kernel for as their UDP socket's receive and send buffers. Linux's
/// default (208 KiB) overflows while a fast sender's burst waits for a busy receiver: on
/// loopback, with BBR (which does not slow down for loss), a first copy of 256 MiB sent 523 MiB
/// and took 1.85 s; with 4 MiB buffers it sent 263 MiB in 1.38 s (bench/README.md). The kernel
/// caps the request at `net.core.rmem_max` / `wmem_max` (often 208 KiB or 4 MiB): raise those
/// for the full size. A buffer already bigger is left as it is.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// A QUIC endpoint on a UDP socket bound to `addr`, with [`UDP_BUFFER_BYTES`] socket buffers
/// as far as the kernel allows: a server with `server`, else a client only.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    grow_buffers(&socket);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("QUIC needs a Tokio runtime, and none is running"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// Raises the socket's buffers towards [`UDP_BUFFER_BYTES`]; best effort (a smaller buffer
/// only costs speed), and what the kernel granted is logged.
fn grow_buffers(socket: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    if sockopt::socket_recv_buffer_size(socket).is_ok_and(|n| n < UDP_BUFFER_BYTES) {
        let _ = sockopt::set_socket_recv_buffer_size(socket, UDP_BUFFER_BYTES);
    }
    if sockopt::socket_send_buffer_size(socket).is_ok_and(|n| n < UDP_BUFFER_BYTES) {
        let _ = sockopt::set_socket_send_buffer_size(socket, UDP_BUFFER_BYTES);
    }
    tracing::debug!(
        recv = sockopt::socket_recv_buffer_size(socket).unwrap_or(0),
        send = sockopt::socket_send_buffer_size(socket).unwrap_or(0),
        "UDP socket buffers (the kernel reports twice what it grants)"
    );
}

/// Upper bound of QUIC's path-MTU search (UDP payload bytes): a jumbo-frame link (MTU 9000,
/// minus IPv6 and UDP headers). quinn stops at 1452 by default, which keeps every datagram
/// Ethernet-sized even where the path carries more; the search is binary and probes are
/// allowed to be lost, so on a 1500-byte path it ends at 1452 as before.
const MTU_UPPER_BOUND: u16 = 9000 - 40 - 8;

/// The environment variable that picks QUIC's congestion controller: `bbr` (the default) or
/// `cubic`.
pub const CONGESTION_ENV: &str = "STACKCLONE_CONGESTION";

/// QUIC's congestion controller for the agents' connections.
///
/// **BBR by default**, though quinn calls its BBR experimental: on the push bench's WAN link
/// (100 Mbit/s, 40 ms, 0.1 % random loss) Cubic took 35.3 s for 51 MiB where BBR took 5.8 s
/// (4.3 s is the line rate), because Cubic reads every random loss as congestion and halves its
/// window; on the 1 Gbit/s LAN link BBR was as fast or faster (bench/README.md). Its cost:
/// BBR does not back off on loss, so it retransmits more where buffers are shallow (5-30 %
/// more bytes on the LAN link; on loopback, whose socket buffers overflow, twice the bytes),
/// and it takes more than its share of a bottleneck shared with Cubic flows; a stack's
/// `bandwidth_limit` caps that. `STACKCLONE_CONGESTION=cubic` restores Cubic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Congestion {
    Bbr,
    Cubic,
}

fn congestion() -> Congestion {
    match std::env::var(CONGESTION_ENV) {
        Err(_) => Congestion::Bbr,
        Ok(v) if v.trim().eq_ignore_ascii_case("bbr") => Congestion::Bbr,
        Ok(v) if v.trim().eq_ignore_ascii_case("cubic") => Congestion::Cubic,
        Ok(value) => {
            tracing::warn!(variable = CONGESTION_ENV, %value,
                "not a congestion controller (bbr or cubic); using bbr");
            Congestion::Bbr
        }
    }
}

fn agent_transport() -> Arc<quinn::TransportConfig> {
    let (idle, keep_alive) = idle_timeout();
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    match congestion() {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
    }
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).expect("at most 600 s fits a QUIC idle timeout"),
    ));
    Arc::new(t)
}

/// The agents' client config: TLS 1.3 only, presents `identity`, accepts only servers signed by
/// the fleet CA and not on the deny list, ALPN [`ALPN`]. The server *name* is not checked in
/// TLS: call [`hello`], then [`PeerIdentity::expect_name`] with the host you meant to dial.
pub fn client_config(
    identity: &Identity,
    trust: &Trust,
) -> Result<quinn::ClientConfig, TrustError> {
    let mut config = rustls_client_config(Some(identity), fleet_server_verifier(trust), ALPN)?;
    config.transport_config(agent_transport());
    Ok(config)
}

/// The peer's identity, from the certificate it presented in this connection's handshake.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, TrustError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TrustError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TrustError::NoPeerCertificate)?;
    PeerIdentity::from_certificate(leaf)
}

/// rustls's prefix for errors our verifiers return; our messages stand on their own.
const RUSTLS_OTHER: &str = "other error: ";

/// Maps a lost connection to what the person should read: the peer's refusal (its close reason,
/// which carries the TLS verifier's message) or our own handshake failure.
pub(crate) fn connection_error(
    peer: SocketAddr,
    phase: &'static str,
    err: &quinn::ConnectionError,
) -> TrustError {
    use quinn::ConnectionError as E;
    match err {
        // Close reasons are the peer's words: escaped before anyone logs or prints them.
        E::ConnectionClosed(close) => TrustError::Refused {
            peer,
            phase,
            reason: if close.reason.is_empty() {
                close.to_string()
            } else {
                format!(
                    "{} ({})",
                    peer_text(&String::from_utf8_lossy(&close.reason).replace(RUSTLS_OTHER, "")),
                    close.error_code
                )
            },
        },
        E::ApplicationClosed(close) => TrustError::Refused {
            peer,
            phase,
            reason: peer_text(&String::from_utf8_lossy(&close.reason)),
        },
        E::TransportError(e) => TrustError::Handshake {
            peer,
            reason: if e.reason.is_empty() {
                e.to_string()
            } else {
                peer_text(&e.reason.replace(RUSTLS_OTHER, ""))
            },
        },
        // Timed out, reset, closed here: nobody refused anything.
        other => TrustError::ConnectionLost {
            peer,
            phase,
            reason: other.to_string(),
        },
    }
}

pub(crate) fn read_error(
    peer: SocketAddr,
    phase: &'static str,
    err: quinn::ReadToEndError,
) -> TrustError {
    match err {
        quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e)) => {
            connection_error(peer, phase, &e)
        }
        other => TrustError::Protocol {
            peer,
            phase,
            detail: other.to_string(),
        },
    }
}

pub(crate) fn write_error(
    peer: SocketAddr,
    phase: &'static str,
    err: quinn::WriteError,
) -> TrustError {
    match err {
        quinn::WriteError::ConnectionLost(e) => connection_error(peer, phase, &e),
        other => TrustError::Protocol {
            peer,
            phase,
            detail: other.to_string(),
        },
    }
}

/// Sends `msg` as JSON on `send` and finishes the stream.
pub(crate) async fn send_json<T: Serialize>(
    peer: SocketAddr,
    phase: &'static str,
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), TrustError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| TrustError::Protocol {
        peer,
        phase,
        detail: e.to_string(),
    })?;
    send.write_all(&bytes)
        .await
        .map_err(|e| write_error(peer, phase, e))?;
    let _ = send.finish();
    Ok(())
}

/// Reads one JSON message (the whole stream) within a time limit.
pub(crate) async fn recv_json<T: serde::de::DeserializeOwned>(
    peer: SocketAddr,
    phase: &'static str,
    recv: &mut quinn::RecvStream,
) -> Result<T, TrustError> {
    let bytes = tokio::time::timeout(HELLO_TIMEOUT, recv.read_to_end(HELLO_MAX))
        .await
        .map_err(|_| TrustError::Timeout {
            peer,
            phase,
            secs: HELLO_TIMEOUT.as_secs(),
        })?
        .map_err(|e| read_error(peer, phase, e))?;
    serde_json::from_slice(&bytes).map_err(|e| TrustError::Protocol {
        peer,
        phase,
        detail: format!("bad message: {e}"),
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    deny_list_version: u64,
    deny_list: Option<SignedDenyList>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
enum HelloReply {
    Admitted { deny_list: Option<SignedDenyList> },
    Refused { reason: String },
}

/// The outcome of [`hello`] / [`admit`]: who the peer is, and whether it taught us a newer deny
/// list.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The authenticated peer. After [`admit`], its certificate carries a flag key (pinned to
    /// its name); after [`hello`], only its certificate was checked: compare its name.
    pub peer: PeerIdentity,
    /// Whether a newer deny list came from the peer and was adopted.
    pub learned_deny_list: bool,
}

/// Client side of the hello/ack on the connection's first bi stream: offers our deny list, and
/// waits until the server admits or refuses us.
///
/// The server may have either role: a host enrolled as a source receives a stack pushed back to
/// it at fail-back. The caller checks the server's *name* ([`PeerIdentity::expect_name`]).
///
/// With TLS 1.3 client auth, `connect()` can succeed although the server rejected our
/// certificate; that rejection (and a refusal after the handshake) comes back here as
/// [`TrustError::Refused`] with the server's reason.
pub async fn hello(conn: &quinn::Connection, trust: &Trust) -> Result<Admission, TrustError> {
    let addr = conn.remote_address();
    let phase = "hello";
    let peer = peer_identity(conn)?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| connection_error(addr, phase, &e))?;
    let deny = trust.deny_list();
    let msg = Hello {
        deny_list_version: deny.version(),
        deny_list: deny.signed().cloned(),
    };
    send_json(addr, phase, &mut send, &msg).await?;
    match recv_json::<HelloReply>(addr, phase, &mut recv).await? {
        HelloReply::Admitted { deny_list } => {
            let learned = match deny_list {
                Some(signed) => trust.adopt(&signed)?,
                None => false,
            };
            Ok(Admission {
                peer,
                learned_deny_list: learned,
            })
        }
        HelloReply::Refused { reason } => Err(TrustError::Refused {
            peer: addr,
            phase,
            reason: peer_text(&reason),
        }),
    }
}

/// Server side of the hello/ack: reads the client's hello, adopts a newer deny list it carries,
/// and admits the client as a host that will push to us (its certificate was already checked by
/// [`server_config`]'s verifier): not revoked, and its certificate carries a flag key that
/// matches the pin for its name ([`Trust::check_flag_pin`]). A client without a flag key is
/// refused with [`TrustError::NoFlagKey`].
///
/// The client's role is not checked: a host enrolled as a target pushes at fail-back. Which
/// stacks it may push is decided afterwards, per stack, by the stack's `allow` list.
///
/// On refusal the client is told why, the connection is closed with [`REFUSED`], and the error
/// is returned.
pub async fn admit(conn: &quinn::Connection, trust: &Trust) -> Result<Admission, TrustError> {
    let addr = conn.remote_address();
    let phase = "hello";
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| TrustError::Timeout {
            peer: addr,
            phase,
            secs: HELLO_TIMEOUT.as_secs(),
        })?
        .map_err(|e| connection_error(addr, phase, &e))?;
    let hello: Hello = recv_json(addr, phase, &mut recv).await?;
    let verdict = (|| {
        let learned = match &hello.deny_list {
            Some(signed) => trust.adopt(signed)?,
            None => false,
        };
        let certs = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or(TrustError::NoPeerCertificate)?;
        let leaf = certs.first().ok_or(TrustError::NoPeerCertificate)?;
        // The list the client just taught us may name the client itself: checked here again.
        let peer = trust.admit_pusher(leaf)?;
        Ok::<_, TrustError>(Admission {
            peer,
            learned_deny_list: learned,
        })
    })();
    match verdict {
        Ok(admission) => {
            let ours = trust.deny_list();
            let reply = HelloReply::Admitted {
                deny_list: (ours.version() > hello.deny_list_version)
                    .then(|| ours.signed().cloned())
                    .flatten(),
            };
            send_json(addr, phase, &mut send, &reply).await?;
            Ok(admission)
        }
        Err(err) => {
            let reason = err.to_string();
            let reply = HelloReply::Refused {
                reason: reason.clone(),
            };
            if send_json(addr, phase, &mut send, &reply).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            }
            conn.close(REFUSED, reason.as_bytes());
            Err(err)
        }
    }
}

/// Dials `addr` with `endpoint` (whose default client config should come from
/// [`client_config`]) and runs [`hello`]; every failure, including a certificate the server
/// rejected, comes back as a [`TrustError`] that names the reason.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    trust: &Trust,
) -> Result<(quinn::Connection, Admission), TrustError> {
    trust.refresh();
    let connecting = endpoint
        .connect(addr, SNI)
        .map_err(|e| TrustError::Handshake {
            peer: addr,
            reason: e.to_string(),
        })?;
    let conn = connecting
        .await
        .map_err(|e| connection_error(addr, "handshake", &e))?;
    let admission = hello(&conn, trust).await?;
    Ok((conn, admission))
}

/// Completes an incoming connection's handshake and runs [`admit`].
pub async fn accept(
    incoming: quinn::Incoming,
    trust: &Trust,
) -> Result<(quinn::Connection, Admission), TrustError> {
    let addr = incoming.remote_address();
    trust.refresh();
    let conn = incoming
        .await
        .map_err(|e| connection_error(addr, "handshake", &e))?;
    let admission = admit(&conn, trust).await?;
    Ok((conn, admission))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, CertProfile, Revocation, Role};

    /// The agents' UDP sockets get the buffers asked for, as far as the kernel's caps allow
    /// (Linux reports twice what it grants).
    #[test]
    fn agent_sockets_get_big_buffers() {
        let cap = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        grow_buffers(&socket);
        let recv = rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap();
        let send = rustix::net::sockopt::socket_send_buffer_size(&socket).unwrap();
        assert!(recv >= 2 * UDP_BUFFER_BYTES.min(cap("rmem_max")), "{recv}");
        assert!(send >= 2 * UDP_BUFFER_BYTES.min(cap("wmem_max")), "{send}");
    }

    fn fleet() -> (Ca, Trust) {
        let ca = Ca::create("t", 10).unwrap();
        let trust = Trust::new(ca.certificate().clone(), DenyList::empty()).unwrap();
        (ca, trust)
    }

    #[test]
    fn a_pusher_of_either_role_is_admitted_with_its_flag_key() {
        let (ca, trust) = fleet();
        for (name, role) in [("primary", Role::Source), ("standby", Role::Target)] {
            let host = ca.new_host(&CertProfile::new(name, role, None, 5)).unwrap();
            let peer = trust.admit_pusher(host.identity.certificate()).unwrap();
            assert_eq!((peer.name.as_str(), peer.role), (name, role));
            let flag = host.flag_key.as_ref().unwrap().verifying_key();
            assert_eq!(peer.flag_key, Some(flag));
            // Admitted again: the pin matches.
            trust.admit_pusher(host.identity.certificate()).unwrap();
        }
    }

    #[test]
    fn a_pusher_without_a_flag_key_is_refused_and_told_to_renew() {
        let (ca, trust) = fleet();
        let old = ca
            .new_host_without_flag_key("standby", Role::Target)
            .unwrap();
        let err = trust.admit_pusher(old.identity.certificate()).unwrap_err();
        assert!(
            matches!(&err, TrustError::NoFlagKey { name, role: Role::Target } if name == "standby"),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "`standby` has no flag key in its certificate: it cannot sign generations"
            ) && text.contains("run `stackclone-certs renew` on it"),
            "{text}"
        );
    }

    /// A name's flag key is pinned whatever the role: a second certificate for the target name
    /// `standby` with another key is refused, like a source's would be.
    #[test]
    fn a_target_names_flag_key_is_pinned() {
        let (ca, trust) = fleet();
        let standby = ca
            .new_host(&CertProfile::new("standby", Role::Target, None, 5))
            .unwrap();
        trust.admit_pusher(standby.identity.certificate()).unwrap();
        let twin = ca
            .new_host(&CertProfile::new("standby", Role::Target, None, 5))
            .unwrap();
        let err = trust.admit_pusher(twin.identity.certificate()).unwrap_err();
        assert!(matches!(err, TrustError::FlagKeyChanged { .. }), "{err}");
        assert!(err.to_string().contains("host `standby` presents flag key"));
        // A source certificate under that name with yet another key: refused too.
        let as_source = ca
            .new_host(&CertProfile::new("standby", Role::Source, None, 5))
            .unwrap();
        assert!(matches!(
            trust.admit_pusher(as_source.identity.certificate()),
            Err(TrustError::FlagKeyChanged { .. })
        ));
    }

    #[test]
    fn a_revoked_pusher_is_refused_before_its_key_is_pinned() {
        let (ca, trust) = fleet();
        let stolen = ca
            .new_host(&CertProfile::new("laptop", Role::Target, None, 5))
            .unwrap();
        let info = stolen.identity.info();
        let list = DenyList::empty()
            .revoke(
                &ca,
                vec![Revocation {
                    name: "laptop".into(),
                    fingerprint: info.fingerprint,
                    serial: info.serial.clone(),
                    revoked_at: "now".into(),
                }],
            )
            .unwrap();
        assert!(trust.adopt(list.signed().unwrap()).unwrap());
        let err = trust
            .admit_pusher(stolen.identity.certificate())
            .unwrap_err();
        assert!(matches!(err, TrustError::Revoked { .. }), "{err}");
        // Nothing was pinned for it: a new host named `laptop` with its own key is accepted.
        let replacement = ca
            .new_host(&CertProfile::new("laptop", Role::Target, None, 5))
            .unwrap();
        trust
            .admit_pusher(replacement.identity.certificate())
            .unwrap();
    }
}
