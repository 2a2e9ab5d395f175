//! The registry's HTTP/JSON API (axum), and [`Registry`], the service behind it.
//!
//! [`Registry`] holds what a push needs — the store (embedded or NATS, see
//! [`crate::backend`]), the check that proves every node could serve a module (an injected
//! `atoll_core::ModuleCheck`), the
//! root token, the limits — and is usable without HTTP. The handlers here only translate:
//! multipart or JSON in, a [`Registry`] or [`Backend`] call, JSON out, and every error as `{"error": "<one line>"}` with the status its kind
//! calls for (400 bad input, 401 no or unknown token, 403 not this token's to do, 404,
//! 409 conflict, 413 too big, 422 module refused).
//!
//! ```text
//!                                        scopes (see atoll_core::auth)
//! GET    /healthz                        -                 "ok" (no auth)
//! POST   /v1/functions[?no_traffic=true] admin deploy      multipart: manifest, module
//! GET    /v1/functions                   admin deploy node [FunctionSummary]
//! GET    /v1/functions/{name}/versions   admin deploy      VersionsResponse
//! POST   /v1/functions/{name}/rollback   admin deploy      {"to": N} or {} → RollbackResponse
//! POST   /v1/functions/{name}/traffic    admin deploy      TrafficRequest → TrafficResponse
//! GET    /v1/functions/{name}/secrets    admin deploy      SecretsResponse (names only)
//! PUT    /v1/functions/{name}/secrets/{key} admin deploy   the value → 204 (sealed at once)
//! DELETE /v1/functions/{name}/secrets/{key} admin deploy   204, or 404
//! GET    /v1/blobs/{sha256}              admin node        module bytes (application/wasm)
//! GET    /v1/watch?since=N               admin node        NDJSON WatchEvents (atoll_core::watch)
//! GET    /v1/nodes                       admin deploy node [MemberStatus]
//! PUT    /v1/nodes/{name}                admin node        a heartbeat → [MemberStatus]
//! POST   /v1/tokens                      admin             Grant → CreatedToken
//! GET    /v1/tokens                      admin             [TokenInfo]
//! DELETE /v1/tokens/{id}                 admin             204
//! GET    /v1/cron/{name}                 admin deploy      the last cron runs (atoll cron NAME)
//! POST   /v1/cron/{name}                 admin node        claim a tick: 201, or 409 if taken
//! PUT    /v1/cron/{name}                 admin node        a claimed run's outcome: 204
//! GET    /v1/kv/{store}?prefix&cursor&limit admin deploy node KeyPage (atoll_core::kv)
//! GET    /v1/kv/{store}/{key}            admin deploy node value bytes, `atoll-kv-revision`
//! PUT    /v1/kv/{store}/{key}?ttl&if_revision  …          value bytes → KvWritten (409 lost CAS)
//! POST   /v1/kv/{store}/{key}?increment=N      …          KvWritten with the new value
//! DELETE /v1/kv/{store}/{key}            admin deploy node 204, or 404
//! ```
//!
//! KV is served from the registry's store: the embedded one (`kv.rs`, beside the functions'
//! state), or one NATS bucket per store (`atoll_control::nats_kv`). A deploy token reaches the stores its
//! function patterns cover; a node token every store (nodes act for their functions).
//!
//! [`required_scopes`] is that column: checked for every request before its handler runs,
//! admin-only for any route it does not list. A deploy token's functions and domains and a
//! node token's name are checked by the handlers, which know the function and the routes.
//!
//! Two details worth knowing:
//!
//! * Oversized uploads. An early answer (401, 413) to a request whose body is still
//!   arriving would close the connection with unread data, and the kernel then resets it —
//!   the client sees "connection reset" instead of our JSON. So the outermost layer keeps a
//!   handle on the request body and, after the handler answers, reads and discards what is
//!   left (bounded in bytes and time) before the response goes out.
//! * Graceful shutdown. Watch streams never end by themselves, so [`serve`] turns its
//!   shutdown future into a signal that ends them; only then can the graceful shutdown
//!   finish.
//! * Connections. [`serve_with`] serves with the edge's header and idle timeouts and a
//!   connection cap ([`crate::connections`]), so idle or half-sent connections cannot use
//!   up the process's file descriptors; a watch stream counts as a request in flight for
//!   as long as it streams, so it is never closed as idle.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::extract::{
    DefaultBodyLimit, Extension, MatchedPath, Multipart, Path as UrlPath, Query, Request, State,
};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};

use atoll_core::membership::{MemberStatus, NodeAnnouncement};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use crate::backend::Backend;
use crate::connections::ConnectionLimits;
use crate::store::Store;
use atoll_control::watch::{ChangeWatch, WatchEnd, WhenIdle};
use atoll_core::StoreError;
use atoll_core::api_types::{
    ErrorResponse, FunctionSummary, PushResponse, RollbackRequest, RollbackResponse, SecretsResponse,
    TrafficRequest, TrafficResponse, VersionsResponse,
};
use atoll_core::auth::token_matches;
use atoll_core::auth::{Caller, CreatedToken, Credential, Forbidden, Grant, Scope, TokenInfo};
use atoll_core::cron::CronRun;
use atoll_core::digest::is_sha256_hex;
use atoll_core::manifest::{Manifest, ManifestError};
use atoll_core::model::{FunctionRecord, Version};
use atoll_core::rules::rollback_target;
use atoll_core::{ModuleCheck, ModuleRefusal};

