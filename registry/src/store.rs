//! The embedded store: function metadata and module blobs in one data directory.
//!
//! ```text
//! DATA/
//!   state.json            { "revision": N, "functions": { name: FunctionRecord },
//!                           "credentials": { id: Credential } }
//!   blobs/sha256/<hex>    module bytes, content-addressed, never rewritten
//! ```
//!
//! Crash safety comes from ordering and atomic renames, not from a log:
//!
//! 1. the blob is written to `<hex>.tmp` in its final directory, fsynced, renamed into
//!    place and the directory fsynced — *before* any metadata refers to it;
//! 2. the whole new metadata document is written to `state.json.tmp`, fsynced, renamed over
//!    `state.json`, and the directory fsynced;
//! 3. only then is the in-memory snapshot swapped, watchers woken, and the caller answered.
//!
//! A crash anywhere leaves either the old or the new `state.json`, never half of one; an
//! orphan blob (written, never referenced) is harmless, and stale `*.tmp` files are removed
//! on open. The document is small (metadata only), so rewriting it per mutation is cheap
//! next to the fsyncs.
//!
//! Concurrency: mutations are serialised by one async mutex, and the commit (disk writes,
//! snapshot swap, notification) runs on a blocking thread that owns the mutex guard, so a
//! caller that gives up half-way (a dropped HTTP request) cannot leave the disk ahead of
//! memory. Readers never wait for a writer: they clone an `Arc` of the current snapshot.
//!
//! Every mutation bumps the global `revision` and stamps the function's `mod_revision`; a
//! `tokio::sync::watch` channel carries the latest revision to watch streams, which then
//! re-scan the snapshot by `mod_revision` — so a slow watcher can coalesce but never lose
//! a change.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use atoll_core::StoreError;
use atoll_core::digest::is_sha256_hex;
use atoll_core::durable::write_atomically;
use atoll_core::membership::{MEMBER_TTL, MemberStatus, MemberTable, NodeAnnouncement};

use atoll_core::auth::Credential;
use atoll_core::manifest::Manifest;
use atoll_core::model::{FunctionRecord, Version};
use atoll_core::rules::{apply_secret, plan_push, plan_traffic, put_events, rollback_target};
use atoll_core::secrets::SealedSecret;
use atoll_core::traffic::TrafficSplit;
use atoll_core::watch::WatchEvent;

const STATE_FILE: &str = "state.json";

