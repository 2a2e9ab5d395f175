//! Where the DNS learns the cluster, and the poller that keeps its view fresh.
//!
//! The DNS reads the cluster from a [`ControlPlane`]: a registry (`GET /v1/nodes` +
//! `GET /v1/functions`) or the NATS store the registries share (its member bucket +
//! function records), read directly so the DNS keeps working without any registry process
//! up. [`poll`] asks it every
//! [`POLL_INTERVAL`] and swaps a fresh [`ClusterView`] into an [`ArcSwap`] that queries read
//! without locking.
//!
//! Static stability: when the source fails, the last good view stays — the DNS keeps naming
//! the nodes it knew rather than go dark because its control plane did. A failure is logged
//! once when the outage starts and once when it ends ([`OutageLog`]), not every 500 ms.
//! Polling (rather than watching) keeps this simple and bounds staleness: a dead node
//! leaves the answers within one member TTL plus one poll.
//!
//! A member list that is suddenly *empty* is held back for one member TTL
//! ([`EmptyMembers`]): dead nodes are listed as gone for ten TTLs before they are forgotten,
//! so an empty list while we know healthy nodes means the list itself was reset — a
//! registry restarted (its table is in memory) or a NATS watch is still replaying — and
//! heartbeats refill it within a second. Publishing it would answer NODATA for every name
//! in the meantime.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use atoll_control::{ControlError, ControlPlane};
use atoll_core::membership::MEMBER_TTL;

use crate::cluster::{ClusterSnapshot, ClusterView, route_host};

/// How often the source is asked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Longest one poll may take before it counts as a failure.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(3);

/// Members and routed domains from `control`, now.
pub async fn snapshot(control: &ControlPlane) -> Result<ClusterSnapshot, ControlError> {
    let (members, routes) = control.members_and_routes().await?;
    let mut domains: Vec<String> = routes.iter().map(|r| route_host(r).to_owned()).collect();
    domains.sort_unstable();
    domains.dedup();
    Ok(ClusterSnapshot { members, domains })
}

/// Tracks whether the source is in an outage, so each outage is logged once.
#[derive(Debug, Default)]
pub struct OutageLog {
    failing_since: Option<u64>,
    failures: u64,
}

/// What to log after a poll.
#[derive(Debug, PartialEq, Eq)]
pub enum OutageEvent {
    /// The first failure after success (or at start).
    Started,
    /// The first success after `failures` failures.
    Ended {
        /// How many polls failed in a row.
        failures: u64,
    },
}

impl OutageLog {
    /// Records a poll's outcome at `now_ms`; says what to log, if anything.
    pub fn record(&mut self, ok: bool, now_ms: u64) -> Option<OutageEvent> {
        match (ok, self.failing_since) {
            (true, None) => None,
            (true, Some(_)) => {
                let failures = std::mem::take(&mut self.failures);
                self.failing_since = None;
                Some(OutageEvent::Ended { failures })
            }
            (false, None) => {
                self.failing_since = Some(now_ms);
                self.failures = 1;
                Some(OutageEvent::Started)
            }
            (false, Some(_)) => {
                self.failures += 1;
                None
            }
        }
    }
}

/// Holds back empty member lists that look like a reset table rather than a dead cluster.
#[derive(Debug, Default)]
pub struct EmptyMembers {
    empty_since: Option<Instant>,
}

