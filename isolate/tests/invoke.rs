//! Invocations of small hand-written WCGI guests: the happy path and each failure the edge
//! maps to 502.

mod common;

use atoll_isolate::{Engine, FunctionConfig, InvokeError, LoadedFunction};
use common::request;

/// A guest that writes `output` to stdout (fd 1), `log` to stderr (fd 2), then runs `tail`.
fn guest(output: &str, log: &str, tail: &str) -> Vec<u8> {
    let escape = |text: &str| text.bytes().map(|b| format!("\\{b:02x}")).collect::<String>();
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
          (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 1024) "{out}")
          (data (i32.const 8192) "{err}")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 1024))
            (i32.store (i32.const 4) (i32.const {out_len}))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
            (i32.store (i32.const 0) (i32.const 8192))
            (i32.store (i32.const 4) (i32.const {err_len}))
            (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 16)))
            {tail}))"#,
        out = escape(output),
        err = escape(log),
        out_len = output.len(),
        err_len = log.len(),
    );
    wasmer::wat2wasm(wat.as_bytes()).unwrap().to_vec()
}

fn load(wasm: &[u8]) -> LoadedFunction {
    common::load(wasm, "test", |config| {
        config.env.push(("GREETING".into(), "hi".into()));
    })
}

#[test]
fn well_formed_output_becomes_a_response() {
    let function = load(&guest("Status: 201\nX-A: b\n\nhello", "a log line", ""));
    let invocation = function.invoke(&request()).unwrap();
    assert_eq!(invocation.response.status, 201);
    assert_eq!(invocation.response.headers["x-a"], "b");
    assert_eq!(&invocation.response.body[..], b"hello");
    assert_eq!(invocation.log, b"a log line");
}

#[test]
fn exit_zero_is_success_and_nonzero_is_an_error_with_the_log() {
    let ok = load(&guest(
        "Content-Type: text/plain\n\nok",
        "",
        "(call $proc_exit (i32.const 0))",
    ));
    assert_eq!(&ok.invoke(&request()).unwrap().response.body[..], b"ok");

    let failing = load(&guest(
        "Content-Type: text/plain\n\nok",
        "bad things",
        "(call $proc_exit (i32.const 3))",
    ));
    match failing.invoke(&request()) {
        Err(InvokeError::Exit { code: 3, log }) => assert_eq!(log, b"bad things"),
        other => panic!("expected exit 3, got {other:?}"),
    }
}

#[test]
fn trap_is_reported_with_the_log() {
    let function = load(&guest("", "about to trap", "unreachable"));
    match function.invoke(&request()) {
        Err(error @ InvokeError::Trap { .. }) => {
            assert_eq!(error.log(), b"about to trap");
            assert!(error.to_string().contains("unreachable"), "{error}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    // The same function keeps working for the next request (fresh instance).
    assert!(matches!(
        function.invoke(&request()),
        Err(InvokeError::Trap { .. })
    ));
}

#[test]
fn garbage_output_is_malformed() {
    let function = load(&guest("not cgi at all", "", ""));
    assert!(matches!(
        function.invoke(&request()),
        Err(InvokeError::MalformedOutput { .. })
    ));
}

#[test]
fn modules_that_are_not_wcgi_commands_are_refused() {
    let engine = Engine::new().unwrap();
    let error = engine.validate(b"definitely not wasm").unwrap_err().to_string();
    assert!(error.contains("not a WebAssembly binary"), "{error}");

    let no_start = wasmer::wat2wasm(br#"(module (memory (export "memory") 1))"#).unwrap();
    let error = engine.validate(&no_start).unwrap_err().to_string();
    assert!(error.contains("_start"), "{error}");

    let foreign = wasmer::wat2wasm(
        br#"(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    let error = engine.validate(&foreign).unwrap_err().to_string();
    assert!(error.contains("env::f"), "{error}");
}

#[test]
fn response_over_the_cap_is_refused_with_the_log() {
    let engine = Engine::new().unwrap();
    let wasm = guest(
        "Content-Type: text/plain\n\nthis body is longer than the cap",
        "wrote a lot",
        "",
    );
    let mut config = FunctionConfig::new("test");
    config.max_response_bytes = 16;
    let function = LoadedFunction::new(engine.clone(), engine.compile(&wasm).unwrap(), config);
    match function.invoke(&request()) {
        Err(error @ InvokeError::ResponseTooLarge { limit: 16, .. }) => {
            assert_eq!(error.log(), b"wrote a lot");
            assert_eq!(error.outcome(), "response_too_large");
        }
        other => panic!("expected the response cap, got {other:?}"),
    }
}
