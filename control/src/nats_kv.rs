//! Functions' key-value stores on NATS JetStream: what `atoll_kv` and `/v1/kv` use when the
//! control plane is NATS, so every node and registry of a cluster shares the stores.
//!
//! ```text
//! store "todo"  ──▶  KV bucket atoll_kv_todo (history 1, file storage)
//! key "items/1" ──▶  subject $KV.atoll_kv_todo.items/1   (key escaped, see encode_key)
//! value         ──▶  the message's payload, raw; a TTL is the header Atoll-Expires-Ms
//! ```
//!
//! * **Revisions** are the bucket's stream sequence: strictly increasing per store, as on
//!   the embedded store. Compare-and-set, increment and delete read the key's last message
//!   and write with `Nats-Expected-Last-Subject-Sequence`, so JetStream refuses a write
//!   when anyone wrote the key in between; increment retries until it wins, so concurrent
//!   increments lose nothing.
//! * **Time to live** is a header, not a bucket setting (NATS 2.9, Debian's, has no
//!   per-message TTL): an expired key reads as absent at once, and the registry's sweep
//!   writes its delete marker later ([`NatsKv::sweep_expired`]).
//! * **Keys** are escaped to what NATS subjects allow: `[A-Za-z0-9_/-]` stay as they are,
//!   every other byte becomes `=XX` (hex). Listing reads the last message of every key
//!   (headers only) and sorts: O(keys in the store) per page.
//! * **Reads and the node-local cache.** Without a cache (the registry), every read goes
//!   to the stream's leader: it sees every acknowledged write. With one (a node), a read
//!   is answered from memory when it can be, and the cache is kept honest by a watch on
//!   the bucket: any write, from any node, removes the key's cached entry when its event
//!   arrives. What that gives:
//!   - *read-your-writes on a node*: a write through this node removes the entry before
//!     it returns, so the next read goes to NATS;
//!   - *other nodes* see a write when its watch event reaches them: usually within
//!     milliseconds (the e2e test measures it), bounded by NATS's delivery, not by a TTL;
//!   - *never a stale entry kept*: a read that raced a write does not fill the cache (see
//!     [`Cache`]); while the watch is down, the connection is not up, or the client has
//!     reconnected since the watch began, reads skip the cache and it is emptied.
//!
//!   The watch takes headers only (a key and its sequence), never the values. The cache
//!   holds 64 MiB, an eighth of it at most per store, values up to 64 KiB.
//! * **Buckets** are created by a store's first write (a read of a store never written is
//!   answered "absent" without creating anything) and hold at most 1 GiB each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures_util::StreamExt;

use atoll_core::kv::{self as rules, KeyPage, KvBackend, KvEntry, KvError, KvFuture, KvWritten};

use crate::nats::LazyNatsStore;

/// Every store's bucket is this prefix and the store's name.
pub const BUCKET_PREFIX: &str = "atoll_kv_";
/// The header carrying when a value expires (ms since the Unix epoch).
pub const EXPIRES_HEADER: &str = "Atoll-Expires-Ms";
const OPERATION_HEADER: &str = "KV-Operation";
const EXPECTED_SEQUENCE_HEADER: &str = "Nats-Expected-Last-Subject-Sequence";
/// Bytes a message carries besides the value (subject, headers), kept free of the server's
/// `max_payload` when checking a value's size.
const MESSAGE_OVERHEAD: usize = 2048;
/// Tries of an increment or delete that keeps losing its compare-and-set.
const MAX_ATTEMPTS: u32 = 64;
/// Longest one NATS request may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Memory the node-local cache may hold, in value bytes, across all stores.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// Disk one store's bucket may use: writes beyond it fail (`Unavailable`) rather than fill
/// the JetStream volume every store and the control plane share.
pub const BUCKET_MAX_BYTES: i64 = 1 << 30;
/// Values larger than this are not cached (they would crowd out many small ones).
const LARGEST_CACHED_VALUE: usize = 64 << 10;
/// Wait before reopening a bucket's watch that ended.
const REWATCH_DELAY: Duration = Duration::from_millis(250);

/// The stores on NATS, with or without a node-local read cache. Cheap to clone.
#[derive(Clone)]
pub struct NatsKv {
    inner: Arc<Inner>,
}