/// The metadata document, `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Bumped by every mutation; 0 for an empty store.
    pub revision: u64,
    /// Every function, by name.
    pub functions: BTreeMap<String, FunctionRecord>,
    /// Minted tokens ([`atoll_core::auth`]), by id: hashes only. Changing them does not bump
    /// `revision`, which is the functions' (the watch's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub credentials: BTreeMap<String, Credential>,
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// Handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Serialises mutations; the guard travels into the blocking commit.
    write: Arc<Mutex<()>>,
    /// The committed state; replaced wholesale on commit.
    current: RwLock<Arc<State>>,
    /// The committed revision, for watch streams.
    revision: watch::Sender<u64>,
    /// Nodes heard from. In memory: heartbeats rebuild it within one TTL after a restart.
    members: std::sync::Mutex<MemberTable>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("revision", &self.snapshot().revision)
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: removes stale temp files and loads the
    /// last committed `state.json`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_error(format!("creating {}", blobs.display())))?;
        remove_stale_tmp(dir)?;
        remove_stale_tmp(&blobs)?;
        let path = dir.join(STATE_FILE);
        let state = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes).map_err(|e| StoreError::Io {
                context: format!("reading {}", path.display()),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_error(format!("reading {}", path.display()))(e)),
        };
        for record in state.functions.values() {
            if record.active_version().is_none() {
                return Err(StoreError::Io {
                    context: format!("reading {}", path.display()),
                    source: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "function `{}` has active v{} which does not exist",
                            record.name, record.active
                        ),
                    ),
                });
            }
        }
        let (revision, _) = watch::channel(state.revision);
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                write: Arc::new(Mutex::new(())),
                current: RwLock::new(Arc::new(state)),
                revision,
                members: std::sync::Mutex::new(MemberTable::new(MEMBER_TTL)),
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The committed state, as of now. Cheap (an `Arc` clone).
    pub fn snapshot(&self) -> Arc<State> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.snapshot().revision
    }

    /// A receiver that changes whenever a mutation commits (value: the new revision).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    /// Records a node's heartbeat (in memory only).
    pub fn announce(&self, announcement: NodeAnnouncement) {
        self.members().announce(announcement, std::time::Instant::now());
    }

    /// Every node heard from recently, with its health.
    pub fn members_now(&self) -> Vec<MemberStatus> {
        self.members().list(std::time::Instant::now())
    }

    fn members(&self) -> std::sync::MutexGuard<'_, MemberTable> {
        // The table is consistent after any panic (plain maps and instants).
        self.inner
            .members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every function, sorted by name.
    pub fn list(&self) -> Vec<FunctionRecord> {
        self.snapshot().functions.values().cloned().collect()
    }

    /// One function.
    pub fn get(&self, name: &str) -> Option<FunctionRecord> {
        self.snapshot().functions.get(name).cloned()
    }

    /// Where the blob with this SHA-256 lives (whether or not it exists).
    pub fn blob_path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if !is_sha256_hex(sha256) {
            return Err(StoreError::Invalid(format!(
                "{sha256:?} is not a SHA-256 (64 lowercase hex characters)"
            )));
        }
        Ok(self.inner.dir.join("blobs").join("sha256").join(sha256))
    }

    /// The module bytes with this SHA-256.
    pub async fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(sha256)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(format!("no blob sha256:{sha256}")))
            }
            Err(e) => Err(io_error(format!("reading {}", path.display()))(e)),
        }
    }

    /// A `Put` for every function changed after `since` (by `mod_revision`, ascending), and
    /// the revision they bring the caller up to.
    pub fn events_since(&self, since: u64) -> (Vec<WatchEvent>, u64) {
        let state = self.snapshot();
        let events = put_events(state.functions.values(), since, state.revision);
        (events, state.revision)
    }

    /// Stores a new version of `manifest.name` with `module` and makes it active.
    /// `manifest` must be validated ([`Manifest::parse`]). Refused, with nothing stored, if
    /// the module is empty or a route is served by another function.
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
        let guard = self.inner.write.clone().lock_owned().await;
        let state = self.snapshot();
        check_routes(&state, &manifest.name, &manifest)?;

        let sha256 = atoll_core::digest::sha256_hex(&module);
        let current = state.functions.get(&manifest.name).cloned();
        let (mut record, version) = plan_push(
            current,
            manifest,
            sha256.clone(),
            module.len() as u64,
            takes_traffic,
        )?;
        let mut next = (*state).clone();
        next.revision += 1;
        record.mod_revision = next.revision;
        next.functions.insert(record.name.clone(), record);

        let blob = self.blob_path(&sha256)?;
        let inner = self.inner.clone();
        commit(guard, move || {
            write_blob(&blob, &module)?;
            inner.persist_and_publish(next)
        })
        .await?;
        Ok(version)
    }

    /// Makes an earlier (or any existing) version active: `to`, or by default the highest
    /// version below the active one. Versions are not touched. Re-activating the active
    /// version changes nothing.
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> Result<FunctionRecord, StoreError> {
        let (record, ()) = self
            .modify(name, |record| {
                let target = rollback_target(record, to)?;
                if target.version == record.active && record.traffic.is_none() {
                    return Ok((None, ()));
                }
                let mut changed = record.clone();
                changed.active = target.version;
                // A rollback ends any gray release: everything goes to the version rolled
                // back to.
                changed.traffic = None;
                Ok((Some(changed), ()))
            })
            .await?;
        Ok(record)
    }

    /// Shares `name`'s requests between versions as `split` says (see
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

    /// Sets (`Some`) or removes (`None`) function `name`'s secret `key`; whether it was
    /// there before. Removing one that is not there changes nothing.
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

    /// Changes function `name`'s record as `change` decides from it (`None`: nothing to
    /// change), under the write lock, checking the routes of a version it makes active;
    /// the record after, and what `change` said.
    async fn modify<T>(
        &self,
        name: &str,
        change: impl FnOnce(&FunctionRecord) -> Result<(Option<FunctionRecord>, T), StoreError>,
    ) -> Result<(FunctionRecord, T), StoreError> {
        let guard = self.inner.write.clone().lock_owned().await;
        let state = self.snapshot();
        let record = state
            .functions
            .get(name)
            .ok_or_else(|| StoreError::NotFound(format!("no function `{name}`")))?;
        let (changed, said) = change(record)?;
        let Some(changed) = changed else {
            return Ok((record.clone(), said));
        };
        if changed.active != record.active
            && let Some(active) = changed.active_version()
        {
            check_routes(&state, name, &active.manifest)?;
        }
        Ok((self.replace(guard, &state, changed).await?, said))
    }

    /// Stores `record` in place of its function's, as the next revision.
    async fn replace(
        &self,
        guard: tokio::sync::OwnedMutexGuard<()>,
        state: &State,
        mut record: FunctionRecord,
    ) -> Result<FunctionRecord, StoreError> {
        let mut next = state.clone();
        next.revision += 1;
        record.mod_revision = next.revision;
        next.functions.insert(record.name.clone(), record.clone());
        let inner = self.inner.clone();
        commit(guard, move || inner.persist_and_publish(next)).await?;
        Ok(record)
    }

    /// The credential with this id.
    pub fn credential(&self, id: &str) -> Option<Credential> {
        self.snapshot().credentials.get(id).cloned()
    }

    /// Every credential, by id.
    pub fn credentials(&self) -> Vec<Credential> {
        self.snapshot().credentials.values().cloned().collect()
    }

    /// Stores a new credential (refused if its id is taken).
    pub async fn add_credential(&self, credential: Credential) -> Result<(), StoreError> {
        let guard = self.inner.write.clone().lock_owned().await;
        let state = self.snapshot();
        if state.credentials.contains_key(&credential.id) {
            return Err(StoreError::Conflict(format!(
                "token id {} exists already",
                credential.id
            )));
        }
        let mut next = (*state).clone();
        next.credentials.insert(credential.id.clone(), credential);
        let inner = self.inner.clone();
        commit(guard, move || inner.persist(next, false)).await
    }

    /// Deletes a credential: its token stops working at once.
    pub async fn remove_credential(&self, id: &str) -> Result<(), StoreError> {
        let guard = self.inner.write.clone().lock_owned().await;
        let state = self.snapshot();
        if !state.credentials.contains_key(id) {
            return Err(StoreError::NotFound(format!("no token with id {id}")));
        }
        let mut next = (*state).clone();
        next.credentials.remove(id);
        let inner = self.inner.clone();
        commit(guard, move || inner.persist(next, false)).await
    }
}

