//! atoll-control: the control plane as nodes and the DNS see it.
//!
//! ```text
//!            ┌──────────── ControlPlane ────────────┐
//! node sync ─┤ watch(since) · blob(sha256)          ├─ Registry(RegistryClient) ── HTTP ── atoll registry
//! heartbeat ─┤ announce(node) → members             │
//! atoll dns ─┤ members_and_routes()                 ├─ Nats(LazyNatsStore) ── JetStream (KV + objects)
//!            └──────────────────────────────────────┘
//! ```
//!
//! - [`client`]: the registry's HTTP client (the CLI's too).
//! - [`nats`]: the NATS JetStream store, which registries write and nodes and the DNS may
//!   read directly, so that losing every registry costs only the ability to push.
//! - [`nats_kv`]: functions' key-value stores on NATS (one bucket per store), with the
//!   node-local read cache a watch keeps honest.
//! - [`watch`]: the one change stream over a store (catch-up scan, `Synced`, live changes,
//!   heartbeats), which a registry serves as `GET /v1/watch` and a node reads from NATS.
//! - [`ControlPlane`]: where a node or the DNS talks to, written once.
//! - [`ControlError`]: what went wrong, and whether trying again can help.

pub mod client;
pub mod nats;
pub mod nats_kv;
pub mod plane;
pub mod watch;

pub use client::{ClientError, RegistryClient};
pub use nats::{LazyNatsStore, NatsStore};
pub use plane::{ControlError, ControlPlane, WatchEvents};
