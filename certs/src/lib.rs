//! The stackclone fleet PKI: who may talk to whom.
//!
//! This crate owns
//! - the **fleet CA** and **host identities** (rcgen, ECDSA P-256), each key generated on the host
//!   that uses it and never transmitted ([`Ca`], [`HostKey`], [`Identity`]);
//! - the **state directory** and every file in it ([`StateDir`] is the one place that knows the
//!   layout, the modes and the atomic writes; a key file that group or others can read is refused);
//! - every host's ed25519 **flag key** and its binding to the host's certificate;
//! - **join tokens** and the QUIC **enrollment service** (`serve` / `enroll` / `renew`), plus the
//!   offline path (`csr` / `sign` / `install`);
//! - the signed **deny list** (revocation) and its distribution;
//! - the **QUIC endpoint configs** both agents use ([`server_config`], [`client_config`]), the
//!   peer's identity after the handshake ([`peer_identity`]) and the application-level
//!   hello/ack ([`hello`] / [`admit`]);
//! - the **command-line conventions** the three binaries share ([`cli`]: completions, man
//!   pages, [`outln!`]). They live here, in the lowest crate with a binary, so that the PKI
//!   tool needs nothing from the agents' shared crate (and none of Docker, HTTP or metrics).
//!
//! It does **not** decide which stacks a peer may push (that is the receiving host's per-stack
//! `allow` list), speak the sync protocol, or sign flags (the source agent does, with
//! [`load_flag_key`]).
//!
//! # Roles: a host enrolled once acts in both
//!
//! A certificate's role (`source` or `target`) says what the host was enrolled as; it is not an
//! authorization for the direction of a push. Failover promotes a standby to primary, and
//! fail-back has it push the stack back to the old primary (which then runs
//! `stackclone-target` for that stack), with the certificates the two hosts already hold. So:
//!
//! - **every host gets a flag key**: enrolment of a target (`enroll`, `csr`/`sign`/`install`)
//!   makes one exactly as for a source, and the certificate carries it. A target certificate
//!   issued before this gains one at its next renewal (the agents' automatic one, or
//!   `stackclone-certs renew` to get it now); until then it cannot push, and is told so. A source certificate still
//!   cannot be issued without one;
//! - the receiving side ([`admit`]) admits a pushing peer of either role whose certificate
//!   carries a flag key that matches the pin for its name and is not revoked;
//! - the dialing side ([`connect`]) accepts a server of either role; the source agent then
//!   checks that the server's *name* is the target the stack names.
//!
//! It stays strict because authorization goes by names, and names are the CA's: the CA issues
//! one live certificate per name, every stack on a receiving host names who may push it (its
//! `allow` list, unchanged), a source names the one host it pushes each stack to and checks
//! that name, and a flag key is bound to the name by the certificate and pinned per name by
//! every host that accepted it (a different key under a known name is refused). What a host
//! can no longer do is refuse a peer *only* for its enrolled role: a stack's `allow` list that
//! names a host lets it push that stack, whichever role it was enrolled as.
//!
//! # Certificate layout
//!
//! ```text
//! subject  CN = <host name>, OU = <role: "source" | "target">, O = stackclone
//! SAN      DNS:<host name>
//! EKU      clientAuth + serverAuth   (either side may dial; a host acts in both roles, and
//!                                     what it may push is each stack's `allow` list)
//! ext      1.3.6.1.4.1.32473.5301.1  (non-critical, OCTET STRING, 32 bytes): the ed25519 flag
//!          public key; on every certificate (absent only from a target certificate issued
//!          before every host got one). See [`FLAG_KEY_OID`].
//! ```
//!
//! The CA alone decides name, role and flag key: a CSR contributes only its public key.
//!
//! # Enrollment (kubeadm style)
//!
//! A token is `ID.SECRET`. The CA host stores only `blake3::derive_key(SECRET)` next to the ID,
//! role and expiry. The joiner pins the CA by the SHA-256 of its SubjectPublicKeyInfo and checks the
//! pin inside the TLS handshake, before a single application byte is sent. It then sends
//! `ID`, its name, its CSR, its flag public key and a BLAKE3 keyed MAC over all of them *and* the
//! TLS exporter of this very connection (channel binding) — the secret itself never leaves the
//! joining host. Tokens are single-use and expire.
//!
//! # Revocation
//!
//! `revoke NAME` adds the fingerprints (SHA-256 of the DER) of every certificate issued to `NAME`
//! to a [`DenyList`] that the CA signs with its own key, with a version that only grows. Every
//! verifier built by this crate refuses, during the handshake, a peer certificate on the deny list
//! it currently holds. A deny list reaches a host (a) from `serve` in every enrollment/renewal
//! reply, (b) as a file with `install`, (c) from the peer: [`hello`] carries the dialer's signed
//! list and [`admit`] answers with its own if newer, and the side that learns a newer list adopts
//! it at once (it is shared with the verifiers) and persists it. So once the source agent carries
//! the latest list, every target it talks to learns it on the next connection. A process running
//! on the CA host picks up a `revoke` made beside it with [`Trust::reload`] (`serve` reloads on
//! every connection). Revocation does not cut connections already open; the next handshake fails.
//!
//! # Using it from an agent
//!
//! ```no_run
//! # async fn agent() -> Result<(), stackclone_certs::TrustError> {
//! use stackclone_certs::{Identity, StateDir, Trust};
//! let dir = StateDir::new("/etc/stackclone");
//! let identity = Identity::load(&dir)?;   // refuses a key file others can read
//! let trust = Trust::load(&dir)?;         // fleet CA + deny list
//! // receiving side: admits hosts that may push (a flag key pinned to their name)
//! let endpoint = quinn::Endpoint::server(
//!     stackclone_certs::server_config(&identity, &trust)?,
//!     "0.0.0.0:7444".parse().expect("address"),
//! ).expect("bind");
//! while let Some(incoming) = endpoint.accept().await {
//!     let (conn, admission) = stackclone_certs::accept(incoming, &trust).await?;
//!     let flag_key = admission.peer.flag_key; // the one key this peer's flags must verify with
//!     // which stacks `admission.peer.name` may push: each stack's `allow` list
//!     # let _ = (conn, flag_key);
//! }
//! # Ok(()) }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod ca;
pub mod cli;
mod cmd;
mod deny;
mod enroll;
mod error;
mod files;
mod identity;
mod name;
mod pins;
pub mod renewal;
mod tls;
mod token;

