//! Pre-initialisation: an init export runs once, and every request starts from the state it
//! left — memory, non-exported globals, grown memory — with passive segments still usable.

mod common;

use atoll_isolate::snapshot::{Preinit, preinitialize};
use atoll_isolate::wasi::{self, WasiContext};
use atoll_isolate::{Engine, FunctionConfig, IsolateError, LoadedFunction};
use bytes::Bytes;
use common::request;
use wasmer::{ExternType, Value};

/// A WCGI module: `prelude` declares memory, globals and data; `functions` defines the init
/// and `_start` functions, which may call `$respond` to answer `Status: 200` with a body.
fn module(prelude: &str, functions: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          {prelude}
          (data (i32.const 60000) "Status: 200\n\n")
          (func $respond (param $body i32) (param $len i32)
            (i32.store (i32.const 60016) (i32.const 60000))
            (i32.store (i32.const 60020) (i32.const 13))
            (i32.store (i32.const 60024) (local.get $body))
            (i32.store (i32.const 60028) (local.get $len))
            (drop (call $fd_write (i32.const 1) (i32.const 60016) (i32.const 2) (i32.const 60032))))
          {functions})"#
    );
    wasmer::wat2wasm(wat.as_bytes()).unwrap().to_vec()
}

fn rewritten(engine: &Engine, wasm: &[u8], expected_export: &str) -> Vec<u8> {
    match preinitialize(engine, wasm, &[]).unwrap() {
        Preinit::Rewritten { wasm, init_export } => {
            assert_eq!(init_export, expected_export);
            wasm
        }
        Preinit::Unchanged => panic!("expected a rewritten module"),
    }
}

fn body(engine: &Engine, wasm: &[u8]) -> Vec<u8> {
    let module = engine.compile(wasm).unwrap();
    let function = LoadedFunction::new(engine.clone(), module, FunctionConfig::new("t"));
    let invocation = function.invoke(&request()).unwrap();
    assert_eq!(invocation.response.status, 200);
    invocation.response.body.to_vec()
}

fn exports(engine: &Engine, wasm: &[u8]) -> Vec<String> {
    let module = engine.compile(wasm).unwrap();
    module.exports().map(|export| export.name().to_string()).collect()
}

/// `_start` answers with the counter as two digits and the byte the pointer points at, then
/// changes all three so that a later request would see it if state leaked.
fn counter_module(init_name: &str) -> Vec<u8> {
    module(
        r#"(memory (export "memory") 1)
           (global $counter (mut i32) (i32.const 0))
           (global $pointer (mut i32) (i32.const 0))"#,
        &format!(
            r#"(func (export "{init_name}")
                 (global.set $counter (i32.const 42))
                 (global.set $pointer (i32.const 1024))
                 (i32.store8 (global.get $pointer) (i32.const 65)))
               (func (export "_start")
                 (i32.store8 (i32.const 3000) (i32.add (i32.const 48) (i32.div_u (global.get $counter) (i32.const 10))))
                 (i32.store8 (i32.const 3001) (i32.add (i32.const 48) (i32.rem_u (global.get $counter) (i32.const 10))))
                 (i32.store8 (i32.const 3002) (i32.add (i32.const 48) (i32.load8_u (global.get $pointer))))
                 (global.set $counter (i32.const 7))
                 (i32.store8 (global.get $pointer) (i32.const 1))
                 (global.set $pointer (i32.const 2048))
                 (call $respond (i32.const 3000) (i32.const 3)))"#
        ),
    )
}

#[test]
fn init_state_is_baked_into_every_request() {
    let engine = Engine::new().unwrap();
    let original = counter_module("atoll_init");
    // Without pre-initialisation the globals are 0 and address 0 holds 0.
    assert_eq!(body(&engine, &original), b"000");

    let wasm = rewritten(&engine, &original, "atoll_init");
    // 'A' (65) + 48 = 'q'.
    assert_eq!(body(&engine, &wasm), b"42q");
    assert_eq!(
        body(&engine, &wasm),
        b"42q",
        "each request starts from the snapshot"
    );
    let names = exports(&engine, &wasm);
    assert!(!names.iter().any(|name| name == "atoll_init"), "{names:?}");
    assert!(names.iter().any(|name| name == "_start"));
    assert!(names.iter().any(|name| name == "memory"));
    assert!(!names.iter().any(|name| name.starts_with("__atoll")), "{names:?}");
}

#[test]
fn wizer_initialize_is_an_init_export_too() {
    let engine = Engine::new().unwrap();
    let wasm = rewritten(&engine, &counter_module("wizer.initialize"), "wizer.initialize");
    assert_eq!(body(&engine, &wasm), b"42q");
    assert!(
        !exports(&engine, &wasm)
            .iter()
            .any(|name| name == "wizer.initialize")
    );
}

