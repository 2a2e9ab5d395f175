//! The embedded key-value store: functions' stores on one machine, in one redb file beside
//! the registry's state (`DATA/kv.redb`).
//!
//! redb (pure Rust, copy-on-write B-trees, ACID transactions, fsync on commit) rather than
//! another JSON document like the function state: KV is written per request, not per push,
//! and a crash must lose no committed write and leave no half-written one.
//!
//! ```text
//! entries:  "store\0key"               → revision (u64 LE) | expires_at ms (u64 LE, 0 never) | value
//! expiry:   expires_at ms (BE) "store\0key" → ()      (the sweep walks this in time order)
//! meta:     "rev\0store"               → the store's last revision (u64 LE)
//! ```
//!
//! Every write is one write transaction, so compare-and-set and increment are atomic, and
//! revisions come from one counter per store, strictly increasing (per store, so a tenant
//! cannot time other tenants' writes by the gaps). Time ("now", for expiry) is read inside
//! the write transaction, after the writer lock, so a queued write judges expiry by when
//! it runs. An expired entry
//! is invisible at once and removed by [`KvStore::sweep`] (the registry runs it every
//! minute) or by the next write to its key. Calls block: the API runs them on blocking
//! threads.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use atoll_core::kv::{self, KeyPage, KvBackend, KvEntry, KvError, KvFuture, KvWritten};
use redb::{Database, ReadableTable, TableDefinition};

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Bytes before the value in an entry: revision and expiry.
const HEADER: usize = 16;

/// The file name under the registry's data directory.
pub const KV_FILE: &str = "kv.redb";

/// One machine's key-value stores.
pub struct KvStore {
    db: Database,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("KvStore").finish_non_exhaustive()
    }
}

fn unavailable(error: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(error.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn composite(store: &str, key: &str) -> String {
    format!("{store}\0{key}")
}

fn expiry_key(expires_at: u64, composite: &str) -> Vec<u8> {
    let mut key = expires_at.to_be_bytes().to_vec();
    key.extend_from_slice(composite.as_bytes());
    key
}

/// A stored entry's parts.
struct Stored<'a> {
    revision: u64,
    expires_at: u64,
    value: &'a [u8],
}

fn decode(bytes: &[u8]) -> Stored<'_> {
    let revision = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let expires_at = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    Stored {
        revision,
        expires_at,
        value: &bytes[HEADER..],
    }
}

fn encode(revision: u64, expires_at: u64, value: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + value.len());
    bytes.extend_from_slice(&revision.to_le_bytes());
    bytes.extend_from_slice(&expires_at.to_le_bytes());
    bytes.extend_from_slice(value);
    bytes
}

fn live(stored: &Stored<'_>, now: u64) -> bool {
    stored.expires_at == 0 || stored.expires_at > now
}

/// When a written value expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Never,
    After(u64),
    /// Whenever the current value does (never, if there is none).
    Keep,
}

/// How a write treats the key's current revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Write whatever is there.
    Always,
    /// Write only if the key is at this revision (0: only if it does not exist).
    Revision(u64),
}

