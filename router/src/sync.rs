//! Keeping the node's route table in step with the registry.
//!
//! ```text
//! registry /v1/watch?since=REV ──Put──▶ fetch blob ─▶ verify sha256 ─▶ cache on disk
//!                                      ─▶ compile (or load artifact) ─▶ publish new table
//!                               ──Synced──▶ ready
//! ```
//!
//! A version is compiled *before* the table that routes to it is published, so no request
//! ever waits for a compiler. The applied revision and deployments are persisted after every
//! change; on restart the node first rebuilds its table from disk (static stability), then
//! resumes the watch from that revision. Any failure — registry unreachable, blob missing,
//! digest mismatch, compile error — leaves the current table serving, and the watch is
//! resumed from the last revision that was fully applied, with backoff.
//!
//! The decision of what an event requires ([`plan`]) is pure and unit-tested; the I/O lives
//! in [`Syncer`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use atoll_isolate::{ArtifactCache, FunctionConfig, InstancePool, LoadKind, LoadedFunction, ScaleConfig};
use atoll_registry::{Deployment, RegistryClient, WatchEvent};
use futures_util::StreamExt;
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
}

/// Longest silence tolerated on the watch stream (the registry sends heartbeats every 5 s).
const WATCH_SILENCE_LIMIT: Duration = Duration::from_secs(15);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Syncer {
    client: RegistryClient,
    cache: NodeCache,
    artifacts: ArtifactCache,
    routing: Arc<Routing>,
    served: HashMap<String, Arc<ServedFunction>>,
    revision: u64,
}

impl Syncer {
    pub fn new(
        client: RegistryClient,
        cache: NodeCache,
        artifacts: ArtifactCache,
        routing: Arc<Routing>,
    ) -> Self {
        Syncer {
            client,
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

    /// Follows the registry until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_START;
        loop {
            let outcome = tokio::select! {
                outcome = self.follow(&mut backoff) => outcome,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, retry_in = ?backoff, "registry sync interrupted");
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn follow(&mut self, backoff: &mut Duration) -> Result<(), SyncError> {
        let mut events = self.client.watch(self.revision).await?;
        loop {
            let event = match tokio::time::timeout(WATCH_SILENCE_LIMIT, events.next()).await {
                Err(_) => return Err(SyncError::Silent),
                Ok(None) => return Err(SyncError::Ended),
                Ok(Some(event)) => event?,
            };
            let revision = event.revision();
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
            match plan(event, &served_versions) {
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
                        "in sync with the registry"
                    );
                }
            }
        }
    }

    async fn fetch_and_load(&self, deployment: Deployment) -> Result<Arc<ServedFunction>, SyncError> {
        let bytes = match self.cache.read_module(&deployment.sha256) {
            Some(bytes) => bytes,
            None => {
                let bytes = self.client.blob(&deployment.sha256).await?;
                if hex::encode(Sha256::digest(&bytes)) != deployment.sha256 {
                    return Err(SyncError::DigestMismatch {
                        name: deployment.name,
                        version: deployment.version,
                        sha256: deployment.sha256,
                    });
                }
                self.cache.write_module(&deployment.sha256, &bytes)?;
                bytes.to_vec()
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
