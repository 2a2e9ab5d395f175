//! Per-function instance pools: admission, ready instances, scale to zero.
//!
//! The primer's model, per function and per node:
//!
//! ```text
//!            admit()                      execute()                 replenish()
//! request ──▶ permits (max_concurrency) ──▶ take a ready instance ──▶ run ──▶ prepare the next
//!               │ full: wait in the queue    (or prepare one now)      (off the request path)
//!               │ queue full (max_queue): Overloaded → 503 + Retry-After
//! ```
//!
//! Every request still runs in a fresh instance: a *ready* instance was created ahead of its
//! request and runs exactly once. The pool keeps as many ready as recent load asked for — the
//! peak concurrency seen since the pool was last idle — and never fewer than
//! `min_instances` (reserved). After `idle_timeout` without requests it drops back to
//! `min_instances`, which is zero by default: scale to zero. The decision of how many to keep
//! is [`ReadyTarget`], a pure state machine tested with a fake clock; the pool is its I/O.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cgi::CgiRequest;
use crate::function::{InterruptHandle, Invocation, InvokeError, LoadedFunction, ReadyInstance};
use crate::stream::StreamingOutput;

/// Scaling settings (`[scale]` in the manifest).
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    pub min_instances: usize,
    pub max_concurrency: usize,
    pub max_queue: usize,
    pub idle_timeout: Duration,
    /// Most ready instances kept for load (not counting `min_instances`).
    pub max_ready: usize,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            min_instances: 0,
            max_concurrency: 64,
            max_queue: 1024,
            idle_timeout: Duration::from_secs(60),
            max_ready: 16,
        }
    }
}

/// How many ready instances to keep: a pure function of observed load and time.
#[derive(Debug, Clone)]
pub struct ReadyTarget {
    min_instances: usize,
    max_ready: usize,
    idle_timeout: Duration,
    peak: usize,
    last_request: Option<Instant>,
}

impl ReadyTarget {
    pub fn new(config: &ScaleConfig) -> Self {
        ReadyTarget {
            min_instances: config.min_instances,
            max_ready: config.max_ready.max(config.min_instances),
            idle_timeout: config.idle_timeout,
            peak: 0,
            last_request: None,
        }
    }

    /// A request started while `in_flight` requests (itself included) were running.
    pub fn observe(&mut self, now: Instant, in_flight: usize) {
        self.last_request = Some(now);
        self.peak = self.peak.max(in_flight);
    }

    /// Ready instances wanted at `now`.
    pub fn target(&mut self, now: Instant) -> usize {
        match self.last_request {
            Some(last) if now.saturating_duration_since(last) < self.idle_timeout => {
                self.peak.max(self.min_instances).min(self.max_ready)
            }
            _ => {
                self.peak = 0;
                self.min_instances
            }
        }
    }
}

/// The queue is full: the caller answers 503 with this `Retry-After`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many requests for this function: {in_flight} running and {queued} queued")]
pub struct Overloaded {
    pub in_flight: usize,
    pub queued: usize,
    pub retry_after: Duration,
}

/// A request's right to run; held until its run finishes.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    pool: Arc<InstancePool>,
    /// Whether the request had to wait in the queue.
    pub queued: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.pool.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lets another thread stop a run that may not have started yet.
#[derive(Debug, Default)]
pub struct InterruptSlot {
    requested: AtomicBool,
    handle: Mutex<Option<InterruptHandle>>,
}

impl InterruptSlot {
    pub fn new() -> Arc<Self> {
        Arc::new(InterruptSlot::default())
    }

    /// Stops the run now or as soon as its instance is known. A signal that arrives before
    /// the guest is running can be missed: callers repeat until the run has returned.
    pub fn fire(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.lock().expect("interrupt slot").as_ref() {
            handle.interrupt();
        }
    }

    fn arm(&self, handle: InterruptHandle) {
        if self.requested.load(Ordering::SeqCst) {
            handle.interrupt();
        }
        *self.handle.lock().expect("interrupt slot") = Some(handle);
    }
}

/// Instances of one function version on this node.
pub struct InstancePool {
    function: LoadedFunction,
    config: ScaleConfig,
    permits: Arc<Semaphore>,
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    ready: Mutex<Vec<ReadyInstance>>,
    /// Instances being prepared by `replenish`, so concurrent callers don't overshoot.
    preparing: AtomicUsize,
    target: Mutex<ReadyTarget>,
    /// After a failed preparation (a trapping or looping `(start)`), no instance is made
    /// ahead before this instant; the wait doubles with each failure in a row.
    prepare_backoff: Mutex<PrepareBackoff>,
    /// Whether a maintenance pass ([`InstancePool::maintain`]) is running.
    maintaining: AtomicBool,
}

