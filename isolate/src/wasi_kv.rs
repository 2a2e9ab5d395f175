//! `atoll_kv`: the key-value stores a manifest grants (`[kv] stores`), as a host import.
//!
//! No standard ABI exists for this (Spin's is a component interface, Workers' a JS
//! object), so Atoll's is small and in the style of `wasi_experimental_http`: the guest
//! owns every buffer, every function returns an error code, 64-bit values travel as `i64`.
//!
//! ```text
//! open(name, name_len, store_out)                                   a granted store's handle
//! get(store, key, key_len, buf, buf_len, value_len_out, revision_out /*u64*/)
//!     BUFFER_TOO_SMALL writes the size needed to value_len_out
//! set(store, key, key_len, value, value_len, ttl_seconds: i64 /*0: none*/, revision_out)
//! cas(store, key, key_len, value, value_len, expected: i64 /*0: absent*/, revision_out)
//!     CONFLICT writes the key's current revision to revision_out
//! increment(store, key, key_len, delta: i64, value_out /*i64*/)
//! delete(store, key, key_len)                                       NOT_FOUND if absent
//! list(store, prefix, prefix_len, after, after_len, buf, buf_len, written_out, more_out)
//!     keys, each followed by '\n' (keys hold no control characters); the next page starts
//!     after the last key written; more_out is 1 while keys remain
//! ```
//!
//! Keys are UTF-8, 1–512 bytes; values at most 1 MiB; at most [`MAX_OPERATIONS`] calls per
//! request. The backend is the node's (through the registry, see `router::kv`); a call
//! blocks the guest's thread like an outbound call, under the run's deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_core::kv::{self, KvError};
use wasmer::{FunctionEnvMut, MemoryView};

use crate::wasi::{CallError, HostCallInterrupted, WasiContext};
use crate::wasi_http::{Waited, wait_on};

/// The import module name.
pub const KV_MODULE: &str = "atoll_kv";

/// The module's functions and their parameter types (`true`: i64), each returning an i32.
pub const KV_IMPORTS: [(&str, &[bool]); 7] = [
    ("open", &[false, false, false]),
    ("get", &[false, false, false, false, false, false, false]),
    ("set", &[false, false, false, false, false, true, false]),
    ("cas", &[false, false, false, false, false, true, false]),
    ("increment", &[false, false, false, true, false]),
    ("delete", &[false, false, false]),
    (
        "list",
        &[false, false, false, false, false, false, false, false, false],
    ),
];

/// The error codes.
pub mod code {
    pub const SUCCESS: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BUFFER_TOO_SMALL: i32 = 2;
    pub const NOT_GRANTED: i32 = 3;
    pub const INVALID: i32 = 4;
    pub const CONFLICT: i32 = 5;
    pub const NOT_A_NUMBER: i32 = 6;
    pub const LIMIT: i32 = 7;
    pub const UNAVAILABLE: i32 = 8;
    pub const MEMORY: i32 = 9;
}
use code::*;

/// Calls per request at most.
pub const MAX_OPERATIONS: u32 = 1000;

pub use atoll_core::kv::{KvBackend, KvFuture};

/// What one function may do with key-value stores. Shared by all its runs.
pub struct KvAccess {
    pub backend: Arc<dyn KvBackend>,
    pub runtime: tokio::runtime::Handle,
    /// The granted stores; a store's handle is its index here.
    pub stores: Vec<String>,
    /// Calls waiting at once on the whole node (shared by every function): each holds a
    /// guest thread, so a slow store must not take them all.
    pub waits: Arc<tokio::sync::Semaphore>,
}

/// Default for how many KV calls may wait at once on a node.
pub const DEFAULT_MAX_WAITS: usize = 256;
/// Longest one call waits for the store: a slow store fails the call (`UNAVAILABLE`), not
/// the run.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl std::fmt::Debug for KvAccess {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KvAccess")
            .field("stores", &self.stores)
            .finish_non_exhaustive()
    }
}

/// Per-run KV state.
#[derive(Default)]
pub struct KvState {
    access: Option<Arc<KvAccess>>,
    operations: u32,
}

impl KvState {
    pub fn new(access: Option<Arc<KvAccess>>) -> Self {
        KvState {
            access,
            operations: 0,
        }
    }

    /// Calls this run made.
    pub fn operations(&self) -> u32 {
        self.operations
    }
}

fn read_bytes(view: &MemoryView, address: u32, length: u32) -> Result<Vec<u8>, i32> {
    match u64::from(address).checked_add(u64::from(length)) {
        Some(end) if end <= view.data_size() => {}
        _ => return Err(MEMORY),
    }
    let mut bytes = vec![0u8; length as usize];
    view.read(u64::from(address), &mut bytes).map_err(|_| MEMORY)?;
    Ok(bytes)
}

/// A key (or prefix) from the guest: bounded before it is read, UTF-8.
fn read_key(view: &MemoryView, address: u32, length: u32, may_be_empty: bool) -> Result<String, i32> {
    if length as usize > kv::MAX_KEY_BYTES || (length == 0 && !may_be_empty) {
        return Err(INVALID);
    }
    String::from_utf8(read_bytes(view, address, length)?).map_err(|_| INVALID)
}

