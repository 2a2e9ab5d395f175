//! Scheduled triggers (`[[cron]]`): the schedule syntax, when ticks fall, and what a run
//! leaves behind for `atoll cron NAME`.
//!
//! A schedule is a cron pattern in UTC: five fields (minute granularity, POSIX/Vixie
//! syntax, `@hourly` and the other aliases) or six (a leading seconds field), parsed by the
//! `croner` crate. A tick is a whole second since the Unix epoch; every node computes the
//! same ticks from the same pattern, so a tick names one run across the cluster.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Year};
use serde::{Deserialize, Serialize};

/// Most `[[cron]]` entries one manifest may have.
pub const MAX_ENTRIES: usize = 8;
/// Longest path a cron entry may request.
pub const MAX_PATH_BYTES: usize = 1024;
/// A tick later than this when its node gets to it is skipped (and counted), not run:
/// a node that was paused or overloaded does not fire a burst of stale ticks.
pub const DRIFT_BOUND_SECONDS: u64 = 30;
/// Runs `atoll cron NAME` keeps per function.
pub const KEPT_RUNS: usize = 100;
/// A claim is accepted only for a tick this close to the registry's clock (either way):
/// a node whose clock is far off, or a forged claim, cannot take future ticks.
pub const CLAIM_WINDOW_SECONDS: u64 = DRIFT_BOUND_SECONDS + 30;
/// How long claims are remembered: well past the drift bound, so a late node cannot claim
/// a tick again once it is forgotten.
pub const CLAIMS_KEPT_SECONDS: u64 = 10 * 60;

/// Whether `tick` may be claimed at `now` (both Unix seconds).
pub fn claimable(tick: u64, now: u64) -> bool {
    tick.abs_diff(now) <= CLAIM_WINDOW_SECONDS
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule(Cron);

impl FromStr for Schedule {
    type Err = String;

    fn from_str(pattern: &str) -> Result<Schedule, String> {
        CronParser::builder()
            .year(Year::Disallowed)
            .build()
            .parse(pattern)
            .map(Schedule)
            .map_err(|error| format!("schedule {pattern:?} is not a cron pattern: {error}"))
    }
}

impl Schedule {
    /// The first tick strictly after `after` (Unix seconds); `None` if there is none.
    pub fn next_after(&self, after: u64) -> Option<u64> {
        let start = DateTime::<Utc>::from_timestamp(i64::try_from(after).ok()?, 0)?;
        let next = self.0.find_next_occurrence(&start, false).ok()?;
        u64::try_from(next.timestamp()).ok()
    }
}

/// Checks one entry's path: absolute, printable, bounded.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with /"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("path is {} bytes; at most {MAX_PATH_BYTES}", path.len()));
    }
    if path.chars().any(|c| c.is_control() || c == ' ' || c == '#') {
        return Err(format!("path {path:?} holds a space, `#` or a control character"));
    }
    Ok(())
}

/// How one tick's run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Claimed; the run has not reported yet (or its node went away).
    Running,
    /// Claimed, then not run: too late by then, or the function not served on that node.
    Skipped,
    /// The function answered with this status.
    Status(u16),
}

/// One tick of one entry, as `atoll cron NAME` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronRun {
    pub function: String,
    /// The entry's index in the manifest's `[[cron]]` list.
    pub entry: usize,
    pub path: String,
    /// The tick (Unix seconds).
    pub tick: u64,
    /// The node that ran it.
    pub node: String,
    pub outcome: Outcome,
    /// Wall time of the run, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// The key one tick's claim is stored under: the same on every node, so the first claim
/// wins everywhere. Keys sort by function, entry, then tick (zero-padded).
pub fn claim_key(function: &str, entry: usize, tick: u64) -> String {
    format!("{function}.{entry}.{tick:012}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_and_six_field_patterns_give_utc_ticks() {
        let every_five: Schedule = "*/5 * * * *".parse().unwrap();
        // 2026-12-01T00:02:00Z → 00:05:00Z.
        let base = 1_796_083_320;
        assert_eq!(every_five.next_after(base), Some(base + 180));
        let every_two_seconds: Schedule = "*/2 * * * * *".parse().unwrap();
        assert_eq!(every_two_seconds.next_after(base), Some(base + 2));
        assert_eq!(every_two_seconds.next_after(base + 1), Some(base + 2));
        let hourly: Schedule = "@hourly".parse().unwrap();
        assert_eq!(hourly.next_after(base), Some(base - 120 + 3600));
        let error = "61 * * * *".parse::<Schedule>().unwrap_err();
        assert!(error.contains("not a cron pattern"), "{error}");
        assert!("every day".parse::<Schedule>().is_err());
        assert!("* * * * * * 2027".parse::<Schedule>().is_err(), "no year field");
    }

    #[test]
    fn paths_are_checked_and_claims_sort() {
        assert!(check_path("/tasks/x?full=1").is_ok());
        assert!(check_path("tasks").is_err());
        assert!(check_path("/a b").is_err());
        assert!(claim_key("f", 0, 5) < claim_key("f", 0, 10));
        assert_eq!(claim_key("f", 1, 5), "f.1.000000000005");
    }
}
