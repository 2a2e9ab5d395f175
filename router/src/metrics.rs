//! The node's metrics, in one place so names and labels stay consistent.
//!
//! Exposed as Prometheus text on the admin listener's `/metrics`. The recorder is global to
//! the process (the `metrics` crate's design), so it is installed once even when a process
//! runs several nodes, as the in-process benches and tests do.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use atoll_ingress::workers::PerWorker;

use crate::lock;
use dashmap::DashMap;
use metrics::{Counter, Histogram};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by `function` (or `-` when no route matched), `version` (a
/// function's) and `status`.
pub const REQUESTS_TOTAL: &str = "atoll_requests_total";
/// Time from request head to response, by `function` and `version`.
pub const REQUEST_DURATION: &str = "atoll_request_duration_seconds";
/// Instances created, by `function` and `when`: `ahead` (prepared before a request) or
/// `on_demand` (created while a request waited).
pub const INSTANCE_STARTS_TOTAL: &str = "atoll_instance_starts_total";
/// Time to make an isolate ready, by `function` and `kind`: `snapshot` (an instance restored
/// from the function's prepared state) or `compile` (compiling a module, at deploy time).
pub const ISOLATE_START_DURATION: &str = "atoll_isolate_start_seconds";
/// Instances by `function` and `state`: `idle` (ready, waiting for a request) or `busy`.
pub const INSTANCES: &str = "atoll_instances";
/// Invocations by `function` and `outcome` (`ok`, `trap`, `exit`, `timeout`, …).
pub const INVOCATIONS_TOTAL: &str = "atoll_invocations_total";
/// Time the guest ran, by `function`.
pub const INVOCATION_DURATION: &str = "atoll_invocation_duration_seconds";
/// Requests refused because a function's queue was full, by `function`.
pub const OVERLOADED_TOTAL: &str = "atoll_overloaded_total";
/// Modules made ready on this node, by `kind`: `compile` or `cached` (from disk).
pub const MODULE_LOADS_TOTAL: &str = "atoll_module_loads_total";
/// The registry revision the node's route table reflects.
pub const ROUTE_TABLE_REVISION: &str = "atoll_route_table_revision";
/// Routes in the current table.
pub const ROUTES: &str = "atoll_routes";
/// Versions that failed to load and wait for a retry (gauge).
pub const SYNC_QUARANTINED: &str = "atoll_sync_quarantined";
/// Versions being prepared (gauge).
pub const SYNC_LOADING: &str = "atoll_sync_loading";
/// Revisions the route table is behind its source (gauge).
pub const SYNC_LAG: &str = "atoll_sync_lag_revisions";
/// Failed loads of a version, by function (counter).
pub const SYNC_LOAD_FAILURES_TOTAL: &str = "atoll_sync_load_failures_total";
/// Gauge: requests the node is answering now (all listeners and protocols).
pub const REQUESTS_IN_FLIGHT: &str = "atoll_requests_in_flight";
/// Counter: requests forwarded to a peer, by `outcome` (answered, unavailable, refused:
/// never reached the peer, broken: lost after it may have).
pub const FORWARDS_TOTAL: &str = "atoll_forwards_total";
/// Counter: TCP connections accepted, by `listener` (its local address); recorded by the
/// accept loop, which owns the name.
pub use atoll_ingress::server::CONNECTIONS_ACCEPTED_TOTAL;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// One function's metric handles, registered once when the version is loaded: the request
/// path then records without hashing labels or allocating label strings.
pub struct FunctionMetrics {
    name: String,
    /// The version, as its label.
    version: String,
    request_duration: Histogram,
    requests_by_status: DashMap<u16, Counter>,
    /// Requests answered and not yet in the two series above, kept by each connection
    /// worker: the registry's series are shared by every core, and writing them per
    /// request passed their cache lines from core to core. Moved there in batches, and
    /// all of them before metrics are read ([`Self::flush`]) and when the function goes.
    answered: PerWorker<Mutex<Answered>>,
    invocation_duration: Histogram,
    invocations_ok: Counter,
    overloaded: Counter,
    starts_ahead: Counter,
    starts_on_demand: Counter,
    snapshot_start: Histogram,
}

impl std::fmt::Debug for FunctionMetrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FunctionMetrics")
            .field("name", &self.name)
            .finish()
    }
}

