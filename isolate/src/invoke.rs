//! One request's run of a function, under its deadline: the policy every caller that runs
//! guest code for a request shares.
//!
//! ```text
//! invoke ─ admit (or Overloaded) ─▶ executor: pool.execute ─▶ outcome ─┐   then replenish
//!    │                                         └─ head (streams) ──┐   │   (off the request path)
//!    ▼                                                              ▼   ▼
//!  wait until the deadline for the head or the outcome ──────▶ Run::Streaming | Run::Finished
//!    └─ deadline passed: interrupt, again every INTERRUPT_RETRY until the run returns (504)
//! ```
//!
//! Whoever stops waiting for the run — a streamed head handed to the client, or the
//! caller's future dropped because the client went away — leaves the guest to a
//! supervisor task: it is still stopped at the deadline and its outcome still reported to
//! the [`RunObserver`], whatever happens to the request. The caller turns a [`Run`] into
//! its protocol's response; the observer counts and logs outcomes.

use std::sync::Arc;
use std::time::Duration;

use crate::cgi::CgiRequest;
use crate::executor::GuestExecutor;
use crate::function::{Invocation, InvokeError};
use crate::pool::{InstancePool, InterruptSlot, Overloaded, StartKind};
use crate::stream::{StreamedResponse, StreamingOutput};

/// How often a timed-out guest is signalled again until it stops.
pub const INTERRUPT_RETRY: Duration = Duration::from_millis(20);

/// The guest thread's job panicked: no outcome came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPanicked;

/// A run's outcome: the invocation and how its instance started, the guest's failure, or
/// the job's panic.
pub type RunOutcome = Result<Result<(Invocation, StartKind), InvokeError>, GuestPanicked>;

/// Told what happens to the runs of one function.
pub trait RunObserver: Send + Sync + 'static {
    /// An instance was made: ahead of a request (`ahead`), or for one.
    fn instance_started(&self, start_time: Duration, ahead: bool);
    /// A run ended: once per run, also when nobody waited for it any more.
    fn finished(&self, outcome: &RunOutcome);
}

/// How the caller takes the response.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// The response may stream (a large body goes out while the guest still writes it).
    /// Off for clients that cannot tell a body that broke off from one that ended (an
    /// HTTP/1.0 body without a length ends when the connection closes).
    pub streamable: bool,
    /// Only the head is wanted (HEAD): the body is counted and dropped.
    pub discard_body: bool,
    /// An earlier deadline than the function's own timeout: a service call ends by its
    /// caller's.
    pub deadline: Option<tokio::time::Instant>,
}

/// What [`invoke`] hands back.
#[derive(Debug)]
pub enum Run {
    /// The guest streams its response: its head, with a body read as the guest writes.
    Streaming(StreamedResponse),
    /// The run ended (and was reported to the observer).
    Finished(RunOutcome),
}

