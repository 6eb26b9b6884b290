//! Lineage: which history a stack's data belongs to, and who may write the next generation.
//!
//! A warm standby is only safe to fail over to if the old primary, when it comes back, cannot
//! overwrite what the users wrote on the standby since. Two facts decide that, both kept here as
//! pure data and one pure function ([`admit`]):
//!
//! - **Role.** A target holds each stack as a [`Role::Standby`] (it accepts the pushes its
//!   allow-list names) or as [`Role::Promoted`] (an operator made it the primary: it refuses
//!   every push for the stack, [`Refusal::Promoted`], until it is demoted).
//! - **History.** Every copy of a stack's data carries a [`HistoryId`] (16 random bytes), as
//!   DRBD's generation identifiers do. The source keeps it with the data (a small file at the
//!   root of the stack's `path`, [`LINEAGE_FILE`], so that it travels with every generation and
//!   both agents of a host read the same one); the target records the history of every
//!   generation it commits (the flag signs it). Promotion starts a **new** history, forked from
//!   the one the standby held. A push whose history is not the one the target holds is a split
//!   brain: both sides wrote since they parted. It is refused ([`Refusal::Diverged`], naming
//!   both histories) unless the source says so explicitly ([`Claim::replace_diverged`], which
//!   `push --fail-back` and `push --replace-diverged` set): then the target's own tree is kept as
//!   a generation that `rollback` restores, and the push reports it.
//! - **Hand-over.** A fail-back ([`Claim::hand_over`]) makes the receiving copy the primary: the
//!   target records the stack as promoted when it commits (so the host that handed it over is
//!   fenced off by the same refusal), and the source leaves its own copy stopped. The history
//!   does not fork there: the two copies are the same tree at that moment.
//!
//! A target that holds no history yet (its first push, or a store written before lineage
//! existed) takes the history of the first push it commits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::msg::Refusal;

/// The file at the root of a stack's data dir that names its history (see the module doc).
pub const LINEAGE_FILE: &str = ".stackclone-lineage";

/// One history of a stack's data: 16 random bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HistoryId(pub [u8; 16]);

impl HistoryId {
    /// The first 8 hex digits, for messages a person reads.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_owned()
    }
}

impl fmt::Display for HistoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for HistoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HistoryId({self})")
    }
}

/// Why a history id did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a history id is 32 hex digits, not `{0}`")]
pub struct BadHistoryId(pub String);

impl FromStr for HistoryId {
    type Err = BadHistoryId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadHistoryId(s.chars().take(64).collect());
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(HistoryId(out))
    }
}

/// The contents of a [`LINEAGE_FILE`]: the history the data belongs to and, for a history that
/// began with a promotion, the one it forked from and at which generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lineage {
    pub history: HistoryId,
    pub forked_from: Option<(HistoryId, u64)>,
}

/// Why a lineage file did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stackclone lineage file: {0}")]
pub struct BadLineage(pub String);

const LINEAGE_HEADER: &str = "stackclone lineage 1";

impl Lineage {
    /// A new history (from 16 random bytes the caller drew).
    pub fn new(history: HistoryId) -> Self {
        Lineage {
            history,
            forked_from: None,
        }
    }

    /// The file's text: a header line, `history <id>`, and `forked-from <id> <generation>`.
    pub fn to_text(&self) -> String {
        let mut s = format!("{LINEAGE_HEADER}\nhistory {}\n", self.history);
        if let Some((h, g)) = self.forked_from {
            s.push_str(&format!("forked-from {h} {g}\n"));
        }
        s
    }

    /// Parses [`Lineage::to_text`]'s format; anything else is an error that says what is wrong.
    pub fn parse(text: &str) -> Result<Self, BadLineage> {
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(LINEAGE_HEADER) {
            return Err(BadLineage(format!(
                "the first line must be `{LINEAGE_HEADER}`"
            )));
        }
        let mut history = None;
        let mut forked_from = None;
        for line in lines.map(str::trim).filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            match words.as_slice() {
                ["history", id] => {
                    history = Some(id.parse().map_err(|e: BadHistoryId| BadLineage(e.0))?)
                }
                ["forked-from", id, g] => {
                    let id = id.parse().map_err(|e: BadHistoryId| BadLineage(e.0))?;
                    let g = g
                        .parse()
                        .map_err(|_| BadLineage(format!("`{g}` is not a generation")))?;
                    forked_from = Some((id, g));
                }
                _ => {
                    return Err(BadLineage(format!(
                        "unknown line `{}`",
                        line.chars().take(80).collect::<String>()
                    )));
                }
            }
        }
        let history = history.ok_or_else(|| BadLineage("no `history` line".into()))?;
        Ok(Lineage {
            history,
            forked_from,
        })
    }

    /// The history a promotion starts from this one at `generation`.
    pub fn fork(&self, new: HistoryId, generation: u64) -> Lineage {
        Lineage {
            history: new,
            forked_from: Some((self.history, generation)),
        }
    }
}

/// What the source says about the data it is about to push, right after `Hello`
/// ([`crate::msg::SourceMsg::Claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The history of the source's data (its lineage file).
    pub history: HistoryId,
    /// The source knows the target's copy may have diverged and asks to replace it, keeping the
    /// target's tree as a generation (`push --replace-diverged`, and every fail-back).
    pub replace_diverged: bool,
    /// A fail-back (`push --fail-back`): the target's copy becomes the primary once committed.
    pub hand_over: bool,
}

/// A stack's role on a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// Receives pushes from the sources its allow-list names.
    #[default]
    Standby,
    /// Made the primary by `stackclone-target promote` at `at` (Unix seconds): refuses pushes.
    Promoted { at: i64 },
}

impl Role {
    pub fn word(&self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Promoted { .. } => "promoted",
        }
    }
}

