//! The offline verbs of the CLI, as library calls: `init`, `token create`, `csr`, `sign`,
//! `install`, local `renew`, `revoke`, `show`. (`serve`, `enroll` and network `renew` live in
//! `enroll`.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::ca::{Ca, CertProfile, Csr, HostKey, validate_name};
use crate::deny::{DenyList, Revocation, SignedDenyList};
use crate::enroll::{Bundle, Issuance, IssuedStore, issue_bundle};
use crate::error::TrustError;
use crate::files::{StateDir, generate_flag_key};
use crate::identity::{Identity, PeerIdentity, check_expiry, fmt_time};
use crate::name::{CaPin, Fingerprint, Role};
use crate::tls::Trust;
use crate::token::{JoinToken, TokenStore, parse_time};

/// Validity of a fleet CA made by `init`.
const CA_DAYS: i64 = 3650;

/// `init --name NAME`: creates the fleet CA, this host's source identity and its flag key.
pub fn init(dir: &StateDir, name: &str, days: i64) -> Result<Identity, TrustError> {
    validate_name(name)?;
    if dir.ca_key().exists() || dir.ca_cert().exists() {
        return Err(TrustError::AlreadyInitialised {
            dir: dir.root().to_owned(),
        });
    }
    dir.create()?;
    let ca = Ca::create(name, CA_DAYS)?;
    ca.save(dir)?;
    let key = HostKey::generate()?;
    let flag = generate_flag_key()?;
    let profile = CertProfile::new(name, Role::Source, Some(flag.verifying_key()), days);
    let (bundle, _) = issue_bundle(dir, &ca, &key.csr(name)?, &profile, "init", Issuance::New)?;
    bundle.install(dir, &key, Some(&flag), Some(ca.pin()))
}

/// `token create`: a single-use join token for `role`, valid for `ttl`, optionally bound to one
/// host name. With `replace`, the token replaces the host `name` (whose live certificates are
/// revoked when it is used); without it, a name that already has a live certificate is refused
/// here already, and again when the token is used.
pub fn token_create(
    dir: &StateDir,
    role: Role,
    ttl: Duration,
    server: &str,
    name: Option<&str>,
    replace: bool,
) -> Result<JoinToken, TrustError> {
    if let Some(name) = name {
        validate_name(name)?;
        if !replace {
            crate::enroll::check_name_free(dir, name)?;
        }
    }
    let ca = Ca::load(dir)?;
    let mut store = TokenStore::load(dir)?;
    let (secret, expires_at) = store.create(
        role,
        name.map(str::to_owned),
        replace,
        ttl,
        OffsetDateTime::now_utc(),
    )?;
    store.save(dir)?;
    Ok(JoinToken {
        token: secret.to_string(),
        ca_pin: ca.pin(),
        server: server.to_owned(),
        expires_at: fmt_time(expires_at),
        role,
        name: name.map(str::to_owned),
    })
}

/// The file `csr` writes and `sign` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestFile {
    name: String,
    /// PEM.
    csr: String,
    /// Hex ed25519 public key; the CA puts it in the certificate, whatever the role.
    flag_key: String,
}

/// `csr --name NAME`: makes this host's key and flag key (kept as `pending.*` until `install`)
/// and writes a request file to carry to the CA host.
pub fn make_csr(dir: &StateDir, name: &str, out: &Path) -> Result<(), TrustError> {
    validate_name(name)?;
    let key = HostKey::generate()?;
    let flag = generate_flag_key()?;
    let request = RequestFile {
        name: name.to_owned(),
        csr: key.csr(name)?.to_pem(),
        flag_key: hex::encode(flag.verifying_key().as_bytes()),
    };
    dir.write_secret(&dir.pending_key(), key.to_pem().as_bytes())?;
    dir.write_seed(&dir.pending_flag_key(), &flag)?;
    dir.write_json(out, &request, false)
}

