//! Connections to origins, driven by the request that uses them.
//!
//! hyper-util's pooled client runs each connection as a task of its own: every request is
//! handed to that task over a channel and its response handed back over another, two task
//! wake-ups per request, often across threads. A proxied request already has a task (the
//! client connection's), so here that task drives the origin connection itself while it
//! sends the request, waits for the head and reads a small body: the origin's socket wakes
//! the task that writes the answer, and nothing else runs in between.
//!
//! Idle connections wait on a per-origin stack, one per connection worker (the most
//! recently used first, its socket buffers warm), and a worker takes only from its own:
//! a socket's readiness is reported by the reactor of the thread that opened it, so a
//! connection used from another worker costs a cross-thread wake-up (an eventfd write and
//! an epoll return) on every read, for as long as it lives. nginx's workers keep their
//! upstream connections the same way. Nothing polls them there, so a close by
//! the origin is noticed when one is taken (polled once, without a waker) or by the
//! periodic [`IdleConnections::sweep`]. A response whose body streams on after the head
//! hands its connection to a task that drives it until the response is done and then puts
//! it back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use atoll_ingress::workers::PerWorker;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::lock;

/// What a connection to an origin runs over: TCP, or TLS for an `https://` origin.
pub type OriginIo = hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>;
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Driver = hyper::client::conn::http1::Connection<OriginIo, Full<Bytes>>;

/// How many idle connections are kept: `per_origin` per connection worker's stack (as
/// nginx's `keepalive` is per worker process; threads that are no worker, HTTP/3's, share
/// one stack); `per_function` (all its origins) and `on_node` (all functions) for the node,
/// give or take the workers' shares (see [`IdleConnections`]); and a `floor` per origin
/// that the function's and the node's caps do not take away, so a tenant that fills them
/// slows only itself.
#[derive(Debug, Clone, Copy)]
pub struct IdleLimits {
    pub per_origin: usize,
    pub per_function: usize,
    pub on_node: usize,
    pub floor: usize,
}

impl Default for IdleLimits {
    fn default() -> Self {
        IdleLimits {
            // nginx's `keepalive 256` in `atoll-bench origin`.
            per_origin: 256,
            per_function: 1024,
            on_node: 8192,
            floor: 4,
        }
    }
}