/// Default largest module: 64 MiB.
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 64 << 20;
/// Slack over the module limit for the rest of a push body (the manifest, multipart framing).
const BODY_SLACK: u64 = 1 << 20;
/// How long to keep discarding an unread request body after answering early.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Tunables of a [`Registry`].
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Largest module accepted by a push. Default 64 MiB.
    pub max_module_bytes: u64,
    /// Idle time after which a watch stream sends a heartbeat. Default 5 s.
    pub heartbeat: Duration,
    /// Seals functions' secrets (`--secrets-key-file`); `None` refuses to store any.
    pub secrets_key: Option<Arc<atoll_core::secrets::SecretKey>>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
            heartbeat: Duration::from_secs(5),
            secrets_key: None,
        }
    }
}

/// The registry service: store + module check + token + options.
pub struct Registry {
    store: Backend,
    check: Arc<dyn ModuleCheck>,
    token: String,
    options: RegistryOptions,
    /// Functions' key-value stores: the embedded store's, or NATS buckets.
    kv: Option<Arc<dyn atoll_core::kv::KvBackend>>,
    /// What removes expired keys in the background.
    kv_sweep: Option<KvSweep>,
    /// Cron claims and runs, on the embedded store (on NATS they are in a bucket).
    cron: crate::cron::CronBook,
}

/// The store whose expired keys the registry sweeps.
#[derive(Clone)]
enum KvSweep {
    Embedded(Arc<crate::kv::KvStore>),
    Nats(atoll_control::nats_kv::NatsKv),
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Registry")
            .field("store", &self.store)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why a push (or another registry call) was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The manifest does not parse or breaks a rule (400).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The module part is empty (400).
    #[error("module is empty")]
    EmptyModule,
    /// The module is over `max_module_bytes` (413).
    #[error("module is {size} bytes, over the {} limit", human_bytes(*limit))]
    TooLarge {
        /// The module's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The engine refused the module (422).
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// The engine failed for another reason (500).
    #[error("engine: {0}")]
    Engine(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller's token does not allow it (403).
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    /// A token to mint is malformed (400).
    #[error("invalid token request: {0}")]
    InvalidGrant(String),
}

impl RegistryError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            RegistryError::Manifest(_) | RegistryError::EmptyModule => StatusCode::BAD_REQUEST,
            RegistryError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::InvalidModule(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RegistryError::Store(e) => store_status(e),
            RegistryError::Forbidden(_) => StatusCode::FORBIDDEN,
            RegistryError::InvalidGrant(_) => StatusCode::BAD_REQUEST,
        }
    }
}

