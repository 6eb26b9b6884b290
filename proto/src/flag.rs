//! The signed status flag that closes a generation.
//!
//! The source signs a [`Status`] — stack, generation, history, manifest root, source and target
//! names and creation time — with its ed25519 flag key. The target turns a [`SignedStatus`] into a
//! [`VerifiedStatus`] only through [`SignedStatus::verify`], which checks, in this order: the
//! signature (`verify_strict`, over a domain-separated canonical encoding, so no other message of
//! ours can be passed off as a flag), the stack, the source, the target (a flag for another
//! standby is refused), the history (the one the source claimed when the cycle began, see
//! [`crate::lineage`]), the generation (must be above the last applied: no replay), the creation
//! time (within a skew window of the target's clock: no stale flag), and the manifest root (must be
//! exactly the manifest the target staged). Only a `VerifiedStatus` can reach a commit.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::lineage::HistoryId;
use crate::manifest::Hash;
use crate::wire;

/// Prefix of every signed flag, so a signature over anything else can never verify as a flag.
/// v2: the status carries the history.
const DOMAIN: &[u8] = b"stackclone status flag v2\0";

/// What the source asserts about a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub stack: String,
    pub generation: u64,
    /// The history the generation belongs to (see [`crate::lineage`]).
    pub history: HistoryId,
    pub manifest_root: Hash,
    pub source_id: String,
    pub target_id: String,
    /// Seconds since the Unix epoch, source clock.
    pub created_at: i64,
}

impl Status {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = DOMAIN.to_vec();
        bytes.extend(wire::canonical(self));
        bytes
    }
}

/// A status with its signature, as it travels. Says nothing until verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatus {
    pub status: Status,
    /// 64 bytes of ed25519 signature (a `Vec` because serde does not derive for `[u8; 64]`).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What the target expects of a flag; the facts it checks against.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub stack: &'a str,
    /// The authenticated peer's certificate name.
    pub source_id: &'a str,
    /// This target's own certificate name.
    pub target_id: &'a str,
    /// The last generation committed here; the flag's must be greater.
    pub last_generation: u64,
    /// The history the source claimed when the cycle began.
    pub history: HistoryId,
    /// The root of the manifest this target received and staged.
    pub manifest_root: Hash,
    /// Target clock, seconds since the Unix epoch.
    pub now: i64,
    /// Largest accepted difference between `created_at` and `now`, in seconds.
    pub max_skew: i64,
}

/// Why a flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("flag signature is {len} bytes, expected 64")]
    MalformedSignature { len: usize },
    #[error("flag signature does not verify against the flag key of source `{source_id}`")]
    BadSignature { source_id: String },
    #[error("flag is for stack `{got}`, expected `{expected}`")]
    WrongStack { expected: String, got: String },
    #[error("flag names source `{got}`, but the peer is `{expected}`")]
    WrongSource { expected: String, got: String },
    #[error("flag is for target `{got}`, this is `{expected}`")]
    WrongTarget { expected: String, got: String },
    #[error(
        "flag generation {generation} is not above the last applied generation {last} (replay?)"
    )]
    Replay { generation: u64, last: u64 },
    #[error(
        "flag created at {created_at} is more than {max_skew}s away from this host's clock ({now})"
    )]
    Stale {
        created_at: i64,
        now: i64,
        max_skew: i64,
    },
    #[error("flag is for history {got}, but the cycle began claiming history {expected}")]
    WrongHistory { expected: HistoryId, got: HistoryId },
    #[error("flag manifest root {got} differs from the staged manifest root {expected}")]
    RootMismatch { expected: Hash, got: Hash },
}

impl SignedStatus {
    /// Signs `status` with the source's flag key.
    pub fn sign(status: Status, key: &SigningKey) -> Self {
        let signature = key.sign(&status.signed_bytes()).to_bytes().to_vec();
        Self { status, signature }
    }