#[test]
fn a_module_without_init_export_is_unchanged() {
    let engine = Engine::new().unwrap();
    let wasm = module(
        r#"(memory (export "memory") 1)"#,
        r#"(func (export "_start") (call $respond (i32.const 0) (i32.const 0)))"#,
    );
    assert_eq!(preinitialize(&engine, &wasm, &[]).unwrap(), Preinit::Unchanged);
}

#[test]
fn an_invalid_module_is_refused() {
    let engine = Engine::new().unwrap();
    let error = preinitialize(&engine, b"\0asm\x01\0\0\0garbage", &[]).unwrap_err();
    assert!(matches!(error, IsolateError::Invalid(_)), "{error}");
}

#[test]
fn a_trapping_init_is_an_error_that_says_so() {
    let engine = Engine::new().unwrap();
    let wasm = module(
        r#"(memory (export "memory") 1)"#,
        r#"(func (export "atoll_init") unreachable)
           (func (export "_start") (call $respond (i32.const 0) (i32.const 0)))"#,
    );
    let error = preinitialize(&engine, &wasm, &[]).unwrap_err();
    assert!(matches!(error, IsolateError::Invalid(_)), "{error}");
    let message = error.to_string();
    assert!(message.contains("init function"), "{message}");
    assert!(message.contains("trapped"), "{message}");
}

#[test]
fn an_init_export_with_parameters_is_refused() {
    let engine = Engine::new().unwrap();
    let wasm = module(
        r#"(memory (export "memory") 1)"#,
        r#"(func (export "atoll_init") (param i32))
           (func (export "_start") (call $respond (i32.const 0) (i32.const 0)))"#,
    );
    let message = preinitialize(&engine, &wasm, &[]).unwrap_err().to_string();
    assert!(message.contains("init export"), "{message}");
}

#[test]
fn grown_memory_becomes_the_initial_size() {
    let engine = Engine::new().unwrap();
    // Init grows 1 → 5 pages and writes "END!" in the last four bytes; `_start` answers with
    // the page count and those bytes.
    let wasm = module(
        r#"(memory (export "memory") 1 16)"#,
        r#"(func (export "atoll_init")
             (drop (memory.grow (i32.const 4)))
             (i32.store (i32.const 327676) (i32.const 0x21444e45)))
           (func (export "_start")
             (i32.store8 (i32.const 3000) (i32.add (i32.const 48) (memory.size)))
             (i32.store (i32.const 3001) (i32.load (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4))))
             (call $respond (i32.const 3000) (i32.const 5)))"#,
    );
    let rewritten = rewritten(&engine, &wasm, "atoll_init");
    let module = engine.compile(&rewritten).unwrap();
    let memory = module
        .exports()
        .find_map(|export| match export.ty() {
            ExternType::Memory(memory) if export.name() == "memory" => Some(*memory),
            _ => None,
        })
        .unwrap();
    assert_eq!(memory.minimum.0, 5);
    assert_eq!(memory.maximum.map(|maximum| maximum.0), Some(16));
    assert_eq!(body(&engine, &rewritten), b"5END!");
}

#[test]
fn passive_segments_keep_their_indices() {
    let engine = Engine::new().unwrap();
    // Segment 0 is active, segment 1 passive: `_start` copies the passive one in by index
    // (and drops it) after init changed what the active one wrote.
    let wasm = module(
        r#"(memory (export "memory") 1)
           (global $n (mut i32) (i32.const 0))
           (data (i32.const 100) "xx")
           (data $greeting "hello")"#,
        r#"(func (export "atoll_init")
             (global.set $n (i32.const 7))
             (i32.store8 (i32.const 101) (i32.const 121)))
           (func (export "_start")
             (memory.init $greeting (i32.const 200) (i32.const 0) (i32.const 5))
             (data.drop $greeting)
             (i32.store8 (i32.const 205) (i32.add (i32.const 48) (global.get $n)))
             (i32.store16 (i32.const 206) (i32.load16_u (i32.const 100)))
             (call $respond (i32.const 200) (i32.const 8)))"#,
    );
    let rewritten = rewritten(&engine, &wasm, "atoll_init");
    assert_eq!(body(&engine, &rewritten), b"hello7xy");
    assert_eq!(body(&engine, &rewritten), b"hello7xy");
}

#[test]
fn an_init_that_drops_a_segment_is_refused() {
    let engine = Engine::new().unwrap();
    let wasm = module(
        r#"(memory (export "memory") 1)
           (data $greeting "hello")"#,
        r#"(func $forget (data.drop $greeting))
           (func (export "atoll_init") (call $forget))
           (func (export "_start") (call $respond (i32.const 0) (i32.const 0)))"#,
    );
    let message = preinitialize(&engine, &wasm, &[]).unwrap_err().to_string();
    assert!(message.contains("data.drop"), "{message}");
}

