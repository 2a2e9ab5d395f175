//! Cluster membership: who the nodes are, where they are, and how busy.
//!
//! Each node announces itself every heartbeat interval; an announcement not renewed within
//! the TTL means the node is gone (crashed, partitioned, or stopped). Nothing is ever
//! deregistered explicitly, so a node that dies without a word leaves the same way as one
//! that shuts down cleanly — the only way that is robust. A node that is draining says so in
//! its announcements: it is alive (its in-flight requests finish) but takes no new work.
//!
//! [`MemberTable`] is the sans-IO core: it is given announcements and the current time and
//! answers who is alive; the registry keeps one in memory for the embedded store (heartbeats
//! rebuild it within one TTL after a restart, so it needs no persistence), and the NATS
//! store keeps the same records in a key-value bucket whose `max_age` is [`FORGET_AFTER_TTLS`]
//! TTLs (a member is listed as gone before it is forgotten).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often nodes announce themselves.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// An announcement older than this means the node is gone.
pub const MEMBER_TTL: Duration = Duration::from_secs(3);
/// A gone member is still listed (as gone) for this many TTLs, so operators see it leave.
pub const FORGET_AFTER_TTLS: u32 = 10;

/// What a node says about itself in every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnnouncement {
    pub name: String,
    pub region: String,
    /// Cleartext HTTP address peers forward to and DNS names (`--advertise` IP + port).
    pub http: Option<SocketAddr>,
    /// HTTPS address, if the node terminates TLS.
    #[serde(default)]
    pub https: Option<SocketAddr>,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Instances made and idle now, summed over every function: requests the node can start
    /// without a cold start. Operators see it per peer in a node's `GET /peers`; placement
    /// weighs `in_flight`, not this.
    #[serde(default)]
    pub free_capacity: u64,
    /// Taken out of rotation: finishes what it has, takes nothing new.
    #[serde(default)]
    pub draining: bool,
    /// Revisions its route table is behind its source (see the node's `GET /sync`).
    #[serde(default)]
    pub sync_lag: u64,
    /// Versions it could not load and retries (quarantined).
    #[serde(default)]
    pub quarantined: u32,
}

/// A member as listed: its last announcement and how old it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    #[serde(flatten)]
    pub announcement: NodeAnnouncement,
    /// Milliseconds since the last announcement.
    pub age_ms: u64,
    /// `healthy`, `draining` or `gone`.
    pub health: Health,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Draining,
    /// Not heard from within the TTL (listed until forgotten, so operators see it go).
    Gone,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Draining => "draining",
            Health::Gone => "gone",
        }
    }
}

/// The members heard from, with when.
#[derive(Debug)]
pub struct MemberTable {
    ttl: Duration,
    members: BTreeMap<String, (NodeAnnouncement, Instant)>,
}

impl MemberTable {
    pub fn new(ttl: Duration) -> Self {
        MemberTable {
            ttl,
            members: BTreeMap::new(),
        }
    }

    /// Records `announcement` as heard at `heard`, unless a later one is already known
    /// (deliveries can arrive out of order after a reconnect).
    pub fn announce(&mut self, announcement: NodeAnnouncement, heard: Instant) {
        match self.members.get_mut(&announcement.name) {
            Some(known) if known.1 > heard => {}
            Some(known) => *known = (announcement, heard),
            None => {
                self.members
                    .insert(announcement.name.clone(), (announcement, heard));
            }
        }
    }

    /// Every member heard from within `ttl × 10`, by name, with its health at `now`; older
    /// ones are forgotten.
    pub fn list(&mut self, now: Instant) -> Vec<MemberStatus> {
        let forget_after = self.ttl * FORGET_AFTER_TTLS;
        self.members
            .retain(|_, (_, heard)| now.saturating_duration_since(*heard) < forget_after);
        self.members
            .values()
            .map(|(announcement, heard)| {
                let age = now.saturating_duration_since(*heard);
                let health = if age >= self.ttl {
                    Health::Gone
                } else if announcement.draining {
                    Health::Draining
                } else {
                    Health::Healthy
                };
                MemberStatus {
                    announcement: announcement.clone(),
                    age_ms: age.as_millis() as u64,
                    health,
                }
            })
            .collect()
    }

