//! Cron claims on the embedded store: which node runs each tick, and how it went.
//!
//! Nodes following this registry claim a tick before running it (`POST /v1/cron/{name}`);
//! the first claim wins and later ones are refused, so each tick runs on one node. Claims
//! are remembered for [`CLAIMS_KEPT_SECONDS`] (far past the drift bound, after which no
//! node tries a tick), apart from the last [`KEPT_RUNS`] runs per function that
//! `atoll cron` shows. Both live in memory: a restarted registry forgets past runs, and a
//! tick claimed just before the restart could be claimed again within the drift bound. On
//! NATS both are KV buckets instead (`atoll_control::nats`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use atoll_core::cron::{CLAIMS_KEPT_SECONDS, CronRun, KEPT_RUNS, claim_key};

#[derive(Debug, Default)]
struct Book {
    /// Claim key → (tick, node).
    claims: HashMap<String, (u64, String)>,
    /// Per function, the last runs, oldest first.
    runs: HashMap<String, VecDeque<CronRun>>,
}

/// Claims and the last runs of every function.
#[derive(Debug, Default)]
pub struct CronBook {
    book: Mutex<Book>,
}

impl CronBook {
    /// Records the claim at `now` (Unix seconds); `false` if the tick was claimed already.
    pub fn claim(&self, run: CronRun, now: u64) -> bool {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        book.claims
            .retain(|_, (tick, _)| tick.saturating_add(CLAIMS_KEPT_SECONDS) >= now);
        let key = claim_key(&run.function, run.entry, run.tick);
        if book.claims.contains_key(&key) {
            return false;
        }
        book.claims.insert(key, (run.tick, run.node.clone()));
        let kept = book.runs.entry(run.function.clone()).or_default();
        kept.push_back(run);
        while kept.len() > KEPT_RUNS {
            kept.pop_front();
        }
        true
    }

    /// Records how the claimed run ended; `false` if that node holds no such claim.
    pub fn finish(&self, run: CronRun) -> bool {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let key = claim_key(&run.function, run.entry, run.tick);
        if book.claims.get(&key).is_none_or(|(_, node)| *node != run.node) {
            return false;
        }
        if let Some(known) = book.runs.get_mut(&run.function).and_then(|kept| {
            kept.iter_mut()
                .find(|known| known.entry == run.entry && known.tick == run.tick)
        }) {
            *known = run;
        }
        true
    }

    /// A function's runs, newest first.
    pub fn runs(&self, function: &str) -> Vec<CronRun> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<CronRun> = book
            .runs
            .get(function)
            .map(|kept| kept.iter().cloned().collect())
            .unwrap_or_default();
        list.sort_by(|a, b| b.tick.cmp(&a.tick).then(a.entry.cmp(&b.entry)));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_core::cron::Outcome;

    fn run(entry: usize, tick: u64, node: &str) -> CronRun {
        CronRun {
            function: "f".into(),
            entry,
            path: "/t".into(),
            tick,
            node: node.into(),
            outcome: Outcome::Running,
            duration_ms: None,
        }
    }

    #[test]
    fn the_first_claim_of_a_tick_wins_and_only_its_node_finishes_it() {
        let book = CronBook::default();
        assert!(book.claim(run(0, 10, "a"), 10));
        assert!(!book.claim(run(0, 10, "b"), 10));
        assert!(book.claim(run(1, 10, "b"), 10), "another entry, same tick");
        assert!(book.claim(run(0, 12, "b"), 12));
        assert!(!book.finish(CronRun {
            outcome: Outcome::Status(200),
            ..run(0, 10, "b")
        }));
        assert!(book.finish(CronRun {
            outcome: Outcome::Status(200),
            ..run(0, 10, "a")
        }));
        let runs = book.runs("f");
        assert_eq!(runs.len(), 3);
        assert_eq!((runs[0].tick, runs[1].tick), (12, 10));
        assert!(
            runs.iter()
                .any(|run| run.node == "a" && run.outcome == Outcome::Status(200))
        );
    }

    #[test]
    fn claims_outlive_the_shown_runs_and_are_forgotten_only_long_after() {
        let book = CronBook::default();
        // Eight entries every second fill the shown runs in seconds; the claims stay.
        for tick in 0..20 {
            for entry in 0..8 {
                assert!(book.claim(run(entry, tick, "a"), tick));
            }
        }
        assert_eq!(book.runs("f").len(), KEPT_RUNS);
        assert!(!book.claim(run(0, 0, "b"), 25), "a claimed tick stays claimed");
        assert!(
            book.claim(run(0, 0, "b"), CLAIMS_KEPT_SECONDS + 1),
            "long after, forgotten"
        );
    }
}
