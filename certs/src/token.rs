//! Join tokens: `ID.SECRET`, single-use, expiring, stored on the CA host as a key derived from
//! the secret (never the secret itself), proven by a BLAKE3 keyed MAC bound to the TLS session.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::error::TrustError;
use crate::files::StateDir;
use crate::identity::fmt_time;
use crate::name::{CaPin, InvalidArgument, Role};

const KEY_CONTEXT: &str = "stackclone join token v1 2026-11 proof key";
const PROOF_DOMAIN: &[u8] = b"stackclone enroll proof v1\0";
/// TLS exporter label for the channel binding (RFC 5705 / RFC 9266 style).
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-stackclone-enroll-v1";

/// A join token as the joiner holds it. `Display` prints the whole `ID.SECRET`; `Debug` does not.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret {
    id: String,
    secret: [u8; 16],
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSecret({}.<secret>)", self.id)
    }
}

impl fmt::Display for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, hex::encode(self.secret))
    }
}

impl FromStr for TokenSecret {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, secret_hex) = s.trim().split_once('.').ok_or(TrustError::TokenMalformed)?;
        if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TrustError::TokenMalformed);
        }
        let mut secret = [0u8; 16];
        hex::decode_to_slice(secret_hex, &mut secret).map_err(|_| TrustError::TokenMalformed)?;
        Ok(TokenSecret {
            id: id.to_ascii_lowercase(),
            secret,
        })
    }
}

impl TokenSecret {
    fn generate() -> Result<TokenSecret, TrustError> {
        let mut bytes = [0u8; 22];
        getrandom::fill(&mut bytes).map_err(|e| TrustError::Random(e.to_string()))?;
        let mut secret = [0u8; 16];
        secret.copy_from_slice(&bytes[6..]);
        Ok(TokenSecret {
            id: hex::encode(&bytes[..6]),
            secret,
        })
    }

    /// The public half, which names the token in the CA's store and in logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn key(&self) -> [u8; 32] {
        blake3::derive_key(KEY_CONTEXT, &self.secret)
    }
}

