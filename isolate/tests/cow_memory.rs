//! Copy-on-write memories: same contents as stock wasmer, no state across instances or
//! modules sharing a pooled slot, growth and its limit, one page-map fd for the process, no
//! image kept open by a pooled slot once its module is gone, and a start-up timing print.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_isolate::cow_memory::{
    self, MemoryImage, MemoryPlan, declared_minimum_bytes, free_slots_on_this_thread, instantiate_with,
};
use wasmer::{Instance, Module, Store, imports};

const PAGE: usize = 65536;

fn engine() -> wasmer::Engine {
    let mut engine: wasmer::Engine = wasmer::sys::EngineBuilder::new(wasmer::sys::Cranelift::default())
        .engine()
        .into();
    cow_memory::install(&mut engine);
    engine
}

/// A module with 4 initial pages (max 16), data at several constant offsets (one segment
/// overwriting part of another, one on the last page), and helpers to poke at memory.
fn module_a() -> Vec<u8> {
    wasmer::wat2wasm(
        br#"(module
          (memory (export "memory") 4 16)
          (data (i32.const 0) "hello, image")
          (data (i32.const 70000) "world")
          (data (i32.const 70002) "RL")
          (data (i32.const 131072) "\01\02\03\04\05\06\07\08")
          (data (i32.const 262139) "last!")
          (data "passive segment")
          (func (export "load8") (param i32) (result i32) (i32.load8_u (local.get 0)))
          (func (export "store8") (param i32 i32) (i32.store8 (local.get 0) (local.get 1)))
          (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
          (func (export "init") (param i32)
            (memory.init 5 (local.get 0) (i32.const 0) (i32.const 15))))"#,
    )
    .expect("module a")
    .into_owned()
}

/// Same memory shape as A (so it reuses A's slots), different data.
fn module_b() -> Vec<u8> {
    wasmer::wat2wasm(
        br#"(module
          (memory (export "memory") 4 16)
          (data (i32.const 16) "module b")
          (func (export "load8") (param i32) (result i32) (i32.load8_u (local.get 0)))
          (func (export "store8") (param i32 i32) (i32.store8 (local.get 0) (local.get 1)))
          (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))"#,
    )
    .expect("module b")
    .into_owned()
}

struct Running {
    store: Store,
    instance: Instance,
}

impl Running {
    fn start(engine: &wasmer::Engine, module: &Module, plan: Option<&MemoryPlan>) -> Running {
        let mut store = Store::new(engine.clone());
        let mut instantiate =
            || Instance::new(&mut store, module, &imports! {}).map_err(|error| error.to_string());
        let instance = match plan {
            Some(plan) => instantiate_with(plan, instantiate),
            None => instantiate(),
        }
        .expect("instantiates");
        Running { store, instance }
    }

    fn memory(&self) -> Vec<u8> {
        let memory = self.instance.exports.get_memory("memory").unwrap();
        let view = memory.view(&self.store);
        let mut bytes = vec![0; view.data_size() as usize];
        view.read(0, &mut bytes).unwrap();
        bytes
    }

    fn load8(&mut self, address: usize) -> i32 {
        let load = self
            .instance
            .exports
            .get_typed_function::<i32, i32>(&self.store, "load8")
            .unwrap();
        load.call(&mut self.store, address as i32).unwrap()
    }

    fn store8(&mut self, address: usize, value: u8) {
        let store = self
            .instance
            .exports
            .get_typed_function::<(i32, i32), ()>(&self.store, "store8")
            .unwrap();
        store
            .call(&mut self.store, address as i32, i32::from(value))
            .unwrap();
    }

    fn try_load8(&mut self, address: usize) -> Result<i32, String> {
        let load = self
            .instance
            .exports
            .get_typed_function::<i32, i32>(&self.store, "load8")
            .unwrap();
        load.call(&mut self.store, address as i32)
            .map_err(|error| error.message())
    }

    /// Where the linear memory lives: equal for two instances means the same pooled slot.
    fn base(&self) -> usize {
        let memory = self.instance.exports.get_memory("memory").unwrap();
        memory.view(&self.store).data_ptr() as usize
    }

