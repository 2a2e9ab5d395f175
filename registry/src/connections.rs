//! Limits on a listener's connections, shared by the registry API and the edge.
//!
//! A server with no limits can be made useless by connections that do nothing: a partial
//! request head, a silent socket, an idle keep-alive each hold a file descriptor forever,
//! and once the process runs out of them nobody is served — not `atoll ls`, not a node's
//! heartbeat or watch. So every connection is closed when it has no request in flight for
//! the idle timeout, and when its first request head has not arrived within the header
//! timeout; a request counts as in flight until its response body is finished, so a
//! streaming response (the registry's `GET /v1/watch`) is never cut as idle.
//!
//! [`Activity`] is that per-connection bookkeeping, shared with the edge's accept loops
//! (it lives in `atoll_ingress::activity`, with the two defaults). [`serve_router`] is the registry's accept loop:
//! an axum router served by hyper-util (HTTP/1.1 and h2c) with these limits and a
//! connection cap. At the cap it closes the connection that has been idle longest (no
//! request in flight, e.g. a partial head or an idle keep-alive) to make room, so
//! connections that do nothing cannot lock out one that wants an answer; when every
//! connection is busy it refuses the new one at once with a 503 naming the limit, rather
//! than leaving it waiting in the backlog. When the process is out of file descriptors,
//! it likewise closes the longest-idle connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

use atoll_ingress::activity::{Activity, InFlight};
pub use atoll_ingress::activity::{DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT};

/// Default [`ConnectionLimits::max_connections`] for the registry.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default [`ConnectionLimits::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Refusals (503 at the cap) being written at once; beyond, a refused connection is just
/// closed.
const MAX_REFUSALS_IN_PROGRESS: usize = 32;
/// Time to write a refusal.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// A listener's limits on its clients.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections; at the cap the longest-idle one is closed to make room, and a new
    /// one is refused (503) when every connection has a request in flight.
    pub max_connections: usize,
    /// Time to send a whole request head: the first from the connection's start, later
    /// ones from the end of the previous response (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight (a response still streaming counts) is
    /// closed after this long.
    pub idle_timeout: Duration,
    /// How long in-flight requests get after shutdown.
    pub shutdown_grace: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One open connection as the cap sees it.
struct Entry {
    activity: Arc<Activity>,
    close: Arc<Notify>,
}

/// The open connections of one listener.
#[derive(Default)]
struct Table {
    entries: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Closes the connection with no request in flight that has been idle longest; false
    /// when every connection is busy.
    fn evict_longest_idle(entries: &mut HashMap<u64, Entry>) -> bool {
        let oldest = entries
            .iter()
            .filter(|(_, entry)| entry.activity.in_flight() == 0)
            .min_by_key(|(_, entry)| entry.activity.last_activity())
            .map(|(id, _)| *id);
        match oldest.and_then(|id| entries.remove(&id)) {
            Some(entry) => {
                // notify_one keeps a permit if the connection is not waiting yet.
                entry.close.notify_one();
                true
            }
            None => false,
        }
    }

    /// Registers a new connection, making room at `max`; `None` when it must be refused.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Activity>, Arc<Notify>)> {
        let mut entries = self.lock();
        if entries.len() >= max.max(1) && !Table::evict_longest_idle(&mut entries) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Activity::new();
        let close = Arc::new(Notify::new());
        entries.insert(
            id,
            Entry {
                activity: Arc::clone(&activity),
                close: Arc::clone(&close),
            },
        );
        Some((id, activity, close))
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// Serves `router` on `listener` with `limits` until `shutdown` resolves; then stops
/// accepting and gives in-flight requests [`ConnectionLimits::shutdown_grace`] to finish
/// (streams that never end, such as a watch, must end on the same signal).
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100);
    let builder = Arc::new(builder);
    let table = Arc::new(Table::default());
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_PROGRESS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: make room if anyone is idle,
                    // and back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    Table::evict_longest_idle(&mut table.lock());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Some((id, activity, close)) = table.admit(limits.max_connections) else {
            refuse(stream, limits.max_connections, &refusals);
            continue;
        };
        let service = {
            let activity = Arc::clone(&activity);
            let router = router.clone();
            hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let in_flight = activity.enter();
                let router = router.clone();
                async move {
                    let response = router.oneshot(request.map(Body::new)).await?;
                    Ok::<_, std::convert::Infallible>(response.map(|inner| TrackedBody {
                        inner,
                        _in_flight: in_flight,
                    }))
                }
            })
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let (table, limits) = (Arc::clone(&table), limits.clone());
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                () = activity.idle(limits.idle_timeout) => {}
                () = activity.no_request_within(limits.header_read_timeout) => {}
                () = close.notified() => {}
            }
            table.remove(id);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("grace period over; dropping remaining connections");
        }
    }
    Ok(())
}

/// Answers a connection over the cap with a 503 that names the limit, then closes it.
fn refuse(mut stream: TcpStream, max: usize, refusals: &Arc<Semaphore>) {
    tracing::warn!("refused a connection: all {max} connections have a request in flight");
    let Ok(permit) = Arc::clone(refusals).try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let body = format!(
            "{{\"error\":\"the registry is at its connection limit ({max} open connections, all \
             busy); try again later, or raise --max-connections\"}}"
        );
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await?;
            // Read what the client sent until it closes: closing with unread bytes would
            // reset the connection and could lose the answer.
            let mut discard = [0u8; 4096];
            while stream.read(&mut discard).await? > 0 {}
            std::io::Result::Ok(())
        })
        .await;
        drop(permit);
    });
}
