//! Flag-key pins: the ed25519 flag key a host has accepted pushes with, from each peer name.
//!
//! A pushing peer's flags are verified with the key in its certificate. Every host has one (a
//! target pushes at fail-back), and the pins work the same for either role. The CA issues one
//! live certificate per name, but the receiving host should not have to trust that alone: a
//! certificate for `primary` that carries a different flag key than the one this host already
//! accepted from `primary` means another host is using the name (a mistake on the CA host, or
//! an impostor), and it is refused — like SSH's `known_hosts`, Syncthing's device IDs or
//! WireGuard's keys.
//!
//! The pin for a name is, in order: the one in `flag-pins.json` (what this host accepted
//! before); else the key the CA listed for that name when this host enrolled (`flag-keys.json`,
//! from the bundle); else the key of the first peer that pushes under that name (pinned then).
//! Renewal keeps a host's flag key, so pins survive renewals; a target certificate issued
//! before every host got a flag key gains one at its renewal, and that key is pinned on first
//! use. A host replaced on purpose (new host, new key) is accepted again after
//! `stackclone-certs forget-flag-key NAME` on each host it pushes to.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::TrustError;
use crate::files::{StateDir, load_trusted_flag_keys};
use crate::identity::fmt_time;

/// One pinned key, as `flag-pins.json` stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pin {
    /// Hex ed25519 public key.
    pub key: String,
    /// RFC 3339.
    pub pinned_at: String,
    /// `enrollment` (the CA's list) or `first use`.
    pub from: String,
}

type Pins = BTreeMap<String, Pin>;

/// Where pins live: the state directory, or memory for a trust that has no directory.
#[derive(Debug, Default)]
pub(crate) struct PinStore {
    memory: Mutex<Pins>,
}

/// What [`PinStore::check`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinCheck {
    /// The key matches the pin.
    Matches,
    /// No pin existed; this key is now pinned.
    Pinned,
}

impl PinStore {
    /// Checks `key` against the pin for `name`, pinning it when there is none.
    pub fn check(
        &self,
        dir: Option<&StateDir>,
        name: &str,
        key: &VerifyingKey,
    ) -> Result<PinCheck, TrustError> {
        let presented = hex::encode(key.as_bytes());
        // One check at a time in this process: two first connections must not both pin.
        let mut memory = match self.memory.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut pins = match dir {
            Some(dir) => load(dir)?,
            None => memory.clone(),
        };
        let pinned = match pins.get(name) {
            Some(pin) => Some(pin.key.clone()),
            None => match dir {
                Some(dir) => load_trusted_flag_keys(dir.root())?
                    .get(name)
                    .map(|k| hex::encode(k.as_bytes())),
                None => None,
            },
        };
        let from = match (&pinned, pins.contains_key(name)) {
            (Some(pinned), _) if *pinned != presented => {
                return Err(TrustError::FlagKeyChanged {
                    name: name.to_owned(),
                    pinned: pinned.clone(),
                    presented,
                });
            }
            (Some(_), true) => return Ok(PinCheck::Matches),
            (Some(_), false) => "enrollment",
            (None, _) => "first use",
        };
        pins.insert(
            name.to_owned(),
            Pin {
                key: presented,
                pinned_at: fmt_time(OffsetDateTime::now_utc()),
                from: from.to_owned(),
            },
        );
        match dir {
            Some(dir) => dir.write_json(&dir.flag_pins(), &pins, false)?,
            None => *memory = pins,
        }
        Ok(if from == "first use" {
            PinCheck::Pinned
        } else {
            PinCheck::Matches
        })
    }
}

fn load(dir: &StateDir) -> Result<Pins, TrustError> {
    Ok(dir
        .read_json(&dir.flag_pins(), "flag key pins")?
        .unwrap_or_default())
}

/// `forget-flag-key NAME`: drops this host's pin for `NAME` (and the CA's enrollment-time key for
/// it), so that the next peer pushing as `NAME` is pinned afresh. Returns whether there was
/// anything to forget.
pub fn forget_flag_key(dir: &StateDir, name: &str) -> Result<bool, TrustError> {
    let mut pins = load(dir)?;
    let pinned = pins.remove(name).is_some();
    if pinned {
        dir.write_json(&dir.flag_pins(), &pins, false)?;
    }
    let mut listed: BTreeMap<String, String> = dir
        .read_json(&dir.flag_keys(), "flag key list")?
        .unwrap_or_default();
    let was_listed = listed.remove(name).is_some();
    if was_listed {
        dir.write_json(&dir.flag_keys(), &listed, false)?;
    }
    Ok(pinned || was_listed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn key(seed: u8) -> VerifyingKey {
        SigningKey::from_bytes(&[seed; 32]).verifying_key()
    }

    #[test]
    fn first_use_pins_and_a_changed_key_is_refused_until_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let store = PinStore::default();
        assert_eq!(
            store.check(Some(&dir), "primary", &key(1)).unwrap(),
            PinCheck::Pinned
        );
        assert_eq!(
            store.check(Some(&dir), "primary", &key(1)).unwrap(),
            PinCheck::Matches
        );
        let err = store.check(Some(&dir), "primary", &key(2)).unwrap_err();
        assert!(matches!(err, TrustError::FlagKeyChanged { .. }), "{err}");
        assert!(err.to_string().contains("forget-flag-key primary"), "{err}");
        // Another name is independent.
        assert_eq!(
            store.check(Some(&dir), "other", &key(2)).unwrap(),
            PinCheck::Pinned
        );
        // A fresh store (a restarted agent) reads the pin from disk.
        assert!(
            PinStore::default()
                .check(Some(&dir), "primary", &key(2))
                .is_err()
        );
        assert!(forget_flag_key(&dir, "primary").unwrap());
        assert!(!forget_flag_key(&dir, "primary").unwrap());
        assert_eq!(
            store.check(Some(&dir), "primary", &key(2)).unwrap(),
            PinCheck::Pinned
        );
    }

    #[test]
    fn the_enrollment_list_is_the_pin_for_names_it_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let listed: BTreeMap<String, String> =
            [("primary".to_owned(), hex::encode(key(1).as_bytes()))].into();
        dir.write_json(&dir.flag_keys(), &listed, false).unwrap();
        let store = PinStore::default();
        assert!(matches!(
            store.check(Some(&dir), "primary", &key(2)),
            Err(TrustError::FlagKeyChanged { .. })
        ));
        assert_eq!(
            store.check(Some(&dir), "primary", &key(1)).unwrap(),
            PinCheck::Matches
        );
        let pins = load(&dir).unwrap();
        assert_eq!(pins["primary"].from, "enrollment");
    }

    #[test]
    fn without_a_directory_pins_are_kept_in_memory() {
        let store = PinStore::default();
        assert_eq!(store.check(None, "a", &key(1)).unwrap(), PinCheck::Pinned);
        assert!(store.check(None, "a", &key(3)).is_err());
    }
}