fn store_status(error: &StoreError) -> StatusCode {
    match error {
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Conflict(_) => StatusCode::CONFLICT,
        StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
        StoreError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        StoreError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl Registry {
    /// Opens the embedded store in `data_dir` and assembles the service.
    pub fn open(
        data_dir: &Path,
        check: Arc<dyn ModuleCheck>,
        token: String,
        options: RegistryOptions,
    ) -> Result<Registry, StoreError> {
        let kv = crate::kv::KvStore::open(data_dir).map_err(|error| StoreError::Io {
            context: format!("opening {}", data_dir.join(crate::kv::KV_FILE).display()),
            source: io::Error::other(error.to_string()),
        })?;
        let mut registry =
            Registry::with_backend(Backend::Embedded(Store::open(data_dir)?), check, token, options);
        let kv = Arc::new(kv);
        registry.kv = Some(Arc::new(crate::kv::EmbeddedKv(Arc::clone(&kv))));
        registry.kv_sweep = Some(KvSweep::Embedded(kv));
        Ok(registry)
    }

    /// The key-value stores, where this registry has them (a node in the same process
    /// calls them directly).
    pub fn kv(&self) -> Option<Arc<dyn atoll_core::kv::KvBackend>> {
        self.kv.clone()
    }

    /// Assembles the service on an opened store (embedded or NATS).
    pub fn with_backend(
        store: Backend,
        check: Arc<dyn ModuleCheck>,
        token: String,
        options: RegistryOptions,
    ) -> Registry {
        // On NATS the stores are buckets beside the functions' (no cache: the registry
        // answers operators, who expect to read what was just written anywhere).
        let nats_kv = match &store {
            Backend::Nats(nats) => Some(atoll_control::nats_kv::NatsKv::new(
                Arc::new(atoll_control::LazyNatsStore::connected(nats.clone())),
                None,
            )),
            Backend::Embedded(_) => None,
        };
        Registry {
            store,
            check,
            token,
            options,
            kv: nats_kv
                .clone()
                .map(|kv| Arc::new(kv) as Arc<dyn atoll_core::kv::KvBackend>),
            kv_sweep: nats_kv.map(KvSweep::Nats),
            cron: crate::cron::CronBook::default(),
        }
    }

    /// Records a node's heartbeat.
    pub async fn announce(&self, announcement: NodeAnnouncement) -> Result<(), StoreError> {
        self.store.announce(announcement).await
    }

    /// Every node heard from recently, with its health.
    pub fn members(&self) -> Vec<MemberStatus> {
        self.store.members()
    }

    /// The store (for reads, rollback, watch).
    pub fn store(&self) -> &Backend {
        &self.store
    }

    /// The options it runs with.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Who `presented` is: the root token, a minted token whose hash matches (compared in
    /// constant time), or `None` for anything else.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Caller>, StoreError> {
        if token_matches(&self.token, presented) {
            return Ok(Some(Caller::Root));
        }
        let Some(id) = atoll_core::auth::token_id(presented) else {
            return Ok(None);
        };
        Ok(self
            .store
            .credential(id)
            .await?
            .filter(|credential| credential.verifies(presented))
            .map(Caller::Token))
    }

    /// Mints a token for `grant` (see [`atoll_core::auth`]); the answer holds the only copy of
    /// the token, the store only its hash.
    pub async fn mint(&self, grant: Grant) -> Result<CreatedToken, RegistryError> {
        grant.validate().map_err(RegistryError::InvalidGrant)?;
        let (credential, token) =
            Credential::mint(grant).map_err(|e| RegistryError::Engine(format!("minting a token: {e}")))?;
        let info = credential.info();
        self.store.add_credential(credential).await?;
        tracing::info!("minted token {} ({})", info.id, info.grant.summary());
        Ok(CreatedToken { token, info })
    }

    /// Every minted token (without hashes).
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, RegistryError> {
        Ok(self
            .store
            .credentials()
            .await?
            .iter()
            .map(Credential::info)
            .collect())
    }

    /// Revokes the token with this id: it stops working at once.
    pub async fn revoke(&self, id: &str) -> Result<(), RegistryError> {
        if !atoll_core::auth::is_credential_id(id) {
            return Err(StoreError::NotFound(format!("no token with id {id:?}")).into());
        }
        self.store.remove_credential(id).await?;
        tracing::info!("revoked token {id}");
        Ok(())
    }

    /// [`Registry::push_as`] with the root token's rights.
    pub async fn push(&self, manifest_text: &str, module: Vec<u8>) -> Result<Version, RegistryError> {
        self.push_as(&Caller::Root, manifest_text, module).await
    }

    /// Validates everything — manifest, the caller's right to it (its name and routes),
    /// size, module (compiled on a blocking thread), routes no other function holds — and
    /// stores a new active version. Nothing is stored on any error.
    pub async fn push_as(
        &self,
        caller: &Caller,
        manifest_text: &str,
        module: Vec<u8>,
    ) -> Result<Version, RegistryError> {
        self.push_with_traffic(caller, manifest_text, module, true).await
    }

    /// [`Registry::push_as`]; without `takes_traffic` the new version joins the function's
    /// traffic split at 0% instead of becoming active (`atoll push --no-traffic`).
    pub async fn push_with_traffic(
        &self,
        caller: &Caller,
        manifest_text: &str,
        module: Vec<u8>,
        takes_traffic: bool,
    ) -> Result<Version, RegistryError> {
        let manifest = Manifest::parse(manifest_text)?;
        caller.require_manifest(&manifest, "push")?;
        if manifest.is_origin_only() {
            // A route to origins: nothing to compile; its "module" is the empty blob.
            if !module.is_empty() {
                return Err(RegistryError::Manifest(ManifestError::Invalid(
                    "this manifest has no `wasm` (it proxies to `origins`), but a module was sent".into(),
                )));
            }
            let name = manifest.name.clone();
            let version = self.store.push(manifest, module, takes_traffic).await?;
            tracing::info!("pushed {name} v{} (origins only)", version.version);
            return Ok(version);
        }
        if module.is_empty() {
            return Err(RegistryError::EmptyModule);
        }
        let limit = self.options.max_module_bytes;
        if module.len() as u64 > limit {
            return Err(RegistryError::TooLarge {
                size: module.len() as u64,
                limit,
            });
        }
        // The check compiles the module and runs its init exactly as nodes will prepare it
        // (on a blocking thread): refuse now what no node could serve.
        let check = Arc::clone(&self.check);
        let (manifest, module, checked) = tokio::task::spawn_blocking(move || {
            let checked = check.check(&module, &manifest);
            (manifest, module, checked)
        })
        .await
        .map_err(|e| RegistryError::Engine(e.to_string()))?;
        match checked {
            Ok(()) => {}
            Err(ModuleRefusal::Invalid(reason)) => return Err(RegistryError::InvalidModule(reason)),
            Err(ModuleRefusal::Failed(reason)) => return Err(RegistryError::Engine(reason)),
        }
        let name = manifest.name.clone();
        let version = self.store.push(manifest, module, takes_traffic).await?;
        tracing::info!(
            "pushed {name} v{} sha256:{} ({} bytes)",
            version.version,
            version.sha256,
            version.size
        );
        Ok(version)
    }

    /// [`Registry::rollback_as`] with the root token's rights.
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> Result<FunctionRecord, RegistryError> {
        self.rollback_as(&Caller::Root, name, to).await
    }

    /// Moves `name`'s active pointer (see [`Store::rollback`]; the NATS store does the
    /// same). A deploy token may do it only for its functions, and only to a version whose
    /// routes are all on its domains.
    pub async fn rollback_as(
        &self,
        caller: &Caller,
        name: &str,
        to: Option<u64>,
    ) -> Result<FunctionRecord, RegistryError> {
        caller.require_function(name, "roll back")?;
        let mut to = to;
        if caller.scope() != Scope::Admin {
            let record = self
                .store
                .get(name)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("no function `{name}`")))?;
            let target = rollback_target(&record, to)?;
            caller.require_manifest(&target.manifest, &format!("roll back to v{}", target.version))?;
            // Versions never change: the store activates exactly the version checked here.
            to = Some(target.version);
        }
        let record = self.store.rollback(name, to).await?;
        let sha = record
            .active_version()
            .map(|v| v.sha256.as_str())
            .unwrap_or_default();
        tracing::info!("rolled back {name} to v{} sha256:{sha}", record.active);
        Ok(record)
    }
}

