//! The NATS JetStream store: what lets several registries serve one set of functions.
//!
//! ```text
//! KV bucket    atoll_functions   key = function name, value = FunctionRecord (JSON)
//! object store atoll_modules     name = module sha256 (hex), content = module bytes
//! KV bucket    atoll_credentials key = token id, value = Credential (JSON, hash only)
//! ```
//!
//! A registry on this store keeps nothing of its own but the root token, so any number of them
//! on one NATS cluster are interchangeable, and one restarted serves what it served before.
//!
//! * **Versions by compare-and-set.** A push reads the function's entry with its revision,
//!   decides the next record ([`atoll_core::rules::plan_push`]) and writes it with
//!   `update(key, value, revision)`: JetStream refuses the write if anyone wrote the key
//!   since the read, and the push starts again from a fresh read. Two registries pushing
//!   at once therefore never lose a version nor give one number twice. Only a refused
//!   compare is retried ([`after_write_failure`]): a write that timed out may have landed,
//!   and retrying it could add a version the caller did not ask for.
//! * **Module before metadata.** The module is put in the object store, named by its
//!   sha256, before any record refers to it; it is checked against that sha256 whenever it
//!   is read, so a damaged object is refused rather than served.
//! * **Revisions are the bucket's.** The KV stream's sequence numbers are the global
//!   revision, and an entry's revision is its function's `mod_revision`. The watch
//!   catch-up reads the stream's last sequence *first*, then every key, and reports only
//!   entries up to that sequence: a later write is not lost but comes with the next scan,
//!   which a KV watch (one per registry, [`NatsStore::subscribe`]) triggers.
//!
//! Not covered: two *different* functions claiming overlapping routes at the same instant
//! through two registries can both pass the route check, which reads every function but is
//! not part of the compare-and-set (one key per function).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use atoll_core::StoreError;
use atoll_core::auth::Credential;
use atoll_core::digest::is_sha256_hex;
use atoll_core::manifest::Manifest;
use atoll_core::membership::{FORGET_AFTER_TTLS, MEMBER_TTL, MemberStatus, MemberTable, NodeAnnouncement};
use atoll_core::model::{FunctionRecord, Version};
use atoll_core::rules::{apply_secret, check_routes, plan_push, plan_traffic, put_events, rollback_target};
use atoll_core::secrets::SealedSecret;
use atoll_core::traffic::TrafficSplit;
use atoll_core::watch::WatchEvent;

/// The KV bucket holding one record per function.
pub const FUNCTIONS_BUCKET: &str = "atoll_functions";
/// The object store holding modules by sha256.
pub const MODULES_BUCKET: &str = "atoll_modules";
/// The KV bucket holding each node's last heartbeat; entries expire after the forget time.
pub const NODES_BUCKET: &str = "atoll_nodes";
/// The KV bucket holding minted tokens (hashes only), one per id.
pub const CREDENTIALS_BUCKET: &str = "atoll_credentials";
/// The KV bucket holding cron claims, one key per function, entry and tick
/// ([`atoll_core::cron::claim_key`]), value the node; they expire after
/// [`atoll_core::cron::CLAIMS_KEPT_SECONDS`].
pub const CRON_BUCKET: &str = "atoll_cron";
/// The KV bucket holding each function's last cron runs (a JSON list, newest last).
pub const CRON_RUNS_BUCKET: &str = "atoll_cron_runs";
/// Compare-and-set attempts before a push or rollback gives up (each lost race costs one).
const MAX_CAS_ATTEMPTS: u32 = 64;
/// How long to wait before re-opening the KV watch that wakes watch streams.
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// Handle on the JetStream store; cheap to clone.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    functions: kv::Store,
    modules: object_store::ObjectStore,
    nodes: kv::Store,
    credentials: kv::Store,
    cron: kv::Store,
    cron_runs: kv::Store,
    /// The latest revision the KV watch has seen; wakes watch streams.
    revision: watch::Sender<u64>,
    /// Every node's last heartbeat, fed by a watch on [`NODES_BUCKET`].
    members: Arc<Mutex<MemberTable>>,
    /// The tasks that feed `revision` and `members`; ended with the store.
    watchers: [tokio::task::AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        for watcher in &self.watchers {
            watcher.abort();
        }
    }
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("url", &redact_credentials(&self.inner.url))
            .field("revision", &*self.inner.revision.borrow())
            .finish()
    }
}

/// `url` without the `user:password@` (or `token@`) it may carry, for logs and Debug.
pub fn redact_credentials(url: &str) -> String {
    let rest_at = url.find("://").map_or(0, |at| at + 3);
    match url[rest_at..].find('@') {
        Some(at) if !url[rest_at..rest_at + at].contains('/') => {
            format!("{}<credentials>@{}", &url[..rest_at], &url[rest_at + at + 1..])
        }
        _ => url.to_string(),
    }
}

