//! Guests written to hurt the node: every way guest code runs (a request, an instance made
//! ahead, init) stays under the deadline and the memory limit, and host calls check before
//! they work. Each case would hang, grow or spin before the fix it pins; each waits with a
//! bound and fails fast instead of hanging the run.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use atoll_isolate::snapshot::{preinitialize, preinitialize_named};
use atoll_isolate::{Engine, InstancePool, InterruptSlot, InvokeError, LoadedFunction, ScaleConfig};
use common::request;

/// The longest any case here may take before it counts as hung.
const HUNG: Duration = Duration::from_secs(30);

/// Runs `f` on its own thread and fails the test if it has not returned within [`HUNG`]
/// (the thread is left behind; the test process ends anyway).
fn bounded<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(f());
    });
    receiver
        .recv_timeout(HUNG)
        .unwrap_or_else(|_| panic!("{what} did not return within {HUNG:?}"))
}

fn wasm(wat: &str) -> Vec<u8> {
    wasmer::wat2wasm(wat.as_bytes()).unwrap().to_vec()
}

/// A module whose `(start)` function loops forever; `_start` would answer 200.
const LOOPING_START: &str = r#"(module
  (memory (export "memory") 1)
  (func $spin (loop $forever (br $forever)))
  (start $spin)
  (func (export "_start")))"#;

fn function(wasm: &[u8], timeout: Duration, memory: u64) -> LoadedFunction {
    common::load(wasm, "hostile", |config| {
        config.timeout = timeout;
        config.max_memory_bytes = memory;
    })
}

#[test]
fn a_looping_start_function_made_ahead_stops_at_the_timeout() {
    let function = function(&wasm(LOOPING_START), Duration::from_millis(200), 1 << 20);
    let started = Instant::now();
    let outcome = bounded("preparing an instance ahead", move || {
        function.prepare().map(drop)
    });
    assert!(matches!(outcome, Err(InvokeError::Timeout { .. })), "{outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn a_looping_start_function_on_the_request_path_obeys_the_request_timeout() {
    let function = function(&wasm(LOOPING_START), Duration::from_secs(3600), 1 << 20);
    let pool = InstancePool::new(function, ScaleConfig::default());
    let slot = InterruptSlot::new();
    let firing = Arc::clone(&slot);
    // What the router does when the request's timeout passes: fire until the run returns.
    let (done, finished) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        while finished.recv_timeout(Duration::from_millis(10)).is_err() {
            firing.fire();
        }
    });
    let outcome = bounded("a request instantiating a looping start", move || {
        let outcome = pool.execute(&request(), &slot, None).map(drop);
        drop(done);
        outcome
    });
    assert!(matches!(outcome, Err(InvokeError::Timeout { .. })), "{outcome:?}");
}

#[test]
fn pool_upkeep_backs_off_a_function_whose_instances_cannot_be_made() {
    // A 2 s start timeout: a pass that runs the start function again takes 2 s; one that
    // backs off stays far below the 1 s bound even on a loaded machine.
    let function = function(&wasm(LOOPING_START), Duration::from_secs(2), 1 << 20);
    let scale = ScaleConfig {
        min_instances: 1,
        ..ScaleConfig::default()
    };
    let pool = InstancePool::new(function, scale);
    let first = Arc::clone(&pool);
    let made = bounded("the first maintenance pass", move || first.maintain());
    assert_eq!(made, Some(vec![]), "no instance can be made");
    // Backing off: the next pass does not run the looping start again.
    let started = Instant::now();
    let again = Arc::clone(&pool);
    assert_eq!(bounded("the second pass", move || again.maintain()), Some(vec![]));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the second pass ran the start function again: {:?}",
        started.elapsed()
    );
}

#[test]
fn init_after_a_looping_start_function_is_refused_in_bounded_time() {
    let module = wasm(
        r#"(module
          (memory (export "memory") 1)
          (func $spin (loop $forever (br $forever)))
          (start $spin)
          (func (export "atoll_init"))
          (func (export "_start")))"#,
    );
    let engine = Engine::new().unwrap();
    let error = bounded("pre-initialising", move || {
        preinitialize(&engine, &module, &[]).unwrap_err()
    });
    assert!(error.to_string().contains("did not finish within"), "{error}");
}

/// An init function that grows memory to `pages` 64 KiB pages and traps if it cannot.
fn growing_init(pages: u32) -> Vec<u8> {
    wasm(&format!(
        r#"(module
          (memory (export "memory") 1)
          (func (export "atoll_init")
            (if (i32.eq (memory.grow (i32.const {grow})) (i32.const -1)) (then unreachable))
            (i32.store (i32.const {last}) (i32.const 1)))
          (func (export "_start")))"#,
        grow = pages - 1,
        last = pages * 65536 - 4,
    ))
}

#[test]
fn init_obeys_the_memory_limit() {
    let engine = Engine::new().unwrap();
    // 256 MiB under a 64 MiB limit: refused, naming the init function.
    let error = preinitialize_named(&engine, &growing_init(4096), "bomb", &[], 64 << 20).unwrap_err();
    assert!(
        error.to_string().contains("init function `atoll_init` trapped"),
        "{error}"
    );
    // The same growth is fine under a limit that allows it, and stays under it.
    preinitialize_named(&engine, &growing_init(16), "fine", &[], 1 << 20).unwrap();
    let error = preinitialize_named(&engine, &growing_init(17), "over", &[], 1 << 20).unwrap_err();
    assert!(error.to_string().contains("trapped"), "{error}");
}

