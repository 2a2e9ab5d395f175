//! An edge node: listeners, admin, and registry sync wired together.
//!
//! Start-up order matters for static stability: the node rebuilds its table from the disk
//! cache *before* it talks to the registry, so a restart during a registry outage serves
//! immediately; then it follows the registry's watch stream in the background.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use atoll_control::{ControlPlane, RegistryClient};
use atoll_core::membership::{HEARTBEAT_INTERVAL, NodeAnnouncement};
use atoll_ingress::acme::{AcmeOptions, Http01Challenges};
use atoll_ingress::server::{Ingress, ServerLimits, TlsIngress};
use atoll_ingress::tls::Certificates;
use atoll_isolate::{ArtifactCache, Engine, GuestExecutor};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::AdminService;
use crate::cluster::{Cluster, ClusterOptions};
use crate::hop::ClusterKey;
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
    /// The node's name in logs, heartbeats and the cluster's member list.
    pub name: String,
    pub region: String,
    /// `--certs DIR`: PEM pairs served by SNI, reloaded when they change.
    pub certs_dir: Option<PathBuf>,
    /// Automatic certificates for routed domains.
    pub acme: Option<AcmeOptions>,
    pub limits: ServerLimits,
    /// Largest request body a function accepts (413 beyond).
    pub max_body_bytes: usize,
    /// Longest wait for the next part of a request body (408 beyond).
    pub body_timeout: Duration,
    /// QUIC handshakes in progress beyond which clients must answer a Retry (0: always).
    pub quic_retry_threshold: usize,
    /// The IP peers and DNS use to reach this node (default: the listeners' address).
    pub advertise: Option<std::net::IpAddr>,
    /// `nats://HOST:PORT`: follow JetStream and announce there instead of to a registry.
    pub nats_url: Option<String>,
    /// Regions to forward to, in order, when the node's own has none that takes work.
    pub region_fallback: Vec<String>,
    /// Home nodes per function and region.
    pub home_replicas: usize,
    /// After a shutdown signal, how long a node with peers stays up announcing that it
    /// drains (and forwarding what still reaches it) before it stops accepting: at least
    /// the DNS TTL, so clients have moved on.
    pub drain_delay: Duration,
    /// Ceilings over what functions' manifests ask for (memory, timeout, response size,
    /// concurrency, queue).
    pub ceilings: crate::sync::FunctionCeilings,
    /// Signs forwards to peers and checks theirs (`--cluster-key`); `None`: derived from
    /// `token`, which the nodes of a cluster share.
    pub cluster_key: Option<ClusterKey>,
    /// `--outbound-ca FILE`: CA certificates (PEM) functions' outbound HTTPS trusts beside
    /// the system's.
    pub outbound_ca: Option<PathBuf>,
    /// `--secrets-key-file`: opens functions' secrets; `None`: a function with secrets is
    /// not served (quarantined, saying why).
    pub secrets_key: Option<Arc<atoll_core::secrets::SecretKey>>,
    /// `--outbound-internal`: whether hosts a manifest lists by name may be internal.
    pub outbound_internal: atoll_isolate::outbound::InternalPolicy,
    /// Where functions' KV calls go when not through the registry's API: `atoll up` hands
    /// the registry's own store to its node.
    pub kv: Option<Arc<dyn atoll_isolate::wasi_kv::KvBackend>>,
    /// Ports of this process's other listeners (`atoll up`'s registry) that origins may
    /// not point at, beside the node's own.
    pub other_ports: Vec<u16>,
    /// Threads that serve the HTTP and HTTPS listeners' connections, a connection on one
    /// of them for its whole life (`atoll_ingress::workers`); 0: the node's runtime
    /// serves them. Default: one per core.
    pub connection_workers: usize,
}

