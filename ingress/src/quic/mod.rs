//! HTTP/3 over QUIC (quinn + h3) on the same routes and functions as TCP.
//!
//! Browsers learn of HTTP/3 from the `Alt-Svc` header the TLS listener adds, then open a QUIC
//! connection to the same port over UDP. This module serves those connections with the very
//! handler the TCP listeners use: the request body is streamed to it (the service enforces
//! its body limit and answers 413) and the same 421 check applies, the one function the TLS
//! listeners call ([`crate::server::misdirected`]: the `:authority` must be covered by the
//! certificate the connection's SNI selected).
//!
//! ```text
//! UdpSocket ─ quinn Endpoint ─ Incoming ─┬─ retry (address not validated, too many handshakes)
//!                                        ├─ refuse (max_connections open)
//!                                        └─ accept ─ handshake (timeout) ─ h3 Connection
//!                                              └─ one task per request stream ─ Handler
//! ```
//!
//! What protects the node, and where:
//!
//! - **Amplification**: before a client's address is validated quinn never sends more than
//!   three times the bytes it received (RFC 9000 §8). Beyond `retry_threshold` handshakes in
//!   progress, a client whose address is not validated gets a Retry and must echo its token
//!   (one round trip) before the server keeps any state for it, so spoofed Initials cost one
//!   small packet each. Retries are counted in [`QUIC_RETRIES_TOTAL`].
//! - **Stateless reset**: quinn's default — a per-endpoint random key, resets always smaller
//!   than the packet that triggered them (no amplification, no reset loops) and rate limited.
//! - **0-RTT replay**: off. The rustls configuration has `max_early_data_size = 0`, so no
//!   request ever runs from replayable early data.
//! - **Stream floods and rapid reset**: at most `max_concurrent_streams` request streams per
//!   connection (QUIC flow control on stream ids). A stream's credit is only returned to the
//!   client once *both* directions are closed, and the server's direction stays open until
//!   the response is sent, so a client that opens and resets streams still has at most
//!   `max_concurrent_streams` requests in the handler per connection: resets free nothing
//!   early. Unidirectional streams are capped at a handful (h3 needs three).
//! - **QPACK bombs**: h3 decodes QPACK statelessly — it advertises no dynamic table, so a
//!   small header block cannot reference (and multiply) earlier large entries; the decoded
//!   header section is capped at `max_header_bytes` (431 beyond). h3 0.0.8 buffers every
//!   frame but DATA whole before it looks at it (a HEADERS frame before the 431 check, an
//!   unknown frame before skipping it), whatever length it declares, so the streams it reads
//!   go through [`FrameLimit`]: a frame other than DATA declaring more than
//!   [`max_frame_bytes`] stops the stream with `H3_EXCESSIVE_LOAD` before it is buffered.
//! - **Memory per connection**: receive windows of [`STREAM_RECEIVE_WINDOW`] per stream and
//!   [`CONNECTION_RECEIVE_WINDOW`] per connection, and at most `max_connections` connections.
//! - **Idle and slow clients**: `idle_timeout` is QUIC's idle timeout (no packet in either
//!   direction); a handshake must finish within `tls_handshake_timeout` and a request head
//!   arrive within `header_read_timeout`.
//!
//! Shutdown: the endpoint stops accepting, every connection sends GOAWAY (h3 `shutdown`),
//! requests already accepted finish within `shutdown_grace`, then the endpoint closes and
//! waits (bounded) for the close to reach the peers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use h3::quic::{self as h3_quic, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::server::{ConnectionInfo, Handler, HandlerBody, ServerLimits, Transport, misdirected};
use crate::tls::{Certificates, QUIC_ALPN};

/// Counter: client addresses asked to validate themselves with a Retry packet.
pub const QUIC_RETRIES_TOTAL: &str = "atoll_quic_retries_total";
/// Counter: QUIC connections whose handshake completed.
pub const QUIC_CONNECTIONS_TOTAL: &str = "atoll_quic_connections_total";

