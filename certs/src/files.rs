//! The state directory: the one place that knows file names, modes and how they are written.
//!
//! ```text
//! <dir>/                 0700
//!   ca.crt               fleet CA certificate (every host)
//!   ca.key          0600 fleet CA key (CA host only)
//!   host.crt             this host's certificate
//!   host.key        0600 this host's TLS key (generated here, never transmitted)
//!   flag.key        0600 ed25519 seed, hex: signs the generations this host pushes (every
//!                        host; a target enrolled before that gains it at `renew`)
//!   flag-keys.json       host name -> flag public key, learned at enrollment
//!   flag-pins.json       host name -> flag public key this host accepted pushes with
//!   deny.json            the newest signed deny list this host has seen
//!   server               HOST:PORT of the CA's `serve`, remembered by `enroll` for `renew`
//!   tokens.json     0600 CA host: join tokens (ID, derived key, role, expiry, use)
//!   issued.json          CA host: every certificate issued (for `show` and `revoke`)
//!   pending.key     0600 offline path: key made by `csr`, promoted by `install`
//!   pending-flag.key 0600 offline path: flag seed made by `csr`
//! ```
//!
//! Writes go to a temporary file in the same directory, are fsynced and renamed over the target.
//! Key files are created 0600 from the start (never chmod-ed after the fact); reading a key file
//! whose mode lets group or others read it fails with [`TrustError::KeyFileTooOpen`].

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{TrustError, io};
use crate::identity::Identity;

/// A stackclone state directory (`--dir`, default `/etc/stackclone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

macro_rules! paths {
    ($($fn:ident => $file:literal),* $(,)?) => {
        $(
            #[doc = concat!("`<dir>/", $file, "`")]
            pub fn $fn(&self) -> PathBuf {
                self.root.join($file)
            }
        )*
    };
}

impl StateDir {
    /// A state directory at `root`; nothing is touched until something is read or written.
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    paths! {
        ca_cert => "ca.crt",
        ca_key => "ca.key",
        host_cert => "host.crt",
        host_key => "host.key",
        flag_key => "flag.key",
        flag_keys => "flag-keys.json",
        flag_pins => "flag-pins.json",
        deny_list => "deny.json",
        server => "server",
        tokens => "tokens.json",
        issued => "issued.json",
        pending_key => "pending.key",
        pending_flag_key => "pending-flag.key",
    }

    /// Creates the directory (0700) if needed, and tightens its mode if it is looser.
    pub fn create(&self) -> Result<(), TrustError> {
        fs::create_dir_all(&self.root).map_err(io("create directory", &self.root))?;
        let meta = fs::metadata(&self.root).map_err(io("inspect directory", &self.root))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(io("set mode 0700 on", &self.root))?;
        }
        Ok(())
    }

    /// Whether `path` exists.
    pub fn has(&self, path: &Path) -> bool {
        path.exists()
    }

    /// Reads a public file (certificate, list).
    pub fn read(&self, path: &Path) -> Result<Vec<u8>, TrustError> {
        fs::read(path).map_err(io("read", path))
    }

    /// Reads a file if it exists.
    pub fn read_optional(&self, path: &Path) -> Result<Option<Vec<u8>>, TrustError> {
        match fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", path)(e)),
        }
    }

    /// Reads a secret file, refusing it if group or others may read it.
    pub fn read_secret(&self, path: &Path) -> Result<Vec<u8>, TrustError> {
        let file = fs::File::open(path).map_err(io("open key file", path))?;
        let mode = file
            .metadata()
            .map_err(io("inspect key file", path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(TrustError::KeyFileTooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io("read key file", path))?;
        Ok(bytes)
    }

    /// Atomically writes a secret file, mode 0600.
    pub fn write_secret(&self, path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
        self.write_atomic(path, bytes, 0o600)
    }

    /// Atomically writes a public file, mode 0644.
    pub fn write_public(&self, path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
        self.write_atomic(path, bytes, 0o644)
    }

    /// Removes a file if present.
    pub fn remove(&self, path: &Path) -> Result<(), TrustError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", path)(e)),
        }
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<(), TrustError> {
        self.create()?;
        // A bare file name (`csr`'s and `sign`'s default outputs) has the empty path as its
        // parent: that is the current directory, which is what must be opened to fsync the rename.
        let dir = match path.parent() {
            Some(p) if p.as_os_str().is_empty() => Path::new("."),
            Some(p) => p,
            None => &self.root,
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io("write", path)(e)
        })
    }

    fn missing(&self, what: &'static str, file: PathBuf, hint: &'static str) -> TrustError {
        TrustError::Missing {
            what,
            dir: self.root.clone(),
            file,
            hint,
        }
    }

    pub(crate) fn read_cert(
        &self,
        path: &Path,
        what: &'static str,
        hint: &'static str,
    ) -> Result<CertificateDer<'static>, TrustError> {
        let pem = self
            .read_optional(path)?
            .ok_or_else(|| self.missing(what, path.to_owned(), hint))?;
        CertificateDer::from_pem_slice(&pem).map_err(|e| TrustError::Malformed {
            path: path.to_owned(),
            what: "PEM certificate",
            detail: e.to_string(),
        })
    }

    pub(crate) fn read_key_pem(
        &self,
        path: &Path,
        what: &'static str,
        hint: &'static str,
    ) -> Result<PrivateKeyDer<'static>, TrustError> {
        if !path.exists() {
            return Err(self.missing(what, path.to_owned(), hint));
        }
        let pem = self.read_secret(path)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TrustError::Malformed {
            path: path.to_owned(),
            what: "PEM private key",
            detail: e.to_string(),
        })
    }

    /// The fleet CA certificate (`ca.crt`).
    pub fn load_ca_cert(&self) -> Result<CertificateDer<'static>, TrustError> {
        self.read_cert(
            &self.ca_cert(),
            "fleet CA certificate",
            "run `stackclone-certs init` (CA host) or `stackclone-certs enroll` first",
        )
    }

    pub(crate) fn load_identity(&self) -> Result<Identity, TrustError> {
        const HINT: &str =
            "run `stackclone-certs init` (CA host) or `stackclone-certs enroll` first";
        let cert = self.read_cert(&self.host_cert(), "host certificate", HINT)?;
        let key = self.read_key_pem(&self.host_key(), "host key", HINT)?;
        let ca = self.load_ca_cert()?;
        Identity::from_der(cert, key, ca).map_err(|e| match e {
            TrustError::BadCertificate { .. } => TrustError::KeyMismatch {
                cert: self.host_cert(),
                key: self.host_key(),
            },
            other => other,
        })
    }

    pub(crate) fn read_seed(&self, path: &Path) -> Result<SigningKey, TrustError> {
        let text = self.read_secret(path)?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(String::from_utf8_lossy(&text).trim(), &mut seed).map_err(|_| {
            TrustError::Malformed {
                path: path.to_owned(),
                what: "flag key (64 hex digits)",
                detail: "not 32 bytes of hex".into(),
            }
        })?;
        Ok(SigningKey::from_bytes(&seed))
    }

    pub(crate) fn write_seed(&self, path: &Path, key: &SigningKey) -> Result<(), TrustError> {
        let text = format!("{}\n", hex::encode(key.to_bytes()));
        self.write_secret(path, text.as_bytes())
    }

    pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
        what: &'static str,
    ) -> Result<Option<T>, TrustError> {
        let Some(bytes) = self.read_optional(path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TrustError::Malformed {
                path: path.to_owned(),
                what,
                detail: e.to_string(),
            })
    }

    pub(crate) fn write_json<T: serde::Serialize>(
        &self,
        path: &Path,
        value: &T,
        secret: bool,
    ) -> Result<(), TrustError> {
        let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| TrustError::Malformed {
            path: path.to_owned(),
            what: "JSON value",
            detail: e.to_string(),
        })?;
        bytes.push(b'\n');
        if secret {
            self.write_secret(path, &bytes)
        } else {
            self.write_public(path, &bytes)
        }
    }
}

