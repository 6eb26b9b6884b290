//! The model of one direction of an emulated link, as pure logic over a clock given by the
//! caller: a serialising bottleneck of `rate` bits/s with a FIFO of at most `queue` of backlog,
//! followed by a fixed one-way propagation `delay`, and random loss after the bottleneck.

use std::time::Duration;

/// IPv4 + UDP headers: what a datagram costs on the link on top of its payload.
pub const UDP_OVERHEAD: usize = 20 + 8;
/// Payload of a full TCP segment on a 1500-byte link (IPv4 20 + TCP 20 + timestamps 12).
pub const TCP_MSS: usize = 1448;
/// Headers of one such segment.
pub const TCP_OVERHEAD: usize = 1500 - TCP_MSS;

/// Link bytes of a UDP datagram with `payload` bytes.
pub fn udp_wire(payload: usize) -> usize {
    payload + UDP_OVERHEAD
}

/// Link bytes of `payload` bytes of a TCP stream cut into full-sized segments.
pub fn tcp_wire(payload: usize) -> usize {
    payload + payload.div_ceil(TCP_MSS) * TCP_OVERHEAD
}

/// SplitMix64: small, seeded, good enough to decide which datagrams a link drops.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What happens to a packet (or a chunk of a TCP stream) handed to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Arrives at the far end at this time (same clock as `now`).
    Deliver(Duration),
    /// The bottleneck's queue is full: tail drop. Takes no link time.
    QueueFull,
    /// Random loss on the wire, after it used its share of the bottleneck.
    Lost,
}

#[derive(Debug, Clone)]
pub struct Link {
    /// Bits per second; 0 = unlimited.
    rate_bps: f64,
    delay: Duration,
    queue: Duration,
    loss: f64,
    rng: SplitMix64,
    /// When the bottleneck has sent everything it accepted so far.
    busy_until: Duration,
}

impl Link {
    pub fn new(rate_bps: f64, delay: Duration, queue: Duration, loss: f64, seed: u64) -> Self {
        Self {
            rate_bps,
            delay,
            queue,
            loss,
            rng: SplitMix64::new(seed),
            busy_until: Duration::ZERO,
        }
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }

    pub fn queue(&self) -> Duration {
        self.queue
    }

    /// Time the bottleneck still needs for what it holds.
    pub fn backlog(&self, now: Duration) -> Duration {
        self.busy_until.saturating_sub(now)
    }

    /// Time to serialise `wire_bytes` at the link's rate.
    pub fn serialisation(&self, wire_bytes: usize) -> Duration {
        if self.rate_bps <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(wire_bytes as f64 * 8.0 / self.rate_bps)
        }
    }

    /// Hands `wire_bytes` to the link at `now`. `lossy`: random loss applies (datagrams); a
    /// byte stream (`false`) is never dropped, and the caller waits for `backlog() <= queue()`
    /// before handing more instead of being tail-dropped, as a full TCP window would.
    /// `wire_bytes = 0` tells when everything sent so far has arrived (an end of stream).
    pub fn send(&mut self, now: Duration, wire_bytes: usize, lossy: bool) -> Verdict {
        if lossy && self.backlog(now) > self.queue {
            return Verdict::QueueFull;
        }
        let depart = self.busy_until.max(now) + self.serialisation(wire_bytes);
        self.busy_until = depart;
        if lossy && self.loss > 0.0 && self.rng.next_f64() < self.loss {
            return Verdict::Lost;
        }
        Verdict::Deliver(depart + self.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1000.0)
    }

    #[test]
    fn unlimited_link_only_delays() {
        let mut l = Link::new(0.0, ms(20.0), ms(40.0), 0.0, 1);
        for i in 0..1000 {
            let now = ms(i as f64 * 0.001);
            assert_eq!(l.send(now, 65_000, true), Verdict::Deliver(now + ms(20.0)));
        }
    }

    #[test]
    fn rate_spaces_packets_and_keeps_order() {
        // 100 Mbit/s: a 1500-byte packet takes 120 us.
        let mut l = Link::new(100e6, ms(20.0), ms(40.0), 0.0, 1);
        let mut last = Duration::ZERO;
        for i in 0..100u32 {
            let Verdict::Deliver(at) = l.send(Duration::ZERO, 1500, true) else {
                panic!()
            };
            let want = Duration::from_micros(120) * (i + 1) + ms(20.0);
            assert!(
                at.abs_diff(want) < Duration::from_nanos(10),
                "{at:?} != {want:?}"
            );
            assert!(at > last);
            last = at;
        }
        assert!(
            l.backlog(Duration::ZERO)
                .abs_diff(Duration::from_millis(12))
                < Duration::from_nanos(10)
        );
        // An idle link starts afresh: no credit is saved up for later.
        assert_eq!(
            l.send(ms(100.0), 1500, true),
            Verdict::Deliver(ms(100.0) + Duration::from_micros(120) + ms(20.0))
        );
    }

    #[test]
    fn full_queue_tail_drops_datagrams_only() {
        // 1 Mbit/s, 10 ms of queue: 1250 bytes of backlog allowed before a drop.
        let mut l = Link::new(1e6, ms(1.0), ms(10.0), 0.0, 1);
        let mut delivered = 0;
        for _ in 0..10 {
            if let Verdict::Deliver(_) = l.send(Duration::ZERO, 1000, true) {
                delivered += 1;
            }
        }
        // 0 ms, 8 ms backlog accepted; at 16 ms backlog the queue is full.
        assert_eq!(delivered, 2);
        // A stream is never dropped; its writer waits on backlog() instead.
        assert!(matches!(
            l.send(Duration::ZERO, 1000, false),
            Verdict::Deliver(_)
        ));
    }

    #[test]
    fn loss_rate_is_close_to_the_setting_and_seeded() {
        let run = |seed| {
            let mut l = Link::new(0.0, Duration::ZERO, Duration::ZERO, 0.01, seed);
            (0..200_000)
                .map(|_| l.send(Duration::ZERO, 100, true) == Verdict::Lost)
                .collect::<Vec<_>>()
        };
        let a = run(7);
        let lost = a.iter().filter(|&&x| x).count();
        assert!((1800..2200).contains(&lost), "{lost} of 200000 lost at 1 %");
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        // Streams are never lost.
        let mut l = Link::new(0.0, Duration::ZERO, Duration::ZERO, 0.5, 1);
        assert!(
            (0..1000).all(|_| matches!(l.send(Duration::ZERO, 100, false), Verdict::Deliver(_)))
        );
    }

    #[test]
    fn wire_sizes() {
        assert_eq!(udp_wire(1452), 1480);
        assert_eq!(tcp_wire(0), 0);
        assert_eq!(tcp_wire(1), 53);
        assert_eq!(tcp_wire(1448), 1500);
        assert_eq!(tcp_wire(1449), 1449 + 104);
    }
}