impl NodeOptions {
    /// Options with the defaults for everything but where the node's state and registry are.
    pub fn new(data_dir: PathBuf, registry_url: String) -> Self {
        NodeOptions {
            data_dir,
            registry_url,
            token: None,
            name: "node".into(),
            region: "default".into(),
            certs_dir: None,
            acme: None,
            limits: ServerLimits::default(),
            max_body_bytes: crate::service::DEFAULT_MAX_BODY_BYTES,
            body_timeout: crate::service::DEFAULT_BODY_TIMEOUT,
            quic_retry_threshold: DEFAULT_QUIC_RETRY_THRESHOLD,
            advertise: None,
            nats_url: None,
            region_fallback: Vec::new(),
            home_replicas: crate::cluster::DEFAULT_HOME_REPLICAS,
            drain_delay: DEFAULT_DRAIN_DELAY,
            ceilings: crate::sync::FunctionCeilings::default(),
            cluster_key: None,
            outbound_ca: None,
            secrets_key: None,
            outbound_internal: atoll_isolate::outbound::InternalPolicy::default(),
            kv: None,
            other_ports: Vec::new(),
            connection_workers: std::thread::available_parallelism().map_or(1, |cores| cores.get()),
        }
    }
}

/// Default for [`NodeOptions::drain_delay`]: the DNS TTL `atoll dns` gives by default.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);

/// Handshakes in flight before QUIC asks new clients to validate their address.
pub const DEFAULT_QUIC_RETRY_THRESHOLD: usize = 64;

/// The node's sockets, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct NodeListeners {
    /// Cleartext HTTP/1.1 and h2c (also where HTTP-01 challenges are answered).
    pub http: Option<TcpListener>,
    /// HTTPS: TLS with HTTP/2 and HTTP/1.1 by ALPN.
    pub tls: Option<TcpListener>,
    /// HTTP/3; needs `tls` for its certificates.
    pub quic: Option<std::net::UdpSocket>,
    pub admin: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Isolate(#[from] atoll_isolate::IsolateError),
    #[error(transparent)]
    Registry(#[from] atoll_control::ClientError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("certificates: {0}")]
    Certificates(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("--outbound-ca: {0}")]
    Outbound(#[from] atoll_isolate::outbound::OutboundSetupError),
}

/// How often pools are trimmed (scale down, to zero when idle) and topped up, and the
/// instance gauges refreshed.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Scales every function's pool to its target and publishes `atoll_instances`. Each pool's
/// pass runs on its own blocking thread and is not awaited: a function whose instances are
/// slow to make (a `(start)` function running to its timeout) delays only its own upkeep,
/// and [`InstancePool::maintain`](atoll_isolate::InstancePool::maintain) skips a pool whose
/// previous pass is still running.
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
            // Every version a traffic split holds has a pool of its own to trim.
            let pools: Vec<_> = served
                .with_split_versions()
                .filter_map(|version| Some((version.pool.clone()?, Arc::clone(&version.metrics))))
                .collect();
            if pools.is_empty() {
                continue;
            }
            let name = served.name().to_string();
            tokio::task::spawn_blocking(move || {
                let (mut idle, mut busy) = (0, 0);
                for (pool, metrics) in pools {
                    if let Some(start_times) = pool.maintain() {
                        for start_time in start_times {
                            metrics.instance_started(start_time, true);
                        }
                    }
                    let (version_idle, version_busy) = pool.instances();
                    idle += version_idle;
                    busy += version_busy;
                }
                ::metrics::gauge!(crate::metrics::INSTANCES, "function" => name.clone(), "state" => "idle")
                    .set(idle as f64);
                ::metrics::gauge!(crate::metrics::INSTANCES, "function" => name, "state" => "busy")
                    .set(busy as f64);
            });
        }
    }
}

