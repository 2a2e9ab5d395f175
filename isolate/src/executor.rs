//! Where guest code runs: a few hot threads, and overflow threads when those are stuck.
//!
//! Guest code blocks the thread it runs on, so it never runs on the threads that serve I/O.
//! Handing each invocation to tokio's blocking pool works but spreads requests over dozens
//! of threads: every request pays a futex wake-up and context switches, and caches go cold.
//! Instead, one hot worker per core takes invocations from a shared queue. A worker whose
//! guest has run longer than [`STALL_THRESHOLD`] counts as stalled; when every worker is
//! stalled — a function spinning for seconds on every core — new invocations go to tokio's
//! blocking pool, which grows as needed, and a watchdog moves any invocation still queued
//! there too. Other functions keep their latency; fast functions keep the hot path.
//!
//! A guest that waits on the network (an outbound call) counts as stalled from the moment
//! it starts waiting ([`waiting`]), not after the threshold: its worker is idle but held.
//! A stand-in worker takes its place on the queue for as long as it waits (up to
//! [`STAND_INS_PER_WORKER`] per hot worker), so requests keep the hot path — a queue and a
//! warm thread — instead of overflowing to the blocking pool; a stand-in retires when the
//! waits are over.
//!
//! ```text
//! submit ──all workers stalled?──no──▶ queue ──▶ worker 0..N (hot, one per core)
//!              └─yes──▶ spawn_blocking (overflow)      ▲ watchdog: queue → overflow when all stall
//! ```

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A guest running longer than this no longer counts as a free-able worker.
pub const STALL_THRESHOLD: Duration = Duration::from_millis(10);
/// How often the watchdog looks for a queue stuck behind stalled workers while any worker
/// is busy, and while all are idle (nothing can stall then; it only has to notice work).
const WATCHDOG_INTERVAL: Duration = Duration::from_millis(5);
const WATCHDOG_IDLE_INTERVAL: Duration = Duration::from_millis(25);
/// Stand-in workers at most, per hot worker.
pub const STAND_INS_PER_WORKER: usize = 4;
/// How long a stand-in stays without work before it checks whether it is still needed.
const STAND_IN_IDLE: Duration = Duration::from_millis(50);

struct Shared {
    epoch: Instant,
    /// Per worker: when its current job started (nanoseconds since `epoch`, plus one), or 0
    /// when idle; [`WAITING`] while its guest waits on I/O.
    /// The hot workers' slots first, then the stand-ins' ([`ABSENT`] while unused).
    busy_since: Vec<AtomicU64>,
    receiver: crossbeam_channel::Receiver<Job>,
    runtime: tokio::runtime::Handle,
    /// Guests on this executor's workers waiting on I/O now.
    waiting: AtomicUsize,
    /// Stand-in workers alive.
    stand_ins: AtomicUsize,
}

/// `busy_since` of a worker whose guest waits on I/O: older than any threshold.
const WAITING: u64 = 1;
/// `busy_since` of a stand-in slot no thread holds.
const ABSENT: u64 = u64::MAX;

thread_local! {
    /// On a hot worker thread: its executor and index, for [`waiting`].
    static CURRENT_WORKER: RefCell<Option<(Arc<Shared>, usize)>> = const { RefCell::new(None) };
}

