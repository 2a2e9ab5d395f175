//! Keeping the node's route table in step with the functions' source of truth.
//!
//! ```text
//! SyncSource::Registry  GET /v1/watch?since=REV ─┐
//! SyncSource::Nats      JetStream KV scan + watch ┴─Put──▶ fetch blob ─▶ verify sha256 ─▶ cache on disk
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
//! Where the events come from is a [`SyncSource`]: a registry's watch stream, or NATS
//! JetStream read directly. Both produce the same sequence of [`WatchEvent`]s (catch-up
//! `Put`s, `Synced`, then live `Put`s and idle `Heartbeat`s), so everything after the
//! stream — [`plan`], fetching, loading, persisting, backoff — is one code path.
//!
//! The decision of what an event requires ([`plan`]) is pure and unit-tested; the I/O lives
//! in [`Syncer`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use atoll_isolate::{ArtifactCache, FunctionConfig, InstancePool, LoadKind, LoadedFunction, ScaleConfig};
use atoll_registry::{Deployment, LazyNatsStore, NatsStore, RegistryClient, StoreError, WatchEvent};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::metrics::{self, FunctionMetrics};
use crate::node_cache::{CachedState, NodeCache};
use crate::served::{Routing, ServedFunction, build_table};

/// What applying an event takes.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Load this deployment, then publish.
    Load(Box<Deployment>),
    /// Remove the function, then publish.
    Remove(String),
    /// Nothing changes in the table; just record the revision.
    Advance,
    /// The initial catch-up is complete.
    MarkSynced,
}

/// Decides what `event` requires, given what is served now (name → (version, sha256)).
pub fn plan(event: WatchEvent, served: &HashMap<String, (u64, String)>) -> Plan {
    match event {
        WatchEvent::Put { deployment, .. } => match served.get(&deployment.name) {
            Some((version, sha256)) if *version == deployment.version && *sha256 == deployment.sha256 => {
                Plan::Advance
            }
            _ => Plan::Load(Box::new(deployment)),
        },
        WatchEvent::Delete { name, .. } if served.contains_key(&name) => Plan::Remove(name),
        WatchEvent::Delete { .. } | WatchEvent::Heartbeat { .. } => Plan::Advance,
        WatchEvent::Synced { .. } => Plan::MarkSynced,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("registry: {0}")]
    Registry(#[from] atoll_registry::ClientError),
    #[error("NATS: {0}")]
    Nats(#[from] StoreError),
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
    #[error("the watch stream went silent")]
    Silent,
    #[error("the watch stream ended")]
    Ended,
    #[error(
        "the source is at revision {source_revision}, behind the {applied} applied here: it was reset or replaced; catching up from the start"
    )]
    SourceReset { source_revision: u64, applied: u64 },
}

/// Longest silence tolerated on the watch stream (the registry sends heartbeats every 5 s,
/// and so does [`SyncSource::Nats`] after checking that NATS answers).
const WATCH_SILENCE_LIMIT: Duration = Duration::from_secs(15);
/// Idle time after which a NATS watch asks JetStream for the bucket's revision — one
/// request, which also catches a change the KV watch missed — and reports a heartbeat.
const NATS_HEARTBEAT: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The events a [`SyncSource`] watch yields: see [`WatchEvent`] for their order. The
/// stream ends (or yields an error) when the source is lost; the [`Syncer`] then resumes
/// from the last revision it applied.
pub type WatchEvents = BoxStream<'static, Result<WatchEvent, SyncError>>;