/// The proof a joiner sends instead of the secret: a MAC, keyed by the token key, over the token
/// id, the requested name, the CSR, the flag public key and the TLS exporter of this connection.
pub(crate) fn proof(
    key: &[u8; 32],
    token_id: &str,
    name: &str,
    csr: &[u8],
    flag_public: Option<&[u8; 32]>,
    channel_binding: &[u8; 32],
) -> blake3::Hash {
    let mut mac = blake3::Hasher::new_keyed(key);
    mac.update(PROOF_DOMAIN);
    for part in [
        token_id.as_bytes(),
        name.as_bytes(),
        csr,
        flag_public.map_or(&[][..], |k| &k[..]),
        channel_binding,
    ] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredToken {
    pub id: String,
    /// `blake3::derive_key` of the secret, hex. Verifies proofs; does not reveal the token.
    pub key: String,
    pub role: Role,
    /// When set, the only name this token may enroll.
    pub name: Option<String>,
    /// The token replaces the host `name` (made with `token create --name NAME --replace`):
    /// enrolling with it revokes that name's live certificates. Without it, a name that has a
    /// live certificate cannot be enrolled.
    #[serde(default)]
    pub replace: bool,
    pub created_at: String,
    pub expires_at: String,
    pub used_at: Option<String>,
    pub used_by: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct TokenStore {
    pub tokens: Vec<StoredToken>,
}

impl TokenStore {
    pub fn load(dir: &StateDir) -> Result<TokenStore, TrustError> {
        let path = dir.tokens();
        if !path.exists() {
            return Ok(TokenStore::default());
        }
        let bytes = dir.read_secret(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| TrustError::Malformed {
            path,
            what: "token store",
            detail: e.to_string(),
        })
    }

    pub fn save(&self, dir: &StateDir) -> Result<(), TrustError> {
        dir.write_json(&dir.tokens(), self, true)
    }

    pub fn create(
        &mut self,
        role: Role,
        name: Option<String>,
        replace: bool,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(TokenSecret, OffsetDateTime), TrustError> {
        if replace && name.is_none() {
            return Err(InvalidArgument {
                what: "token",
                value: "--replace".into(),
                why: "a replacing token must name the host it replaces: add `--name NAME`".into(),
            }
            .into());
        }
        let secret = TokenSecret::generate()?;
        let expires_at = now + ttl;
        // Expired tokens are dropped once they are a day old; used ones stay as an audit trail.
        self.tokens.retain(|t| {
            t.used_at.is_some()
                || parse_time(&t.expires_at).is_none_or(|at| at + Duration::days(1) > now)
        });
        self.tokens.push(StoredToken {
            id: secret.id.clone(),
            key: hex::encode(secret.key()),
            role,
            name,
            replace,
            created_at: fmt_time(now),
            expires_at: fmt_time(expires_at),
            used_at: None,
            used_by: None,
        });
        Ok((secret, expires_at))
    }

    /// Checks a proof for token `id` and marks the token used. The caller persists the store
    /// before it answers. The errors say exactly what failed, for the CA host's log; the joiner
    /// is told only that the token was not accepted (see [`crate::Refusal::from_error`]).
    pub fn redeem(
        &mut self,
        id: &str,
        name: &str,
        now: OffsetDateTime,
        check: impl FnOnce(&[u8; 32]) -> bool,
    ) -> Result<Redeemed, TrustError> {
        let token = self
            .tokens
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| TrustError::TokenUnknown { id: id.to_owned() })?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(&token.key, &mut key)
            .map_err(|_| TrustError::TokenUnknown { id: id.to_owned() })?;
        // The proof is checked first, so that only a holder of the token learns its state.
        if !check(&key) {
            return Err(TrustError::TokenProofInvalid { id: id.to_owned() });
        }
        if token.used_at.is_some() {
            return Err(TrustError::TokenUsed { id: id.to_owned() });
        }
        match parse_time(&token.expires_at) {
            Some(at) if at > now => {}
            _ => {
                return Err(TrustError::TokenExpired {
                    expires_at: token.expires_at.clone(),
                });
            }
        }
        if let Some(bound) = &token.name
            && bound != name
        {
            return Err(TrustError::TokenWrongName {
                id: id.to_owned(),
                bound: bound.clone(),
                name: name.to_owned(),
            });
        }
        token.used_at = Some(fmt_time(now));
        token.used_by = Some(name.to_owned());
        Ok(Redeemed {
            role: token.role,
            replace: token.replace,
        })
    }
}

/// What a redeemed token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Redeemed {
    pub role: Role,
    /// It replaces the host it names (see [`StoredToken::replace`]).
    pub replace: bool,
}

pub(crate) fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Parses a duration such as `90s`, `30m`, `1h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<Duration, TrustError> {
    let bad = || {
        TrustError::from(InvalidArgument {
            what: "duration",
            value: s.to_owned(),
            why: "expected a number and a unit: s, m, h or d (e.g. `1h`)".into(),
        })
    };
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(unit_at);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "s" => Duration::seconds(n),
        "m" => Duration::minutes(n),
        "h" => Duration::hours(n),
        "d" => Duration::days(n),
        _ => return Err(bad()),
    };
    if d <= Duration::ZERO {
        return Err(bad());
    }
    Ok(d)
}

/// What `token create` hands the admin: the token, the CA pin and where to enroll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinToken {
    /// `ID.SECRET`.
    pub token: String,
    /// SHA-256 of the CA's SubjectPublicKeyInfo.
    pub ca_pin: CaPin,
    /// `HOST:PORT` of `stackclone-certs serve`.
    pub server: String,
    /// RFC 3339.
    pub expires_at: String,
    /// The role the joiner will get.
    pub role: Role,
    /// The name the token is bound to, if any.
    pub name: Option<String>,
}

impl JoinToken {
    /// The command to paste on the joining host.
    pub fn enroll_command(&self) -> String {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => "\"$(hostname -s)\"".to_owned(),
        };
        // The token goes in on stdin: `echo` is a shell builtin, so the secret never shows in
        // `/proc/*/cmdline` (an argument would, to every local user, for as long as enrolling
        // takes).
        format!(
            "echo {} | stackclone-certs enroll --name {name} --server {} --token-file - --ca-pin {}",
            self.token, self.server, self.ca_pin
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_debug_hides_secret() {
        let t = TokenSecret::generate().unwrap();
        let parsed: TokenSecret = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(!format!("{t:?}").contains(&hex::encode(t.secret)));
        assert!("nodot".parse::<TokenSecret>().is_err());
    }

    #[test]
    fn ttl_parses_units() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::hours(1));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::minutes(15));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn used_and_expired_tokens_are_refused_after_the_proof() {
        let now = OffsetDateTime::now_utc();
        let mut store = TokenStore::default();
        let (t, _) = store
            .create(Role::Target, None, false, Duration::hours(1), now)
            .unwrap();
        let key = t.key();
        assert!(matches!(
            store.redeem(t.id(), "a", now, |_| false),
            Err(TrustError::TokenProofInvalid { .. })
        ));
        assert_eq!(
            store.redeem(t.id(), "a", now, |k| *k == key).unwrap().role,
            Role::Target
        );
        assert!(matches!(
            store.redeem(t.id(), "a", now, |k| *k == key),
            Err(TrustError::TokenUsed { .. })
        ));
        let (t2, _) = store
            .create(Role::Target, None, false, Duration::seconds(1), now)
            .unwrap();
        let key2 = t2.key();
        assert!(matches!(
            store.redeem(t2.id(), "a", now + Duration::seconds(2), |k| *k == key2),
            Err(TrustError::TokenExpired { .. })
        ));
    }
}