    /// Checks everything listed in the module doc; the only way to a [`VerifiedStatus`].
    pub fn verify(
        self,
        key: &VerifyingKey,
        exp: &Expected<'_>,
    ) -> Result<VerifiedStatus, FlagError> {
        let sig: [u8; 64] =
            self.signature
                .as_slice()
                .try_into()
                .map_err(|_| FlagError::MalformedSignature {
                    len: self.signature.len(),
                })?;
        key.verify_strict(&self.status.signed_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| FlagError::BadSignature {
                source_id: exp.source_id.to_string(),
            })?;
        let s = self.status;
        if s.stack != exp.stack {
            return Err(FlagError::WrongStack {
                expected: exp.stack.into(),
                got: s.stack,
            });
        }
        if s.source_id != exp.source_id {
            return Err(FlagError::WrongSource {
                expected: exp.source_id.into(),
                got: s.source_id,
            });
        }
        if s.target_id != exp.target_id {
            return Err(FlagError::WrongTarget {
                expected: exp.target_id.into(),
                got: s.target_id,
            });
        }
        if s.history != exp.history {
            return Err(FlagError::WrongHistory {
                expected: exp.history,
                got: s.history,
            });
        }
        if s.generation <= exp.last_generation {
            return Err(FlagError::Replay {
                generation: s.generation,
                last: exp.last_generation,
            });
        }
        if s.created_at.abs_diff(exp.now) > exp.max_skew.unsigned_abs() {
            return Err(FlagError::Stale {
                created_at: s.created_at,
                now: exp.now,
                max_skew: exp.max_skew,
            });
        }
        if s.manifest_root != exp.manifest_root {
            return Err(FlagError::RootMismatch {
                expected: exp.manifest_root,
                got: s.manifest_root,
            });
        }
        Ok(VerifiedStatus(s))
    }
}

/// A status whose signature and facts were checked by [`SignedStatus::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedStatus(Status);

impl VerifiedStatus {
    pub fn status(&self) -> &Status {
        &self.0
    }

    pub fn generation(&self) -> u64 {
        self.0.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn status() -> Status {
        Status {
            stack: "nextcloud".into(),
            generation: 8,
            history: HistoryId([7; 16]),
            manifest_root: Hash::of(b"tree"),
            source_id: "primary".into(),
            target_id: "standby".into(),
            created_at: 1_800_000_000,
        }
    }

    fn expected() -> Expected<'static> {
        Expected {
            stack: "nextcloud",
            source_id: "primary",
            target_id: "standby",
            last_generation: 7,
            history: HistoryId([7; 16]),
            manifest_root: Hash::of(b"tree"),
            now: 1_800_000_030,
            max_skew: 300,
        }
    }

    #[test]
    fn a_good_flag_verifies() {
        let v = SignedStatus::sign(status(), &key(1)).verify(&key(1).verifying_key(), &expected());
        assert_eq!(v.unwrap().generation(), 8);
    }

    #[test]
    fn each_wrong_fact_has_its_own_error() {
        let k = key(1);
        let vk = k.verifying_key();
        let check =
            |s: Status, e: Expected<'_>| SignedStatus::sign(s, &k).verify(&vk, &e).unwrap_err();
        assert!(matches!(
            SignedStatus::sign(status(), &key(2)).verify(&vk, &expected()),
            Err(FlagError::BadSignature { .. })
        ));
        assert!(matches!(
            check(
                Status {
                    target_id: "other".into(),
                    ..status()
                },
                expected()
            ),
            FlagError::WrongTarget { .. }
        ));
        assert!(matches!(
            check(
                Status {
                    stack: "x".into(),
                    ..status()
                },
                expected()
            ),
            FlagError::WrongStack { .. }
        ));
        assert!(matches!(
            check(
                Status {
                    source_id: "mallory".into(),
                    ..status()
                },
                expected()
            ),
            FlagError::WrongSource { .. }
        ));
        assert!(matches!(
            check(
                Status {
                    history: HistoryId([8; 16]),
                    ..status()
                },
                expected()
            ),
            FlagError::WrongHistory { .. }
        ));
        assert!(matches!(
            check(
                status(),
                Expected {
                    last_generation: 8,
                    ..expected()
                }
            ),
            FlagError::Replay {
                generation: 8,
                last: 8
            }
        ));
        assert!(matches!(
            check(
                Status {
                    created_at: 1_700_000_000,
                    ..status()
                },
                expected()
            ),
            FlagError::Stale { .. }
        ));
        assert!(matches!(
            check(
                status(),
                Expected {
                    manifest_root: Hash::of(b"other"),
                    ..expected()
                }
            ),
            FlagError::RootMismatch { .. }
        ));
        let mut short = SignedStatus::sign(status(), &k);
        short.signature.pop();
        assert!(matches!(
            short.verify(&vk, &expected()),
            Err(FlagError::MalformedSignature { len: 63 })
        ));
    }

    #[test]
    fn any_flipped_bit_of_the_encoded_flag_is_rejected() {
        let k = key(3);
        let signed = SignedStatus::sign(status(), &k);
        let bytes = wire::canonical(&signed);
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let Ok(flipped) = wire::decode::<SignedStatus>(&b) else {
                continue;
            };
            assert!(
                flipped.verify(&k.verifying_key(), &expected()).is_err(),
                "bit {bit} flipped and the flag still verified"
            );
        }
    }
}
