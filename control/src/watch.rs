//! The one change stream over a store: what a registry serves as `GET /v1/watch`, and what
//! a node following NATS directly produces for itself.
//!
//! ```text
//! start(since) ── subscribe to changes ── catch-up scan ──▶ Put… Synced{revision}
//!                                                           │
//!   change ─────────────── re-scan by revision ────────────▶ Put…         (changes coalesce)
//!   idle `heartbeat` ──┬── Heartbeat{last}                                 (WhenIdle::Heartbeat)
//!                      └── re-scan; Heartbeat{last} if nothing             (WhenIdle::Rescan)
//!   store fails ──────────▶ Err(Store) once, then the end   (the reader resumes from its last revision)
//!   changes closed / stop ▶ the end
//! ```
//!
//! Subscribing before the catch-up scan means a change committed in between is not missed;
//! re-scanning by revision after every wake means a burst of changes coalesces and none is
//! lost. Ending on a failed read loses nothing (the reader resumes from the last revision
//! it applied), whereas skipping it would.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use atoll_core::StoreError;
use atoll_core::watch::WatchEvent;
use futures_util::Stream;
use tokio::sync::watch;

/// A store a watch can follow: a change feed and a scan by revision.
pub trait ChangeSource: Clone + Send + Sync + 'static {
    /// Changes whenever the store's revision does.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// The `Put` events of the records changed after `since`, in revision order, and the
    /// store's revision they bring the reader to.
    fn events_since(
        &self,
        since: u64,
    ) -> impl Future<Output = Result<(Vec<WatchEvent>, u64), StoreError>> + Send;
}

/// What a watch does when `heartbeat` passes without an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenIdle {
    /// Sends a heartbeat at the last revision: the store's change feed reports every
    /// change (a registry's own store).
    Heartbeat,
    /// Reads the store again first, and sends a heartbeat only if nothing changed: how a
    /// dead NATS is noticed, and how a change a disconnected KV watch missed is caught.
    Rescan,
}

/// Why a watch ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum WatchEnd {
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store's change feed closed.
    #[error("the watch stream ended")]
    Closed,
}

/// One watch: see the module docs for what it yields.
pub struct ChangeWatch<S> {
    source: S,
    changes: watch::Receiver<u64>,
    stopped: Option<watch::Receiver<bool>>,
    queue: VecDeque<WatchEvent>,
    /// The revision the stream has covered so far.
    last: u64,
    heartbeat: Duration,
    when_idle: WhenIdle,
    /// An error was yielded or the stream stopped: it is over.
    ended: bool,
}

impl<S: ChangeSource> ChangeWatch<S> {
    /// Subscribes, then catches up from revision `since` (0: everything): the events after
    /// it, then `Synced`. Fails if the catch-up scan does.
    pub async fn start(
        source: S,
        since: u64,
        heartbeat: Duration,
        when_idle: WhenIdle,
    ) -> Result<ChangeWatch<S>, StoreError> {
        let changes = source.subscribe();
        let (events, revision) = source.events_since(since).await?;
        let mut queue: VecDeque<WatchEvent> = events.into();
        queue.push_back(WatchEvent::Synced { revision });
        Ok(ChangeWatch {
            source,
            changes,
            stopped: None,
            queue,
            last: revision,
            heartbeat,
            when_idle,
            ended: false,
        })
    }

    /// Ends the stream (without an error) once `stopped` turns true: a server shutting down.
    pub fn until(mut self, stopped: watch::Receiver<bool>) -> ChangeWatch<S> {
        self.stopped = Some(stopped);
        self
    }

    /// The next event; an error once if the store fails or its feed closes, then `None`.
    pub async fn next_event(&mut self) -> Option<Result<WatchEvent, WatchEnd>> {
        if self.ended {
            return None;
        }
        let quiet_until = tokio::time::Instant::now() + self.heartbeat;
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(Ok(event));
            }
            let stopped = self.stopped.as_mut();
            let stopped = async move {
                match stopped {
                    Some(stopped) => drop(stopped.wait_for(|stopped| *stopped).await),
                    None => std::future::pending().await,
                }
            };
            let idle = tokio::select! {
                () = stopped => {
                    self.ended = true;
                    return None;
                }
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        self.ended = true;
                        return Some(Err(WatchEnd::Closed));
                    }
                    false
                }
                () = tokio::time::sleep_until(quiet_until) => true,
            };
            if idle && self.when_idle == WhenIdle::Heartbeat {
                return Some(Ok(WatchEvent::Heartbeat { revision: self.last }));
            }
            match self.source.events_since(self.last).await {
                Ok((events, revision)) => {
                    self.last = self.last.max(revision);
                    self.queue.extend(events);
                    if idle && self.queue.is_empty() {
                        return Some(Ok(WatchEvent::Heartbeat { revision: self.last }));
                    }
                }
                Err(error) => {
                    self.ended = true;
                    return Some(Err(error.into()));
                }
            }
        }
    }

    /// The watch as a stream of [`ChangeWatch::next_event`]s.
    pub fn into_stream(self) -> impl Stream<Item = Result<WatchEvent, WatchEnd>> + Send {
        futures_util::stream::unfold(self, |mut watch| async move {
            let event = watch.next_event().await?;
            Some((event, watch))
        })
    }
}
