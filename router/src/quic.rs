//! HTTP/3 over QUIC (quinn + h3) on the same routes and functions as TCP.
//!
//! STUB: the real server replaces it.

use std::future::Future;
use std::sync::Arc;

use crate::server::{Handler, ServerLimits};
use crate::tls::Certificates;

/// QUIC-specific settings.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// Handshakes in progress beyond which new clients must validate their address with a
    /// Retry first (0: always).
    pub retry_threshold: usize,
    pub limits: Arc<ServerLimits>,
}

/// Serves `handler` over HTTP/3 on `socket` until `shutdown` resolves.
pub async fn serve_quic<H: Handler>(
    socket: std::net::UdpSocket,
    certificates: Arc<Certificates>,
    handler: Arc<H>,
    settings: QuicSettings,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let _ = (socket, certificates, handler, settings);
    shutdown.await;
    Ok(())
}