impl Registry {
    /// Sets function `name`'s secret `key` to `value`, sealed with the registry's key
    /// (nothing stores, logs or answers the value in clear); whether it replaced one.
    async fn set_secret_as(
        &self,
        caller: &Caller,
        name: &str,
        key: &str,
        value: &[u8],
    ) -> Result<bool, ApiError> {
        caller
            .require_function(name, "set secrets of")
            .map_err(RegistryError::from)?;
        atoll_core::secrets::check(key, value).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
        let Some(sealer) = &self.options.secrets_key else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "this registry has no secrets key (start it with --secrets-key-file)",
            ));
        };
        let sealed = sealer
            .seal(name, key, value)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let replaced = self.store.set_secret(name, key, Some(sealed)).await?;
        tracing::info!(
            "secret {key} of {name} {}",
            if replaced { "replaced" } else { "set" }
        );
        Ok(replaced)
    }

    /// Removes function `name`'s secret `key` (404 when it has none of that name).
    async fn remove_secret_as(&self, caller: &Caller, name: &str, key: &str) -> Result<(), ApiError> {
        caller
            .require_function(name, "remove secrets of")
            .map_err(RegistryError::from)?;
        if !self.store.set_secret(name, key, None).await? {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("function `{name}` has no secret {key}"),
            ));
        }
        tracing::info!("secret {key} of {name} removed");
        Ok(())
    }

    /// Shares `name`'s requests between its versions (see
    /// [`atoll_core::rules::plan_traffic`]). A deploy token may do it only for its
    /// functions, and only with versions whose routes are all on its domains.
    pub async fn set_traffic_as(
        &self,
        caller: &Caller,
        name: &str,
        split: atoll_core::traffic::TrafficSplit,
    ) -> Result<FunctionRecord, RegistryError> {
        caller.require_function(name, "change the traffic of")?;
        if caller.scope() != Scope::Admin {
            let record = self
                .store
                .get(name)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("no function `{name}`")))?;
            for share in &split.shares {
                if let Some(version) = record.version(share.version) {
                    caller.require_manifest(
                        &version.manifest,
                        &format!("send traffic to v{}", share.version),
                    )?;
                }
            }
        }
        let record = self.store.set_traffic(name, split).await?;
        match &record.traffic {
            Some(split) => {
                let shares: Vec<String> = split
                    .shares
                    .iter()
                    .map(|share| format!("v{}={}%", share.version, share.percent))
                    .collect();
                tracing::info!("traffic of {name}: {}", shares.join(" "));
            }
            None => tracing::info!("traffic of {name}: all to v{}", record.active),
        }
        Ok(record)
    }
}

/// Serves the API on `listener` with the default [`ConnectionLimits`] until `shutdown`
/// completes, then ends watch streams and lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with(listener, state, ConnectionLimits::default(), shutdown).await
}

/// [`serve`] with `limits` on connections: header and idle timeouts, a connection cap
/// (see [`crate::connections`]).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<Registry>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop, stopped) = watch::channel(false);
    if let Some(kv) = state.kv_sweep.clone() {
        tokio::spawn(sweep_expired(kv, stopped.clone()));
    }
    let app = router(state, stopped);
    crate::connections::serve_router(listener, app, limits, async move {
        shutdown.await;
        stop.send_replace(true);
    })
    .await
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    /// Turns `true` when the server shuts down; watch streams end then.
    stopped: watch::Receiver<bool>,
}

