//! Scheduled triggers, the node's side: every node follows every served function's
//! `[[cron]]` entries, and at each tick the nodes race to claim it through the control
//! plane (a NATS KV create, or the registry's `POST /v1/cron/{name}` on the embedded
//! store). The one claim that wins runs the function — a GET of the entry's path with
//! `X_ATOLL_TRIGGER=cron` — and records the outcome; the others do nothing. So a tick runs
//! once in the whole cluster, while any node is up.
//!
//! * **A home node first.** Nodes rank themselves for each function (rendezvous hashing
//!   over the cluster's members, [`Cluster::cron_rank`]); rank 0 claims at once, the others
//!   after [`CLAIM_DELAY_PER_RANK`] per rank, so the same node runs a function's ticks
//!   while it is up and its warm instances serve them.
//! * **Drift.** A node that reaches a tick more than [`DRIFT_BOUND_SECONDS`] late (paused,
//!   overloaded, or the control plane slow) skips it and counts it
//!   (`atoll_cron_skipped_total`), rather than firing a burst of stale runs.
//!   The bound is checked again once the claim is won: a claim that waited on a slow
//!   control plane does not run late.
//! * **Bounded.** A claim waits at most [`CLAIM_TIMEOUT`]; an entry whose previous run is
//!   still going skips the tick it claimed next (rather than stacking runs); at most
//!   [`MAX_RUNS`] scheduled runs go on at once per node. Every skip is counted.
//! * **New entries start from now**: a node that starts, or learns of a new version, runs
//!   no tick from before it saw the schedule; after a long pause it jumps to the drift
//!   bound instead of walking every missed tick.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use atoll_control::ControlPlane;
use atoll_core::cron::{CronRun, DRIFT_BOUND_SECONDS, Outcome, Schedule};
use atoll_isolate::{CgiRequest, GuestExecutor};
use http_body_util::BodyExt;

use crate::cluster::Cluster;
use crate::served::Routing;
use crate::service::invoke;

/// How often the scheduler looks at the clock and the served functions.
const TICK_CHECK: Duration = Duration::from_millis(200);
/// How long a node of rank N waits (N times this, at most 3) before claiming a tick.
pub const CLAIM_DELAY_PER_RANK: Duration = Duration::from_millis(400);
/// Longest a claim may take.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
/// Scheduled runs going on at once on a node, at most.
pub const MAX_RUNS: usize = 64;

/// The entries (function, index) with a run going on on this node.
#[derive(Default)]
struct Running {
    entries: std::sync::Mutex<HashSet<(String, usize)>>,
}

/// Runs claimed ticks: an in-process GET through the function's pool.
pub struct CronScheduler {
    routing: Arc<Routing>,
    executor: Arc<GuestExecutor>,
    control: Arc<ControlPlane>,
    cluster: Arc<Cluster>,
    running: Arc<Running>,
    slots: Arc<tokio::sync::Semaphore>,
}

