//! The fleet CA, host keys and CSRs (rcgen).

use std::fmt;

use ed25519_dalek::{SigningKey, VerifyingKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use time::{Duration, OffsetDateTime};

use crate::FLAG_KEY_OID;
use crate::error::TrustError;
use crate::files::{StateDir, generate_flag_key};
use crate::identity::{Identity, encode_flag_extension};
use crate::name::{CaPin, Role};

/// Clock skew tolerated between hosts: certificates start this long before they are issued.
const BACKDATE: Duration = Duration::minutes(5);

/// Checks a host name: 1-63 characters of `a-z`, `0-9`, `-`, `.`, starting with a letter or digit.
pub(crate) fn validate_name(name: &str) -> Result<(), TrustError> {
    let bad = |why| {
        Err(TrustError::InvalidName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return bad("length must be 1 to 63");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return bad("only lowercase letters, digits, `-` and `.` are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    Ok(())
}

/// A host's TLS key pair (ECDSA P-256), generated on the host that uses it.
pub struct HostKey {
    pair: KeyPair,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostKey(<private>)")
    }
}

impl HostKey {
    /// A fresh key from the OS RNG.
    pub fn generate() -> Result<HostKey, TrustError> {
        Ok(HostKey {
            pair: KeyPair::generate()?,
        })
    }

    /// A certificate signing request for `name`. The CA takes only the public key from it.
    pub fn csr(&self, name: &str) -> Result<Csr, TrustError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let csr = params.serialize_request(&self.pair)?;
        Ok(Csr {
            der: csr.der().to_vec(),
        })
    }

    pub(crate) fn from_pem(pem: &str) -> Result<HostKey, TrustError> {
        Ok(HostKey {
            pair: KeyPair::from_pem(pem)?,
        })
    }

    pub(crate) fn to_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    pub(crate) fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.pair.serialize_der()).into()
    }
}

/// A PKCS#10 certificate signing request (DER).
#[derive(Clone, PartialEq, Eq)]
pub struct Csr {
    der: Vec<u8>,
}

impl fmt::Debug for Csr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Csr({} bytes)", self.der.len())
    }
}

impl Csr {
    /// Wraps DER bytes (checked when the CA signs).
    pub fn from_der(der: Vec<u8>) -> Csr {
        Csr { der }
    }
    /// Parses a `CERTIFICATE REQUEST` PEM block.
    pub fn from_pem(pem: &str) -> Result<Csr, TrustError> {
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            TrustError::BadCertificate {
                detail: format!("cannot parse CSR PEM: {e}"),
            }
        })?;
        Ok(Csr { der: der.to_vec() })
    }
    /// DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
    /// PEM text.
    pub fn to_pem(&self) -> String {
        pem_block("CERTIFICATE REQUEST", &self.der)
    }
}

/// What the CA writes into a host certificate. The CA decides every field; a CSR contributes
/// only its public key.
#[derive(Debug, Clone)]
pub struct CertProfile {
    /// Host name: CN and the only SAN.
    pub name: String,
    /// Role, in the OU.
    pub role: Role,
    /// Flag public key, put in the certificate for either role; required for a source. Every
    /// enrolment path supplies one; only a renewal requested by an older `stackclone-certs` for
    /// a target certificate that has none comes without it.
    pub flag_key: Option<VerifyingKey>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl CertProfile {
    /// Valid from a few minutes ago (clock skew) for `days` days.
    pub fn new(name: &str, role: Role, flag_key: Option<VerifyingKey>, days: i64) -> CertProfile {
        let now = OffsetDateTime::now_utc();
        CertProfile {
            name: name.to_owned(),
            role,
            flag_key,
            not_before: now - BACKDATE,
            not_after: now + Duration::days(days),
        }
    }
}

/// A host made entirely on the CA host: `init` uses it for the CA host's own identity, and tests
/// use it to make fleets.
#[derive(Debug)]
pub struct NewHost {
    /// Certificate, key and CA certificate.
    pub identity: Identity,
    /// The flag key (every host gets one).
    pub flag_key: Option<SigningKey>,
    pub(crate) key: HostKey,
    pub(crate) cert_pem: String,
}

impl NewHost {
    /// Writes `host.key`, `host.crt`, `ca.crt` and (if it has one) `flag.key` into `dir`, as if
    /// the host had enrolled; for tests and for `init`-like set-ups.
    pub fn save(&self, dir: &StateDir) -> Result<(), TrustError> {
        dir.create()?;
        dir.write_secret(&dir.host_key(), self.key.to_pem().as_bytes())?;
        if let Some(flag) = &self.flag_key {
            dir.write_seed(&dir.flag_key(), flag)?;
        }
        let ca_pem = pem_block("CERTIFICATE", self.identity.ca_certificate());
        dir.write_public(&dir.ca_cert(), ca_pem.as_bytes())?;
        dir.write_public(&dir.host_cert(), self.cert_pem.as_bytes())
    }
}

/// The fleet certificate authority.
pub struct Ca {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    pin: CaPin,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("pin", &self.pin).finish()
    }
}

