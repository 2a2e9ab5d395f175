//! Deadlines for guest code that runs with no request waiting on it.
//!
//! A request's run is stopped by its caller (the router's timeout fires the request's
//! [`InterruptSlot`](crate::pool::InterruptSlot)). But guest code also runs where no request
//! waits: a module's `(start)` function inside every instantiation, including the instances
//! a pool makes ahead of requests, and init functions at the registry and on the node. Each
//! of those runs under a deadline from this module, so a looping guest costs one bounded
//! run, never a thread spinning forever or a maintenance loop that stops for every function.
//!
//! One process-wide watchdog thread keeps the armed deadlines in order and sleeps until the
//! earliest. Arming is a mutex and a map insert, and wakes the thread only when the new
//! deadline is the earliest; disarming (dropping the guard) removes the entry. When a
//! deadline passes, the watchdog stops the run (see `RunSignals::stop`: host calls first, then a signal), and
//! repeats the interrupt every [`REPEAT`] until the guard is dropped: a signal can miss a
//! guest that is between the points it checks (see wasmer's `Interrupter`).
//!
//! ```text
//! arm(interrupter, limit) ──▶ BTreeMap<(deadline, id), entry> ◀── watchdog: sleep until first,
//!   Guard::drop ──remove──▶                                        fire, re-arm at now + REPEAT
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::wasi::RunSignals;

/// How often an interrupt is repeated until the run returns.
const REPEAT: Duration = Duration::from_millis(10);

struct Entry {
    interrupter: wasmer::Interrupter,
    signals: Arc<RunSignals>,
}

#[derive(Default)]
struct Deadlines {
    next_id: u64,
    entries: BTreeMap<(Instant, u64), Entry>,
}

struct Watchdog {
    state: Mutex<Deadlines>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let watchdog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            state: Mutex::new(Deadlines::default()),
            wake: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("atoll-deadlines".into())
            .spawn(move || watchdog.run())
            .expect("spawn the deadline watchdog thread");
        watchdog
    })
}

impl Watchdog {
    fn run(&self) {
        let mut state = self.state.lock().expect("deadlines");
        loop {
            let now = Instant::now();
            // Fire everything due, and schedule each again shortly in case it was missed.
            while let Some(entry) = state.entries.first_entry() {
                let (deadline, id) = *entry.key();
                if deadline > now {
                    break;
                }
                let entry = entry.remove();
                entry.signals.stop(&entry.interrupter);
                state.entries.insert((now + REPEAT, id), entry);
            }
            state = match state.entries.first_key_value() {
                Some(((deadline, _), _)) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    self.wake.wait_timeout(state, wait).expect("deadlines").0
                }
                None => self.wake.wait(state).expect("deadlines"),
            };
        }
    }
}

/// A run under a deadline; dropping it disarms the deadline.
#[must_use = "the deadline is disarmed when the guard is dropped"]
pub struct DeadlineGuard {
    key: (Instant, u64),
    signals: Arc<RunSignals>,
}

impl std::fmt::Debug for DeadlineGuard {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DeadlineGuard")
            .field("fired", &self.fired())
            .finish()
    }
}

impl DeadlineGuard {
    /// Whether the deadline passed (and the run was interrupted).
    pub fn fired(&self) -> bool {
        self.signals.fired()
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        let mut state = watchdog().state.lock().expect("deadlines");
        let id = self.key.1;
        // The entry moves when it fires (re-armed at a later instant); find it by id then.
        if state.entries.remove(&self.key).is_none() {
            state.entries.retain(|(_, entry_id), _| *entry_id != id);
        }
    }
}

/// Stops the run behind `interrupter` and `signals` once `limit` has passed (see
/// [`RunSignals::stop`]: host calls stop first, a signal follows), repeated every few
/// milliseconds until the returned guard is dropped.
pub fn arm(interrupter: wasmer::Interrupter, limit: Duration, signals: Arc<RunSignals>) -> DeadlineGuard {
    let watchdog = watchdog();
    let deadline = Instant::now() + limit;
    let mut state = watchdog.state.lock().expect("deadlines");
    let id = state.next_id;
    state.next_id += 1;
    let earliest = state
        .entries
        .first_key_value()
        .is_none_or(|((first, _), _)| deadline < *first);
    state.entries.insert(
        (deadline, id),
        Entry {
            interrupter,
            signals: Arc::clone(&signals),
        },
    );
    drop(state);
    if earliest {
        watchdog.wake.notify_one();
    }
    DeadlineGuard {
        key: (deadline, id),
        signals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disarmed_deadline_never_fires_and_a_passed_one_does() {
        let store = wasmer::Store::default();
        let quiet = arm(store.interrupter(), Duration::from_secs(3600), Arc::default());
        let due = arm(store.interrupter(), Duration::from_millis(1), Arc::default());
        let started = Instant::now();
        while !due.fired() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "deadline never fired"
            );
            std::thread::yield_now();
        }
        assert!(!quiet.fired());
        let ids = [due.key.1, quiet.key.1];
        drop(due);
        drop(quiet);
        let state = watchdog().state.lock().unwrap();
        assert!(
            state.entries.keys().all(|(_, id)| !ids.contains(id)),
            "guards leave no entries behind"
        );
    }
}
