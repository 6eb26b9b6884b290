//! Revocation: a deny list of certificate fingerprints, signed by the fleet CA, versioned.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::Ca;
use crate::error::TrustError;
use crate::files::StateDir;
use crate::identity::fmt_time;
use crate::name::Fingerprint;

/// Domain separation for the CA's signature over a deny list body.
const SIGNING_CONTEXT: &[u8] = b"stackclone deny list v1\0";

/// A deny list as it travels and is stored: the exact JSON body the CA signed, and the signature
/// (ECDSA P-256/SHA-256, ASN.1, hex). Becomes a [`DenyList`] only through
/// [`DenyList::verify_signed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDenyList {
    /// JSON of the list (version, issue time, entries).
    pub body: String,
    /// Hex signature by the fleet CA over `"stackclone deny list v1\0" || body`.
    pub signature: String,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Host name the certificate was issued to.
    pub name: String,
    /// SHA-256 of the certificate DER.
    pub fingerprint: Fingerprint,
    /// Serial number, hex.
    pub serial: String,
    /// When it was revoked (RFC 3339).
    pub revoked_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    version: u64,
    issued_at: String,
    revoked: Vec<Revocation>,
}

/// A verified deny list. Version 0 is the empty list every host starts with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyList {
    version: u64,
    revoked: Vec<Revocation>,
    signed: Option<SignedDenyList>,
}

impl DenyList {
    /// The empty list (version 0).
    pub fn empty() -> DenyList {
        DenyList::default()
    }

    /// Loads and verifies `<dir>/deny.json` against `<dir>/ca.crt`; the empty list if there is
    /// no file yet.
    pub fn load(dir: &Path) -> Result<DenyList, TrustError> {
        let dir = StateDir::new(dir);
        let Some(signed) = dir.read_json::<SignedDenyList>(&dir.deny_list(), "signed deny list")?
        else {
            return Ok(DenyList::empty());
        };
        let ca = dir.load_ca_cert()?;
        DenyList::verify_signed(&signed, &ca)
    }

    /// Verifies the CA's signature and parses the body.
    pub fn verify_signed(
        signed: &SignedDenyList,
        ca: &CertificateDer<'_>,
    ) -> Result<DenyList, TrustError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(ca).map_err(|e| TrustError::BadCertificate {
                detail: format!("cannot parse CA certificate: {e}"),
            })?;
        let public_key = cert
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .as_ref();
        let signature =
            hex::decode(&signed.signature).map_err(|_| TrustError::DenyListSignature)?;
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(signed.body.as_bytes());
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            public_key,
        )
        .verify(&msg, &signature)
        .map_err(|_| TrustError::DenyListSignature)?;
        let body: Body =
            serde_json::from_str(&signed.body).map_err(|e| TrustError::BadCertificate {
                detail: format!("signed deny list body is not valid JSON: {e}"),
            })?;
        Ok(DenyList {
            version: body.version,
            revoked: body.revoked,
            signed: Some(signed.clone()),
        })
    }

    /// Whether this list supersedes `other` (versions only grow).
    pub fn newer_than(&self, other: &DenyList) -> bool {
        self.version > other.version
    }

    /// Whether the certificate with this fingerprint is revoked.
    pub fn contains(&self, fingerprint: &Fingerprint) -> bool {
        self.revoked.iter().any(|r| &r.fingerprint == fingerprint)
    }

    /// The version (0 = empty, never signed).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The revoked certificates.
    pub fn entries(&self) -> &[Revocation] {
        &self.revoked
    }

    /// The signed form, to carry to peers (`None` for the empty version-0 list).
    pub fn signed(&self) -> Option<&SignedDenyList> {
        self.signed.as_ref()
    }

    /// On the CA host: the next version of this list, with `added` appended, signed by `ca`.
    pub fn revoke(&self, ca: &Ca, added: Vec<Revocation>) -> Result<DenyList, TrustError> {
        let mut revoked = self.revoked.clone();
        for r in added {
            if !revoked.iter().any(|e| e.fingerprint == r.fingerprint) {
                revoked.push(r);
            }
        }
        let body = Body {
            version: self.version + 1,
            issued_at: fmt_time(OffsetDateTime::now_utc()),
            revoked,
        };
        let body = serde_json::to_string(&body).map_err(|e| TrustError::BadCertificate {
            detail: format!("cannot encode deny list: {e}"),
        })?;
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(body.as_bytes());
        let signed = SignedDenyList {
            signature: hex::encode(ca.sign(&msg)?),
            body,
        };
        DenyList::verify_signed(&signed, ca.certificate())
    }

    pub(crate) fn save(&self, dir: &StateDir) -> Result<(), TrustError> {
        match &self.signed {
            Some(signed) => dir.write_json(&dir.deny_list(), signed, false),
            None => Ok(()),
        }
    }
}