#[test]
fn init_sees_the_manifest_environment() {
    let engine = Engine::new().unwrap();
    let wasm = wasmer::wat2wasm(
        br#"(module
          (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
          (memory (export "memory") 1)
          (global $count (export "count") (mut i32) (i32.const 0))
          (func (export "atoll_init")
            (drop (call $sizes (i32.const 0) (i32.const 4)))
            (global.set $count (i32.load (i32.const 0))))
          (func (export "_start")))"#,
    )
    .unwrap();
    let env = vec![
        ("A".to_string(), "1".to_string()),
        ("B".to_string(), "2".to_string()),
    ];
    let Preinit::Rewritten { wasm, .. } = preinitialize(&engine, &wasm, &env).unwrap() else {
        panic!("expected a rewritten module");
    };
    let globals = exported_globals(&wasm, &["count"]);
    assert_eq!(globals[0].i32(), Some(2));
}

/// Instantiates a module with the lean WASI host and reads exported globals.
fn exported_globals(wasm: &[u8], names: &[&str]) -> Vec<Value> {
    let mut store = wasmer::Store::default();
    let module = wasmer::Module::new(&store, wasm).unwrap();
    let context = WasiContext::new(&["t"], &[], Bytes::new(), 1024, 1024);
    let env = wasmer::FunctionEnv::new(&mut store, context);
    let imports = wasi::imports(&mut store, &env, &module);
    let instance = wasmer::Instance::new(&mut store, &module, &imports).unwrap();
    names
        .iter()
        .map(|name| instance.exports.get_global(name).unwrap().get(&mut store))
        .collect()
}

#[test]
fn every_numeric_global_type_is_captured_and_the_start_function_does_not_run_again() {
    let engine = Engine::new().unwrap();
    let wasm = wasmer::wat2wasm(
        br#"(module
          (memory (export "memory") 1)
          (global $a (export "a") (mut i32) (i32.const 0))
          (global $b (export "b") (mut i64) (i64.const 0))
          (global $c (export "c") (mut f32) (f32.const 0))
          (global $d (export "d") (mut f64) (f64.const 0))
          (global $fixed (export "fixed") i32 (i32.const 9))
          (func $start (global.set $a (i32.const 5)))
          (start $start)
          (func (export "atoll_init")
            (global.set $a (i32.add (global.get $a) (i32.const 1)))
            (global.set $b (i64.const -1234567890123))
            (global.set $c (f32.const 1.5))
            (global.set $d (f64.const -2.25)))
          (func (export "_start")))"#,
    )
    .unwrap();
    let Preinit::Rewritten { wasm, .. } = preinitialize(&engine, &wasm, &[]).unwrap() else {
        panic!("expected a rewritten module");
    };
    let globals = exported_globals(&wasm, &["a", "b", "c", "d", "fixed"]);
    // The start function set 5 before init added 1; had it run again it would be 5.
    assert_eq!(globals[0].i32(), Some(6));
    assert_eq!(globals[1].i64(), Some(-1234567890123));
    assert_eq!(globals[2].f32(), Some(1.5));
    assert_eq!(globals[3].f64(), Some(-2.25));
    assert_eq!(globals[4].i32(), Some(9));
}

#[test]
fn scattered_memory_fits_the_segment_limit() {
    let engine = Engine::new().unwrap();
    // Init writes one byte every 128 bytes across 64 MiB: 524 288 runs, far more than the
    // 100 000 segments a module may have, so the rewrite must coalesce them.
    let wasm = wasmer::wat2wasm(
        br#"(module
          (memory (export "memory") 1024)
          (func (export "atoll_init") (local $at i32)
            (loop $next
              (i32.store8 (local.get $at) (i32.const 1))
              (local.set $at (i32.add (local.get $at) (i32.const 128)))
              (br_if $next (i32.lt_u (local.get $at) (i32.const 67108864)))))
          (func (export "_start")))"#,
    )
    .unwrap();
    let Preinit::Rewritten { wasm, .. } = preinitialize(&engine, &wasm, &[]).unwrap() else {
        panic!("expected a rewritten module");
    };
    let mut store = wasmer::Store::default();
    let module = wasmer::Module::new(&store, &wasm).unwrap();
    let instance = wasmer::Instance::new(&mut store, &module, &wasmer::imports! {}).unwrap();
    let memory = instance.exports.get_memory("memory").unwrap();
    let contents = memory.view(&store).copy_to_vec().unwrap();
    assert_eq!(contents.len(), 64 << 20);
    assert!(
        contents
            .iter()
            .enumerate()
            .all(|(at, &byte)| byte == u8::from(at % 128 == 0))
    );
}

#[test]
fn looping_init_is_stopped_and_refused() {
    let engine = atoll_isolate::Engine::new().unwrap();
    let wasm = wasmer::wat2wasm(
        br#"(module
          (memory (export "memory") 1)
          (func (export "atoll_init") (loop $forever (br $forever)))
          (func (export "_start")))"#,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let error = atoll_isolate::snapshot::preinitialize(&engine, &wasm, &[])
        .unwrap_err()
        .to_string();
    assert!(error.contains("did not finish"), "{error}");
    assert!(started.elapsed() < atoll_isolate::snapshot::INIT_TIME_LIMIT * 3);
}
