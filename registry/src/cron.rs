//! Cron claims on the embedded store: which node runs each tick, and how it went.
//!
//! Nodes following this registry claim a tick before running it (`POST /v1/cron/{name}`);
//! the first claim wins and later ones are refused, so each tick runs on one node. The
//! book lives in memory: a restarted registry forgets past runs (`atoll cron` starts
//! empty) and could let a tick claimed just before the restart be claimed again, within
//! the drift bound. On NATS the book is a KV bucket instead (`atoll_control::nats`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use atoll_core::cron::{CronRun, KEPT_RUNS};

/// The last [`KEPT_RUNS`] runs of every function.
#[derive(Debug, Default)]
pub struct CronBook {
    runs: Mutex<HashMap<String, VecDeque<CronRun>>>,
}

fn same_tick(a: &CronRun, b: &CronRun) -> bool {
    a.entry == b.entry && a.tick == b.tick
}

impl CronBook {
    /// Records the claim; `false` if the tick was claimed already.
    pub fn claim(&self, run: CronRun) -> bool {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let kept = runs.entry(run.function.clone()).or_default();
        if kept.iter().any(|known| same_tick(known, &run)) {
            return false;
        }
        // A tick older than every kept one (and the book full) is long past its drift
        // bound: refuse it rather than forget which node ran it.
        if kept.len() >= KEPT_RUNS && kept.iter().all(|known| known.tick > run.tick) {
            return false;
        }
        kept.push_back(run);
        if kept.len() > KEPT_RUNS {
            let oldest = kept
                .iter()
                .enumerate()
                .min_by_key(|(_, known)| known.tick)
                .map(|(index, _)| index)
                .expect("not empty");
            kept.remove(oldest);
        }
        true
    }

    /// Records how the claimed run ended; `false` if it was not claimed by that node.
    pub fn finish(&self, run: CronRun) -> bool {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(known) = runs
            .get_mut(&run.function)
            .and_then(|kept| kept.iter_mut().find(|known| same_tick(known, &run)))
        else {
            return false;
        };
        if known.node != run.node {
            return false;
        }
        *known = run;
        true
    }

    /// A function's runs, newest first.
    pub fn runs(&self, function: &str) -> Vec<CronRun> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<CronRun> = runs
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

    fn run(tick: u64, node: &str) -> CronRun {
        CronRun {
            function: "f".into(),
            entry: 0,
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
        assert!(book.claim(run(10, "a")));
        assert!(!book.claim(run(10, "b")));
        assert!(book.claim(run(12, "b")));
        assert!(!book.finish(CronRun {
            outcome: Outcome::Status(200),
            ..run(10, "b")
        }));
        assert!(book.finish(CronRun {
            outcome: Outcome::Status(200),
            ..run(10, "a")
        }));
        let runs = book.runs("f");
        assert_eq!((runs[0].tick, runs[1].tick), (12, 10));
        assert_eq!(runs[1].outcome, Outcome::Status(200));
    }

    #[test]
    fn the_book_keeps_the_newest_runs() {
        let book = CronBook::default();
        for tick in 0..(KEPT_RUNS as u64 + 5) {
            assert!(book.claim(run(tick, "a")));
        }
        let runs = book.runs("f");
        assert_eq!(runs.len(), KEPT_RUNS);
        assert_eq!(runs.last().unwrap().tick, 5);
        assert!(!book.claim(run(1, "b")), "older than everything kept");
    }
}
