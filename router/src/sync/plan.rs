//! The pure part of following the control plane: what a watch event requires of the node,
//! and how long to wait before trying again. No I/O and no clock, so it is tested on plain
//! values.

use std::collections::HashMap;
use std::time::Duration;

use atoll_core::{Deployment, WatchEvent};

use super::SyncError;

/// How long the watch waits before it resumes after a failure: doubling from the first
/// to the longest, back to the first once it is in sync again.
pub(super) const BACKOFF_START: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// First and longest wait before a quarantined version is tried again.
const QUARANTINE_BACKOFF_START: Duration = Duration::from_secs(1);
const QUARANTINE_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What applying an event takes.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Load this deployment, then publish.
    Load(Box<Deployment>),
    /// Remove the function, then publish.
    Remove(String),
    /// Nothing changes in the table; just record the revision.
    Advance,
    /// The initial catch-up is complete.
    MarkSynced,
}

/// Decides what `event` requires, given what is served now (name → (version, sha256)); only
/// the event's own function is looked up.
pub fn plan(event: WatchEvent, served: &HashMap<String, (u64, String)>) -> Plan {
    match event {
        WatchEvent::Put { deployment, .. } => match served.get(&deployment.name) {
            Some((version, sha256)) if *version == deployment.version && *sha256 == deployment.sha256 => {
                Plan::Advance
            }
            _ => Plan::Load(Box::new(deployment)),
        },
        WatchEvent::Delete { name, .. } if served.contains_key(&name) => Plan::Remove(name),
        WatchEvent::Delete { .. } | WatchEvent::Heartbeat { .. } => Plan::Advance,
        WatchEvent::Synced { .. } => Plan::MarkSynced,
    }
}

/// How long a version that failed to load `failures` times in a row (at least once), the
/// last time with `error`, waits before it is tried again: doubling from
/// [`QUARANTINE_BACKOFF_START`], up to [`QUARANTINE_BACKOFF_MAX`] or, for a cause that
/// passes by itself, [`BACKOFF_MAX`].
pub(super) fn quarantine_backoff(error: &SyncError, failures: u32) -> Duration {
    // The source failing is retried as often as the watch is; a version that does not load
    // here backs off further.
    let longest = match error {
        SyncError::Control(_) | SyncError::Cache(_) => BACKOFF_MAX,
        _ => QUARANTINE_BACKOFF_MAX,
    };
    QUARANTINE_BACKOFF_START
        .saturating_mul(1 << (failures - 1).min(16))
        .min(longest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::deployment;

    #[test]
    fn new_function_or_new_version_is_loaded() {
        let mut served = HashMap::new();
        let put = |d: Deployment| WatchEvent::Put {
            revision: 1,
            deployment: d,
        };
        assert_eq!(
            plan(put(deployment("a", 1, "aa")), &served),
            Plan::Load(Box::new(deployment("a", 1, "aa")))
        );
        served.insert("a".to_string(), (1, "aa".to_string()));
        assert_eq!(plan(put(deployment("a", 1, "aa")), &served), Plan::Advance);
        assert_eq!(
            plan(put(deployment("a", 2, "bb")), &served),
            Plan::Load(Box::new(deployment("a", 2, "bb")))
        );
        // A rollback to v1 is a Put of v1: loaded again.
        served.insert("a".to_string(), (2, "bb".to_string()));
        assert_eq!(
            plan(put(deployment("a", 1, "aa")), &served),
            Plan::Load(Box::new(deployment("a", 1, "aa")))
        );
    }

    #[test]
    fn deletes_heartbeats_and_synced() {
        let mut served = HashMap::new();
        served.insert("a".to_string(), (1, "aa".to_string()));
        assert_eq!(
            plan(
                WatchEvent::Delete {
                    revision: 2,
                    name: "a".into()
                },
                &served
            ),
            Plan::Remove("a".into())
        );
        assert_eq!(
            plan(
                WatchEvent::Delete {
                    revision: 2,
                    name: "b".into()
                },
                &served
            ),
            Plan::Advance
        );
        assert_eq!(
            plan(WatchEvent::Heartbeat { revision: 9 }, &served),
            Plan::Advance
        );
        assert_eq!(
            plan(WatchEvent::Synced { revision: 9 }, &served),
            Plan::MarkSynced
        );
    }

    #[test]
    fn a_quarantined_version_waits_longer_after_each_failure() {
        let load = SyncError::Load {
            name: "f".into(),
            version: 1,
            reason: "init trapped".into(),
        };
        let waits: Vec<u64> = (1..=10)
            .map(|failures| quarantine_backoff(&load, failures).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(quarantine_backoff(&load, u32::MAX), QUARANTINE_BACKOFF_MAX);
        // The source or the disk failing is retried as often as the watch is.
        let disk = SyncError::Cache(std::io::Error::other("disk full"));
        assert_eq!(quarantine_backoff(&disk, 1), QUARANTINE_BACKOFF_START);
        assert_eq!(quarantine_backoff(&disk, 4), BACKOFF_MAX);
        let unreachable = SyncError::Control(atoll_control::ControlError::Silent);
        assert_eq!(quarantine_backoff(&unreachable, 9), BACKOFF_MAX);
        let missing = SyncError::Control(atoll_control::ControlError::Nats(
            atoll_core::StoreError::NotFound("no blob".into()),
        ));
        assert_eq!(quarantine_backoff(&missing, 9), BACKOFF_MAX);
    }
}