    fn grow(&mut self, delta: i32) -> i32 {
        let grow = self
            .instance
            .exports
            .get_typed_function::<i32, i32>(&self.store, "grow")
            .unwrap();
        grow.call(&mut self.store, delta).unwrap()
    }
}

fn plan(wasm: &[u8], max_bytes: Option<u64>) -> MemoryPlan {
    let image = MemoryImage::from_wasm(wasm).unwrap().expect("an image");
    MemoryPlan {
        image: Some(image),
        max_bytes,
    }
}

#[test]
fn image_describes_the_data_segments() {
    let image = MemoryImage::from_wasm(&module_a()).unwrap().unwrap();
    assert_eq!(image.initial_pages(), 4);
    assert_eq!(image.maximum_pages(), Some(16));
    assert_eq!(image.data_segment_count(), 5);
    assert_eq!(image.len(), 4 * PAGE, "the last segment ends on the last page");
    let image = MemoryImage::from_wasm(&module_b()).unwrap().unwrap();
    assert_eq!(image.data_segment_count(), 1);
    assert_eq!(image.len() % 4096, 0);
    assert!(image.len() >= 24 && image.len() < PAGE);
}

#[test]
fn armed_memory_reads_back_exactly_like_stock_wasmer() {
    let engine = engine();
    let wasm = module_a();
    let module = Module::new(&engine, &wasm).unwrap();
    let stock = Running::start(&engine, &module, None).memory();
    let mut armed = Running::start(&engine, &module, Some(&plan(&wasm, None)));
    let cow = armed.memory();
    assert_eq!(stock.len(), 4 * PAGE);
    assert_eq!(cow.len(), stock.len());
    assert!(cow == stock, "copy-on-write memory differs from stock wasmer's");
    assert_eq!(&cow[..12], b"hello, image");
    assert_eq!(&cow[70000..70005], b"woRLd");
    assert_eq!(&cow[262139..], b"last!");
    assert!(cow[12..70000].iter().all(|byte| *byte == 0));
    assert_eq!(armed.load8(262143), i32::from(b'!'));
    assert_eq!(armed.load8(200000), 0);

    // A passive segment is still copied by `memory.init` after instantiation.
    let init = armed
        .instance
        .exports
        .get_typed_function::<i32, ()>(&armed.store, "init")
        .unwrap();
    init.call(&mut armed.store, 1000).unwrap();
    assert_eq!(&armed.memory()[1000..1015], b"passive segment");

    // Without an image (only a limit) the CowMemory copies the segments itself.
    let plain = Running::start(
        &engine,
        &module,
        Some(&MemoryPlan {
            image: None,
            max_bytes: Some(8 * PAGE as u64),
        }),
    );
    assert!(plain.memory() == stock);
}

#[test]
fn writes_do_not_reach_the_next_instance_of_the_same_module() {
    let engine = engine();
    let wasm = module_a();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    for round in 0..3 {
        let mut running = Running::start(&engine, &module, Some(&plan));
        assert_eq!(running.load8(0), i32::from(b'h'), "round {round}");
        assert_eq!(running.load8(3 * PAGE + 7), 0, "round {round}");
        running.store8(0, b'X'); // an image page
        running.store8(3 * PAGE + 7, 0xAA); // a zero page
        assert_eq!(running.grow(2), 4);
        assert_eq!(running.load8(5 * PAGE), 0, "round {round}: grown page");
        running.store8(5 * PAGE, 0xBB); // a grown page
        assert_eq!(running.load8(0), i32::from(b'X'));
    }
    assert!(free_slots_on_this_thread() >= 1, "the slot went back to the pool");
}