/// A [`NatsStore`] connected on first use, and again on the next use after a failed
/// attempt. What a process that must start while NATS is down holds (a node serving from
/// its disk cache, the DNS answering for its zones); shared behind an `Arc`, every user in
/// the process gets the one connection.
pub struct LazyNatsStore {
    url: String,
    store: tokio::sync::OnceCell<NatsStore>,
}

impl LazyNatsStore {
    pub fn new(url: impl Into<String>) -> LazyNatsStore {
        LazyNatsStore {
            url: url.into(),
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// A store already connected.
    pub fn connected(store: NatsStore) -> LazyNatsStore {
        let url = store.inner.url.clone();
        LazyNatsStore {
            url,
            store: tokio::sync::OnceCell::new_with(Some(store)),
        }
    }

    /// The connected store, connecting now if no attempt has succeeded yet.
    pub async fn get(&self) -> Result<&NatsStore, StoreError> {
        self.store
            .get_or_try_init(|| async {
                let store = NatsStore::connect(&self.url).await?;
                tracing::info!(url = %redact_credentials(&self.url), "connected to NATS");
                Ok(store)
            })
            .await
    }
}

impl std::fmt::Debug for LazyNatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyNatsStore")
            .field("url", &redact_credentials(&self.url))
            .field("connected", &self.store.initialized())
            .finish()
    }
}

/// What to do after a compare-and-set write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterWriteFailure {
    /// Someone else wrote the key since our read: read again and decide again.
    RetryWithFreshRead,
    /// Lost too many races in a row: answer 409 and let the caller push again.
    GiveUpContended,
    /// Not a lost race (a timeout, the server gone): the write may or may not have landed,
    /// so retrying could store a version twice. Report the error.
    GiveUpFailed,
}

/// The decision after write attempt number `attempt` (1-based) failed; `stale` when
/// JetStream refused it because the key's revision moved.
pub fn after_write_failure(attempt: u32, stale: bool) -> AfterWriteFailure {
    match (stale, attempt < MAX_CAS_ATTEMPTS) {
        (false, _) => AfterWriteFailure::GiveUpFailed,
        (true, true) => AfterWriteFailure::RetryWithFreshRead,
        (true, false) => AfterWriteFailure::GiveUpContended,
    }
}

fn nats_error(
    context: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io {
        context,
        source: io::Error::other(source.to_string()),
    }
}

/// Longest any single JetStream request may take before it is reported as an error: a lost
/// reply or a consumer waiting for messages that are gone must never hang a push or a watch.
const NATS_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// `operation`, or a clear error naming `context` when it takes longer than `limit`.
async fn bounded<T, E>(
    context: impl Into<String>,
    limit: Duration,
    operation: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StoreError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let context = context.into();
    match tokio::time::timeout(limit, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(nats_error(context)(error.into())),
        Err(_) => Err(StoreError::Io {
            context,
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("NATS did not answer within {}s", limit.as_secs()),
            ),
        }),
    }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// A function's current entry: the record (if the key holds one) and the revision to
/// compare against when writing it (0: the key was never written).
struct Current {
    record: Option<FunctionRecord>,
    revision: u64,
}

