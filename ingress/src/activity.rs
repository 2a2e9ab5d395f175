//! What one connection is doing, for the limits every listener puts on its connections.
//!
//! A connection that does nothing (a partial request head, a silent socket, an idle
//! keep-alive) holds a file descriptor forever unless something closes it, so a listener
//! closes a connection that has had no request in flight for its idle timeout, and one
//! whose first request head has not come within the header timeout. A request counts as in
//! flight until its response body is finished, so a long streamed response is never cut as
//! idle. [`Activity`] is that bookkeeping, one implementation for the edge's listeners and
//! the registry's API server (its `connections` module), which is why it lives here, with the
//! two defaults they share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Default time to send a whole request head (slowloris), the edge's and the registry's.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection with no request in flight stays open, the edge's and the
/// registry's.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What one connection is doing: requests in flight and when it last did something.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `started` of the last request's end.
    last_activity_ms: AtomicU64,
    requests: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// A connection that starts now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity::default())
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Counts a request as in flight until the returned guard is dropped. The clock is read
    /// when it ends: a connection is never idle while a request is in flight, so only the
    /// end of the last one matters.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests started on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// When the connection last finished a request (or, before any, started).
    pub fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Resolves once the connection has had no request in flight for `idle`.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let deadline = self.last_activity() + idle;
            if Instant::now() >= deadline && self.in_flight() == 0 {
                return;
            }
            tokio::time::sleep_until(deadline.max(Instant::now() + Duration::from_millis(100)).into()).await;
        }
    }

    /// Resolves when no request has started within `timeout` of the connection's start
    /// (a silent socket, a partial first head); never otherwise.
    pub async fn no_request_within(&self, timeout: Duration) {
        tokio::time::sleep_until((self.started + timeout).into()).await;
        if self.requests() == 0 {
            return;
        }
        std::future::pending().await
    }
}

/// A request in flight on a connection (see [`Activity::enter`]); also when the client
/// goes away mid-request and the request's future or body is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}