impl EmptyMembers {
    /// Whether to skip `snapshot` (keep `current`) at `now`: its member list is empty while
    /// `current` names healthy nodes (or knows nothing yet), for less than one member TTL.
    pub fn hold(&mut self, current: &ClusterView, snapshot: &ClusterSnapshot, now: Instant) -> bool {
        if !snapshot.members.is_empty() {
            self.empty_since = None;
            return false;
        }
        if current.is_known() && current.regions().is_empty() {
            return false;
        }
        let since = *self.empty_since.get_or_insert(now);
        now.saturating_duration_since(since) < MEMBER_TTL
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Installs the view of `snapshot` in `state` unless it answers exactly as the current one
/// does; moves the serial when it changes anything. Returns whether it changed.
pub fn install(state: &ArcSwap<ClusterView>, snapshot: &ClusterSnapshot, now_unix: u64) -> bool {
    let current = state.load();
    let candidate = ClusterView::new(snapshot, current.serial());
    if candidate.same_answers(&current) {
        return false;
    }
    let serial = ClusterView::next_serial(current.serial(), now_unix);
    state.store(Arc::new(ClusterView::new(snapshot, serial)));
    true
}

/// Polls `source` every [`POLL_INTERVAL`] into `state` until `shutdown` completes. The
/// first poll happens at once.
pub async fn poll(
    source: ControlPlane,
    state: Arc<ArcSwap<ClusterView>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outages = OutageLog::default();
    let mut empty_members = EmptyMembers::default();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            _ = &mut shutdown => return,
            result = tokio::time::timeout(POLL_TIMEOUT, snapshot(&source)) => match result {
                Ok(result) => result,
                Err(_) => Err(ControlError::Timeout(POLL_TIMEOUT)),
            },
        };
        let now = unix_now();
        let event = outages.record(result.is_ok(), now.as_millis() as u64);
        match result {
            Ok(snapshot) => {
                if let Some(OutageEvent::Ended { failures }) = event {
                    tracing::info!("cluster source is back after {failures} failed polls");
                }
                if empty_members.hold(&state.load(), &snapshot, Instant::now()) {
                    tracing::debug!("the member list is empty: holding the last one for a member TTL");
                    continue;
                }
                if install(&state, &snapshot, now.as_secs()) {
                    tracing::debug!(
                        serial = state.load().serial(),
                        members = snapshot.members.len(),
                        domains = snapshot.domains.len(),
                        "DNS answers changed"
                    );
                }
            }
            Err(error) => {
                if event == Some(OutageEvent::Started) {
                    let known = if state.load().is_known() {
                        "answering from the last good snapshot until it is back"
                    } else {
                        "no snapshot yet: routed names answer SERVFAIL until it is back"
                    };
                    tracing::warn!("cluster source failed: {error}; {known}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use atoll_core::membership::Health;

    use super::*;
    use crate::cluster::tests::member;

    #[test]
    fn outages_are_reported_once_each() {
        let mut log = OutageLog::default();
        assert_eq!(log.record(true, 0), None);
        assert_eq!(log.record(false, 1), Some(OutageEvent::Started));
        assert_eq!(log.record(false, 2), None);
        assert_eq!(log.record(false, 3), None);
        assert_eq!(log.record(true, 4), Some(OutageEvent::Ended { failures: 3 }));
        assert_eq!(log.record(true, 5), None);
        assert_eq!(log.record(false, 6), Some(OutageEvent::Started));
    }

    #[test]
    fn install_moves_the_serial_only_on_change() {
        let state = ArcSwap::from_pointee(ClusterView::unknown(0));
        let mut snapshot = ClusterSnapshot {
            members: vec![member("a", "eu", "10.0.0.1:80", Health::Healthy)],
            domains: vec!["x.example.com".into()],
        };
        assert!(install(&state, &snapshot, 1000));
        assert_eq!(state.load().serial(), 1000);
        assert!(!install(&state, &snapshot, 2000), "nothing changed");
        assert_eq!(state.load().serial(), 1000);
        snapshot.members[0].age_ms = 999;
        assert!(!install(&state, &snapshot, 2000), "ages do not change answers");
        snapshot.members[0].health = Health::Gone;
        assert!(install(&state, &snapshot, 1000));
        assert_eq!(state.load().serial(), 1001, "strictly increasing within a second");
    }

    #[test]
    fn empty_member_lists_are_held_for_one_ttl_when_they_look_like_a_reset() {
        let start = Instant::now();
        let healthy = ClusterSnapshot {
            members: vec![member("a", "eu", "10.0.0.1:80", Health::Healthy)],
            domains: vec!["x.example.com".into()],
        };
        let empty = ClusterSnapshot {
            members: vec![],
            domains: healthy.domains.clone(),
        };
        let known = ClusterView::new(&healthy, 1);
        let mut guard = EmptyMembers::default();
        assert!(!guard.hold(&known, &healthy, start));
        assert!(guard.hold(&known, &empty, start));
        assert!(guard.hold(&known, &empty, start + MEMBER_TTL / 2));
        assert!(
            !guard.hold(&known, &empty, start + MEMBER_TTL),
            "a real empty cluster gets through"
        );
        // Heartbeats back: the clock restarts.
        assert!(!guard.hold(&known, &healthy, start + MEMBER_TTL * 2));
        assert!(guard.hold(&known, &empty, start + MEMBER_TTL * 3));
        // Before the first snapshot too (a NATS watch still replaying).
        let mut guard = EmptyMembers::default();
        assert!(guard.hold(&ClusterView::unknown(1), &empty, start));
        // Nothing healthy known: nothing to protect.
        let mut gone = healthy.clone();
        gone.members[0].health = Health::Gone;
        let mut guard = EmptyMembers::default();
        assert!(!guard.hold(&ClusterView::new(&gone, 1), &empty, start));
    }

    #[test]
    fn route_hosts() {
        assert_eq!(route_host("api.example.com/echo"), "api.example.com");
        assert_eq!(route_host("*.w.example.com"), "*.w.example.com");
    }
}