impl FunctionMetrics {
    /// Handles for version `version` of function `name`: requests and their durations
    /// are labelled with both, so a canary's errors and latency show beside the stable
    /// version's.
    pub fn new(name: &str, version: u64) -> Self {
        let label = name.to_string();
        let version = version.to_string();
        FunctionMetrics {
            request_duration: metrics::histogram!(REQUEST_DURATION, "function" => label.clone(), "version" => version.clone()),
            requests_by_status: DashMap::new(),
            answered: PerWorker::default(),
            invocation_duration: metrics::histogram!(INVOCATION_DURATION, "function" => label.clone()),
            invocations_ok: metrics::counter!(INVOCATIONS_TOTAL, "function" => label.clone(), "outcome" => "ok"),
            overloaded: metrics::counter!(OVERLOADED_TOTAL, "function" => label.clone()),
            starts_ahead: metrics::counter!(INSTANCE_STARTS_TOTAL, "function" => label.clone(), "when" => "ahead"),
            starts_on_demand: metrics::counter!(
                INSTANCE_STARTS_TOTAL,
                "function" => label.clone(),
                "when" => "on_demand"
            ),
            snapshot_start: metrics::histogram!(ISOLATE_START_DURATION, "function" => label.clone(), "kind" => "snapshot"),
            name: label,
            version,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A request routed to this function was answered.
    pub fn request(&self, status: u16, elapsed: Duration) {
        let batch = {
            let mut answered = lock(self.answered.local());
            answered.durations.push(elapsed.as_secs_f64());
            match answered.by_status.iter_mut().find(|(known, _)| *known == status) {
                Some((_, count)) => *count += 1,
                None => answered.by_status.push((status, 1)),
            }
            if answered.durations.len() < FLUSH_EVERY {
                return;
            }
            answered.take()
        };
        // Outside the lock: threads that share a slot (those of no worker) do not wait.
        self.publish(batch);
    }

    /// Moves what every worker counted into the registry's series: before they are read.
    pub fn flush(&self) {
        for answered in self.answered.iter() {
            let batch = lock(answered).take();
            self.publish(batch);
        }
    }

    fn publish(&self, batch: Answered) {
        for duration in batch.durations {
            self.request_duration.record(duration);
        }
        for (status, count) in batch.by_status {
            self.status_counter(status).increment(count);
        }
    }

    fn status_counter(&self, status: u16) -> Counter {
        if let Some(counter) = self.requests_by_status.get(&status) {
            return counter.clone();
        }
        let counter = metrics::counter!(
            REQUESTS_TOTAL,
            "function" => self.name.clone(),
            "version" => self.version.clone(),
            "status" => status.to_string()
        );
        self.requests_by_status.insert(status, counter.clone());
        counter
    }

    pub fn invocation_ok(&self, run_time: Duration) {
        self.invocations_ok.increment(1);
        self.invocation_duration.record(run_time.as_secs_f64());
    }

    /// A failed invocation (the rare path: labels are looked up).
    pub fn invocation_failed(&self, outcome: &'static str) {
        metrics::counter!(INVOCATIONS_TOTAL, "function" => self.name.clone(), "outcome" => outcome)
            .increment(1);
    }

    pub fn overloaded(&self) {
        self.overloaded.increment(1);
    }

    /// An instance was created: `ahead` of its request, or on demand while one waited.
    pub fn instance_started(&self, start_time: Duration, ahead: bool) {
        if ahead {
            self.starts_ahead.increment(1);
        } else {
            self.starts_on_demand.increment(1);
        }
        self.snapshot_start.record(start_time.as_secs_f64());
    }
}

impl Drop for FunctionMetrics {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Requests one worker saw answered since its last batch went to the registry.
#[derive(Default)]
struct Answered {
    /// By status (few: a list beats a map).
    by_status: Vec<(u16, u64)>,
    /// Each one's time from head to response, in seconds.
    durations: Vec<f64>,
}

impl Answered {
    /// What was counted, leaving room for the next batch (nothing when nothing was).
    fn take(&mut self) -> Answered {
        if self.durations.is_empty() {
            return Answered::default();
        }
        Answered {
            by_status: std::mem::take(&mut self.by_status),
            durations: std::mem::replace(&mut self.durations, Vec::with_capacity(FLUSH_EVERY)),
        }
    }
}

/// Requests a worker keeps before it moves them into the registry: small, as each
/// function of thousands on a node may keep this many per worker.
const FLUSH_EVERY: usize = 64;

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .expect("static buckets are valid");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered by function, version and status"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Request latency by function and version"
    );
    metrics::describe_counter!(INSTANCE_STARTS_TOTAL, "Instances created, by function and when");
    metrics::describe_histogram!(
        ISOLATE_START_DURATION,
        metrics::Unit::Seconds,
        "Time to make an isolate ready, by function and kind (snapshot or compile)"
    );
    metrics::describe_gauge!(REQUESTS_IN_FLIGHT, "Requests being answered now");
    metrics::describe_gauge!(INSTANCES, "Instances by function and state (idle or busy)");
    metrics::describe_counter!(INVOCATIONS_TOTAL, "Invocations by function and outcome");
    metrics::describe_histogram!(
        INVOCATION_DURATION,
        metrics::Unit::Seconds,
        "Time the guest ran, by function"
    );
    metrics::describe_counter!(
        OVERLOADED_TOTAL,
        "Requests refused with 503 because the queue was full"
    );
    metrics::describe_counter!(
        MODULE_LOADS_TOTAL,
        "Modules made ready, by kind (compile or cached)"
    );
    metrics::describe_gauge!(ROUTE_TABLE_REVISION, "Registry revision of the route table");
    metrics::describe_gauge!(
        SYNC_QUARANTINED,
        "Function versions that failed to load, retried with backoff"
    );
    metrics::describe_gauge!(SYNC_LOADING, "Function versions being prepared");
    metrics::describe_gauge!(SYNC_LAG, "Revisions the route table is behind its source");
    metrics::describe_counter!(SYNC_LOAD_FAILURES_TOTAL, "Failed loads of a function version");
    metrics::describe_gauge!(ROUTES, "Routes in the current table");
}
