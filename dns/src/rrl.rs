//! Response rate limiting (RRL) of UDP answers per client prefix, as BIND, Knot and NSD do.
//!
//! Why: a UDP answer goes to whatever source address its query claims, so spoofed queries
//! turn an open authoritative server into a reflector aimed at a victim. Limiting the
//! responses each client *prefix* (/24 for IPv4, /56 for IPv6) gets per second bounds what
//! one victim network receives, whoever sends the queries. Over the limit, most responses
//! are dropped and every `slip`-th is replaced by an empty truncated one (TC=1): no bigger
//! than the query, so useless as a weapon, while a real resolver behind that prefix
//! retries over TCP, which cannot be spoofed and is never limited.
//!
//! [`RateLimiter`] is a plain state machine: every call is given the time, so tests drive
//! it with a fake clock and the server passes `Instant::now()`. Each prefix has a token
//! bucket of `per_second` tokens refilled at `per_second` a second, kept as one instant
//! (GCRA, the "theoretical arrival time": the bucket is full again once it is in the
//! past). Memory is bounded: at most `capacity` prefixes are tracked. A prefix whose
//! bucket is full again is indistinguishable from one never seen, so when the table is
//! full those entries are swept out (at most once per [`SWEEP_INTERVAL`], so a flood of
//! new prefixes cannot make every query pay for a sweep); a new prefix that still finds no
//! room shares one overflow bucket with every other such prefix. An attacker spraying
//! source prefixes can thus neither grow the table nor flush out the entry of a prefix
//! being limited, and everything it reaches beyond the table shares one budget.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// Prefixes tracked at most (about 64 bytes each).
pub const DEFAULT_CAPACITY: usize = 65_536;
/// A full table is swept of idle entries at most this often.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// [`RateLimiter::report`] hands out counts at most this often.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Bits of an IPv4 source that make its prefix.
pub const V4_PREFIX_LEN: u32 = 24;
/// Bits of an IPv6 source that make its prefix.
pub const V6_PREFIX_LEN: u32 = 56;

/// How UDP responses are limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Responses a second per client prefix, and the burst allowed at once.
    pub per_second: NonZeroU32,
    /// Over the limit, every `slip`-th response is sent empty and truncated (TC=1), the
    /// others are dropped; 0 drops them all, 1 truncates them all.
    pub slip: u32,
}

/// What to do with one UDP response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: send it.
    Send,
    /// Over the limit, slip: send an empty response with TC=1 instead.
    Slip,
    /// Over the limit: send nothing.
    Drop,
}

/// The client prefix a limit applies to: the source address with its host bits cleared
/// (IPv4-mapped IPv6 addresses count as IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix(IpAddr);

impl Prefix {
    /// The prefix `ip` belongs to.
    pub fn of(ip: IpAddr) -> Prefix {
        Prefix(match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mask = u32::MAX << (32 - V4_PREFIX_LEN);
                IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX << (128 - V6_PREFIX_LEN);
                IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask))
            }
        })
    }

    /// The network address of the prefix.
    pub fn addr(&self) -> IpAddr {
        self.0
    }
}

/// Counts of responses not sent in full, as [`RateLimiter::report`] hands them out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limited {
    /// Responses dropped.
    pub dropped: u64,
    /// Responses replaced by an empty truncated one.
    pub slipped: u64,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// When the bucket is full again; a response is allowed while this is at most
    /// `tolerance` ahead of now.
    full_at: Instant,
    /// Responses refused since the prefix was first limited (drives the slip).
    refused: u32,
}

impl Bucket {
    fn new(now: Instant) -> Bucket {
        Bucket {
            full_at: now,
            refused: 0,
        }
    }
}

/// The per-prefix token buckets; see the module docs.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time one token takes to come back.
    interval: Duration,
    /// How far ahead `full_at` may be for a response to pass: burst − 1 tokens.
    tolerance: Duration,
    slip: u32,
    capacity: usize,
    table: HashMap<Prefix, Bucket>,
    /// Shared by new prefixes that find the table full.
    overflow: Option<Bucket>,
    next_sweep: Option<Instant>,
    next_report: Option<Instant>,
    totals: Limited,
    unreported: Limited,
}

impl RateLimiter {
    /// A limiter tracking at most `capacity` prefixes (at least 1).
    pub fn new(limit: RateLimit, capacity: usize) -> RateLimiter {
        let interval = Duration::from_secs(1) / limit.per_second.get();
        RateLimiter {
            interval,
            tolerance: interval * (limit.per_second.get() - 1),
            slip: limit.slip,
            capacity: capacity.max(1),
            table: HashMap::new(),
            overflow: None,
            next_sweep: None,
            next_report: None,
            totals: Limited::default(),
            unreported: Limited::default(),
        }
    }

