//! The `atoll_kv` import call by call, from hand-written guests, over an in-memory backend:
//! codes, out-parameters (the size needed on a small buffer, the current revision on a
//! lost compare-and-set), handles, listing pages, and the limits. The registry-backed store
//! behind real nodes is tested end to end in tests/e2e_kv.rs.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atoll_core::kv::{KeyPage, KvEntry, KvError, KvWritten};
use atoll_isolate::wasi_kv::{KvAccess, KvBackend, KvFuture, code};

/// Keys to (value, revision), and the last revision given.
type Entries = (BTreeMap<String, (Vec<u8>, u64)>, u64);

#[derive(Debug, Default)]
struct MemoryKv {
    entries: Mutex<Entries>,
}

impl KvBackend for MemoryKv {
    fn get(&self, _: &str, key: &str) -> KvFuture<Option<KvEntry>> {
        let entry = self
            .entries
            .lock()
            .unwrap()
            .0
            .get(key)
            .map(|(value, revision)| KvEntry {
                value: value.clone(),
                revision: *revision,
            });
        Box::pin(async move { Ok(entry) })
    }

    fn set(
        &self,
        _: &str,
        key: &str,
        value: Vec<u8>,
        _: Option<u64>,
        if_revision: Option<u64>,
    ) -> KvFuture<KvWritten> {
        let mut guard = self.entries.lock().unwrap();
        let current = guard.0.get(key).map_or(0, |(_, revision)| *revision);
        let result = match if_revision {
            Some(expected) if expected != current => Err(KvError::Conflict { current }),
            _ => {
                guard.1 += 1;
                let revision = guard.1;
                guard.0.insert(key.to_string(), (value, revision));
                Ok(KvWritten {
                    revision,
                    value: None,
                })
            }
        };
        Box::pin(async move { result })
    }

    fn increment(&self, _: &str, key: &str, delta: i64) -> KvFuture<KvWritten> {
        let mut guard = self.entries.lock().unwrap();
        let current = guard.0.get(key).map(|(value, _)| value.clone());
        let result = atoll_core::kv::increment(current.as_deref(), delta).map(|value| {
            guard.1 += 1;
            let revision = guard.1;
            guard
                .0
                .insert(key.to_string(), (value.to_string().into_bytes(), revision));
            KvWritten {
                revision,
                value: Some(value),
            }
        });
        Box::pin(async move { result })
    }

    fn delete(&self, _: &str, key: &str) -> KvFuture<bool> {
        let existed = self.entries.lock().unwrap().0.remove(key).is_some();
        Box::pin(async move { Ok(existed) })
    }

    fn list(&self, _: &str, prefix: &str, after: Option<&str>, limit: usize) -> KvFuture<KeyPage> {
        let guard = self.entries.lock().unwrap();
        let mut keys: Vec<String> = guard
            .0
            .keys()
            .filter(|key| key.starts_with(prefix) && after.is_none_or(|after| key.as_str() > after))
            .cloned()
            .collect();
        let cursor = (keys.len() > limit).then(|| keys[limit - 1].clone());
        keys.truncate(limit);
        Box::pin(async move { Ok(KeyPage { keys, cursor }) })
    }
}

// Guest memory.
const NAME: u32 = 1024; // "todo"
const OTHER: u32 = 1040; // "nope"
const KEY_A: u32 = 1056; // "a"
const KEY_B: u32 = 1060; // "b"
const KEY_N: u32 = 1064; // "n"
const VALUE: u32 = 1072; // "hello world" (11)
const OUT: u32 = 4096; // 512 bytes out: codes from 4096, then the fields below
const HANDLE: u32 = 4224;
const LENGTH: u32 = 4228;
const REVISION: u32 = 4232; // u64
const NUMBER: u32 = 4240; // i64
const MORE: u32 = 4248;
const BUFFER: u32 = 4256; // 64 bytes

