//! Connection workers: a thread per core, each with a runtime of its own, that serve the
//! connections the accept loop hands them — nginx's worker processes, in one process.
//!
//! On tokio's work-stealing runtime every wake-up may move a task to another thread, and a
//! worker with more runnable tasks than it can poll wakes a parked sibling to steal them:
//! futex calls, context switches and cold caches on every request of a busy proxy. Here a
//! connection lives on one thread from its first byte to its close: the socket's readiness,
//! the task it wakes, its timers and (in the router) the idle origin connections it reuses
//! are all that thread's, and nothing else is shared on the request path. A connection
//! goes to the worker serving the fewest; a busy worker is not helped by the others (as with
//! nginx's workers), which is why the guest runs elsewhere ([`crate::server::Handler`]
//! implementations never block their thread).
//!
//! [`current_worker`] says which worker the calling thread is, so per-thread state (the
//! router's idle origin connections, counts of requests in flight) can be sharded by it:
//! [`PerWorker`]. Two cores writing one cache line pass it back and forth on every write;
//! at a proxy's request rate a handful of such counters cost as much as its own code.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static CURRENT_WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the connection worker the calling thread is (`None` on any other thread).
pub fn current_worker() -> Option<usize> {
    CURRENT_WORKER.get()
}

/// Threads that serve connections, each on a single-threaded tokio runtime. Dropped, they
/// stop: what they still run is dropped with their runtimes (the listener holds them while
/// it serves, its connections do not). A connection counts as one of its worker's until
/// its task ends; what it starts besides (HTTP/2 streams, an upgraded tunnel) runs there
/// too without being counted.
pub struct ConnectionWorkers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: tokio::runtime::Handle,
    /// Connections this worker serves now.
    connections: Arc<AtomicUsize>,
    /// Dropped to stop the worker.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A connection's place on its worker, given back when the connection's task ends.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionWorkers {
    /// Starts `count` workers (at least one), their threads named `name-0`, `name-1`, ….
    pub fn start(count: usize, name: &str) -> std::io::Result<Arc<Self>> {
        let mut workers = Vec::new();
        for index in 0..count.max(1) {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (sender, built) = std::sync::mpsc::sync_channel(1);
            // The runtime is made, run and dropped on its own thread: a runtime dropped
            // on the caller's (an async context) would panic.
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = sender.send(Err(error));
                            return;
                        }
                    };
                    CURRENT_WORKER.set(Some(index));
                    let _ = sender.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            () = keep_next_wake_near() => {}
                        }
                    });
                })?;
            let handle = built
                .recv()
                .map_err(|_| std::io::Error::other("a connection worker ended while starting"))??;
            workers.push(Worker {
                handle,
                connections: Arc::new(AtomicUsize::new(0)),
                _stop: stop,
            });
        }
        Ok(Arc::new(ConnectionWorkers { workers }))
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there are none (never: `start` makes one at least).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs `connection` (the whole life of one connection) on the worker serving the
    /// fewest connections now.
    pub fn spawn<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let index = (0..self.workers.len())
            .min_by_key(|&index| self.workers[index].connections.load(Ordering::Relaxed))
            .expect("at least one worker");
        self.spawn_on(index, connection);
    }

    /// Runs `connection` on worker `index` (modulo their number), counted as one of its
    /// connections.
    pub fn spawn_on<F>(&self, index: usize, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let worker = &self.workers[index % self.workers.len()];
        worker.connections.fetch_add(1, Ordering::Relaxed);
        let counted = Counted(Arc::clone(&worker.connections));
        worker.handle.spawn(async move {
            let _counted = counted;
            connection.await;
        });
    }

    /// Connections each worker serves now, by index.
    pub fn connections(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|worker| worker.connections.load(Ordering::Relaxed))
            .collect()
    }
}

/// A timer that fires every [`WAKE_TICK`], forever, so the worker's timer wheel always
/// holds one due sooner than a request's deadline.
///
/// tokio's time driver notes, when it parks, the earliest timer it holds; registering one
/// due before that (or any, when it held none) writes the runtime's eventfd so the driver
/// parks again with the new one in mind — a syscall and an extra epoll return, needed for
/// a runtime that is asleep in `epoll_wait` but paid by a worker that registers the timer
/// itself while running. A proxied request registers one (its origin budget) and a
/// function call its timeout: whenever a worker had finished all of its requests before
/// it last parked, the next one paid that write (0.2–0.3 writes per request in
/// `atoll-bench origin`). With this tick the earliest timer is never further than
/// [`WAKE_TICK`] away, so deadlines longer than that register without a write; the tick
/// costs four wake-ups a second per worker.
async fn keep_next_wake_near() {
    let mut tick = tokio::time::interval(WAKE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Shorter than the request timeouts people set (seconds), long enough to cost nothing.
const WAKE_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// One `T` per connection worker and one for every other thread, each on cache lines of
/// its own: state the request path writes (counts of requests in flight, idle
/// connections) stays in the cache of the core that writes it. Read together (a sum), the
/// values are as exact as one shared counter's. Workers beyond the number of cores share
/// slots, so `T` must tolerate several threads (an atomic does).
pub struct PerWorker<T> {
    slots: Box<[crossbeam_utils::CachePadded<T>]>,
}

/// How many slots a [`PerWorker`] has: one per core, the default number of workers, and one
/// for every other thread.
fn slot_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| 1 + std::thread::available_parallelism().map_or(1, |cores| cores.get()))
}