/// Where a node learns which functions to serve.
///
/// A node following JetStream directly needs no registry at all: registries then only take
/// pushes (and rollbacks) and write them to NATS, and every node reads the same KV bucket
/// and object store they write. Losing every registry then costs nothing but the ability
/// to push; the NATS cluster is the only thing nodes depend on for updates, and not even
/// for serving — a node keeps its table and disk cache when its source is gone.
///
/// Revisions are the source's own: a registry on the NATS store and NATS itself number
/// changes alike (the KV stream's sequence), so a node may switch between the two; a
/// registry on the embedded store numbers them differently.
pub enum SyncSource {
    /// A registry's `GET /v1/watch` and `GET /v1/blobs/{sha256}`.
    Registry(RegistryClient),
    /// NATS JetStream, through a connected [`NatsStore`]: the watch is a catch-up scan of
    /// the functions bucket ([`NatsStore::events_since`]), `Synced`, then a re-scan
    /// whenever the bucket changes ([`NatsStore::subscribe`]), with a heartbeat when idle;
    /// modules come from the object store, checked against their digest.
    Nats(NatsStore),
    /// NATS JetStream connected on first use: the first watch connects (retried with the
    /// [`Syncer`]'s backoff while NATS is unreachable). What a node starting without NATS
    /// uses, so it serves from its disk cache meanwhile instead of failing to start; the
    /// node shares it with its heartbeats, so both use one connection.
    NatsUrl(Arc<LazyNatsStore>),
}

impl SyncSource {
    /// NATS JetStream at `url`, connected on the first watch (see [`SyncSource::NatsUrl`]).
    pub fn nats(url: impl Into<String>) -> SyncSource {
        SyncSource::NatsUrl(Arc::new(LazyNatsStore::new(url)))
    }

    /// The events after revision `since` (0: everything): a `Put` for every function changed
    /// since, `Synced`, then live `Put`s and `Heartbeat`s. Fails if the source cannot be
    /// reached; the stream yields an error and ends if it is lost later.
    pub async fn watch(&mut self, since: u64) -> Result<WatchEvents, SyncError> {
        match self {
            SyncSource::Registry(client) => {
                let events = client.watch(since).await?;
                Ok(events.map(|event| event.map_err(SyncError::from)).boxed())
            }
            SyncSource::Nats(store) => nats_watch(store.clone(), since, NATS_HEARTBEAT).await,
            SyncSource::NatsUrl(lazy) => nats_watch(lazy.get().await?.clone(), since, NATS_HEARTBEAT).await,
        }
    }

    /// The module with this SHA-256. A registry's answer is not checked here: the caller
    /// checks every module against its digest, whatever its source.
    pub async fn blob(&self, sha256: &str) -> Result<Vec<u8>, SyncError> {
        match self {
            SyncSource::Registry(client) => Ok(client.blob(sha256).await?.to_vec()),
            SyncSource::Nats(store) => Ok(store.read_blob(sha256).await?),
            SyncSource::NatsUrl(lazy) => Ok(lazy.get().await?.read_blob(sha256).await?),
        }
    }
}

impl fmt::Debug for SyncSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncSource::Registry(client) => f.debug_tuple("Registry").field(client).finish(),
            // Both show their URL without credentials.
            SyncSource::Nats(store) => f.debug_tuple("Nats").field(store).finish(),
            SyncSource::NatsUrl(lazy) => f.debug_tuple("NatsUrl").field(lazy).finish(),
        }
    }
}

/// A watch on NATS: what a registry's `GET /v1/watch` on the NATS store sends, produced on
/// the node. Subscribes before the catch-up scan so a change in between is not missed.
async fn nats_watch(store: NatsStore, since: u64, heartbeat: Duration) -> Result<WatchEvents, SyncError> {
    let changes = store.subscribe();
    let (events, revision) = store.events_since(since).await?;
    let mut queue: VecDeque<WatchEvent> = events.into();
    queue.push_back(WatchEvent::Synced { revision });
    let watch = NatsWatch {
        store,
        changes,
        queue,
        last: revision,
        heartbeat,
        ended: false,
    };
    Ok(futures_util::stream::unfold(watch, |mut watch| async move {
        let event = watch.next_event().await?;
        Some((event, watch))
    })
    .boxed())
}

/// The state of one NATS watch.
struct NatsWatch {
    store: NatsStore,
    /// Changes whenever the functions bucket changes (fed by the store's KV watch).
    changes: watch::Receiver<u64>,
    queue: VecDeque<WatchEvent>,
    /// The revision the stream has covered so far.
    last: u64,
    heartbeat: Duration,
    /// An error was yielded: the stream is over.
    ended: bool,
}

