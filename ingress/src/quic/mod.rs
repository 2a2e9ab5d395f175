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
//!
//! In files: `endpoint.rs` is the endpoint (its quinn and rustls configuration, address
//! validation, the connection cap, handshakes, shutdown), `request.rs` serves a connection's
//! requests through the handler and turns its responses into HTTP/3 ones, and
//! `frame_limit.rs` is the frame length limit with the h3-quinn wrappers that apply it.

use std::sync::Arc;

use crate::server::ServerLimits;

mod endpoint;
mod frame_limit;
mod request;

pub use endpoint::serve_quic;
pub use frame_limit::{
    FrameLimit, FrameTooLarge, GuardedBidi, GuardedConnection, GuardedOpener, GuardedRecv, max_frame_bytes,
};

/// Counter: client addresses asked to validate themselves with a Retry packet.
pub const QUIC_RETRIES_TOTAL: &str = "atoll_quic_retries_total";
/// Counter: QUIC connections whose handshake completed.
pub const QUIC_CONNECTIONS_TOTAL: &str = "atoll_quic_connections_total";

/// Flow-control window per request stream: bounds what one upload buffers before the
/// handler reads it.
pub const STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;
/// Flow-control window per connection, over all its streams.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// QUIC-specific settings.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// Handshakes in progress beyond which new clients must validate their address with a
    /// Retry first (0: always).
    pub retry_threshold: usize,
    pub limits: Arc<ServerLimits>,
}