    /// Members that take work at `now`: heard within the TTL and not draining.
    pub fn healthy(&mut self, now: Instant) -> Vec<NodeAnnouncement> {
        self.list(now)
            .into_iter()
            .filter(|member| member.health == Health::Healthy)
            .map(|member| member.announcement)
            .collect()
    }
}

/// The regions to try, nearest first: `local`, then its `fallback` list in order, then
/// `others` (every other region a caller could still answer from; empty when only the
/// configured fallbacks may serve), each region once.
///
/// Nodes forward with no `others` (a region not listed is never a fallback); the DNS passes
/// every region that has healthy nodes, so a client is always answered from somewhere.
pub fn region_order<'a>(
    local: &'a str,
    fallback: impl IntoIterator<Item = &'a str>,
    others: impl IntoIterator<Item = &'a str>,
) -> Vec<&'a str> {
    let mut order = vec![local];
    for region in fallback.into_iter().chain(others) {
        if !order.contains(&region) {
            order.push(region);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_order_is_local_then_fallbacks_then_others_each_once() {
        let order = region_order("eu", ["us", "eu", "ap"], ["ap", "sa", "us"]);
        assert_eq!(order, ["eu", "us", "ap", "sa"]);
        assert_eq!(region_order("eu", [], []), ["eu"]);
    }

    #[test]
    fn regions_are_tried_local_first_then_in_order() {
        let fallback = ["b", "a", "c", "b"];
        assert_eq!(region_order("a", fallback, []), vec!["a", "b", "c"]);
    }

    fn announcement(name: &str, draining: bool) -> NodeAnnouncement {
        NodeAnnouncement {
            name: name.into(),
            region: "eu".into(),
            http: Some("127.0.0.11:8080".parse().unwrap()),
            https: None,
            in_flight: 0,
            free_capacity: 10,
            draining,
            sync_lag: 0,
            quarantined: 0,
        }
    }

    #[test]
    fn members_expire_after_the_ttl_and_are_forgotten_later() {
        let start = Instant::now();
        let mut table = MemberTable::new(Duration::from_secs(3));
        table.announce(announcement("a", false), start);
        table.announce(announcement("b", false), start + Duration::from_secs(2));
        let at = |seconds| start + Duration::from_secs(seconds);
        assert_eq!(table.healthy(at(2)).len(), 2);
        let names: Vec<_> = table.healthy(at(3)).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["b"], "a is past its TTL");
        let listed = table.list(at(3));
        assert_eq!(listed[0].health, Health::Gone);
        assert_eq!(listed[0].age_ms, 3000);
        assert_eq!(table.list(at(31)).len(), 1, "a is forgotten after ten TTLs");
    }

    #[test]
    fn a_renewed_announcement_keeps_a_member_alive() {
        let start = Instant::now();
        let mut table = MemberTable::new(Duration::from_secs(3));
        for second in 0..10 {
            table.announce(announcement("a", false), start + Duration::from_secs(second));
        }
        assert_eq!(table.healthy(start + Duration::from_secs(11)).len(), 1);
    }

    #[test]
    fn draining_members_are_listed_but_take_no_work() {
        let start = Instant::now();
        let mut table = MemberTable::new(Duration::from_secs(3));
        table.announce(announcement("a", true), start);
        assert!(table.healthy(start).is_empty());
        assert_eq!(table.list(start)[0].health, Health::Draining);
    }

    #[test]
    fn announcements_round_trip_as_json_with_defaults() {
        let text = r#"{"name":"n1","region":"eu","http":"127.0.0.11:80","in_flight":3}"#;
        let parsed: NodeAnnouncement = serde_json::from_str(text).unwrap();
        assert_eq!(parsed.free_capacity, 0);
        assert!(!parsed.draining);
        let status = MemberStatus {
            announcement: parsed.clone(),
            age_ms: 5,
            health: Health::Healthy,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["health"], "healthy");
        assert_eq!(json["name"], "n1");
        let back: MemberStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