/// Backs off making instances ahead of requests while they keep failing.
#[derive(Debug, Default)]
struct PrepareBackoff {
    failures: u32,
    retry_at: Option<Instant>,
}

/// First and longest wait after a failed preparation.
const PREPARE_BACKOFF_START: Duration = Duration::from_secs(1);
const PREPARE_BACKOFF_MAX: Duration = Duration::from_secs(60);

impl PrepareBackoff {
    fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    fn failed(&mut self, now: Instant) {
        let wait = PREPARE_BACKOFF_START
            .saturating_mul(1 << self.failures.min(16))
            .min(PREPARE_BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + wait);
    }

    fn succeeded(&mut self) {
        *self = PrepareBackoff::default();
    }
}

impl std::fmt::Debug for InstancePool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("InstancePool")
            .field("function", &self.function.name())
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish()
    }
}

/// How the instance that served a request came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// Prepared ahead of the request.
    Ready,
    /// Created for this request.
    OnDemand,
}

impl InstancePool {
    pub fn new(function: LoadedFunction, config: ScaleConfig) -> Arc<Self> {
        Arc::new(InstancePool {
            target: Mutex::new(ReadyTarget::new(&config)),
            permits: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            function,
            config,
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            ready: Mutex::new(Vec::new()),
            preparing: AtomicUsize::new(0),
            prepare_backoff: Mutex::new(PrepareBackoff::default()),
            maintaining: AtomicBool::new(false),
        })
    }

    pub fn function(&self) -> &LoadedFunction {
        &self.function
    }