/// `sign FILE`: on the CA host, issues a certificate for a request file and writes the bundle.
/// A name with a live certificate is refused unless `replace` (which revokes it).
pub fn sign_request(
    dir: &StateDir,
    request: &Path,
    role: Role,
    days: i64,
    out: &Path,
    replace: bool,
) -> Result<Bundle, TrustError> {
    let ca = Ca::load(dir)?;
    let req: RequestFile = dir
        .read_json(request, "certificate request file")?
        .ok_or_else(|| TrustError::Missing {
            what: "request file",
            dir: request.parent().unwrap_or(Path::new(".")).to_owned(),
            file: request.to_owned(),
            hint: "make it on the joining host with `stackclone-certs csr --name NAME`",
        })?;
    let mut flag = [0u8; 32];
    hex::decode_to_slice(&req.flag_key, &mut flag).map_err(|_| TrustError::Malformed {
        path: request.to_owned(),
        what: "certificate request file",
        detail: "flag_key is not 64 hex digits".into(),
    })?;
    let flag =
        ed25519_dalek::VerifyingKey::from_bytes(&flag).map_err(|_| TrustError::Malformed {
            path: request.to_owned(),
            what: "certificate request file",
            detail: "flag_key is not an ed25519 public key".into(),
        })?;
    let profile = CertProfile::new(&req.name, role, Some(flag), days);
    let (bundle, _) = issue_bundle(
        dir,
        &ca,
        &Csr::from_pem(&req.csr)?,
        &profile,
        "sign",
        if replace {
            Issuance::Replace
        } else {
            Issuance::New
        },
    )?;
    dir.write_json(out, &bundle, false)?;
    Ok(bundle)
}

/// What `install FILE` did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Installed {
    /// A bundle from `sign`: this host's identity is now in place.
    Identity(Box<PeerIdentity>),
    /// A signed deny list, adopted if newer.
    DenyList {
        /// Its version.
        version: u64,
        /// Whether it replaced the one in force.
        adopted: bool,
    },
}

/// `install FILE`: installs a bundle made by `sign` (promoting the pending key from `csr`), or a
/// signed deny list (`deny.json` from the CA host).
pub fn install(
    dir: &StateDir,
    file: &Path,
    ca_pin: Option<CaPin>,
) -> Result<Installed, TrustError> {
    let bytes = dir.read(file)?;
    if let Ok(signed) = serde_json::from_slice::<SignedDenyList>(&bytes) {
        let trust = Trust::load(dir)?;
        let version = DenyList::verify_signed(&signed, trust.ca_certificate())?.version();
        let adopted = trust.adopt(&signed)?;
        return Ok(Installed::DenyList { version, adopted });
    }
    let bundle: Bundle = serde_json::from_slice(&bytes).map_err(|e| TrustError::Malformed {
        path: file.to_owned(),
        what: "bundle (from `sign`) or signed deny list",
        detail: e.to_string(),
    })?;
    // Without the pin, whoever handed over the file would choose the CA this host trusts.
    let Some(ca_pin) = ca_pin else {
        return Err(TrustError::PinRequired {
            file: file.to_owned(),
        });
    };
    let key_path = dir.pending_key();
    if !key_path.exists() {
        return Err(TrustError::Missing {
            what: "pending key",
            dir: dir.root().to_owned(),
            file: key_path,
            hint: "run `stackclone-certs csr` on this host first; the bundle must answer its request",
        });
    }
    let key = HostKey::from_pem(&String::from_utf8_lossy(&dir.read_secret(&key_path)?))?;
    let flag_path = dir.pending_flag_key();
    let flag = if flag_path.exists() {
        Some(dir.read_seed(&flag_path)?)
    } else {
        None
    };
    let identity = bundle.install(dir, &key, flag.as_ref(), Some(ca_pin))?;
    dir.remove(&key_path)?;
    dir.remove(&flag_path)?;
    Ok(Installed::Identity(Box::new(identity.info().clone())))
}

/// `renew` on the CA host itself: re-issues this host's certificate with a fresh key. Name, role
/// and flag key stay; a certificate without a flag key gains one (see [`crate::renew`]).
pub fn renew_local(dir: &StateDir, days: i64) -> Result<Identity, TrustError> {
    let ca = Ca::load(dir)?;
    let current = Identity::load(dir)?;
    let flag = crate::files::flag_key_for_renewal(dir, current.info())?;
    let key = HostKey::generate()?;
    let profile = CertProfile::new(
        current.name(),
        current.role(),
        Some(flag.verifying_key()),
        days,
    );
    let (bundle, _) = issue_bundle(
        dir,
        &ca,
        &key.csr(current.name())?,
        &profile,
        "renew",
        Issuance::Renew,
    )?;
    bundle.install(dir, &key, Some(&flag), Some(ca.pin()))
}

