//! An edge node: listeners, admin, and registry sync wired together.
//!
//! Start-up order matters for static stability: the node rebuilds its table from the disk
//! cache *before* it talks to the registry, so a restart during a registry outage serves
//! immediately; then it follows the registry's watch stream in the background.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use atoll_isolate::{ArtifactCache, Engine};
use atoll_registry::RegistryClient;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::AdminService;
use crate::executor::GuestExecutor;
use crate::node_cache::NodeCache;
use crate::served::Routing;
use crate::service::EdgeService;
use crate::sync::Syncer;

/// Everything a node needs besides its sockets.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub registry_url: String,
    pub token: Option<String>,
    /// The node's name in logs and (later) cluster membership.
    pub name: String,
    pub region: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Isolate(#[from] atoll_isolate::IsolateError),
    #[error(transparent)]
    Registry(#[from] atoll_registry::ClientError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error("listener: {0}")]
    Listener(std::io::Error),
}

/// How often pools are trimmed (scale down, to zero when idle) and topped up, and the
/// instance gauges refreshed.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Scales every function's pool to its target and publishes `atoll_instances`.
async fn maintain_pools(routing: Arc<Routing>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut interval = tokio::time::interval(MAINTENANCE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = &mut shutdown => return,
        }
        for served in routing.functions() {
            let pool = Arc::clone(&served.pool);
            pool.trim();
            let name = served.name().to_string();
            let replenish = Arc::clone(&pool);
            if let Ok(start_times) = tokio::task::spawn_blocking(move || replenish.replenish()).await {
                for start_time in start_times {
                    served.metrics.instance_started(start_time, true);
                }
            }
            let (idle, busy) = pool.instances();
            ::metrics::gauge!(crate::metrics::INSTANCES, "function" => name.clone(), "state" => "idle")
                .set(idle as f64);
            ::metrics::gauge!(crate::metrics::INSTANCES, "function" => name, "state" => "busy")
                .set(busy as f64);
        }
    }
}

/// Runs a node until `shutdown` resolves: serves traffic on `listener`, admin on `admin`.
pub async fn run(
    options: NodeOptions,
    engine: Engine,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let metrics = crate::metrics::install();
    let cache = NodeCache::open(&options.data_dir).map_err(|source| NodeError::DataDir {
        path: options.data_dir.clone(),
        source,
    })?;
    let artifacts = ArtifactCache::open(cache.artifacts_dir(), engine)?;
    let routing = Routing::new();
    let client = RegistryClient::new(&options.registry_url, options.token.clone())?;
    let mut syncer = Syncer::new(client, cache, artifacts, Arc::clone(&routing));
    syncer.restore_from_disk().await?;

    let (stop_sender, stop) = watch::channel(false);
    let stopped = |mut receiver: watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };
    let sync_task = tokio::spawn(syncer.run(stop.clone()));
    let maintenance = tokio::spawn(maintain_pools(Arc::clone(&routing), stopped(stop.clone())));
    let edge = tokio::spawn(crate::server::serve(
        listener,
        EdgeService::new(Arc::clone(&routing), GuestExecutor::per_core()),
        stopped(stop.clone()),
    ));
    let admin = tokio::spawn(crate::server::serve(
        admin,
        AdminService::new(routing, metrics),
        stopped(stop.clone()),
    ));
    tracing::info!(node = %options.name, region = %options.region, registry = %options.registry_url, "node started");

    shutdown.await;
    tracing::info!("node shutting down");
    let _ = stop_sender.send(true);
    let _ = sync_task.await;
    let _ = maintenance.await;
    if let Ok(Err(error)) = edge.await {
        return Err(NodeError::Listener(error));
    }
    if let Ok(Err(error)) = admin.await {
        return Err(NodeError::Listener(error));
    }
    Ok(())
}
