//! The registry's limits on connections, over loopback against a real server: connections
//! that do nothing (silent, half a request head, an idle keep-alive) are closed in bounded
//! time and, at the connection cap, make room for a client that wants an answer; a watch
//! stream is never closed as idle; a new connection when every one is busy gets a 503.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_control::RegistryClient;
use atoll_core::WatchEvent;
use atoll_registry::{ConnectionLimits, Registry, RegistryOptions, serve_with};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const TOKEN: &str = "test-token-0123456789";

struct Server {
    url: String,
    addr: std::net::SocketAddr,
    _data: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

async fn start(limits: ConnectionLimits, options: RegistryOptions) -> Server {
    let data = tempfile::tempdir().unwrap();
    let engine = atoll_isolate::Engine::new().unwrap();
    let registry = Registry::open(
        data.path(),
        std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
        TOKEN.into(),
        options,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_with(listener, Arc::new(registry), limits, async move {
        let _ = stopped.await;
    }));
    Server {
        url: format!("http://{addr}"),
        addr,
        _data: data,
        _stop: stop,
    }
}

/// The kinds of connection that hold a socket without asking for anything.
#[derive(Debug, Clone, Copy)]
enum Loiterer {
    /// Connects and sends nothing.
    Silent,
    /// One byte: not even enough to tell HTTP/1.1 from HTTP/2.
    OneByte,
    /// Half a request head.
    PartialHead,
    /// One complete request answered, then nothing (an idle keep-alive).
    KeepAlive,
}

const LOITERERS: [Loiterer; 4] = [
    Loiterer::Silent,
    Loiterer::OneByte,
    Loiterer::PartialHead,
    Loiterer::KeepAlive,
];

async fn loiter(addr: std::net::SocketAddr, kind: Loiterer) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    match kind {
        Loiterer::Silent => {}
        Loiterer::OneByte => stream.write_all(b"G").await.unwrap(),
        Loiterer::PartialHead => stream
            .write_all(b"GET /v1/functions HTTP/1.1\r\nHost: registry\r\nAuthor")
            .await
            .unwrap(),
        Loiterer::KeepAlive => {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: registry\r\n\r\n")
                .await
                .unwrap();
            // The whole answer: a short head and "ok".
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\nok") {
                let mut buf = [0u8; 512];
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before answering: {answer:?}");
                answer.extend_from_slice(&buf[..n]);
            }
        }
    }
    stream
}

/// Reads until the server closes the connection; what it sent before.
async fn until_closed(mut stream: TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_in_bounded_time() {
    let limits = ConnectionLimits {
        max_connections: 1000,
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    let server = start(limits, RegistryOptions::default()).await;
    let started = Instant::now();
    let mut closing = Vec::new();
    for _ in 0..10 {
        for kind in LOITERERS {
            let stream = loiter(server.addr, kind).await;
            closing.push((kind, tokio::spawn(until_closed(stream))));
        }
    }
    // Each is closed by the header timeout (0.5 s) or the idle timeout (1 s); 10 s is
    // ample on a busy machine, and far below "minutes".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (kind, handle) in closing {
        tokio::time::timeout_at(deadline, handle)
            .await
            .unwrap_or_else(|_| panic!("a {kind:?} connection still open after {:?}", started.elapsed()))
            .unwrap();
    }
}

#[tokio::test]
async fn at_the_cap_idle_connections_make_room_for_an_authenticated_request() {
    // Timeouts long enough that nothing is closed by them during the test: what keeps the
    // registry usable here is the cap's choice of whom to close.
    let limits = ConnectionLimits {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(120),
        idle_timeout: Duration::from_secs(120),
        ..ConnectionLimits::default()
    };
    let server = start(limits, RegistryOptions::default()).await;
    let mut loiterers = Vec::new();
    for _ in 0..10 {
        for kind in LOITERERS {
            // A keep-alive gets its answer even over the cap: the cap closes the
            // longest-idle connection to make room.
            loiterers.push((kind, loiter(server.addr, kind).await));
        }
    }
    let client = RegistryClient::new(&server.url, Some(TOKEN.into())).unwrap();
    let listed = tokio::time::timeout(Duration::from_secs(10), client.list())
        .await
        .expect("an authenticated list answers while 40 idle connections are open")
        .expect("an authenticated list succeeds");
    assert!(listed.is_empty());
    // The older loiterers were closed to make room; at most the cap is left open (polled:
    // a connection told to close may take a moment to do so).
    let mut open: Vec<TcpStream> = loiterers.into_iter().map(|(_, stream)| stream).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut still_open = Vec::new();
        for mut stream in open {
            let mut buf = [0u8; 1];
            // Still open: nothing to read within 5 ms (a closed one reads end of stream).
            if tokio::time::timeout(Duration::from_millis(5), stream.read(&mut buf))
                .await
                .is_err()
            {
                still_open.push(stream);
            }
        }
        open = still_open;
        if open.len() <= 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} idle connections still open over a cap of 8",
            open.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_watch_stream_is_not_closed_as_idle_and_busy_connections_are_not_evicted() {
    let limits = ConnectionLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    };
    let options = RegistryOptions {
        heartbeat: Duration::from_millis(100),
        ..RegistryOptions::default()
    };
    let server = start(limits, options).await;
    let watcher = |()| async {
        let client = RegistryClient::new(&server.url, Some(TOKEN.into())).unwrap();
        let mut events = Box::pin(client.watch(0).await.expect("watch starts"));
        let first = events.next().await.unwrap().unwrap();
        assert!(matches!(first, WatchEvent::Synced { .. }), "{first:?}");
        events
    };
    let mut first = watcher(()).await;
    let mut second = watcher(()).await;

    // Both connections are busy: a third is refused at once, with the reason.
    let refused = until_closed(loiter(server.addr, Loiterer::Silent).await).await;
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert!(
        refused.contains("connection limit (2 open connections"),
        "{refused}"
    );

    // Well past the idle timeout, both streams still deliver heartbeats.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        for events in [&mut first, &mut second] {
            let event = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("a heartbeat within 5 s")
                .expect("the watch stream is still open")
                .expect("a valid event");
            assert!(matches!(event, WatchEvent::Heartbeat { .. }), "{event:?}");
        }
    }

    // When one stream ends, its slot is free again.
    drop(first);
    let client = RegistryClient::new(&server.url, Some(TOKEN.into())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.list().await {
            Ok(_) => break,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("no slot after a watch ended: {error}"),
        }
    }
}
