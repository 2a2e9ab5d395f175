//! atoll-dns: the cluster's authoritative DNS — how "point DNS at the edge nodes" becomes
//! load balancing across nodes and failover across regions.
//!
//! ```text
//! registry (GET /v1/nodes, /v1/functions) ─┐  every 500 ms   ┌─ ArcSwap<ClusterView> ─┐
//! NATS store (members, function records) ──┴─▶ source::poll ─┘   (lock-free read)     │
//!                                                                                     ▼
//! client ─UDP/TCP─▶ hickory-server ─▶ server::DnsHandler ─▶ answer::answer(view, config, question)
//!                                      │ UDP: rrl (rate     (pure: REFUSED / SOA / NS /
//!                                      │ per prefix), size   A+AAAA of the client's region)
//!                                      │ cap (TC=1 → TCP)
//! ```
//!
//! The zone's routed names (every host a function routes, wildcards included) answer with
//! the healthy nodes of the region the client's subnet maps to, falling back region by
//! region when one has none; answers live a few seconds (`--ttl`), so a dead region drops
//! out of the answers within one member TTL (3 s) plus one poll (0.5 s), and out of
//! resolvers' caches one answer TTL later. SOA and NS make the zone delegable to the
//! machines running this server. When the source is unreachable the last good view keeps
//! being served (static stability), as nodes keep serving functions when the registry is
//! down. Being reachable by anyone over UDP, it is no amplifier: ANY gets one RRset
//! (RFC 8482), UDP responses are capped at `--max-udp-payload`, and responses per client
//! prefix are rate limited (`--rate-limit`, see [`rrl`]).

pub mod answer;
pub mod cluster;
pub mod config;
pub mod rrl;
pub mod server;
pub mod source;

pub use answer::{Answer, Question, answer};
pub use cluster::{ClusterSnapshot, ClusterView};
pub use config::DnsConfig;
pub use rrl::{RateLimit, RateLimiter};
pub use server::{DnsHandler, bind, serve};
pub use source::snapshot;