/// Announces this node every heartbeat interval (and at once when it starts or stops
/// draining) until `shutdown`, and learns its peers from the answer. A control plane that
/// cannot be reached costs nothing but a debug line: serving never depends on it (static
/// stability), and the cluster view goes stale, which makes the node serve everything
/// itself.
async fn heartbeat(
    control: Arc<ControlPlane>,
    template: NodeAnnouncement,
    service: Arc<EdgeService>,
    routing: Arc<Routing>,
    cluster: Arc<Cluster>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = cluster.changed() => {}
            () = &mut shutdown => return,
        }
        // Idle instances, ready to take a request without a cold start.
        let free_capacity = routing
            .functions()
            .iter()
            .flat_map(|served| {
                served
                    .with_split_versions()
                    .filter_map(|version| version.pool.as_ref())
            })
            .map(|pool| pool.instances().0 as u64)
            .sum();
        let sync = routing.sync_status();
        let announcement = NodeAnnouncement {
            in_flight: service.in_flight(),
            free_capacity,
            draining: cluster.is_draining(),
            sync_lag: sync.lag(),
            quarantined: sync.quarantined.len() as u32,
            ..template.clone()
        };
        let delivery = tokio::time::timeout(HEARTBEAT_INTERVAL * 2, control.announce(&announcement)).await;
        match delivery {
            Ok(Ok(members)) => cluster.learn(&members),
            Ok(Err(error)) => tracing::debug!(%error, "heartbeat not delivered"),
            Err(_) => tracing::debug!("heartbeat timed out"),
        }
    }
}

/// Refuses an `--acme-ca-cert` that is not a readable PEM certificate at start-up, instead
/// of failing every ACME attempt later.
fn check_ca_certificate(path: &std::path::Path) -> Result<(), NodeError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let invalid =
        |message: String| NodeError::Config(format!("--acme-ca-cert {}: {message}", path.display()));
    let pem = std::fs::read(path).map_err(|error| invalid(error.to_string()))?;
    let certificates: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|error| invalid(error.to_string()))?;
    if certificates.is_empty() {
        return Err(invalid("no CERTIFICATE block".into()));
    }
    Ok(())
}

