//! [`ControlPlane`]: where a node or the DNS learns what to serve and who else is serving,
//! written once for both kinds of control plane.
//!
//! - `Registry`: a registry's HTTP API (`GET /v1/watch`, `GET /v1/blobs/{sha256}`,
//!   `PUT /v1/nodes/{name}`, `GET /v1/nodes`, `GET /v1/functions`).
//! - `Nats`: NATS JetStream read directly (the function bucket, the object store, the
//!   member bucket), connected on first use so a node or the DNS starts while NATS is down
//!   and serves what it has meanwhile (static stability). Registries then only take pushes;
//!   losing every registry costs nothing but the ability to push.
//!
//! Revisions are the source's own: a registry on the NATS store and NATS itself number
//! changes alike (the KV stream's sequence), so a reader may switch between the two; a
//! registry on the embedded store numbers them differently.

use std::sync::Arc;
use std::time::Duration;

use atoll_core::StoreError;
use atoll_core::membership::{MemberStatus, NodeAnnouncement};
use atoll_core::watch::WatchEvent;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::client::{ClientError, RegistryClient};
use crate::nats::{LazyNatsStore, NatsStore};
use crate::watch::{ChangeWatch, WatchEnd, WhenIdle};

/// Idle time after which a NATS watch asks JetStream for the bucket's revision — one
/// request, which also catches a change the KV watch missed — and reports a heartbeat.
pub const NATS_HEARTBEAT: Duration = Duration::from_secs(5);

/// The events of a [`ControlPlane::watch`]: see [`WatchEvent`] for their order. The stream
/// ends (or yields an error) when the control plane is lost; the reader then resumes from
/// the last revision it applied.
pub type WatchEvents = BoxStream<'static, Result<WatchEvent, ControlError>>;