pub use ca::{Ca, CertProfile, Csr, HostKey, NewHost};
pub use cmd::{
    CaStatus, HostStatus, Installed, IssuedStatus, Status, TokenStatus, init, install, make_csr,
    renew_local, revoke, show, sign_request, token_create,
};
pub use deny::{DenyList, Revocation, SignedDenyList};
pub use enroll::{
    Bundle, EnrollOptions, EnrollServer, RenewOptions, ServeStats, enroll, fetch_deny_list, renew,
    serve,
};
pub use error::{Refusal, TrustError};
pub use files::{StateDir, load_flag_key, load_trusted_flag_keys};
pub use identity::{Identity, PeerIdentity, check_expiry};
pub use name::{CaPin, Fingerprint, InvalidArgument, Role};
pub use pins::forget_flag_key;
pub use tls::{
    Admission, CONGESTION_ENV, IDLE_TIMEOUT, IDLE_TIMEOUT_ENV, KEEP_ALIVE, REFUSED, Trust,
    UDP_BUFFER_BYTES, accept, admit, client_config, connect, endpoint, hello, idle_timeout,
    peer_identity, server_config,
};
pub use token::{JoinToken, TokenSecret, parse_ttl};

/// ALPN of the enrollment service (`stackclone-certs serve`).
pub const ENROLL_ALPN: &[u8] = b"stackclone-enroll/1";

/// Private X.509 extension carrying a host's ed25519 flag public key (32 bytes, DER OCTET
/// STRING, non-critical so generic TLS stacks ignore it).
///
/// The arc is RFC 5612's documentation enterprise number (32473) until the project registers its
/// own; only stackclone reads it. Changing it means re-issuing every host certificate.
pub const FLAG_KEY_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 5301, 1];

/// Default port of `stackclone-certs serve`.
pub const DEFAULT_ENROLL_PORT: u16 = 7443;

/// Default validity of a host certificate.
pub const DEFAULT_CERT_DAYS: i64 = 90;

/// Agents should warn (log + metric) when fewer days than this remain; see [`check_expiry`].
pub const RENEW_WARN_DAYS: i64 = 30;

/// Default state directory (`--dir`, env `STACKCLONE_DIR`).
pub const DEFAULT_DIR: &str = "/etc/stackclone";
