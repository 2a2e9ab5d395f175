//! The [`Syncer`]: the I/O around [`plan`] — following the watch, starting loads and
//! applying their results, quarantining what fails, persisting the node's state and
//! publishing the route table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use atoll_control::{ControlError, ControlPlane};
use atoll_core::{Deployment, WatchEvent};
use atoll_isolate::ArtifactCache;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::loader::{CONCURRENT_LOADS, Loader};
use super::plan::{BACKOFF_MAX, BACKOFF_START, Plan, plan, quarantine_backoff};
use super::{FunctionCeilings, SyncError};
use crate::metrics;
use crate::node_cache::{CachedState, NodeCache};
use crate::served::{QuarantineReport, Routing, ServedFunction, SyncStatus, build_table};

/// Longest silence tolerated on the watch stream (the registry sends heartbeats every 5 s,
/// and so does a NATS watch after checking that NATS answers).
const WATCH_SILENCE_LIMIT: Duration = Duration::from_secs(15);

/// A version that failed to load. The function keeps serving what it served before (or
/// nothing, if it is new); the version is tried again after a backoff, and dropped when the
/// source moves the function on (a new version, a rollback, a delete).
#[derive(Debug)]
struct Quarantined {
    deployment: Deployment,
    reason: String,
    failures: u32,
    retry_at: tokio::time::Instant,
}

/// A finished load task.
struct LoadDone {
    deployment: Deployment,
    result: Result<Arc<ServedFunction>, SyncError>,
}

/// A load in flight, and the revision of the event that asked for it (`None` for a retry
/// of a quarantined version, which holds back no revision).
struct Loading {
    deployment: Deployment,
    revision: Option<u64>,
}

/// Follows a [`ControlPlane`] and keeps the node's table in step with it.
///
/// One deployment's failure never holds up the others: each version loads in its own task
/// (at most `CONCURRENT_LOADS` at once), the watch goes on meanwhile, and a version that
/// fails — a module that does not compile here, an init that traps, a blob that does not
/// match its digest — is quarantined and retried with backoff while the rest carries on.
/// The persisted revision is the highest one up to which every change is applied or
/// quarantined, so a restart neither skips a load still in flight nor replays a poison
/// event forever; quarantined versions are persisted too and retried after a restart.
pub struct Syncer {
    source: Arc<ControlPlane>,
    pub(super) loader: Loader,
    routing: Arc<Routing>,
    served: HashMap<String, Arc<ServedFunction>>,
    revision: u64,
    /// Newest revision the source has shown.
    seen: u64,
    loading: HashMap<String, Loading>,
    loads: tokio::task::JoinSet<LoadDone>,
    quarantine: HashMap<String, Quarantined>,
    /// Whether what [`Syncer::persisted_state`] returns changed since it was last written.
    /// Set only where the revision, what is served or what is quarantined changes, so an
    /// event that changes none of them (a heartbeat) neither builds nor writes the state.
    state_changed: bool,
    /// What was last written, to check in debug builds that no change went unflagged.
    #[cfg(debug_assertions)]
    last_persisted: Option<CachedState>,
}