/// What went wrong talking to the control plane. Display is one line.
///
/// [`ControlError::is_retryable`] says whether the same call may succeed later without
/// anyone changing anything (pingora's split of errors): a control plane that cannot be
/// reached, times out or fails inside is retried at the caller's normal pace; one that
/// answered "no" (not found, forbidden, invalid) will answer the same until someone acts.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The registry did not answer, or answered an error.
    #[error("registry: {0}")]
    Registry(#[from] ClientError),
    /// NATS failed, or refused.
    #[error("NATS: {0}")]
    Nats(#[from] StoreError),
    /// No answer within the caller's time limit.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The watch stream sent nothing, not even a heartbeat, for too long.
    #[error("the watch stream went silent")]
    Silent,
    /// The watch stream ended.
    #[error("the watch stream ended")]
    Ended,
}

impl ControlError {
    /// Whether trying the same call again later may succeed with nobody acting.
    pub fn is_retryable(&self) -> bool {
        match self {
            ControlError::Registry(error) => match error {
                ClientError::Unreachable { .. } | ClientError::Protocol { .. } => true,
                ClientError::InvalidUrl { .. } => false,
                ClientError::Status { status, .. } => {
                    status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429
                }
            },
            ControlError::Nats(error) => matches!(error, StoreError::Io { .. }),
            ControlError::Timeout(_) | ControlError::Silent | ControlError::Ended => true,
        }
    }
}

impl From<WatchEnd> for ControlError {
    fn from(end: WatchEnd) -> ControlError {
        match end {
            WatchEnd::Store(error) => ControlError::Nats(error),
            WatchEnd::Closed => ControlError::Ended,
        }
    }
}

/// Where a node or the DNS talks to: a registry, or NATS directly.
pub enum ControlPlane {
    /// A registry's HTTP API.
    Registry(RegistryClient),
    /// NATS JetStream, connected on first use and shared by everything the process does
    /// with it (sync and heartbeats use one connection).
    Nats(Arc<LazyNatsStore>),
}

impl ControlPlane {
    /// NATS JetStream at `url`, connected on first use (retried at the caller's pace while
    /// NATS is unreachable).
    pub fn nats(url: impl Into<String>) -> ControlPlane {
        ControlPlane::Nats(Arc::new(LazyNatsStore::new(url)))
    }

    /// NATS JetStream through a store already connected.
    pub fn nats_connected(store: NatsStore) -> ControlPlane {
        ControlPlane::Nats(Arc::new(LazyNatsStore::connected(store)))
    }

    /// The events after revision `since` (0: everything): a `Put` for every function changed
    /// since, `Synced`, then live `Put`s and `Heartbeat`s. Fails if the control plane cannot
    /// be reached; the stream yields an error and ends if it is lost later.
    pub async fn watch(&self, since: u64) -> Result<WatchEvents, ControlError> {
        match self {
            ControlPlane::Registry(client) => {
                let events = client.watch(since).await?;
                Ok(events.map(|event| event.map_err(ControlError::from)).boxed())
            }
            ControlPlane::Nats(lazy) => {
                let store = lazy.get().await?.clone();
                let watch = ChangeWatch::start(store, since, NATS_HEARTBEAT, WhenIdle::Rescan).await?;
                Ok(watch
                    .into_stream()
                    .map(|event| event.map_err(ControlError::from))
                    .boxed())
            }
        }
    }

    /// The module with this SHA-256. A registry's answer is not checked here: the caller
    /// checks every module against its digest, whatever its source.
    pub async fn blob(&self, sha256: &str) -> Result<Vec<u8>, ControlError> {
        match self {
            ControlPlane::Registry(client) => Ok(client.blob(sha256).await?.to_vec()),
            ControlPlane::Nats(lazy) => Ok(lazy.get().await?.read_blob(sha256).await?),
        }
    }

    /// Claims one cron tick for this node: `true` if it was first, in the whole cluster.
    pub async fn cron_claim(&self, run: &atoll_core::cron::CronRun) -> Result<bool, ControlError> {
        match self {
            ControlPlane::Registry(client) => Ok(client.cron_claim(run).await?),
            ControlPlane::Nats(lazy) => Ok(lazy.get().await?.cron_claim(run).await?),
        }
    }

    /// Records how a claimed tick's run ended.
    pub async fn cron_finish(&self, run: &atoll_core::cron::CronRun) -> Result<(), ControlError> {
        match self {
            ControlPlane::Registry(client) => Ok(client.cron_finish(run).await?),
            ControlPlane::Nats(lazy) => {
                if !lazy.get().await?.cron_finish(run).await? {
                    tracing::warn!(function = %run.function, tick = run.tick, "a cron outcome for a tick this node did not claim");
                }
                Ok(())
            }
        }
    }

    /// Sends a node's heartbeat; returns the cluster's members.
    pub async fn announce(&self, announcement: &NodeAnnouncement) -> Result<Vec<MemberStatus>, ControlError> {
        match self {
            ControlPlane::Registry(client) => Ok(client.announce(announcement).await?),
            ControlPlane::Nats(lazy) => {
                let store = lazy.get().await?;
                store.announce(announcement).await?;
                Ok(store.members())
            }
        }
    }

    /// The cluster's members and every route of every active version, now.
    pub async fn members_and_routes(&self) -> Result<(Vec<MemberStatus>, Vec<String>), ControlError> {
        match self {
            ControlPlane::Registry(client) => {
                let (members, functions) = tokio::try_join!(client.nodes(), client.list())?;
                let routes = functions.into_iter().flat_map(|f| f.routes).collect();
                Ok((members, routes))
            }
            ControlPlane::Nats(lazy) => {
                let store = lazy.get().await?;
                // Read the functions first: it fails when NATS is unreachable, and then the
                // caller keeps its last good view rather than members that merely went stale.
                let records = store.list().await?;
                let members = store.members();
                let routes = records
                    .iter()
                    .filter_map(|record| record.active_version())
                    .flat_map(|version| version.manifest.routes.iter().cloned())
                    .collect();
                Ok((members, routes))
            }
        }
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlPlane::Registry(client) => f.debug_tuple("Registry").field(client).finish(),
            // Shows its URL without credentials.
            ControlPlane::Nats(lazy) => f.debug_tuple("Nats").field(lazy).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> ControlError {
        ControlError::Registry(ClientError::Status {
            status: reqwest::StatusCode::from_u16(code).unwrap(),
            message: String::new(),
        })
    }

    #[test]
    fn only_what_may_pass_by_itself_is_retryable() {
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(404).is_retryable());
        assert!(!status(403).is_retryable());
        assert!(ControlError::Timeout(Duration::from_secs(3)).is_retryable());
        assert!(ControlError::Silent.is_retryable());
        let io = StoreError::Io {
            context: "reading".into(),
            source: std::io::Error::other("down"),
        };
        assert!(ControlError::Nats(io).is_retryable());
        assert!(!ControlError::Nats(StoreError::NotFound("no blob".into())).is_retryable());
    }
}