impl KvStore {
    /// Opens (or creates) the store file in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<KvStore, KvError> {
        std::fs::create_dir_all(data_dir).map_err(unavailable)?;
        let db = Database::create(data_dir.join(KV_FILE)).map_err(unavailable)?;
        let transaction = db.begin_write().map_err(unavailable)?;
        {
            transaction.open_table(ENTRIES).map_err(unavailable)?;
            transaction.open_table(EXPIRY).map_err(unavailable)?;
            transaction.open_table(META).map_err(unavailable)?;
        }
        transaction.commit().map_err(unavailable)?;
        Ok(KvStore { db })
    }

    pub fn get(&self, store: &str, key: &str) -> Result<Option<KvEntry>, KvError> {
        kv::check_store_name(store)?;
        kv::check_key(key)?;
        let transaction = self.db.begin_read().map_err(unavailable)?;
        let entries = transaction.open_table(ENTRIES).map_err(unavailable)?;
        let Some(bytes) = entries.get(composite(store, key).as_str()).map_err(unavailable)? else {
            return Ok(None);
        };
        let stored = decode(bytes.value());
        Ok(live(&stored, now_ms()).then(|| KvEntry {
            value: stored.value.to_vec(),
            revision: stored.revision,
        }))
    }

    /// Writes `value` under `condition`, expiring after `ttl_seconds` if given.
    pub fn set(
        &self,
        store: &str,
        key: &str,
        value: &[u8],
        ttl_seconds: Option<u64>,
        condition: Condition,
    ) -> Result<KvWritten, KvError> {
        kv::check_value(value)?;
        if let Some(ttl) = ttl_seconds {
            kv::check_ttl(ttl)?;
        }
        let expiry = ttl_seconds.map_or(Expiry::Never, Expiry::After);
        self.write(
            store,
            key,
            |_current| Ok((value.to_vec(), expiry, None)),
            condition,
        )
    }

    /// Adds `delta` to the key's decimal integer value (absent: 0). A key that expires
    /// keeps its expiry (a counter per time window stays one).
    pub fn increment(&self, store: &str, key: &str, delta: i64) -> Result<KvWritten, KvError> {
        self.write(
            store,
            key,
            |current| {
                let value = kv::increment(current, delta)?;
                Ok((value.to_string().into_bytes(), Expiry::Keep, Some(value)))
            },
            Condition::Always,
        )
    }

    /// Deletes the key; whether it existed.
    pub fn delete(&self, store: &str, key: &str) -> Result<bool, KvError> {
        kv::check_store_name(store)?;
        kv::check_key(key)?;
        let composite = composite(store, key);
        let transaction = self.db.begin_write().map_err(unavailable)?;
        let now = now_ms();
        let existed = {
            let mut entries = transaction.open_table(ENTRIES).map_err(unavailable)?;
            let mut expiry = transaction.open_table(EXPIRY).map_err(unavailable)?;
            let removed = entries
                .remove(composite.as_str())
                .map_err(unavailable)?
                .map(|bytes| {
                    let stored = decode(bytes.value());
                    (live(&stored, now), stored.expires_at)
                });
            match removed {
                Some((was_live, expires_at)) => {
                    if expires_at != 0 {
                        expiry
                            .remove(expiry_key(expires_at, &composite).as_slice())
                            .map_err(unavailable)?;
                    }
                    was_live
                }
                None => false,
            }
        };
        transaction.commit().map_err(unavailable)?;
        Ok(existed)
    }

    /// Keys of `store` starting with `prefix`, in order, after `cursor` (the last key of
    /// the previous page), at most `limit`.
    pub fn list(
        &self,
        store: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, KvError> {
        kv::check_store_name(store)?;
        let limit = limit.clamp(1, kv::MAX_LIST_KEYS);
        let transaction = self.db.begin_read().map_err(unavailable)?;
        let entries = transaction.open_table(ENTRIES).map_err(unavailable)?;
        let start = composite(store, prefix);
        let after = cursor.map(|cursor| composite(store, cursor));
        let from = match &after {
            Some(after) if after.as_str() > start.as_str() => after.clone(),
            _ => start.clone(),
        };
        let now = now_ms();
        let mut keys = Vec::new();
        let mut more = false;
        for item in entries.range(from.as_str()..).map_err(unavailable)? {
            let (key, bytes) = item.map_err(unavailable)?;
            let key = key.value();
            if !key.starts_with(start.as_str()) {
                break;
            }
            if after.as_deref() == Some(key) || !live(&decode(bytes.value()), now) {
                continue;
            }
            if keys.len() == limit {
                more = true;
                break;
            }
            keys.push(key[store.len() + 1..].to_string());
        }
        let cursor = if more { keys.last().cloned() } else { None };
        Ok(KeyPage { keys, cursor })
    }

    /// Removes expired entries, at most `batch` per call; how many it removed. An index
    /// entry whose key was rewritten since (another expiry, or none) removes only itself.
    pub fn sweep(&self, batch: usize) -> Result<usize, KvError> {
        let transaction = self.db.begin_write().map_err(unavailable)?;
        let now = now_ms();
        let removed = {
            let mut entries = transaction.open_table(ENTRIES).map_err(unavailable)?;
            let mut expiry = transaction.open_table(EXPIRY).map_err(unavailable)?;
            let due: Vec<Vec<u8>> = expiry
                .range(..now.to_be_bytes().as_slice())
                .map_err(unavailable)?
                .take(batch)
                .map(|item| item.map(|(key, _)| key.value().to_vec()))
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            for key in &due {
                expiry.remove(key.as_slice()).map_err(unavailable)?;
                let expires_at = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
                let composite = String::from_utf8_lossy(&key[8..]).into_owned();
                let current = entries
                    .get(composite.as_str())
                    .map_err(unavailable)?
                    .map(|bytes| decode(bytes.value()).expires_at);
                if current == Some(expires_at) {
                    entries.remove(composite.as_str()).map_err(unavailable)?;
                }
            }
            due.len()
        };
        transaction.commit().map_err(unavailable)?;
        Ok(removed)
    }

    /// One write transaction: `make` gets the live current value and returns the new value,
    /// its time to live and what an increment reports.
    fn write(
        &self,
        store: &str,
        key: &str,
        make: impl FnOnce(Option<&[u8]>) -> Result<(Vec<u8>, Expiry, Option<i64>), KvError>,
        condition: Condition,
    ) -> Result<KvWritten, KvError> {
        kv::check_store_name(store)?;
        kv::check_key(key)?;
        let composite = composite(store, key);
        let transaction = self.db.begin_write().map_err(unavailable)?;
        let now = now_ms();
        let written = {
            let mut entries = transaction.open_table(ENTRIES).map_err(unavailable)?;
            let mut expiry = transaction.open_table(EXPIRY).map_err(unavailable)?;
            let mut meta = transaction.open_table(META).map_err(unavailable)?;
            let current: Option<(u64, u64, Vec<u8>)> = entries
                .get(composite.as_str())
                .map_err(unavailable)?
                .map(|bytes| {
                    let stored = decode(bytes.value());
                    (stored.revision, stored.expires_at, stored.value.to_vec())
                });
            let live_current = current
                .as_ref()
                .filter(|(_, expires_at, _)| *expires_at == 0 || *expires_at > now);
            if let Condition::Revision(expected) = condition {
                let at = live_current.map_or(0, |(revision, _, _)| *revision);
                if at != expected {
                    return Err(KvError::Conflict { current: at });
                }
            }
            let kept_expiry = live_current.map_or(0, |(_, expires_at, _)| *expires_at);
            let (value, expires, reported) = make(live_current.map(|(_, _, value)| value.as_slice()))?;
            let counter = format!("rev\0{store}");
            let revision = meta
                .get(counter.as_str())
                .map_err(unavailable)?
                .map_or(0, |v| v.value())
                + 1;
            meta.insert(counter.as_str(), revision).map_err(unavailable)?;
            if let Some((_, old_expiry, _)) = &current
                && *old_expiry != 0
            {
                expiry
                    .remove(expiry_key(*old_expiry, &composite).as_slice())
                    .map_err(unavailable)?;
            }
            let expires_at = match expires {
                Expiry::Never => 0,
                Expiry::After(seconds) => now + seconds * 1000,
                Expiry::Keep => kept_expiry,
            };
            if expires_at != 0 {
                expiry
                    .insert(expiry_key(expires_at, &composite).as_slice(), ())
                    .map_err(unavailable)?;
            }
            entries
                .insert(
                    composite.as_str(),
                    encode(revision, expires_at, &value).as_slice(),
                )
                .map_err(unavailable)?;
            KvWritten {
                revision,
                value: reported,
            }
        };
        transaction.commit().map_err(unavailable)?;
        Ok(written)
    }
}