impl<T> PerWorker<T> {
    pub fn new(mut make: impl FnMut() -> T) -> Self {
        PerWorker {
            slots: (0..slot_count())
                .map(|_| crossbeam_utils::CachePadded::new(make()))
                .collect(),
        }
    }

    /// The calling thread's slot index: its worker's, or 0 on any other thread.
    pub fn local_index(&self) -> usize {
        current_worker().map_or(0, |worker| worker + 1) % self.slots.len()
    }

    /// The calling thread's slot.
    pub fn local(&self) -> &T {
        &self.slots[self.local_index()]
    }

    /// Slot `index`'s value.
    pub fn get(&self, index: usize) -> &T {
        &self.slots[index]
    }

    /// Every slot, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|slot| &**slot)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

impl<T: Default> Default for PerWorker<T> {
    fn default() -> Self {
        PerWorker::new(T::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `work` on `workers` and waits for what it sends back.
    async fn on_workers<T: Send + 'static>(
        workers: &ConnectionWorkers,
        work: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        workers.spawn(async move {
            let _ = sender.send(work.await);
        });
        receiver.await.expect("the worker ran it")
    }

    #[tokio::test]
    async fn per_worker_state_is_written_in_the_calling_workers_slot_and_read_whole() {
        use std::sync::atomic::AtomicI64;
        let counts: Arc<PerWorker<AtomicI64>> = Arc::new(PerWorker::default());
        // Slot 0 for threads that are no worker, then one per worker (while there are
        // enough: they share beyond the number of cores).
        assert_eq!(counts.local_index(), 0);
        counts.local().fetch_add(5, Ordering::Relaxed);
        let workers = ConnectionWorkers::start(2, "test-slots").unwrap();
        for worker in 0..2 {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            let on_worker = Arc::clone(&counts);
            workers.spawn_on(worker, async move {
                on_worker
                    .local()
                    .fetch_add(1 << (4 * (worker + 1)), Ordering::Relaxed);
                let _ = sender.send(on_worker.local_index());
            });
            let index = receiver.await.unwrap();
            assert_eq!(index, (worker + 1) % counts.len());
        }
        let mut expected = vec![0i64; counts.len()];
        expected[0] += 5;
        for worker in 0..2 {
            expected[(worker + 1) % counts.len()] += 1 << (4 * (worker + 1));
        }
        let slots: Vec<i64> = counts.iter().map(|count| count.load(Ordering::Relaxed)).collect();
        assert_eq!(slots, expected);
        assert_eq!(slots.iter().sum::<i64>(), 5 + 16 + 256);
    }

    #[tokio::test]
    async fn connections_go_to_the_least_busy_worker_and_run_on_its_own_thread() {
        let workers = ConnectionWorkers::start(2, "test-edge").unwrap();
        assert_eq!(current_worker(), None, "the test's thread is no worker");
        // Two long connections: one on each worker.
        let (release, released) = tokio::sync::watch::channel(false);
        let mut placed = Vec::new();
        for _ in 0..2 {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            let mut released = released.clone();
            workers.spawn(async move {
                let thread = std::thread::current().name().map(str::to_string);
                let _ = sender.send((current_worker(), thread));
                let _ = released.wait_for(|released| *released).await;
            });
            placed.push(receiver.await.unwrap());
        }
        placed.sort();
        assert_eq!(
            placed,
            vec![
                (Some(0), Some("test-edge-0".to_string())),
                (Some(1), Some("test-edge-1".to_string()))
            ]
        );
        assert_eq!(workers.connections(), vec![1, 1]);
        release.send_replace(true);
        while workers.connections() != vec![0, 0] {
            tokio::task::yield_now().await;
        }
        // All free: the first takes it. With it held, the others take what comes.
        let (hold, held) = tokio::sync::oneshot::channel::<Option<usize>>();
        workers.spawn(async move {
            let _ = hold.send(current_worker());
            std::future::pending::<()>().await;
        });
        assert_eq!(held.await.unwrap(), Some(0));
        for _ in 0..3 {
            assert_eq!(on_workers(&workers, async { current_worker() }).await, Some(1));
            while workers.connections() != vec![1, 0] {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Sends on its channel when dropped.
    struct SignalOnDrop(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for SignalOnDrop {
        fn drop(&mut self) {
            let _ = self.0.take().map(|sender| sender.send(()));
        }
    }

    thread_local! {
        /// Dropped when its thread exits.
        static AT_EXIT: std::cell::RefCell<Option<SignalOnDrop>> = const { std::cell::RefCell::new(None) };
    }

    #[tokio::test]
    async fn dropped_workers_stop_their_threads_and_what_runs_there() {
        let workers = ConnectionWorkers::start(1, "test-stop").unwrap();
        let (_never, never) = tokio::sync::oneshot::channel::<()>();
        let (started, has_started) = tokio::sync::oneshot::channel::<()>();
        let (task_dropped, on_task_drop) = tokio::sync::oneshot::channel::<()>();
        let (thread_ended, on_thread_end) = tokio::sync::oneshot::channel::<()>();
        workers.spawn(async move {
            let _task = SignalOnDrop(Some(task_dropped));
            AT_EXIT.with(|slot| *slot.borrow_mut() = Some(SignalOnDrop(Some(thread_ended))));
            let _ = started.send(());
            let _ = never.await;
        });
        has_started.await.unwrap();
        drop(workers);
        let within = std::time::Duration::from_secs(10);
        tokio::time::timeout(within, on_task_drop)
            .await
            .expect("the worker's runtime dropped the connection")
            .unwrap();
        tokio::time::timeout(within, on_thread_end)
            .await
            .expect("the worker's thread ended")
            .unwrap();
    }
}

#[cfg(test)]
mod served {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use hyper::body::Body;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::server::{self, BoxError, ConnectionInfo, Handler, Ingress};
    use crate::test_body::TestBody;

    /// Answers with the worker it ran on; `/slow` waits for the test's word first.
    struct WhichWorker {
        /// Told when `/slow` has begun; what it then waits for.
        slow: Mutex<
            Option<(
                tokio::sync::oneshot::Sender<()>,
                tokio::sync::oneshot::Receiver<()>,
            )>,
        >,
    }

    impl Handler for WhichWorker {
        type Body = TestBody;

        async fn handle<B>(&self, request: Request<B>, _connection: ConnectionInfo) -> Response<TestBody>
        where
            B: Body<Data = Bytes> + Send + 'static,
            B::Error: Into<BoxError>,
        {
            if request.uri().path() == "/slow" {
                let slow = self.slow.lock().unwrap().take();
                if let Some((begun, go)) = slow {
                    let _ = begun.send(());
                    let _ = go.await;
                }
            }
            server::text_response(StatusCode::OK, format!("{:?}", current_worker()))
        }
    }

    /// The body of the answer to a GET, read by its `content-length`.
    async fn get(stream: &mut tokio::net::TcpStream, path: &str) -> String {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&answer).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .expect("a content-length")
                    .parse()
                    .unwrap();
                if body.len() >= length {
                    return body.trim().to_string();
                }
            }
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(read > 0, "closed early: {text}");
            answer.extend_from_slice(&buffer[..read]);
        }
    }

    #[tokio::test]
    async fn a_listener_with_workers_serves_each_connection_on_one_and_drains_them_at_shutdown() {
        let workers = ConnectionWorkers::start(2, "test-serve").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let (go, wait) = tokio::sync::oneshot::channel();
        let (begun, has_begun) = tokio::sync::oneshot::channel();
        let handler = Arc::new(WhichWorker {
            slow: Mutex::new(Some((begun, wait))),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ingress = Ingress {
            workers: Some(Arc::clone(&workers)),
            ..Ingress::default()
        };
        let server = tokio::spawn(server::serve_with(listener, handler, ingress, async {
            let _ = stopped.await;
        }));
        let (mut first, mut second) = (
            tokio::net::TcpStream::connect(address).await.unwrap(),
            tokio::net::TcpStream::connect(address).await.unwrap(),
        );
        let mut seen = vec![get(&mut first, "/").await, get(&mut second, "/").await];
        // Each connection stays on its worker.
        for _ in 0..3 {
            assert_eq!(get(&mut first, "/").await, seen[0]);
            assert_eq!(get(&mut second, "/").await, seen[1]);
        }
        seen.sort();
        assert_eq!(seen, vec!["Some(0)", "Some(1)"]);
        // A request in flight at shutdown is answered before the listener's task ends.
        first
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        has_begun.await.unwrap();
        drop(stop);
        let mut server = server;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), &mut server)
                .await
                .is_err(),
            "the listener waits for the request in flight"
        );
        go.send(()).unwrap();
        let mut answer = Vec::new();
        first.read_to_end(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the listener ended after draining")
            .unwrap()
            .unwrap();
    }
}
