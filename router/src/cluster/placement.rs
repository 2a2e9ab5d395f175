//! Where a function's requests should run in a cluster: pure decisions, no I/O, and
//! [`Cluster::place`], their one caller, which feeds them the node's view.
//!
//! Keeping a function's instances warm means sending its requests to the same few nodes, so
//! each function has a small set of *home* nodes per region, chosen by rendezvous (highest
//! random weight) hashing: every node scores `hash(function, node)` and the top `replicas`
//! are home. Every node computes the same answer from the same member list, nothing is
//! coordinated, and a node joining or leaving moves only the functions it wins or loses
//! (about 1/n of them), not everything as modulo hashing would.
//!
//! Among the home nodes a request goes to the less loaded of two picked at random (power of
//! two choices: nearly the balance of asking everyone, at the cost of looking at two). When a
//! region has no healthy home node, the next region in the configured preference order is
//! tried. Health comes from heartbeats (a member that stopped announcing itself is gone) plus
//! passive outlier detection ([`Outliers`]): a peer that fails connections or answers 5xx
//! several times in a row is ejected for a while, then given another chance.
//!
//! [`decide`] puts these together for one request, given the members that may be picked;
//! [`Cluster::place`] builds that list from the node's view, the outliers and its own
//! forwards in flight, and is the only part here that reads shared state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::view::fresh;
use super::{Cluster, ClusterOptions};

/// What placement needs to know about one cluster member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub region: String,
    /// Requests in flight on that node (from its last heartbeat).
    pub in_flight: u64,
    /// A draining node takes no new work: it is never a home and never picked.
    pub draining: bool,
}

/// A stable 64-bit score for (function, member): FNV-1a over both names, then the
/// splitmix64 finalizer so nearby names still spread. Stable across builds and processes,
/// which rendezvous hashing needs (every node must rank members alike).
fn score(function: &str, member: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in function.bytes().chain([0xff]).chain(member.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The `replicas` home nodes of `function` among `members` of `region` that take work, best
/// first. Deterministic for a given member list.
pub fn home_nodes<'a>(
    function: &str,
    region: &str,
    members: &'a [Member],
    replicas: usize,
) -> Vec<&'a Member> {
    let mut candidates: Vec<(u64, &Member)> = members
        .iter()
        .filter(|member| member.region == region && !member.draining)
        .map(|member| (score(function, &member.name), member))
        .collect();
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    candidates
        .into_iter()
        .take(replicas)
        .map(|(_, member)| member)
        .collect()
}

/// The less loaded of two candidates picked with `random` (two draws in `0..len`); the only
/// one if there is one. `random` is injected so tests are deterministic.
pub fn power_of_two<'a>(
    candidates: &[&'a Member],
    mut random: impl FnMut(usize) -> usize,
) -> Option<&'a Member> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        len => {
            let first = random(len);
            let mut second = random(len - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (candidates[first], candidates[second]);
            Some(if b.in_flight < a.in_flight { b } else { a })
        }
    }
}

/// Passive health: consecutive failures eject a peer for a while.
#[derive(Debug)]
pub struct Outliers {
    consecutive_failures: HashMap<String, u32>,
    ejected_until: HashMap<String, Instant>,
    threshold: u32,
    ejection: Duration,
}

impl Outliers {
    /// A peer failing `threshold` times in a row is ejected for `ejection`.
    pub fn new(threshold: u32, ejection: Duration) -> Self {
        Outliers {
            consecutive_failures: HashMap::new(),
            ejected_until: HashMap::new(),
            threshold: threshold.max(1),
            ejection,
        }
    }

    pub fn success(&mut self, peer: &str) {
        self.consecutive_failures.remove(peer);
    }

    /// A connect failure or a 5xx from `peer` at `now`.
    pub fn failure(&mut self, peer: &str, now: Instant) {
        let failures = self.consecutive_failures.entry(peer.to_string()).or_insert(0);
        *failures += 1;
        if *failures >= self.threshold {
            self.ejected_until.insert(peer.to_string(), now + self.ejection);
            self.consecutive_failures.remove(peer);
        }
    }

