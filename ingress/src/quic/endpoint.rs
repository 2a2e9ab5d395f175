//! The HTTP/3 endpoint: binds quinn to the socket with the hardened rustls configuration and
//! the edge's limits, validates addresses (Retry), caps connections, bounds handshakes, and
//! on shutdown stops accepting, lets every connection drain and closes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{
    CONNECTION_RECEIVE_WINDOW, QUIC_CONNECTIONS_TOTAL, QUIC_RETRIES_TOTAL, QuicSettings,
    STREAM_RECEIVE_WINDOW,
};
use crate::server::{Handler, ServerLimits};
use crate::tls::{Certificates, QUIC_ALPN};

/// Unidirectional streams a client may open: h3's control stream and the two QPACK
/// streams, plus room for the reserved (grease) streams clients send.
const MAX_UNI_STREAMS: u32 = 8;
/// The longest the endpoint waits, after closing, for its peers to learn of the close.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// HTTP/3 `H3_NO_ERROR`: the application close code of a graceful close.
const H3_NO_ERROR: u32 = 0x100;

/// What every connection of one endpoint shares.
pub(super) struct Shared<H> {
    pub(super) handler: Arc<H>,
    pub(super) certificates: Arc<Certificates>,
    pub(super) limits: Arc<ServerLimits>,
    /// The address the socket is bound to (maybe a wildcard; connections refine the IP).
    pub(super) local: SocketAddr,
    /// Flips to `true` once: stop taking requests and drain.
    pub(super) stop: watch::Receiver<bool>,
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
pub(super) async fn stopping(stop: &mut watch::Receiver<bool>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
