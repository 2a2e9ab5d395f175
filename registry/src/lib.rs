//! atoll-registry: where functions live before nodes serve them.
//!
//! ```text
//! atoll push ──HTTP──▶ api (auth: scopes, multipart) ──▶ Registry::push
//!                        manifest::Manifest::parse   (routes via route::RoutePattern)
//!                        atoll_isolate::Engine::validate   (compiles, is a WASI command)
//!                        backend::Backend::push      embedded: blob, then state.json, atomically
//!                                                    NATS: object, then KV compare-and-set
//! node ◀──NDJSON── GET /v1/watch?since=N ◀── revision bump ── store
//! node ──GET /v1/blobs/{sha256}──▶ module bytes
//! ```
//!
//! The model ([`model`]) is append-only: versions are immutable, a function's `active`
//! pointer moves on push and rollback, and every mutation bumps a global revision that the
//! watch stream ([`watch`]) uses to bring a node up to date from wherever it left off.
//! [`client::RegistryClient`] is the other end, used by the CLI and by nodes.

pub mod api;
pub mod backend;
pub mod connections;
pub mod store;
pub mod token;

pub use api::{Registry, RegistryError, RegistryOptions, router, serve, serve_with};
pub use backend::Backend;
pub use connections::ConnectionLimits;
pub use store::{State, Store};
pub use token::{TokenOrigin, load_or_create};