/// `revoke NAME` puts every certificate issued to `NAME` on the deny list (next version, signed
/// by the CA); `revoke sha256:…` only the one certificate with that fingerprint (say, an
/// impostor's, leaving the real host of the same name alone). Returns the new list.
pub fn revoke(dir: &StateDir, name_or_fingerprint: &str) -> Result<DenyList, TrustError> {
    let ca = Ca::load(dir)?;
    let issued = IssuedStore::load(dir)?;
    let now = fmt_time(OffsetDateTime::now_utc());
    let fingerprint: Option<Fingerprint> = if name_or_fingerprint.starts_with("sha256:") {
        Some(name_or_fingerprint.parse()?)
    } else {
        None
    };
    let name = name_or_fingerprint;
    let added: Vec<Revocation> = issued
        .certs
        .iter()
        .filter(|r| match &fingerprint {
            Some(fp) => r.fingerprint == *fp,
            None => r.name == name,
        })
        .map(|r| Revocation {
            name: r.name.clone(),
            fingerprint: r.fingerprint,
            serial: r.serial.clone(),
            revoked_at: now.clone(),
        })
        .collect();
    if added.is_empty() {
        return Err(TrustError::UnknownHost {
            name: name.to_owned(),
        });
    }
    let next = DenyList::load(dir.root())?.revoke(&ca, added)?;
    next.save(dir)?;
    Ok(next)
}

/// This host's certificate, for `show`.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Fingerprint.
    pub fingerprint: Fingerprint,
    /// Serial, hex.
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
    /// Days of validity left; negative once expired.
    pub days_left: i64,
    /// Flag public key (hex). `None` only for a target certificate issued before every host
    /// got one (`renew` adds it).
    pub flag_key: Option<String>,
    /// Whether the deny list this host holds names its own certificate.
    pub revoked: bool,
}

/// The fleet CA, for `show`.
#[derive(Debug, Clone, Serialize)]
pub struct CaStatus {
    /// `--ca-pin` value.
    pub pin: CaPin,
    /// RFC 3339.
    pub not_after: String,
    /// Whether this host holds the CA key.
    pub is_ca_host: bool,
}

/// One issued certificate, for `show` on the CA host.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedStatus {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Fingerprint.
    pub fingerprint: Fingerprint,
    /// RFC 3339.
    pub not_after: String,
    /// On the deny list.
    pub revoked: bool,
    /// `init`, `enroll`, `renew` or `sign`.
    pub via: String,
}

/// One join token, for `show` on the CA host (never the secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenStatus {
    /// Public id.
    pub id: String,
    /// Role it grants.
    pub role: Role,
    /// RFC 3339.
    pub expires_at: String,
    /// `unused`, `used` or `expired`.
    pub state: String,
    /// Who used it.
    pub used_by: Option<String>,
}

/// Everything `show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The state directory.
    pub dir: PathBuf,
    /// This host's certificate.
    pub host: Option<HostStatus>,
    /// The fleet CA.
    pub ca: Option<CaStatus>,
    /// Deny list version held here.
    pub deny_list_version: u64,
    /// Revoked certificates.
    pub revoked: Vec<Revocation>,
    /// Hosts' flag keys learned at enrollment.
    pub trusted_flag_keys: BTreeMap<String, String>,
    /// CA host: issued certificates.
    pub issued: Vec<IssuedStatus>,
    /// CA host: join tokens.
    pub tokens: Vec<TokenStatus>,
}