impl Syncer {
    pub fn new(
        source: Arc<ControlPlane>,
        cache: NodeCache,
        artifacts: ArtifactCache,
        routing: Arc<Routing>,
    ) -> Self {
        Syncer {
            loader: Loader {
                source: Arc::clone(&source),
                cache,
                artifacts,
                slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_LOADS)),
                ceilings: Arc::new(FunctionCeilings::default()),
                outbound: None,
                services: None,
                kv: None,
                kv_waits: Arc::new(tokio::sync::Semaphore::new(
                    atoll_isolate::wasi_kv::DEFAULT_MAX_WAITS,
                )),
                own_ports: Arc::new(Vec::new()),
                secrets_key: None,
            },
            source,
            routing,
            served: HashMap::new(),
            revision: 0,
            seen: 0,
            loading: HashMap::new(),
            loads: tokio::task::JoinSet::new(),
            quarantine: HashMap::new(),
            // Nothing written yet: the first advance writes.
            state_changed: true,
            #[cfg(debug_assertions)]
            last_persisted: None,
        }
    }

    /// Caps what every function gets at `ceilings`, whatever its manifest asks for.
    /// The key that opens functions' secrets.
    pub fn with_secrets_key(mut self, key: Option<Arc<atoll_core::secrets::SecretKey>>) -> Self {
        self.loader.secrets_key = key;
        self
    }

    pub fn with_ceilings(mut self, ceilings: FunctionCeilings) -> Self {
        self.loader.ceilings = Arc::new(ceilings);
        self
    }

    /// Lets functions call out through `client` (as their `[outbound]` allows) and call
    /// each other through `services` (as their `[services]` bind); without it every
    /// outbound call is refused.
    pub fn with_outbound(
        mut self,
        client: Arc<atoll_isolate::outbound::OutboundClient>,
        services: Arc<dyn atoll_isolate::wasi_http::ServiceCaller>,
    ) -> Self {
        self.loader.outbound = Some(client);
        self.loader.services = Some(services);
        self
    }

    /// The ports this node listens on: origins there that could be the node itself are
    /// refused (`OriginPool::new`).
    pub fn with_own_ports(mut self, ports: Vec<u16>) -> Self {
        self.loader.own_ports = Arc::new(ports);
        self
    }

    /// Sends functions' key-value calls to `backend`; without it every call is refused.
    pub fn with_kv(mut self, backend: Arc<dyn atoll_isolate::wasi_kv::KvBackend>) -> Self {
        self.loader.kv = Some(backend);
        self
    }

    /// Rebuilds the table from the disk cache, if there is one. Returns how many functions
    /// were restored.
    pub async fn restore_from_disk(&mut self) -> Result<usize, SyncError> {
        let Some(state) = self.loader.cache.load_state()? else {
            return Ok(0);
        };
        let expected = state.deployments.len();
        for deployment in state.deployments {
            // An origin route has no module, and a split more than one: both are prepared
            // as a watch event would have them (modules from the disk cache first).
            if deployment.manifest.is_origin_only() || deployment.traffic.is_some() {
                match self.loader.fetch_and_load(deployment, &[]).await {
                    Ok(served) => self.serve(served),
                    Err(error) => {
                        tracing::warn!(%error, "could not restore a cached origin route or traffic split")
                    }
                }
                continue;
            }
            let Some(bytes) = self.loader.cache.read_module(&deployment.sha256) else {
                tracing::warn!(function = %deployment.name, "module missing from the disk cache; it will be fetched");
                continue;
            };
            match self.loader.load(deployment.clone(), bytes).await {
                Ok(served) => self.serve(served),
                Err(error) => tracing::warn!(%error, "could not restore a cached function"),
            }
        }
        // Versions quarantined before the restart are tried again soon.
        for deployment in state.quarantined {
            self.quarantine_version(Quarantined {
                deployment,
                reason: "quarantined before the node restarted".into(),
                failures: 0,
                retry_at: tokio::time::Instant::now(),
            });
        }
        // Resume from the cached revision only if everything it names was restored;
        // otherwise catch up from scratch (Puts of what is already served are no-ops).
        self.set_revision(if self.served.len() == expected {
            state.revision
        } else {
            0
        });
        self.seen = self.revision;
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
            // Loads in flight carry on while the watch is down; their results are applied
            // when it resumes.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn follow(&mut self, backoff: &mut Duration) -> Result<(), SyncError> {
        let mut events = self.source.watch(self.revision).await?;
        let mut silent_after = tokio::time::Instant::now() + WATCH_SILENCE_LIMIT;
        loop {
            let retry_at = self.next_retry();
            tokio::select! {
                event = tokio::time::timeout_at(silent_after, events.next()) => {
                    let event = match event {
                        Err(_) => return Err(ControlError::Silent.into()),
                        Ok(None) => return Err(ControlError::Ended.into()),
                        Ok(Some(event)) => event?,
                    };
                    silent_after = tokio::time::Instant::now() + WATCH_SILENCE_LIMIT;
                    self.apply_event(event, backoff)?;
                }
                Some(done) = self.loads.join_next(), if !self.loads.is_empty() => {
                    match done {
                        Ok(done) => self.finish_load(done)?,
                        Err(join_error) => tracing::error!(%join_error, "a load task failed"),
                    }
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    self.retry_quarantined();
                }
            }
        }
    }

    fn apply_event(&mut self, event: WatchEvent, backoff: &mut Duration) -> Result<(), SyncError> {
        let revision = event.revision();
        if let WatchEvent::Synced { .. } = event
            && revision < self.revision
        {
            // A registry rebuilt from scratch, a recreated bucket, another control
            // plane: its revisions are not ours, and resuming from ours would skip its
            // changes. Catch up from the start; unchanged versions cost nothing.
            let applied = self.revision;
            self.set_revision(0);
            self.seen = 0;
            // Loads in flight were asked for in the old numbering: they hold back nothing
            // now (the catch-up asks for them again).
            for loading in self.loading.values_mut() {
                loading.revision = None;
            }
            return Err(SyncError::SourceReset {
                source_revision: revision,
                applied,
            });
        }
        self.seen = self.seen.max(revision);
        if let WatchEvent::Put { deployment, .. } = &event
            && self
                .served
                .get(&deployment.name)
                .is_some_and(|served| served.deployment == *deployment)
        {
            // Back to exactly what is served (a rollback of a version that is loading or
            // quarantined): that version is no longer wanted.
            self.loading.remove(&deployment.name);
            self.clear_quarantine(&deployment.name);
        }
        // `plan` looks up only the event's own function: copy that one, not the table (a
        // heartbeat copies nothing).
        let function = match &event {
            WatchEvent::Put { deployment, .. } => Some(&deployment.name),
            WatchEvent::Delete { name, .. } => Some(name),
            WatchEvent::Synced { .. } | WatchEvent::Heartbeat { .. } => None,
        };
        let served_versions = function
            .and_then(|name| self.served.get_key_value(name))
            .map(|(name, served)| {
                (
                    name.clone(),
                    (served.deployment.version, served.deployment.sha256.clone()),
                )
            })
            .into_iter()
            .collect();
        let decided = match event {
            // Already loading or quarantined exactly this: nothing new to do.
            WatchEvent::Put { ref deployment, .. }
                if self
                    .loading
                    .get(&deployment.name)
                    .is_some_and(|loading| loading.deployment == *deployment)
                    || self
                        .quarantine
                        .get(&deployment.name)
                        .is_some_and(|quarantined| quarantined.deployment == *deployment) =>
            {
                Plan::Advance
            }
            // The same version and module with other secrets or another traffic split (a
            // gray release moved on), or with another manifest (only from another source, after a
            // reset: what that source says wins): prepared again.
            WatchEvent::Put { deployment, .. }
                if self.served.get(&deployment.name).is_some_and(|served| {
                    served.deployment.version == deployment.version
                        && served.deployment.sha256 == deployment.sha256
                        && (served.deployment.manifest != deployment.manifest
                            || served.deployment.traffic != deployment.traffic
                            || served.deployment.secrets != deployment.secrets)
                }) =>
            {
                Plan::Load(Box::new(deployment))
            }
            WatchEvent::Delete { ref name, .. } => {
                // Whatever was loading or quarantined for it is moot now.
                self.loading.remove(name);
                self.clear_quarantine(name);
                plan(event, &served_versions)
            }
            event => plan(event, &served_versions),
        };
        match decided {
            Plan::Load(deployment) => {
                // A new version supersedes a quarantined or loading one.
                self.clear_quarantine(&deployment.name);
                if self
                    .served
                    .get(&deployment.name)
                    .is_some_and(|served| served.deployment == *deployment)
                {
                    // Moved back to what is served (a rollback of a bad push).
                    self.loading.remove(&deployment.name);
                } else {
                    self.start_load(*deployment, Some(revision));
                }
                self.advance()?;
            }
            Plan::Remove(name) => {
                self.stop_serving(&name);
                self.publish();
                self.advance()?;
            }
            Plan::Advance => self.advance()?,
            Plan::MarkSynced => {
                if !self.routing.is_ready() {
                    self.publish();
                }
                self.advance()?;
                *backoff = BACKOFF_START;
                tracing::info!(
                    revision = self.revision,
                    functions = self.served.len(),
                    loading = self.loading.len(),
                    quarantined = self.quarantine.len(),
                    "in sync with the source"
                );
            }
        }
        Ok(())
    }

    /// Starts preparing `deployment` in its own task.
    fn start_load(&mut self, deployment: Deployment, revision: Option<u64>) {
        let loader = self.loader.clone();
        // The versions the function serves now, to take as they are where they match.
        let prepared: Vec<Arc<ServedFunction>> =
            self.served
                .get(&deployment.name)
                .map(|served| {
                    std::iter::once(Arc::clone(served))
                        .chain(
                            served.split.iter().flat_map(|split| {
                                split.versions.iter().filter_map(|share| share.served.clone())
                            }),
                        )
                        .collect()
                })
                .unwrap_or_default();
        self.loading.insert(
            deployment.name.clone(),
            Loading {
                deployment: deployment.clone(),
                revision,
            },
        );
        self.loads.spawn(async move {
            // A panic while preparing is that version's failure (quarantined like any
            // other), never a load that stays "in flight" and holds the revision back.
            let result = std::panic::AssertUnwindSafe(loader.fetch_and_load(deployment.clone(), &prepared))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    Err(SyncError::Load {
                        name: deployment.name.clone(),
                        version: deployment.version,
                        reason: "preparing the version panicked".into(),
                    })
                });
            LoadDone { deployment, result }
        });
        self.report();
    }

    fn finish_load(&mut self, done: LoadDone) -> Result<(), SyncError> {
        let name = done.deployment.name.clone();
        if !self
            .loading
            .get(&name)
            .is_some_and(|loading| loading.deployment == done.deployment)
        {
            // Superseded (a newer version, a delete) while it loaded.
            return Ok(());
        }
        self.loading.remove(&name);
        match done.result {
            Ok(served) => {
                self.clear_quarantine(&name);
                self.serve(served);
                self.publish();
            }
            Err(error) => {
                let failures = self
                    .quarantine
                    .get(&name)
                    .filter(|quarantined| quarantined.deployment == done.deployment)
                    .map_or(0, |quarantined| quarantined.failures)
                    .saturating_add(1);
                let wait = quarantine_backoff(&error, failures);
                ::metrics::counter!(metrics::SYNC_LOAD_FAILURES_TOTAL, "function" => name.clone())
                    .increment(1);
                tracing::warn!(
                    function = %name,
                    version = done.deployment.version,
                    %error,
                    failures,
                    retry_in = ?wait,
                    "version quarantined; the node keeps serving the rest"
                );
                self.quarantine_version(Quarantined {
                    deployment: done.deployment,
                    reason: error.to_string(),
                    failures,
                    retry_at: tokio::time::Instant::now() + wait,
                });
            }
        }
        self.advance()
    }

    /// When the next quarantined version is due to be tried again.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.quarantine
            .iter()
            .filter(|(name, _)| !self.loading.contains_key(*name))
            .map(|(_, quarantined)| quarantined.retry_at)
            .min()
    }

    fn retry_quarantined(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<Deployment> = self
            .quarantine
            .iter()
            .filter(|(name, quarantined)| quarantined.retry_at <= now && !self.loading.contains_key(*name))
            .map(|(_, quarantined)| quarantined.deployment.clone())
            .collect();
        for deployment in due {
            tracing::info!(function = %deployment.name, version = deployment.version, "retrying a quarantined version");
            self.start_load(deployment, None);
        }
    }

    /// Moves the applied revision up to what is resolved — everything seen, short of the
    /// oldest event whose load is still in flight — and persists what is served,
    /// quarantined and applied when any of it changed.
    fn advance(&mut self) -> Result<(), SyncError> {
        let resolved = match self.loading.values().filter_map(|loading| loading.revision).min() {
            Some(oldest) => oldest.saturating_sub(1),
            None => self.seen,
        };
        if resolved > self.revision {
            self.set_revision(resolved);
        }
        #[cfg(debug_assertions)]
        if !self.state_changed {
            assert!(
                self.last_persisted.as_ref() == Some(&self.persisted_state()),
                "the persisted state changed without being flagged"
            );
        }
        if self.state_changed {
            let persisted = self.persisted_state();
            self.loader.cache.save_state(&persisted)?;
            self.state_changed = false;
            #[cfg(debug_assertions)]
            {
                self.last_persisted = Some(persisted);
            }
        }
        self.report();
        Ok(())
    }

    /// Serves `served` for its function, in place of what it served before.
    fn serve(&mut self, served: Arc<ServedFunction>) {
        let name = &served.deployment.name;
        self.state_changed |= self
            .served
            .get(name)
            .is_none_or(|current| current.deployment != served.deployment);
        self.served.insert(name.clone(), served);
    }

    /// Stops serving function `name`, if it is served.
    fn stop_serving(&mut self, name: &str) {
        self.state_changed |= self.served.remove(name).is_some();
    }

    /// Quarantines a version, in place of whatever was quarantined for its function. A
    /// retry that failed again changes only what is not persisted (failures, next retry).
    fn quarantine_version(&mut self, quarantined: Quarantined) {
        let name = &quarantined.deployment.name;
        self.state_changed |= self
            .quarantine
            .get(name)
            .is_none_or(|current| current.deployment != quarantined.deployment);
        self.quarantine.insert(name.clone(), quarantined);
    }

    /// Drops what is quarantined for function `name`, if anything.
    fn clear_quarantine(&mut self, name: &str) {
        self.state_changed |= self.quarantine.remove(name).is_some();
    }

    fn set_revision(&mut self, revision: u64) {
        self.state_changed |= self.revision != revision;
        self.revision = revision;
    }

    /// Publishes how far behind the source the node is, for `/readyz`, `/sync` and metrics.
    fn report(&self) {
        let mut loading: Vec<String> = self
            .loading
            .values()
            .map(|loading| format!("{} v{}", loading.deployment.name, loading.deployment.version))
            .collect();
        loading.sort();
        let mut quarantined: Vec<QuarantineReport> = self
            .quarantine
            .values()
            .map(|quarantined| QuarantineReport {
                function: quarantined.deployment.name.clone(),
                version: quarantined.deployment.version,
                reason: quarantined.reason.clone(),
                failures: quarantined.failures,
            })
            .collect();
        quarantined.sort_by(|a, b| a.function.cmp(&b.function));
        let status = SyncStatus {
            applied_revision: self.revision,
            source_revision: self.seen.max(self.revision),
            loading,
            quarantined,
        };
        ::metrics::gauge!(metrics::SYNC_QUARANTINED).set(status.quarantined.len() as f64);
        ::metrics::gauge!(metrics::SYNC_LOADING).set(status.loading.len() as f64);
        ::metrics::gauge!(metrics::SYNC_LAG).set(status.lag() as f64);
        self.routing.set_sync_status(status);
    }

    fn publish(&self) {
        self.routing.publish(build_table(self.served.values()));
        ::metrics::gauge!(metrics::ROUTE_TABLE_REVISION).set(self.revision as f64);
    }

    fn persisted_state(&self) -> CachedState {
        let mut deployments: Vec<Deployment> = self
            .served
            .values()
            .map(|served| served.deployment.clone())
            .collect();
        deployments.sort_by(|a, b| a.name.cmp(&b.name));
        let mut quarantined: Vec<Deployment> = self
            .quarantine
            .values()
            .map(|quarantined| quarantined.deployment.clone())
            .collect();
        quarantined.sort_by(|a, b| a.name.cmp(&b.name));
        CachedState {
            revision: self.revision,
            deployments,
            quarantined,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::{deployment, guest, offline_syncer};

    /// Applies `event` and finishes the load it starts, if any.
    async fn apply_and_load(syncer: &mut Syncer, event: WatchEvent) {
        apply(syncer, event);
        finish_loads(syncer).await;
    }

    /// Applies `event`; a load it starts is left in flight until [`finish_loads`].
    fn apply(syncer: &mut Syncer, event: WatchEvent) {
        let mut backoff = BACKOFF_START;
        syncer.apply_event(event, &mut backoff).unwrap();
    }

    async fn finish_loads(syncer: &mut Syncer) {
        while let Some(done) = syncer.loads.join_next().await {
            syncer.finish_load(done.unwrap()).unwrap();
        }
    }

    /// Revision, served `name@version`s, quarantined `name@version`s.
    type Written = Option<(u64, Vec<String>, Vec<String>)>;

    /// What the state file at `path` holds; `None` when there is none.
    fn written(path: &std::path::Path) -> Written {
        let bytes = std::fs::read(path).ok()?;
        let state: CachedState = serde_json::from_slice(&bytes).unwrap();
        let versions = |deployments: &[Deployment]| {
            deployments
                .iter()
                .map(|deployment| format!("{}@{}", deployment.name, deployment.version))
                .collect()
        };
        Some((
            state.revision,
            versions(&state.deployments),
            versions(&state.quarantined),
        ))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_state_is_written_when_and_only_when_it_changes() {
        let directory = tempfile::tempdir().unwrap();
        let mut syncer = offline_syncer(directory.path());
        let state_file = directory.path().join("node-state.json");
        let wasm = guest("hello");
        let sha256 = atoll_core::digest::sha256_hex(&wasm);
        syncer.loader.cache.write_module(&sha256, &wasm).unwrap();
        let put = |revision, name, version| WatchEvent::Put {
            revision,
            deployment: deployment(name, version, &sha256),
        };
        // Deletes the state file and returns what it held: a later `written` of `None`
        // means nothing wrote it since.
        let take_written = || {
            let written = written(&state_file);
            let _ = std::fs::remove_file(&state_file);
            written
        };
        let strings = |items: &[&str]| items.iter().map(ToString::to_string).collect::<Vec<_>>();

        apply_and_load(&mut syncer, put(1, "hello", 1)).await;
        assert_eq!(
            take_written(),
            Some((1, strings(&["hello@1"]), vec![])),
            "a deploy is written"
        );

        // Heartbeats at the applied revision change nothing: nothing is marked or written.
        for _ in 0..3 {
            apply_and_load(&mut syncer, WatchEvent::Heartbeat { revision: 1 }).await;
            assert!(!syncer.state_changed, "a heartbeat marked the state changed");
        }
        assert_eq!(take_written(), None, "a heartbeat rewrote the state");

        // A heartbeat past the applied revision moves it: written.
        apply_and_load(&mut syncer, WatchEvent::Heartbeat { revision: 2 }).await;
        assert_eq!(take_written(), Some((2, strings(&["hello@1"]), vec![])));

        // While an older event's load is in flight the revision stays behind it, so these
        // are written for what they change, not for a new revision.
        apply(&mut syncer, put(3, "other", 1));
        assert_eq!(take_written(), None, "nothing changed yet");
        apply(
            &mut syncer,
            WatchEvent::Delete {
                revision: 4,
                name: "hello".into(),
            },
        );
        assert_eq!(take_written(), Some((2, vec![], vec![])), "a delete is written");
        apply(&mut syncer, put(5, "hello", 2));
        finish_loads(&mut syncer).await;
        assert_eq!(
            take_written(),
            Some((5, strings(&["hello@2", "other@1"]), vec![]))
        );

        // A version that fails to load (its module is neither cached nor reachable) is
        // quarantined, here while an older event's load waits for a load slot: written for
        // the quarantine alone.
        let all_slots = Arc::clone(&syncer.loader.slots)
            .acquire_many_owned(CONCURRENT_LOADS as u32)
            .await
            .unwrap();
        apply(&mut syncer, put(6, "other", 2));
        let broken = deployment("broken", 1, &"0".repeat(64));
        apply(
            &mut syncer,
            WatchEvent::Put {
                revision: 7,
                deployment: broken.clone(),
            },
        );
        let done = syncer.loads.join_next().await.unwrap().unwrap();
        assert_eq!(done.deployment, broken, "fails before it needs a slot");
        syncer.finish_load(done).unwrap();
        assert_eq!(
            take_written(),
            Some((5, strings(&["hello@2", "other@1"]), strings(&["broken@1"]))),
            "a quarantine is written"
        );
        drop(all_slots);
        finish_loads(&mut syncer).await;
        assert_eq!(
            take_written(),
            Some((7, strings(&["hello@2", "other@2"]), strings(&["broken@1"])))
        );

        // Failing again on a retry changes only what is not persisted.
        syncer.start_load(broken, None);
        finish_loads(&mut syncer).await;
        assert_eq!(syncer.quarantine["broken"].failures, 2);
        assert_eq!(take_written(), None, "a failed retry rewrote the state");

        // A new version supersedes the quarantined one: written, with the revision held
        // back by a load in flight.
        apply(&mut syncer, put(8, "other", 3));
        assert_eq!(take_written(), None, "nothing changed yet");
        apply(&mut syncer, put(9, "broken", 2));
        assert_eq!(
            take_written(),
            Some((7, strings(&["hello@2", "other@2"]), vec![])),
            "leaving quarantine is written"
        );
        finish_loads(&mut syncer).await;
        assert_eq!(
            take_written(),
            Some((9, strings(&["broken@2", "hello@2", "other@3"]), vec![]))
        );
    }
}