/// The API as an axum router (what [`serve`] serves). Watch streams end when `stopped`
/// turns `true` or its sender is dropped.
pub fn router(registry: Arc<Registry>, stopped: watch::Receiver<bool>) -> Router {
    let body_limit = registry.options.max_module_bytes.saturating_add(BODY_SLACK);
    let state = AppState { registry, stopped };
    let v1 = Router::new()
        .route("/v1/functions", post(push).get(list))
        .route("/v1/functions/{name}/versions", get(versions))
        .route("/v1/functions/{name}/rollback", post(rollback))
        .route("/v1/functions/{name}/traffic", post(traffic))
        .route("/v1/functions/{name}/secrets", get(list_secrets))
        .route(
            "/v1/functions/{name}/secrets/{key}",
            put(set_secret)
                .delete(remove_secret)
                // A secret is at most 64 KiB: no module-sized bodies here.
                .layer(DefaultBodyLimit::max(
                    atoll_core::secrets::MAX_SECRET_BYTES + 4096,
                )),
        )
        .route("/v1/blobs/{sha256}", get(blob))
        .route("/v1/watch", get(watch_events))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", put(announce_node))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route(
            "/v1/cron/{name}",
            get(cron_runs).post(cron_claim).put(cron_finish),
        )
        .route("/v1/kv/{store}", get(kv_list))
        .route(
            "/v1/kv/{store}/{key}",
            get(kv_get)
                .put(kv_put)
                .post(kv_increment)
                .delete(kv_delete)
                // A value is at most 1 MiB: no module-sized bodies here.
                .layer(DefaultBodyLimit::max(atoll_core::kv::MAX_VALUE_BYTES + 4096)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(DefaultBodyLimit::max(
            usize::try_from(body_limit).unwrap_or(usize::MAX),
        ))
        .layer(middleware::from_fn_with_state(body_limit, drain_unread_body))
        .with_state(state)
}

/// An error answer: status + `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// A KV key's current revision, on a lost compare-and-set (`atoll-kv-revision`).
    kv_revision: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kv_revision: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        }
        let mut response = (self.status, axum::Json(ErrorResponse { error: self.message })).into_response();
        if let Some(revision) = self.kv_revision {
            response
                .headers_mut()
                .insert(KV_REVISION_HEADER, HeaderValue::from(revision));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        ApiError::new(e.status(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::new(store_status(&e), e.to_string())
    }
}

/// `64 MiB`, `1 KiB`, `1000 bytes`.
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// The scopes that may call `method` on the route `path` (as registered, `{name}` and
/// all): the table in the module docs. Anything not listed is for admins only, so a route
/// added without a line here is closed rather than open.
pub fn required_scopes(method: &Method, path: &str) -> &'static [Scope] {
    use Scope::{Admin, Deploy, Node};
    // axum answers HEAD with the GET handler: the same rights.
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    match (method, path) {
        ("POST", "/v1/functions") => &[Admin, Deploy],
        ("GET", "/v1/functions") => &[Admin, Deploy, Node],
        ("GET", "/v1/functions/{name}/versions") => &[Admin, Deploy],
        ("POST", "/v1/functions/{name}/rollback") => &[Admin, Deploy],
        ("POST", "/v1/functions/{name}/traffic") => &[Admin, Deploy],
        ("GET", "/v1/functions/{name}/secrets") => &[Admin, Deploy],
        ("PUT" | "DELETE", "/v1/functions/{name}/secrets/{key}") => &[Admin, Deploy],
        ("GET", "/v1/blobs/{sha256}") => &[Admin, Node],
        ("GET", "/v1/watch") => &[Admin, Node],
        ("GET", "/v1/nodes") => &[Admin, Deploy, Node],
        ("PUT", "/v1/nodes/{name}") => &[Admin, Node],
        (_, "/v1/kv/{store}" | "/v1/kv/{store}/{key}") => &[Admin, Deploy, Node],
        ("GET", "/v1/cron/{name}") => &[Admin, Deploy],
        ("POST" | "PUT", "/v1/cron/{name}") => &[Admin, Node],
        _ => &[Admin],
    }
}

/// 401 without a known token; 403 when its scope may not call this endpoint; otherwise
/// the handler runs with the [`Caller`] in its extensions.
async fn require_token(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(presented) = presented else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token").into_response();
    };
    let caller = match app.registry.authenticate(presented).await {
        Ok(Some(caller)) => caller,
        Ok(None) => return ApiError::new(StatusCode::UNAUTHORIZED, "invalid token").into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    let action = format!("{} {path}", request.method());
    if let Err(forbidden) = caller.require(required_scopes(request.method(), path), &action) {
        return ApiError::from(RegistryError::from(forbidden)).into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Keeps a handle on the request body; once the handler has answered, discards whatever
/// it left unread (up to `limit` bytes, for up to [`DRAIN_TIMEOUT`]) so that the client,
/// still sending, gets the answer rather than a connection reset.
async fn drain_unread_body(State(limit): State<u64>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let http1 = parts.version <= axum::http::Version::HTTP_11;
    let shared = Arc::new(Mutex::new(body.into_data_stream()));
    let reader = shared.clone();
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .poll_next_unpin(cx)
    }));
    let mut response = next.run(Request::from_parts(parts, body)).await;
    let drain = async {
        let mut discarded = 0u64;
        while discarded <= limit {
            let chunk = futures_util::future::poll_fn(|cx| {
                shared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .poll_next_unpin(cx)
            })
            .await;
            match chunk {
                Some(Ok(bytes)) => discarded += bytes.len() as u64,
                // The end, or a broken body: nothing more to wait for.
                Some(Err(_)) | None => return true,
            }
        }
        false
    };
    let consumed = tokio::time::timeout(DRAIN_TIMEOUT, drain).await.unwrap_or(false);
    if !consumed && http1 {
        // Gave up on the rest: tell the client this connection will not carry another
        // request, so it does not reuse it.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn multipart_error(app: &AppState, e: MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        let limit = app.registry.options.max_module_bytes;
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is over the {} limit (modules may be at most {})",
                human_bytes(limit.saturating_add(BODY_SLACK)),
                human_bytes(limit)
            ),
        )
    } else {
        ApiError::new(e.status(), format!("malformed multipart body: {}", e.body_text()))
    }
}

