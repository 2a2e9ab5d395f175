//! Key-value stores (`[kv] stores` in atoll.toml), through the `atoll_kv` host import.
//!
//! Keys are UTF-8, 1–512 bytes; values bytes, at most 1 MiB; every write returns the key's
//! new revision, which [`Store::compare_and_set`] takes to write only over what was read.

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The store is not in `[kv] stores`.
    NotGranted,
    /// A key, value or time to live the host refuses (see the function's log).
    Invalid,
    /// Compare-and-set lost: the key is at this revision (0: absent).
    Conflict { current: u64 },
    /// The value is not an integer (increment).
    NotANumber,
    /// The request made the most calls it may.
    Limit,
    /// The store cannot be reached now.
    Unavailable,
    /// Any other code from the host.
    Other(i32),
}

impl std::fmt::Display for KvError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::NotGranted => write!(formatter, "the store is not granted in [kv] stores"),
            KvError::Invalid => write!(formatter, "the host refused the key, value or time to live"),
            KvError::Conflict { current } => write!(formatter, "the key is at revision {current}"),
            KvError::NotANumber => write!(formatter, "the value is not an integer"),
            KvError::Limit => write!(formatter, "this request made the most KV calls it may"),
            KvError::Unavailable => write!(formatter, "the store is unavailable"),
            KvError::Other(code) => write!(formatter, "atoll_kv error {code}"),
        }
    }
}

impl std::error::Error for KvError {}

const NOT_FOUND: i32 = 1;
const BUFFER_TOO_SMALL: i32 = 2;
/// The largest value a store holds: a host asking for more is not believed.
const MAX_VALUE_BYTES: usize = 1 << 20;
/// Tries after the first when the buffer is too small (the value may grow in between).
const RETRIES: usize = 3;

fn error(code: i32, revision: u64) -> KvError {
    match code {
        3 => KvError::NotGranted,
        4 => KvError::Invalid,
        5 => KvError::Conflict { current: revision },
        6 => KvError::NotANumber,
        7 => KvError::Limit,
        8 => KvError::Unavailable,
        other => KvError::Other(other),
    }
}

#[cfg(target_arch = "wasm32")]
mod raw {
    #[link(wasm_import_module = "atoll_kv")]
    unsafe extern "C" {
        pub fn open(name: *const u8, name_len: usize, store: *mut u32) -> i32;
        pub fn get(
            store: u32,
            key: *const u8,
            key_len: usize,
            buf: *mut u8,
            buf_len: usize,
            value_len: *mut u32,
            revision: *mut u64,
        ) -> i32;
        pub fn set(
            store: u32,
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
            ttl_seconds: i64,
            revision: *mut u64,
        ) -> i32;
        pub fn cas(
            store: u32,
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
            expected: i64,
            revision: *mut u64,
        ) -> i32;
        pub fn increment(store: u32, key: *const u8, key_len: usize, delta: i64, value: *mut i64) -> i32;
        pub fn delete(store: u32, key: *const u8, key_len: usize) -> i32;
        pub fn list(
            store: u32,
            prefix: *const u8,
            prefix_len: usize,
            after: *const u8,
            after_len: usize,
            buf: *mut u8,
            buf_len: usize,
            written: *mut u32,
            more: *mut u32,
        ) -> i32;
    }
}

/// Off wasm there is no host: every call is unavailable.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::too_many_arguments, clippy::missing_safety_doc)]
mod raw {
    const UNAVAILABLE: i32 = 8;
    pub unsafe fn open(_: *const u8, _: usize, _: *mut u32) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn get(_: u32, _: *const u8, _: usize, _: *mut u8, _: usize, _: *mut u32, _: *mut u64) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn set(_: u32, _: *const u8, _: usize, _: *const u8, _: usize, _: i64, _: *mut u64) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn cas(_: u32, _: *const u8, _: usize, _: *const u8, _: usize, _: i64, _: *mut u64) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn increment(_: u32, _: *const u8, _: usize, _: i64, _: *mut i64) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn delete(_: u32, _: *const u8, _: usize) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn list(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *mut u8,
        _: usize,
        _: *mut u32,
        _: *mut u32,
    ) -> i32 {
        UNAVAILABLE
    }
}

/// A value and the revision that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// A granted store.
#[derive(Debug, Clone, Copy)]
pub struct Store(u32);

impl Store {
    /// Opens a store listed in `[kv] stores`.
    pub fn open(name: &str) -> Result<Store, KvError> {
        let mut handle = 0u32;
        // SAFETY: the pointers are valid for the lengths given, for the call.
        let code = unsafe { raw::open(name.as_ptr(), name.len(), &mut handle) };
        match code {
            0 => Ok(Store(handle)),
            code => Err(error(code, 0)),
        }
    }

