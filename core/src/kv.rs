//! Key-value stores for functions (the primer's backend services): the names, limits and
//! rules every backend keeps, so the embedded store, the registry's API, a node and the
//! guest import agree on them.
//!
//! A store is named like a function (`[a-z0-9-]`, 1–63) and is the unit of access: a
//! manifest's `[kv] stores` grants stores to the function, and a deploy token may grant
//! only stores whose names it may manage (the same patterns as its functions). Keys are
//! UTF-8, 1–512 bytes (not `.` or `..`); values are bytes, at most 1 MiB. Every write gets
//! a revision from one counter per store, strictly increasing, so compare-and-set is by
//! revision (0: the key must not exist).

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most stores one manifest may grant.
pub const MAX_STORES: usize = 16;
/// Keys per page of a listing, at most (and by default).
pub const MAX_LIST_KEYS: usize = 1000;
/// Longest time to live a write may ask for: a year.
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// Why a key-value operation failed. Display is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum KvError {
    #[error("no such key")]
    NotFound,
    /// Compare-and-set lost: the key is at another revision (0: it does not exist).
    #[error("the key is at revision {current}, not the one expected")]
    Conflict { current: u64 },
    #[error("{0}")]
    Invalid(String),
    /// The value is not a decimal integer (increment).
    #[error("the value is not an integer")]
    NotANumber,
    #[error("store {0:?} is not granted to this function")]
    NotGranted(String),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// One key's value and the revision that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// A page of keys, in order, and where the next page starts (the last key of this one),
/// `None` when this is the last.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyPage {
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// What a write answered: the key's new revision (and for an increment, the new value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvWritten {
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<i64>,
}

/// What a key-value call returns: boxed, so every backend fits one trait object.
pub type KvFuture<T> = Pin<Box<dyn Future<Output = Result<T, KvError>> + Send>>;

/// Where stores live: the embedded store, NATS JetStream, or a registry's API. The guest
/// import on a node and the registry's `/v1/kv` API both call through it, so every
/// backend keeps the same rules (checked names, keys and values; revisions per store;
/// compare-and-set with 0 meaning "absent"; expired keys invisible).
pub trait KvBackend: Send + Sync + std::fmt::Debug {
    fn get(&self, store: &str, key: &str) -> KvFuture<Option<KvEntry>>;
    /// Writes `value`; `ttl` in seconds (none: never expires); `if_revision` makes it a
    /// compare-and-set (0: the key must not exist).
    fn set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<u64>,
        if_revision: Option<u64>,
    ) -> KvFuture<KvWritten>;
    /// Adds `delta` to a decimal integer (absent: 0), keeping the key's expiry.
    fn increment(&self, store: &str, key: &str, delta: i64) -> KvFuture<KvWritten>;
    /// Deletes the key; whether it existed.
    fn delete(&self, store: &str, key: &str) -> KvFuture<bool>;
    /// Keys starting with `prefix`, in byte order, after `after`, at most `limit`.
    fn list(&self, store: &str, prefix: &str, after: Option<&str>, limit: usize) -> KvFuture<KeyPage>;
}

/// Checks a store name: the rules of function names.
pub fn check_store_name(name: &str) -> Result<(), KvError> {
    crate::manifest::check_name(name)
        .map_err(|reason| KvError::Invalid(reason.replacen("name", "store name", 1)))
}

/// Checks a key: UTF-8 (the caller's type), 1–512 bytes, no control characters.
pub fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::Invalid("the key is empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::Invalid(format!(
            "the key is {} bytes; at most {MAX_KEY_BYTES} are allowed",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(KvError::Invalid("the key contains a control character".into()));
    }
    // They would be path segments a URL resolves away.
    if key == "." || key == ".." {
        return Err(KvError::Invalid(format!("the key {key:?} is reserved")));
    }
    Ok(())
}

/// Checks a value's size.
pub fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::Invalid(format!(
            "the value is {} bytes; at most {} MiB are allowed",
            value.len(),
            MAX_VALUE_BYTES >> 20
        )));
    }
    Ok(())
}

/// Checks a time to live.
pub fn check_ttl(seconds: u64) -> Result<(), KvError> {
    if seconds == 0 || seconds > MAX_TTL_SECONDS {
        return Err(KvError::Invalid(format!(
            "the time to live is {seconds} s; it must be 1 s to {MAX_TTL_SECONDS} s"
        )));
    }
    Ok(())
}

/// Adds `delta` to a stored decimal integer (absent: 0); the new value and its text.
pub fn increment(current: Option<&[u8]>, delta: i64) -> Result<i64, KvError> {
    let now = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .ok_or(KvError::NotANumber)?,
    };
    now.checked_add(delta)
        .ok_or_else(|| KvError::Invalid("the increment overflows a 64-bit integer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_and_names_are_bounded() {
        assert!(check_key("todo/1").is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(
            check_key(&"k".repeat(MAX_KEY_BYTES + 1))
                .unwrap_err()
                .to_string()
                .contains("at most 512")
        );
        assert!(check_key("").is_err());
        assert!(check_key("a\nb").is_err());
        assert!(check_key("..").is_err() && check_key(".").is_err() && check_key("../x").is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_BYTES]).is_ok());
        assert!(
            check_value(&vec![0; MAX_VALUE_BYTES + 1])
                .unwrap_err()
                .to_string()
                .contains("1 MiB")
        );
        assert!(check_store_name("default").is_ok());
        assert!(
            check_store_name("Bad!")
                .unwrap_err()
                .to_string()
                .contains("store name")
        );
        assert!(check_ttl(0).is_err());
        assert!(check_ttl(60).is_ok());
    }

    #[test]
    fn increments_are_decimal_and_checked() {
        assert_eq!(increment(None, 5), Ok(5));
        assert_eq!(increment(Some(b"41"), 1), Ok(42));
        assert_eq!(increment(Some(b"-3"), -4), Ok(-7));
        assert_eq!(increment(Some(b"x"), 1), Err(KvError::NotANumber));
        assert!(increment(Some(i64::MAX.to_string().as_bytes()), 1).is_err());
    }

    #[test]
    fn errors_travel_as_json() {
        let error = KvError::Conflict { current: 7 };
        let json = serde_json::to_string(&error).unwrap();
        assert_eq!(serde_json::from_str::<KvError>(&json).unwrap(), error);
    }
}