fn skipped(function: &str, why: &'static str) {
    metrics::counter!("atoll_cron_skipped_total", "function" => function.to_string(), "why" => why)
        .increment(1);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// One entry being followed: (function, entry index, schedule text) → the last tick seen.
type Followed = HashMap<(String, usize, String), u64>;

impl CronScheduler {
    pub fn new(
        routing: Arc<Routing>,
        executor: Arc<GuestExecutor>,
        control: Arc<ControlPlane>,
        cluster: Arc<Cluster>,
    ) -> Arc<CronScheduler> {
        Arc::new(CronScheduler {
            routing,
            executor,
            control,
            cluster,
            running: Arc::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_RUNS)),
        })
    }

    /// Follows the schedules until `stopped` resolves.
    pub async fn run(self: Arc<Self>, stopped: impl std::future::Future<Output = ()>) {
        let mut followed = Followed::new();
        let mut parsed: HashMap<String, Option<Schedule>> = HashMap::new();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(TICK_CHECK) => {}
            }
            self.check(&mut followed, &mut parsed, unix_now());
        }
    }

    /// Fires every tick due since the last check; forgets entries no longer served.
    fn check(&self, followed: &mut Followed, parsed: &mut HashMap<String, Option<Schedule>>, now: u64) {
        let mut seen = HashSet::new();
        for served in self.routing.functions() {
            let manifest = &served.deployment.manifest;
            for (index, entry) in manifest.cron.iter().enumerate() {
                let key = (manifest.name.clone(), index, entry.schedule.clone());
                seen.insert(key.clone());
                let Some(schedule) = parsed
                    .entry(entry.schedule.clone())
                    .or_insert_with(|| entry.schedule.parse().ok())
                    .clone()
                else {
                    continue;
                };
                let last = followed.entry(key).or_insert(now);
                if now.saturating_sub(*last) > DRIFT_BOUND_SECONDS {
                    // Paused for long: what lies beyond the bound would be skipped anyway.
                    skipped(&manifest.name, "late");
                    tracing::warn!(function = %manifest.name, behind = now - *last, "cron ticks skipped: the node fell behind past the drift bound");
                    *last = now - DRIFT_BOUND_SECONDS;
                }
                while let Some(tick) = schedule.next_after(*last).filter(|tick| *tick <= now) {
                    *last = tick;
                    let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                        skipped(&manifest.name, "busy");
                        continue;
                    };
                    let run = CronRun {
                        function: manifest.name.clone(),
                        entry: index,
                        path: entry.path.clone(),
                        tick,
                        node: self.cluster.name().to_string(),
                        outcome: Outcome::Running,
                        duration_ms: None,
                    };
                    let fire = Self::fire(
                        Arc::clone(&self.routing),
                        Arc::clone(&self.executor),
                        Arc::clone(&self.control),
                        Arc::clone(&self.running),
                        self.cluster.cron_rank(&manifest.name),
                        run,
                    );
                    tokio::spawn(async move {
                        fire.await;
                        drop(slot);
                    });
                }
            }
        }
        followed.retain(|key, _| seen.contains(key));
        parsed.retain(|schedule, _| seen.iter().any(|(_, _, text)| text == schedule));
    }

    /// Claims the tick after this node's rank delay and, if it won, runs it.
    async fn fire(
        routing: Arc<Routing>,
        executor: Arc<GuestExecutor>,
        control: Arc<ControlPlane>,
        running: Arc<Running>,
        rank: usize,
        mut run: CronRun,
    ) {
        tokio::time::sleep(CLAIM_DELAY_PER_RANK * rank.min(3) as u32).await;
        match tokio::time::timeout(CLAIM_TIMEOUT, control.cron_claim(&run))
            .await
            .unwrap_or_else(|_| Err(atoll_control::ControlError::Timeout(CLAIM_TIMEOUT)))
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                metrics::counter!("atoll_cron_claim_failures_total", "function" => run.function.clone())
                    .increment(1);
                tracing::warn!(function = %run.function, tick = run.tick, %error, "cron tick not claimed: the control plane failed");
                return;
            }
        }
        let late = unix_now().saturating_sub(run.tick) > DRIFT_BOUND_SECONDS;
        let served = routing.function(&run.function);
        let entry_key = (run.function.clone(), run.entry);
        // The entry's previous run, claimed by this node too, is still going: this tick is
        // skipped rather than stacked on it.
        let overlap =
            !late && served.is_some() && !running.entries.lock().expect("running").insert(entry_key.clone());
        let Some(served) = served.filter(|_| !late && !overlap) else {
            skipped(
                &run.function,
                if late {
                    "late"
                } else if overlap {
                    "overlap"
                } else {
                    "not-served"
                },
            );
            run.outcome = Outcome::Skipped;
            let _ = tokio::time::timeout(CLAIM_TIMEOUT, control.cron_finish(&run)).await;
            return;
        };
        // Frees the entry when the run ends, however it ends.
        struct Finished(Arc<Running>, (String, usize));
        impl Drop for Finished {
            fn drop(&mut self) {
                self.0.entries.lock().expect("running").remove(&self.1);
            }
        }
        let _finished = Finished(Arc::clone(&running), entry_key);
        let (raw_path, query) = match run.path.split_once('?') {
            Some((path, query)) => (path.to_string(), query.to_string()),
            None => (run.path.clone(), String::new()),
        };
        let request = CgiRequest {
            method: "GET".into(),
            raw_path,
            query,
            protocol: "HTTP/1.1".into(),
            scheme: "http".into(),
            server_name: format!("{}.{}", run.function, atoll_core::manifest::SERVICE_DOMAIN),
            server_port: 80,
            remote_addr: "0.0.0.0".into(),
            remote_port: 0,
            cron_tick: Some(run.tick),
            ..CgiRequest::default()
        };
        let started = Instant::now();
        let response = invoke(&executor, &served, request, None).await;
        let status = response.status().as_u16();
        // The body is the function's to write and nobody's to read: drain it.
        let _ = response.into_body().collect().await;
        let elapsed = started.elapsed();
        served.metrics.request(status, elapsed);
        metrics::counter!("atoll_cron_runs_total", "function" => run.function.clone(), "status" => status.to_string())
            .increment(1);
        tracing::info!(function = %run.function, tick = run.tick, status, ms = elapsed.as_millis() as u64, "cron run");
        run.outcome = Outcome::Status(status);
        run.duration_ms = Some(elapsed.as_millis() as u64);
        if let Ok(Err(error)) = tokio::time::timeout(CLAIM_TIMEOUT, control.cron_finish(&run)).await {
            tracing::warn!(function = %run.function, tick = run.tick, %error, "the cron run's outcome was not recorded");
        }
    }
}
