//! The staleness watch: a stack with `max_age` whose last commit is older than that is *stale*.
//!
//! [`Staleness`] keeps, per stack, when its last generation was committed (read from the
//! store's `state` when the agent starts or a reload adds the stack, then updated by every
//! commit) and whether it is stale now. [`Staleness::check`] compares that with each stack's
//! `max_age` at a given time and returns only the *changes*, so the daemon alerts once when a
//! stack goes stale and again only after a commit re-armed it. It holds no timer and sends
//! nothing: the daemon ticks it ([`check_period`]) and turns changes into alerts and the
//! `stackclone_stale` gauge.
//!
//! A stack that has never been committed counts from when the agent started watching it (its
//! start, or the reload that added it): a fresh standby is not stale the moment it starts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// The stacks the watch checks, by name, each with its `max_age` (`None`: never stale).
pub type MaxAges = std::collections::BTreeMap<String, Option<Duration>>;

/// The fastest and slowest the daemon checks.
const MIN_PERIOD: Duration = Duration::from_millis(100);
const MAX_PERIOD: Duration = Duration::from_secs(60);

/// What the watch knows of one stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// The last committed generation (0: none yet).
    pub generation: u64,
    /// When it was committed, if known.
    pub committed_at: Option<SystemTime>,
    /// When the agent started watching the stack: the age counts from here while there is no
    /// commit.
    pub watched_since: SystemTime,
    /// Past its `max_age` at the last check.
    pub stale: bool,
}

impl Freshness {
    /// How old the stack's data is at `now`.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.committed_at.unwrap_or(self.watched_since))
            .unwrap_or_default()
    }
}

/// A change [`Staleness::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `stack` just went past its `max_age`.
    Stale {
        stack: String,
        age: Duration,
        max_age: Duration,
        freshness: Freshness,
    },
    /// `stack` was stale and no longer is without a commit (its `max_age` was raised or
    /// removed by a reload). A commit clears staleness through [`Staleness::committed`].
    Fresh { stack: String },
}

/// Per-stack commit times and staleness of a running target.
#[derive(Debug)]
pub struct Staleness {
    started: SystemTime,
    stacks: Mutex<HashMap<String, Freshness>>,
}