/// Flow-control window per request stream: bounds what one upload buffers before the
/// handler reads it.
pub const STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;
/// Flow-control window per connection, over all its streams.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Unidirectional streams a client may open: h3's control stream and the two QPACK
/// streams, plus room for the reserved (grease) streams clients send.
const MAX_UNI_STREAMS: u32 = 8;
/// The longest the endpoint waits, after closing, for its peers to learn of the close.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// HTTP/3 `H3_NO_ERROR`: the application close code of a graceful close.
const H3_NO_ERROR: u32 = 0x100;

/// QUIC-specific settings.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// Handshakes in progress beyond which new clients must validate their address with a
    /// Retry first (0: always).
    pub retry_threshold: usize,
    pub limits: Arc<ServerLimits>,
}

/// What every connection of one endpoint shares.
struct Shared<H> {
    handler: Arc<H>,
    certificates: Arc<Certificates>,
    limits: Arc<ServerLimits>,
    /// The address the socket is bound to (maybe a wildcard; connections refine the IP).
    local: SocketAddr,
    /// Flips to `true` once: stop taking requests and drain.
    stop: watch::Receiver<bool>,
}

/// Serves `handler` over HTTP/3 on `socket` until `shutdown` resolves.
pub async fn serve_quic<H: Handler>(
    socket: std::net::UdpSocket,
    certificates: Arc<Certificates>,
    handler: Arc<H>,
    settings: QuicSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let local = socket.local_addr()?;
    let limits = Arc::clone(&settings.limits);
    let server_config = server_config(Arc::clone(&certificates), &limits)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let retries = metrics::counter!(QUIC_RETRIES_TOTAL);
    let accepted = metrics::counter!(QUIC_CONNECTIONS_TOTAL);
    let (stop_sender, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        handler,
        certificates,
        limits: Arc::clone(&limits),
        local,
        stop,
    });
    let handshakes = Arc::new(AtomicUsize::new(0));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        if !incoming.remote_address_validated()
            && handshakes.load(Ordering::Relaxed) >= settings.retry_threshold
        {
            match incoming.retry() {
                Ok(()) => retries.increment(1),
                Err(error) => error.into_incoming().ignore(),
            }
            continue;
        }
        if connections.len() >= limits.max_connections {
            tracing::debug!(remote = %incoming.remote_address(), "QUIC connection refused: at max_connections");
            incoming.refuse();
            continue;
        }
        let remote = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(error) => {
                tracing::debug!(%remote, %error, "QUIC connection not accepted");
                continue;
            }
        };
        let handshake = Handshake::begin(&handshakes);
        let shared = Arc::clone(&shared);
        let accepted = accepted.clone();
        connections.spawn(async move {
            if let Some(connection) = shared.handshake(connecting, handshake).await {
                accepted.increment(1);
                shared.serve_connection(connection).await;
            }
        });
    }

    // No new connections from here on; the open ones send GOAWAY and drain.
    endpoint.set_server_config(None);
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "HTTP/3 grace period over; dropping remaining connections"
        );
        connections.shutdown().await;
    }
    endpoint.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"shutting down");
    let _ = tokio::time::timeout(CLOSE_WAIT.min(limits.shutdown_grace), endpoint.wait_idle()).await;
    Ok(())
}

/// The endpoint's configuration: the hardened rustls setup for ALPN `h3` and the limits.
fn server_config(certificates: Arc<Certificates>, limits: &ServerLimits) -> io::Result<quinn::ServerConfig> {
    let tls = crate::tls::server_config(certificates, &[QUIC_ALPN]).map_err(io::Error::other)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(limits)?));
    Ok(config)
}

fn transport_config(limits: &ServerLimits) -> io::Result<quinn::TransportConfig> {
    let idle_timeout = quinn::IdleTimeout::try_from(limits.idle_timeout).map_err(io::Error::other)?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.max_concurrent_streams.into())
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        .max_idle_timeout(Some(idle_timeout))
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .keep_alive_interval(None);
    Ok(transport)
}

/// Resolves once shutdown has been requested (or the endpoint is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// One handshake in progress, counted until it ends (or its task is dropped).
struct Handshake(Arc<AtomicUsize>);

