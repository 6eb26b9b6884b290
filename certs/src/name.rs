//! The values the fleet names things by: a host's [`Role`] (its certificate's OU), a
//! certificate's [`Fingerprint`] and a CA's [`CaPin`], each with the one text form that the
//! command line, the state files and the messages use; and [`InvalidArgument`], why a text is
//! not such a value.
//!
//! Nothing here reads a certificate or a file. That keeps this module below
//! [`error`](crate::error): [`TrustError`](crate::TrustError) carries these values as facts,
//! and the code that reads certificates ([`identity`](crate::identity)) returns it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value on the command line or in a file that is not what it should be: which kind of
/// value, the text given, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {why}")]
pub struct InvalidArgument {
    /// The kind of value, e.g. `role`, `CA pin`, `duration`.
    pub what: &'static str,
    /// The text given.
    pub value: String,
    /// What was expected instead.
    pub why: String,
}

/// What a host was enrolled as: carried in the certificate's OU, chosen by the CA (the token's
/// or `sign --role`'s role), shown by `show`.
///
/// The role does **not** decide the direction of a push. Failover turns a standby into the
/// primary, and fail-back has it push the stack back to the old primary, so a host enrolled
/// once acts in both roles for the stacks its configs name: every host holds a flag key (the
/// target's since this rule; an older target certificate gains one at its next `renew`), the
/// receiving side admits a pushing peer of either role whose certificate carries a flag key
/// pinned to its name ([`admit`](crate::admit)), and a dialer accepts a server of either role
/// and checks its *name* ([`PeerIdentity::expect_name`](crate::PeerIdentity::expect_name)).
/// Which host may push which stack is each stack's `allow` list on the receiving host, a list
/// of names the CA registered. The role still decides what enrolment issues: a `source`
/// certificate cannot be issued without a flag key; `init` makes the CA host a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Enrolled to push stacks (the primary); its certificate always carries a flag key.
    Source,
    /// Enrolled to receive stacks (a standby); since every host got a flag key it may push too
    /// (fail-back), where a stack's `allow` list names it.
    Target,
}

impl Role {
    /// The word used in certificates, tokens and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = InvalidArgument;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "source" => Ok(Role::Source),
            "target" => Ok(Role::Target),
            other => Err(InvalidArgument {
                what: "role",
                value: other.to_owned(),
                why: "expected `source` or `target`".into(),
            }),
        }
    }
}

macro_rules! sha256_name {
    ($ty:ident, $what:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty([u8; 32]);

        impl $ty {
            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "sha256:{}", hex::encode(self.0))
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $ty {
            type Err = InvalidArgument;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let bad = |why: &str| InvalidArgument {
                    what: $what,
                    value: s.to_owned(),
                    why: why.to_owned(),
                };
                let hex_part = s
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("expected `sha256:` followed by 64 hex digits"))?;
                let mut out = [0u8; 32];
                hex::decode_to_slice(hex_part, &mut out)
                    .map_err(|_| bad("expected 64 hex digits after `sha256:`"))?;
                Ok($ty(out))
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

sha256_name!(
    Fingerprint,
    "certificate fingerprint",
    "SHA-256 of a certificate's DER; names one certificate (deny lists, `show`)."
);
sha256_name!(
    CaPin,
    "CA pin",
    "SHA-256 of a CA certificate's SubjectPublicKeyInfo (kubeadm's `--discovery-token-ca-cert-hash`)."
);

impl Fingerprint {
    /// Fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(sha256(der))
    }
}

impl CaPin {
    /// The pin of a CA whose certificate has this SubjectPublicKeyInfo (DER).
    pub(crate) fn of_spki(spki: &[u8]) -> CaPin {
        CaPin(sha256(spki))
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
