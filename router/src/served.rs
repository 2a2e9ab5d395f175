//! What the node serves: the current route table of loaded functions.
//!
//! `Routing` is the one piece of shared state on the request path. Readers load the current
//! table from an `ArcSwapOption` (lock-free, no contention between cores); the sync task
//! publishes a whole new table per change. `None` means the node has no table yet and is not
//! ready.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use atoll_core::Deployment;
use atoll_isolate::InstancePool;

use crate::metrics::FunctionMetrics;
use atoll_core::route_table::{RouteEntry, RouteTable};

/// One function version, compiled, with its instance pool.
#[derive(Debug)]
pub struct ServedFunction {
    pub deployment: Deployment,
    /// The module's instances; `None` for a route that only proxies to origins.
    pub pool: Option<Arc<InstancePool>>,
    /// The manifest's origins, when it lists any.
    pub origins: Option<Arc<crate::origin::OriginPool>>,
    pub metrics: Arc<FunctionMetrics>,
    /// `x-atoll-version` on its answers: the version number, made once.
    pub version_header: http::HeaderValue,
    /// The function's gray release, held by its active version (the one routed to).
    pub split: Option<ServedSplit>,
}

/// A traffic split as this node serves it: every version in it prepared.
#[derive(Debug)]
pub struct ServedSplit {
    /// Newest version first (as [`atoll_core::traffic::choose`] takes them).
    pub versions: Vec<SplitShare>,
    pub sticky: Option<atoll_core::traffic::StickyKey>,
}

/// One version of a split and its share.
#[derive(Debug)]
pub struct SplitShare {
    pub version: u64,
    pub percent: u8,
    /// `None`: the active version itself (which holds the split).
    pub served: Option<Arc<ServedFunction>>,
}

impl ServedFunction {
    pub fn new(
        deployment: Deployment,
        pool: Option<Arc<InstancePool>>,
        origins: Option<Arc<crate::origin::OriginPool>>,
        metrics: Arc<FunctionMetrics>,
    ) -> Self {
        ServedFunction {
            version_header: http::HeaderValue::from(deployment.version),
            deployment,
            pool,
            origins,
            metrics,
            split: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.deployment.name
    }

    /// This version, prepared, under `deployment` (the same version, module and manifest;
    /// another traffic split, or none): its instances, origins and metrics are shared, so
    /// a split that moves on keeps every version warm.
    pub fn sharing(&self, deployment: Deployment) -> ServedFunction {
        ServedFunction {
            version_header: self.version_header.clone(),
            deployment,
            pool: self.pool.clone(),
            origins: self.origins.clone(),
            metrics: Arc::clone(&self.metrics),
            split: None,
        }
    }

    /// Whether this is the version `deployment` names, prepared as it says (module,
    /// manifest and secrets; the split aside).
    pub fn prepares(&self, deployment: &Deployment) -> bool {
        self.deployment.version == deployment.version
            && self.deployment.sha256 == deployment.sha256
            && self.deployment.manifest == deployment.manifest
            && self.deployment.secrets == deployment.secrets
    }

    /// The version of this function that serves a request: the one `pinned` names (the
    /// `x-atoll-version` header, any version in the split, also one at 0%), else the
    /// split's choice by the sticky key's point, or by `draw` (a random point in
    /// `0..10_000`) without one. `None`: the pinned version is not served here.
    pub fn pick(
        self: &Arc<Self>,
        pinned: Option<u64>,
        sticky_point: impl FnOnce(&atoll_core::traffic::StickyKey) -> Option<u16>,
        draw: impl FnOnce() -> u16,
    ) -> Option<&Arc<ServedFunction>> {
        let Some(split) = &self.split else {
            return match pinned {
                Some(version) if version != self.deployment.version => None,
                _ => Some(self),
            };
        };
        let share = match pinned {
            Some(version) => split.versions.iter().find(|share| share.version == version)?,
            None => {
                let point = split.sticky.as_ref().and_then(sticky_point).unwrap_or_else(draw);
                let index =
                    atoll_core::traffic::choose(split.versions.iter().map(|share| share.percent), point);
                // A split is never empty (checked where it is made); were one, the active
                // version serves.
                split.versions.get(index)?
            }
        };
        Some(share.served.as_ref().unwrap_or(self))
    }

    /// This version and every other version its split holds.
    pub fn with_split_versions(&self) -> impl Iterator<Item = &ServedFunction> {
        std::iter::once(self).chain(
            self.split
                .iter()
                .flat_map(|split| split.versions.iter().filter_map(|share| share.served.as_deref())),
        )
    }
}

pub type FunctionTable = RouteTable<Arc<ServedFunction>>;

/// Builds a table from the served functions, ordered by name so ties are deterministic.
pub fn build_table<'a>(functions: impl IntoIterator<Item = &'a Arc<ServedFunction>>) -> FunctionTable {
    let mut functions: Vec<&Arc<ServedFunction>> = functions.into_iter().collect();
    functions.sort_by(|a, b| a.name().cmp(b.name()));
    RouteTable::new(functions.into_iter().flat_map(|served| {
        served
            .deployment
            .manifest
            .routes
            .iter()
            .filter_map(|route| match route.parse() {
                Ok(pattern) => Some(RouteEntry {
                    pattern,
                    target: Arc::clone(served),
                }),
                Err(error) => {
                    tracing::warn!(function = served.name(), %error, "skipping invalid route");
                    None
                }
            })
            .collect::<Vec<_>>()
    }))
}