impl NatsWatch {
    /// The next event; an error once if NATS fails, then `None`.
    async fn next_event(&mut self) -> Option<Result<WatchEvent, SyncError>> {
        if self.ended {
            return None;
        }
        let quiet_until = tokio::time::Instant::now() + self.heartbeat;
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(Ok(event));
            }
            let idle = tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        self.ended = true;
                        return Some(Err(SyncError::Ended));
                    }
                    false
                }
                () = tokio::time::sleep_until(quiet_until) => true,
            };
            // Re-scan by revision on a change (changes coalesce, none is lost) and when idle:
            // the idle scan is how a dead NATS is noticed, and it picks up anything a
            // disconnected KV watch did not report.
            match self.store.events_since(self.last).await {
                Ok((events, revision)) => {
                    self.last = self.last.max(revision);
                    self.queue.extend(events);
                    if idle && self.queue.is_empty() {
                        return Some(Ok(WatchEvent::Heartbeat { revision: self.last }));
                    }
                }
                Err(error) => {
                    // End the stream: the Syncer resumes from the last revision it applied,
                    // so ending loses nothing, whereas skipping would.
                    self.ended = true;
                    return Some(Err(error.into()));
                }
            }
        }
    }
}

pub struct Syncer {
    source: SyncSource,
    cache: NodeCache,
    artifacts: ArtifactCache,
    routing: Arc<Routing>,
    served: HashMap<String, Arc<ServedFunction>>,
    revision: u64,
}

impl Syncer {
    pub fn new(
        source: SyncSource,
        cache: NodeCache,
        artifacts: ArtifactCache,
        routing: Arc<Routing>,
    ) -> Self {
        Syncer {
            source,
            cache,
            artifacts,
            routing,
            served: HashMap::new(),
            revision: 0,
        }
    }

    /// Rebuilds the table from the disk cache, if there is one. Returns how many functions
    /// were restored.
    pub async fn restore_from_disk(&mut self) -> Result<usize, SyncError> {
        let Some(state) = self.cache.load_state()? else {
            return Ok(0);
        };
        let expected = state.deployments.len();
        for deployment in state.deployments {
            let Some(bytes) = self.cache.read_module(&deployment.sha256) else {
                tracing::warn!(function = %deployment.name, "module missing from the disk cache; it will be fetched");
                continue;
            };
            match self.load(deployment.clone(), bytes).await {
                Ok(served) => {
                    self.served.insert(deployment.name.clone(), served);
                }
                Err(error) => tracing::warn!(%error, "could not restore a cached function"),
            }
        }
        // Resume from the cached revision only if everything it names was restored;
        // otherwise catch up from scratch (Puts of what is already served are no-ops).
        self.revision = if self.served.len() == expected {
            state.revision
        } else {
            0
        };
        self.publish();
        tracing::info!(
            functions = self.served.len(),
            revision = self.revision,
            "serving from the disk cache"
        );
        Ok(self.served.len())
    }

