//! KV for `atoll up`: registry and node share one process, so the node calls the
//! registry's store directly instead of through its HTTP API — the same store, the same
//! rules, without a round trip (a read costs the store's microsecond instead of ~0.2 ms).

use std::sync::Arc;

use atoll_core::kv::{KeyPage, KvEntry, KvError, KvWritten};
use atoll_isolate::wasi_kv::{KvBackend, KvFuture};
use atoll_registry::kv::{Condition, KvStore};

/// The registry's own store, called on blocking threads (a write fsyncs).
#[derive(Debug)]
pub struct LocalKv(pub Arc<KvStore>);

fn blocking<T: Send + 'static>(call: impl FnOnce() -> Result<T, KvError> + Send + 'static) -> KvFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(call)
            .await
            .unwrap_or_else(|_| Err(KvError::Unavailable("the KV call panicked".into())))
    })
}

impl KvBackend for LocalKv {
    fn get(&self, store: &str, key: &str) -> KvFuture<Option<KvEntry>> {
        let (kv, store, key) = (Arc::clone(&self.0), store.to_string(), key.to_string());
        blocking(move || kv.get(&store, &key))
    }

    fn set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<u64>,
        if_revision: Option<u64>,
    ) -> KvFuture<KvWritten> {
        let (kv, store, key) = (Arc::clone(&self.0), store.to_string(), key.to_string());
        let condition = if_revision.map_or(Condition::Always, Condition::Revision);
        blocking(move || kv.set(&store, &key, &value, ttl, condition))
    }

    fn increment(&self, store: &str, key: &str, delta: i64) -> KvFuture<KvWritten> {
        let (kv, store, key) = (Arc::clone(&self.0), store.to_string(), key.to_string());
        blocking(move || kv.increment(&store, &key, delta))
    }

    fn delete(&self, store: &str, key: &str) -> KvFuture<bool> {
        let (kv, store, key) = (Arc::clone(&self.0), store.to_string(), key.to_string());
        blocking(move || kv.delete(&store, &key))
    }

    fn list(&self, store: &str, prefix: &str, after: Option<&str>, limit: usize) -> KvFuture<KeyPage> {
        let (kv, store, prefix) = (Arc::clone(&self.0), store.to_string(), prefix.to_string());
        let after = after.map(str::to_string);
        blocking(move || kv.list(&store, &prefix, after.as_deref(), limit))
    }
}