    /// The key's value and revision; `None` when absent.
    pub fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        let mut buffer = vec![0u8; 4096];
        for _ in 0..=RETRIES {
            let (mut length, mut revision) = (0u32, 0u64);
            // SAFETY: the pointers are valid for the lengths given, for the call.
            let code = unsafe {
                raw::get(
                    self.0,
                    key.as_ptr(),
                    key.len(),
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut length,
                    &mut revision,
                )
            };
            match code {
                0 if (length as usize) <= buffer.len() => {
                    buffer.truncate(length as usize);
                    return Ok(Some(Entry {
                        value: buffer,
                        revision,
                    }));
                }
                NOT_FOUND => return Ok(None),
                // The host said how much is needed: try again with exactly that.
                BUFFER_TOO_SMALL
                    if (length as usize) > buffer.len() && (length as usize) <= MAX_VALUE_BYTES =>
                {
                    buffer = vec![0u8; length as usize];
                }
                0 | BUFFER_TOO_SMALL => return Err(KvError::Other(code)),
                code => return Err(error(code, 0)),
            }
        }
        Err(KvError::Other(BUFFER_TOO_SMALL))
    }

    /// The value as text, if present.
    pub fn get_text(&self, key: &str) -> Result<Option<String>, KvError> {
        Ok(self
            .get(key)?
            .map(|entry| String::from_utf8_lossy(&entry.value).into_owned()))
    }

    /// Writes a value; its new revision.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<u64, KvError> {
        self.set_expiring(key, value, 0)
    }

    /// Writes a value that expires after `ttl_seconds` (0: never).
    pub fn set_expiring(&self, key: &str, value: &[u8], ttl_seconds: u64) -> Result<u64, KvError> {
        let mut revision = 0u64;
        // SAFETY: the pointers are valid for the lengths given, for the call.
        let code = unsafe {
            raw::set(
                self.0,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
                ttl_seconds as i64,
                &mut revision,
            )
        };
        match code {
            0 => Ok(revision),
            code => Err(error(code, revision)),
        }
    }

    /// Writes only if the key is at `expected` (0: only if absent); the new revision, or
    /// [`KvError::Conflict`] with the current one.
    pub fn compare_and_set(&self, key: &str, value: &[u8], expected: u64) -> Result<u64, KvError> {
        let mut revision = 0u64;
        // SAFETY: the pointers are valid for the lengths given, for the call.
        let code = unsafe {
            raw::cas(
                self.0,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
                expected as i64,
                &mut revision,
            )
        };
        match code {
            0 => Ok(revision),
            code => Err(error(code, revision)),
        }
    }

    /// Adds `delta` to the key's integer value (absent: 0); the new value.
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        let mut value = 0i64;
        // SAFETY: the pointers are valid for the lengths given, for the call.
        let code = unsafe { raw::increment(self.0, key.as_ptr(), key.len(), delta, &mut value) };
        match code {
            0 => Ok(value),
            code => Err(error(code, 0)),
        }
    }

    /// Deletes the key; whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        // SAFETY: the pointer is valid for the length given, for the call.
        match unsafe { raw::delete(self.0, key.as_ptr(), key.len()) } {
            0 => Ok(true),
            NOT_FOUND => Ok(false),
            code => Err(error(code, 0)),
        }
    }

    /// Every key starting with `prefix`, in order.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, KvError> {
        let mut keys = Vec::new();
        let mut buffer = vec![0u8; 16 * 1024];
        let mut after = String::new();
        loop {
            let (mut written, mut more) = (0u32, 0u32);
            // SAFETY: the pointers are valid for the lengths given, for the call.
            let code = unsafe {
                raw::list(
                    self.0,
                    prefix.as_ptr(),
                    prefix.len(),
                    after.as_ptr(),
                    after.len(),
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut written,
                    &mut more,
                )
            };
            match code {
                0 => {}
                // A key longer than the buffer: grow to what the host asks (a key is at
                // most 512 bytes, so this happens at most once).
                BUFFER_TOO_SMALL if (written as usize) > buffer.len() && written <= 1024 => {
                    buffer = vec![0u8; written as usize];
                    continue;
                }
                BUFFER_TOO_SMALL => return Err(KvError::Other(code)),
                code => return Err(error(code, 0)),
            }
            if written as usize > buffer.len() {
                return Err(KvError::Other(0));
            }
            let text = String::from_utf8_lossy(&buffer[..written as usize]).into_owned();
            let before = keys.len();
            keys.extend(text.lines().map(str::to_string));
            match (more, keys.last()) {
                // More keys, and this page moved past `after`: the next page starts there.
                (1, Some(last)) if keys.len() > before && *last > after => after = last.clone(),
                (1, _) => return Err(KvError::Other(0)),
                _ => return Ok(keys),
            }
        }
    }
}