/// The embedded store as a [`KvBackend`]: what the registry's API and, in `atoll up`, the
/// node in the same process call (no round trip: a read costs the store's microsecond).
/// Calls run on blocking threads, since a write fsyncs.
#[derive(Debug)]
pub struct EmbeddedKv(pub Arc<KvStore>);

fn blocking<T: Send + 'static>(call: impl FnOnce() -> Result<T, KvError> + Send + 'static) -> KvFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(call)
            .await
            .unwrap_or_else(|_| Err(KvError::Unavailable("the KV call panicked".into())))
    })
}

impl KvBackend for EmbeddedKv {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, KvStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn set_get_delete_with_increasing_revisions_that_survive_a_reopen() {
        let (dir, store) = open();
        assert_eq!(store.get("todo", "a").unwrap(), None);
        let first = store.set("todo", "a", b"one", None, Condition::Always).unwrap();
        let second = store.set("todo", "a", b"two", None, Condition::Always).unwrap();
        assert!(second.revision > first.revision);
        assert_eq!(
            store.get("todo", "a").unwrap(),
            Some(KvEntry {
                value: b"two".to_vec(),
                revision: second.revision
            })
        );
        // Stores are apart.
        assert_eq!(store.get("other", "a").unwrap(), None);
        drop(store);
        let store = KvStore::open(dir.path()).unwrap();
        assert_eq!(store.get("todo", "a").unwrap().unwrap().value, b"two");
        let third = store.set("todo", "b", b"", None, Condition::Always).unwrap();
        assert!(third.revision > second.revision, "the counter survives a reopen");
        assert!(store.delete("todo", "a").unwrap());
        assert!(!store.delete("todo", "a").unwrap());
        assert_eq!(store.get("todo", "a").unwrap(), None);
    }

