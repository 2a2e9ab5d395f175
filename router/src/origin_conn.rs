//! Connections to origins, driven by the request that uses them.
//!
//! hyper-util's pooled client runs each connection as a task of its own: every request is
//! handed to that task over a channel and its response handed back over another, two task
//! wake-ups per request, often across threads. A proxied request already has a task (the
//! client connection's), so here that task drives the origin connection itself while it
//! sends the request, waits for the head and reads a small body: the origin's socket wakes
//! the task that writes the answer, and nothing else runs in between.
//!
//! Idle connections wait on a per-origin stack (the most recently used first, its socket
//! buffers warm). Nothing polls them there, so a close by the origin is noticed when one is
//! taken (polled once, without a waker) or by the periodic [`IdleConnections::sweep`]. A
//! response whose body streams on after the head hands its connection to a task that drives
//! it until the response is done and then puts it back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What a connection to an origin runs over: TCP, or TLS for an `https://` origin.
pub type OriginIo = hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>;
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Driver = hyper::client::conn::http1::Connection<OriginIo, Full<Bytes>>;

/// Idle connections kept per origin (nginx's `keepalive 256` in `atoll-bench origin`).
pub const MAX_IDLE_PER_ORIGIN: usize = 256;
/// Idle connections kept on a node, all origins of all functions together: a tenant with
/// many origins cannot hold the node's file descriptors in idle connections.
pub const MAX_IDLE_ON_NODE: usize = 8192;
/// Idle connections on the node now (in some origin's stack).
static IDLE_ON_NODE: AtomicUsize = AtomicUsize::new(0);

/// How often idle connections are swept ([`IdleConnections::sweep`]).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// An idle connection unused this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One HTTP/1.1 connection to an origin.
pub struct OriginConnection {
    sender: Sender,
    driver: Driver,
    idle_since: Instant,
}

/// What [`drive`] ended with.
pub enum Driven<T> {
    /// The work finished.
    Done(T),
    /// The connection ended first (closed, or failed).
    Ended(Result<(), hyper::Error>),
}

/// Polls `work` and the connection's `driver` together until `work` is done or the
/// connection ends. When the connection ends, `work` gets one more poll: hyper answers the
/// requests it still held then.
pub async fn drive<F: Future>(driver: &mut Driver, work: F) -> Driven<F::Output> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|context| {
        if let Poll::Ready(output) = work.as_mut().poll(context) {
            return Poll::Ready(Driven::Done(output));
        }
        match Pin::new(&mut *driver).poll(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(ended) => Poll::Ready(match work.as_mut().poll(context) {
                Poll::Ready(output) => Driven::Done(output),
                Poll::Pending => Driven::Ended(ended),
            }),
        }
    })
    .await
}

/// Why a request on a connection failed.
pub struct ExchangeError {
    pub reason: String,
    /// hyper had not begun to send the request: it may go elsewhere whatever its method.
    pub never_sent: bool,
}

impl ExchangeError {
    pub fn from_hyper(error: &hyper::Error) -> Self {
        ExchangeError {
            reason: atoll_isolate::wasi_http::error_chain(error),
            never_sent: error.is_canceled(),
        }
    }

    fn ended(ended: Result<(), hyper::Error>) -> Self {
        match ended {
            Ok(()) => ExchangeError {
                reason: "the origin closed the connection".into(),
                never_sent: false,
            },
            Err(error) => Self::from_hyper(&error),
        }
    }
}

impl OriginConnection {
    /// A connection over `io`, after its HTTP/1.1 handshake (nothing is sent yet). Boxed:
    /// it moves between the idle stack and requests' futures, which stay small.
    pub async fn new(io: OriginIo) -> Result<Box<Self>, hyper::Error> {
        let (sender, driver) = hyper::client::conn::http1::Builder::new().handshake(io).await?;
        Ok(Box::new(OriginConnection {
            sender,
            driver,
            idle_since: Instant::now(),
        }))
    }

