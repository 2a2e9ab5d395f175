//! Preparing one version to serve: its module from the disk cache or the control plane
//! (checked against its digest), compiled or loaded from its artifact, capped by the node's
//! ceilings, with its reserved instances ready. The syncer runs it in a task per version,
//! and in turn when it restores the node from disk.

use std::sync::Arc;

use atoll_control::ControlPlane;
use atoll_core::Deployment;
use atoll_isolate::{ArtifactCache, FunctionConfig, InstancePool, LoadKind, LoadedFunction, ScaleConfig};

use super::{FunctionCeilings, SyncError};
use crate::metrics::{self, FunctionMetrics};
use crate::node_cache::NodeCache;
use crate::served::ServedFunction;

/// Versions prepared at once: a slow compile or init holds up at most this many slots, and
/// every other version keeps loading beside it.
pub(super) const CONCURRENT_LOADS: usize = 2;

/// Fetches, checks and prepares versions; cheap to clone into a load task.
#[derive(Clone)]
pub(super) struct Loader {
    pub(super) source: Arc<ControlPlane>,
    pub(super) cache: NodeCache,
    pub(super) artifacts: ArtifactCache,
    pub(super) slots: Arc<tokio::sync::Semaphore>,
    pub(super) ceilings: Arc<FunctionCeilings>,
    /// The node's outbound HTTP client; `None` refuses every outbound call.
    pub(super) outbound: Option<Arc<atoll_isolate::outbound::OutboundClient>>,
    /// Runs service calls on this node's functions.
    pub(super) services: Option<Arc<dyn atoll_isolate::wasi_http::ServiceCaller>>,
    /// Where functions' key-value calls go.
    pub(super) kv: Option<Arc<dyn atoll_isolate::wasi_kv::KvBackend>>,
    /// The node's cap on KV calls waiting at once, shared by every function.
    pub(super) kv_waits: Arc<tokio::sync::Semaphore>,
    /// The ports this node listens on (see `OriginPool::new`).
    pub(super) own_ports: Arc<Vec<u16>>,
    /// Opens functions' secrets (`--secrets-key-file`).
    pub(super) secrets_key: Option<Arc<atoll_core::secrets::SecretKey>>,
}

impl Loader {
    /// Prepares `deployment` and, when it carries a traffic split, every other version of
    /// the split (the split takes effect only once all of them are ready). A version among
    /// `prepared` (what the function serves now) is taken as it is, warm: a split that
    /// moves from 10% to 20%, a promote or the end of a split prepares nothing again.
    pub(super) async fn fetch_and_load(
        &self,
        deployment: Deployment,
        prepared: &[Arc<ServedFunction>],
    ) -> Result<Arc<ServedFunction>, SyncError> {
        let Some(traffic) = deployment.traffic.clone() else {
            return self.prepare(deployment, prepared).await;
        };
        let mut versions = Vec::with_capacity(traffic.versions.len());
        for share in traffic.versions {
            let served = if share.version == deployment.version {
                None
            } else {
                let other = Deployment {
                    name: deployment.name.clone(),
                    version: share.version,
                    sha256: share.sha256,
                    manifest: share.manifest,
                    traffic: None,
                    secrets: deployment.secrets.clone(),
                };
                Some(self.prepare(other, prepared).await?)
            };
            versions.push(crate::served::SplitShare {
                version: share.version,
                percent: share.percent,
                served,
            });
        }
        let active = self.prepare(deployment.clone(), prepared).await?;
        let mut active = active.sharing(deployment);
        active.split = Some(crate::served::ServedSplit {
            versions,
            sticky: traffic.sticky,
        });
        Ok(Arc::new(active))
    }

    /// One version: shared with what already serves it, or prepared now.
    async fn prepare(
        &self,
        deployment: Deployment,
        prepared: &[Arc<ServedFunction>],
    ) -> Result<Arc<ServedFunction>, SyncError> {
        match prepared.iter().find(|served| served.prepares(&deployment)) {
            Some(served) => Ok(Arc::new(served.sharing(deployment))),
            None => self.fetch_and_load_one(deployment).await,
        }
    }