/// Generates a fresh ed25519 flag key from the OS RNG.
pub(crate) fn generate_flag_key() -> Result<SigningKey, TrustError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| TrustError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// This host's flag signing key (`<dir>/flag.key`), for the source agent: it signs each
/// generation this host pushes.
pub fn load_flag_key(dir: &Path) -> Result<SigningKey, TrustError> {
    let dir = StateDir::new(dir);
    let path = dir.flag_key();
    if !path.exists() {
        return Err(dir.missing(
            "flag key",
            path,
            "every host gets one when it enrolls (`init`, `enroll`, `csr` + `install`); a host \
             enrolled as a target before that gets one with `stackclone-certs renew`",
        ));
    }
    dir.read_seed(&path)
}

/// The flag key a renewal of `current` certifies: the one its certificate carries (which must
/// be the one in `flag.key`: a renewal never changes a host's flag key, so pins survive it);
/// for a certificate without one (a target enrolled before every host got a flag key), the one
/// in `flag.key` if there is one, else a fresh key. Nothing is written here: the caller keeps
/// the key only once the renewed certificate is installed.
pub(crate) fn flag_key_for_renewal(
    dir: &StateDir,
    current: &crate::PeerIdentity,
) -> Result<SigningKey, TrustError> {
    match &current.flag_key {
        Some(in_cert) => {
            let ours = load_flag_key(dir.root())?;
            if ours.verifying_key() != *in_cert {
                return Err(TrustError::BadCertificate {
                    detail: format!(
                        "`{}` holds another flag key than the one its certificate carries; a \
                         renewal keeps a host's flag key, so restore `{}`",
                        current.name,
                        dir.flag_key().display()
                    ),
                });
            }
            Ok(ours)
        }
        None if dir.flag_key().exists() => dir.read_seed(&dir.flag_key()),
        None => generate_flag_key(),
    }
}

/// Flag public keys of the fleet's hosts, as learned at enrollment (`flag-keys.json`).
///
/// During a session, prefer the key in the connected peer's certificate
/// ([`crate::PeerIdentity::flag_key`]); this file serves checks made with no connection open.
pub fn load_trusted_flag_keys(dir: &Path) -> Result<BTreeMap<String, VerifyingKey>, TrustError> {
    let dir = StateDir::new(dir);
    let path = dir.flag_keys();
    let raw: BTreeMap<String, String> = dir.read_json(&path, "flag key list")?.unwrap_or_default();
    raw.into_iter()
        .map(|(name, key)| {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(&key, &mut bytes)
                .ok()
                .and_then(|()| VerifyingKey::from_bytes(&bytes).ok())
                .map(|k| (name.clone(), k))
                .ok_or_else(|| TrustError::Malformed {
                    path: path.clone(),
                    what: "flag key list",
                    detail: format!("bad key for `{name}`"),
                })
        })
        .collect()
}