    /// Decides about one response to `client` at `now` (times must not go backwards by
    /// much: an earlier `now` only makes the limiter stricter).
    pub fn check(&mut self, client: IpAddr, now: Instant) -> Verdict {
        let prefix = Prefix::of(client);
        if !self.table.contains_key(&prefix) && self.table.len() >= self.capacity {
            self.sweep(now);
        }
        let bucket = if self.table.len() < self.capacity || self.table.contains_key(&prefix) {
            self.table.entry(prefix).or_insert_with(|| Bucket::new(now))
        } else {
            self.overflow.get_or_insert_with(|| Bucket::new(now))
        };
        let start = bucket.full_at.max(now);
        let verdict = if start.duration_since(now) <= self.tolerance {
            bucket.full_at = start + self.interval;
            Verdict::Send
        } else {
            bucket.refused = bucket.refused.wrapping_add(1);
            if self.slip != 0 && bucket.refused.is_multiple_of(self.slip) {
                Verdict::Slip
            } else {
                Verdict::Drop
            }
        };
        for counts in [&mut self.totals, &mut self.unreported] {
            match verdict {
                Verdict::Send => {}
                Verdict::Slip => counts.slipped += 1,
                Verdict::Drop => counts.dropped += 1,
            }
        }
        verdict
    }