    /// Whether `peer` may be picked at `now`.
    pub fn is_healthy(&self, peer: &str, now: Instant) -> bool {
        self.ejected_until.get(peer).is_none_or(|until| now >= *until)
    }
}

/// The placement decision, pure: the name of the peer to forward to, or `None` to serve
/// here. `members` includes this node (named `options.name`, `draining` as given) and only
/// peers that may be picked; `random(n)` draws in `0..n`.
pub fn decide(
    function: &str,
    options: &ClusterOptions,
    members: &[Member],
    draining: bool,
    saturated: bool,
    mut random: impl FnMut(usize) -> usize,
) -> Option<String> {
    let me = options.name.as_str();
    // A region not listed is never a fallback: no `others`.
    let fallback = options.region_fallback.iter().map(String::as_str);
    for region in atoll_core::membership::region_order(&options.region, fallback, []) {
        let homes = home_nodes(function, region, members, options.home_replicas);
        let home_here = homes.iter().any(|member| member.name == me);
        if home_here && !saturated {
            return None;
        }
        let peers: Vec<&Member> = homes.into_iter().filter(|member| member.name != me).collect();
        if peers.is_empty() {
            if region == options.region && !draining {
                // Nobody else to ask in the region: this node serves (it is taking work).
                return None;
            }
            continue;
        }
        return power_of_two(&peers, &mut random).map(|member| member.name.clone());
    }
    None
}

impl Cluster {
    /// This node's place among the cluster's nodes (every region) for running `function`'s
    /// cron ticks: 0 for its first home, the node that claims at once; a node ranked
    /// lower waits a little before claiming, so the home wins while it is up. A draining
    /// node ranks last; alone or with a stale view, 0.
    pub fn cron_rank(&self, function: &str) -> usize {
        let now = Instant::now();
        let view = self.view.load();
        if view.peers.is_empty() || !fresh(&view, now) {
            return 0;
        }
        let mut members: Vec<Member> = view
            .peers
            .values()
            .map(|peer| Member {
                region: String::new(),
                ..peer.member.clone()
            })
            .collect();
        if self.is_draining() {
            return members.len();
        }
        members.push(Member {
            name: self.options.name.clone(),
            region: String::new(),
            in_flight: 0,
            draining: false,
        });
        home_nodes(function, "", &members, members.len())
            .iter()
            .position(|member| member.name == self.options.name)
            .unwrap_or(members.len())
    }
}

impl Cluster {
    /// Where a request for `function` should run: `None` here, or the peer to forward to.
    /// `saturated`: this node's pool for the function has no free slot.
    pub fn place(&self, function: &str, saturated: bool) -> Option<(String, SocketAddr)> {
        let now = Instant::now();
        let view = self.view.load();
        // Alone (or with a stale view): nothing to decide, and nothing to allocate.
        if view.peers.is_empty() || !fresh(&view, now) {
            return None;
        }
        let draining = self.is_draining();
        let forwarded = self.forwarded.lock().unwrap_or_else(|p| p.into_inner());
        let outliers = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
        let mut members: Vec<Member> = view
            .peers
            .values()
            .filter(|peer| outliers.is_healthy(&peer.member.name, now))
            .map(|peer| Member {
                in_flight: peer.member.in_flight + forwarded.get(&peer.member.name).copied().unwrap_or(0),
                ..peer.member.clone()
            })
            .collect();
        drop(outliers);
        drop(forwarded);
        members.push(Member {
            name: self.options.name.clone(),
            region: self.options.region.clone(),
            in_flight: 0,
            draining,
        });
        let decision = decide(function, &self.options, &members, draining, saturated, |n| {
            fastrand::usize(..n)
        })?;
        let peer = view.peers.get(&decision)?;
        Some((decision, peer.http))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, region: &str, in_flight: u64) -> Member {
        Member {
            name: name.into(),
            region: region.into(),
            in_flight,
            draining: false,
        }
    }

    fn cluster(count: usize) -> Vec<Member> {
        (0..count)
            .map(|i| member(&format!("node-{i}"), "eu", 0))
            .collect()
    }