#[test]
fn shared_memories_and_huge_tables_are_refused() {
    let engine = Engine::new().unwrap();
    let shared = wasm(
        r#"(module
          (memory (export "memory") 1 65536 shared)
          (func (export "_start")))"#,
    );
    let error = engine.compile(&shared).unwrap_err();
    assert!(error.to_string().contains("shared memory"), "{error}");
    let table = wasm(
        r#"(module
          (memory (export "memory") 1)
          (table 2000000 funcref)
          (func (export "_start")))"#,
    );
    let error = engine.compile(&table).unwrap_err();
    assert!(error.to_string().contains("table of 2000000 elements"), "{error}");
}

#[test]
fn tables_cannot_grow_past_the_ceiling() {
    let module = wasm(&format!(
        r#"(module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (table 1 funcref)
          (func (export "_start")
            ;; Growing to the ceiling works; one more fails (-1), which exits 3.
            (if (i32.eq (table.grow (ref.null func) (i32.const {to_ceiling})) (i32.const -1))
              (then (call $exit (i32.const 2))))
            (if (i32.ne (table.grow (ref.null func) (i32.const 1)) (i32.const -1))
              (then (call $exit (i32.const 4))))
            (call $exit (i32.const 3))))"#,
        to_ceiling = atoll_isolate::engine::MAX_TABLE_ELEMENTS - 1,
    ));
    let function = function(&module, Duration::from_secs(10), 1 << 20);
    match function.invoke(&request()) {
        Err(InvokeError::Exit { code: 3, .. }) => {}
        other => panic!("expected exit 3 (ceiling enforced), got {other:?}"),
    }
}

/// A guest that calls `random_get(buffer, length)` after growing memory by `grow` pages and
/// answers with the errno.
fn random_get_guest(grow: u32, buffer: u32, length: u32) -> Vec<u8> {
    wasm(&format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "Status: 200\n\nerrno=")
          (func (export "_start")
            (local $errno i32)
            (drop (memory.grow (i32.const {grow})))
            (local.set $errno (call $random_get (i32.const {buffer}) (i32.const {length})))
            (i32.store8 (i32.const 120) (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
            (i32.store8 (i32.const 119) (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
            (i32.store (i32.const 0) (i32.const 100))
            (i32.store (i32.const 4) (i32.const 21))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    ))
}

#[test]
fn random_get_checks_bounds_before_it_works() {
    // 4 GiB asked of a 64 KiB memory: EFAULT (21) at once, nothing allocated.
    let function = function(
        &random_get_guest(0, 16, u32::MAX),
        Duration::from_secs(10),
        1 << 20,
    );
    let started = Instant::now();
    let invocation = function.invoke(&request()).unwrap();
    assert_eq!(&invocation.response.body[..], b"errno=21");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_long_random_get_stops_at_the_deadline() {
    // 1 GiB of randomness takes seconds; the deadline (100 ms) must stop it in the call.
    let function = function(
        &random_get_guest(16383, 0, 1 << 30),
        Duration::from_millis(100),
        2 << 30,
    );
    let ready = function.prepare().unwrap();
    let handle = ready.interrupt_handle();
    let (done, finished) = mpsc::channel::<()>();
    let first_interrupt = Arc::new(std::sync::OnceLock::<Instant>::new());
    let interrupted = Arc::clone(&first_interrupt);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        while finished.recv_timeout(Duration::from_millis(10)).is_err() {
            interrupted.get_or_init(Instant::now);
            handle.interrupt();
        }
    });
    let outcome = bounded("a 1 GiB random_get", move || {
        let outcome = ready.run(&request()).map(drop);
        drop(done);
        outcome
    });
    assert!(matches!(outcome, Err(InvokeError::Timeout { .. })), "{outcome:?}");
    // From the first interrupt: thread start-up and the interrupter's sleep are not the guest's.
    let elapsed = first_interrupt
        .get()
        .expect("the guest was interrupted")
        .elapsed();
    assert!(
        elapsed < Duration::from_millis(500),
        "stopped {elapsed:?} after the first interrupt"
    );
}

#[test]
fn clocks_monotonic_and_cpu_time_are_not_wall_time() {
    // clock_time_get for clocks 0..=3, answered as four little-endian u64s.
    let module = wasm(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "Status: 200\n\n")
          (func (export "_start")
            (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 113)))
            (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 121)))
            (drop (call $clock (i32.const 2) (i64.const 1) (i32.const 129)))
            (drop (call $clock (i32.const 3) (i64.const 1) (i32.const 137)))
            (i32.store (i32.const 0) (i32.const 100))
            (i32.store (i32.const 4) (i32.const 45))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    );
    let function = function(&module, Duration::from_secs(10), 1 << 20);
    let read =
        |body: &[u8], index: usize| u64::from_le_bytes(body[index * 8..index * 8 + 8].try_into().unwrap());
    let first = function.invoke(&request()).unwrap().response.body;
    let second = function.invoke(&request()).unwrap().response.body;
    let an_hour = Duration::from_secs(3600).as_nanos() as u64;
    // CPU-time clocks count from the instance, not from 1970.
    assert!(
        read(&first, 2) < an_hour && read(&first, 3) < an_hour,
        "{first:?}"
    );
    // Monotonic never goes back between requests, and is close to wall time.
    assert!(read(&second, 1) >= read(&first, 1));
    assert!(read(&first, 1).abs_diff(read(&first, 0)) < an_hour);
}
