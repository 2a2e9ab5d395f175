//! atoll-isolate: runs WebAssembly functions as WCGI programs, one fresh instance per request.
//!
//! ```text
//! wasm bytes ──Engine::compile──▶ Module ──ArtifactCache──▶ disk (<sha256>-<fingerprint>.artifact)
//!                                   │
//!                                   ▼
//! CgiRequest ──▶ LoadedFunction::invoke: Store + Instance (lean WASI) ─ _start ─▶ stdout ──▶ CgiResponse
//! ```
//!
//! - [`cgi`] is the sans-IO contract (request → environment, stdout → response).
//! - [`wasi`] is the handful of WASI preview1 calls a CGI program needs.
//! - [`engine`] owns the compiler and the fingerprint that keys compiled artifacts.
//! - [`artifact_cache`] keeps compiled modules on disk across restarts.
//! - [`outbound`] decides where an outbound call may connect (allow-list, DNS, SSRF guard).
//! - [`push_check`] is the registry's check of a pushed module (an `atoll_core::ModuleCheck`).
//! - [`stream`] hands a large response to the client while the guest still writes it.
//! - [`executor`] is where guest code runs (hot threads, overflow when they stall);
//!   [`mod@invoke`] runs one request under its deadline (interrupt, supervision, replenish).
//! - [`function`] ties them together per request; [`pool`] admits requests, keeps instances
//!   ready ahead of them and scales to zero.

pub mod artifact_cache;
pub mod cgi;
pub mod cow_memory;
pub mod deadline;
pub mod engine;
pub mod error;
pub mod executor;
pub mod function;
pub mod invoke;
mod layout;
pub mod outbound;
pub mod pool;
pub mod push_check;
pub mod snapshot;
pub mod stream;
pub mod wasi;
pub mod wasi_http;
pub mod wasi_kv;

#[cfg(test)]
mod fuzz;

pub use artifact_cache::{ArtifactCache, LoadKind};
pub use cgi::{CgiError, CgiRequest, CgiResponse};
pub use engine::Engine;
pub use error::IsolateError;
pub use executor::GuestExecutor;
pub use function::{FunctionConfig, InterruptHandle, Invocation, InvokeError, LoadedFunction, ReadyInstance};
pub use invoke::{GuestPanicked, Run, RunObserver, RunOptions, RunOutcome, invoke};
pub use pool::{Admission, InstancePool, InterruptSlot, Overloaded, ScaleConfig, StartKind};
pub use push_check::PushCheck;
pub use stream::{BodyAborted, BodyReader, StreamedResponse, StreamingOutput};
