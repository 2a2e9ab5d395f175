//! Where the registry keeps its state: one data directory, or a NATS JetStream cluster.
//!
//! ```text
//! Registry ──▶ Backend::Embedded(Store)      one machine: DATA/state.json + DATA/blobs/
//!          └─▶ Backend::Nats(NatsStore)      many registries: KV bucket + object store
//! ```
//!
//! The API, the validation of a push and the watch protocol are the same for both; only
//! this enum knows which store answers. An enum rather than a trait object: there are two
//! implementations, both async, and a `match` keeps every call static and readable.
//!
//! The decisions both stores make — the next version of a push, the target of a rollback,
//! whether another function already serves a route — are plain functions here, free of
//! I/O, so the NATS store's compare-and-set loop only has to read, decide and write.

use tokio::sync::watch;

use crate::store::Store;
use atoll_control::nats::NatsStore;
use atoll_core::StoreError;
use atoll_core::auth::Credential;
use atoll_core::manifest::Manifest;
use atoll_core::membership::{MemberStatus, NodeAnnouncement};
use atoll_core::model::{FunctionRecord, Version};
use atoll_core::watch::WatchEvent;

/// The registry's store: embedded (default) or NATS JetStream. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Metadata and modules in one data directory ([`Store`]).
    Embedded(Store),
    /// Metadata in a JetStream KV bucket, modules in a JetStream object store.
    Nats(NatsStore),
}

impl Backend {
    /// Records a node's heartbeat: in memory for the embedded store (heartbeats rebuild it
    /// within one TTL after a restart), in a KV bucket shared by every registry for NATS.
    pub async fn announce(&self, announcement: NodeAnnouncement) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(store) => {
                store.announce(announcement);
                Ok(())
            }
            Backend::Nats(store) => store.announce(&announcement).await,
        }
    }

    /// Every node heard from recently, with its health.
    pub fn members(&self) -> Vec<MemberStatus> {
        match self {
            Backend::Embedded(store) => store.members_now(),
            Backend::Nats(store) => store.members(),
        }
    }

    /// Every function, sorted by name.
    pub async fn list(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        match self {
            Backend::Embedded(store) => Ok(store.list()),
            Backend::Nats(store) => store.list().await,
        }
    }

    /// One function, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        match self {
            Backend::Embedded(store) => Ok(store.get(name)),
            Backend::Nats(store) => store.get(name).await,
        }
    }

    /// The module bytes with this SHA-256 (verified against it).
    pub async fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        match self {
            Backend::Embedded(store) => store.read_blob(sha256).await,
            Backend::Nats(store) => store.read_blob(sha256).await,
        }
    }

    /// Stores a new version of `manifest.name`, active with `takes_traffic` (see
    /// [`Store::push`] and [`atoll_core::rules::plan_push`]).
    pub async fn push(
        &self,
        manifest: Manifest,
        module: Vec<u8>,
        takes_traffic: bool,
    ) -> Result<Version, StoreError> {
        match self {
            Backend::Embedded(store) => store.push_with_traffic(manifest, module, takes_traffic).await,
            Backend::Nats(store) => store.push_with_traffic(manifest, module, takes_traffic).await,
        }
    }

    /// Sets or removes a secret (see [`Store::set_secret`]).
    pub async fn set_secret(
        &self,
        name: &str,
        key: &str,
        sealed: Option<atoll_core::secrets::SealedSecret>,
    ) -> Result<bool, StoreError> {
        match self {
            Backend::Embedded(store) => store.set_secret(name, key, sealed).await,
            Backend::Nats(store) => store.set_secret(name, key, sealed).await,
        }
    }

    /// Sets `name`'s traffic split (see [`Store::set_traffic`]).
    pub async fn set_traffic(
        &self,
        name: &str,
        split: atoll_core::traffic::TrafficSplit,
    ) -> Result<FunctionRecord, StoreError> {
        match self {
            Backend::Embedded(store) => store.set_traffic(name, split).await,
            Backend::Nats(store) => store.set_traffic(name, split).await,
        }
    }

    /// Moves `name`'s active pointer (see [`Store::rollback`]).
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> Result<FunctionRecord, StoreError> {
        match self {
            Backend::Embedded(store) => store.rollback(name, to).await,
            Backend::Nats(store) => store.rollback(name, to).await,
        }
    }

    /// A `Put` for every function changed after `since`, ascending, and the revision the
    /// caller is then up to date with.
    pub async fn events_since(&self, since: u64) -> Result<(Vec<WatchEvent>, u64), StoreError> {
        match self {
            Backend::Embedded(store) => Ok(store.events_since(since)),
            Backend::Nats(store) => store.events_since(since).await,
        }
    }

    /// The minted credential with this id.
    pub async fn credential(&self, id: &str) -> Result<Option<Credential>, StoreError> {
        match self {
            Backend::Embedded(store) => Ok(store.credential(id)),
            Backend::Nats(store) => store.credential(id).await,
        }
    }

    /// Every minted credential, by id.
    pub async fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        match self {
            Backend::Embedded(store) => Ok(store.credentials()),
            Backend::Nats(store) => store.credentials().await,
        }
    }

    /// Stores a new credential.
    pub async fn add_credential(&self, credential: Credential) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(store) => store.add_credential(credential).await,
            Backend::Nats(store) => store.add_credential(&credential).await,
        }
    }

    /// Deletes a credential (404 if there is none with this id).
    pub async fn remove_credential(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(store) => store.remove_credential(id).await,
            Backend::Nats(store) => store.remove_credential(id).await,
        }
    }

    /// A receiver that changes whenever the store may hold something new.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        match self {
            Backend::Embedded(store) => store.subscribe(),
            Backend::Nats(store) => store.subscribe(),
        }
    }
}

impl atoll_control::watch::ChangeSource for Backend {
    fn subscribe(&self) -> watch::Receiver<u64> {
        Backend::subscribe(self)
    }

    async fn events_since(&self, since: u64) -> Result<(Vec<WatchEvent>, u64), StoreError> {
        Backend::events_since(self, since).await
    }
}