fn write_out(view: &MemoryView, address: u32, bytes: &[u8]) -> Result<(), i32> {
    view.write(u64::from(address), bytes).map_err(|_| MEMORY)
}

fn code_of(error: &KvError) -> i32 {
    match error {
        KvError::NotFound => NOT_FOUND,
        KvError::Conflict { .. } => CONFLICT,
        KvError::Invalid(_) => INVALID,
        KvError::NotANumber => NOT_A_NUMBER,
        KvError::NotGranted(_) => NOT_GRANTED,
        KvError::Unavailable(_) => UNAVAILABLE,
    }
}

/// The granted store behind `handle`, counting the call against the request's limit.
fn begin(context: &mut WasiContext, handle: u32) -> Result<(Arc<KvAccess>, String), i32> {
    let access = context.kv.access.clone().ok_or(NOT_GRANTED)?;
    let store = access.stores.get(handle as usize).cloned().ok_or(NOT_GRANTED)?;
    if context.kv.operations >= MAX_OPERATIONS {
        context.log_host_line(&format!(
            "kv call refused: this request made {MAX_OPERATIONS} calls, the limit"
        ));
        return Err(LIMIT);
    }
    context.kv.operations += 1;
    Ok((access, store))
}

/// Runs a backend call to completion under the run's deadline.
fn run<T>(
    context: &mut WasiContext,
    access: &KvAccess,
    call: KvFuture<T>,
) -> Result<Result<T, KvError>, CallError> {
    let deadline = context
        .http
        .deadline()
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
    let Some(time_left) = deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
    else {
        return Err(CallError::Interrupted);
    };
    let Ok(_waiting) = Arc::clone(&access.waits).try_acquire_owned() else {
        context.log_host_line("kv call refused: too many KV calls are waiting on this node");
        return Ok(Err(KvError::Unavailable(
            "too many KV calls are waiting on this node".into(),
        )));
    };
    let signals = Arc::clone(context.signals());
    let wait = time_left.min(CALL_TIMEOUT);
    let result = match wait_on(&access.runtime, &signals, wait, call) {
        Waited::Done(result) => result,
        Waited::Stopped => return Err(CallError::Interrupted),
        Waited::TimedOut if wait == time_left => {
            // The run's own deadline: the run is over, as a timeout.
            signals.raise();
            return Err(CallError::Interrupted);
        }
        Waited::TimedOut => Err(KvError::Unavailable(format!("no answer within {CALL_TIMEOUT:?}"))),
        Waited::ShuttingDown => Err(KvError::Unavailable("the node is shutting down".into())),
    };
    if let Err(KvError::Unavailable(reason)) = &result {
        // The detail names the node's network (the registry's address): operators only.
        tracing::warn!(%reason, "a kv call failed: the store is unavailable");
        context.log_host_line("kv call failed: the store is unavailable; try again");
    }
    Ok(result)
}

/// A KV host call with the guest's memory; a trap once the run was asked to stop.
fn with_kv(
    env: &mut FunctionEnvMut<WasiContext>,
    call: impl FnOnce(&mut WasiContext, &MemoryView) -> Result<i32, CallError>,
) -> Result<i32, HostCallInterrupted> {
    crate::wasi::with_guest_memory(env, MEMORY, call)
}

