//! When a source stack's cycles run: a cron expression in the host's local time, plus an
//! optional random delay after each firing (so a fleet of hosts on `0 3 * * *` does not hit one
//! target at the same second).
//!
//! Five fields (`minute hour day-of-month month day-of-week`) as in crontab, or six with
//! seconds first; names (`MON`, `JAN`) and `L`/`#`/`W` as croner reads them. A schedule whose
//! next time cannot be found (`0 0 30 2 *`) is refused when the config loads.

use std::fmt;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Local};
use croner::Cron;

/// A parsed cron expression.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: Cron,
}

impl Schedule {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let cron: Cron = text
            .parse()
            .map_err(|e: croner::errors::CronError| format!("not a cron expression: {e}"))?;
        let schedule = Schedule {
            text: text.trim().to_owned(),
            cron,
        };
        if schedule.next_after(SystemTime::now()).is_none() {
            return Err("this cron expression never fires".to_owned());
        }
        Ok(schedule)
    }

    /// The expression as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first firing strictly after `now`, in local time; `None` if there is none.
    pub fn next_after(&self, now: SystemTime) -> Option<SystemTime> {
        let now: DateTime<Local> = now.into();
        self.cron
            .find_next_occurrence(&now, false)
            .ok()
            .map(SystemTime::from)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Schedule) -> bool {
        self.text == other.text
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A uniformly random duration in `[0, max]` (millisecond steps), from the OS's generator.
pub fn random_delay(max: Duration) -> Duration {
    let millis = max.as_millis().min(u128::from(u64::MAX)) as u64;
    if millis == 0 {
        return Duration::ZERO;
    }
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness is no reason to skip a cycle: run it on time.
        return Duration::ZERO;
    }
    Duration::from_millis(u64::from_le_bytes(bytes) % (millis + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_firing_follows_the_expression() {
        let s = Schedule::parse(" */5 * * * * * ").expect("six fields, seconds first");
        assert_eq!(s.as_str(), "*/5 * * * * *");
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let next = s.next_after(base).expect("fires");
        let gap = next.duration_since(base).expect("after");
        assert!(
            gap > Duration::ZERO && gap <= Duration::from_secs(5),
            "{gap:?}"
        );
        assert_eq!(
            next.duration_since(SystemTime::UNIX_EPOCH)
                .expect("epoch")
                .as_secs()
                % 5,
            0
        );
        // Strictly after: from a firing time, the next one is 5 s on.
        assert_eq!(
            s.next_after(next).expect("fires"),
            next + Duration::from_secs(5)
        );
    }

    #[test]
    fn five_fields_fire_on_whole_minutes() {
        let s = Schedule::parse("* * * * *").expect("crontab style");
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_030);
        let next = s.next_after(base).expect("fires");
        assert_eq!(
            next.duration_since(SystemTime::UNIX_EPOCH)
                .expect("epoch")
                .as_secs()
                % 60,
            0
        );
        assert!(next.duration_since(base).expect("after") <= Duration::from_secs(60));
    }

    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        for bad in ["", "every day", "61 * * * *", "* * * *", "0 0 30 2 *"] {
            let err = Schedule::parse(bad).expect_err(bad);
            assert!(!err.is_empty(), "{bad}");
        }
    }

    #[test]
    fn random_delay_stays_within_its_bound() {
        assert_eq!(random_delay(Duration::ZERO), Duration::ZERO);
        let max = Duration::from_millis(50);
        let draws: Vec<Duration> = (0..200).map(|_| random_delay(max)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        // 200 draws from 51 values are not all equal unless the generator is broken.
        assert!(draws.iter().any(|d| *d != draws[0]));
    }
}
