//! atoll-core: what every other crate agrees on, with no I/O runtime (no tokio, no wasmer).
//!
//! ```text
//! manifest   atoll.toml: names, routes, limits, scale           (pushed by users)
//! model      versions, function records, deployments            (the registry's state)
//! watch      the change stream's events and wire lines          (registry → nodes)
//! api_types  the registry API's JSON bodies                     (server and client)
//! route      route patterns; host  the one host matcher; route_table  host + path → target
//! membership node announcements, the member table, region order (heartbeats, DNS, forwarding)
//! check      what a registry asks of a pushed module (implemented by atoll-isolate)
//! auth       credentials, scopes and who may do what; rules  the pure push/rollback rules
//! outbound   the outbound allow-list (Spin's syntax) and the SSRF guard's address rules
//! digest     SHA-256 hex names; durable  crash-safe file writes; error  the store's error
//! ```
//!
//! Everything here is a pure function of its inputs or a plain data type, tested without
//! sockets, so the rules that nodes, the registry and the DNS must share are written once.

pub mod api_types;
pub mod auth;
pub mod check;
pub mod cron;
pub mod digest;
pub mod durable;
pub mod env_names;
pub mod error;
pub mod host;
pub mod kv;
pub mod manifest;
pub mod membership;
pub mod model;
pub mod origin;
pub mod outbound;
pub mod route;
pub mod route_table;
pub mod rules;
pub mod secrets;
pub mod traffic;
pub mod watch;

#[cfg(test)]
mod fuzz;

pub use check::{ModuleCheck, ModuleRefusal};
pub use error::StoreError;
pub use manifest::{Limits, Manifest, ManifestError};
pub use model::{DeployedSplit, Deployment, FunctionRecord, SplitVersion, Version};
pub use route::{HostPattern, RouteError, RoutePattern};
pub use route_table::{RouteEntry, RouteMatch, RouteTable};
pub use watch::WatchEvent;