impl Ca {
    /// A new self-signed CA, valid for `days`; path length 0 (it signs host certificates only).
    pub fn create(fleet: &str, days: i64) -> Result<Ca, TrustError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("stackclone fleet CA ({fleet})"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "stackclone");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(days);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let der = cert.der().clone();
        Ok(Ca {
            pin: CaPin::of_certificate(&der)?,
            cert_pem: cert.pem(),
            cert: der,
            key,
        })
    }

    /// Loads `ca.crt` and `ca.key` (mode-checked).
    pub fn load(dir: &StateDir) -> Result<Ca, TrustError> {
        let hint = "this is not the CA host; run this command where `stackclone-certs init` ran";
        let cert = dir.read_cert(&dir.ca_cert(), "fleet CA certificate", hint)?;
        let key_path = dir.ca_key();
        if !key_path.exists() {
            return Err(TrustError::Missing {
                what: "fleet CA key",
                dir: dir.root().to_owned(),
                file: key_path,
                hint,
            });
        }
        let key_pem = dir.read_secret(&key_path)?;
        let key = KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| {
            TrustError::Malformed {
                path: key_path.clone(),
                what: "PEM private key",
                detail: e.to_string(),
            }
        })?;
        let cert_pem = pem_block("CERTIFICATE", &cert);
        Ok(Ca {
            pin: CaPin::of_certificate(&cert)?,
            cert,
            cert_pem,
            key,
        })
    }

    pub(crate) fn save(&self, dir: &StateDir) -> Result<(), TrustError> {
        dir.write_secret(&dir.ca_key(), self.key.serialize_pem().as_bytes())?;
        dir.write_public(&dir.ca_cert(), self.cert_pem.as_bytes())
    }

    /// The CA certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate (PEM).
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The pin joiners check (`--ca-pin`).
    pub fn pin(&self) -> CaPin {
        self.pin
    }

    /// Signs the public key of `csr` (after checking the CSR's self-signature, i.e. that the
    /// requester holds the key) into a certificate described by `profile`.
    pub fn issue(
        &self,
        csr: &Csr,
        profile: &CertProfile,
    ) -> Result<(CertificateDer<'static>, String), TrustError> {
        validate_name(&profile.name)?;
        let request = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr.der.as_slice()),
        )
        .map_err(|e| TrustError::BadCertificate {
            detail: format!("invalid CSR from `{}`: {e}", profile.name),
        })?;
        let mut params = CertificateParams::new(vec![profile.name.clone()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, profile.name.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, profile.role.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "stackclone");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = profile.not_before;
        params.not_after = profile.not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        match (profile.role, profile.flag_key) {
            (_, Some(flag)) => params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    FLAG_KEY_OID,
                    encode_flag_extension(&flag),
                )),
            (Role::Source, None) => {
                return Err(TrustError::BadCertificate {
                    detail: format!(
                        "source `{}` has no flag key; a source certificate must carry one",
                        profile.name
                    ),
                });
            }
            // Only a renewal asked for by an older client, of a target certificate issued
            // before every host got a flag key: that host cannot push until it has one.
            (Role::Target, None) => {}
        }
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let cert = params.signed_by(&request.public_key, &issuer)?;
        Ok((cert.der().clone(), cert.pem()))
    }

    /// Makes a key, a flag key (for either role: every host gets one) and a certificate in this
    /// process. The profile's `flag_key` is ignored.
    pub fn new_host(&self, profile: &CertProfile) -> Result<NewHost, TrustError> {
        let key = HostKey::generate()?;
        let flag_key = Some(generate_flag_key()?);
        let profile = CertProfile {
            flag_key: flag_key.as_ref().map(SigningKey::verifying_key),
            ..profile.clone()
        };
        let (cert, cert_pem) = self.issue(&key.csr(&profile.name)?, &profile)?;
        let identity = Identity::from_der(cert, key.private_key_der(), self.cert.clone())?;
        Ok(NewHost {
            identity,
            flag_key,
            key,
            cert_pem,
        })
    }

    /// A host as the CA made targets before every host got a flag key: no flag key in the
    /// certificate, none in the directory `save` writes. For tests of old certificates.
    #[cfg(test)]
    pub(crate) fn new_host_without_flag_key(
        &self,
        name: &str,
        role: Role,
    ) -> Result<NewHost, TrustError> {
        let key = HostKey::generate()?;
        let profile = CertProfile::new(name, role, None, 30);
        let (cert, cert_pem) = self.issue(&key.csr(name)?, &profile)?;
        let identity = Identity::from_der(cert, key.private_key_der(), self.cert.clone())?;
        Ok(NewHost {
            identity,
            flag_key: None,
            key,
            cert_pem,
        })
    }

    /// ECDSA P-256 / SHA-256 signature (ASN.1) by the CA key.
    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, TrustError> {
        Ok(rcgen::SigningKey::sign(&self.key, msg)?)
    }
}