/// `POST /v1/functions`'s query.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PushQuery {
    /// The version joins the traffic split at 0% instead of taking the traffic.
    #[serde(default)]
    no_traffic: bool,
}

async fn push(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<axum::extract::Query<PushQuery>, QueryRejection>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, axum::Json<PushResponse>), ApiError> {
    let no_traffic = query
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid query: {}", e.body_text()),
            )
        })?
        .no_traffic;
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected a multipart/form-data body: {}", e.body_text()),
        )
    })?;
    let limit = app.registry.options.max_module_bytes;
    let mut manifest: Option<String> = None;
    let mut module: Option<Vec<u8>> = None;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(&app, e))?
    {
        match field.name().unwrap_or_default() {
            "manifest" if manifest.is_none() => {
                manifest = Some(field.text().await.map_err(|e| multipart_error(&app, e))?);
            }
            "module" if module.is_none() => {
                let mut bytes = Vec::new();
                let mut size = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(&app, e))? {
                    size += chunk.len() as u64;
                    if size <= limit {
                        bytes.extend_from_slice(&chunk);
                    }
                }
                if size > limit {
                    return Err(RegistryError::TooLarge { size, limit }.into());
                }
                module = Some(bytes);
            }
            name @ ("manifest" | "module") => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("part `{name}` appears twice"),
                ));
            }
            name => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unexpected part `{name}` (expected `manifest` and `module`)"),
                ));
            }
        }
    }
    let manifest =
        manifest.ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "missing part `manifest`"))?;
    // A route to origins has no module: the part may be absent (a function's empty one is
    // refused by the push with "module is empty").
    let module = module.unwrap_or_default();
    let version = app
        .registry
        .push_with_traffic(&caller, &manifest, module, !no_traffic)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(PushResponse {
            name: version.manifest.name,
            version: version.version,
            sha256: version.sha256,
        }),
    ))
}

async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<axum::Json<Vec<FunctionSummary>>, ApiError> {
    // A deploy token sees its own functions; admins and nodes (which serve them all) every one.
    let everything = caller.scope() != Scope::Deploy;
    let summaries = app
        .registry
        .store
        .list()
        .await?
        .into_iter()
        .filter(|record| everything || caller.may_manage(&record.name))
        .filter_map(|record| {
            let active = record.active_version()?;
            Some(FunctionSummary {
                name: record.name.clone(),
                active: record.active,
                versions: record.versions.len() as u64,
                routes: active.manifest.routes.clone(),
                sha256: active.sha256.clone(),
            })
        })
        .collect();
    Ok(axum::Json(summaries))
}

/// `GET /v1/nodes`: the cluster's members with their health.
async fn list_nodes(State(app): State<AppState>) -> axum::Json<Vec<MemberStatus>> {
    axum::Json(app.registry.members())
}

/// `PUT /v1/nodes/{name}`: a node's heartbeat; answers the members, as `GET /v1/nodes`.
async fn announce_node(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    payload: Result<axum::Json<NodeAnnouncement>, axum::extract::rejection::JsonRejection>,
) -> Result<axum::Json<Vec<MemberStatus>>, ApiError> {
    let axum::Json(announcement) =
        payload.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    if announcement.name != name || name.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the announcement names `{}`, the path `{name}`",
                announcement.name
            ),
        ));
    }
    caller.require_node(&name).map_err(RegistryError::from)?;
    app.registry.announce(announcement).await?;
    Ok(axum::Json(app.registry.members()))
}

/// Function `name`'s record, when `caller` may `action` it (404 when there is none).
async fn readable_record(
    app: &AppState,
    caller: &Caller,
    name: &str,
    action: &str,
) -> Result<FunctionRecord, ApiError> {
    caller
        .require_function(name, action)
        .map_err(RegistryError::from)?;
    app.registry
        .store
        .get(name)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no function `{name}`")))
}

async fn versions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<axum::Json<VersionsResponse>, ApiError> {
    let record = readable_record(&app, &caller, &name, "see the versions").await?;
    Ok(axum::Json(VersionsResponse {
        name: record.name,
        active: record.active,
        versions: record.versions,
        traffic: record.traffic,
    }))
}