#[test]
fn a_reused_slot_shows_nothing_of_another_module() {
    let engine = engine();
    let (wasm_a, wasm_b) = (module_a(), module_b());
    let module_a = Module::new(&engine, &wasm_a).unwrap();
    let module_b = Module::new(&engine, &wasm_b).unwrap();
    let (plan_a, plan_b) = (plan(&wasm_a, None), plan(&wasm_b, None));
    let stock_b = Running::start(&engine, &module_b, None).memory();

    let slots_before = free_slots_on_this_thread();
    let mut a = Running::start(&engine, &module_a, Some(&plan_a));
    assert_eq!(free_slots_on_this_thread(), slots_before.saturating_sub(1));
    for address in [20, 100, 70001, 3 * PAGE + 9] {
        a.store8(address, 0x5A);
    }
    assert_eq!(a.grow(3), 4);
    a.store8(6 * PAGE + 1, 0x5A);
    drop(a);
    assert!(free_slots_on_this_thread() > 0);

    for plan in [Some(&plan_b), Some(&MemoryPlan::default())] {
        let slots = free_slots_on_this_thread();
        let mut b = Running::start(&engine, &module_b, plan);
        assert_eq!(free_slots_on_this_thread(), slots - 1, "the slot was reused");
        assert!(b.memory() == stock_b, "B sees exactly its own image");
        assert_eq!(b.load8(100), 0, "A's image (\"hello, image\") is gone");
        assert_eq!(b.load8(70001), 0);
        assert_eq!(b.load8(3 * PAGE + 9), 0);
        assert_eq!(b.grow(3), 4);
        assert_eq!(b.load8(6 * PAGE + 1), 0, "A's grown page is gone");
        b.store8(6 * PAGE + 2, 1);
    }
}

/// Dirties every kind of page a slot has: image pages, zero pages after the image, and
/// (growing to 7 pages if smaller) pages beyond the initial size.
fn scribble(running: &mut Running) {
    for address in [0, 11, 70001, 131072, 262143, 20, 3 * PAGE + 9, 200000] {
        running.store8(address, 0xA5);
    }
    let pages = running.grow(0);
    if pages < 7 {
        assert_eq!(running.grow(7 - pages), pages);
    }
    for address in [4 * PAGE, 5 * PAGE + 1, 7 * PAGE - 1] {
        running.store8(address, 0xA5);
    }
}

/// `running` shows exactly `stock` (a fresh stock instance's memory) at its initial size,
/// traps past it, and grows again to zero pages.
fn assert_fresh(running: &mut Running, stock: &[u8], what: &str) {
    let memory = running.memory();
    assert_eq!(memory.len(), 4 * PAGE, "{what}: size is the initial size");
    for address in [
        0,
        11,
        20,
        70000,
        70001,
        70004,
        131072,
        131079,
        3 * PAGE + 9,
        200000,
        262139,
        262143,
    ] {
        assert_eq!(memory[address], stock[address], "{what}: byte {address}");
        assert_eq!(
            running.load8(address),
            i32::from(stock[address]),
            "{what}: load8 {address}"
        );
    }
    assert!(
        memory == stock,
        "{what}: memory differs from a fresh stock instance"
    );
    assert!(
        running.try_load8(4 * PAGE).is_err(),
        "{what}: the grown tail is inaccessible again"
    );
    assert!(
        running.try_load8(5 * PAGE + 1).is_err(),
        "{what}: the grown tail is inaccessible again"
    );
    assert_eq!(running.grow(0), 4, "{what}: memory.size");
    assert_eq!(running.grow(3), 4, "{what}: memory.grow");
    for address in [4 * PAGE, 5 * PAGE + 1, 7 * PAGE - 1] {
        assert_eq!(running.load8(address), 0, "{what}: grown byte {address}");
    }
    running.store8(7 * PAGE - 1, 1);
    assert_eq!(running.load8(7 * PAGE - 1), 1);
    assert_eq!(running.grow(10), -1, "{what}: the declared maximum still holds");
}

#[test]
fn a_slot_reused_for_the_same_image_shows_exactly_the_image() {
    let engine = engine();
    let wasm = module_a();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    let stock = Running::start(&engine, &module, None).memory();

    let mut first = Running::start(&engine, &module, Some(&plan));
    let base = first.base();
    assert_fresh(&mut first, &stock, "first instance");
    drop(first);
    for round in 0..4 {
        let mut running = Running::start(&engine, &module, Some(&plan));
        assert_eq!(running.base(), base, "round {round}: the same slot is reused");
        assert_fresh(&mut running, &stock, &format!("round {round}"));
        // Leave more behind, including a grown memory, for the next round.
        scribble(&mut running);
        if round % 2 == 1 {
            assert_eq!(running.grow(9), 7, "round {round}: grow to the maximum");
            running.store8(16 * PAGE - 1, 0xEE);
        }
    }
    let slots = free_slots_on_this_thread();
    assert!(slots >= 1);
    let mut running = Running::start(&engine, &module, Some(&plan));
    assert_eq!(free_slots_on_this_thread(), slots - 1);
    assert_fresh(&mut running, &stock, "last instance");
}