impl Inner {
    /// Writes `next` durably, then makes it the visible state and wakes watchers.
    fn persist_and_publish(&self, next: State) -> Result<(), StoreError> {
        self.persist(next, true)
    }

    /// Writes `next` durably, then makes it the visible state; wakes watchers if `notify`
    /// (not for credentials, which no watcher follows).
    fn persist(&self, next: State, notify: bool) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(&next).map_err(|e| StoreError::Io {
            context: "encoding state".into(),
            source: io::Error::other(e),
        })?;
        write_atomically(&self.dir.join(STATE_FILE), &json).map_err(io_error(format!(
            "writing {}",
            self.dir.join(STATE_FILE).display()
        )))?;
        let revision = next.revision;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        if notify {
            self.revision.send_replace(revision);
        }
        Ok(())
    }
}

/// Runs `work` on a blocking thread that owns the writer guard: once started, a commit
/// finishes (and releases the lock) even if the caller's future is dropped.
async fn commit<F>(guard: tokio::sync::OwnedMutexGuard<()>, work: F) -> Result<(), StoreError>
where
    F: FnOnce() -> Result<(), StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let result = work();
        drop(guard);
        result
    })
    .await
    .map_err(|e| StoreError::Io {
        context: "commit task".into(),
        source: io::Error::other(e.to_string()),
    })?
}

/// Refuses a manifest whose routes another function's active version already serves.
fn check_routes(state: &State, name: &str, manifest: &Manifest) -> Result<(), StoreError> {
    atoll_core::rules::check_routes(state.functions.values(), name, manifest)
}