impl NatsStore {
    /// Connects to `url` (`nats://HOST:PORT`) and opens — creating if missing — the KV
    /// bucket and the object store. Fails clearly if the server is unreachable or has no
    /// JetStream.
    pub async fn connect(url: &str) -> Result<NatsStore, StoreError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| {
                nats_error(format!("connecting to NATS at {}", redact_credentials(url)))(boxed(e))
            })?;
        let js = jetstream::new(client.clone());
        let functions = open_kv(&js).await?;
        let modules = open_object_store(&js).await?;
        let nodes = open_nodes_kv(&js).await?;
        let credentials = open_credentials_kv(&js).await?;
        let cron = open_or_create_kv(
            &js,
            kv::Config {
                bucket: CRON_BUCKET.into(),
                description: "Atoll cron: one claim (the node) per function, entry and tick".into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                max_age: Duration::from_secs(atoll_core::cron::CLAIMS_KEPT_SECONDS),
                ..Default::default()
            },
            "",
        )
        .await?;
        let cron_runs = open_or_create_kv(
            &js,
            kv::Config {
                bucket: CRON_RUNS_BUCKET.into(),
                description: "Atoll cron: each function's last runs (JSON)".into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
            "",
        )
        .await?;
        let (revision, _) = watch::channel(0);
        let members = Arc::new(Mutex::new(MemberTable::new(MEMBER_TTL)));
        let watchers = [
            tokio::spawn(follow_revisions(functions.clone(), revision.clone())).abort_handle(),
            tokio::spawn(follow_members(nodes.clone(), Arc::clone(&members))).abort_handle(),
        ];
        let store = NatsStore {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                client,
                js,
                functions,
                modules,
                nodes,
                credentials,
                cron,
                cron_runs,
                revision,
                members,
                watchers,
            }),
        };
        let last = store.last_revision().await?;
        store.inner.revision.send_if_modified(|seen| {
            let changed = last > *seen;
            *seen = (*seen).max(last);
            changed
        });
        Ok(store)
    }

    /// Claims one cron tick: `true` if this was the first claim (a KV create: exactly one
    /// node in the cluster wins it). The winner's run is listed as running.
    pub async fn cron_claim(&self, run: &atoll_core::cron::CronRun) -> Result<bool, StoreError> {
        let key = atoll_core::cron::claim_key(&run.function, run.entry, run.tick);
        let node = Bytes::from(run.node.clone());
        match tokio::time::timeout(NATS_OP_TIMEOUT, self.inner.cron.create(&key, node)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) if error.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(false),
            Ok(Err(error)) => return Err(nats_error("claiming a cron tick")(boxed(error))),
            Err(_) => return Err(nats_error("claiming a cron tick")("NATS did not answer".into())),
        }
        if let Err(error) = self.record_cron_run(run).await {
            tracing::debug!(%error, function = %run.function, "listing a claimed cron run failed");
        }
        Ok(true)
    }

    /// Records how a claimed tick's run ended; `false` if that node holds no such claim.
    pub async fn cron_finish(&self, run: &atoll_core::cron::CronRun) -> Result<bool, StoreError> {
        let key = atoll_core::cron::claim_key(&run.function, run.entry, run.tick);
        let claim = bounded("reading a cron claim", NATS_OP_TIMEOUT, self.inner.cron.get(&key)).await?;
        if claim.as_deref() != Some(run.node.as_bytes()) {
            return Ok(false);
        }
        self.record_cron_run(run).await?;
        Ok(true)
    }

    /// Puts `run` in its function's list (replacing the same entry and tick), by
    /// compare-and-set, keeping the last [`atoll_core::cron::KEPT_RUNS`].
    async fn record_cron_run(&self, run: &atoll_core::cron::CronRun) -> Result<(), StoreError> {
        if !is_valid_key(&run.function) {
            return Err(StoreError::Invalid(format!("function name {:?}", run.function)));
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let entry = bounded(
                "reading cron runs",
                NATS_OP_TIMEOUT,
                self.inner.cron_runs.entry(run.function.clone()),
            )
            .await?;
            let (mut runs, revision) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    serde_json::from_slice::<Vec<atoll_core::cron::CronRun>>(&entry.value)
                        .unwrap_or_default(),
                    entry.revision,
                ),
                Some(entry) => (Vec::new(), entry.revision),
                None => (Vec::new(), 0),
            };
            match runs
                .iter_mut()
                .find(|known| known.entry == run.entry && known.tick == run.tick)
            {
                Some(known) => *known = run.clone(),
                None => runs.push(run.clone()),
            }
            runs.sort_by_key(|known| known.tick);
            let excess = runs.len().saturating_sub(atoll_core::cron::KEPT_RUNS);
            runs.drain(..excess);
            let value = serde_json::to_vec(&runs).map_err(|e| nats_error("encoding cron runs")(boxed(e)))?;
            match tokio::time::timeout(
                NATS_OP_TIMEOUT,
                self.inner
                    .cron_runs
                    .update(&run.function, Bytes::from(value), revision),
            )
            .await
            {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Ok(Err(error)) => return Err(nats_error("recording a cron run")(boxed(error))),
                Err(_) => return Err(nats_error("recording a cron run")("NATS did not answer".into())),
            }
        }
        Err(nats_error("recording a cron run")(
            "too many concurrent writers".into(),
        ))
    }

    /// A function's last cron runs (at most [`atoll_core::cron::KEPT_RUNS`]), newest first.
    pub async fn cron_runs(&self, function: &str) -> Result<Vec<atoll_core::cron::CronRun>, StoreError> {
        if !is_valid_key(function) {
            return Ok(Vec::new());
        }
        let value = bounded(
            "reading cron runs",
            NATS_OP_TIMEOUT,
            self.inner.cron_runs.get(function),
        )
        .await?;
        let mut runs: Vec<atoll_core::cron::CronRun> = value
            .and_then(|value| serde_json::from_slice(&value).ok())
            .unwrap_or_default();
        runs.sort_by(|a, b| b.tick.cmp(&a.tick).then(a.entry.cmp(&b.entry)));
        Ok(runs)
    }

    /// The JetStream context, for the functions' key-value stores ([`crate::nats_kv`]).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The connection under it (its state, the server's limits).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Records a node's heartbeat in [`NODES_BUCKET`], where every registry (and `atoll
    /// dns`) connected to this NATS sees it.
    pub async fn announce(&self, announcement: &NodeAnnouncement) -> Result<(), StoreError> {
        let name = &announcement.name;
        if !is_valid_key(name) {
            return Err(StoreError::Invalid(format!(
                "node name {name:?} must be letters, digits, `-` or `_`"
            )));
        }
        let value =
            serde_json::to_vec(announcement).map_err(|e| nats_error("encoding a heartbeat")(boxed(e)))?;
        bounded(
            format!("recording node `{name}`"),
            NATS_OP_TIMEOUT,
            self.inner.nodes.put(name, Bytes::from(value)),
        )
        .await?;
        Ok(())
    }

    /// The credential with this id, read fresh (a token revoked through another registry
    /// stops working at once).
    pub async fn credential(&self, id: &str) -> Result<Option<Credential>, StoreError> {
        if !is_valid_key(id) {
            return Ok(None);
        }
        let entry = bounded(
            format!("reading token {id}"),
            NATS_OP_TIMEOUT,
            self.inner.credentials.entry(id),
        )
        .await?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => serde_json::from_slice(&entry.value)
                .map(Some)
                .map_err(|e| StoreError::Io {
                    context: format!("reading token {id} from `{CREDENTIALS_BUCKET}`"),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                }),
            _ => Ok(None),
        }
    }

    /// Every credential, by id.
    pub async fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        let mut ids = self.keys(CREDENTIALS_BUCKET).await?;
        ids.sort();
        let mut credentials = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(credential) = self.credential(&id).await? {
                credentials.push(credential);
            }
        }
        Ok(credentials)
    }

    /// Stores a new credential (refused if its id is taken).
    pub async fn add_credential(&self, credential: &Credential) -> Result<(), StoreError> {
        let id = &credential.id;
        if !is_valid_key(id) {
            return Err(StoreError::Invalid(format!("token id {id:?} is not a valid key")));
        }
        let value = serde_json::to_vec(credential).map_err(|e| nats_error("encoding a token")(boxed(e)))?;
        let created = tokio::time::timeout(
            NATS_OP_TIMEOUT,
            self.inner.credentials.create(id, Bytes::from(value)),
        )
        .await;
        match created {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(StoreError::Conflict(format!("token id {id} exists already")))
            }
            Ok(Err(e)) => Err(nats_error(format!("recording token {id}"))(boxed(e))),
            Err(_) => Err(StoreError::Io {
                context: format!("recording token {id}"),
                source: io::Error::new(io::ErrorKind::TimedOut, "NATS did not confirm the write"),
            }),
        }
    }

    /// Deletes a credential: its token stops working on every registry at once.
    pub async fn remove_credential(&self, id: &str) -> Result<(), StoreError> {
        if self.credential(id).await?.is_none() {
            return Err(StoreError::NotFound(format!("no token with id {id}")));
        }
        bounded(
            format!("deleting token {id}"),
            NATS_OP_TIMEOUT,
            self.inner.credentials.purge(id),
        )
        .await?;
        Ok(())
    }

    /// Every node heard from recently (through any registry), with its health.
    pub fn members(&self) -> Vec<MemberStatus> {
        self.inner
            .members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .list(Instant::now())
    }

    /// A receiver that changes whenever the bucket changes, through any registry.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    /// The bucket's last revision (the KV stream's last sequence), read fresh.
    async fn last_revision(&self) -> Result<u64, StoreError> {
        let stream = bounded(
            "reading the KV stream",
            NATS_OP_TIMEOUT,
            self.inner.js.get_stream(format!("KV_{FUNCTIONS_BUCKET}")),
        )
        .await?;
        let info = bounded("reading the KV stream", NATS_OP_TIMEOUT, stream.get_info()).await?;
        Ok(info.state.last_sequence)
    }

    async fn current(&self, name: &str) -> Result<Current, StoreError> {
        let entry = bounded(
            format!("reading function `{name}`"),
            NATS_OP_TIMEOUT,
            self.inner.functions.entry(name),
        )
        .await?;
        let Some(entry) = entry else {
            return Ok(Current {
                record: None,
                revision: 0,
            });
        };
        let record = match entry.operation {
            kv::Operation::Put => Some(decode(&entry)?),
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        Ok(Current {
            record,
            revision: entry.revision,
        })
    }

    /// One function, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        if !is_valid_key(name) {
            return Ok(None);
        }
        Ok(self.current(name).await?.record)
    }

    /// Every function, sorted by name.
    pub async fn list(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        let mut records = self.scan().await?;
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Every record in the bucket, each stamped with its entry's revision.
    async fn scan(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        let names = self.keys(FUNCTIONS_BUCKET).await?;
        let mut records = Vec::with_capacity(names.len());
        for name in names {
            if let Some(record) = self.current(&name).await?.record {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// The keys in KV bucket `bucket` (deleted ones included: their reads say so).
    async fn keys(&self, bucket: &str) -> Result<Vec<String>, StoreError> {
        // Not `kv::Store::keys`: its consumer counts the messages pending when it starts and
        // waits for them all, so a key updated meanwhile (history 1 deletes the old message)
        // can leave it waiting forever. The stream's per-subject counts are one request.
        let prefix = format!("$KV.{bucket}.");
        bounded(
            format!("listing the keys of `{bucket}`"),
            NATS_OP_TIMEOUT,
            async {
                let stream = self
                    .inner
                    .js
                    .get_stream(format!("KV_{bucket}"))
                    .await
                    .map_err(boxed)?;
                let mut subjects = stream
                    .info_with_subjects(format!("{prefix}>"))
                    .await
                    .map_err(boxed)?;
                let mut names = Vec::new();
                while let Some(entry) = subjects.next().await {
                    let (subject, _) = entry.map_err(boxed)?;
                    if let Some(key) = subject.strip_prefix(&prefix) {
                        names.push(key.to_string());
                    }
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(names)
            },
        )
        .await
    }

    /// A `Put` for every function whose entry revision is in `(since, R]`, ascending, and
    /// R: the bucket's last revision, read before the scan (see the module docs). R below
    /// `since` tells a watcher that the bucket was recreated since it last looked.
    pub async fn events_since(&self, since: u64) -> Result<(Vec<WatchEvent>, u64), StoreError> {
        let revision = self.last_revision().await?;
        if revision <= since {
            return Ok((Vec::new(), revision));
        }
        let records = self.scan().await?;
        let events = put_events(&records, since, revision);
        Ok((events, revision))
    }

    /// The module bytes with this SHA-256; refused if the stored object does not hash to it.
    pub async fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        if !is_sha256_hex(sha256) {
            return Err(StoreError::Invalid(format!(
                "{sha256:?} is not a SHA-256 (64 lowercase hex characters)"
            )));
        }
        // A deleted object still has info (marked deleted), and reading it would wait for
        // chunks that never come: ask first.
        let missing = || StoreError::NotFound(format!("no blob sha256:{sha256}"));
        let context = || format!("reading module sha256:{sha256}");
        let info = match self.module_info(sha256).await? {
            Some(info) => info,
            None => return Err(missing()),
        };
        // Reading waits for every chunk the metadata names: bound it by the size.
        let bytes = bounded(context(), transfer_timeout(info.size), async {
            let mut object = match self.inner.modules.get(sha256).await {
                Ok(object) => object,
                Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(boxed(e)),
            };
            let mut bytes = Vec::with_capacity(info.size);
            object.read_to_end(&mut bytes).await.map_err(boxed)?;
            Ok(Some(bytes))
        })
        .await?
        .ok_or_else(missing)?;
        let actual = atoll_core::digest::sha256_hex(&bytes);
        if actual != sha256 {
            return Err(StoreError::Io {
                context: format!("module sha256:{sha256} in the object store `{MODULES_BUCKET}`"),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("corrupt: its content hashes to sha256:{actual}"),
                ),
            });
        }
        Ok(bytes)
    }

    /// Stores the module (if not there yet), then a new active version of `manifest.name`
    /// by compare-and-set. Refused, with no metadata written, if the module is empty or a
    /// route is served by another function.
    pub async fn push(&self, manifest: Manifest, module: Vec<u8>) -> Result<Version, StoreError> {
        self.push_with_traffic(manifest, module, true).await
    }

    /// [`Self::push`]; without `takes_traffic` the version joins the traffic split at 0%
    /// ([`plan_push`]).
    pub async fn push_with_traffic(
        &self,
        manifest: Manifest,
        module: Vec<u8>,
        takes_traffic: bool,
    ) -> Result<Version, StoreError> {
        // Only a route to origins has no module (its blob is the empty one).
        if module.is_empty() && !manifest.is_origin_only() {
            return Err(StoreError::Invalid("module is empty".into()));
        }
        let name = manifest.name.clone();
        check_routes(&self.scan().await?, &name, &manifest)?;
        let sha256 = atoll_core::digest::sha256_hex(&module);
        self.put_module(&sha256, &module).await?;
        let size = module.len() as u64;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.current(&name).await?;
            let (record, version) = plan_push(
                current.record,
                manifest.clone(),
                sha256.clone(),
                size,
                takes_traffic,
            )?;
            match self.write(&record, current.revision, attempt).await? {
                Written::Yes => return Ok(version),
                Written::Stale => continue,
            }
        }
    }

    /// Makes `to` (default: the highest version below the active one) active, by
    /// compare-and-set. Re-activating the active version changes nothing.
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> Result<FunctionRecord, StoreError> {
        let (record, ()) = self
            .modify(name, |record| {
                let target = rollback_target(record, to)?;
                if target.version == record.active && record.traffic.is_none() {
                    return Ok((None, ()));
                }
                let mut changed = record.clone();
                changed.active = target.version;
                // A rollback ends any gray release.
                changed.traffic = None;
                Ok((Some(changed), ()))
            })
            .await?;
        Ok(record)
    }

    /// Shares `name`'s requests between versions as `split` says, by compare-and-set (see
    /// [`atoll_core::rules::plan_traffic`]); the same split again changes nothing.
    pub async fn set_traffic(&self, name: &str, split: TrafficSplit) -> Result<FunctionRecord, StoreError> {
        let (record, ()) = self
            .modify(name, |record| {
                let changed = plan_traffic(record.clone(), split.clone())?;
                Ok(((changed != *record).then_some(changed), ()))
            })
            .await?;
        Ok(record)
    }

    /// Sets (`Some`) or removes (`None`) function `name`'s secret `key`, by
    /// compare-and-set; whether it was there before.
    pub async fn set_secret(
        &self,
        name: &str,
        key: &str,
        sealed: Option<SealedSecret>,
    ) -> Result<bool, StoreError> {
        let (_, existed) = self
            .modify(name, |record| {
                let mut changed = record.clone();
                let existed = apply_secret(&mut changed, key, sealed.clone())?;
                Ok(((changed != *record).then_some(changed), existed))
            })
            .await?;
        Ok(existed)
    }

    /// Changes function `name`'s record as `change` decides from a fresh read (`None`:
    /// nothing to change), by compare-and-set, deciding again on a lost race, and checking
    /// the routes of a version it makes active; the record after, and what `change` said.
    async fn modify<T>(
        &self,
        name: &str,
        mut change: impl FnMut(&FunctionRecord) -> Result<(Option<FunctionRecord>, T), StoreError>,
    ) -> Result<(FunctionRecord, T), StoreError> {
        let not_found = || StoreError::NotFound(format!("no function `{name}`"));
        if !is_valid_key(name) {
            return Err(not_found());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.current(name).await?;
            let record = current.record.ok_or_else(not_found)?;
            let (changed, said) = change(&record)?;
            let Some(changed) = changed else {
                return Ok((record, said));
            };
            if changed.active != record.active
                && let Some(active) = changed.active_version()
            {
                check_routes(&self.scan().await?, name, &active.manifest)?;
            }
            match self.write(&changed, current.revision, attempt).await? {
                Written::Yes => return Ok((self.current(name).await?.record.ok_or_else(not_found)?, said)),
                Written::Stale => continue,
            }
        }
    }

    /// Writes `record` if its key is still at `revision`.
    async fn write(
        &self,
        record: &FunctionRecord,
        revision: u64,
        attempt: u32,
    ) -> Result<Written, StoreError> {
        let value = serde_json::to_vec(record).map_err(|e| nats_error("encoding a record")(boxed(e)))?;
        let name = &record.name;
        let update = self.inner.functions.update(name, Bytes::from(value), revision);
        let Ok(updated) = tokio::time::timeout(NATS_OP_TIMEOUT, update).await else {
            // May have landed: never retried (see `after_write_failure`).
            return Err(StoreError::Io {
                context: format!("writing function `{name}`"),
                source: io::Error::new(io::ErrorKind::TimedOut, "NATS did not confirm the write"),
            });
        };
        match updated {
            Ok(_) => Ok(Written::Yes),
            Err(e) => {
                let stale = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
                match after_write_failure(attempt, stale) {
                    AfterWriteFailure::RetryWithFreshRead => {
                        tracing::debug!("function `{name}` changed under us (attempt {attempt}); retrying");
                        Ok(Written::Stale)
                    }
                    AfterWriteFailure::GiveUpContended => Err(StoreError::Conflict(format!(
                        "function `{name}` kept changing under {attempt} attempts; try again"
                    ))),
                    AfterWriteFailure::GiveUpFailed => {
                        Err(nats_error(format!("writing function `{name}`"))(boxed(e)))
                    }
                }
            }
        }
    }

    /// The object's metadata, `None` if there is none or it is marked deleted.
    async fn module_info(&self, sha256: &str) -> Result<Option<object_store::ObjectInfo>, StoreError> {
        let info = tokio::time::timeout(NATS_OP_TIMEOUT, self.inner.modules.info(sha256)).await;
        match info {
            Ok(Ok(info)) if info.deleted => Ok(None),
            Ok(Ok(info)) => Ok(Some(info)),
            Ok(Err(e)) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Ok(Err(e)) => Err(nats_error(format!("reading module sha256:{sha256}"))(boxed(e))),
            Err(_) => Err(StoreError::Io {
                context: format!("reading module sha256:{sha256}"),
                source: io::Error::new(io::ErrorKind::TimedOut, "NATS did not answer"),
            }),
        }
    }

    /// Whether every chunk `info` names is in the stream. The object store replaces an
    /// object by writing new chunks, then the metadata, then purging the *previous* chunks;
    /// two registries putting the same module at once can leave metadata whose chunks the
    /// other one purged, and reading that would wait forever. Counting is one request.
    async fn chunks_complete(&self, info: &object_store::ObjectInfo) -> Result<bool, StoreError> {
        let subject = format!("$O.{MODULES_BUCKET}.C.{}", info.nuid);
        let counted = bounded("counting module chunks", NATS_OP_TIMEOUT, async {
            let stream = self
                .inner
                .js
                .get_stream(format!("OBJ_{MODULES_BUCKET}"))
                .await
                .map_err(boxed)?;
            let mut subjects = stream.info_with_subjects(&subject).await.map_err(boxed)?;
            let mut count = 0usize;
            while let Some(entry) = subjects.next().await {
                let (name, messages) = entry.map_err(boxed)?;
                if name == subject {
                    count += messages;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(count)
        })
        .await?;
        Ok(counted == info.chunks)
    }

    /// Makes sure the module is stored whole under its sha256: kept if an object of that
    /// size with all its chunks is there, (re)written otherwise, and checked again after
    /// writing, because a concurrent put of the same module may purge what this one wrote.
    async fn put_module(&self, sha256: &str, module: &[u8]) -> Result<(), StoreError> {
        const ATTEMPTS: u32 = 4;
        for _ in 0..ATTEMPTS {
            if let Some(info) = self.module_info(sha256).await?
                && info.size == module.len()
                && self.chunks_complete(&info).await?
            {
                return Ok(());
            }
            let mut reader = module;
            bounded(
                format!("writing module sha256:{sha256}"),
                transfer_timeout(module.len()),
                self.inner.modules.put(sha256, &mut reader),
            )
            .await?;
        }
        Err(StoreError::Conflict(format!(
            "module sha256:{sha256} kept being replaced while it was written; try again"
        )))
    }
}

/// How long moving `size` bytes to or from NATS may take: the per-request bound plus a
/// second per MiB (far below any link a cluster runs on).
impl crate::watch::ChangeSource for NatsStore {
    fn subscribe(&self) -> watch::Receiver<u64> {
        NatsStore::subscribe(self)
    }

    async fn events_since(&self, since: u64) -> Result<(Vec<WatchEvent>, u64), StoreError> {
        NatsStore::events_since(self, since).await
    }
}

fn transfer_timeout(size: usize) -> Duration {
    NATS_OP_TIMEOUT + Duration::from_secs((size >> 20) as u64)
}

enum Written {
    Yes,
    Stale,
}

/// The record in `entry`, its `mod_revision` set to the entry's revision.
fn decode(entry: &kv::Entry) -> Result<FunctionRecord, StoreError> {
    let mut record: FunctionRecord = serde_json::from_slice(&entry.value).map_err(|e| StoreError::Io {
        context: format!("reading function `{}` from `{FUNCTIONS_BUCKET}`", entry.key),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    record.mod_revision = entry.revision;
    Ok(record)
}

/// Function names are `[a-z0-9-]`, always valid keys; anything else cannot be one.
fn is_valid_key(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The KV bucket `config` names, created with `config` when it does not exist yet.
/// `hint` ends the error message when neither works.
async fn open_or_create_kv(
    js: &jetstream::Context,
    config: kv::Config,
    hint: &str,
) -> Result<kv::Store, StoreError> {
    let bucket = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another registry may have created it in between.
        Err(create_error) => js
            .get_key_value(&bucket)
            .await
            .map_err(|_| nats_error(format!("creating the KV bucket `{bucket}`{hint}"))(boxed(create_error))),
    }
}

async fn open_kv(js: &jetstream::Context) -> Result<kv::Store, StoreError> {
    let config = kv::Config {
        bucket: FUNCTIONS_BUCKET.into(),
        description: "Atoll functions: one FunctionRecord (JSON) per function name".into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    open_or_create_kv(js, config, " (is JetStream on?)").await
}

async fn open_nodes_kv(js: &jetstream::Context) -> Result<kv::Store, StoreError> {
    let config = kv::Config {
        bucket: NODES_BUCKET.into(),
        description: "Atoll nodes: each node's last heartbeat (JSON)".into(),
        history: 1,
        // Heartbeats are rewritten every second; losing them on a NATS restart costs
        // one heartbeat interval, so memory storage is enough.
        storage: jetstream::stream::StorageType::Memory,
        max_age: MEMBER_TTL * FORGET_AFTER_TTLS,
        ..Default::default()
    };
    open_or_create_kv(js, config, "").await
}

/// Feeds `members` from the nodes bucket: the watch delivers each node's latest heartbeat,
/// then every new one. A heartbeat is dated by the NATS server's timestamp, so one
/// delivered late (the initial replay, a reconnect) is not taken for a fresh one.
async fn follow_members(nodes: kv::Store, members: Arc<Mutex<MemberTable>>) {
    loop {
        match nodes.watch_all().await {
            Ok(mut changes) => {
                while let Some(change) = changes.next().await {
                    let entry = match change {
                        Ok(entry) => entry,
                        Err(e) => {
                            tracing::warn!("NATS nodes watch: {e}");
                            break;
                        }
                    };
                    if entry.operation != kv::Operation::Put {
                        continue;
                    }
                    let Ok(announcement) = serde_json::from_slice::<NodeAnnouncement>(&entry.value) else {
                        tracing::warn!(key = %entry.key, "ignoring a malformed heartbeat");
                        continue;
                    };
                    let now_nanos = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos() as i128;
                    let age_nanos = (now_nanos - entry.created.unix_timestamp_nanos()).max(0);
                    let age = Duration::from_nanos(u64::try_from(age_nanos).unwrap_or(u64::MAX));
                    let now = Instant::now();
                    let heard = now.checked_sub(age).unwrap_or(now);
                    members
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .announce(announcement, heard);
                }
            }
            Err(e) => tracing::warn!("NATS nodes watch: {e}"),
        }
        tokio::time::sleep(REWATCH_DELAY).await;
    }
}

async fn open_credentials_kv(js: &jetstream::Context) -> Result<kv::Store, StoreError> {
    let config = kv::Config {
        bucket: CREDENTIALS_BUCKET.into(),
        description: "Atoll tokens: one credential (scope, SHA-256 of the token) per id".into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    open_or_create_kv(js, config, "").await
}

async fn open_object_store(js: &jetstream::Context) -> Result<object_store::ObjectStore, StoreError> {
    if let Ok(store) = js.get_object_store(MODULES_BUCKET).await {
        return Ok(store);
    }
    let created = js
        .create_object_store(object_store::Config {
            bucket: MODULES_BUCKET.into(),
            description: Some("Atoll modules by sha256".into()),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        Err(create_error) => js.get_object_store(MODULES_BUCKET).await.map_err(|_| {
            nats_error(format!("creating the object store `{MODULES_BUCKET}`"))(boxed(create_error))
        }),
    }
}

/// Publishes the revision of every change to the bucket, whoever made it; re-opens the
/// KV watch if it ends (NATS restarted, connection lost).
async fn follow_revisions(functions: kv::Store, revision: watch::Sender<u64>) {
    loop {
        match functions.watch_all().await {
            Ok(mut changes) => {
                while let Some(change) = changes.next().await {
                    match change {
                        Ok(entry) => {
                            revision.send_modify(|seen| *seen = (*seen).max(entry.revision));
                        }
                        Err(e) => {
                            tracing::warn!("NATS KV watch: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("NATS KV watch: {e}"),
        }
        // Something may have changed while the watch was down: wake streams to re-scan.
        revision.send_modify(|_| {});
        tokio::time::sleep(REWATCH_DELAY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_compare_is_retried() {
        assert_eq!(
            after_write_failure(1, true),
            AfterWriteFailure::RetryWithFreshRead
        );
        assert_eq!(
            after_write_failure(MAX_CAS_ATTEMPTS - 1, true),
            AfterWriteFailure::RetryWithFreshRead
        );
        assert_eq!(
            after_write_failure(MAX_CAS_ATTEMPTS, true),
            AfterWriteFailure::GiveUpContended
        );
        // A timeout may have landed: retrying could store the version twice.
        assert_eq!(after_write_failure(1, false), AfterWriteFailure::GiveUpFailed);
    }

    #[test]
    fn credentials_are_not_shown() {
        assert_eq!(
            redact_credentials("nats://user:secret@10.0.0.1:4222"),
            "nats://<credentials>@10.0.0.1:4222"
        );
        assert_eq!(
            redact_credentials("nats://token@h:4222"),
            "nats://<credentials>@h:4222"
        );
        assert_eq!(redact_credentials("nats://10.0.0.1:4222"), "nats://10.0.0.1:4222");
        assert_eq!(redact_credentials("http://h/a@b"), "http://h/a@b");
        let lazy = LazyNatsStore::new("nats://user:secret@127.0.0.1:4222");
        let shown = format!("{lazy:?}");
        assert!(
            shown.contains("127.0.0.1:4222") && !shown.contains("secret"),
            "{shown}"
        );
    }

    #[test]
    fn keys_are_function_names() {
        assert!(is_valid_key("hello-2"));
        assert!(!is_valid_key(""));
        assert!(!is_valid_key("a.b"));
        assert!(!is_valid_key("a>"));
    }
}