#[test]
fn each_image_goes_back_to_its_own_slot_and_switching_images_shows_none_of_the_old() {
    let engine = engine();
    let (wasm_a, wasm_b) = (module_a(), module_b());
    let module_a = Module::new(&engine, &wasm_a).unwrap();
    let module_b = Module::new(&engine, &wasm_b).unwrap();
    let (plan_a, plan_b) = (plan(&wasm_a, None), plan(&wasm_b, None));
    let stock_a = Running::start(&engine, &module_a, None).memory();
    let stock_b = Running::start(&engine, &module_b, None).memory();

    // Two slots, one per image; each instance goes back to the slot holding its image.
    let mut a = Running::start(&engine, &module_a, Some(&plan_a));
    let mut b = Running::start(&engine, &module_b, Some(&plan_b));
    let (base_a, base_b) = (a.base(), b.base());
    assert_ne!(base_a, base_b);
    scribble(&mut a);
    scribble(&mut b);

    // A's slot, dirtied and grown, switched to B's shorter image, to no image, and back.
    // B keeps its own slot busy meanwhile, so the slot just released is the only candidate.
    let mut last = a;
    let cases: [(&Module, Option<&MemoryPlan>, &[u8], &str); 4] = [
        (&module_b, Some(&plan_b), &stock_b, "B in A's slot"),
        (&module_a, Some(&plan_a), &stock_a, "A after B"),
        (
            &module_b,
            Some(&MemoryPlan::default()),
            &stock_b,
            "B without an image in A's slot",
        ),
        (&module_a, Some(&plan_a), &stock_a, "A after no image"),
    ];
    for (module, plan, stock, what) in cases {
        let base = last.base();
        drop(last);
        let mut running = Running::start(&engine, module, plan);
        assert_eq!(running.base(), base, "{what}: the slot is reused");
        assert_fresh(&mut running, stock, what);
        scribble(&mut running);
        last = running;
    }
    assert_eq!(b.base(), base_b);
}

#[test]
fn the_free_list_is_capped() {
    let engine = engine();
    let wasm = module_b();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    let running: Vec<Running> = (0..cow_memory::MAX_FREE_SLOTS_PER_THREAD + 4)
        .map(|_| Running::start(&engine, &module, Some(&plan)))
        .collect();
    drop(running);
    assert_eq!(free_slots_on_this_thread(), cow_memory::MAX_FREE_SLOTS_PER_THREAD);
}

#[test]
fn grow_returns_the_old_size_and_stops_at_the_limit() {
    let engine = engine();
    let wasm = module_a();
    let module = Module::new(&engine, &wasm).unwrap();
    let mut running = Running::start(&engine, &module, Some(&plan(&wasm, Some(6 * PAGE as u64))));
    assert_eq!(running.grow(0), 4);
    assert_eq!(running.grow(1), 4);
    assert_eq!(running.load8(4 * PAGE + 5), 0);
    running.store8(4 * PAGE + 5, 9);
    assert_eq!(running.load8(4 * PAGE + 5), 9);
    assert_eq!(running.grow(2), -1, "beyond max_bytes");
    assert_eq!(running.grow(1), 5);
    assert_eq!(running.grow(1), -1);
    assert_eq!(running.memory().len(), 6 * PAGE);

    // Without a plan limit the declared maximum (16 pages) still holds.
    let mut running = Running::start(&engine, &module, Some(&plan(&wasm, None)));
    assert_eq!(running.grow(12), 4);
    assert_eq!(running.grow(1), -1);
    assert_eq!(running.load8(16 * PAGE - 1), 0);

    // A memory with no declared maximum stops at 4 GiB.
    let wasm = wasmer::wat2wasm(
        br#"(module (memory (export "memory") 1)
              (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))"#,
    )
    .unwrap();
    let module = Module::new(&engine, &wasm).unwrap();
    let mut running = Running::start(&engine, &module, Some(&plan(&wasm, None)));
    assert_eq!(running.grow(65536), -1);
    assert_eq!(running.grow(65535), 1);
    assert_eq!(running.grow(1), -1);
}

