//! atoll-router: the edge node.
//!
//! ```text
//! TcpListener ─▶ server (h1 / h2c) ─▶ EdgeService ─▶ Routing (ArcSwap<RouteTable>) ─▶ LoadedFunction
//!                                                          ▲
//! registry watch ─▶ Syncer ─▶ fetch + verify + cache + compile ─┘   (node_cache on disk)
//! admin listener ─▶ /healthz /readyz /metrics
//! ```
//!
//! - [`route_table`]: host/path matching, pure and generic over its target.
//! - [`served`]: the published table of loaded functions.
//! - [`service`]: the request path; [`server`]: accept loops with graceful shutdown;
//!   [`executor`]: the threads guest code runs on.
//! - [`sync`] and [`node_cache`]: following the registry and surviving without it.
//! - [`admin`] and [`metrics`]: what operators look at.

pub mod acme;
pub mod admin;
pub mod executor;
pub mod h1_guard;
pub mod metrics;
pub mod node;
pub mod node_cache;
pub mod quic;
pub mod route_table;
pub mod served;
pub mod server;
pub mod service;
pub mod sync;
pub mod tls;

pub use node::{NodeError, NodeListeners, NodeOptions, run};
pub use route_table::{RouteEntry, RouteMatch, RouteTable};
