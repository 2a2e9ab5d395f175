//! atoll-router: the edge node.
//!
//! ```text
//! TCP (h1 / h2c) ─┐
//! TLS (h2 / h1) ──┼▶ atoll-ingress (server / quic) ─▶ EdgeService ─▶ Routing (ArcSwap<RouteTable>) ─▶ LoadedFunction
//! QUIC (h3) ──────┘    ▲ tls::Certificates (SNI: --certs DIR, ACME fed Routing::exact_hosts)
//!                                                          ▲
//! registry watch ─▶ Syncer ─▶ fetch + verify + cache + compile ─┘   (node_cache on disk)
//! admin listener ─▶ /healthz /readyz /metrics
//! ```
//!
//! The listeners, TLS, ACME, HTTP/3 and the HTTP/1.1 guard are atoll-ingress; this crate
//! is what answers: its services implement `atoll_ingress::server::Handler`.
//!
//! - [`atoll_core::route_table`]: host/path matching, pure and generic over its target.
//! - [`served`]: the published table of loaded functions.
//! - [`service`]: the request path; [`body`]: what it answers with (whole, or streamed from
//!   a guest or a peer). Guest code runs on atoll-isolate's executor, under its `invoke`.
//! - [`sync`] and [`node_cache`]: following the registry and surviving without it.
//! - [`cluster`] (and [`cluster::placement`]): peers, home nodes, forwarding, draining;
//!   [`hop`]: the signed header a forward carries.
//! - [`admin`] and [`metrics`]: what operators look at.
//! - [`node`]: all of it wired together, with the ingress listeners.

pub mod admin;
pub mod body;
pub mod cluster;
pub mod cron;
pub mod hop;
pub mod kv;
pub mod metrics;
pub mod node;
pub mod node_cache;
pub mod origin;
pub mod origin_conn;
pub mod served;
pub mod service;
pub mod services;
pub mod sync;

pub use node::{NodeError, NodeListeners, NodeOptions, run};

/// Locks `mutex`, taking over a lock a panicking thread left poisoned: what these locks
/// guard (a stack of idle connections, a batch of pending metrics) is changed by single
/// pushes and pops, never left half-changed.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