#[test]
fn a_module_larger_than_the_limit_does_not_instantiate() {
    let engine = engine();
    let wasm = module_a();
    assert_eq!(declared_minimum_bytes(&wasm), Some(4 * PAGE as u64));
    let module = Module::new(&engine, &wasm).unwrap();
    let mut store = Store::new(engine.clone());
    let plan = plan(&wasm, Some(2 * PAGE as u64));
    let result = instantiate_with(&plan, || {
        Instance::new(&mut store, &module, &imports! {}).map_err(|error| error.to_string())
    });
    assert!(result.is_err());
}

#[test]
fn an_image_armed_for_another_module_fails_instantiation() {
    let engine = engine();
    let same_offsets = wasmer::wat2wasm(
        br#"(module (memory (export "memory") 4 16)
              (data (i32.const 0) "HELLO, IMAGE") (data (i32.const 70000) "WORLD")
              (data (i32.const 70002) "rl") (data (i32.const 131072) "\08\07\06\05\04\03\02\01")
              (data (i32.const 262139) "LAST?") (data "passive segment"))"#,
    )
    .unwrap();
    let module = Module::new(&engine, &same_offsets).unwrap();
    let mut store = Store::new(engine.clone());
    let plan = plan(&module_a(), None);
    let result = instantiate_with(&plan, || {
        Instance::new(&mut store, &module, &imports! {}).map_err(|error| error.to_string())
    });
    assert!(result.is_err(), "foreign image accepted");
}

#[test]
fn arming_ends_with_the_closure_even_on_panic() {
    let engine = engine();
    let wasm = module_a();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, Some(4 * PAGE as u64));
    let outcome = std::panic::catch_unwind(|| instantiate_with(&plan, || panic!("boom")));
    assert!(outcome.is_err());
    // Unarmed again: stock memory, which may grow to the declared maximum.
    let mut running = Running::start(&engine, &module, None);
    assert_eq!(running.grow(1), 4);
}

