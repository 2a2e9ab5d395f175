//! The floor of a reverse proxy on hyper and tokio, for `atoll-bench origin`: one origin
//! connection per client connection, driven by the client connection's own task (as Atoll's
//! origin connections are), and nothing else — no routing, limits, forwarding headers,
//! retries or metrics. Beside nginx and Atoll it shows what the stack itself costs a
//! proxied request and what Atoll adds to it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Upstream = (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Full<Bytes>>,
);

/// Starts the proxy on the current runtime; its address.
pub async fn start(origin: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Err(error) = serve(client, origin).await {
                    eprintln!("bare proxy: {error}");
                }
            });
        }
    });
    Ok(address)
}

async fn serve(client: TcpStream, origin: SocketAddr) -> Result<(), BoxError> {
    client.set_nodelay(true)?;
    let upstream = TcpStream::connect(origin).await?;
    upstream.set_nodelay(true)?;
    let upstream: Upstream = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    // HTTP/1.1 answers one request at a time: each takes the connection and puts it back.
    let upstream = Arc::new(Mutex::new(Some(upstream)));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let upstream = Arc::clone(&upstream);
        async move {
            let response = forward(&upstream, request)
                .await
                .unwrap_or_else(|_| status(StatusCode::BAD_GATEWAY));
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}

/// Sends `request` on the client connection's origin connection and reads the answer.
async fn forward(
    upstream: &Mutex<Option<Upstream>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let taken = upstream.lock().expect("upstream").take();
    let (mut sender, mut connection) = taken.ok_or("no origin connection")?;
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let request = Request::from_parts(parts, Full::new(body));
    drive(&mut connection, sender.ready()).await??;
    let response = drive(&mut connection, sender.send_request(request)).await??;
    let (parts, body) = response.into_parts();
    let body = drive(&mut connection, body.collect()).await??.to_bytes();
    *upstream.lock().expect("upstream") = Some((sender, connection));
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// Polls `work` and the origin connection together until `work` is done.
async fn drive<F: Future>(
    connection: &mut hyper::client::conn::http1::Connection<TokioIo<TcpStream>, Full<Bytes>>,
    work: F,
) -> std::io::Result<F::Output> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|context| {
        if let Poll::Ready(output) = work.as_mut().poll(context) {
            return Poll::Ready(Ok(output));
        }
        match Pin::new(&mut *connection).poll(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Err(std::io::Error::other("the origin connection ended"))),
        }
    })
    .await
}

fn status(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}