/// Content-addressed write: skip if present, else temp + fsync + rename + fsync dir.
fn write_blob(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    if path.exists() {
        return Ok(());
    }
    write_atomically(path, bytes).map_err(io_error(format!("writing {}", path.display())))
}

/// Removes `*.tmp` left in `dir` by a crash mid-write.
fn remove_stale_tmp(dir: &Path) -> Result<(), StoreError> {
    atoll_core::durable::remove_stale_temporaries(dir)
        .map(drop)
        .map_err(io_error(format!("cleaning {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, routes: &[&str]) -> Manifest {
        Manifest::for_tests(name, routes)
    }

    fn blob_count(dir: &Path) -> usize {
        fs::read_dir(dir.join("blobs/sha256")).unwrap().count()
    }

    #[tokio::test]
    async fn push_allocates_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.revision(), 0);
        let v1 = store
            .push(manifest("echo", &["a.com"]), b"one".to_vec())
            .await
            .unwrap();
        let v2 = store
            .push(manifest("echo", &["a.com"]), b"two".to_vec())
            .await
            .unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        assert_eq!(v1.sha256, atoll_core::digest::sha256_hex(b"one"));
        assert_eq!(v1.size, 3);
        assert!(v1.created_at.ends_with('Z'), "{}", v1.created_at);
        let record = store.get("echo").unwrap();
        assert_eq!(record.active, 2);
        assert_eq!(record.mod_revision, 2);
        assert_eq!(store.revision(), 2);
        assert_eq!(store.read_blob(&v1.sha256).await.unwrap(), b"one");
        assert!(store.blob_path(&v2.sha256).unwrap().is_file());
        assert!(matches!(
            store.read_blob(&"0".repeat(64)).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.read_blob("../state.json").await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.push(manifest("echo", &["a.com"]), vec![]).await,
            Err(StoreError::Invalid(_))
        ));

        // Survives a reopen.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get("echo").unwrap(), record);
        assert_eq!(store.list().len(), 1);
    }

    #[tokio::test]
    async fn rollback_default_and_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for body in ["1", "2", "3"] {
            store
                .push(manifest("f", &["f.com"]), body.as_bytes().to_vec())
                .await
                .unwrap();
        }
        let r = store.rollback("f", None).await.unwrap();
        assert_eq!(r.active, 2);
        assert_eq!(r.mod_revision, 4);
        let r = store.rollback("f", None).await.unwrap();
        assert_eq!(r.active, 1);
        assert!(matches!(
            store.rollback("f", None).await,
            Err(StoreError::Conflict(_))
        ));
        let r = store.rollback("f", Some(3)).await.unwrap();
        assert_eq!((r.active, r.versions.len()), (3, 3));
        // Same version again: no change, no new revision.
        let rev = store.revision();
        store.rollback("f", Some(3)).await.unwrap();
        assert_eq!(store.revision(), rev);
        assert!(matches!(
            store.rollback("f", Some(9)).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.rollback("nope", None).await,
            Err(StoreError::NotFound(_))
        ));
        // A push after a rollback takes the next number after the highest.
        let v = store
            .push(manifest("f", &["f.com"]), b"4".to_vec())
            .await
            .unwrap();
        assert_eq!(v.version, 4);
    }

    #[tokio::test]
    async fn route_conflict_refused_and_nothing_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .push(manifest("a", &["x.com", "*.y.com"]), b"a".to_vec())
            .await
            .unwrap();
        let before = store.snapshot();
        let err = store
            .push(manifest("b", &["b.com", "X.com/"]), b"b".to_vec())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "route \"x.com\" is already served by function `a`"
        );
        // A path under a host `a` holds is `a`'s too.
        let err = store
            .push(manifest("b", &["x.com/b"]), b"b".to_vec())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("belongs to function `a`"), "{err}");
        let err = store
            .push(manifest("b", &["b.com", "X.com/"]), b"b".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)));
        assert_eq!(
            err.to_string(),
            "route \"x.com\" is already served by function `a`"
        );
        assert_eq!(store.snapshot(), before);
        assert_eq!(blob_count(dir.path()), 1);
        // Same function may keep its routes; a name below an exact host is not under it.
        store
            .push(manifest("a", &["x.com"]), b"a2".to_vec())
            .await
            .unwrap();
        store
            .push(manifest("b", &["b.x.com", "*.y.com"]), b"b".to_vec())
            .await
            .unwrap();

        // Rolling `a` back to v1 would take `*.y.com` back from `b`: refused.
        let err = store.rollback("a", None).await.unwrap_err();
        assert!(err.to_string().contains("`b`"), "{err}");
        assert_eq!(store.get("a").unwrap().active, 2);
    }

    #[tokio::test]
    async fn reopen_after_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .push(manifest("f", &["f.com"]), b"v1".to_vec())
            .await
            .unwrap();
        let committed = store.snapshot();
        drop(store);
        // A crash during the next push: a half-written state and blob temp, an orphan blob.
        fs::write(dir.path().join("state.json.tmp"), b"{\"revision\": 9, \"func").unwrap();
        let orphan = atoll_core::digest::sha256_hex(b"orphan");
        fs::write(dir.path().join("blobs/sha256").join(&orphan), b"orphan").unwrap();
        fs::write(
            dir.path().join("blobs/sha256").join(format!("{orphan}.tmp")),
            b"orph",
        )
        .unwrap();

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.snapshot(), committed);
        assert!(!dir.path().join("state.json.tmp").exists());
        assert!(
            !dir.path()
                .join("blobs/sha256")
                .join(format!("{orphan}.tmp"))
                .exists()
        );
        // The store keeps working; pushing the orphan's bytes reuses the blob.
        let v = store
            .push(manifest("f", &["f.com"]), b"orphan".to_vec())
            .await
            .unwrap();
        assert_eq!((v.version, v.sha256), (2, orphan));
    }

    #[tokio::test]
    async fn credentials_survive_a_reopen_and_do_not_move_the_revision() {
        use atoll_core::auth::{Grant, Scope};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .push(manifest("f", &["f.com"]), b"v1".to_vec())
            .await
            .unwrap();
        let mut changes = store.subscribe();
        changes.borrow_and_update();
        let grant = Grant {
            scope: Scope::Node,
            functions: vec![],
            domains: vec![],
            node: Some("n1".into()),
            description: String::new(),
        };
        let (credential, token) = Credential::mint(grant).unwrap();
        store.add_credential(credential.clone()).await.unwrap();
        assert!(matches!(
            store.add_credential(credential.clone()).await,
            Err(StoreError::Conflict(_))
        ));
        // Watchers follow functions only: a credential wakes none and takes no revision.
        assert_eq!(store.revision(), 1);
        assert!(!changes.has_changed().unwrap());
        let on_disk = fs::read_to_string(dir.path().join("state.json")).unwrap();
        assert!(on_disk.contains(&credential.token_sha256) && !on_disk.contains(&token));

        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.credential(&credential.id), Some(credential.clone()));
        assert_eq!(store.credentials(), std::slice::from_ref(&credential));
        store.remove_credential(&credential.id).await.unwrap();
        assert!(matches!(
            store.remove_credential(&credential.id).await,
            Err(StoreError::NotFound(_))
        ));
        drop(store);
        assert!(Store::open(dir.path()).unwrap().credentials().is_empty());
    }

    #[tokio::test]
    async fn corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("state.json"), b"{").unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Io { .. })));
    }

    #[tokio::test]
    async fn events_since() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut rx = store.subscribe();
        assert_eq!(store.events_since(0), (vec![], 0));
        store
            .push(manifest("a", &["a.com"]), b"a".to_vec())
            .await
            .unwrap(); // rev 1
        store
            .push(manifest("b", &["b.com"]), b"b".to_vec())
            .await
            .unwrap(); // rev 2
        store
            .push(manifest("a", &["a.com"]), b"a2".to_vec())
            .await
            .unwrap(); // rev 3
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);

        let (events, revision) = store.events_since(0);
        assert_eq!(revision, 3);
        let summary: Vec<(u64, String, u64)> = events
            .iter()
            .map(|e| match e {
                WatchEvent::Put { revision, deployment } => {
                    (*revision, deployment.name.clone(), deployment.version)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(summary, [(2, "b".into(), 1), (3, "a".into(), 2)]);
        let (events, _) = store.events_since(2);
        assert_eq!(events.len(), 1);
        assert_eq!(store.events_since(3), (vec![], 3));
    }
}
