//! Where a function's requests should run in a cluster: pure decisions, no I/O.
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

use std::collections::HashMap;
use std::time::{Duration, Instant};

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