    #[test]
    fn compare_and_set_by_revision() {
        let (_dir, store) = open();
        let created = store.set("s", "k", b"1", None, Condition::Revision(0)).unwrap();
        assert_eq!(
            store.set("s", "k", b"x", None, Condition::Revision(0)),
            Err(KvError::Conflict {
                current: created.revision
            })
        );
        let updated = store
            .set("s", "k", b"2", None, Condition::Revision(created.revision))
            .unwrap();
        assert_eq!(
            store.set("s", "k", b"3", None, Condition::Revision(created.revision)),
            Err(KvError::Conflict {
                current: updated.revision
            })
        );
        assert_eq!(store.get("s", "k").unwrap().unwrap().value, b"2");
    }

    #[test]
    fn increments_from_many_threads_lose_nothing() {
        let (_dir, store) = open();
        let store = std::sync::Arc::new(store);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        store.increment("s", "counter", 1).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(store.get("s", "counter").unwrap().unwrap().value, b"200");
        store.set("s", "text", b"hello", None, Condition::Always).unwrap();
        assert_eq!(store.increment("s", "text", 1), Err(KvError::NotANumber));
    }

    #[test]
    fn listing_pages_by_prefix_and_cursor() {
        let (_dir, store) = open();
        for key in ["todo/3", "todo/1", "todo/2", "tods", "user/1"] {
            store.set("s", key, b"x", None, Condition::Always).unwrap();
        }
        store.set("t", "todo/9", b"x", None, Condition::Always).unwrap();
        let page = store.list("s", "todo/", None, 2).unwrap();
        assert_eq!(page.keys, ["todo/1", "todo/2"]);
        assert_eq!(page.cursor.as_deref(), Some("todo/2"));
        let page = store.list("s", "todo/", page.cursor.as_deref(), 2).unwrap();
        assert_eq!(page.keys, ["todo/3"]);
        assert_eq!(page.cursor, None);
        let all = store.list("s", "", None, 100).unwrap();
        assert_eq!(all.keys, ["todo/1", "todo/2", "todo/3", "tods", "user/1"]);
    }

    #[test]
    fn expired_keys_vanish_and_are_swept() {
        let (_dir, store) = open();
        store.set("s", "short", b"x", Some(1), Condition::Always).unwrap();
        store
            .set("s", "long", b"x", Some(3600), Condition::Always)
            .unwrap();
        assert!(store.get("s", "short").unwrap().is_some());
        // Backdate: rewrite the entry as if it expired a second ago.
        {
            let transaction = store.db.begin_write().unwrap();
            {
                let mut entries = transaction.open_table(ENTRIES).unwrap();
                let mut expiry = transaction.open_table(EXPIRY).unwrap();
                let past = now_ms() - 1000;
                entries
                    .insert(
                        composite("s", "short").as_str(),
                        encode(99, past, b"x").as_slice(),
                    )
                    .unwrap();
                expiry
                    .insert(expiry_key(past, &composite("s", "short")).as_slice(), ())
                    .unwrap();
            }
            transaction.commit().unwrap();
        }
        assert_eq!(store.get("s", "short").unwrap(), None);
        assert_eq!(store.list("s", "", None, 10).unwrap().keys, ["long"]);
        // Two index entries for "short" now (the real one, and the backdated one): the
        // sweep removes the entry once, and a stale index entry never removes a live key.
        assert_eq!(store.sweep(100).unwrap(), 1);
        assert_eq!(store.sweep(100).unwrap(), 0);
        assert!(store.get("s", "long").unwrap().is_some());
        // An increment keeps the key's expiry; a plain set replaces it.
        store
            .set("s", "window", b"0", Some(3600), Condition::Always)
            .unwrap();
        store.increment("s", "window", 1).unwrap();
        let expiry_entries = |store: &KvStore| {
            let transaction = store.db.begin_read().unwrap();
            let table = transaction.open_table(EXPIRY).unwrap();
            table
                .iter()
                .unwrap()
                .map(|item| String::from_utf8_lossy(&item.unwrap().0.value()[8..]).into_owned())
                .filter(|key| key.ends_with("window"))
                .count()
        };
        assert_eq!(expiry_entries(&store), 1);
        store.set("s", "window", b"5", None, Condition::Always).unwrap();
        assert_eq!(expiry_entries(&store), 0);
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let (_dir, store) = open();
        let too_big = vec![0u8; kv::MAX_VALUE_BYTES + 1];
        assert!(matches!(
            store.set("s", "k", &too_big, None, Condition::Always),
            Err(KvError::Invalid(_))
        ));
        assert!(matches!(
            store.get("s", &"k".repeat(600)),
            Err(KvError::Invalid(_))
        ));
        assert!(matches!(store.get("Bad Store", "k"), Err(KvError::Invalid(_))));
        assert_eq!(store.list("s", "", None, 10).unwrap().keys, Vec::<String>::new());
    }
}
