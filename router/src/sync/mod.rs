//! Keeping the node's route table in step with the functions' source of truth.
//!
//! ```text
//! ControlPlane::Registry  GET /v1/watch?since=REV ─┐
//! ControlPlane::Nats      JetStream KV scan + watch ┴─Put──▶ fetch blob ─▶ verify sha256 ─▶ cache on disk
//!                                                      ─▶ compile (or load artifact) ─▶ publish new table
//!                                              ──Synced──▶ ready
//! ```
//!
//! A version is compiled *before* the table that routes to it is published, so no request
//! ever waits for a compiler. The applied revision and deployments are persisted after every
//! change; on restart the node first rebuilds its table from disk (static stability), then
//! resumes the watch from that revision. Any failure — source unreachable, blob missing,
//! digest mismatch, compile error — leaves the current table serving, and the watch is
//! resumed from the last revision that was fully applied, with backoff.
//!
//! Where the events come from is a [`ControlPlane`]: a registry's watch stream, or NATS
//! JetStream read directly. Both produce the same sequence of [`WatchEvent`]s (catch-up
//! `Put`s, `Synced`, then live `Put`s and idle `Heartbeat`s), so everything after the
//! stream — [`plan`], fetching, loading, persisting, backoff — is one code path.
//!
//! The decision of what an event requires ([`plan`]) is pure and unit-tested; the I/O lives
//! in [`Syncer`]. The module's files:
//! - here: [`SyncError`] and [`FunctionCeilings`];
//! - `plan.rs`: the pure part — [`plan`], and how long a quarantined version waits;
//! - `syncer.rs`: [`Syncer`] — following the watch, applying what [`plan`] decides,
//!   persisting, quarantine bookkeeping;
//! - `loader.rs`: fetching, checking and preparing one version.
//!
//! [`ControlPlane`]: atoll_control::ControlPlane
//! [`WatchEvent`]: atoll_core::WatchEvent
//! [`plan`]: fn@plan

use std::time::Duration;

use atoll_control::ControlError;

mod loader;
mod plan;
mod syncer;

pub use plan::{Plan, plan};
pub use syncer::Syncer;

/// Why applying the control plane's changes failed; the node keeps serving what it has.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The control plane could not be reached, refused, or its watch was lost.
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("module {sha256} of {name} v{version} does not match its digest")]
    DigestMismatch {
        name: String,
        version: u64,
        sha256: String,
    },
    #[error("loading {name} v{version}: {reason}")]
    Load {
        name: String,
        version: u64,
        reason: String,
    },
    #[error("disk cache: {0}")]
    Cache(#[from] std::io::Error),
    #[error(
        "the source is at revision {source_revision}, behind the {applied} applied here: it was reset or replaced; catching up from the start"
    )]
    SourceReset { source_revision: u64, applied: u64 },
}

/// Node-wide ceilings an operator sets over what manifests ask for: a function gets the
/// smaller of its manifest's value and the node's (also for its init run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCeilings {
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub response_bytes: u64,
    pub max_concurrency: u32,
    pub max_queue: u32,
}

impl Default for FunctionCeilings {
    /// What a manifest may ask for at most.
    fn default() -> Self {
        use atoll_core::manifest;
        FunctionCeilings {
            memory_bytes: manifest::MAX_MEMORY_BYTES,
            timeout: manifest::MAX_TIMEOUT,
            response_bytes: manifest::MAX_RESPONSE_BYTES,
            max_concurrency: manifest::MAX_CONCURRENCY,
            max_queue: manifest::MAX_QUEUE,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use atoll_control::ControlPlane;
    use atoll_core::{Deployment, Manifest};
    use atoll_isolate::{ArtifactCache, Engine};

    use super::Syncer;
    use crate::node_cache::NodeCache;
    use crate::served::Routing;

    /// A WCGI guest answering `200 text/plain` with `body` from a data segment (so it has a
    /// copy-on-write memory image).
    pub(super) fn guest(body: &str) -> Vec<u8> {
        atoll_testkit::guests::writer(&format!("Content-Type: text/plain\n\n{body}"))
    }

    /// A syncer on a node cache in `directory` whose source is never reached (the tests
    /// hand it modules directly or through the disk cache).
    pub(super) fn offline_syncer(directory: &std::path::Path) -> Syncer {
        let cache = NodeCache::open(directory).unwrap();
        let artifacts = ArtifactCache::open(cache.artifacts_dir(), Engine::new().unwrap()).unwrap();
        let source =
            ControlPlane::Registry(atoll_control::RegistryClient::new("http://127.0.0.1:9", None).unwrap());
        Syncer::new(Arc::new(source), cache, artifacts, Routing::new())
    }

    pub(super) fn deployment(name: &str, version: u64, sha256: &str) -> Deployment {
        Deployment {
            name: name.into(),
            version,
            sha256: sha256.into(),
            manifest: Manifest::parse(&format!(
                "name = \"{name}\"\nwasm = \"x.wasm\"\nroutes = [\"{name}.example.com\"]\n"
            ))
            .unwrap(),
            traffic: None,
            secrets: Default::default(),
        }
    }
}