struct Inner {
    nats: Arc<LazyNatsStore>,
    buckets: RwLock<HashMap<String, Arc<Bucket>>>,
    /// Cache budget in bytes; `None`: no cache.
    cache_bytes: Option<usize>,
    cached_bytes: Arc<AtomicUsize>,
    /// Reads the cache answered.
    hits: AtomicU64,
}

struct Bucket {
    store: kv::Store,
    stream: stream::Stream,
    client: async_nats::Client,
    js: jetstream::Context,
    cache: Option<Arc<Cache>>,
    watcher: Option<tokio::task::AbortHandle>,
}

impl Drop for Bucket {
    fn drop(&mut self) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
    }
}

impl std::fmt::Debug for NatsKv {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NatsKv")
            .field("nats", &self.inner.nats)
            .field("cache_bytes", &self.inner.cache_bytes)
            .finish_non_exhaustive()
    }
}

fn unavailable(context: &str, error: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(format!("{context}: {error}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

async fn bounded<T>(
    context: &str,
    operation: impl std::future::Future<Output = Result<T, KvError>>,
) -> Result<T, KvError> {
    tokio::time::timeout(OPERATION_TIMEOUT, operation)
        .await
        .unwrap_or_else(|_| {
            Err(KvError::Unavailable(format!(
                "{context}: NATS did not answer within {} s",
                OPERATION_TIMEOUT.as_secs()
            )))
        })
}

/// A key as a NATS subject token: `[A-Za-z0-9_/-]` as they are, any other byte `=XX`.
pub fn encode_key(key: &str) -> String {
    let mut encoded = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'/' | b'-') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("={byte:02X}"));
        }
    }
    encoded
}