    #[test]
    fn homes_are_deterministic_and_stay_in_the_region() {
        let mut members = cluster(6);
        members.push(member("us-1", "us", 0));
        let first: Vec<_> = home_nodes("hello", "eu", &members, 2)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        members.reverse();
        let second: Vec<_> = home_nodes("hello", "eu", &members, 2)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        assert_eq!(first, second, "the order of the member list must not matter");
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|name| name.starts_with("node-")));
        assert_eq!(home_nodes("hello", "us", &members, 2).len(), 1);
    }

    #[test]
    fn functions_spread_over_nodes() {
        let members = cluster(4);
        let mut homes: HashMap<String, usize> = HashMap::new();
        for function in 0..400 {
            let home = home_nodes(&format!("fn-{function}"), "eu", &members, 1)[0];
            *homes.entry(home.name.clone()).or_default() += 1;
        }
        assert_eq!(homes.len(), 4);
        assert!(
            homes.values().all(|&count| (60..=140).contains(&count)),
            "{homes:?}"
        );
    }

    #[test]
    fn a_node_leaving_moves_only_its_functions() {
        let members = cluster(5);
        let without: Vec<Member> = members.iter().filter(|m| m.name != "node-2").cloned().collect();
        for function in 0..200 {
            let name = format!("fn-{function}");
            let before = &home_nodes(&name, "eu", &members, 1)[0].name;
            let after = &home_nodes(&name, "eu", &without, 1)[0].name;
            if before != "node-2" {
                assert_eq!(before, after, "{name} moved although its home stayed");
            }
        }
    }

    #[test]
    fn draining_nodes_are_never_home() {
        let mut members = cluster(3);
        for member in &mut members[..2] {
            member.draining = true;
        }
        let homes = home_nodes("hello", "eu", &members, 2);
        assert_eq!(homes.len(), 1);
        assert_eq!(homes[0].name, "node-2");
    }

    #[test]
    fn power_of_two_picks_the_less_loaded_of_two_distinct_candidates() {
        let a = member("a", "eu", 5);
        let b = member("b", "eu", 1);
        let c = member("c", "eu", 9);
        let candidates = [&a, &b, &c];
        // Draws 0 then 0: the second skips the first, so a (5) against b (1).
        let mut draws = [0, 0].into_iter();
        assert_eq!(
            power_of_two(&candidates, |_| draws.next().unwrap()).unwrap().name,
            "b"
        );
        // Draws 2 then 0: c (9) against a (5).
        let mut draws = [2, 0].into_iter();
        assert_eq!(
            power_of_two(&candidates, |_| draws.next().unwrap()).unwrap().name,
            "a"
        );
        assert_eq!(power_of_two(&[&c], |_| unreachable!()).unwrap().name, "c");
        assert!(power_of_two(&[], |_| unreachable!()).is_none());
    }

    #[test]
    fn consecutive_failures_eject_for_a_while() {
        let start = Instant::now();
        let mut outliers = Outliers::new(3, Duration::from_secs(10));
        outliers.failure("p", start);
        outliers.failure("p", start);
        outliers.success("p");
        outliers.failure("p", start);
        outliers.failure("p", start);
        assert!(outliers.is_healthy("p", start), "a success resets the count");
        outliers.failure("p", start);
        assert!(!outliers.is_healthy("p", start));
        assert!(!outliers.is_healthy("p", start + Duration::from_secs(9)));
        assert!(outliers.is_healthy("p", start + Duration::from_secs(10)));
        assert!(outliers.is_healthy("other", start));
    }
}

/// [`decide`], on member lists built by hand.
#[cfg(test)]
mod decide_tests {
    use super::*;
    use crate::cluster::tests::options;

    fn member(name: &str, region: &str, draining: bool) -> Member {
        Member {
            name: name.into(),
            region: region.into(),
            in_flight: 0,
            draining,
        }
    }

    /// Six nodes, two per region a, b, c.
    fn six(draining_in_a: bool) -> Vec<Member> {
        ["a", "b", "c"]
            .iter()
            .flat_map(|region| {
                (1..=2).map(move |i| member(&format!("{region}{i}"), region, draining_in_a && *region == "a"))
            })
            .collect()
    }