    /// Drops the entries whose bucket is full again, unless a sweep ran less than
    /// [`SWEEP_INTERVAL`] ago.
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|next| now < next) {
            return;
        }
        self.next_sweep = Some(now + SWEEP_INTERVAL);
        self.table.retain(|_, bucket| bucket.full_at > now);
        if self.overflow.is_some_and(|bucket| bucket.full_at <= now) {
            self.overflow = None;
        }
    }

    /// Prefixes tracked now (at most the capacity).
    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    /// Everything refused since the limiter was made.
    pub fn totals(&self) -> Limited {
        self.totals
    }

    /// What was refused since the last report, when there is something and the last report
    /// is at least [`REPORT_INTERVAL`] old: for a log line that cannot itself flood.
    pub fn report(&mut self, now: Instant) -> Option<Limited> {
        if self.unreported == Limited::default() || self.next_report.is_some_and(|next| now < next) {
            return None;
        }
        self.next_report = Some(now + REPORT_INTERVAL);
        Some(std::mem::take(&mut self.unreported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, slip: u32) -> RateLimit {
        RateLimit {
            per_second: NonZeroU32::new(per_second).unwrap(),
            slip,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn verdicts(limiter: &mut RateLimiter, client: &str, now: Instant, n: usize) -> Vec<Verdict> {
        (0..n).map(|_| limiter.check(ip(client), now)).collect()
    }

    use Verdict::{Drop, Send, Slip};

    #[test]
    fn prefixes_are_slash_24_and_slash_56() {
        assert_eq!(Prefix::of(ip("192.0.2.77")).addr(), ip("192.0.2.0"));
        assert_eq!(Prefix::of(ip("192.0.2.77")), Prefix::of(ip("192.0.2.1")));
        assert_ne!(Prefix::of(ip("192.0.2.77")), Prefix::of(ip("192.0.3.77")));
        assert_eq!(
            Prefix::of(ip("2001:db8:1:23ff:ffff::1")).addr(),
            ip("2001:db8:1:2300::")
        );
        assert_ne!(
            Prefix::of(ip("2001:db8:1:2300::1")),
            Prefix::of(ip("2001:db8:1:2400::1"))
        );
        assert_eq!(Prefix::of(ip("::ffff:192.0.2.9")), Prefix::of(ip("192.0.2.200")));
    }

    #[test]
    fn a_burst_then_the_rate_with_every_second_refusal_slipped() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(limit(5, 2), 16);
        assert_eq!(verdicts(&mut limiter, "192.0.2.1", t0, 5), [Send; 5]);
        // Same prefix, another host: the same bucket.
        assert_eq!(
            verdicts(&mut limiter, "192.0.2.99", t0, 6),
            [Drop, Slip, Drop, Slip, Drop, Slip]
        );
        // Another prefix has its own bucket.
        assert_eq!(verdicts(&mut limiter, "192.0.3.1", t0, 5), [Send; 5]);
        // One token comes back every 200 ms.
        let t = t0 + Duration::from_millis(199);
        assert_ne!(limiter.check(ip("192.0.2.1"), t), Send);
        let t = t0 + Duration::from_millis(200);
        assert_eq!(limiter.check(ip("192.0.2.1"), t), Send);
        assert_ne!(limiter.check(ip("192.0.2.1"), t), Send);
        // A full second refills the whole burst, no more.
        let t = t0 + Duration::from_secs(5);
        assert_eq!(verdicts(&mut limiter, "192.0.2.1", t, 6)[..5], [Send; 5]);
        assert_ne!(limiter.check(ip("192.0.2.1"), t), Send);
        let totals = limiter.totals();
        assert_eq!(totals.dropped + totals.slipped, 6 + 2 + 2);
    }

    #[test]
    fn a_steady_client_at_the_rate_is_never_refused() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(limit(20, 2), 16);
        for i in 0..200u32 {
            let now = t0 + Duration::from_millis(50) * i;
            assert_eq!(limiter.check(ip("198.51.100.7"), now), Send, "query {i}");
        }
        assert_eq!(limiter.totals(), Limited::default());
    }

    #[test]
    fn slip_zero_drops_all_and_slip_one_truncates_all() {
        let t0 = Instant::now();
        let mut drop_all = RateLimiter::new(limit(1, 0), 4);
        assert_eq!(
            verdicts(&mut drop_all, "192.0.2.1", t0, 4),
            [Send, Drop, Drop, Drop]
        );
        let mut slip_all = RateLimiter::new(limit(1, 1), 4);
        assert_eq!(
            verdicts(&mut slip_all, "192.0.2.1", t0, 4),
            [Send, Slip, Slip, Slip]
        );
        let mut every_third = RateLimiter::new(limit(1, 3), 4);
        assert_eq!(
            verdicts(&mut every_third, "2001:db8::1", t0, 7),
            [Send, Drop, Drop, Slip, Drop, Drop, Slip]
        );
    }

    #[test]
    fn many_prefixes_never_grow_the_table_nor_flush_a_limited_one() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(limit(2, 2), 8);
        // The victim's prefix is being limited.
        assert_eq!(verdicts(&mut limiter, "192.0.2.1", t0, 3), [Send, Send, Drop]);
        // An attacker sprays 10 000 prefixes, one query each, within the same second.
        let mut sent_beyond_table = 0;
        for i in 0..10_000u32 {
            let client = IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 + (i << 8)));
            let now = t0 + Duration::from_micros(u64::from(i) * 50);
            if limiter.check(client, now) == Send {
                sent_beyond_table += 1;
            }
            assert!(limiter.tracked() <= 8);
        }
        // The 7 prefixes that fit got their response; the rest shared one bucket (2 a
        // second, over half a second: its burst plus one token).
        assert!(sent_beyond_table <= 7 + 3, "{sent_beyond_table}");
        // The victim's entry was not flushed: still limited.
        let now = t0 + Duration::from_millis(450);
        assert_ne!(limiter.check(ip("192.0.2.1"), now), Send);
        // Once buckets are full again, a sweep makes room for new prefixes.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(verdicts(&mut limiter, "203.0.113.1", later, 2), [Send, Send]);
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn sweeps_are_rate_limited_too() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(limit(1, 0), 2);
        limiter.check(ip("10.0.1.1"), t0);
        limiter.check(ip("10.0.2.1"), t0);
        // Table full; a sweep finds nothing idle; the overflow bucket answers once.
        assert_eq!(limiter.check(ip("10.0.3.1"), t0), Send);
        // Both entries are idle after 1 s, but the next sweep may only run 1 s after the
        // last one: until then, new prefixes share the overflow bucket.
        let t = t0 + Duration::from_millis(999);
        assert_eq!(limiter.check(ip("10.0.4.1"), t), Drop);
        let t = t0 + SWEEP_INTERVAL;
        assert_eq!(limiter.check(ip("10.0.5.1"), t), Send);
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn reports_are_spaced_and_only_when_something_was_refused() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(limit(1, 2), 4);
        assert_eq!(limiter.report(t0), None);
        verdicts(&mut limiter, "192.0.2.1", t0, 5);
        assert_eq!(
            limiter.report(t0),
            Some(Limited {
                dropped: 2,
                slipped: 2
            })
        );
        verdicts(&mut limiter, "192.0.2.1", t0, 2);
        assert_eq!(limiter.report(t0 + Duration::from_secs(9)), None);
        assert_eq!(
            limiter.report(t0 + REPORT_INTERVAL),
            Some(Limited {
                dropped: 1,
                slipped: 1
            })
        );
        assert_eq!(limiter.report(t0 + REPORT_INTERVAL * 5), None);
    }
}