/// The key [`encode_key`] made `encoded` from; `None` for a subject Atoll did not write.
pub fn decode_key(encoded: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut rest = encoded.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'=' {
            let hex = tail.get(..2)?;
            bytes.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// A key's last message, as a write needs it.
#[derive(Debug, Clone, Default)]
struct Current {
    /// The last message's sequence (0: the key never had one): what a write compares.
    sequence: u64,
    /// The live value, if there is one (not deleted, not expired).
    value: Option<Bytes>,
    /// When the live value expires (ms, 0: never).
    expires_ms: u64,
}

impl Current {
    /// The revision a caller sees: the sequence of a live value, 0 otherwise.
    fn revision(&self) -> u64 {
        if self.value.is_some() { self.sequence } else { 0 }
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(HeaderValue::as_str)
}

/// Whether a message is a delete or purge marker.
fn is_marker(headers: Option<&HeaderMap>) -> bool {
    matches!(header(headers, OPERATION_HEADER), Some("DEL" | "PURGE"))
}

fn expires_at(headers: Option<&HeaderMap>) -> u64 {
    header(headers, EXPIRES_HEADER)
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
}

fn live(expires_ms: u64, now: u64) -> bool {
    expires_ms == 0 || expires_ms > now
}

impl NatsKv {
    /// The stores on `nats`; `cache_bytes`: a node-local read cache of that size, or none.
    pub fn new(nats: Arc<LazyNatsStore>, cache_bytes: Option<usize>) -> NatsKv {
        NatsKv {
            inner: Arc::new(Inner {
                nats,
                buckets: RwLock::new(HashMap::new()),
                cache_bytes,
                cached_bytes: Arc::new(AtomicUsize::new(0)),
                hits: AtomicU64::new(0),
            }),
        }
    }

    /// The store's bucket, opened on first use; created if missing only for a write
    /// (`create`), so reading a store that was never written costs nothing. `None`: no
    /// such bucket (and not created).
    async fn bucket(&self, store: &str, create: bool) -> Result<Option<Arc<Bucket>>, KvError> {
        rules::check_store_name(store)?;
        if let Some(bucket) = self.inner.buckets.read().expect("buckets").get(store) {
            return Ok(Some(Arc::clone(bucket)));
        }
        let nats = self.connected().await?;
        let js = nats.jetstream().clone();
        let name = format!("{BUCKET_PREFIX}{store}");
        let kv_store = bounded("opening the store", async {
            match js.get_key_value(&name).await {
                Ok(kv_store) => Ok(Some(kv_store)),
                Err(_) if !create => Ok(None),
                Err(_) => js
                    .create_key_value(kv::Config {
                        bucket: name.clone(),
                        description: format!("Atoll key-value store `{store}`"),
                        history: 1,
                        max_value_size: (rules::MAX_VALUE_BYTES + MESSAGE_OVERHEAD) as i32,
                        max_bytes: BUCKET_MAX_BYTES,
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map(Some)
                    .map_err(|error| unavailable(&format!("creating the NATS bucket {name}"), error)),
            }
        })
        .await?;
        let Some(kv_store) = kv_store else {
            return Ok(None);
        };
        let (cache, watcher) = match self.inner.cache_bytes {
            Some(budget) => {
                let cache = Arc::new(Cache::new(budget, Arc::clone(&self.inner.cached_bytes)));
                let watcher = tokio::spawn(follow_writes(
                    kv_store.clone(),
                    nats.client().clone(),
                    Arc::clone(&cache),
                ));
                (Some(cache), Some(watcher.abort_handle()))
            }
            None => (None, None),
        };
        let bucket = Arc::new(Bucket {
            stream: kv_store.stream.clone(),
            store: kv_store,
            client: nats.client().clone(),
            js,
            cache,
            watcher,
        });
        let mut buckets = self.inner.buckets.write().expect("buckets");
        // Another call may have opened it meanwhile: keep the first, drop ours (and its watch).
        Ok(Some(Arc::clone(
            buckets.entry(store.to_string()).or_insert(bucket),
        )))
    }

    async fn connected(&self) -> Result<&crate::NatsStore, KvError> {
        self.inner
            .nats
            .get()
            .await
            .map_err(|error| unavailable("connecting to NATS", error))
    }

    /// Reads the node-local cache has answered so far.
    pub fn cache_hits(&self) -> u64 {
        self.inner.hits.load(Ordering::Relaxed)
    }

    /// Removes expired keys (writes their delete markers) in every store; how many.
    pub async fn sweep_expired(&self) -> Result<usize, KvError> {
        let nats = self.connected().await?;
        let mut names = nats.jetstream().stream_names();
        let mut stores = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|error| unavailable("listing the stores", error))?;
            if let Some(store) = name
                .strip_prefix("KV_")
                .and_then(|n| n.strip_prefix(BUCKET_PREFIX))
            {
                stores.push(store.to_string());
            }
        }
        let now = now_ms();
        let mut removed = 0;
        for store in stores {
            // One store failing (slow, huge) does not stop the sweep of the others.
            let found = match self.bucket(&store, false).await {
                Ok(Some(bucket)) => last_messages(&bucket).await.map(|found| (bucket, found)),
                Ok(None) => continue,
                Err(error) => Err(error),
            };
            let (bucket, found) = match found {
                Ok(found) => found,
                Err(error) => {
                    tracing::warn!(%store, %error, "sweeping a KV store failed");
                    continue;
                }
            };
            for (key, sequence, expires_ms) in found {
                if expires_ms != 0 && expires_ms <= now {
                    // Expected sequence: a key rewritten since keeps its new value.
                    if publish(&bucket, &key, Bytes::new(), 0, Some(sequence), true)
                        .await
                        .is_ok()
                    {
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// Every live key's (name, last sequence, expiry): the last message of each subject,
/// headers only.
async fn last_messages(bucket: &Bucket) -> Result<Vec<(String, u64, u64)>, KvError> {
    bounded("listing keys", async {
        let failed = |error: &dyn std::fmt::Display| unavailable("listing keys", error);
        let consumer = bucket
            .stream
            .create_consumer(jetstream::consumer::push::OrderedConfig {
                deliver_subject: bucket.client.new_inbox(),
                description: Some("atoll kv list".to_string()),
                filter_subject: format!("{}>", bucket.store.prefix),
                headers_only: true,
                replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|error| failed(&error))?;
        let mut found = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(found);
        }
        let mut messages = consumer.messages().await.map_err(|error| failed(&error))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|error| failed(&error))?;
            let info = message.info().map_err(|error| failed(&error))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let headers = message.headers.as_ref();
            if !is_marker(headers)
                && let Some(key) = message
                    .subject
                    .strip_prefix(bucket.store.prefix.as_str())
                    .and_then(decode_key)
            {
                found.push((key, sequence, expires_at(headers)));
            }
            if pending == 0 {
                break;
            }
        }
        Ok(found)
    })
    .await
}

/// The key's last message, from the stream's leader.
async fn read(bucket: &Bucket, key: &str) -> Result<Current, KvError> {
    let subject = format!("{}{}", bucket.store.prefix, encode_key(key));
    bounded("reading a key", async {
        match bucket.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => {
                let headers = Some(&message.headers);
                let expires_ms = expires_at(headers);
                let value = (!is_marker(headers) && live(expires_ms, now_ms())).then_some(message.payload);
                Ok(Current {
                    sequence: message.sequence,
                    value,
                    expires_ms,
                })
            }
            Err(error) if error.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(Current::default())
            }
            Err(error) => Err(unavailable("reading a key", error)),
        }
    })
    .await
}

/// Why a write did not land.
enum WriteFailure {
    /// The key's last sequence was not the one expected.
    Lost,
    Failed(KvError),
}

/// Writes the key's next message (a delete marker if `delete`); its sequence.
async fn publish(
    bucket: &Bucket,
    key: &str,
    value: Bytes,
    expires_ms: u64,
    expected: Option<u64>,
    delete: bool,
) -> Result<u64, WriteFailure> {
    let subject = format!("{}{}", bucket.store.prefix, encode_key(key));
    let mut headers = HeaderMap::new();
    if let Some(expected) = expected {
        headers.insert(EXPECTED_SEQUENCE_HEADER, HeaderValue::from(expected));
    }
    if expires_ms != 0 {
        headers.insert(EXPIRES_HEADER, HeaderValue::from(expires_ms));
    }
    if delete {
        headers.insert(OPERATION_HEADER, "DEL");
    }
    let sent = tokio::time::timeout(OPERATION_TIMEOUT, async {
        bucket
            .js
            .publish_with_headers(subject, headers, value)
            .await?
            .await
    })
    .await;
    let result = match sent {
        Ok(Ok(ack)) => Ok(ack.sequence),
        Ok(Err(error)) if error.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
            Err(WriteFailure::Lost)
        }
        Ok(Err(error)) => Err(WriteFailure::Failed(unavailable("writing a key", error))),
        Err(_) => Err(WriteFailure::Failed(KvError::Unavailable(format!(
            "writing a key: NATS did not answer within {} s",
            OPERATION_TIMEOUT.as_secs()
        )))),
    };
    if let Some(cache) = &bucket.cache {
        // A write that may have landed (even one that timed out) leaves no cached entry
        // older than it behind: read-your-writes on this node.
        match &result {
            Ok(sequence) => cache.invalidate(key, *sequence),
            Err(WriteFailure::Failed(_)) => cache.invalidate(key, u64::MAX),
            Err(WriteFailure::Lost) => {}
        }
    }
    result
}

/// Refuses a value the server's `max_payload` would refuse, saying so.
fn check_payload(bucket: &Bucket, value: &[u8]) -> Result<(), KvError> {
    rules::check_value(value)?;
    let max_payload = bucket.client.server_info().max_payload;
    if max_payload != 0 && value.len() + MESSAGE_OVERHEAD > max_payload {
        return Err(KvError::Invalid(format!(
            "the value is {} bytes; this NATS server takes at most {} bytes per value (its max_payload is {max_payload})",
            value.len(),
            max_payload.saturating_sub(MESSAGE_OVERHEAD)
        )));
    }
    Ok(())
}

/// Short random pause after a lost compare-and-set, so racing writers spread out.
async fn back_off(attempt: u32) {
    let spread = u64::from(attempt.min(8) + 1) * 500;
    tokio::time::sleep(Duration::from_micros(fastrand::u64(..spread))).await;
}

impl NatsKv {
    async fn get_entry(&self, store: &str, key: &str) -> Result<Option<KvEntry>, KvError> {
        rules::check_key(key)?;
        let Some(bucket) = self.bucket(store, false).await? else {
            return Ok(None);
        };
        let Some(cache) = bucket.cache.as_ref().filter(|cache| cache.usable(&bucket.client)) else {
            return Ok(entry_of(&read(&bucket, key).await?));
        };
        if let Some(hit) = cache.lookup(key, now_ms()) {
            self.inner.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        let ticket = cache.begin(key);
        let current = read(&bucket, key).await?;
        if let Some(ticket) = ticket {
            cache.finish(ticket, &current);
        }
        Ok(entry_of(&current))
    }

    async fn set_entry(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<u64>,
        if_revision: Option<u64>,
    ) -> Result<KvWritten, KvError> {
        rules::check_key(key)?;
        if let Some(ttl) = ttl {
            rules::check_ttl(ttl)?;
        }
        let bucket = self.bucket(store, true).await?.expect("created");
        check_payload(&bucket, &value)?;
        let expires_ms = ttl.map_or(0, |ttl| now_ms() + ttl * 1000);
        let Some(wanted) = if_revision else {
            return match publish(&bucket, key, Bytes::from(value), expires_ms, None, false).await {
                Ok(revision) => Ok(KvWritten {
                    revision,
                    value: None,
                }),
                // An unconditional write has no compare to lose.
                Err(WriteFailure::Lost) => Err(KvError::Unavailable("NATS refused the write".into())),
                Err(WriteFailure::Failed(error)) => Err(error),
            };
        };
        let value = Bytes::from(value);
        for attempt in 0..MAX_ATTEMPTS {
            let current = read(&bucket, key).await?;
            if current.revision() != wanted {
                return Err(KvError::Conflict {
                    current: current.revision(),
                });
            }
            match publish(
                &bucket,
                key,
                value.clone(),
                expires_ms,
                Some(current.sequence),
                false,
            )
            .await
            {
                Ok(revision) => {
                    return Ok(KvWritten {
                        revision,
                        value: None,
                    });
                }
                // The key's last message changed under us. If the caller's view still holds
                // (it is still absent: the sweep's delete marker, say), try again; else the
                // next read reports the conflict.
                Err(WriteFailure::Lost) => back_off(attempt).await,
                Err(WriteFailure::Failed(error)) => return Err(error),
            }
        }
        Err(KvError::Conflict {
            current: read(&bucket, key).await?.revision(),
        })
    }

    async fn increment_entry(&self, store: &str, key: &str, delta: i64) -> Result<KvWritten, KvError> {
        rules::check_key(key)?;
        let bucket = self.bucket(store, true).await?.expect("created");
        for attempt in 0..MAX_ATTEMPTS {
            let current = read(&bucket, key).await?;
            let value = rules::increment(current.value.as_deref(), delta)?;
            // The key keeps its expiry, as on the embedded store.
            let expires_ms = if current.value.is_some() {
                current.expires_ms
            } else {
                0
            };
            let text = Bytes::from(value.to_string());
            match publish(&bucket, key, text, expires_ms, Some(current.sequence), false).await {
                Ok(revision) => {
                    return Ok(KvWritten {
                        revision,
                        value: Some(value),
                    });
                }
                Err(WriteFailure::Lost) => back_off(attempt).await,
                Err(WriteFailure::Failed(error)) => return Err(error),
            }
        }
        Err(KvError::Unavailable(format!(
            "the increment lost {MAX_ATTEMPTS} compare-and-sets in a row to other writers"
        )))
    }

    async fn delete_entry(&self, store: &str, key: &str) -> Result<bool, KvError> {
        rules::check_key(key)?;
        let Some(bucket) = self.bucket(store, false).await? else {
            return Ok(false);
        };
        for attempt in 0..MAX_ATTEMPTS {
            let current = read(&bucket, key).await?;
            if current.value.is_none() {
                return Ok(false);
            }
            match publish(&bucket, key, Bytes::new(), 0, Some(current.sequence), true).await {
                Ok(_) => return Ok(true),
                Err(WriteFailure::Lost) => back_off(attempt).await,
                Err(WriteFailure::Failed(error)) => return Err(error),
            }
        }
        Err(KvError::Unavailable(format!(
            "the delete lost {MAX_ATTEMPTS} compare-and-sets in a row to other writers"
        )))
    }

    async fn list_keys(
        &self,
        store: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, KvError> {
        let limit = limit.clamp(1, rules::MAX_LIST_KEYS);
        let Some(bucket) = self.bucket(store, false).await? else {
            return Ok(KeyPage::default());
        };
        let now = now_ms();
        let mut keys: Vec<String> = last_messages(&bucket)
            .await?
            .into_iter()
            .filter(|(key, _, expires_ms)| {
                key.starts_with(prefix)
                    && live(*expires_ms, now)
                    && after.is_none_or(|after| key.as_str() > after)
            })
            .map(|(key, _, _)| key)
            .collect();
        keys.sort_unstable();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let cursor = if more { keys.last().cloned() } else { None };
        Ok(KeyPage { keys, cursor })
    }
}

fn entry_of(current: &Current) -> Option<KvEntry> {
    current.value.as_ref().map(|value| KvEntry {
        value: value.to_vec(),
        revision: current.sequence,
    })
}

impl KvBackend for NatsKv {
    fn get(&self, store: &str, key: &str) -> KvFuture<Option<KvEntry>> {
        let (kv, store, key) = (self.clone(), store.to_string(), key.to_string());
        Box::pin(async move { kv.get_entry(&store, &key).await })
    }

    fn set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<u64>,
        if_revision: Option<u64>,
    ) -> KvFuture<KvWritten> {
        let (kv, store, key) = (self.clone(), store.to_string(), key.to_string());
        Box::pin(async move { kv.set_entry(&store, &key, value, ttl, if_revision).await })
    }

    fn increment(&self, store: &str, key: &str, delta: i64) -> KvFuture<KvWritten> {
        let (kv, store, key) = (self.clone(), store.to_string(), key.to_string());
        Box::pin(async move { kv.increment_entry(&store, &key, delta).await })
    }

    fn delete(&self, store: &str, key: &str) -> KvFuture<bool> {
        let (kv, store, key) = (self.clone(), store.to_string(), key.to_string());
        Box::pin(async move { kv.delete_entry(&store, &key).await })
    }

    fn list(&self, store: &str, prefix: &str, after: Option<&str>, limit: usize) -> KvFuture<KeyPage> {
        let (kv, store, prefix) = (self.clone(), store.to_string(), prefix.to_string());
        let after = after.map(str::to_string);
        Box::pin(async move { kv.list_keys(&store, &prefix, after.as_deref(), limit).await })
    }
}

/// Keeps a bucket's cache honest: every write's event (headers only: the key and its
/// sequence, never the value) removes what it makes stale. While the watch is not running
/// the cache is empty and unused; a reconnect of the client ends the watch too (events may
/// have been missed while it was away), so it starts again from an empty cache.
async fn follow_writes(store: kv::Store, client: async_nats::Client, cache: Arc<Cache>) {
    loop {
        let connects = client.statistics().connects.load(Ordering::Relaxed);
        let consumer = store
            .stream
            .create_consumer(jetstream::consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                description: Some("atoll kv cache".to_string()),
                filter_subject: format!("{}>", store.prefix),
                headers_only: true,
                replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await;
        let writes = match consumer {
            Ok(consumer) => consumer.messages().await.ok(),
            Err(error) => {
                tracing::debug!(%error, bucket = %store.name, "opening the KV cache's watch failed");
                None
            }
        };
        if let Some(mut writes) = writes {
            cache.clear();
            cache.connects.store(connects, Ordering::Release);
            cache.live.store(true, Ordering::Release);
            while let Some(write) = writes.next().await {
                let Ok(write) = write else {
                    tracing::warn!(bucket = %store.name, "the KV cache's watch failed; reads skip the cache until it is back");
                    break;
                };
                if client.statistics().connects.load(Ordering::Relaxed) != connects {
                    break;
                }
                let Ok(info) = write.info() else { continue };
                let sequence = info.stream_sequence;
                if let Some(key) = write
                    .subject
                    .strip_prefix(store.prefix.as_str())
                    .and_then(decode_key)
                {
                    cache.invalidate(&key, sequence);
                }
            }
        }
        cache.live.store(false, Ordering::Release);
        cache.clear();
        tokio::time::sleep(REWATCH_DELAY).await;
    }
}

/// One key's place in the cache.
enum Slot {
    /// A read is under way; `dirty` once a write to the key was seen meanwhile, so what
    /// the read brings back may be stale and is not kept.
    Reading { ticket: u64, dirty: bool },
    /// The key as the stream's leader answered: its last sequence, and the live value if
    /// any (`None`: absent, deleted or expired; a cached miss).
    Known {
        sequence: u64,
        value: Option<Bytes>,
        expires_ms: u64,
    },
}

impl Slot {
    fn bytes(&self, key: &str) -> usize {
        key.len()
            + 64
            + match self {
                Slot::Known {
                    value: Some(value), ..
                } => value.len(),
                _ => 0,
            }
    }
}

/// A bucket's node-local read cache. A read fills it only if no write to the key was seen
/// while the read was under way (its [`Slot::Reading`] is still clean): a read that began
/// before a write and returns after its event cannot put the old value back.
pub struct Cache {
    slots: Mutex<HashMap<String, Slot>>,
    live: AtomicBool,
    /// The client's connect count when the watch started: a reconnect since makes the
    /// cache unusable until the watch starts again.
    connects: AtomicU64,
    next_ticket: AtomicU64,
    budget: usize,
    used: Arc<AtomicUsize>,
    bytes_here: AtomicUsize,
}

/// The right to fill one key's slot with what a read brings back; dropped unused (the read
/// failed or its caller went away), it frees the slot for the next reader.
struct Ticket {
    cache: Arc<Cache>,
    key: String,
    ticket: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut slots = self.cache.slots.lock().expect("cache");
        if matches!(slots.get(&self.key), Some(Slot::Reading { ticket, .. }) if *ticket == self.ticket) {
            slots.remove(&self.key);
        }
    }
}

impl Cache {
    fn new(budget: usize, used: Arc<AtomicUsize>) -> Cache {
        Cache {
            slots: Mutex::new(HashMap::new()),
            live: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            next_ticket: AtomicU64::new(1),
            budget,
            used,
            bytes_here: AtomicUsize::new(0),
        }
    }

    /// Whether reads may use the cache now: its watch runs, on the connection it started
    /// on, and that connection is up.
    fn usable(&self, client: &async_nats::Client) -> bool {
        self.live.load(Ordering::Acquire)
            && client.statistics().connects.load(Ordering::Relaxed) == self.connects.load(Ordering::Acquire)
            && client.connection_state() == async_nats::connection::State::Connected
    }

    /// The cached answer, if there is one.
    fn lookup(&self, key: &str, now: u64) -> Option<Option<KvEntry>> {
        let slots = self.slots.lock().expect("cache");
        match slots.get(key)? {
            Slot::Known {
                sequence,
                value,
                expires_ms,
            } => Some(
                value
                    .as_ref()
                    .filter(|_| live(*expires_ms, now))
                    .map(|value| KvEntry {
                        value: value.to_vec(),
                        revision: *sequence,
                    }),
            ),
            Slot::Reading { .. } => None,
        }
    }

    /// Marks a read of `key` as under way; `None` if another is (only the first fills).
    fn begin(self: &Arc<Self>, key: &str) -> Option<Ticket> {
        let mut slots = self.slots.lock().expect("cache");
        if slots.contains_key(key) {
            return None;
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        slots.insert(key.to_string(), Slot::Reading { ticket, dirty: false });
        Some(Ticket {
            cache: Arc::clone(self),
            key: key.to_string(),
            ticket,
        })
    }

    /// Fills the slot the ticket holds with what the read found, unless a write was seen
    /// meanwhile or the cache was emptied.
    fn finish(&self, ticket: Ticket, current: &Current) {
        let mut slots = self.slots.lock().expect("cache");
        let Some(Slot::Reading { ticket: held, dirty }) = slots.get(&ticket.key) else {
            return;
        };
        if *held != ticket.ticket || *dirty {
            // Not ours any more, or stale: the ticket's drop frees a slot still ours.
            return;
        }
        let fits = current
            .value
            .as_ref()
            .is_none_or(|value| value.len() <= LARGEST_CACHED_VALUE);
        let slot = Slot::Known {
            sequence: current.sequence,
            value: current.value.clone(),
            expires_ms: current.expires_ms,
        };
        let size = slot.bytes(&ticket.key);
        if !fits {
            return;
        }
        // One store holds at most an eighth of the node's budget, so one tenant's hot store
        // cannot crowd every other store out of the cache.
        if self.used.load(Ordering::Relaxed) + size > self.budget
            || self.bytes_here.load(Ordering::Relaxed) + size > self.budget / 8
        {
            // Full: start this store's cache over rather than track recency per key.
            self.release(&mut slots);
            return;
        }
        self.used.fetch_add(size, Ordering::Relaxed);
        self.bytes_here.fetch_add(size, Ordering::Relaxed);
        slots.insert(ticket.key.clone(), slot);
    }

    /// A write with this sequence happened to `key`: drop what it made stale.
    fn invalidate(&self, key: &str, sequence: u64) {
        let mut slots = self.slots.lock().expect("cache");
        let stale = match slots.get_mut(key) {
            Some(Slot::Reading { dirty, .. }) => {
                *dirty = true;
                false
            }
            Some(Slot::Known { sequence: cached, .. }) => *cached < sequence,
            None => false,
        };
        if stale && let Some(slot) = slots.remove(key) {
            let size = slot.bytes(key);
            self.used.fetch_sub(size, Ordering::Relaxed);
            self.bytes_here.fetch_sub(size, Ordering::Relaxed);
        }
    }

    fn clear(&self) {
        let mut slots = self.slots.lock().expect("cache");
        self.release(&mut slots);
    }

    fn release(&self, slots: &mut HashMap<String, Slot>) {
        slots.clear();
        let here = self.bytes_here.swap(0, Ordering::Relaxed);
        self.used.fetch_sub(here, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_to_subject_tokens_and_back() {
        for key in ["todo/1", "a.b", "spaced key", "ünï", "=", "..", "x*>y", "-_/"] {
            let encoded = encode_key(key);
            assert!(
                encoded
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'/' | b'-' | b'=')),
                "{encoded}"
            );
            assert_eq!(decode_key(&encoded).as_deref(), Some(key));
        }
        assert_eq!(encode_key("todo/1"), "todo/1");
        assert_eq!(encode_key("a.b"), "a=2Eb");
        assert_eq!(decode_key("=4"), None);
    }

    fn known(sequence: u64, value: &str) -> Current {
        Current {
            sequence,
            value: Some(Bytes::from(value.to_string())),
            expires_ms: 0,
        }
    }

    #[test]
    fn a_read_that_raced_a_write_does_not_fill_the_cache() {
        let cache = Arc::new(Cache::new(1 << 20, Arc::new(AtomicUsize::new(0))));
        let ticket = cache.begin("k").unwrap();
        assert!(cache.begin("k").is_none(), "one reader fills");
        cache.invalidate("k", 5);
        cache.finish(ticket, &known(4, "old"));
        assert!(cache.lookup("k", 0).is_none());

        let ticket = cache.begin("k").unwrap();
        cache.finish(ticket, &known(5, "new"));
        assert_eq!(cache.lookup("k", 0).unwrap().unwrap().value, b"new");
        // An event no newer than the cached entry keeps it; a newer one removes it.
        cache.invalidate("k", 5);
        assert!(cache.lookup("k", 0).is_some());
        cache.invalidate("k", 6);
        assert!(cache.lookup("k", 0).is_none());
    }

    #[test]
    fn a_read_from_before_a_clear_does_not_fill_the_cache() {
        let cache = Arc::new(Cache::new(1 << 20, Arc::new(AtomicUsize::new(0))));
        let stale = cache.begin("k").unwrap();
        cache.clear();
        let fresh = cache.begin("k").unwrap();
        cache.finish(stale, &known(1, "stale"));
        assert!(cache.lookup("k", 0).is_none());
        cache.finish(fresh, &known(2, "fresh"));
        assert_eq!(cache.lookup("k", 0).unwrap().unwrap().revision, 2);
    }

    #[test]
    fn expired_and_absent_entries_read_as_absent_and_the_budget_holds() {
        let used = Arc::new(AtomicUsize::new(0));
        let cache = Arc::new(Cache::new(4096, Arc::clone(&used)));
        let ticket = cache.begin("t").unwrap();
        cache.finish(
            ticket,
            &Current {
                sequence: 3,
                value: Some(Bytes::from_static(b"v")),
                expires_ms: 1000,
            },
        );
        assert!(cache.lookup("t", 999).unwrap().is_some());
        assert_eq!(cache.lookup("t", 1000), Some(None));
        let ticket = cache.begin("missing").unwrap();
        cache.finish(ticket, &Current::default());
        assert_eq!(cache.lookup("missing", 0), Some(None));
        let ticket = cache.begin("big").unwrap();
        cache.finish(ticket, &known(9, &"x".repeat(5000)));
        assert!(cache.lookup("big", 0).is_none());
        assert!(used.load(Ordering::Relaxed) <= 4096);
        cache.clear();
        assert_eq!(used.load(Ordering::Relaxed), 0);
    }
}