    /// Sends `request` and waits for the response's head, driving the connection.
    pub async fn request(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, ExchangeError> {
        let OriginConnection { sender, driver, .. } = self;
        // A connection that cannot take the request closed before anything was sent.
        let unsent = |mut error: ExchangeError| {
            error.never_sent = true;
            error
        };
        match drive(driver, sender.ready()).await {
            Driven::Done(Ok(())) => {}
            Driven::Done(Err(error)) => return Err(unsent(ExchangeError::from_hyper(&error))),
            Driven::Ended(ended) => return Err(unsent(ExchangeError::ended(ended))),
        }
        match drive(driver, sender.send_request(request)).await {
            Driven::Done(Ok(response)) => Ok(response),
            Driven::Done(Err(error)) => Err(ExchangeError::from_hyper(&error)),
            // Had hyper taken the request, it would have answered it with an error as the
            // connection ended; it is still queued (an EOF seen on the idle connection
            // first): never sent.
            Driven::Ended(ended) => Err(unsent(ExchangeError::ended(ended))),
        }
    }

    /// Polls `work` while driving the connection (a response body being read).
    pub async fn drive<F: Future>(&mut self, work: F) -> Driven<F::Output> {
        drive(&mut self.driver, work).await
    }

    /// Whether the connection is still open, polled once without a waker: a close (or
    /// stray bytes) that arrived while it was idle ends it now.
    fn is_open(&mut self) -> bool {
        let mut context = Context::from_waker(Waker::noop());
        Pin::new(&mut self.driver).poll(&mut context).is_pending() && !self.sender.is_closed()
    }

    /// Whether the connection can take another request now, without waiting.
    fn ready_now(&mut self) -> Poll<bool> {
        if !self.is_open() {
            return Poll::Ready(false);
        }
        let mut context = Context::from_waker(Waker::noop());
        match self.sender.poll_ready(&mut context) {
            Poll::Ready(ready) => Poll::Ready(ready.is_ok()),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits, driving the connection, until it can take another request (its response has
    /// ended: only hyper's bookkeeping is left); `false` when it closed instead or `limit`
    /// passed.
    async fn until_ready(&mut self, limit: Duration) -> bool {
        let OriginConnection { sender, driver, .. } = self;
        matches!(
            tokio::time::timeout(limit, drive(driver, sender.ready())).await,
            Ok(Driven::Done(Ok(())))
        )
    }

    /// Hands the connection to a task of its own that drives it with HTTP upgrades
    /// enabled (a `101` then hands the socket over), and returns the sender.
    pub fn into_upgradable(self: Box<Self>) -> Sender {
        let OriginConnection { sender, driver, .. } = *self;
        tokio::spawn(async move {
            if let Err(error) = driver.with_upgrades().await {
                tracing::debug!(%error, "origin connection ended");
            }
        });
        sender
    }
}

/// A connection lent to the streamed body it carries: the body drives it while it is read
/// and puts it back when it has all been read; dropped earlier, it is closed.
pub struct LentConnection {
    connection: Box<OriginConnection>,
    idle: Arc<IdleConnections>,
}

impl LentConnection {
    pub fn new(connection: Box<OriginConnection>, idle: Arc<IdleConnections>) -> Self {
        LentConnection { connection, idle }
    }

    /// Drives the connection (the body's data arrives through it); `true` once it ended.
    pub fn poll_ended(&mut self, context: &mut Context<'_>) -> bool {
        Pin::new(&mut self.connection.driver).poll(context).is_ready()
    }

    /// The body was read to its end.
    pub fn release(self) {
        self.idle.release(self.connection);
    }
}

/// The idle connections to one origin.
#[derive(Default)]
pub struct IdleConnections {
    // Boxed on purpose: a connection taken moves into a request's future as a pointer.
    #[allow(clippy::vec_box)]
    stack: Mutex<Vec<Box<OriginConnection>>>,
}

impl IdleConnections {
    /// The most recently used connection that is still open.
    pub fn take(&self) -> Option<Box<OriginConnection>> {
        loop {
            let mut connection = self.stack.lock().unwrap_or_else(PoisonError::into_inner).pop()?;
            IDLE_ON_NODE.fetch_sub(1, Ordering::Relaxed);
            if connection.is_open() {
                return Some(connection);
            }
        }
    }

    /// Puts back a connection whose response is done, or gives it to a task that waits
    /// for that (a body still being read elsewhere) and then puts it back.
    pub fn release(self: &Arc<Self>, mut connection: Box<OriginConnection>) {
        match connection.ready_now() {
            Poll::Ready(true) => self.push(connection),
            Poll::Ready(false) => {}
            Poll::Pending => {
                let idle = Arc::clone(self);
                tokio::spawn(async move {
                    if connection.until_ready(crate::origin::BODY_IDLE).await {
                        idle.push(connection);
                    }
                });
            }
        }
    }

    fn push(&self, mut connection: Box<OriginConnection>) {
        connection.idle_since = Instant::now();
        let mut stack = self.stack.lock().unwrap_or_else(PoisonError::into_inner);
        if stack.len() < MAX_IDLE_PER_ORIGIN {
            if IDLE_ON_NODE.fetch_add(1, Ordering::Relaxed) < MAX_IDLE_ON_NODE {
                stack.push(connection);
            } else {
                IDLE_ON_NODE.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Closes connections idle past [`IDLE_TIMEOUT`] and those the origin closed (polled
    /// and closed outside the lock requests take connections under).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut taken = std::mem::take(&mut *self.stack.lock().unwrap_or_else(PoisonError::into_inner));
        let before = taken.len();
        taken.retain_mut(|connection| {
            now.duration_since(connection.idle_since) < IDLE_TIMEOUT && connection.is_open()
        });
        IDLE_ON_NODE.fetch_sub(before - taken.len(), Ordering::Relaxed);
        let mut stack = self.stack.lock().unwrap_or_else(PoisonError::into_inner);
        // Those put back meanwhile are the most recently used: they stay on top.
        taken.append(&mut stack);
        let surplus = taken.len().saturating_sub(MAX_IDLE_PER_ORIGIN);
        taken.drain(..surplus);
        IDLE_ON_NODE.fetch_sub(surplus, Ordering::Relaxed);
        *stack = taken;
    }
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        let stack = self.stack.get_mut().unwrap_or_else(PoisonError::into_inner);
        IDLE_ON_NODE.fetch_sub(stack.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connection(address: std::net::SocketAddr) -> Box<OriginConnection> {
        let tcp = TcpStream::connect(address).await.unwrap();
        OriginConnection::new(hyper_rustls::MaybeHttpsStream::Http(TokioIo::new(tcp)))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn idle_connections_are_capped_per_origin_and_counted_on_the_node() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // The origin keeps every connection open and says nothing.
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let idle = Arc::new(IdleConnections::default());
        for _ in 0..MAX_IDLE_PER_ORIGIN + 10 {
            idle.release(connection(address).await);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while IDLE_ON_NODE.load(Ordering::Relaxed) < MAX_IDLE_PER_ORIGIN {
            assert!(Instant::now() < deadline, "connections were not put back");
            tokio::task::yield_now().await;
        }
        assert_eq!(IDLE_ON_NODE.load(Ordering::Relaxed), MAX_IDLE_PER_ORIGIN);
        assert_eq!(idle.stack.lock().unwrap().len(), MAX_IDLE_PER_ORIGIN);
        let taken = idle.take().expect("an open connection");
        assert_eq!(IDLE_ON_NODE.load(Ordering::Relaxed), MAX_IDLE_PER_ORIGIN - 1);
        idle.release(taken);
        idle.sweep();
        assert_eq!(IDLE_ON_NODE.load(Ordering::Relaxed), MAX_IDLE_PER_ORIGIN);
        drop(idle);
        assert_eq!(IDLE_ON_NODE.load(Ordering::Relaxed), 0);
    }
}
