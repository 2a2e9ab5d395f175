//! atoll-router: the edge node.
//!
//! ```text
//! TCP (h1 / h2c) ─┐
//! TLS (h2 / h1) ──┼▶ server / quic ─▶ EdgeService ─▶ Routing (ArcSwap<RouteTable>) ─▶ LoadedFunction
//! QUIC (h3) ──────┘    ▲ tls::Certificates (SNI: --certs DIR, ACME)
//!                                                          ▲
//! registry watch ─▶ Syncer ─▶ fetch + verify + cache + compile ─┘   (node_cache on disk)
//! admin listener ─▶ /healthz /readyz /metrics
//! ```
//!
//! - [`route_table`]: host/path matching, pure and generic over its target.
//! - [`served`]: the published table of loaded functions.
//! - [`service`]: the request path; [`server`]: TCP and TLS accept loops with the edge's
//!   limits and graceful shutdown; [`h1_guard`]: strict HTTP/1.1 framing; [`quic`]: HTTP/3;
//!   [`executor`]: the threads guest code runs on.
//! - [`tls`]: certificates by SNI; [`acme`]: obtaining and renewing them.
//! - [`sync`] and [`node_cache`]: following the registry and surviving without it.
//! - [`cluster`] and [`placement`]: peers, home nodes, forwarding, draining; [`hop`]: the
//!   signed header a forward carries.
//! - [`admin`] and [`metrics`]: what operators look at.

pub mod acme;
pub mod admin;
pub mod body;
pub mod cluster;
pub mod executor;
pub mod h1_guard;
pub mod hop;
pub mod metrics;
pub mod node;
pub mod node_cache;
pub mod placement;
pub mod quic;
pub mod served;
pub mod server;
pub mod service;
pub mod sync;
pub mod tls;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod test_body;

pub use node::{NodeError, NodeListeners, NodeOptions, run};