    /// Follows the source until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_START;
        loop {
            let outcome = tokio::select! {
                outcome = self.follow(&mut backoff) => outcome,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, source = ?self.source, retry_in = ?backoff, "sync interrupted");
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn follow(&mut self, backoff: &mut Duration) -> Result<(), SyncError> {
        let mut events = self.source.watch(self.revision).await?;
        loop {
            let event = match tokio::time::timeout(WATCH_SILENCE_LIMIT, events.next()).await {
                Err(_) => return Err(SyncError::Silent),
                Ok(None) => return Err(SyncError::Ended),
                Ok(Some(event)) => event?,
            };
            let revision = event.revision();
            if let WatchEvent::Synced { .. } = event
                && revision < self.revision
            {
                // A registry rebuilt from scratch, a recreated bucket, another control
                // plane: its revisions are not ours, and resuming from ours would skip its
                // changes. Catch up from the start; unchanged versions cost nothing.
                let applied = std::mem::take(&mut self.revision);
                return Err(SyncError::SourceReset {
                    source_revision: revision,
                    applied,
                });
            }
            let served_versions = self
                .served
                .iter()
                .map(|(name, served)| {
                    (
                        name.clone(),
                        (served.deployment.version, served.deployment.sha256.clone()),
                    )
                })
                .collect();
            // The same version and module with another manifest only comes from another
            // source (after a reset): what that source says wins.
            let decided = match event {
                WatchEvent::Put { deployment, .. }
                    if self.served.get(&deployment.name).is_some_and(|served| {
                        served.deployment.version == deployment.version
                            && served.deployment.sha256 == deployment.sha256
                            && served.deployment.manifest != deployment.manifest
                    }) =>
                {
                    Plan::Load(Box::new(deployment))
                }
                event => plan(event, &served_versions),
            };
            match decided {
                Plan::Load(deployment) => {
                    let served = self.fetch_and_load(*deployment).await?;
                    self.served.insert(served.name().to_string(), served);
                    self.revision = self.revision.max(revision);
                    self.publish();
                    self.persist()?;
                }
                Plan::Remove(name) => {
                    self.served.remove(&name);
                    self.revision = self.revision.max(revision);
                    self.publish();
                    self.persist()?;
                }
                Plan::Advance => {}
                Plan::MarkSynced => {
                    self.revision = self.revision.max(revision);
                    if !self.routing.is_ready() {
                        self.publish();
                    }
                    self.persist()?;
                    *backoff = BACKOFF_START;
                    tracing::info!(
                        revision = self.revision,
                        functions = self.served.len(),
                        "in sync with the source"
                    );
                }
            }
        }
    }

    async fn fetch_and_load(&self, deployment: Deployment) -> Result<Arc<ServedFunction>, SyncError> {
        let bytes = match self.cache.read_module(&deployment.sha256) {
            Some(bytes) => bytes,
            None => {
                let bytes = self.source.blob(&deployment.sha256).await?;
                if hex::encode(Sha256::digest(&bytes)) != deployment.sha256 {
                    return Err(SyncError::DigestMismatch {
                        name: deployment.name,
                        version: deployment.version,
                        sha256: deployment.sha256,
                    });
                }
                self.cache.write_module(&deployment.sha256, &bytes)?;
                bytes
            }
        };
        self.load(deployment, bytes).await
    }

    /// Compiles (or loads the cached artifact of) a deployment's module off the runtime.
    async fn load(&self, deployment: Deployment, bytes: Vec<u8>) -> Result<Arc<ServedFunction>, SyncError> {
        let artifacts = self.artifacts.clone();
        let sha256 = deployment.sha256.clone();
        let name = deployment.name.clone();
        let init_env: Vec<(String, String)> = deployment
            .manifest
            .env
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let started = std::time::Instant::now();
        let loaded =
            tokio::task::spawn_blocking(move || artifacts.load_or_prepare(&sha256, &bytes, &name, &init_env))
                .await;
        let prepared = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(error)) => {
                return Err(SyncError::Load {
                    name: deployment.name,
                    version: deployment.version,
                    reason: error.to_string(),
                });
            }
            Err(join_error) => {
                return Err(SyncError::Load {
                    name: deployment.name,
                    version: deployment.version,
                    reason: join_error.to_string(),
                });
            }
        };
        let kind = prepared.kind;
        ::metrics::counter!(metrics::MODULE_LOADS_TOTAL, "kind" => kind.as_str()).increment(1);
        tracing::info!(
            function = %deployment.name,
            version = deployment.version,
            sha256 = %deployment.sha256,
            how = if kind == LoadKind::Cached { "artifact from disk" } else { "compiled" },
            preinitialized = prepared.preinitialized,
            image_bytes = prepared.image.as_ref().map_or(0, |image| image.len()),
            took = ?started.elapsed(),
            "function ready"
        );
        if kind == LoadKind::Compiled {
            ::metrics::histogram!(
                metrics::ISOLATE_START_DURATION,
                "function" => deployment.name.clone(),
                "kind" => "compile"
            )
            .record(started.elapsed().as_secs_f64());
        }
        let manifest = &deployment.manifest;
        let mut config = FunctionConfig::new(deployment.name.clone());
        config.env = manifest
            .env
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        config.max_memory_bytes = manifest.limits.memory_bytes();
        config.max_response_bytes = usize::try_from(manifest.limits.response_bytes()).unwrap_or(usize::MAX);
        config.timeout = manifest.limits.timeout();
        let scale = ScaleConfig {
            min_instances: manifest.scale.min_instances() as usize,
            max_concurrency: manifest.scale.max_concurrency() as usize,
            max_queue: manifest.scale.max_queue() as usize,
            idle_timeout: manifest.scale.idle_timeout(),
            ..ScaleConfig::default()
        };
        let function = LoadedFunction::from_prepared(self.artifacts.engine().clone(), prepared, config);
        let pool = InstancePool::new(function, scale);
        let function_metrics = Arc::new(FunctionMetrics::new(&deployment.name));
        // Reserved instances (`min_instances`) are made ready before the version is routed.
        let reserved = Arc::clone(&pool);
        if let Ok(start_times) = tokio::task::spawn_blocking(move || reserved.replenish()).await {
            for start_time in start_times {
                function_metrics.instance_started(start_time, true);
            }
        }
        Ok(Arc::new(ServedFunction {
            deployment,
            pool,
            metrics: function_metrics,
        }))
    }

    fn publish(&self) {
        self.routing.publish(build_table(self.served.values()));
        ::metrics::gauge!(metrics::ROUTE_TABLE_REVISION).set(self.revision as f64);
    }

    fn persist(&self) -> Result<(), SyncError> {
        let mut deployments: Vec<Deployment> = self
            .served
            .values()
            .map(|served| served.deployment.clone())
            .collect();
        deployments.sort_by(|a, b| a.name.cmp(&b.name));
        self.cache.save_state(&CachedState {
            revision: self.revision,
            deployments,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_registry::Manifest;

    fn deployment(name: &str, version: u64, sha256: &str) -> Deployment {
        Deployment {
            name: name.into(),
            version,
            sha256: sha256.into(),
            manifest: Manifest::parse(&format!(
                "name = \"{name}\"\nwasm = \"x.wasm\"\nroutes = [\"{name}.example.com\"]\n"
            ))
            .unwrap(),
        }
    }

    #[test]
    fn new_function_or_new_version_is_loaded() {
        let mut served = HashMap::new();
        let put = |d: Deployment| WatchEvent::Put {
            revision: 1,
            deployment: d,
        };
        assert_eq!(
            plan(put(deployment("a", 1, "aa")), &served),
            Plan::Load(Box::new(deployment("a", 1, "aa")))
        );
        served.insert("a".to_string(), (1, "aa".to_string()));
        assert_eq!(plan(put(deployment("a", 1, "aa")), &served), Plan::Advance);
        assert_eq!(
            plan(put(deployment("a", 2, "bb")), &served),
            Plan::Load(Box::new(deployment("a", 2, "bb")))
        );
        // A rollback to v1 is a Put of v1: loaded again.
        served.insert("a".to_string(), (2, "bb".to_string()));
        assert_eq!(
            plan(put(deployment("a", 1, "aa")), &served),
            Plan::Load(Box::new(deployment("a", 1, "aa")))
        );
    }

    #[test]
    fn deletes_heartbeats_and_synced() {
        let mut served = HashMap::new();
        served.insert("a".to_string(), (1, "aa".to_string()));
        assert_eq!(
            plan(
                WatchEvent::Delete {
                    revision: 2,
                    name: "a".into()
                },
                &served
            ),
            Plan::Remove("a".into())
        );
        assert_eq!(
            plan(
                WatchEvent::Delete {
                    revision: 2,
                    name: "b".into()
                },
                &served
            ),
            Plan::Advance
        );
        assert_eq!(
            plan(WatchEvent::Heartbeat { revision: 9 }, &served),
            Plan::Advance
        );
        assert_eq!(
            plan(WatchEvent::Synced { revision: 9 }, &served),
            Plan::MarkSynced
        );
    }
}