impl Staleness {
    /// A watch whose untracked stacks count from `started`.
    pub fn new(started: SystemTime) -> Staleness {
        Staleness {
            started,
            stacks: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Freshness>> {
        self.stacks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the store says of `stack` (at start, or when a reload adds or moves it);
    /// `since` is when watching it began. Whether it is stale is kept, so a stack that stays
    /// stale across a reload is not alerted twice.
    pub fn track(
        &self,
        stack: &str,
        generation: u64,
        committed_at: Option<SystemTime>,
        since: SystemTime,
    ) {
        let mut stacks = self.lock();
        let stale = stacks.get(stack).is_some_and(|f| f.stale);
        stacks.insert(
            stack.to_owned(),
            Freshness {
                generation,
                committed_at,
                watched_since: since,
                stale,
            },
        );
    }

    /// Stops watching stacks `keep` says no to (removed by a reload).
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        self.lock().retain(|name, _| keep(name));
    }

    /// A commit of `generation` landed at `at`. Returns whether the stack was stale.
    pub fn committed(&self, stack: &str, generation: u64, at: SystemTime) -> bool {
        let mut stacks = self.lock();
        let f = stacks.entry(stack.to_owned()).or_insert(Freshness {
            generation,
            committed_at: None,
            watched_since: at,
            stale: false,
        });
        let was_stale = f.stale;
        f.generation = generation;
        f.committed_at = Some(at);
        f.stale = false;
        was_stale
    }

    /// What the watch knows of `stack`.
    pub fn get(&self, stack: &str) -> Option<Freshness> {
        self.lock().get(stack).copied()
    }

    /// Compares every served stack with its `max_age` at `now` and returns what changed since
    /// the last check. A served stack the watch does not know yet counts from the watch's start.
    pub fn check(&self, served: &MaxAges, now: SystemTime) -> Vec<Change> {
        let mut stacks = self.lock();
        let mut changes = Vec::new();
        for (name, &max_age) in served {
            let f = stacks.entry(name.clone()).or_insert(Freshness {
                generation: 0,
                committed_at: None,
                watched_since: self.started,
                stale: false,
            });
            let age = f.age(now);
            match max_age {
                Some(max_age) if age > max_age => {
                    if !f.stale {
                        f.stale = true;
                        changes.push(Change::Stale {
                            stack: name.clone(),
                            age,
                            max_age,
                            freshness: *f,
                        });
                    }
                }
                _ => {
                    if f.stale {
                        f.stale = false;
                        changes.push(Change::Fresh {
                            stack: name.clone(),
                        });
                    }
                }
            }
        }
        changes
    }
}

/// How often the daemon checks: a tenth of the smallest `max_age`, between 100 ms and 60 s (a
/// stack goes stale at most 10 % of its `max_age` late); 60 s when no stack has one.
pub fn check_period(served: &MaxAges) -> Duration {
    served
        .values()
        .filter_map(|age| *age)
        .min()
        .map_or(MAX_PERIOD, |age| (age / 10).clamp(MIN_PERIOD, MAX_PERIOD))
}

/// A duration for people: `250ms`, `45s`, `12m 5s`, `26h 3m` (hours up to two days, as a
/// `max_age` is usually written), `3d 4h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (hours, minutes, seconds) = (s / 3600, s / 60 % 60, s % 60);
    let (days, day_hours) = (s / 86_400, hours % 24);
    let mut out = if s == 0 {
        format!("{}ms", d.as_millis())
    } else if hours == 0 && minutes == 0 {
        format!("{seconds}s")
    } else if hours == 0 {
        format!("{minutes}m {seconds}s")
    } else if hours < 48 {
        format!("{hours}h {minutes}m")
    } else {
        format!("{days}d {day_hours}h")
    };
    for zero in [" 0s", " 0m", " 0h"] {
        if let Some(cut) = out.strip_suffix(zero) {
            out = cut.to_owned();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(max_age: Option<u64>) -> MaxAges {
        [("web".to_string(), max_age.map(Duration::from_secs))].into()
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn goes_stale_once_and_rearms_after_a_commit() {
        let w = Staleness::new(t(0));
        let stacks = served(Some(10));
        w.track("web", 4, Some(t(0)), t(0));
        assert_eq!(w.check(&stacks, t(10)), vec![]);
        let changes = w.check(&stacks, t(11));
        match &changes[..] {
            [
                Change::Stale {
                    stack,
                    age,
                    max_age,
                    freshness,
                },
            ] => {
                assert_eq!(stack, "web");
                assert_eq!(*age, Duration::from_secs(11));
                assert_eq!(*max_age, Duration::from_secs(10));
                assert_eq!(freshness.generation, 4);
            }
            other => panic!("{other:?}"),
        }
        // Still stale: no second alert.
        assert_eq!(w.check(&stacks, t(20)), vec![]);
        assert_eq!(w.check(&stacks, t(300)), vec![]);
        assert!(w.get("web").unwrap().stale);
        // A commit clears it quietly and re-arms the watch.
        assert!(w.committed("web", 5, t(301)));
        assert!(!w.get("web").unwrap().stale);
        assert_eq!(w.check(&stacks, t(311)), vec![]);
        assert!(matches!(
            &w.check(&stacks, t(312))[..],
            [Change::Stale { .. }]
        ));
    }

    #[test]
    fn without_a_commit_the_age_counts_from_when_watching_began() {
        let w = Staleness::new(t(100));
        let stacks = served(Some(10));
        // Untracked: from the watch's start.
        assert_eq!(w.check(&stacks, t(110)), vec![]);
        assert_eq!(w.check(&stacks, t(111)).len(), 1);
        // Tracked with no commit from a later time (a reload added it).
        let w = Staleness::new(t(0));
        w.track("web", 0, None, t(50));
        assert_eq!(w.check(&stacks, t(60)), vec![]);
        assert_eq!(w.check(&stacks, t(61)).len(), 1);
    }

    #[test]
    fn raising_or_removing_max_age_clears_staleness() {
        let w = Staleness::new(t(0));
        w.track("web", 1, Some(t(0)), t(0));
        assert_eq!(w.check(&served(Some(10)), t(20)).len(), 1);
        assert_eq!(
            w.check(&served(Some(60)), t(21)),
            vec![Change::Fresh {
                stack: "web".into()
            }]
        );
        assert_eq!(w.check(&served(Some(10)), t(22)).len(), 1);
        assert_eq!(w.check(&served(None), t(23)).len(), 1);
        assert_eq!(w.check(&served(None), t(9999)), vec![]);
    }

    #[test]
    fn tracking_again_keeps_staleness_so_a_reload_does_not_alert_twice() {
        let w = Staleness::new(t(0));
        w.track("web", 1, Some(t(0)), t(0));
        assert_eq!(w.check(&served(Some(10)), t(20)).len(), 1);
        w.track("web", 1, Some(t(0)), t(0));
        assert_eq!(w.check(&served(Some(10)), t(21)), vec![]);
    }

    #[test]
    fn period_is_a_tenth_of_the_smallest_max_age_within_bounds() {
        assert_eq!(check_period(&served(None)), Duration::from_secs(60));
        assert_eq!(check_period(&served(Some(2))), Duration::from_millis(200));
        assert_eq!(check_period(&served(Some(120))), Duration::from_secs(12));
        assert_eq!(
            check_period(&served(Some(26 * 3600))),
            Duration::from_secs(60)
        );
        let tiny = [("web".to_string(), Some(Duration::from_millis(300)))].into();
        assert_eq!(check_period(&tiny), Duration::from_millis(100));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(45)), "45s");
        assert_eq!(human(Duration::from_secs(120)), "2m");
        assert_eq!(human(Duration::from_secs(725)), "12m 5s");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_secs(26 * 3600 + 180)), "26h 3m");
        assert_eq!(
            human(Duration::from_secs(3 * 86_400 + 4 * 3600 + 59)),
            "3d 4h"
        );
        assert_eq!(human(Duration::from_secs(2 * 86_400)), "2d");
    }
}