/// Runs `wait` — a guest blocked on I/O, such as an outbound HTTP call — with the current
/// hot worker counted as stalled, so new invocations go around it at once. When every
/// worker is then stalled, what is queued moves to the overflow pool right away instead of
/// at the watchdog's next look. Elsewhere (an overflow thread, a test) it just runs `wait`.
pub fn waiting<R>(wait: impl FnOnce() -> R) -> R {
    let worker = CURRENT_WORKER.with(|current| current.borrow().clone());
    let Some((shared, index)) = worker else {
        return wait();
    };
    let started = shared.busy_since[index].swap(WAITING, Ordering::AcqRel);
    shared.waiting.fetch_add(1, Ordering::AcqRel);
    Shared::ensure_stand_ins(&shared);
    if shared.all_stalled() {
        while let Ok(job) = shared.receiver.try_recv() {
            shared.runtime.spawn_blocking(job);
        }
    }
    struct Restore(Arc<Shared>, usize, u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.busy_since[self.1].store(self.2, Ordering::Release);
            self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _restore = Restore(shared, index, started);
    wait()
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn all_stalled(&self) -> bool {
        let now = self.now();
        let threshold = STALL_THRESHOLD.as_nanos() as u64;
        self.busy_since.iter().all(|since| {
            let since = since.load(Ordering::Acquire);
            since == ABSENT || since == WAITING || (since != 0 && now.saturating_sub(since) > threshold)
        })
    }

    /// Starts stand-ins until there is one per waiting guest (or no slot is left).
    fn ensure_stand_ins(shared: &Arc<Shared>) {
        while shared.stand_ins.load(Ordering::Acquire) < shared.waiting.load(Ordering::Acquire) {
            let Some(index) = shared.busy_since.iter().position(|since| {
                since
                    .compare_exchange(ABSENT, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            }) else {
                return;
            };
            shared.stand_ins.fetch_add(1, Ordering::AcqRel);
            let worker = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name(format!("atoll-guest-{index}"))
                .spawn(move || run_worker(&worker, index, true));
            if spawned.is_err() {
                shared.stand_ins.fetch_sub(1, Ordering::AcqRel);
                shared.busy_since[index].store(ABSENT, Ordering::Release);
                return;
            }
        }
    }

    /// Whether a stand-in may go: more are alive than guests wait. Claims the retirement.
    fn retire_stand_in(&self) -> bool {
        loop {
            let alive = self.stand_ins.load(Ordering::Acquire);
            if alive <= self.waiting.load(Ordering::Acquire) {
                return false;
            }
            if self
                .stand_ins
                .compare_exchange(alive, alive - 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
        }
    }
}

/// A worker's loop: jobs from the queue until the executor is gone (a hot worker) or it
/// is no longer needed (a stand-in).
fn run_worker(shared: &Arc<Shared>, index: usize, stand_in: bool) {
    CURRENT_WORKER.with(|current| *current.borrow_mut() = Some((Arc::clone(shared), index)));
    loop {
        let job = if stand_in {
            match shared.receiver.recv_timeout(STAND_IN_IDLE) {
                Ok(job) => job,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if shared.retire_stand_in() {
                        break;
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    shared.stand_ins.fetch_sub(1, Ordering::AcqRel);
                    break;
                }
            }
        } else {
            match shared.receiver.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        shared.busy_since[index].store(shared.now(), Ordering::Release);
        // A panicking job must not take the worker down.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        shared.busy_since[index].store(0, Ordering::Release);
        // A stand-in retires only once idle: short waits come and go in bursts, and a
        // thread per wait would cost more than the wait.
    }
    if stand_in {
        shared.busy_since[index].store(ABSENT, Ordering::Release);
    }
    CURRENT_WORKER.with(|current| *current.borrow_mut() = None);
}

pub struct GuestExecutor {
    sender: crossbeam_channel::Sender<Job>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GuestExecutor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GuestExecutor")
            .field(
                "workers",
                &(self.shared.busy_since.len() / (1 + STAND_INS_PER_WORKER)),
            )
            .field("stand_ins", &self.shared.stand_ins.load(Ordering::Relaxed))
            .finish()
    }
}

impl GuestExecutor {
    /// Starts `workers` hot threads (at least one) and the watchdog. Call it within a tokio
    /// runtime: overflow goes to that runtime's blocking pool.
    pub fn new(workers: usize) -> Arc<Self> {
        let workers = workers.max(1);
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let runtime = tokio::runtime::Handle::current();
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            busy_since: (0..workers * (1 + STAND_INS_PER_WORKER))
                .map(|index| AtomicU64::new(if index < workers { 0 } else { ABSENT }))
                .collect(),
            receiver: receiver.clone(),
            runtime: runtime.clone(),
            waiting: AtomicUsize::new(0),
            stand_ins: AtomicUsize::new(0),
        });
        for index in 0..workers {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("atoll-guest-{index}"))
                .spawn(move || run_worker(&shared, index, false))
                .expect("spawn a guest worker thread");
        }
        let watched = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("atoll-guest-watchdog".into())
            .spawn(move || {
                while let Some(shared) = watched.upgrade() {
                    if shared.all_stalled() {
                        while let Ok(job) = receiver.try_recv() {
                            runtime.spawn_blocking(job);
                        }
                    }
                    let any_busy = shared.busy_since.iter().any(|since| {
                        let since = since.load(Ordering::Relaxed);
                        since != 0 && since != ABSENT
                    });
                    drop(shared);
                    std::thread::sleep(if any_busy {
                        WATCHDOG_INTERVAL
                    } else {
                        WATCHDOG_IDLE_INTERVAL
                    });
                }
            })
            .expect("spawn the guest watchdog thread");
        Arc::new(GuestExecutor { sender, shared })
    }

    /// The runtime the executor was made in: its blocking pool takes overflow, and what
    /// must outlive a request (a run's supervisor) runs there.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.shared.runtime
    }

    /// One worker per available core.
    pub fn per_core() -> Arc<Self> {
        GuestExecutor::new(std::thread::available_parallelism().map_or(2, |cores| cores.get()))
    }

    /// Runs `job` on a hot worker, or on the overflow pool when every worker is stalled:
    /// the blocking pool of the runtime the executor was made in, whichever thread asks
    /// (a node's connection threads have runtimes of their own), so the pool's cap holds
    /// for the node.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if self.shared.all_stalled() {
            self.shared.runtime.spawn_blocking(job);
            return;
        }
        if let Err(returned) = self.sender.send(Box::new(job)) {
            // Workers are gone (the process is shutting down): run it anyway.
            self.shared.runtime.spawn_blocking(returned.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_workers_overflow_instead_of_queueing() {
        let executor = GuestExecutor::new(1);
        let (blocker_started, started) = tokio::sync::oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        executor.spawn(move || {
            let _ = blocker_started.send(());
            let _ = released.recv();
        });
        started.await.unwrap();
        // The only worker is stalled: this job must still run promptly.
        let (done, finished) = tokio::sync::oneshot::channel();
        let submitted = Instant::now();
        executor.spawn(move || {
            let _ = done.send(std::thread::current().name().map(str::to_string));
        });
        let thread_name = tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap()
            .unwrap();
        assert!(submitted.elapsed() < Duration::from_secs(5));
        assert_ne!(thread_name.as_deref(), Some("atoll-guest-0"));
        release.send(()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_waiting_on_io_gets_a_stand_in_until_the_wait_is_over() {
        let executor = GuestExecutor::new(1);
        let (waiting_started, started) = tokio::sync::oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        executor.spawn(move || {
            waiting(|| {
                let _ = waiting_started.send(());
                let _ = released.recv();
            })
        });
        started.await.unwrap();
        assert_eq!(executor.shared.stand_ins.load(Ordering::SeqCst), 1);
        // The next job takes the hot path, on the stand-in, not the overflow pool.
        let (done, finished) = tokio::sync::oneshot::channel();
        executor.spawn(move || {
            let _ = done.send(std::thread::current().name().map(str::to_string));
        });
        let thread_name = tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(thread_name.as_deref(), Some("atoll-guest-1"));
        release.send(()).unwrap();
        // The wait is over: the stand-in retires.
        let deadline = Instant::now() + Duration::from_secs(5);
        while executor.shared.stand_ins.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "the stand-in never retired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(executor.shared.busy_since[1].load(Ordering::SeqCst), ABSENT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_no_stand_in_is_left_waiting_workers_overflow_at_once() {
        let executor = GuestExecutor::new(1);
        let waiters = 1 + STAND_INS_PER_WORKER;
        let (release, released) = crossbeam_channel::unbounded::<()>();
        let (entered, entries) = std::sync::mpsc::channel::<()>();
        for _ in 0..waiters {
            let (released, entered) = (released.clone(), entered.clone());
            executor.spawn(move || {
                waiting(|| {
                    let _ = entered.send(());
                    let _ = released.recv();
                })
            });
        }
        for _ in 0..waiters {
            entries.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        // The hot worker and every stand-in wait: stalled already, well under the threshold.
        assert!(executor.shared.all_stalled());
        let (done, finished) = tokio::sync::oneshot::channel();
        executor.spawn(move || {
            let _ = done.send(std::thread::current().name().map(str::to_string));
        });
        let thread_name = tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .unwrap()
            .unwrap();
        assert!(!thread_name.unwrap_or_default().starts_with("atoll-guest-"));
        drop(release);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn free_workers_take_jobs() {
        let executor = GuestExecutor::new(2);
        let (done, finished) = tokio::sync::oneshot::channel();
        executor.spawn(move || {
            let _ = done.send(std::thread::current().name().map(str::to_string));
        });
        let thread_name = finished.await.unwrap();
        assert!(thread_name.unwrap().starts_with("atoll-guest-"));
    }
}