/// How far the node's table is from its source, as the sync task last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStatus {
    /// Revision up to which every change is applied or quarantined (persisted).
    pub applied_revision: u64,
    /// Newest revision the source has shown.
    pub source_revision: u64,
    /// Versions being prepared now.
    pub loading: Vec<String>,
    /// Versions that failed to load and are retried with backoff; the function keeps
    /// serving what it served before (or nothing, if it is new).
    pub quarantined: Vec<QuarantineReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuarantineReport {
    pub function: String,
    pub version: u64,
    pub reason: String,
    pub failures: u32,
}

impl SyncStatus {
    /// Revisions the table is behind its source.
    pub fn lag(&self) -> u64 {
        self.source_revision.saturating_sub(self.applied_revision)
    }

    /// Whether something the source holds is not served: a quarantined version, or a
    /// version still loading.
    pub fn is_degraded(&self) -> bool {
        !self.quarantined.is_empty() || !self.loading.is_empty()
    }
}

/// The node's current routing state, shared by listeners, admin and sync.
#[derive(Default)]
pub struct Routing {
    table: ArcSwapOption<FunctionTable>,
    /// The same functions by name, published with the table (service calls find them
    /// here).
    by_name: ArcSwap<std::collections::HashMap<String, Arc<ServedFunction>>>,
    sync: ArcSwap<SyncStatus>,
}

impl Routing {
    pub fn new() -> Arc<Self> {
        Arc::new(Routing::default())
    }

    pub fn current(&self) -> Option<Arc<FunctionTable>> {
        self.table.load_full()
    }

    /// The current table for a moment (no await while it is held): reading it so writes
    /// nothing other threads read, unlike [`Self::current`]'s clone.
    pub fn current_guard(&self) -> arc_swap::Guard<Option<Arc<FunctionTable>>> {
        self.table.load()
    }

    pub fn publish(&self, table: FunctionTable) {
        metrics::gauge!(crate::metrics::ROUTES).set(table.len() as f64);
        let by_name = table
            .entries()
            .map(|entry| (entry.target.name().to_string(), Arc::clone(&entry.target)))
            .collect();
        self.by_name.store(Arc::new(by_name));
        self.table.store(Some(Arc::new(table)));
    }

    /// Moves the request counts each function's workers keep into the metrics registry
    /// ([`crate::metrics::FunctionMetrics::flush`]).
    pub fn flush_metrics(&self) {
        for served in self.by_name.load().values() {
            for version in served.with_split_versions() {
                version.metrics.flush();
            }
        }
    }

    /// The served function called `name`.
    pub fn function(&self, name: &str) -> Option<Arc<ServedFunction>> {
        self.by_name.load().get(name).cloned()
    }

    /// Every served function once (a function with several routes appears once).
    pub fn functions(&self) -> Vec<Arc<ServedFunction>> {
        let Some(table) = self.current() else {
            return Vec::new();
        };
        let mut functions: Vec<Arc<ServedFunction>> = Vec::new();
        for entry in table.entries() {
            if !functions.iter().any(|known| Arc::ptr_eq(known, &entry.target)) {
                functions.push(Arc::clone(&entry.target));
            }
        }
        functions
    }

    /// Exact host names routed now, sorted: the domains ACME obtains certificates for.
    pub fn exact_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .current()
            .map(|table| table.exact_hosts().map(str::to_string).collect())
            .unwrap_or_default();
        hosts.sort();
        hosts
    }

    pub fn is_ready(&self) -> bool {
        self.table.load().is_some()
    }

    pub fn sync_status(&self) -> Arc<SyncStatus> {
        self.sync.load_full()
    }

    pub fn set_sync_status(&self, status: SyncStatus) {
        self.sync.store(Arc::new(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(number: u64) -> ServedFunction {
        let deployment = Deployment {
            name: "f".into(),
            version: number,
            sha256: "0".repeat(64),
            manifest: atoll_core::Manifest::parse(
                "name = \"f\"\nwasm = \"f.wasm\"\nroutes = [\"f.localhost\"]\n",
            )
            .unwrap(),
            traffic: None,
            secrets: Default::default(),
        };
        ServedFunction::new(
            deployment,
            None,
            None,
            Arc::new(FunctionMetrics::new("f", number)),
        )
    }

    #[test]
    fn a_request_goes_to_the_pinned_version_or_where_its_point_falls() {
        let canary = Arc::new(version(2));
        let mut stable = version(1);
        stable.split = Some(ServedSplit {
            versions: vec![
                SplitShare {
                    version: 2,
                    percent: 10,
                    served: Some(Arc::clone(&canary)),
                },
                SplitShare {
                    version: 1,
                    percent: 90,
                    served: None,
                },
            ],
            sticky: Some(atoll_core::traffic::StickyKey::Ip),
        });
        let stable = Arc::new(stable);
        let picked = |pinned, point: Option<u16>| {
            stable
                .pick(pinned, |_| point, || 9_999)
                .map(|served| served.deployment.version)
        };
        assert_eq!(picked(None, Some(999)), Some(2), "the newest version's tenth");
        assert_eq!(picked(None, Some(1_000)), Some(1));
        assert_eq!(picked(None, None), Some(1), "no key: the draw decides");
        assert_eq!(picked(Some(2), Some(5_000)), Some(2), "a pin wins over the point");
        assert_eq!(picked(Some(1), Some(0)), Some(1));
        assert_eq!(picked(Some(9), None), None, "a version the split does not hold");
        let alone = Arc::new(version(3));
        assert_eq!(
            alone.pick(Some(3), |_| None, || 0).map(|s| s.deployment.version),
            Some(3)
        );
        assert!(alone.pick(Some(2), |_| None, || 0).is_none());
        assert_eq!(stable.with_split_versions().count(), 2);
    }
}