pub(crate) fn open(
    mut env: FunctionEnvMut<WasiContext>,
    name: u32,
    name_length: u32,
    handle_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_kv(&mut env, |context, view| {
        if name_length > 64 {
            return Ok(NOT_GRANTED);
        }
        let name = String::from_utf8(read_bytes(view, name, name_length)?).map_err(|_| INVALID)?;
        let granted = context
            .kv
            .access
            .as_ref()
            .and_then(|access| access.stores.iter().position(|store| *store == name));
        let Some(handle) = granted else {
            context.log_host_line(&format!(
                "kv store {name:?} is not granted: list it in [kv] stores"
            ));
            return Ok(NOT_GRANTED);
        };
        write_out(view, handle_out, &(handle as u32).to_le_bytes())?;
        Ok(SUCCESS)
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn get(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    key: u32,
    key_length: u32,
    buffer: u32,
    capacity: u32,
    length_out: u32,
    revision_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_kv(&mut env, |context, view| {
        let (access, store) = begin(context, handle)?;
        let key = read_key(view, key, key_length, false)?;
        let entry = match run(context, &access, access.backend.get(&store, &key))? {
            Ok(Some(entry)) => entry,
            Ok(None) => return Ok(NOT_FOUND),
            Err(error) => return Ok(code_of(&error)),
        };
        write_out(view, length_out, &(entry.value.len() as u32).to_le_bytes())?;
        if entry.value.len() > capacity as usize {
            return Ok(BUFFER_TOO_SMALL);
        }
        write_out(view, buffer, &entry.value)?;
        write_out(view, revision_out, &entry.revision.to_le_bytes())?;
        Ok(SUCCESS)
    })
}

/// `set` and `cas`: a write with an optional condition.
#[allow(clippy::too_many_arguments)]
fn write(
    env: &mut FunctionEnvMut<WasiContext>,
    handle: u32,
    key: u32,
    key_length: u32,
    value: u32,
    value_length: u32,
    ttl: Option<u64>,
    if_revision: Option<u64>,
    revision_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_kv(env, |context, view| {
        let (access, store) = begin(context, handle)?;
        let key = read_key(view, key, key_length, false)?;
        if value_length as usize > kv::MAX_VALUE_BYTES {
            context.log_host_line(&format!(
                "kv set refused: the value is {value_length} bytes; at most {} MiB are allowed",
                kv::MAX_VALUE_BYTES >> 20
            ));
            return Ok(INVALID);
        }
        let value = read_bytes(view, value, value_length)?;
        match run(
            context,
            &access,
            access.backend.set(&store, &key, value, ttl, if_revision),
        )? {
            Ok(written) => {
                write_out(view, revision_out, &written.revision.to_le_bytes())?;
                Ok(SUCCESS)
            }
            Err(KvError::Conflict { current }) => {
                write_out(view, revision_out, &current.to_le_bytes())?;
                Ok(CONFLICT)
            }
            Err(error) => Ok(code_of(&error)),
        }
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn set(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    key: u32,
    key_length: u32,
    value: u32,
    value_length: u32,
    ttl_seconds: i64,
    revision_out: u32,
) -> Result<i32, HostCallInterrupted> {
    if ttl_seconds < 0 || ttl_seconds as u64 > kv::MAX_TTL_SECONDS {
        return Ok(INVALID);
    }
    let ttl = (ttl_seconds > 0).then_some(ttl_seconds as u64);
    write(
        &mut env,
        handle,
        key,
        key_length,
        value,
        value_length,
        ttl,
        None,
        revision_out,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn cas(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    key: u32,
    key_length: u32,
    value: u32,
    value_length: u32,
    expected: i64,
    revision_out: u32,
) -> Result<i32, HostCallInterrupted> {
    write(
        &mut env,
        handle,
        key,
        key_length,
        value,
        value_length,
        None,
        Some(expected as u64),
        revision_out,
    )
}

pub(crate) fn increment(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    key: u32,
    key_length: u32,
    delta: i64,
    value_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_kv(&mut env, |context, view| {
        let (access, store) = begin(context, handle)?;
        let key = read_key(view, key, key_length, false)?;
        match run(context, &access, access.backend.increment(&store, &key, delta))? {
            Ok(written) => {
                write_out(view, value_out, &written.value.unwrap_or_default().to_le_bytes())?;
                Ok(SUCCESS)
            }
            Err(error) => Ok(code_of(&error)),
        }
    })
}

pub(crate) fn delete(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    key: u32,
    key_length: u32,
) -> Result<i32, HostCallInterrupted> {
    with_kv(&mut env, |context, view| {
        let (access, store) = begin(context, handle)?;
        let key = read_key(view, key, key_length, false)?;
        match run(context, &access, access.backend.delete(&store, &key))? {
            Ok(true) => Ok(SUCCESS),
            Ok(false) => Ok(NOT_FOUND),
            Err(error) => Ok(code_of(&error)),
        }
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn list(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    prefix: u32,
    prefix_length: u32,
    after: u32,
    after_length: u32,
    buffer: u32,
    capacity: u32,
    written_out: u32,
    more_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_kv(&mut env, |context, view| {
        let (access, store) = begin(context, handle)?;
        let prefix = read_key(view, prefix, prefix_length, true)?;
        let after = read_key(view, after, after_length, true)?;
        let after = (!after.is_empty()).then_some(after);
        // Only as many keys as could fit: each takes at least two bytes.
        let limit = (capacity as usize / 2).clamp(1, kv::MAX_LIST_KEYS);
        let call = access.backend.list(&store, &prefix, after.as_deref(), limit);
        let page = match run(context, &access, call)? {
            Ok(page) => page,
            Err(error) => return Ok(code_of(&error)),
        };
        let mut text = Vec::new();
        let mut written_keys = 0;
        for key in &page.keys {
            if text.len() + key.len() + 1 > capacity as usize {
                break;
            }
            text.extend_from_slice(key.as_bytes());
            text.push(b'\n');
            written_keys += 1;
        }
        if written_keys == 0 && !page.keys.is_empty() {
            write_out(view, written_out, &(page.keys[0].len() as u32 + 1).to_le_bytes())?;
            return Ok(BUFFER_TOO_SMALL);
        }
        let more = written_keys < page.keys.len() || page.cursor.is_some();
        write_out(view, buffer, &text)?;
        write_out(view, written_out, &(text.len() as u32).to_le_bytes())?;
        write_out(view, more_out, &u32::from(more).to_le_bytes())?;
        Ok(SUCCESS)
    })
}