impl Handshake {
    fn begin(counter: &Arc<AtomicUsize>) -> Handshake {
        counter.fetch_add(1, Ordering::Relaxed);
        Handshake(Arc::clone(counter))
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<H: Handler> Shared<H> {
    /// Finishes the handshake within the limit, unless shutdown comes first.
    async fn handshake(
        &self,
        connecting: quinn::Connecting,
        handshake: Handshake,
    ) -> Option<quinn::Connection> {
        let remote = connecting.remote_address();
        let mut stop = self.stop.clone();
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.limits.tls_handshake_timeout, connecting) => outcome,
            () = stopping(&mut stop) => return None,
        };
        drop(handshake);
        match outcome {
            Ok(Ok(connection)) => Some(connection),
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "QUIC handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%remote, "QUIC handshake timed out");
                None
            }
        }
    }

    /// Serves the requests of one connection until the client closes it or shutdown drains it.
    async fn serve_connection(self: Arc<Self>, connection: quinn::Connection) {
        let remote = connection.remote_address();
        let server_name: Option<Arc<str>> = connection
            .handshake_data()
            .and_then(|data| data.downcast::<HandshakeData>().ok())
            .and_then(|data| data.server_name)
            .map(Arc::from);
        let info = ConnectionInfo {
            local: SocketAddr::new(
                connection.local_ip().unwrap_or(self.local.ip()),
                self.local.port(),
            ),
            remote,
            transport: Transport::Quic { server_name },
        };
        let built = h3::server::builder()
            .max_field_section_size(self.limits.max_header_bytes as u64)
            .build::<_, Bytes>(GuardedConnection::new(
                h3_quinn::Connection::new(connection.clone()),
                max_frame_bytes(&self.limits),
            ))
            .await;
        let mut h3 = match built {
            Ok(h3) => h3,
            Err(error) => {
                tracing::debug!(%remote, %error, "HTTP/3 connection setup failed");
                return;
            }
        };
        let mut requests = JoinSet::new();
        let mut stop = self.stop.clone();
        let mut draining = *stop.borrow();
        let mut accepting = true;
        if draining {
            let _ = h3.shutdown(0).await;
        }
        loop {
            if draining && requests.is_empty() {
                break;
            }
            tokio::select! {
                accepted = h3.accept(), if accepting => match accepted {
                    Ok(Some(resolver)) => {
                        let this = Arc::clone(&self);
                        let info = info.clone();
                        requests.spawn(async move { this.serve_request(resolver, info).await });
                    }
                    // The client sent GOAWAY and its requests are done.
                    Ok(None) => break,
                    Err(error) => {
                        if !error.is_h3_no_error() {
                            tracing::debug!(%remote, %error, "HTTP/3 connection ended");
                        }
                        // The connection is gone: what still runs cannot answer anyway.
                        return;
                    }
                },
                () = stopping(&mut stop), if !draining => {
                    draining = true;
                    if let Err(error) = h3.shutdown(0).await {
                        tracing::debug!(%remote, %error, "HTTP/3 GOAWAY failed");
                        accepting = false;
                    }
                }
                Some(_) = requests.join_next(), if !requests.is_empty() => {}
            }
        }
        while requests.join_next().await.is_some() {}
        // Closing discards unacknowledged stream data: give the last responses a few round
        // trips to be acknowledged, unless the client closes first.
        let linger = connection.rtt() * 3 + Duration::from_millis(50);
        tokio::select! {
            _ = connection.closed() => {}
            () = tokio::time::sleep(linger) => {}
        }
        drop(h3);
    }

    /// Reads one request head, runs the handler and sends its response.
    async fn serve_request(
        &self,
        resolver: h3::server::RequestResolver<GuardedConnection, Bytes>,
        info: ConnectionInfo,
    ) {
        let remote = info.remote;
        let resolved =
            tokio::time::timeout(self.limits.header_read_timeout, resolver.resolve_request()).await;
        let (request, stream) = match resolved {
            Ok(Ok(resolved)) => resolved,
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "HTTP/3 request head refused");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "HTTP/3 request head timed out");
                return;
            }
        };
        let (mut sender, receiver) = stream.split();
        let head_only = request.method() == Method::HEAD;
        let request = request.map(|()| RequestBody { stream: receiver });
        let response = match misdirected(&self.certificates, &request, &info) {
            Some(response) => response,
            None => Arc::clone(&self.handler).handle(request, info).await,
        };
        let (head, body) = into_h3_parts(response, head_only);
        // Pinned where it is: the handler's body is streamed without being boxed.
        let mut body = std::pin::pin!(body);
        let sent = async {
            sender.send_response(head).await?;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            sender.send_data(data).await?;
                        }
                    }
                    Err(error) => {
                        // A body that broke off must not look complete: reset the stream.
                        tracing::debug!(%remote, %error, "HTTP/3 response body aborted");
                        sender.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                        return Ok(());
                    }
                }
            }
            sender.finish().await
        }
        .await;
        if let Err(error) = sent {
            tracing::debug!(%remote, %error, "HTTP/3 response not sent");
        }
    }
}