fn guest(calls: &[String], tail: &str) -> Vec<u8> {
    let body: Vec<String> = calls
        .iter()
        .enumerate()
        .map(|(slot, call)| format!("(i32.store (i32.const {}) {call})", OUT + 4 * slot as u32))
        .collect();
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "atoll_kv" "open" (func $open (param i32 i32 i32) (result i32)))
          (import "atoll_kv" "get" (func $get (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
          (import "atoll_kv" "set" (func $set (param i32 i32 i32 i32 i32 i64 i32) (result i32)))
          (import "atoll_kv" "cas" (func $cas (param i32 i32 i32 i32 i32 i64 i32) (result i32)))
          (import "atoll_kv" "increment" (func $increment (param i32 i32 i32 i64 i32) (result i32)))
          (import "atoll_kv" "delete" (func $delete (param i32 i32 i32) (result i32)))
          (import "atoll_kv" "list" (func $list (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "Status: 200\r\n\r\n")
          (data (i32.const {NAME}) "todo")
          (data (i32.const {OTHER}) "nope")
          (data (i32.const {KEY_A}) "a")
          (data (i32.const {KEY_B}) "b")
          (data (i32.const {KEY_N}) "n")
          (data (i32.const {VALUE}) "hello world")
          (func (export "_start") (local $i i32)
            {body}
            {tail}
            (i32.store (i32.const 256) (i32.const 0))
            (i32.store (i32.const 260) (i32.const 15))
            (i32.store (i32.const 264) (i32.const {OUT}))
            (i32.store (i32.const 268) (i32.const 512))
            (drop (call $fd_write (i32.const 1) (i32.const 256) (i32.const 2) (i32.const 300)))))"#,
        body = body.join("\n"),
    );
    wasmer::wat2wasm(wat.as_bytes()).unwrap().to_vec()
}

struct Out(Vec<u8>);

impl Out {
    fn at(&self, address: u32) -> &[u8] {
        &self.0[(address - OUT) as usize..]
    }
    fn u32_at(&self, address: u32) -> u32 {
        u32::from_le_bytes(self.at(address)[..4].try_into().unwrap())
    }
    fn u64_at(&self, address: u32) -> u64 {
        u64::from_le_bytes(self.at(address)[..8].try_into().unwrap())
    }
    fn codes(&self, count: usize) -> Vec<i32> {
        (0..count)
            .map(|slot| self.u32_at(OUT + 4 * slot as u32) as i32)
            .collect()
    }
}

async fn run(wasm: Vec<u8>, backend: Arc<MemoryKv>) -> (Out, String) {
    let access = KvAccess {
        backend,
        runtime: tokio::runtime::Handle::current(),
        stores: vec!["todo".into()],
        waits: Arc::new(tokio::sync::Semaphore::new(8)),
    };
    let function = common::load(&wasm, "kv", |config| {
        config.kv = Some(Arc::new(access));
        config.timeout = Duration::from_secs(30);
    });
    let invocation = tokio::task::spawn_blocking(move || function.invoke(&common::request()))
        .await
        .unwrap()
        .unwrap();
    (
        Out(invocation.response.body.to_vec()),
        String::from_utf8_lossy(&invocation.log).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_its_codes_and_out_parameters() {
    let backend = Arc::new(MemoryKv::default());
    let store = format!("(i32.load (i32.const {HANDLE}))");
    let calls = vec![
        format!("(call $open (i32.const {NAME}) (i32.const 4) (i32.const {HANDLE}))"), // 0
        format!("(call $open (i32.const {OTHER}) (i32.const 4) (i32.const {LENGTH}))"), // 1: not granted
        format!(
            "(call $get {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {BUFFER}) (i32.const 64) (i32.const {LENGTH}) (i32.const {REVISION}))"
        ), // 2: absent
        format!(
            "(call $set {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {VALUE}) (i32.const 11) (i64.const -1) (i32.const {REVISION}))"
        ), // 3: bad ttl
        format!(
            "(call $set {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {VALUE}) (i32.const 11) (i64.const 0) (i32.const {REVISION}))"
        ), // 4
        format!(
            "(call $get {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {BUFFER}) (i32.const 4) (i32.const {LENGTH}) (i32.const {REVISION}))"
        ), // 5: too small → size needed
        format!(
            "(call $cas {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {VALUE}) (i32.const 5) (i64.const 77) (i32.const {REVISION}))"
        ), // 6: conflict → current
        format!(
            "(call $get (i32.const 9) (i32.const {KEY_A}) (i32.const 1) (i32.const {BUFFER}) (i32.const 64) (i32.const {LENGTH}) (i32.const {REVISION}))"
        ), // 7: bad handle
        format!(
            "(call $get {store} (i32.const 65530) (i32.const 100) (i32.const {BUFFER}) (i32.const 64) (i32.const {LENGTH}) (i32.const {REVISION}))"
        ), // 8: key off memory
        format!(
            "(call $increment {store} (i32.const {KEY_N}) (i32.const 1) (i64.const 41) (i32.const {NUMBER}))"
        ), // 9
        format!(
            "(call $increment {store} (i32.const {KEY_A}) (i32.const 1) (i64.const 1) (i32.const {NUMBER}))"
        ), // 10: not a number
        format!("(call $delete {store} (i32.const {KEY_B}) (i32.const 1))"),           // 11: absent
        format!(
            "(call $set {store} (i32.const {KEY_B}) (i32.const 1) (i32.const {VALUE}) (i32.const 1) (i64.const 60) (i32.const {REVISION}))"
        ), // 12
        // A buffer for two of the three keys ("a\\nb\\n"): a page, and more to come.
        format!(
            "(call $list {store} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const {BUFFER}) (i32.const 4) (i32.const {LENGTH}) (i32.const {MORE}))"
        ), // 13
        // A buffer for nothing: the size of the first key, with its newline.
        format!(
            "(call $list {store} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const {BUFFER}) (i32.const 1) (i32.const {LENGTH}) (i32.const {MORE}))"
        ), // 14
        format!(
            "(call $increment {store} (i32.const {KEY_N}) (i32.const 1) (i64.const 1) (i32.const {NUMBER}))"
        ), // 15
    ];
    let (out, log) = run(guest(&calls, ""), Arc::clone(&backend)).await;
    assert_eq!(
        out.codes(16),
        [
            code::SUCCESS,
            code::NOT_GRANTED,
            code::NOT_FOUND,
            code::INVALID,
            code::SUCCESS,
            code::BUFFER_TOO_SMALL,
            code::CONFLICT,
            code::NOT_GRANTED,
            code::MEMORY,
            code::SUCCESS,
            code::NOT_A_NUMBER,
            code::NOT_FOUND,
            code::SUCCESS,
            code::SUCCESS,
            code::BUFFER_TOO_SMALL,
            code::SUCCESS,
        ],
        "{log}"
    );
    assert!(log.contains("kv store \"nope\" is not granted"), "{log}");
    assert_eq!(out.u32_at(HANDLE), 0);
    // The last writes: the list's "a\nb\n" page, then list 14's size needed (2), the
    // increment to 42 and the cas's current revision (1, the first set).
    assert_eq!(&out.at(BUFFER)[..4], b"a\nb\n");
    assert_eq!(out.u32_at(MORE), 1);
    assert_eq!(out.u32_at(LENGTH), 2);
    assert_eq!(out.u64_at(NUMBER) as i64, 42);
    let entries = backend.entries.lock().unwrap();
    assert_eq!(entries.0["a"].0, b"hello world", "the lost cas changed nothing");
    assert_eq!(entries.0["n"].0, b"42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_buffer_learns_the_size_needed_and_the_limit_holds() {
    let backend = Arc::new(MemoryKv::default());
    let store = format!("(i32.load (i32.const {HANDLE}))");
    let calls = vec![
        format!("(call $open (i32.const {NAME}) (i32.const 4) (i32.const {HANDLE}))"),
        format!(
            "(call $set {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {VALUE}) (i32.const 11) (i64.const 0) (i32.const {REVISION}))"
        ),
        format!(
            "(call $get {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {BUFFER}) (i32.const 4) (i32.const {LENGTH}) (i32.const {REVISION}))"
        ),
    ];
    // Then 1000 more gets: the request's 1001st call on and after is refused.
    let tail = format!(
        "(local.set $i (i32.const 0))
         (block $done (loop $again
           (i32.store (i32.const {BUFFER}) (call $get {store} (i32.const {KEY_A}) (i32.const 1) (i32.const {BUFFER}) (i32.const 64) (i32.const {NUMBER}) (i32.const {REVISION})))
           (local.set $i (i32.add (local.get $i) (i32.const 1)))
           (br_if $again (i32.lt_u (local.get $i) (i32.const 1000)))))"
    );
    let (out, log) = run(guest(&calls, &tail), backend).await;
    assert_eq!(
        out.codes(3),
        [code::SUCCESS, code::SUCCESS, code::BUFFER_TOO_SMALL]
    );
    assert_eq!(out.u32_at(LENGTH), 11, "the size needed");
    // 2 calls before the loop (open is free), so the loop's 999th get was the 1001st call.
    assert_eq!(out.u32_at(BUFFER) as i32, code::LIMIT, "{log}");
    assert!(log.contains("1000 calls, the limit"), "{log}");
}