    #[test]
    fn a_home_node_serves_locally_and_others_forward_to_a_home() {
        // Three nodes in a with two homes: exactly one of them is not a home for "f".
        let members = vec![
            member("a1", "a", false),
            member("a2", "a", false),
            member("a3", "a", false),
        ];
        let homes: Vec<String> = home_nodes("f", "a", &members, 2)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        for name in ["a1", "a2", "a3"] {
            let decision = decide("f", &options(name, "a", &[]), &members, false, false, |_| 0);
            if homes.contains(&name.to_string()) {
                assert_eq!(decision, None, "{name} is home");
            } else {
                let to = decision.expect("a non-home forwards");
                assert!(homes.contains(&to), "{name} forwarded to {to}, not a home");
            }
        }
    }

    #[test]
    fn a_saturated_home_forwards_to_the_other_home() {
        let members = vec![member("a1", "a", false), member("a2", "a", false)];
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &members, false, false, |_| 0),
            None
        );
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &members, false, true, |_| 0).as_deref(),
            Some("a2")
        );
        // Alone and saturated: nobody to ask, so it queues here.
        let alone = vec![member("a1", "a", false)];
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &alone, false, true, |_| 0),
            None
        );
    }

    #[test]
    fn a_non_home_forwards_to_the_less_loaded_of_two_homes() {
        // Three nodes, two homes for "f": the third node picks between them by load,
        // whichever of the two is busier and whichever order the homes rank in.
        let mut members = vec![
            member("a1", "a", false),
            member("a2", "a", false),
            member("a3", "a", false),
        ];
        let homes: Vec<String> = home_nodes("f", "a", &members, 2)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        let front = members
            .iter()
            .find(|m| !homes.contains(&m.name))
            .unwrap()
            .name
            .clone();
        for (busy, idle) in [(&homes[0], &homes[1]), (&homes[1], &homes[0])] {
            for member in &mut members {
                member.in_flight = if &member.name == busy { 7 } else { 1 };
            }
            // Every draw: both homes are compared, so the choice is by load alone.
            for draw in 0..2 {
                let to = decide("f", &options(&front, "a", &[]), &members, false, false, |n| {
                    draw.min(n - 1)
                });
                assert_eq!(to.as_ref(), Some(idle), "{busy} is busier (draw {draw})");
            }
        }
    }

    #[test]
    fn a_draining_node_forwards_to_its_region_then_to_the_fallbacks() {
        let mut members = six(false);
        members.iter_mut().find(|m| m.name == "a1").unwrap().draining = true;
        let to = decide(
            "f",
            &options("a1", "a", &["b", "c"]),
            &members,
            true,
            false,
            |_| 0,
        );
        assert_eq!(to.as_deref(), Some("a2"), "the region's other node");

        let members = six(true);
        let to = decide(
            "f",
            &options("a1", "a", &["c", "b"]),
            &members,
            true,
            false,
            |_| 0,
        )
        .unwrap();
        assert!(to.starts_with('c'), "first fallback region, got {to}");
        let to = decide("f", &options("a1", "a", &["b"]), &members, true, false, |_| 0).unwrap();
        assert!(to.starts_with('b'), "got {to}");
        // Draining with no fallback configured and no peer in the region: serve here.
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &members, true, false, |_| 0),
            None
        );
    }

    #[test]
    fn a_forwarded_request_never_comes_back() {
        // Whatever a node decides, the peer it names would serve the request itself (it is
        // a home and not saturated), so one hop is the most a request takes.
        let members = six(false);
        for function in ["f", "g", "h", "shop", "api"] {
            for from in &members {
                let opts = options(&from.name, &from.region, &["b", "c"]);
                if let Some(to) = decide(function, &opts, &members, false, false, |_| 0) {
                    let peer = members.iter().find(|m| m.name == to).unwrap();
                    let peer_opts = options(&peer.name, &peer.region, &["b", "c"]);
                    assert_eq!(decide(function, &peer_opts, &members, false, false, |_| 0), None);
                }
            }
        }
    }
}