/// Header fields that are specific to an HTTP/1.1 connection and malformed in HTTP/3
/// (RFC 9114 §4.2).
const CONNECTION_SPECIFIC_HEADERS: [http::header::HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
];

/// The response head for h3 (no connection-specific fields; `content-length` when the
/// body's length is known and `date`, as hyper adds them over TCP) and its body (empty for
/// HEAD and bodiless statuses).
fn into_h3_parts<T: HandlerBody>(response: Response<T>, head_only: bool) -> (Response<()>, T) {
    let (mut parts, body) = response.into_parts();
    for name in &CONNECTION_SPECIFIC_HEADERS {
        parts.headers.remove(name);
    }
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if !parts.headers.contains_key(http::header::DATE) {
        parts
            .headers
            .insert(http::header::DATE, http_date(SystemTime::now()));
    }
    if !bodiless
        && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
        && let Some(length) = body.size_hint().exact()
    {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    let body = if head_only || bodiless { T::empty() } else { body };
    (Response::from_parts(parts, ()), body)
}

/// `time` as an HTTP date (IMF-fixdate, RFC 9110 §5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(time: SystemTime) -> HeaderValue {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    let text = format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );
    HeaderValue::from_str(&text).expect("an HTTP date is a valid header value")
}

// ---------------------------------------------------------------------------------------
// Frame length limit
//
// h3 0.0.8 reads a frame other than DATA into memory until it is complete, whatever length
// its header declares. The wrappers below sit between h3 and h3-quinn, watch the frame
// headers going by on every framed stream the client opens (requests and the control stream)
// and refuse a frame that declares more than the limit, before its payload arrives.

/// The longest frame other than DATA a client may send: room for a header section twice
/// the `max_header_bytes` limit (so a section a little over it still gets h3's 431), and
/// never under 64 KiB.
pub fn max_frame_bytes(limits: &ServerLimits) -> u64 {
    (2 * limits.max_header_bytes as u64).max(64 * 1024)
}

/// HTTP/3 frame type of DATA (RFC 9114 §7.2.1), the one frame h3 streams.
const DATA_FRAME: u64 = 0x0;
/// Unidirectional stream type of the control stream (RFC 9114 §6.2.1).
const CONTROL_STREAM: u64 = 0x0;

/// A frame refused by [`FrameLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/3 frame of type {frame_type:#x} declares {length} bytes, over the {max} byte limit")]
pub struct FrameTooLarge {
    pub frame_type: u64,
    pub length: u64,
    pub max: u64,
}

/// Where a [`FrameLimit`] is in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FramePosition {
    /// A unidirectional stream's first bytes: its type (only the control stream is framed).
    StreamType { head: [u8; 8], filled: usize },
    /// A frame's type and length varints.
    FrameHead { head: [u8; 16], filled: usize },
    /// Inside a frame's payload.
    Payload { remaining: u64 },
    /// Not framed (QPACK and unknown unidirectional streams): nothing to watch.
    Unframed,
    /// A frame was refused; the stream is done.
    Refused(FrameTooLarge),
}

/// Sans-IO watcher of the HTTP/3 frame headers on one receive stream: fed the bytes as they
/// arrive, it refuses a frame other than DATA whose declared length is over the limit.
#[derive(Debug, Clone)]
pub struct FrameLimit {
    max: u64,
    position: FramePosition,
}

impl FrameLimit {
    /// For a request stream: frames from the first byte.
    pub fn request_stream(max: u64) -> FrameLimit {
        FrameLimit {
            max,
            position: FramePosition::FrameHead {
                head: [0; 16],
                filled: 0,
            },
        }
    }

