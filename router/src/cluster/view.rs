//! The node's view of its peers, replaced whole by each heartbeat answer: what placement
//! picks from, and what `GET /peers` shows. A view that is not fresh is not trusted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_core::membership::{Health, MemberStatus};

use super::Cluster;
use super::placement::Member;

/// A view older than this (no heartbeat answer since) is not trusted: serve locally.
const VIEW_STALE_AFTER: Duration = Duration::from_secs(10);

/// A peer as last announced.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) member: Member,
    pub(super) http: SocketAddr,
    /// Idle instances it announced (shown, not weighed).
    free_capacity: u64,
}

#[derive(Debug, Default)]
pub(super) struct View {
    /// Healthy and draining peers (not this node, not gone), by name.
    pub(super) peers: HashMap<String, Peer>,
    /// When the view was learned; `None` before the first heartbeat answer.
    pub(super) learned: Option<Instant>,
}

impl Cluster {
    /// Replaces the view with the members a heartbeat answer listed (this node excluded).
    pub fn learn(&self, members: &[MemberStatus]) {
        let peers = members
            .iter()
            .filter(|status| status.announcement.name != self.options.name)
            .filter(|status| status.health != Health::Gone)
            .filter_map(|status| {
                let announcement = &status.announcement;
                let http = announcement.http?;
                Some((
                    announcement.name.clone(),
                    Peer {
                        member: Member {
                            name: announcement.name.clone(),
                            region: announcement.region.clone(),
                            in_flight: announcement.in_flight,
                            draining: status.health == Health::Draining,
                        },
                        http,
                        free_capacity: announcement.free_capacity,
                    },
                ))
            })
            .collect();
        self.view.store(Arc::new(View {
            peers,
            learned: Some(Instant::now()),
        }));
    }

    /// Whether some peer takes work (so draining this node has somewhere to send requests).
    pub fn has_peers_taking_work(&self) -> bool {
        let view = self.view.load();
        fresh(&view, Instant::now()) && view.peers.values().any(|peer| !peer.member.draining)
    }

    /// The node's view, for `GET /peers` on the admin listener: this node's name, region
    /// and whether it drains; how old the view is; and each peer with its region, address,
    /// announced load and idle instances, whether it drains and whether outlier detection
    /// has ejected it.
    pub fn describe(&self) -> serde_json::Value {
        let now = Instant::now();
        let view = self.view.load();
        let outliers = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
        let mut peers: Vec<&Peer> = view.peers.values().collect();
        peers.sort_by(|a, b| a.member.name.cmp(&b.member.name));
        let peers: Vec<serde_json::Value> = peers
            .into_iter()
            .map(|peer| {
                serde_json::json!({
                    "name": peer.member.name,
                    "region": peer.member.region,
                    "http": peer.http.to_string(),
                    "in_flight": peer.member.in_flight,
                    "free_capacity": peer.free_capacity,
                    "draining": peer.member.draining,
                    "ejected": !outliers.is_healthy(&peer.member.name, now),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.options.name,
            "region": self.options.region,
            "draining": self.is_draining(),
            "region_fallback": self.options.region_fallback,
            "view_age_ms": view.learned.map(|learned| now.saturating_duration_since(learned).as_millis() as u64),
            "view_fresh": fresh(&view, now),
            "peers": peers,
        })
    }
}

pub(super) fn fresh(view: &View, now: Instant) -> bool {
    view.learned
        .is_some_and(|learned| now.saturating_duration_since(learned) < VIEW_STALE_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::options;

    #[test]
    fn the_view_excludes_this_node_and_gone_members_and_goes_stale() {
        use atoll_core::membership::NodeAnnouncement;
        let cluster = Cluster::new(options("a1", "a", &[]));
        assert!(!cluster.has_peers_taking_work(), "no view yet");
        let status = |name: &str, health| MemberStatus {
            announcement: NodeAnnouncement {
                name: name.into(),
                region: "a".into(),
                http: Some("127.0.0.12:80".parse().unwrap()),
                https: None,
                in_flight: 0,
                free_capacity: 0,
                draining: health == Health::Draining,
                sync_lag: 0,
                quarantined: 0,
            },
            age_ms: 0,
            health,
        };
        cluster.learn(&[
            status("a1", Health::Healthy),
            status("a2", Health::Draining),
            status("a3", Health::Gone),
        ]);
        assert!(!cluster.has_peers_taking_work(), "a2 drains, a3 is gone");
        cluster.learn(&[status("a2", Health::Healthy)]);
        assert!(cluster.has_peers_taking_work());
    }

    #[test]
    fn the_peer_listing_shows_what_each_peer_announced() {
        use atoll_core::membership::NodeAnnouncement;
        let cluster = Cluster::new(options("a1", "a", &[]));
        cluster.learn(&[MemberStatus {
            announcement: NodeAnnouncement {
                name: "a2".into(),
                region: "a".into(),
                http: Some("127.0.0.12:80".parse().unwrap()),
                https: None,
                in_flight: 3,
                free_capacity: 7,
                draining: false,
                sync_lag: 0,
                quarantined: 0,
            },
            age_ms: 0,
            health: Health::Healthy,
        }]);
        let peer = &cluster.describe()["peers"][0];
        assert_eq!(peer["name"], "a2");
        assert_eq!(peer["in_flight"], 3);
        assert_eq!(peer["free_capacity"], 7);
    }
}
