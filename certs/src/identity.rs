//! Host identities: the facts a certificate states (name, role, flag key, validity), read from
//! the certificate, and this host's own certificate and key. The values that name roles,
//! certificates and CAs are [`crate::name`]'s.

use std::fmt;

use ed25519_dalek::VerifyingKey;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::FLAG_KEY_OID;
use crate::error::TrustError;
use crate::name::{CaPin, Fingerprint, Role};

pub(crate) fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| format!("{} (unix)", t.unix_timestamp()))
}

// Reading a certificate is this module's business, so the pin's constructor from one lives here.
impl CaPin {
    /// The pin of a CA certificate (hash of its SubjectPublicKeyInfo).
    pub fn of_certificate(der: &[u8]) -> Result<CaPin, TrustError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TrustError::BadCertificate {
                detail: format!("cannot parse CA certificate: {e}"),
            })?;
        Ok(CaPin::of_spki(cert.tbs_certificate.subject_pki.raw))
    }
}

/// What a fleet certificate says about its holder, read from the peer's certificate after the
/// handshake (or from our own).
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Host name (CN and the only SAN).
    pub name: String,
    /// What the host was enrolled as (OU). Not an authorization: see [`Role`].
    pub role: Role,
    /// SHA-256 of the certificate DER.
    pub fingerprint: Fingerprint,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The host's flag public key, which its generations' flags must verify with. Every
    /// certificate issued since every host got one carries it; `None` only for a target
    /// certificate issued before (it gains one at `renew`).
    pub flag_key: Option<VerifyingKey>,
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &fmt_time(self.not_after))
            .field(
                "flag_key",
                &self.flag_key.map(|k| hex::encode(k.as_bytes())),
            )
            .finish()
    }
}

impl PeerIdentity {
    /// Reads name, role, validity and flag key from a fleet certificate. Does **not** verify it:
    /// call this on certificates a verifier of this crate already accepted.
    pub fn from_certificate(der: &[u8]) -> Result<PeerIdentity, TrustError> {
        let bad = |detail: String| TrustError::BadCertificate { detail };
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad(format!("cannot parse certificate: {e}")))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| bad("certificate has no common name".into()))?
            .to_owned();
        let role = cert
            .subject()
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .ok_or_else(|| bad(format!("certificate for `{name}` has no role (OU)")))?
            .parse::<Role>()
            .map_err(|e| bad(format!("certificate for `{name}`: {e}")))?;
        let mut flag_key = None;
        for ext in cert.extensions() {
            let is_flag = ext
                .oid
                .iter()
                .is_some_and(|arcs| arcs.eq(FLAG_KEY_OID.iter().copied()));
            if is_flag {
                flag_key = Some(decode_flag_extension(ext.value).ok_or_else(|| {
                    bad(format!("certificate for `{name}` has a malformed flag key"))
                })?);
            }
        }
        let validity = cert.validity();
        Ok(PeerIdentity {
            role,
            fingerprint: Fingerprint::of(der),
            serial: hex::encode(cert.raw_serial()),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
            flag_key,
            name,
        })
    }

    /// Refuses a peer whose certificate states another role. The agents do not call it on
    /// their connections (a host acts in both roles, see [`Role`]); it is for tools that mean
    /// the enrolled role.
    pub fn expect_role(&self, expected: Role) -> Result<&Self, TrustError> {
        if self.role == expected {
            Ok(self)
        } else {
            Err(TrustError::WrongRole {
                name: self.name.clone(),
                actual: self.role,
                expected,
            })
        }
    }

    /// Refuses a peer with another name (the TLS layer checks only that the fleet CA signed it).
    pub fn expect_name(&self, expected: &str) -> Result<&Self, TrustError> {
        if self.name == expected {
            Ok(self)
        } else {
            Err(TrustError::WrongPeer {
                actual: self.name.clone(),
                expected: expected.to_owned(),
            })
        }
    }
}

/// Days of validity left at `now` (rounded down), or [`TrustError::CertificateExpired`] /
/// [`TrustError::CertificateNotYetValid`]. Agents call this at start and daily, and warn
/// (log + metric) below [`crate::RENEW_WARN_DAYS`].
pub fn check_expiry(cert: &PeerIdentity, now: OffsetDateTime) -> Result<i64, TrustError> {
    if now >= cert.not_after {
        return Err(TrustError::CertificateExpired {
            name: cert.name.clone(),
            not_after: fmt_time(cert.not_after),
        });
    }
    if now < cert.not_before {
        return Err(TrustError::CertificateNotYetValid {
            name: cert.name.clone(),
            not_before: fmt_time(cert.not_before),
        });
    }
    Ok((cert.not_after - now).whole_days())
}

pub(crate) fn encode_flag_extension(key: &VerifyingKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.extend_from_slice(&[0x04, 0x20]);
    out.extend_from_slice(key.as_bytes());
    out
}

fn decode_flag_extension(value: &[u8]) -> Option<VerifyingKey> {
    let key: &[u8; 32] = value.strip_prefix(&[0x04, 0x20])?.try_into().ok()?;
    VerifyingKey::from_bytes(key).ok()
}

/// This host's identity: its certificate and private key, and the fleet CA certificate.
pub struct Identity {
    info: PeerIdentity,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    ca: CertificateDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .field("key", &"<private>")
            .finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            info: self.info.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl Identity {
    /// Builds an identity from DER parts; refuses a certificate whose public key is not the key's.
    pub fn from_der(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<Identity, TrustError> {
        let info = PeerIdentity::from_certificate(&cert)?;
        let key_pair = rcgen::KeyPair::try_from(&key)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert).map_err(|e| TrustError::BadCertificate {
                detail: format!("cannot parse certificate: {e}"),
            })?;
        if parsed.tbs_certificate.subject_pki.raw
            != rcgen::PublicKeyData::subject_public_key_info(&key_pair).as_slice()
        {
            return Err(TrustError::BadCertificate {
                detail: format!(
                    "certificate for `{}` does not belong to the given private key",
                    info.name
                ),
            });
        }
        Ok(Identity {
            info,
            cert,
            key,
            ca,
        })
    }

    /// Loads `host.crt`, `host.key` (mode-checked) and `ca.crt` from the state directory.
    pub fn load(dir: &crate::StateDir) -> Result<Identity, TrustError> {
        dir.load_identity()
    }

    /// Name, role, fingerprint, validity and flag key of this host's certificate.
    pub fn info(&self) -> &PeerIdentity {
        &self.info
    }
    /// Host name.
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// Role.
    pub fn role(&self) -> Role {
        self.info.role
    }
    /// This host's certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }
    /// The fleet CA certificate (DER).
    pub fn ca_certificate(&self) -> &CertificateDer<'static> {
        &self.ca
    }
    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}