    /// For a unidirectional stream: a stream type, then frames if it is the control stream.
    pub fn unidirectional_stream(max: u64) -> FrameLimit {
        FrameLimit {
            max,
            position: FramePosition::StreamType {
                head: [0; 8],
                filled: 0,
            },
        }
    }

    /// Follows `bytes`, the stream's next bytes.
    pub fn observe(&mut self, mut bytes: &[u8]) -> Result<(), FrameTooLarge> {
        while let Some((&byte, rest)) = bytes.split_first() {
            match &mut self.position {
                FramePosition::Unframed => return Ok(()),
                FramePosition::Refused(refused) => return Err(*refused),
                FramePosition::Payload { remaining } => {
                    let skipped = (*remaining).min(bytes.len() as u64);
                    *remaining -= skipped;
                    bytes = &bytes[skipped as usize..];
                    if *remaining == 0 {
                        self.position = FramePosition::FrameHead {
                            head: [0; 16],
                            filled: 0,
                        };
                    }
                    continue;
                }
                FramePosition::StreamType { head, filled } => {
                    head[*filled] = byte;
                    *filled += 1;
                    if let Some((stream_type, _)) = varint(&head[..*filled]) {
                        self.position = if stream_type == CONTROL_STREAM {
                            FramePosition::FrameHead {
                                head: [0; 16],
                                filled: 0,
                            }
                        } else {
                            FramePosition::Unframed
                        };
                    }
                }
                FramePosition::FrameHead { head, filled } => {
                    head[*filled] = byte;
                    *filled += 1;
                    let parsed = varint(&head[..*filled])
                        .and_then(|(frame_type, used)| Some((frame_type, varint(&head[used..*filled])?.0)));
                    if let Some((frame_type, length)) = parsed {
                        self.position = if frame_type != DATA_FRAME && length > self.max {
                            FramePosition::Refused(FrameTooLarge {
                                frame_type,
                                length,
                                max: self.max,
                            })
                        } else if length == 0 {
                            FramePosition::FrameHead {
                                head: [0; 16],
                                filled: 0,
                            }
                        } else {
                            FramePosition::Payload { remaining: length }
                        };
                        if let FramePosition::Refused(refused) = self.position {
                            return Err(refused);
                        }
                    }
                }
            }
            bytes = rest;
        }
        Ok(())
    }
}

/// A QUIC variable-length integer at the start of `bytes` and its encoded length, if complete
/// (RFC 9000 §16).
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let length = 1usize << (first >> 6);
    let encoded = bytes.get(..length)?;
    let value = encoded[1..].iter().fold(u64::from(first & 0x3f), |value, &byte| {
        (value << 8) | u64::from(byte)
    });
    Some((value, length))
}

/// h3-quinn's connection, with every stream the client opens watched by a [`FrameLimit`].
pub struct GuardedConnection {
    inner: h3_quinn::Connection,
    opener: GuardedOpener,
}

impl GuardedConnection {
    fn new(inner: h3_quinn::Connection, max_frame: u64) -> Self {
        let opener = GuardedOpener {
            inner: h3_quic::Connection::<Bytes>::opener(&inner),
            max_frame,
        };
        GuardedConnection { inner, opener }
    }
}

impl h3_quic::Connection<Bytes> for GuardedConnection {
    type RecvStream = GuardedRecv;
    type OpenStreams = GuardedOpener;