/// `show`: names, roles, fingerprints and expiry of what this directory holds.
pub fn show(dir: &StateDir) -> Result<Status, TrustError> {
    let now = OffsetDateTime::now_utc();
    let ca_cert = if dir.ca_cert().exists() {
        Some(dir.load_ca_cert()?)
    } else {
        None
    };
    let deny = if ca_cert.is_some() {
        DenyList::load(dir.root())?
    } else {
        DenyList::empty()
    };
    let host = if dir.host_cert().exists() {
        let cert = dir.read_cert(&dir.host_cert(), "host certificate", "")?;
        let info = PeerIdentity::from_certificate(&cert)?;
        let days_left = match check_expiry(&info, now) {
            Ok(days) => days,
            Err(_) => (info.not_after - now).whole_days(),
        };
        Some(HostStatus {
            days_left,
            revoked: deny.contains(&info.fingerprint),
            name: info.name,
            role: info.role,
            fingerprint: info.fingerprint,
            serial: info.serial,
            not_after: fmt_time(info.not_after),
            flag_key: info.flag_key.map(|k| hex::encode(k.as_bytes())),
        })
    } else {
        None
    };
    let ca = match &ca_cert {
        Some(cert) => {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| {
                TrustError::BadCertificate {
                    detail: format!("cannot parse CA certificate: {e}"),
                }
            })?;
            Some(CaStatus {
                pin: CaPin::of_certificate(cert)?,
                not_after: fmt_time(parsed.validity().not_after.to_datetime()),
                is_ca_host: dir.ca_key().exists(),
            })
        }
        None => None,
    };
    let is_ca_host = dir.ca_key().exists();
    let issued = if is_ca_host {
        IssuedStore::load(dir)?
            .certs
            .into_iter()
            .map(|r| IssuedStatus {
                revoked: deny.contains(&r.fingerprint),
                name: r.name,
                role: r.role,
                fingerprint: r.fingerprint,
                not_after: r.not_after,
                via: r.via,
            })
            .collect()
    } else {
        Vec::new()
    };
    let tokens = if is_ca_host {
        TokenStore::load(dir)?
            .tokens
            .into_iter()
            .map(|t| {
                let state = if t.used_at.is_some() {
                    "used"
                } else if parse_time(&t.expires_at).is_none_or(|at| at <= now) {
                    "expired"
                } else {
                    "unused"
                };
                TokenStatus {
                    id: t.id,
                    role: t.role,
                    expires_at: t.expires_at,
                    state: state.to_owned(),
                    used_by: t.used_by,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let trusted_flag_keys = crate::files::load_trusted_flag_keys(dir.root())?
        .into_iter()
        .map(|(name, key)| (name, hex::encode(key.as_bytes())))
        .collect();
    Ok(Status {
        dir: dir.root().to_owned(),
        host,
        ca,
        deny_list_version: deny.version(),
        revoked: deny.entries().to_vec(),
        trusted_flag_keys,
        issued,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_renewal_gives_a_certificate_without_a_flag_key_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        init(&dir, "primary", 30).unwrap();
        // This host's certificate as the CA issued a target's before every host got a flag key.
        let ca = Ca::load(&dir).unwrap();
        let old = ca
            .new_host_without_flag_key("primary", Role::Target)
            .unwrap();
        old.save(&dir).unwrap();
        dir.remove(&dir.flag_key()).unwrap();
        assert_eq!(Identity::load(&dir).unwrap().info().flag_key, None);

        let renewed = renew_local(&dir, 30).unwrap();
        let flag = crate::load_flag_key(dir.root()).unwrap().verifying_key();
        assert_eq!(renewed.role(), Role::Target);
        assert_eq!(renewed.info().flag_key, Some(flag));
        let shown = show(&dir).unwrap().host.unwrap();
        assert_eq!(shown.flag_key, Some(hex::encode(flag.as_bytes())));
        // And kept by the next renewal.
        let again = renew_local(&dir, 30).unwrap();
        assert_eq!(again.info().flag_key, Some(flag));
    }

    #[test]
    fn a_renewal_never_changes_a_flag_key_the_certificate_carries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        init(&dir, "primary", 30).unwrap();
        let before = Identity::load(&dir).unwrap();
        dir.write_seed(&dir.flag_key(), &generate_flag_key().unwrap())
            .unwrap();
        let err = renew_local(&dir, 30).unwrap_err();
        assert!(
            err.to_string()
                .contains("another flag key than the one its certificate carries"),
            "{err}"
        );
        let after = Identity::load(&dir).unwrap();
        assert_eq!(after.info().fingerprint, before.info().fingerprint);
    }
}
