//! atoll-registry: where functions live before nodes serve them.
//!
//! ```text
//! atoll push ──HTTP──▶ api (auth: atoll_core::auth scopes, multipart) ──▶ Registry::push
//!                        atoll_core::Manifest::parse   (routes via atoll_core::RoutePattern)
//!                        atoll_core::ModuleCheck       (injected: atoll_isolate::PushCheck compiles
//!                                                       and runs init, as nodes will)
//!                        backend::Backend::push        embedded (store): blob, then state.json, atomically
//!                                                      NATS (atoll_control::nats): object, then KV compare-and-set
//! node ◀──NDJSON── GET /v1/watch?since=N ◀── atoll_control::watch::ChangeWatch ◀── revision bump
//! node ──GET /v1/blobs/{sha256}──▶ module bytes
//! ```
//!
//! This crate is the server only: the model (`atoll_core::model`) is append-only —
//! versions are immutable, a function's `active` pointer moves on push and rollback
//! (`atoll_core::rules`), and every mutation bumps a global revision that the watch stream
//! uses to bring a node up to date from wherever it left off. `atoll_control::RegistryClient`
//! is the other end, used by the CLI and by nodes. The registry never compiles WebAssembly
//! itself, so it does not link wasmer.

pub mod api;
pub mod backend;
pub mod connections;
pub mod cron;
pub mod kv;
pub mod store;
pub mod token;

pub use api::{Registry, RegistryError, RegistryOptions, router, serve, serve_with};
pub use backend::Backend;
pub use connections::ConnectionLimits;
pub use store::{State, Store};
pub use token::{TokenOrigin, load_or_create};