async fn list_secrets(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<axum::Json<SecretsResponse>, ApiError> {
    let record = readable_record(&app, &caller, &name, "see the secrets of").await?;
    Ok(axum::Json(SecretsResponse {
        name: record.name,
        secrets: record.secrets.into_keys().collect(),
    }))
}

async fn set_secret(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((name, key)): UrlPath<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    app.registry.set_secret_as(&caller, &name, &key, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_secret(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((name, key)): UrlPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.registry.remove_secret_as(&caller, &name, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn traffic(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<axum::Json<TrafficResponse>, ApiError> {
    let request: TrafficRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid traffic body: {e}")))?;
    let split = atoll_core::traffic::TrafficSplit::new(request.shares, request.sticky)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let record = app.registry.set_traffic_as(&caller, &name, split).await?;
    Ok(axum::Json(TrafficResponse {
        name: record.name,
        active: record.active,
        traffic: record.traffic,
    }))
}

async fn rollback(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<axum::Json<RollbackResponse>, ApiError> {
    let request: RollbackRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid rollback body: {e}")))?
    };
    let record = app.registry.rollback_as(&caller, &name, request.to).await?;
    let sha256 = record
        .active_version()
        .map(|v| v.sha256.clone())
        .unwrap_or_default();
    Ok(axum::Json(RollbackResponse {
        name: record.name,
        active: record.active,
        sha256,
    }))
}

/// `POST /v1/tokens`: mints a token (admin only, by [`required_scopes`]).
async fn create_token(
    State(app): State<AppState>,
    payload: Result<axum::Json<Grant>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    let axum::Json(grant) = payload.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid token request: {}", rejection.body_text()),
        )
    })?;
    let created = app.registry.mint(grant).await?;
    Ok((StatusCode::CREATED, axum::Json(created)))
}

/// `GET /v1/tokens`: every minted token, without secrets or hashes.
async fn list_tokens(State(app): State<AppState>) -> Result<axum::Json<Vec<TokenInfo>>, ApiError> {
    Ok(axum::Json(app.registry.tokens().await?))
}

/// `DELETE /v1/tokens/{id}`: revokes a token.
async fn revoke_token(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    app.registry.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn blob(State(app): State<AppState>, UrlPath(sha256): UrlPath<String>) -> Result<Response, ApiError> {
    if !is_sha256_hex(&sha256) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{sha256:?} is not a SHA-256 (64 lowercase hex characters)"),
        ));
    }
    let bytes = app.registry.store.read_blob(&sha256).await?;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/wasm"))],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
struct WatchQuery {
    #[serde(default)]
    since: u64,
}

async fn watch_events(
    State(app): State<AppState>,
    query: Result<Query<WatchQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(WatchQuery { since }) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid query: {}", e.body_text()),
        )
    })?;
    let watch = ChangeWatch::start(
        app.registry.store.clone(),
        since,
        app.registry.options.heartbeat,
        WhenIdle::Heartbeat,
    )
    .await?
    .until(app.stopped.clone());
    let body = watch.into_stream().scan((), |(), event| {
        std::future::ready(match event {
            Ok(event) => Some(Ok::<_, Infallible>(Bytes::from(event.to_line()))),
            Err(WatchEnd::Store(error)) => {
                // End the stream: the node resumes from the last revision it applied, so
                // ending loses nothing, whereas skipping would.
                tracing::warn!("watch stream ends: {error}");
                None
            }
            // The store is going away with the server.
            Err(WatchEnd::Closed) => None,
        })
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
        assert_eq!(human_bytes(4 << 30), "4 GiB");
        assert_eq!(human_bytes((64 << 20) + (1 << 20)), "65 MiB");
    }
}

// ---------------------------------------------------------------------------------------
// Cron

/// A cron run from a node: for the function in the path, by the node it names.
fn cron_run_from(name: &str, run: CronRun) -> Result<CronRun, ApiError> {
    if run.function != name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the run is for `{}`, not `{name}`", run.function),
        ));
    }
    atoll_core::manifest::check_name(&run.function)
        .map_err(|reason| ApiError::new(StatusCode::BAD_REQUEST, format!("function {reason}")))?;
    if run.node.is_empty() || run.node.len() > 256 || run.path.len() > atoll_core::cron::MAX_PATH_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the run's node or path is invalid",
        ));
    }
    Ok(run)
}

async fn cron_claim(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    axum::Json(run): axum::Json<CronRun>,
) -> Result<StatusCode, ApiError> {
    let run = cron_run_from(&name, run)?;
    // A node token bound to a node claims only as that node.
    caller.require_node(&run.node).map_err(RegistryError::from)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    if !atoll_core::cron::claimable(run.tick, now) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "tick {} is more than {} s from the registry's clock ({now}): is the node's clock right?",
                run.tick,
                atoll_core::cron::CLAIM_WINDOW_SECONDS
            ),
        ));
    }
    if app.registry.store.get(&name).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no function `{name}`"),
        ));
    }
    let claimed = match &app.registry.store {
        Backend::Embedded(_) => app.registry.cron.claim(run, now),
        Backend::Nats(store) => store.cron_claim(&run).await?,
    };
    if claimed {
        Ok(StatusCode::CREATED)
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "another node claimed this tick",
        ))
    }
}

async fn cron_finish(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    axum::Json(run): axum::Json<CronRun>,
) -> Result<StatusCode, ApiError> {
    let run = cron_run_from(&name, run)?;
    caller.require_node(&run.node).map_err(RegistryError::from)?;
    let recorded = match &app.registry.store {
        Backend::Embedded(_) => app.registry.cron.finish(run),
        Backend::Nats(store) => store.cron_finish(&run).await?,
    };
    if recorded {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "this node did not claim this tick",
        ))
    }
}

