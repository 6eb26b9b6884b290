//! The one error type of this crate.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::name::{CaPin, Fingerprint, InvalidArgument, Role};

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
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
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
        "refusing to install `{}` without `--ca-pin`: the pin is what proves the bundle's CA is \
         your fleet's (on the CA host, `stackclone-certs show` prints it)",
        file.display()
    )]
    PinRequired { file: PathBuf },
    #[error("token `{id}` may only enroll `{bound}`, not `{name}`")]
    TokenWrongName {
        id: String,
        bound: String,
        name: String,
    },
    #[error(
        "{peer} did not accept the join token: it is unknown, already used, expired, made for \
         another name, or its secret is wrong (the CA host's log says which); check that you \
         pasted the whole token, or create a new one with `stackclone-certs token create`"
    )]
    TokenRejected { peer: SocketAddr },
    #[error(
        "`{name}` already has a live certificate ({fingerprint}, valid until {not_after}); \
         a second host cannot take a name that is in use. To replace that host on purpose, \
         make a token for it: `stackclone-certs token create --name {name} --replace` (or \
         `sign --replace` offline), which revokes the old certificate; or revoke it first with \
         `stackclone-certs revoke {name}`"
    )]
    NameTaken {
        name: String,
        fingerprint: Fingerprint,
        not_after: String,
    },
    #[error(
        "host `{name}` presents flag key {presented}, but this host pinned {pinned} for \
         `{name}`: refusing it, since another host may be using the name. If `{name}` was \
         replaced on purpose, run `stackclone-certs forget-flag-key {name}` here and let it \
         connect again"
    )]
    FlagKeyChanged {
        name: String,
        pinned: String,
        presented: String,
    },
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
    #[error(
        "`{name}` has no flag key in its certificate: it cannot sign generations, so it may not \
         push; run `stackclone-certs renew` on it (a certificate issued to a {role} before every \
         host got a flag key gains one when it is renewed)"
    )]
    NoFlagKey { name: String, role: Role },
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
    #[error("connection with {peer} lost during {phase}: {reason}")]
    ConnectionLost {
        peer: SocketAddr,
        phase: &'static str,
        reason: String,
    },
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
    /// Any failure of the join token itself. The joiner is not told which (unknown id, wrong
    /// secret, used, expired, bound to another name): an answer that differed would tell a
    /// guesser which token ids exist. The CA host's log names the exact reason.
    #[error("token not accepted")]
    TokenRejected,
    /// The request needs a client certificate of this fleet (a deny list fetch, a renewal).
    #[error("not authorised")]
    NotAuthorised,
    #[error("{message}")]
    Other { message: String },
}

impl Refusal {
    /// The local error a joiner reports for this refusal.
    pub fn into_error(self, peer: SocketAddr) -> TrustError {
        match self {
            Refusal::TokenRejected => TrustError::TokenRejected { peer },
            Refusal::Other { message } => TrustError::EnrollRefused {
                peer,
                refusal: Refusal::Other {
                    message: peer_text(&message),
                },
            },
            refusal => TrustError::EnrollRefused { peer, refusal },
        }
    }

    pub(crate) fn from_error(err: &TrustError) -> Refusal {
        match err {
            TrustError::TokenExpired { .. }
            | TrustError::TokenUsed { .. }
            | TrustError::TokenUnknown { .. }
            | TrustError::TokenProofInvalid { .. }
            | TrustError::TokenMalformed
            | TrustError::TokenWrongName { .. } => Refusal::TokenRejected,
            TrustError::NoPeerCertificate => Refusal::NotAuthorised,
            other => Refusal::Other {
                message: other.to_string(),
            },
        }
    }
}

/// Text that came from the peer, escaped for logs and terminals (see `stackclone_proto::text`).
pub(crate) fn peer_text(s: &str) -> String {
    stackclone_proto::text::escape_controls(s).into_owned()
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