    fn poll_accept_recv(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedRecv, ConnectionErrorIncoming>> {
        let accepted = h3_quic::Connection::<Bytes>::poll_accept_recv(&mut self.inner, context);
        accepted.map_ok(|stream| GuardedRecv {
            inner: stream,
            limit: FrameLimit::unidirectional_stream(self.opener.max_frame),
        })
    }

    fn poll_accept_bidi(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, ConnectionErrorIncoming>> {
        let accepted = h3_quic::Connection::<Bytes>::poll_accept_bidi(&mut self.inner, context);
        accepted.map_ok(|stream| GuardedBidi::new(stream, self.opener.max_frame))
    }

    fn opener(&self) -> GuardedOpener {
        self.opener.clone()
    }
}

impl h3_quic::OpenStreams<Bytes> for GuardedConnection {
    type BidiStream = GuardedBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, StreamErrorIncoming>> {
        self.opener.poll_open_bidi(context)
    }

    fn poll_open_send(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<h3_quinn::SendStream<Bytes>, StreamErrorIncoming>> {
        self.opener.poll_open_send(context)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.opener.close(code, reason);
    }
}

/// Opens streams on a [`GuardedConnection`].
#[derive(Clone)]
pub struct GuardedOpener {
    inner: h3_quinn::OpenStreams,
    max_frame: u64,
}

impl h3_quic::OpenStreams<Bytes> for GuardedOpener {
    type BidiStream = GuardedBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, StreamErrorIncoming>> {
        let opened = h3_quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.inner, context);
        opened.map_ok(|stream| GuardedBidi::new(stream, self.max_frame))
    }

    fn poll_open_send(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<h3_quinn::SendStream<Bytes>, StreamErrorIncoming>> {
        h3_quic::OpenStreams::<Bytes>::poll_open_send(&mut self.inner, context)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        h3_quic::OpenStreams::<Bytes>::close(&mut self.inner, code, reason);
    }
}

/// A request stream whose receive side is watched.
pub struct GuardedBidi {
    send: h3_quinn::SendStream<Bytes>,
    recv: GuardedRecv,
}

impl GuardedBidi {
    fn new(stream: h3_quinn::BidiStream<Bytes>, max_frame: u64) -> Self {
        let (send, recv) = h3_quic::BidiStream::split(stream);
        GuardedBidi {
            send,
            recv: GuardedRecv {
                inner: recv,
                limit: FrameLimit::request_stream(max_frame),
            },
        }
    }
}

impl h3_quic::BidiStream<Bytes> for GuardedBidi {
    type SendStream = h3_quinn::SendStream<Bytes>;
    type RecvStream = GuardedRecv;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

impl h3_quic::RecvStream for GuardedBidi {
    type Buf = Bytes;

    fn poll_data(&mut self, context: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let polled = self.recv.poll_data(context);
        if matches!(self.recv.limit.position, FramePosition::Refused(_)) {
            // Still reading the request head: there will be no response either.
            h3_quic::SendStream::<Bytes>::reset(&mut self.send, EXCESSIVE_LOAD);
        }
        polled
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl h3_quic::SendStream<Bytes> for GuardedBidi {
    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(context)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, context: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(context)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

/// `H3_EXCESSIVE_LOAD`: what a stream that sent a frame over the limit is stopped with.
const EXCESSIVE_LOAD: u64 = 0x107;

/// h3-quinn's receive stream, watched by a [`FrameLimit`].
pub struct GuardedRecv {
    inner: h3_quinn::RecvStream,
    limit: FrameLimit,
}

impl h3_quic::RecvStream for GuardedRecv {
    type Buf = Bytes;

    fn poll_data(&mut self, context: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let FramePosition::Refused(refused) = self.limit.position {
            return Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(refused))));
        }
        let polled = self.inner.poll_data(context);
        if let Poll::Ready(Ok(Some(bytes))) = &polled
            && let Err(refused) = self.limit.observe(bytes)
        {
            tracing::debug!(stream = %self.inner.recv_id(), %refused, "HTTP/3 stream stopped");
            self.inner.stop_sending(EXCESSIVE_LOAD);
            return Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(refused))));
        }
        polled
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

/// A request body streamed from the receive side of an h3 request stream.
struct RequestBody {
    stream: h3::server::RequestStream<GuardedRecv, Bytes>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut().stream.poll_recv_data(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut data))) => {
                let bytes = data.copy_to_bytes(data.remaining());
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::text_response;
    use crate::test_body::TestBody;

    #[tokio::test]
    async fn h3_responses_drop_connection_specific_fields_and_carry_a_length() {
        let mut response: Response<TestBody> = text_response(StatusCode::OK, "hi");
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        let (head, body) = into_h3_parts(response, false);
        assert!(head.headers().get(http::header::CONNECTION).is_none());
        assert_eq!(head.headers()[http::header::CONTENT_LENGTH], "3");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hi\n");

        let (head, body) = into_h3_parts(text_response::<TestBody>(StatusCode::OK, "hi"), true);
        assert_eq!(
            head.headers()[http::header::CONTENT_LENGTH],
            "3",
            "HEAD keeps the length"
        );
        assert!(body.is_end_stream(), "HEAD has no body");

        // A streamed body has no length to announce.
        let (_writer, streamed) = TestBody::streamed();
        let streamed = Response::new(streamed);
        let (head, _) = into_h3_parts(streamed, false);
        assert!(head.headers().get(http::header::CONTENT_LENGTH).is_none());
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        let at = |seconds: u64| http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(4_102_444_799), "Thu, 31 Dec 2099 23:59:59 GMT");
    }

    /// A frame header: type and length as QUIC varints.
    fn frame_head(frame_type: u64, length: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        for value in [frame_type, length] {
            match value {
                0..=0x3f => bytes.push(value as u8),
                0x40..=0x3fff => bytes.extend_from_slice(&(0x4000 | value as u16).to_be_bytes()),
                0x4000..=0x3fff_ffff => bytes.extend_from_slice(&(0x8000_0000 | value as u32).to_be_bytes()),
                _ => bytes.extend_from_slice(&(0xc000_0000_0000_0000 | value).to_be_bytes()),
            }
        }
        bytes
    }

    #[test]
    fn the_frame_limit_lets_requests_through_and_refuses_huge_headers() {
        const HEADERS: u64 = 0x1;
        let max = 1000;
        // HEADERS within the limit, a big DATA frame, an unknown (grease) frame, trailers:
        // fed in every chunking from one byte at a time to all at once.
        let mut stream = frame_head(HEADERS, 900);
        stream.extend(vec![7; 900]);
        stream.extend(frame_head(DATA_FRAME, 1 << 20));
        stream.extend(vec![0; 1 << 20]);
        stream.extend(frame_head(0x21, 3));
        stream.extend([1, 2, 3]);
        stream.extend(frame_head(HEADERS, 0));
        for chunk in [1, 2, 3, 7, 1500, stream.len()] {
            let mut limit = FrameLimit::request_stream(max);
            for piece in stream.chunks(chunk) {
                assert_eq!(limit.observe(piece), Ok(()), "chunks of {chunk}");
            }
        }

        let refused = FrameTooLarge {
            frame_type: HEADERS,
            length: 1 << 40,
            max,
        };
        let mut limit = FrameLimit::request_stream(max);
        let huge = frame_head(HEADERS, 1 << 40);
        assert_eq!(
            limit.observe(&huge[..3]),
            Ok(()),
            "the length is not complete yet"
        );
        assert_eq!(limit.observe(&huge[3..]), Err(refused));
        assert_eq!(limit.observe(&[0; 10]), Err(refused), "stays refused");

        let mut limit = FrameLimit::request_stream(max);
        assert!(
            limit.observe(&frame_head(0x21, max + 1)).is_err(),
            "unknown frames too"
        );
    }

    #[test]
    fn the_frame_limit_watches_the_control_stream_only() {
        let max = 100;
        let mut control = FrameLimit::unidirectional_stream(max);
        let mut bytes = vec![CONTROL_STREAM as u8];
        bytes.extend(frame_head(0x4, 6)); // SETTINGS
        bytes.extend([1, 0, 6, 0x44, 0, 0]);
        assert_eq!(control.observe(&bytes), Ok(()));
        assert!(control.observe(&frame_head(0x21, 101)).is_err());

        // A QPACK encoder stream (type 2) carries instructions, not frames.
        let mut encoder = FrameLimit::unidirectional_stream(max);
        assert_eq!(encoder.observe(&[0x02, 0xff, 0xff, 0xff, 0xff]), Ok(()));
        // A two-byte stream type split across reads.
        let mut grease = FrameLimit::unidirectional_stream(max);
        assert_eq!(grease.observe(&[0x40]), Ok(()));
        assert_eq!(grease.observe(&[0x21, 0x01, 0xff, 0xff]), Ok(()));
    }

    #[test]
    fn the_transport_takes_the_edge_limits() {
        let limits = ServerLimits {
            idle_timeout: Duration::from_secs(7),
            ..ServerLimits::default()
        };
        assert!(transport_config(&limits).is_ok());
        let absurd = ServerLimits {
            idle_timeout: Duration::from_secs(u64::MAX / 1000),
            ..ServerLimits::default()
        };
        assert!(
            transport_config(&absurd).is_err(),
            "an idle timeout QUIC cannot carry is refused"
        );
    }
}