/// What a target holds of a stack, for [`admit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub role: Role,
    /// The history of the committed generation; `None` before the first commit (or in a store
    /// from before lineage existed).
    pub history: Option<Lineage>,
    /// The committed generation.
    pub generation: u64,
}

/// Why [`admit`] let a push in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The target holds no history yet: it takes the source's.
    FirstContact,
    /// The source's data continues the history the target holds.
    Continues,
    /// An explicit replacement of a copy of another history (or none), a fail-back or
    /// `--replace-diverged`: the target's tree is kept as a generation before the commit
    /// replaces it.
    FailBack,
}

/// Decides whether a push for `stack` claiming `claim` may go on against what the target holds.
pub fn admit(stack: &str, held: &Held, claim: &Claim) -> Result<Admit, Refusal> {
    if let Role::Promoted { at } = held.role {
        if claim.hand_over {
            return Err(Refusal::TargetIsPrimary {
                stack: stack.to_owned(),
                at,
            });
        }
        return Err(Refusal::Promoted {
            stack: stack.to_owned(),
            at,
            history: held
                .history
                .map(|l| l.history.to_string())
                .unwrap_or_default(),
        });
    }
    match held.history {
        Some(l) if l.history == claim.history => Ok(Admit::Continues),
        _ if claim.replace_diverged || claim.hand_over => Ok(Admit::FailBack),
        None => Ok(Admit::FirstContact),
        Some(l) => Err(Refusal::Diverged {
            stack: stack.to_owned(),
            held: describe(&l, held.generation),
            claimed: claim.history.short(),
        }),
    }
}

/// `1a2b3c4d (generation 7, forked from 5e6f7a8b at generation 5)`.
pub fn describe(l: &Lineage, generation: u64) -> String {
    match l.forked_from {
        Some((from, at)) => format!(
            "{} (generation {generation}, forked from {} at generation {at})",
            l.history.short(),
            from.short()
        ),
        None => format!("{} (generation {generation})", l.history.short()),
    }
}

/// Unix seconds as `2026-12-06 07:31:02 UTC`, for messages (the proto has no clock, but a
/// person reading a refusal wants a date, not a number).
pub fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> HistoryId {
        HistoryId([b; 16])
    }

    #[test]
    fn history_ids_round_trip_and_refuse_garbage() {
        let h = HistoryId(*b"0123456789abcdef");
        assert_eq!(h.to_string().parse::<HistoryId>().unwrap(), h);
        assert_eq!(h.short().len(), 8);
        for bad in ["", "xyz", &"0".repeat(31), &"g".repeat(32), &"0".repeat(33)] {
            assert!(bad.parse::<HistoryId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn lineage_files_round_trip_and_refuse_garbage() {
        let l = Lineage::new(id(1));
        assert_eq!(Lineage::parse(&l.to_text()).unwrap(), l);
        let f = l.fork(id(2), 9);
        assert_eq!(f.forked_from, Some((id(1), 9)));
        assert_eq!(Lineage::parse(&f.to_text()).unwrap(), f);
        assert!(Lineage::parse("").is_err());
        assert!(Lineage::parse("stackclone lineage 1\n").is_err());
        assert!(Lineage::parse(&format!("{}rm -rf /\n", l.to_text())).is_err());
        assert!(Lineage::parse("stackclone lineage 1\nhistory 12\n").is_err());
    }

    #[test]
    fn admit_decides_by_role_then_history() {
        let claim = Claim {
            history: id(1),
            replace_diverged: false,
            hand_over: false,
        };
        let fresh = Held::default();
        assert_eq!(admit("s", &fresh, &claim), Ok(Admit::FirstContact));
        let same = Held {
            history: Some(Lineage::new(id(1))),
            generation: 4,
            ..Held::default()
        };
        assert_eq!(admit("s", &same, &claim), Ok(Admit::Continues));
        let forked = Held {
            history: Some(Lineage::new(id(1)).fork(id(2), 4)),
            generation: 6,
            ..Held::default()
        };
        match admit("s", &forked, &claim) {
            Err(Refusal::Diverged { held, claimed, .. }) => {
                assert!(held.contains(&id(2).short()), "{held}");
                assert!(held.contains(&id(1).short()), "{held}");
                assert!(held.contains("generation 6"), "{held}");
                assert_eq!(claimed, id(1).short());
            }
            other => panic!("{other:?}"),
        }
        let replace_diverged = Claim {
            replace_diverged: true,
            ..claim
        };
        assert_eq!(admit("s", &forked, &replace_diverged), Ok(Admit::FailBack));
        assert_eq!(admit("s", &fresh, &replace_diverged), Ok(Admit::FailBack));
        // Continuing the same history needs no fail-back, even if the source asked for one.
        assert_eq!(admit("s", &same, &replace_diverged), Ok(Admit::Continues));
        // A promoted stack refuses everything; a hand-over is told to demote it first.
        let promoted = Held {
            role: Role::Promoted { at: 1_700_000_000 },
            ..same
        };
        for c in [claim, replace_diverged] {
            assert!(matches!(
                admit("s", &promoted, &c),
                Err(Refusal::Promoted {
                    at: 1_700_000_000,
                    ..
                })
            ));
        }
        let hand_over = Claim {
            hand_over: true,
            ..replace_diverged
        };
        assert_eq!(admit("s", &forked, &hand_over), Ok(Admit::FailBack));
        let r = admit("s", &promoted, &hand_over).unwrap_err();
        assert!(matches!(r, Refusal::TargetIsPrimary { .. }), "{r:?}");
        assert!(r.to_string().contains("demote s"), "{r}");
    }

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_542_262), "2026-12-06 07:31:02 UTC");
        assert_eq!(utc(-1), "1969-12-31 23:59:59 UTC");
    }
}