/// Runs `request` on a fresh instance of `pool`'s function on `executor`, under the
/// function's timeout; `Err` when the pool's queue is full.
pub async fn invoke(
    executor: &GuestExecutor,
    pool: Arc<InstancePool>,
    request: CgiRequest,
    options: RunOptions,
    observer: Arc<dyn RunObserver>,
) -> Result<Run, Overloaded> {
    let admission = pool.admit().await?;
    let timeout = pool.function().config().timeout;
    let own_deadline = tokio::time::Instant::now() + timeout;
    let deadline = options
        .deadline
        .map_or(own_deadline, |earlier| earlier.min(own_deadline));
    let interrupt = InterruptSlot::new();
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let (head_sender, mut heads) = tokio::sync::oneshot::channel::<StreamedResponse>();
    {
        let pool = Arc::clone(&pool);
        let interrupt = Arc::clone(&interrupt);
        let observer = Arc::clone(&observer);
        executor.spawn(move || {
            let streaming = options.streamable.then(|| {
                let mut streaming = StreamingOutput::new(move |head| {
                    let _ = head_sender.send(head);
                });
                streaming.discard_body = options.discard_body;
                streaming
            });
            let outcome = pool.execute(&request, &interrupt, streaming);
            drop(admission);
            let _ = sender.send(outcome);
            // Prepare the next instance while this thread is here anyway, off the
            // request path: the response has been handed back already.
            for start_time in pool.replenish() {
                observer.instance_started(start_time, true);
            }
        });
    }
    // Whoever stops waiting for the run (a streamed head, or the client going away and
    // this future being dropped) leaves the guest to the supervisor: it is stopped at the
    // deadline and its outcome recorded, whatever happens to this request.
    let mut supervised = Supervised {
        runtime: executor.runtime(),
        deadline,
        interrupt,
        receiver: Some(receiver),
        observer: Arc::clone(&observer),
    };
    // Until the deadline: the run's outcome, or the head of a response it streams.
    let mut may_stream = true;
    let first = tokio::time::timeout_at(deadline, async {
        let receiver = supervised.receiver.as_mut().expect("still waiting");
        loop {
            tokio::select! {
                biased;
                head = &mut heads, if may_stream => match head {
                    Ok(head) => return Ok(head),
                    // The run ended without streaming: its outcome is on its way.
                    Err(_) => may_stream = false,
                },
                outcome = &mut *receiver => return Err(outcome.map_err(|_| GuestPanicked)),
            }
        }
    })
    .await;
    let outcome = match first {
        // The body flows while the guest runs; the supervisor takes over.
        Ok(Ok(head)) => return Ok(Run::Streaming(head)),
        Ok(Err(outcome)) => {
            supervised.receiver = None;
            outcome
        }
        Err(_) => {
            // Still supervised while it is stopped here: if this future is dropped now, the
            // supervisor goes on stopping it.
            let receiver = supervised.receiver.as_mut().expect("still waiting");
            let outcome = stop_at(deadline, &supervised.interrupt, receiver).await;
            supervised.receiver = None;
            outcome
        }
    };
    observer.finished(&outcome);
    if let Ok(Ok((invocation, _))) = &outcome
        && invocation.streamed.is_some()
    {
        // The run streamed and ended before its head was taken: the head was sent before
        // the outcome, on the same thread, so it is there.
        return Ok(match heads.try_recv() {
            Ok(head) => Run::Streaming(head),
            Err(_) => Run::Finished(Err(GuestPanicked)),
        });
    }
    Ok(Run::Finished(outcome))
}

type OutcomeReceiver = tokio::sync::oneshot::Receiver<Result<(Invocation, StartKind), InvokeError>>;

/// A run nobody waits for any more, while `receiver` is set: dropping it hands the run to
/// a task that stops it at the deadline and reports its outcome. The task runs on the
/// executor's runtime, which outlives whatever runtime the request was on (a node's
/// connection threads stop with their listeners).
struct Supervised<'a> {
    runtime: &'a tokio::runtime::Handle,
    deadline: tokio::time::Instant,
    interrupt: Arc<InterruptSlot>,
    receiver: Option<OutcomeReceiver>,
    observer: Arc<dyn RunObserver>,
}

impl Drop for Supervised<'_> {
    fn drop(&mut self) {
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        let (deadline, interrupt, observer) = (
            self.deadline,
            Arc::clone(&self.interrupt),
            Arc::clone(&self.observer),
        );
        self.runtime.spawn(async move {
            let outcome = stop_at(deadline, &interrupt, &mut receiver).await;
            observer.finished(&outcome);
        });
    }
}

/// The run's outcome, stopping the guest once `deadline` has passed.
async fn stop_at(
    deadline: tokio::time::Instant,
    interrupt: &InterruptSlot,
    receiver: &mut OutcomeReceiver,
) -> RunOutcome {
    if let Ok(outcome) = tokio::time::timeout_at(deadline, &mut *receiver).await {
        return outcome.map_err(|_| GuestPanicked);
    }
    loop {
        // The signal can miss a guest that is between instructions it checks; repeat
        // until the run returns.
        interrupt.fire();
        if let Ok(outcome) = tokio::time::timeout(INTERRUPT_RETRY, &mut *receiver).await {
            return outcome.map_err(|_| GuestPanicked);
        }
    }
}