async fn cron_runs(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Result<axum::Json<Vec<CronRun>>, ApiError> {
    caller
        .require_function(&name, "see the cron runs")
        .map_err(RegistryError::from)?;
    let runs = match &app.registry.store {
        Backend::Embedded(_) => app.registry.cron.runs(&name),
        Backend::Nats(store) => store.cron_runs(&name).await?,
    };
    Ok(axum::Json(runs))
}

// Key-value stores

/// How often expired KV entries are removed, and how many per pass at most.
const KV_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
const KV_SWEEP_BATCH: usize = 10_000;

async fn sweep_expired(kv: KvSweep, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            () = tokio::time::sleep(KV_SWEEP_INTERVAL) => {}
        }
        match &kv {
            KvSweep::Embedded(kv) => sweep_embedded(kv).await,
            KvSweep::Nats(kv) => match kv.sweep_expired().await {
                Ok(0) => {}
                Ok(removed) => tracing::debug!(removed, "expired KV entries removed"),
                Err(error) => tracing::warn!(%error, "sweeping expired KV entries failed"),
            },
        }
    }
}

async fn sweep_embedded(kv: &Arc<crate::kv::KvStore>) {
    // Batch after batch while there is a backlog, each its own transaction.
    loop {
        let kv = Arc::clone(kv);
        match tokio::task::spawn_blocking(move || kv.sweep(KV_SWEEP_BATCH)).await {
            Ok(Ok(removed)) if removed == KV_SWEEP_BATCH => {
                tracing::debug!(removed, "expired KV entries removed; more to go");
            }
            Ok(Ok(0)) => break,
            Ok(Ok(removed)) => {
                tracing::debug!(removed, "expired KV entries removed");
                break;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "sweeping expired KV entries failed");
                break;
            }
            Err(_) => break,
        }
    }
}

impl From<atoll_core::kv::KvError> for ApiError {
    fn from(error: atoll_core::kv::KvError) -> ApiError {
        use atoll_core::kv::KvError;
        let status = match &error {
            KvError::NotFound => StatusCode::NOT_FOUND,
            KvError::Conflict { .. } | KvError::NotANumber => StatusCode::CONFLICT,
            KvError::Invalid(_) => StatusCode::BAD_REQUEST,
            KvError::NotGranted(_) => StatusCode::FORBIDDEN,
            KvError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut api_error = ApiError::new(status, error.to_string());
        if let KvError::Conflict { current } = error {
            api_error.kv_revision = Some(current);
        }
        api_error
    }
}

/// The registry's KV stores, if the caller may use `store`.
fn kv_for(
    app: &AppState,
    caller: &Caller,
    store: &str,
) -> Result<Arc<dyn atoll_core::kv::KvBackend>, ApiError> {
    atoll_core::kv::check_store_name(store)?;
    if caller.scope() == Scope::Deploy && !caller.may_manage(store) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{} may not use store `{store}`", caller.describe()),
        ));
    }
    app.registry.kv.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this registry has no key-value stores",
        )
    })
}

#[derive(serde::Deserialize)]
struct KvListQuery {
    #[serde(default)]
    prefix: String,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn kv_list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(store): UrlPath<String>,
    query: Result<Query<KvListQuery>, QueryRejection>,
) -> Result<axum::Json<atoll_core::kv::KeyPage>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    let kv = kv_for(&app, &caller, &store)?;
    let limit = query.limit.unwrap_or(atoll_core::kv::MAX_LIST_KEYS);
    let page = kv
        .list(&store, &query.prefix, query.cursor.as_deref(), limit)
        .await?;
    Ok(axum::Json(page))
}

/// The header carrying a value's revision.
pub const KV_REVISION_HEADER: &str = "atoll-kv-revision";

async fn kv_get(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((store, key)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let kv = kv_for(&app, &caller, &store)?;
    let entry = kv
        .get(&store, &key)
        .await?
        .ok_or_else(|| ApiError::from(atoll_core::kv::KvError::NotFound))?;
    let mut response = Response::new(Body::from(entry.value));
    response
        .headers_mut()
        .insert(KV_REVISION_HEADER, HeaderValue::from(entry.revision));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

#[derive(serde::Deserialize)]
struct KvPutQuery {
    ttl: Option<u64>,
    if_revision: Option<u64>,
}

async fn kv_put(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((store, key)): UrlPath<(String, String)>,
    query: Result<Query<KvPutQuery>, QueryRejection>,
    value: Bytes,
) -> Result<axum::Json<atoll_core::kv::KvWritten>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    let kv = kv_for(&app, &caller, &store)?;
    let written = kv
        .set(&store, &key, value.to_vec(), query.ttl, query.if_revision)
        .await?;
    Ok(axum::Json(written))
}

#[derive(serde::Deserialize)]
struct KvIncrementQuery {
    increment: i64,
}

async fn kv_increment(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((store, key)): UrlPath<(String, String)>,
    query: Result<Query<KvIncrementQuery>, QueryRejection>,
) -> Result<axum::Json<atoll_core::kv::KvWritten>, ApiError> {
    let Query(query) =
        query.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))?;
    let kv = kv_for(&app, &caller, &store)?;
    let written = kv.increment(&store, &key, query.increment).await?;
    Ok(axum::Json(written))
}

async fn kv_delete(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((store, key)): UrlPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let kv = kv_for(&app, &caller, &store)?;
    if kv.delete(&store, &key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(atoll_core::kv::KvError::NotFound.into())
    }
}