/// Runs a node until `shutdown` resolves: serves traffic on the listeners, admin on `admin`.
pub async fn run(
    options: NodeOptions,
    engine: Engine,
    listeners: NodeListeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    if listeners.http.is_none() && listeners.tls.is_none() {
        return Err(NodeError::Config(
            "the node needs an HTTP or a TLS listener".into(),
        ));
    }
    if listeners.quic.is_some() && listeners.tls.is_none() {
        return Err(NodeError::Config(
            "HTTP/3 needs the TLS listener's certificates".into(),
        ));
    }
    if listeners.tls.is_some() && options.certs_dir.is_none() && options.acme.is_none() {
        return Err(NodeError::Config(
            "TLS needs certificates: give --certs DIR or --acme-directory URL".into(),
        ));
    }
    if let Some(path) = options.acme.as_ref().and_then(|acme| acme.ca_cert.as_ref()) {
        check_ca_certificate(path)?;
    }
    let metrics = crate::metrics::install();
    let certificates = Certificates::new();
    if let Some(dir) = &options.certs_dir {
        match certificates.load_dir(dir) {
            Ok(count) => tracing::info!(dir = %dir.display(), certificates = count, "certificates loaded"),
            Err(errors) => {
                let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
                return Err(NodeError::Certificates(messages.join("; ")));
            }
        }
    }
    let cache = NodeCache::open(&options.data_dir).map_err(|source| NodeError::DataDir {
        path: options.data_dir.clone(),
        source,
    })?;
    let artifacts = ArtifactCache::open(cache.artifacts_dir(), engine)?;
    let routing = Routing::new();
    // Following NATS, the node connects lazily: it starts (from its disk cache) while NATS
    // is down. Sync and heartbeats share the one NATS connection; with a registry, each
    // has its own client (and connections), so a stalled watch never holds up heartbeats.
    let registry = || RegistryClient::new(&options.registry_url, options.token.clone());
    let control = Arc::new(match &options.nats_url {
        Some(url) => ControlPlane::nats(url.clone()),
        None => ControlPlane::Registry(registry()?),
    });
    let heartbeats = match options.nats_url {
        Some(_) => Arc::clone(&control),
        None => Arc::new(ControlPlane::Registry(registry()?)),
    };
    let outbound = atoll_isolate::outbound::OutboundClient::with_policy(
        options.outbound_ca.as_deref(),
        options.outbound_internal,
        atoll_isolate::outbound::DEFAULT_MAX_WAITS,
    )?;
    tracing::debug!(
        trusted_roots = outbound.trusted_roots(),
        "outbound HTTP client ready"
    );
    let executor = GuestExecutor::per_core();
    let services = crate::services::LocalServices::new(Arc::clone(&routing), Arc::clone(&executor));
    let mut syncer = Syncer::new(Arc::clone(&control), cache, artifacts, Arc::clone(&routing))
        .with_ceilings(options.ceilings.clone())
        .with_secrets_key(options.secrets_key.clone())
        .with_outbound(outbound, services)
        .with_own_ports({
            let mut ports = options.other_ports.clone();
            for listener in [&listeners.http, &listeners.tls].into_iter().flatten() {
                ports.extend(listener.local_addr().ok().map(|address| address.port()));
            }
            ports.extend(listeners.admin.local_addr().ok().map(|address| address.port()));
            ports
        })
        .with_kv(match (&options.kv, control.as_ref()) {
            (Some(kv), _) => Arc::clone(kv),
            // The stores are NATS buckets, read through a cache the buckets' watches keep.
            (None, ControlPlane::Nats(nats)) => Arc::new(atoll_control::nats_kv::NatsKv::new(
                Arc::clone(nats),
                Some(atoll_control::nats_kv::DEFAULT_CACHE_BYTES),
            )),
            (None, ControlPlane::Registry(_)) => Arc::new(crate::kv::RegistryKv::new(registry()?)),
        });
    syncer.restore_from_disk().await?;

    let (stop_sender, stop) = watch::channel(false);
    let stopped = |mut receiver: watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };
    let limits = Arc::new(options.limits.clone());
    let key = options
        .cluster_key
        .clone()
        .or_else(|| options.token.as_deref().map(ClusterKey::from_token));
    if key.is_none() {
        tracing::warn!(
            "no cluster key (--cluster-key) and no token to derive one from: forwards are unsigned, \
             so peers will not believe the client addresses they carry"
        );
    }
    let cluster = Cluster::new(ClusterOptions {
        name: options.name.clone(),
        region: options.region.clone(),
        region_fallback: options.region_fallback.clone(),
        home_replicas: options.home_replicas,
        source_ip: listeners
            .http
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
            .map(|address| address.ip())
            .filter(|ip| !ip.is_unspecified()),
        key,
    });
    let http01 = Http01Challenges::new();
    let service = EdgeService::with_options(
        Arc::clone(&routing),
        Arc::clone(&executor),
        options.max_body_bytes,
        options.body_timeout,
        Some(Arc::clone(&http01)),
        Some(Arc::clone(&cluster)),
    );
    let advertised = |listener: &Option<TcpListener>| -> Result<Option<std::net::SocketAddr>, NodeError> {
        let Some(listener) = listener else { return Ok(None) };
        let mut address = listener.local_addr().map_err(NodeError::Listener)?;
        match options.advertise {
            Some(ip) => address.set_ip(ip),
            // Nobody can reach 0.0.0.0: announce no address rather than a wrong one.
            None if address.ip().is_unspecified() => {
                tracing::warn!(%address, "listening on every interface without --advertise: peers and DNS will not send traffic here");
                return Ok(None);
            }
            None => {}
        }
        Ok(Some(address))
    };
    let announcement = NodeAnnouncement {
        name: options.name.clone(),
        region: options.region.clone(),
        http: advertised(&listeners.http)?,
        https: advertised(&listeners.tls)?,
        in_flight: 0,
        free_capacity: 0,
        draining: false,
        sync_lag: 0,
        quarantined: 0,
    };
    let mut tasks = Vec::new();
    let mut servers = Vec::new();
    tasks.push(tokio::spawn(heartbeat(
        heartbeats,
        announcement,
        Arc::clone(&service),
        Arc::clone(&routing),
        Arc::clone(&cluster),
        stopped(stop.clone()),
    )));
    tasks.push(tokio::spawn(syncer.run(stop.clone())));
    tasks.push(tokio::spawn(
        crate::cron::CronScheduler::new(
            Arc::clone(&routing),
            Arc::clone(&executor),
            Arc::clone(&control),
            Arc::clone(&cluster),
        )
        .run(stopped(stop.clone())),
    ));
    tasks.push(tokio::spawn(maintain_pools(
        Arc::clone(&routing),
        stopped(stop.clone()),
    )));
    if let Some(dir) = options.certs_dir.clone() {
        tasks.push(tokio::spawn(
            Arc::clone(&certificates).watch_dir(dir, stopped(stop.clone())),
        ));
    }
    if let Some(acme) = options.acme.clone() {
        let routing = Arc::clone(&routing);
        tasks.push(tokio::spawn(atoll_ingress::acme::run(
            acme,
            Arc::clone(&certificates),
            Arc::clone(&http01),
            move || routing.exact_hosts(),
            stopped(stop.clone()),
        )));
    }
    let alt_svc = match &listeners.quic {
        Some(socket) => {
            let port = socket.local_addr().map_err(NodeError::Listener)?.port();
            Some(http::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")).expect("valid header"))
        }
        None => None,
    };
    let tls = match listeners.tls {
        Some(listener) => {
            let tls = TlsIngress {
                config: atoll_ingress::tls::tcp_server_config(Arc::clone(&certificates))?,
                certificates: Arc::clone(&certificates),
            };
            Some((listener, tls))
        }
        None => None,
    };
    // Cleartext, then TLS (which announces HTTP/3); the same service behind both.
    let tcp_listeners = listeners
        .http
        .map(|listener| (listener, None, None))
        .into_iter()
        .chain(tls.map(|(listener, tls)| (listener, Some(tls), alt_svc)));
    let workers = match options.connection_workers {
        0 => None,
        count => Some(
            atoll_ingress::workers::ConnectionWorkers::start(count, "edge").map_err(NodeError::Listener)?,
        ),
    };
    for (listener, tls, alt_svc) in tcp_listeners {
        let ingress = Ingress {
            tls,
            alt_svc,
            limits: Arc::clone(&limits),
            workers: workers.clone(),
        };
        servers.push(tokio::spawn(atoll_ingress::server::serve_with(
            listener,
            Arc::clone(&service),
            ingress,
            stopped(stop.clone()),
        )));
    }
    if let Some(socket) = listeners.quic {
        let settings = atoll_ingress::quic::QuicSettings {
            retry_threshold: options.quic_retry_threshold,
            limits: Arc::clone(&limits),
        };
        servers.push(tokio::spawn(atoll_ingress::quic::serve_quic(
            socket,
            Arc::clone(&certificates),
            Arc::clone(&service),
            settings,
            stopped(stop.clone()),
        )));
    }
    // The admin listener gets the edge's limits on connections (header and idle timeouts,
    // its own cap), so idle or half-sent connections cannot lock out probes and drains.
    servers.push(tokio::spawn(atoll_ingress::server::serve_with(
        listeners.admin,
        AdminService::new(
            routing,
            metrics,
            Arc::clone(&cluster),
            options.token.clone(),
            Some(Box::new({
                let service = Arc::clone(&service);
                move || service.refresh_metrics()
            })),
        ),
        Ingress {
            limits: Arc::clone(&limits),
            ..Ingress::default()
        },
        stopped(stop.clone()),
    )));
    match &options.nats_url {
        Some(nats) => {
            let nats = atoll_control::nats::redact_credentials(nats);
            tracing::info!(node = %options.name, region = %options.region, %nats, "node started")
        }
        None => {
            tracing::info!(node = %options.name, region = %options.region, registry = %options.registry_url, "node started")
        }
    }

    shutdown.await;
    // Out of rotation first: peers and DNS hear it with the heartbeat sent now, and what
    // still arrives meanwhile is forwarded to them.
    cluster.set_draining(true);
    if cluster.has_peers_taking_work() && !options.drain_delay.is_zero() {
        tracing::info!(delay = ?options.drain_delay, "draining before shutdown");
        tokio::time::sleep(options.drain_delay).await;
    }
    tracing::info!("node shutting down");
    let _ = stop_sender.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let mut result = Ok(());
    for server in servers {
        if let Ok(Err(error)) = server.await {
            result = Err(NodeError::Listener(error));
        }
    }
    result
}
