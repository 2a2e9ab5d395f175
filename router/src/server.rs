//! Accept loops: a bound listener in, a shutdown future to stop.
//!
//! Following mini-redis, servers take an already-bound `TcpListener` (tests bind port 0) and a
//! shutdown future. Each connection speaks HTTP/1.1 or HTTP/2 (prior knowledge, h2c),
//! detected from its first bytes. On shutdown the loop stops accepting, in-flight requests
//! finish within the grace period, then the function returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// Where a connection came from and arrived at.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        connection: ConnectionInfo,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// How long in-flight requests get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A client must send its request head within this time (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `handler` on `listener` until `shutdown` resolves.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection_info = ConnectionInfo { local, remote };
        let handler = Arc::clone(&handler);
        let service = hyper::service::service_fn(move |request| {
            let handler = Arc::clone(&handler);
            async move { Ok::<_, std::convert::Infallible>(handler.handle(request, connection_info).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%remote, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("grace period over; dropping remaining connections");
        }
    }
    Ok(())
}

/// A small plain-text response.
pub fn text_response(status: http::StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut body: String = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
