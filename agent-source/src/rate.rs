//! A per-cycle bandwidth limit shared by all of a cycle's streams (a simple token bucket).

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Lets at most `bytes_per_sec` through on average, with a burst of a quarter second.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    next: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let wait_until = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let burst = Duration::from_millis(250);
            if *next + burst < now {
                *next = now - burst;
            }
            let start = *next;
            *next += cost;
            start
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_the_average_rate() {
        let limit = RateLimit::new(1000);
        let start = Instant::now();
        for _ in 0..10 {
            limit.acquire(500).await;
        }
        // 5000 bytes at 1000 B/s with a 250 ms burst allowance: at least 4.25 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(4250), "{took:?}");
        assert!(took <= Duration::from_millis(5000), "{took:?}");
    }
}
