//! atoll-dns: the cluster's authoritative DNS — how "point DNS at the edge nodes" becomes
//! load balancing across nodes and failover across regions.
//!
//! ```text
//! registry (GET /v1/nodes, /v1/functions) ─┐  every 500 ms   ┌─ ArcSwap<ClusterView> ─┐
//! NATS store (members, function records) ──┴─▶ source::poll ─┘   (lock-free read)     │
//!                                                                                     ▼
//! client ─UDP/TCP─▶ hickory-server ─▶ server::DnsHandler ─▶ answer::answer(view, config, question)
//!                                                            (pure: REFUSED / SOA / NS /
//!                                                             A+AAAA of the client's region)
//! ```
//!
//! The zone's routed names (every host a function routes, wildcards included) answer with
//! the healthy nodes of the region the client's subnet maps to, falling back region by
//! region when one has none; answers live a few seconds (`--ttl`), so a dead region drops
//! out of the answers within one member TTL (3 s) plus one poll (0.5 s), and out of
//! resolvers' caches one answer TTL later. SOA and NS make the zone delegable to the
//! machines running this server. When the source is unreachable the last good view keeps
//! being served (static stability), as nodes keep serving functions when the registry is
//! down.

pub mod answer;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod server;
pub mod source;

pub use answer::{Answer, Question, answer};
pub use cli::DnsArgs;
pub use cluster::{ClusterSnapshot, ClusterView};
pub use config::DnsConfig;
pub use server::{DnsHandler, bind, run, serve};
pub use source::{ClusterSource, SourceError};
