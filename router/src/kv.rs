//! The node's side of `atoll_kv`: where a function's key-value calls go.
//!
//! Following a registry, every call goes to the registry's embedded store over its API
//! (`/v1/kv`), with no cache on the node: reads see every write the registry has
//! acknowledged, from any node — read-your-writes and monotonic reads everywhere, at the
//! price of a round trip per call. Following NATS, the stores are NATS buckets
//! (`atoll_control::nats_kv`) with a node-local cache.

use atoll_control::RegistryClient;
use atoll_core::kv::{KeyPage, KvEntry, KvWritten};
use atoll_core::kv::{KvBackend, KvFuture};

/// KV through the registry's API.
#[derive(Debug)]
pub struct RegistryKv {
    client: RegistryClient,
}

impl RegistryKv {
    pub fn new(client: RegistryClient) -> Self {
        RegistryKv { client }
    }
}

impl KvBackend for RegistryKv {
    fn get(&self, store: &str, key: &str) -> KvFuture<Option<KvEntry>> {
        let (client, store, key) = (self.client.clone(), store.to_string(), key.to_string());
        Box::pin(async move { client.kv_get(&store, &key).await })
    }

    fn set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<u64>,
        if_revision: Option<u64>,
    ) -> KvFuture<KvWritten> {
        let (client, store, key) = (self.client.clone(), store.to_string(), key.to_string());
        Box::pin(async move { client.kv_set(&store, &key, value, ttl, if_revision).await })
    }

    fn increment(&self, store: &str, key: &str, delta: i64) -> KvFuture<KvWritten> {
        let (client, store, key) = (self.client.clone(), store.to_string(), key.to_string());
        Box::pin(async move { client.kv_increment(&store, &key, delta).await })
    }

    fn delete(&self, store: &str, key: &str) -> KvFuture<bool> {
        let (client, store, key) = (self.client.clone(), store.to_string(), key.to_string());
        Box::pin(async move { client.kv_delete(&store, &key).await })
    }

    fn list(&self, store: &str, prefix: &str, after: Option<&str>, limit: usize) -> KvFuture<KeyPage> {
        let (client, store, prefix) = (self.client.clone(), store.to_string(), prefix.to_string());
        let after = after.map(str::to_string);
        Box::pin(async move { client.kv_list(&store, &prefix, after.as_deref(), limit).await })
    }
}