#[test]
fn images_are_refused_when_they_cannot_express_the_module() {
    let global_offset = wasmer::wat2wasm(
        br#"(module (global $g i32 (i32.const 16)) (memory 1)
              (data (global.get $g) "x"))"#,
    )
    .unwrap();
    assert!(MemoryImage::from_wasm(&global_offset).unwrap().is_none());
    let imported =
        wasmer::wat2wasm(br#"(module (import "env" "memory" (memory 1)) (data (i32.const 0) "x"))"#).unwrap();
    assert!(MemoryImage::from_wasm(&imported).unwrap().is_none());
    assert_eq!(declared_minimum_bytes(&imported), Some(PAGE as u64));
    let no_memory = wasmer::wat2wasm(br#"(module (func (export "f")))"#).unwrap();
    assert!(MemoryImage::from_wasm(&no_memory).unwrap().is_none());
    assert_eq!(declared_minimum_bytes(&no_memory), None);
    let out_of_bounds = wasmer::wat2wasm(br#"(module (memory 1) (data (i32.const 65535) "xy"))"#).unwrap();
    assert!(MemoryImage::from_wasm(&out_of_bounds).unwrap().is_none());
    let memory64 = wasmer::wat2wasm(br#"(module (memory i64 1) (data (i64.const 0) "x"))"#).unwrap();
    assert!(MemoryImage::from_wasm(&memory64).unwrap().is_none());
    let no_data = wasmer::wat2wasm(br#"(module (memory 2))"#).unwrap();
    let image = MemoryImage::from_wasm(&no_data).unwrap().unwrap();
    assert!(image.is_empty());
    assert!(MemoryImage::from_wasm(b"\0asm\x01\0\0\0\x05").is_err());
}

fn leb128(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, content: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb128(content.len() as u64, out);
    out.extend_from_slice(content);
}

/// `(module (memory (export "memory") pages) (data (i32.const 0) <bytes>))`, hand-encoded
/// (a 16 MiB string is too much for the text format).
fn module_with_image(pages: u64, bytes: &[u8]) -> Vec<u8> {
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    let mut memory = vec![1, 0];
    leb128(pages, &mut memory);
    section(5, &memory, &mut wasm);
    let mut export = vec![1, 6];
    export.extend_from_slice(b"memory");
    export.extend_from_slice(&[2, 0]);
    section(7, &export, &mut wasm);
    let mut data = vec![1, 0, 0x41, 0, 0x0b];
    leb128(bytes.len() as u64, &mut data);
    data.extend_from_slice(bytes);
    section(11, &data, &mut wasm);
    wasm
}

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[test]
fn start_up_is_flat_in_the_image_size() {
    let engine = engine();
    for size in [80 << 10, 1 << 20, 16 << 20] {
        let bytes: Vec<u8> = (0..size).map(|i: usize| (i % 251) as u8 | 1).collect();
        let wasm = module_with_image(size.div_ceil(PAGE) as u64 + 1, &bytes);
        let module = Module::new(&engine, &wasm).unwrap();
        let plan = plan(&wasm, None);
        let image: &Arc<MemoryImage> = plan.image.as_ref().unwrap();
        assert_eq!(image.len(), size.next_multiple_of(4096));

        // Separate loops: a stock instance dropping 16 MiB of dirty pages just before
        // slows the next start-up (page freeing, LRU batches) whatever its kind.
        let time = |plan: Option<&MemoryPlan>| {
            (0..200)
                .map(|_| {
                    let started = Instant::now();
                    let running = Running::start(&engine, &module, plan);
                    let elapsed = started.elapsed();
                    drop(running);
                    elapsed
                })
                .collect::<Vec<_>>()
        };
        let armed = time(Some(&plan));
        let stock = time(None);
        let check = Running::start(&engine, &module, Some(&plan));
        let memory = check.memory();
        assert!(memory[..size] == bytes[..]);
        assert!(memory[size..].iter().all(|byte| *byte == 0));
        eprintln!(
            "{} KiB image, Store + Instance::new, p50 of 200: copy-on-write {:?}, stock {:?}",
            size >> 10,
            p50(armed),
            p50(stock)
        );
    }
}

/// 40 initial pages (640 OS pages), an image up to page 21, zeros after it (304 OS pages,
/// more than `MAX_RESTORED_PAGES`), and a `fill` to dirty many pages at once.
fn module_large() -> Vec<u8> {
    wasmer::wat2wasm(
        br#"(module
          (memory (export "memory") 40 48)
          (data (i32.const 0) "start of the image")
          (data (i32.const 65000) "across a page boundary")
          (data (i32.const 700000) "\ff\fe\fd\fc")
          (data (i32.const 1376250) "end of image")
          (func (export "load8") (param i32) (result i32) (i32.load8_u (local.get 0)))
          (func (export "store8") (param i32 i32) (i32.store8 (local.get 0) (local.get 1)))
          (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
          (func (export "fill") (param i32 i32 i32)
            (memory.fill (local.get 0) (local.get 1) (local.get 2))))"#,
    )
    .expect("large module")
    .into_owned()
}

impl Running {
    fn fill(&mut self, start: usize, value: u8, len: usize) {
        let fill = self
            .instance
            .exports
            .get_typed_function::<(i32, i32, i32), ()>(&self.store, "fill")
            .unwrap();
        fill.call(&mut self.store, start as i32, i32::from(value), len as i32)
            .unwrap();
    }
}

/// Whether the OS page at `address` is resident in this process (`/proc/self/pagemap`).
fn resident(address: usize) -> bool {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, (address / 4096 * 8) as u64)
        .unwrap();
    u64::from_ne_bytes(entry) & (1 << 63) != 0
}

const IMAGE_END: usize = 1376250 + 12;

#[test]
fn a_few_written_pages_are_restored_in_place() {
    let engine = engine();
    let wasm = module_large();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    let stock = Running::start(&engine, &module, None).memory();
    assert_eq!(
        plan.image.as_ref().unwrap().len(),
        IMAGE_END.next_multiple_of(4096)
    );

    let mut base = None;
    // Image pages (one with a segment, one all zero inside the image), pages after the
    // image, and a page only read.
    let written = [0, 65010, 300000, 700001, 1376255, 1500000, 32 * PAGE - 1];
    for round in 0..5u8 {
        let mut running = Running::start(&engine, &module, Some(&plan));
        let slot = *base.get_or_insert(running.base());
        assert_eq!(running.base(), slot, "round {round}: the same slot is reused");
        // Before anything reads the memory (a read maps pages too).
        if round > 0 {
            for address in written {
                assert!(
                    resident(slot + address),
                    "round {round}: written page {address} stayed resident"
                );
            }
        }
        let memory = running.memory();
        assert_eq!(memory.len(), 40 * PAGE, "round {round}");
        assert!(memory == stock, "round {round}: memory differs from stock");
        for (n, address) in written.into_iter().enumerate() {
            running.store8(address, 0x80 | round | n as u8);
        }
        running.fill(1600000, 0x11 + round, 5000); // two pages after the image
        running.fill(10000, 0x22 + round, 9000); // three image pages
        assert_eq!(running.load8(1800000), 0); // read only: the zero page
        assert_eq!(running.load8(200000), 0); // read only: an image page
    }
}

#[test]
fn many_written_pages_and_grown_tails_are_discarded() {
    let engine = engine();
    let wasm = module_large();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    let stock = Running::start(&engine, &module, None).memory();
    const { assert!(cow_memory::MAX_RESTORED_PAGES * 4096 < 40 * PAGE - IMAGE_END) };

    let mut base = None;
    for round in 0..5u8 {
        let mut running = Running::start(&engine, &module, Some(&plan));
        let slot = *base.get_or_insert(running.base());
        assert_eq!(running.base(), slot, "round {round}: the same slot is reused");
        // Before anything reads the memory (a read maps pages too).
        if round % 3 == 0 && round > 0 {
            // After a grown memory with a few written pages: those are restored in place,
            // only the grown tail is discarded.
            assert!(
                resident(slot + 5 * PAGE),
                "round {round}: a few written pages stayed resident"
            );
            assert!(
                !resident(slot + 41 * PAGE),
                "round {round}: the grown tail was discarded"
            );
        } else if round > 0 {
            assert!(
                !resident(slot + 5 * PAGE),
                "round {round}: written pages were discarded"
            );
            assert!(
                !resident(slot + 25 * PAGE),
                "round {round}: written pages were discarded"
            );
        }
        let memory = running.memory();
        assert!(memory == stock, "round {round}: memory differs from stock");
        match round % 3 {
            // Image and zero region, every page.
            0 => running.fill(7, 0xC0 | round, 30 * PAGE),
            // Only after the image: more zero-region pages than the threshold.
            1 => running.fill(IMAGE_END, 0xD0 | round, 40 * PAGE - IMAGE_END),
            // A few pages, then grown: only the grown tail is discarded.
            _ => {
                running.store8(5 * PAGE, 0xE0);
                assert_eq!(running.grow(2), 40);
                running.fill(38 * PAGE, 0xE1, 4 * PAGE);
                running.fill(5 * PAGE + 1, 0xE2, 2 * PAGE);
            }
        }
    }
    let mut running = Running::start(&engine, &module, Some(&plan));
    assert!(running.memory() == stock, "last instance");
    assert!(
        running.try_load8(40 * PAGE).is_err(),
        "the grown tail is inaccessible again"
    );
}

/// Kernel release `(major, minor)` from `/proc/sys/kernel/osrelease`.
fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Writes image and zero-region pages, reads others, and checks the next tenant of the
/// slot sees exactly a fresh stock instance, with `PAGEMAP_SCAN` on or off.
fn written_pages_round_trip(scan: bool) -> usize {
    let engine = engine();
    let wasm = module_large();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    let stock = Running::start(&engine, &module, None).memory();
    cow_memory::use_pagemap_scan_on_this_thread(scan);
    let resets_before = cow_memory::pagemap_scan_resets_on_this_thread();
    let mut base = None;
    for round in 0..6u8 {
        let mut running = Running::start(&engine, &module, Some(&plan));
        let slot = *base.get_or_insert(running.base());
        assert_eq!(running.base(), slot, "round {round}: the same slot is reused");
        if round > 0 {
            assert!(resident(slot + 700001), "round {round}: restored in place");
        }
        assert!(
            running.memory() == stock,
            "scan {scan} round {round}: differs from stock"
        );
        // Scattered single pages (more runs than one scan vector holds), runs, both regions.
        for n in 0..(100 + usize::from(round)) {
            let address = (n * 3 * 4096 + usize::from(round) * 17) % (40 * PAGE);
            running.store8(address, 0x80 | round);
        }
        running.fill(700001, 0x33 + round, 3 * 4096);
        running.fill(1600000, 0x44 + round, 5000);
        assert_eq!(running.load8(1800001), 0); // read only: the zero page
        assert_eq!(running.load8(200001), 0); // read only: an image page
    }
    let running = Running::start(&engine, &module, Some(&plan));
    assert!(running.memory() == stock, "scan {scan}: last instance");
    drop(running);
    let resets = cow_memory::pagemap_scan_resets_on_this_thread() - resets_before;
    cow_memory::use_pagemap_scan_on_this_thread(true);
    resets
}

#[test]
fn pagemap_scan_restores_exactly_the_written_pages() {
    let resets = written_pages_round_trip(true);
    if kernel_version().is_some_and(|version| version >= (6, 7)) {
        assert!(
            cow_memory::pagemap_scan_supported(),
            "PAGEMAP_SCAN exists since 6.7"
        );
        assert_eq!(resets, 7, "every release took the PAGEMAP_SCAN path");
    }
}

#[test]
fn the_pagemap_read_fallback_restores_exactly_the_written_pages() {
    assert_eq!(written_pages_round_trip(false), 0, "PAGEMAP_SCAN was not used");
}

/// How many of this process's file descriptors are open on its page map.
fn open_pagemap_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.file_name().is_some_and(|name| name == "pagemap"))
        .count()
}

#[test]
fn resets_on_many_threads_share_one_pagemap_fd() {
    const THREADS: usize = 4;
    let engine = engine();
    let wasm = module_a();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    // Every thread resets a slot (which reads the page map), then stays alive until the
    // fds are counted: an fd held per thread would be open once per thread here.
    let reset_done = std::sync::Barrier::new(THREADS + 1);
    let counted = std::sync::Barrier::new(THREADS + 1);
    let open_while_threads_live = std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                let mut running = Running::start(&engine, &module, Some(&plan));
                running.store8(70000, 0x5A);
                drop(running);
                reset_done.wait();
                counted.wait();
            });
        }
        reset_done.wait();
        let open = open_pagemap_fds();
        counted.wait();
        open
    });
    assert_eq!(
        open_while_threads_live, 1,
        "resets on {THREADS} threads should share one pagemap fd"
    );
}

/// Open file descriptors of this process that are memory images (memfds).
fn open_images() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("atoll-memory-image"))
        .count()
}

#[test]
fn a_pooled_slot_does_not_keep_a_gone_modules_image_open() {
    let engine = engine();
    let before = open_images();
    for wasm in [module_a(), module_b()] {
        let module = Module::new(&engine, &wasm).unwrap();
        let plan = plan(&wasm, None);
        let running: Vec<Running> = (0..3)
            .map(|_| Running::start(&engine, &module, Some(&plan)))
            .collect();
        assert_eq!(open_images(), before + 1, "the live module's image is open");
        drop(running);
        // Its slots go back to this thread's list, still showing the image.
        assert!(free_slots_on_this_thread() >= 3);
    }
    // Both modules are gone: their memfds are closed although pooled slots showed them.
    assert_eq!(open_images(), before);
    // And a slot that showed a gone image is reused cleanly.
    let wasm = module_a();
    let module = Module::new(&engine, &wasm).unwrap();
    let plan = plan(&wasm, None);
    let stock = Running::start(&engine, &module, None).memory();
    let mut running = Running::start(&engine, &module, Some(&plan));
    assert_fresh(&mut running, &stock, "a slot that showed a gone image");
}