    /// Waits for a slot to run in, or refuses at once when the queue is full.
    pub async fn admit(self: &Arc<Self>) -> Result<Admission, Overloaded> {
        let admitted = |permit, queued| {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            Admission {
                _permit: permit,
                pool: Arc::clone(self),
                queued,
            }
        };
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(admitted(permit, false));
        }
        let queued = self.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= self.config.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Overloaded {
                in_flight: self.in_flight.load(Ordering::Relaxed),
                queued,
                retry_after: Duration::from_secs(1),
            });
        }
        // Decrement the queue count even if the waiting request is cancelled.
        struct Dequeue<'a>(&'a AtomicUsize);
        impl Drop for Dequeue<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _dequeue = Dequeue(&self.queued);
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        Ok(admitted(permit, true))
    }

    /// Runs one admitted request. Blocks while the guest runs; `interrupt` can stop it.
    /// With `streaming`, a large response goes out while the guest writes it.
    pub fn execute(
        &self,
        request: &CgiRequest,
        interrupt: &InterruptSlot,
        streaming: Option<StreamingOutput>,
    ) -> Result<(Invocation, StartKind), InvokeError> {
        let (instance, kind) = self.take(interrupt)?;
        interrupt.arm(instance.interrupt_handle());
        let start_time = instance.start_time();
        let mut invocation = instance.run_streaming(request, streaming)?;
        invocation.start_time = match kind {
            StartKind::Ready => Duration::ZERO,
            StartKind::OnDemand => start_time,
        };
        Ok((invocation, kind))
    }

    fn take(&self, interrupt: &InterruptSlot) -> Result<(ReadyInstance, StartKind), InvokeError> {
        let in_flight = self.in_flight.load(Ordering::Relaxed).max(1);
        self.target
            .lock()
            .expect("target")
            .observe(Instant::now(), in_flight);
        if let Some(instance) = self.ready.lock().expect("ready").pop() {
            return Ok((instance, StartKind::Ready));
        }
        // The request's timeout covers a `(start)` function run while instantiating.
        let instance = self
            .function
            .prepare_for_request(|handle| interrupt.arm(handle))?;
        Ok((instance, StartKind::OnDemand))
    }

    /// Prepares instances until the ready count meets the target. Blocking; call it off the
    /// request path (after a response is sent, or from a maintenance task). Returns the
    /// instances created. Each preparation runs under the function's timeout, and after one
    /// fails none is tried again for a while (backing off up to a minute), so a function
    /// whose instances cannot be made costs one bounded attempt now and then.
    pub fn replenish(&self) -> Vec<Duration> {
        let mut start_times = Vec::new();
        loop {
            if !self
                .prepare_backoff
                .lock()
                .expect("backoff")
                .ready(Instant::now())
            {
                return start_times;
            }
            let target = self.target.lock().expect("target").target(Instant::now());
            let have = self.ready.lock().expect("ready").len() + self.preparing.load(Ordering::Acquire);
            if have >= target {
                return start_times;
            }
            self.preparing.fetch_add(1, Ordering::AcqRel);
            let prepared = self.function.prepare();
            self.preparing.fetch_sub(1, Ordering::AcqRel);
            match prepared {
                Ok(instance) => {
                    self.prepare_backoff.lock().expect("backoff").succeeded();
                    start_times.push(instance.start_time());
                    self.ready.lock().expect("ready").push(instance);
                }
                Err(error) => {
                    self.prepare_backoff
                        .lock()
                        .expect("backoff")
                        .failed(Instant::now());
                    tracing::warn!(function = self.function.name(), %error, "preparing an instance failed");
                    return start_times;
                }
            }
        }
    }

    /// One maintenance pass: [`trim`](InstancePool::trim), then
    /// [`replenish`](InstancePool::replenish). Returns `None` without doing anything while
    /// another pass over this pool is still running, so a function whose instances are slow
    /// to make never has passes pile up, and callers can run each pool's pass on its own
    /// without one function holding up the others.
    pub fn maintain(&self) -> Option<Vec<Duration>> {
        if self.maintaining.swap(true, Ordering::AcqRel) {
            return None;
        }
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&self.maintaining);
        self.trim();
        Some(self.replenish())
    }

    /// Drops ready instances beyond the target (scale down, to zero when idle) and returns
    /// how many were dropped. Cheap; call it periodically.
    pub fn trim(&self) -> usize {
        let target = self.target.lock().expect("target").target(Instant::now());
        let surplus: Vec<ReadyInstance> = {
            let mut ready = self.ready.lock().expect("ready");
            let keep = target.min(ready.len());
            ready.split_off(keep)
        };
        surplus.len()
    }

    /// `(ready, busy)` instance counts.
    pub fn instances(&self) -> (usize, usize) {
        (
            self.ready.lock().expect("ready").len(),
            self.in_flight.load(Ordering::Relaxed),
        )
    }

    /// Whether a request admitted now would have to queue: every slot is taken.
    pub fn saturated(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(min: usize) -> ScaleConfig {
        ScaleConfig {
            min_instances: min,
            max_concurrency: 8,
            max_queue: 4,
            idle_timeout: Duration::from_secs(60),
            max_ready: 6,
        }
    }

    #[test]
    fn starts_at_min_and_scales_to_zero() {
        let mut target = ReadyTarget::new(&config(0));
        let t0 = Instant::now();
        assert_eq!(target.target(t0), 0);
        target.observe(t0, 1);
        assert_eq!(target.target(t0), 1);
        target.observe(t0 + Duration::from_secs(1), 4);
        assert_eq!(target.target(t0 + Duration::from_secs(2)), 4);
        // Still within the idle timeout of the last request.
        assert_eq!(target.target(t0 + Duration::from_secs(60)), 4);
        // Idle for the timeout: back to zero, and the peak is forgotten.
        assert_eq!(target.target(t0 + Duration::from_secs(62)), 0);
        target.observe(t0 + Duration::from_secs(70), 1);
        assert_eq!(target.target(t0 + Duration::from_secs(70)), 1);
    }

    #[test]
    fn min_instances_are_kept_when_idle() {
        let mut target = ReadyTarget::new(&config(2));
        let t0 = Instant::now();
        assert_eq!(target.target(t0), 2);
        target.observe(t0, 5);
        assert_eq!(target.target(t0), 5);
        assert_eq!(target.target(t0 + Duration::from_secs(3600)), 2);
    }

    #[test]
    fn failed_preparations_back_off_up_to_a_minute() {
        let mut backoff = PrepareBackoff::default();
        let t0 = Instant::now();
        assert!(backoff.ready(t0));
        backoff.failed(t0);
        assert!(!backoff.ready(t0 + Duration::from_millis(999)));
        assert!(backoff.ready(t0 + Duration::from_secs(1)));
        backoff.failed(t0);
        assert!(!backoff.ready(t0 + Duration::from_secs(1)));
        assert!(backoff.ready(t0 + Duration::from_secs(2)));
        for _ in 0..40 {
            backoff.failed(t0);
        }
        assert!(backoff.ready(t0 + PREPARE_BACKOFF_MAX));
        backoff.succeeded();
        assert!(backoff.ready(t0));
    }

    #[test]
    fn load_driven_target_is_capped() {
        let mut target = ReadyTarget::new(&config(0));
        let t0 = Instant::now();
        target.observe(t0, 100);
        assert_eq!(target.target(t0), 6);
    }
}