    /// Prepares one version (its split, if any, aside).
    async fn fetch_and_load_one(&self, deployment: Deployment) -> Result<Arc<ServedFunction>, SyncError> {
        if deployment.manifest.is_origin_only() {
            // Nothing to fetch or compile: the route proxies to its origins.
            let origins = self.origin_pool(&deployment)?;
            tracing::info!(function = %deployment.name, version = deployment.version, origins = deployment.manifest.origins.len(), "origin route ready");
            let metrics = Arc::new(FunctionMetrics::new(&deployment.name, deployment.version));
            return Ok(Arc::new(ServedFunction::new(deployment, None, origins, metrics)));
        }
        let bytes = match self.cache.read_module(&deployment.sha256) {
            Some(bytes) => bytes,
            None => {
                let bytes = self.source.blob(&deployment.sha256).await?;
                if atoll_core::digest::sha256_hex(&bytes) != deployment.sha256 {
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

    /// The deployment's secrets, opened with this node's key.
    fn open_secrets(&self, deployment: &Deployment) -> Result<Vec<(String, String)>, SyncError> {
        if deployment.secrets.is_empty() {
            return Ok(Vec::new());
        }
        let refuse = |reason: String| SyncError::Load {
            name: deployment.name.clone(),
            version: deployment.version,
            reason,
        };
        let Some(key) = &self.secrets_key else {
            return Err(refuse(
                "the function has secrets and this node has no secrets key (--secrets-key-file)".into(),
            ));
        };
        deployment
            .secrets
            .iter()
            .map(|(name, sealed)| {
                key.open(&deployment.name, name, sealed)
                    .map(|value| (name.clone(), value))
                    .map_err(refuse)
            })
            .collect()
    }

    /// The deployment's origin pool, when its manifest lists origins.
    fn origin_pool(
        &self,
        deployment: &Deployment,
    ) -> Result<Option<Arc<crate::origin::OriginPool>>, SyncError> {
        if deployment.manifest.origins.is_empty() {
            return Ok(None);
        }
        let Some(outbound) = &self.outbound else {
            return Err(SyncError::Load {
                name: deployment.name.clone(),
                version: deployment.version,
                reason: "this node has no outbound client for origins".into(),
            });
        };
        let reach = if outbound.listed_internal() {
            atoll_isolate::outbound::Reach::Internal
        } else {
            atoll_isolate::outbound::Reach::Public
        };
        crate::origin::OriginPool::new(&deployment.manifest, outbound, reach, &self.own_ports)
            .map(Some)
            .map_err(|reason| SyncError::Load {
                name: deployment.name.clone(),
                version: deployment.version,
                reason,
            })
    }

    /// Compiles (or loads the cached artifact of) a deployment's module off the runtime.
    pub(super) async fn load(
        &self,
        deployment: Deployment,
        bytes: Vec<u8>,
    ) -> Result<Arc<ServedFunction>, SyncError> {
        let secrets = self.open_secrets(&deployment)?;
        let _slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the load semaphore is never closed");
        let artifacts = self.artifacts.clone();
        let sha256 = deployment.sha256.clone();
        let name = deployment.name.clone();
        let init_env: Vec<(String, String)> = deployment
            .manifest
            .env
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let ceilings = Arc::clone(&self.ceilings);
        let memory_limit = deployment
            .manifest
            .limits
            .memory_bytes()
            .min(ceilings.memory_bytes);
        let started = std::time::Instant::now();
        // Each version compiles onto, and runs on, an engine of its own: wasmer frees a
        // module's code only with its engine, so once a replaced version's last instance is
        // gone its code goes too, instead of staying on one engine for the process's life.
        let loaded = tokio::task::spawn_blocking(move || {
            let engine = artifacts.engine().scratch()?;
            artifacts
                .load_or_prepare(&engine, &sha256, &bytes, &name, &init_env, memory_limit)
                .map(|prepared| (engine, prepared))
        })
        .await;
        let (engine, prepared) = match loaded {
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
        // Each service binding is an environment variable with the URL that reaches it.
        let bindings: Vec<(String, String)> = manifest
            .services
            .iter()
            .map(|(binding, function)| {
                (
                    format!("ATOLL_SERVICE_{binding}"),
                    atoll_core::manifest::service_url(function),
                )
            })
            .chain((!manifest.origins.is_empty()).then(|| {
                (
                    "ATOLL_ORIGIN".to_string(),
                    format!("http://{}", atoll_core::origin::ORIGIN_HOST),
                )
            }))
            .collect();
        // Secrets reach requests only: the init above, whose memory is snapshotted to disk,
        // never saw them (opened before it, so a node without the key compiles nothing).
        // A secret takes the place of a manifest variable of its name.
        config.env = manifest
            .env
            .iter()
            .filter(|(key, _)| !bindings.iter().any(|(bound, _)| bound == *key))
            .filter(|(key, _)| !secrets.iter().any(|(secret, _)| secret == *key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .chain(bindings.iter().cloned())
            .chain(secrets.iter().cloned())
            .collect();
        config.max_memory_bytes = memory_limit;
        config.max_response_bytes =
            usize::try_from(manifest.limits.response_bytes().min(ceilings.response_bytes))
                .unwrap_or(usize::MAX);
        config.timeout = manifest.limits.timeout().min(ceilings.timeout);
        config.outbound = self.outbound.as_ref().map(|client| {
            Arc::new(atoll_isolate::wasi_http::OutboundAccess {
                client: Arc::clone(client),
                function: deployment.name.clone(),
                services: manifest.services.values().cloned().collect(),
                origins: !manifest.origins.is_empty(),
                service_caller: self.services.clone(),
                allowed: manifest.outbound.allowed_hosts(),
                max_requests: manifest.outbound.max_requests(),
                max_concurrent: manifest.outbound.max_concurrent(),
                max_response_bytes: manifest.outbound.max_response_bytes(),
            })
        });
        config.kv = match (&self.kv, manifest.kv.stores.is_empty()) {
            (Some(backend), false) => Some(Arc::new(atoll_isolate::wasi_kv::KvAccess {
                backend: Arc::clone(backend),
                runtime: tokio::runtime::Handle::current(),
                stores: manifest.kv.stores.clone(),
                waits: Arc::clone(&self.kv_waits),
            })),
            _ => None,
        };
        let max_concurrency = manifest.scale.max_concurrency().min(ceilings.max_concurrency);
        let scale = ScaleConfig {
            min_instances: manifest.scale.min_instances().min(max_concurrency) as usize,
            max_concurrency: max_concurrency as usize,
            max_queue: manifest.scale.max_queue().min(ceilings.max_queue) as usize,
            idle_timeout: manifest.scale.idle_timeout(),
            ..ScaleConfig::default()
        };
        let function = LoadedFunction::from_prepared(engine, prepared, config);
        let pool = InstancePool::new(function, scale);
        let function_metrics = Arc::new(FunctionMetrics::new(&deployment.name, deployment.version));
        // Reserved instances (`min_instances`) are made ready before the version is routed.
        let reserved = Arc::clone(&pool);
        if let Ok(start_times) = tokio::task::spawn_blocking(move || reserved.replenish()).await {
            for start_time in start_times {
                function_metrics.instance_started(start_time, true);
            }
        }
        let origins = self.origin_pool(&deployment)?;
        Ok(Arc::new(ServedFunction::new(
            deployment,
            Some(pool),
            origins,
            function_metrics,
        )))
    }
}

#[cfg(test)]
mod tests {
    use atoll_isolate::CgiRequest;

    use crate::sync::tests::{deployment, guest, offline_syncer};

    fn memory_mappings() -> usize {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count()
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn a_replaced_version_takes_its_code_and_memory_image_with_it() {
        // One blocking thread: a new one (its stack, maybe a malloc arena) would add
        // mappings of its own.
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap()
            .block_on(replaced_versions_take_their_code_and_memory_images_with_them());
    }

    async fn replaced_versions_take_their_code_and_memory_images_with_them() {
        let directory = tempfile::tempdir().unwrap();
        let loader = offline_syncer(directory.path()).loader;
        let wasm = guest("hello");
        let sha256 = atoll_core::digest::sha256_hex(&wasm);
        let request = CgiRequest {
            method: "GET".into(),
            raw_path: "/".into(),
            ..CgiRequest::default()
        };
        // Loads a version (compiled once, then from the artifact on disk, as after a
        // restart or a rollback), serves a request on this thread, and replaces it.
        let serve_and_replace = |version| {
            let loader = loader.clone();
            let deployment = deployment("hello", version, &sha256);
            let wasm = wasm.clone();
            let request = request.clone();
            async move {
                let served = loader.load(deployment, wasm).await.unwrap();
                let invocation = served.pool.as_ref().unwrap().function().invoke(&request).unwrap();
                assert_eq!(&invocation.response.body[..], b"hello");
            }
        };
        for version in 1..=3 {
            serve_and_replace(version).await;
        }
        let (mappings, fds) = (memory_mappings(), open_fds());
        const VERSIONS: u64 = 60;
        for version in 4..4 + VERSIONS {
            serve_and_replace(version).await;
        }
        let mapping_growth = memory_mappings().saturating_sub(mappings);
        let fd_growth = open_fds().saturating_sub(fds);
        // Code kept on one engine for every version grew by two or three mappings each.
        assert!(
            mapping_growth < 20,
            "{mapping_growth} more memory mappings after {VERSIONS} versions came and went"
        );
        // The memory images (a memfd each) go with their versions, also where a pooled
        // slot still shows one.
        assert!(
            fd_growth <= 2,
            "{fd_growth} more open fds after {VERSIONS} versions came and went"
        );
    }
}