/// Idle connections on the node now (in some origin's stack), by worker.
fn idle_on_node() -> &'static PerWorker<AtomicUsize> {
    static ON_NODE: std::sync::OnceLock<PerWorker<AtomicUsize>> = std::sync::OnceLock::new();
    ON_NODE.get_or_init(PerWorker::default)
}

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
async fn drive<F: Future>(driver: &mut Driver, work: F) -> Driven<F::Output> {
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

    /// The connection ended while the request still waited for it: hyper had not taken
    /// it (a request hyper took is answered with an error as the connection ends).
    fn ended(ended: Result<(), hyper::Error>) -> Self {
        ExchangeError {
            reason: match ended {
                Ok(()) => "the origin closed the connection".into(),
                Err(error) => atoll_isolate::wasi_http::error_chain(&error),
            },
            never_sent: true,
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
        match drive(driver, sender.ready()).await {
            Driven::Done(Ok(())) => {}
            // A connection that cannot take the request closed before anything was sent.
            Driven::Done(Err(error)) => {
                return Err(ExchangeError {
                    never_sent: true,
                    ..ExchangeError::from_hyper(&error)
                });
            }
            Driven::Ended(ended) => return Err(ExchangeError::ended(ended)),
        }
        match drive(driver, sender.send_request(request)).await {
            Driven::Done(Ok(response)) => Ok(response),
            Driven::Done(Err(error)) => Err(ExchangeError::from_hyper(&error)),
            // Still queued (an EOF seen on the idle connection first): never sent.
            Driven::Ended(ended) => Err(ExchangeError::ended(ended)),
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

/// The idle connections to one origin, a stack per connection worker (and one for the
/// other threads): a connection goes back to the stack of the thread that used it, whose
/// reactor its socket is registered with, so the next request on that thread wakes no
/// other. A thread whose stack is empty connects anew rather than take another worker's
/// (in `atoll-bench origin`, taking them made 0.1 cross-thread wake-ups per request as
/// connections drifted between workers). Workers beyond the number of cores share stacks,
/// and so do threads that are no worker (correct either way: a connection used from
/// another thread than its reactor's only costs a wake-up per read).
///
/// What is counted is counted per worker too, so taking and putting back writes only the
/// calling core's cache lines: a worker within its share of the function's and the node's
/// caps (cap ÷ stacks) looks at no other worker's count; one beyond it (the only one busy,
/// say) adds them all up. A cap can therefore be passed by the other workers' shares (about
/// twice the cap at worst) and by threads that race on one stack; the floor is always
/// kept.
pub struct IdleConnections {
    stacks: PerWorker<Stack>,
    limits: IdleLimits,
    /// Idle connections of the function's origins together (shared by its stacks).
    in_function: Arc<PerWorker<AtomicUsize>>,
}

/// One worker's idle connections to an origin.
#[derive(Default)]
struct Stack {
    // Boxed on purpose: a connection taken moves into a request's future as a pointer.
    #[allow(clippy::vec_box)]
    connections: Mutex<Vec<Box<OriginConnection>>>,
    /// `connections.len()`, read without the lock (by other workers).
    len: AtomicUsize,
}

fn sum(counts: &PerWorker<AtomicUsize>) -> usize {
    counts.iter().map(|count| count.load(Ordering::Relaxed)).sum()
}

/// Whether one more fits under `cap` on the node, counted in `counts`, from `slot`: at
/// once while the slot is within its share, else by the sum of all.
fn fits(counts: &PerWorker<AtomicUsize>, slot: usize, cap: usize) -> bool {
    counts.get(slot).load(Ordering::Relaxed) < cap.div_ceil(counts.len()) || sum(counts) < cap
}

impl IdleConnections {
    /// The stacks of one of a function's origins; `in_function` is shared by all of them.
    pub fn new(limits: IdleLimits, in_function: Arc<PerWorker<AtomicUsize>>) -> Self {
        IdleConnections {
            stacks: PerWorker::default(),
            limits,
            in_function,
        }
    }

    /// `count` connections left stack `slot` (its lock held).
    fn forget(&self, slot: usize, count: usize) {
        self.stacks.get(slot).len.fetch_sub(count, Ordering::Relaxed);
        self.in_function.get(slot).fetch_sub(count, Ordering::Relaxed);
        idle_on_node().get(slot).fetch_sub(count, Ordering::Relaxed);
    }

    /// `count` connections joined stack `slot` (its lock held).
    fn count_in(&self, slot: usize, count: usize) {
        self.stacks.get(slot).len.fetch_add(count, Ordering::Relaxed);
        self.in_function.get(slot).fetch_add(count, Ordering::Relaxed);
        idle_on_node().get(slot).fetch_add(count, Ordering::Relaxed);
    }

    /// Connections in the stacks now.
    pub fn len(&self) -> usize {
        self.stacks
            .iter()
            .map(|stack| stack.len.load(Ordering::Relaxed))
            .sum()
    }

    /// Connections in each stack, by index (the calling thread's is
    /// [`PerWorker::local_index`]).
    #[cfg(test)]
    fn stack_lens(&self) -> Vec<usize> {
        self.stacks
            .iter()
            .map(|stack| lock(&stack.connections).len())
            .collect()
    }

    /// Whether no connection waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most recently used connection on the calling thread's stack that is still open.
    pub fn take(&self) -> Option<Box<OriginConnection>> {
        let slot = self.stacks.local_index();
        let stack = self.stacks.get(slot);
        while stack.len.load(Ordering::Relaxed) > 0 {
            let mut connections = lock(&stack.connections);
            let Some(mut connection) = connections.pop() else {
                break;
            };
            self.forget(slot, 1);
            drop(connections);
            if connection.is_open() {
                return Some(connection);
            }
        }
        None
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
        let slot = self.stacks.local_index();
        let mut connections = lock(&self.stacks.get(slot).connections);
        if connections.len() >= self.limits.per_origin {
            return;
        }
        let within = fits(&self.in_function, slot, self.limits.per_function)
            && fits(idle_on_node(), slot, self.limits.on_node);
        if within || self.len() < self.limits.floor {
            connections.push(connection);
            self.count_in(slot, 1);
        }
    }

    /// Closes connections idle past [`IDLE_TIMEOUT`] and those the origin closed (polled
    /// and closed outside the lock requests take connections under).
    pub fn sweep(&self) {
        let now = Instant::now();
        for slot in 0..self.stacks.len() {
            let stack = &self.stacks.get(slot).connections;
            let mut taken = {
                let mut connections = lock(stack);
                // Uncounted while out of the stack (a panic while polling them leaves no
                // count behind), counted again as they go back.
                self.forget(slot, connections.len());
                std::mem::take(&mut *connections)
            };
            taken.retain_mut(|connection| {
                now.duration_since(connection.idle_since) < IDLE_TIMEOUT && connection.is_open()
            });
            let mut connections = lock(stack);
            // Those put back meanwhile are the most recently used: they stay on top, and
            // the oldest go if the stack's cap is reached.
            let room = self.limits.per_origin.saturating_sub(connections.len());
            taken.drain(..taken.len().saturating_sub(room));
            self.count_in(slot, taken.len());
            taken.append(&mut connections);
            *connections = taken;
        }
    }
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        for slot in 0..self.stacks.len() {
            let count = lock(&self.stacks.get(slot).connections).len();
            self.forget(slot, count);
        }
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

    /// An origin that keeps every connection open and says nothing; its address.
    async fn silent_origin() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        address
    }

    /// Held by the tests that move [`idle_on_node`], which the cap test counts exactly.
    static NODE_COUNT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn idle_connections_are_capped_per_origin_function_and_node_above_a_floor() {
        let _alone = NODE_COUNT.lock().await;
        let address = silent_origin().await;
        // All on this thread's stack: beyond its share of the function's and the node's
        // caps, it counts every stack's.
        let limits = IdleLimits {
            per_origin: 6,
            per_function: 7,
            on_node: 9,
            floor: 2,
        };
        let (shop, other) = (Arc::new(PerWorker::default()), Arc::new(PerWorker::default()));
        let stack = |function: &Arc<PerWorker<AtomicUsize>>| {
            Arc::new(IdleConnections::new(limits, Arc::clone(function)))
        };
        let (a, b, c) = (stack(&shop), stack(&shop), stack(&other));
        let len = |idle: &IdleConnections| idle.len();
        // A fresh connection can take a request at once: released, it is pushed (or not)
        // before `release` returns.
        for _ in 0..7 {
            a.release(connection(address).await);
        }
        assert_eq!(len(&a), 6, "per origin");
        for _ in 0..4 {
            b.release(connection(address).await);
        }
        assert_eq!(len(&b), 2, "one within the function's cap, one on the floor");
        for _ in 0..4 {
            c.release(connection(address).await);
        }
        assert_eq!(len(&c), 2, "one within the node's cap, one on the floor");
        let counts = || (sum(idle_on_node()), sum(&shop), sum(&other));
        assert_eq!(counts(), (10, 8, 2));
        let taken = a.take().expect("an open connection");
        assert_eq!(counts(), (9, 7, 2));
        drop(taken);
        a.sweep();
        assert_eq!(
            (len(&a), counts()),
            (5, (9, 7, 2)),
            "a sweep keeps what is open and fresh"
        );
        drop(a);
        assert_eq!(counts(), (4, 2, 2));
        drop((b, c));
        assert_eq!(counts(), (0, 0, 0));
    }

    /// Runs `work` on worker `index` and waits for its output.
    async fn on_worker<T: Send + 'static>(
        workers: &atoll_ingress::workers::ConnectionWorkers,
        index: usize,
        work: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        workers.spawn_on(index, async move {
            let _ = sender.send(work.await);
        });
        receiver.await.expect("the worker ran it")
    }

    #[tokio::test]
    async fn a_connection_goes_back_to_its_workers_stack_and_only_that_worker_takes_it() {
        let _alone = NODE_COUNT.lock().await;
        let address = silent_origin().await;
        let workers = atoll_ingress::workers::ConnectionWorkers::start(2, "test-idle").unwrap();
        let idle = Arc::new(IdleConnections::new(
            IdleLimits::default(),
            Arc::new(PerWorker::default()),
        ));
        let stacks = idle.stack_lens().len();
        // Made and released on worker 0: in worker 0's stack (index 1; 0 is for other threads).
        let on_zero = Arc::clone(&idle);
        on_worker(
            &workers,
            0,
            async move { on_zero.release(connection(address).await) },
        )
        .await;
        let mut expected = vec![0; stacks];
        expected[1 % stacks] = 1;
        assert_eq!(idle.stack_lens(), expected);
        // Worker 1's own stack is empty: it leaves worker 0's connection where it is (its
        // socket wakes worker 0's reactor) and would connect anew.
        let on_one = Arc::clone(&idle);
        assert!(on_worker(&workers, 1, async move { on_one.take().is_none() }).await);
        assert_eq!(idle.stack_lens(), expected);
        // Nor does a thread that is no worker.
        assert!(idle.take().is_none());
        let on_zero = Arc::clone(&idle);
        assert!(on_worker(&workers, 0, async move { on_zero.take().is_some() }).await);
        assert_eq!((idle.len(), idle.stack_lens()), (0, vec![0; stacks]));
    }

    #[tokio::test]
    async fn each_worker_keeps_its_own_idle_connections_up_to_the_cap_per_origin() {
        let _alone = NODE_COUNT.lock().await;
        let address = silent_origin().await;
        let workers = atoll_ingress::workers::ConnectionWorkers::start(2, "test-caps").unwrap();
        let limits = IdleLimits {
            per_origin: 2,
            ..IdleLimits::default()
        };
        let idle = Arc::new(IdleConnections::new(limits, Arc::new(PerWorker::default())));
        for worker in 0..2 {
            let idle = Arc::clone(&idle);
            on_worker(&workers, worker, async move {
                for _ in 0..3 {
                    idle.release(connection(address).await);
                }
            })
            .await;
        }
        let lens = idle.stack_lens();
        // Slot 0 is other threads'; worker w's is w + 1, modulo the slots (on a one-core
        // machine, two: worker 1's is then slot 0).
        let mut expected = vec![0; lens.len()];
        for worker in 0..2 {
            expected[(worker + 1) % lens.len()] = 2;
        }
        assert_eq!(lens, expected, "two per worker, the third closed");
        assert_eq!(sum(idle_on_node()), expected.iter().sum::<usize>());
    }
}
