//! The one error type of this crate.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::{CaPin, Fingerprint, Role};

/// Everything that can go wrong while creating, enrolling, loading or checking identities.
///
/// Messages are written for the person at the terminal: they name the file, peer or token, and
/// say what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    #[error("cannot {action} `{}`: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to load key file `{}`: mode {mode:04o} lets group or others read it; \
         run `chmod 600 {}` (and consider the key leaked if others could read it)",
        path.display(), path.display()
    )]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error("`{}` is not a valid {what}: {detail}", path.display())]
    Malformed {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("no {what} in `{}` (looked for `{}`): {hint}", dir.display(), file.display())]
    Missing {
        what: &'static str,
        dir: PathBuf,
        file: PathBuf,
        hint: &'static str,
    },
    #[error("`{}` already holds a fleet CA; refusing to overwrite it", dir.display())]
    AlreadyInitialised { dir: PathBuf },
    #[error(
        "invalid host name `{name}`: {why} (use 1-63 characters of a-z, 0-9, `-` and `.`, \
         starting with a letter or digit)"
    )]
    InvalidName { name: String, why: &'static str },
    #[error("invalid {what} `{value}`: {why}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "token expired at {expires_at}; create a new one on the CA host with `stackclone-certs token create`"
    )]
    TokenExpired { expires_at: String },
    #[error(
        "token already used (`{id}`); tokens are single-use, create a new one with `stackclone-certs token create`"
    )]
    TokenUsed { id: String },
    #[error(
        "unknown token `{id}`: the CA host has no such token; check you pasted the whole `--token` value"
    )]
    TokenUnknown { id: String },
    #[error(
        "the token proof for `{id}` does not verify: wrong token secret, or a man in the middle"
    )]
    TokenProofInvalid { id: String },
    #[error(
        "malformed token: expected `ID.SECRET` (12 and 32 hex digits), as printed by `stackclone-certs token create`"
    )]
    TokenMalformed,
    #[error(
        "CA pin mismatch: the server presented {presented}, expected {expected} — refusing to send the CSR"
    )]
    CaPinMismatch { expected: CaPin, presented: String },
    #[error(
        "certificate for `{name}` expired on {not_after}; renew before expiry, or enroll again with a new token"
    )]
    CertificateExpired { name: String, not_after: String },
    #[error("certificate for `{name}` is not valid before {not_before}; check both hosts' clocks")]
    CertificateNotYetValid { name: String, not_before: String },
    #[error("certificate for `{name}` ({fingerprint}) is revoked (deny list v{version})")]
    Revoked {
        name: String,
        fingerprint: Fingerprint,
        version: u64,
    },
    #[error(
        "certificate for `{name}` is not signed by this fleet's CA ({detail}); was it enrolled with another CA?"
    )]
    UnknownCa { name: String, detail: String },
    #[error("peer `{name}` has role {actual}, expected {expected}")]
    WrongRole {
        name: String,
        actual: Role,
        expected: Role,
    },
    #[error("peer is `{actual}`, expected `{expected}`")]
    WrongPeer { actual: String, expected: String },
    #[error("the peer presented no certificate; both sides must present a fleet certificate")]
    NoPeerCertificate,
    #[error("bad certificate: {detail}")]
    BadCertificate { detail: String },
    #[error("the certificate in `{}` does not belong to the key in `{}`", cert.display(), key.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the deny list signature does not verify against this fleet's CA; refusing it")]
    DenyListSignature,
    #[error("no certificate named `{name}` was issued by this CA; see `stackclone-certs show`")]
    UnknownHost { name: String },
    #[error("refused by {peer} during {phase}: {reason}")]
    Refused {
        peer: SocketAddr,
        phase: &'static str,
        reason: String,
    },
    #[error("handshake with {peer} failed: {reason}")]
    Handshake { peer: SocketAddr, reason: String },
    #[error("cannot resolve `{server}`: {detail}")]
    Resolve { server: String, detail: String },
    #[error("protocol error with {peer} during {phase}: {detail}")]
    Protocol {
        peer: SocketAddr,
        phase: &'static str,
        detail: String,
    },
    #[error("{peer} refused the request: {refusal}")]
    EnrollRefused { peer: SocketAddr, refusal: Refusal },
    #[error("timed out after {secs}s waiting for {peer} during {phase}")]
    Timeout {
        peer: SocketAddr,
        phase: &'static str,
        secs: u64,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("random number generator: {0}")]
    Random(String),
}

/// Why the enrollment service refused a request; travels on the wire, and turns back into the
/// matching [`TrustError`] on the joining host so both sides print the same words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Refusal {
    #[error("token expired at {expires_at}")]
    TokenExpired { expires_at: String },
    #[error("token already used (`{id}`)")]
    TokenUsed { id: String },
    #[error("unknown token `{id}`")]
    TokenUnknown { id: String },
    #[error("token proof for `{id}` does not verify")]
    TokenProofInvalid { id: String },
    #[error("{message}")]
    Other { message: String },
}

impl Refusal {
    /// The local error a joiner reports for this refusal.
    pub fn into_error(self, peer: SocketAddr) -> TrustError {
        match self {
            Refusal::TokenExpired { expires_at } => TrustError::TokenExpired { expires_at },
            Refusal::TokenUsed { id } => TrustError::TokenUsed { id },
            Refusal::TokenUnknown { id } => TrustError::TokenUnknown { id },
            Refusal::TokenProofInvalid { id } => TrustError::TokenProofInvalid { id },
            refusal @ Refusal::Other { .. } => TrustError::EnrollRefused { peer, refusal },
        }
    }

    pub(crate) fn from_error(err: &TrustError) -> Refusal {
        match err {
            TrustError::TokenExpired { expires_at } => Refusal::TokenExpired {
                expires_at: expires_at.clone(),
            },
            TrustError::TokenUsed { id } => Refusal::TokenUsed { id: id.clone() },
            TrustError::TokenUnknown { id } => Refusal::TokenUnknown { id: id.clone() },
            TrustError::TokenProofInvalid { id } => Refusal::TokenProofInvalid { id: id.clone() },
            other => Refusal::Other {
                message: other.to_string(),
            },
        }
    }
}

pub(crate) fn io(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> TrustError {
    let path = path.into();
    move |source| TrustError::Io {
        action,
        path,
        source,
    }
}