fn random_serial() -> Result<SerialNumber, TrustError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| TrustError::Random(e.to_string()))?;
    // A positive INTEGER that DER encodes in 16 bytes: clear the sign bit, avoid a leading zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// PEM-encodes one DER block (64-column base64).
pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_block_round_trips_through_pki_types() {
        for len in [0usize, 1, 2, 3, 4, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let pem = pem_block("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), der.as_slice(), "len {len}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("standby-1.example").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("Upper").is_err());
        assert!(validate_name("-lead").is_err());
        assert!(validate_name("a b").is_err());
    }

    #[test]
    fn every_certificate_carries_role_and_flag_key() {
        let ca = Ca::create("t", 10).unwrap();
        let host = ca
            .new_host(&CertProfile::new("primary", Role::Source, None, 5))
            .unwrap();
        let info = host.identity.info();
        assert_eq!(info.name, "primary");
        assert_eq!(info.role, Role::Source);
        let flag = host.flag_key.as_ref().unwrap().verifying_key();
        assert_eq!(info.flag_key, Some(flag));
        let target = ca
            .new_host(&CertProfile::new("standby", Role::Target, None, 5))
            .unwrap();
        assert_eq!(target.identity.info().role, Role::Target);
        let flag = target.flag_key.as_ref().unwrap().verifying_key();
        assert_eq!(target.identity.info().flag_key, Some(flag));
    }

    #[test]
    fn a_source_needs_a_flag_key_a_target_may_lack_one() {
        let ca = Ca::create("t", 10).unwrap();
        let key = HostKey::generate().unwrap();
        let err = ca
            .issue(
                &key.csr("primary").unwrap(),
                &CertProfile::new("primary", Role::Source, None, 5),
            )
            .unwrap_err();
        assert!(err.to_string().contains("must carry one"), "{err}");
        // A renewal requested by an older client for a target issued without one.
        let (cert, _) = ca
            .issue(
                &key.csr("standby").unwrap(),
                &CertProfile::new("standby", Role::Target, None, 5),
            )
            .unwrap();
        let info = crate::PeerIdentity::from_certificate(&cert).unwrap();
        assert_eq!((info.role, info.flag_key), (Role::Target, None));
    }
}
