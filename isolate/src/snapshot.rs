//! Wizer-style pre-initialisation: run a module's init function once, at deploy time, and
//! bake the state it leaves behind into a rewritten module.
//!
//! ```text
//! wasm ──instrument──▶ + exports for every global and memory ──instantiate, call init──▶ state
//! wasm + state ──rewrite──▶ memories' initial sizes and data = captured memory,
//!                           mutable globals' initialisers = captured values,
//!                           no init export, no start section
//! ```
//!
//! A module opts in by exporting `wizer.initialize` or `atoll_init` (no parameters, no
//! results). Wasmer cannot set a global the module does not export, so the state is captured
//! as a new module rather than as an image plus register values, as Wizer does: every request
//! then starts from the initialised state at no cost beyond what any instantiation pays.
//!
//! What the rewrite preserves:
//!
//! - Data indices. With a `DataCount` section code may name segments (`memory.init`,
//!   `data.drop`), so every original segment stays at its index: passive ones untouched,
//!   active ones emptied (zero bytes at offset 0) because the captured memory already holds
//!   what they wrote. The captured memory follows as new active segments.
//! - Everything else — types, imports, functions, tables, elements, code, exports (but the
//!   init export), custom sections — is copied byte for byte.
//!
//! What it cannot capture, and therefore refuses: an init function (or start function) that
//! may change a table or drop a segment (`table.set`/`grow`/`fill`/`copy`/`init`,
//! `elem.drop`, `data.drop` reachable from it). Reference-typed globals keep their original
//! initialisers. Whatever the init function reads from the clock or `random_get` is frozen
//! into the snapshot, as with Wizer.

use std::collections::HashSet;
use std::ops::Range;

use bytes::Bytes;
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasmer::{FunctionEnv, Instance, Module, Store, Value};
use wasmparser::{DataKind, ElementItems, ExternalKind, Operator, Parser, Payload, TypeRef};

use crate::cow_memory::{self, MemoryPlan};
use crate::engine::Engine;
use crate::error::IsolateError;
use crate::layout::MemoryLayout;
use crate::wasi::{self, ProcExit, WasiContext};

/// The exports that mark an init function, in order of preference.
pub const INIT_EXPORTS: [&str; 2] = ["wizer.initialize", "atoll_init"];

/// `argv[0]` of the init run when the caller does not name the function.
const DEFAULT_ARGV0: &str = "atoll-init";

/// Most data segments a module may have (wasmparser's and so wasmer's limit).
const MAX_DATA_SEGMENTS: usize = 100_000;

/// Zero runs shorter than this are folded into the surrounding segment: a segment costs a
/// few bytes of header, and fewer segments instantiate faster.
const MIN_ZERO_GAP: usize = 64;

/// How much of the init run's stdout and stderr is kept (stderr ends up in error messages).
const INIT_OUTPUT_LIMIT: usize = 64 * 1024;

/// Exports the instrumented module adds so that the host can read all state.
const GLOBAL_EXPORT_PREFIX: &str = "__atoll_snapshot_global_";
const MEMORY_EXPORT_PREFIX: &str = "__atoll_snapshot_memory_";

/// What pre-initialisation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preinit {
    /// The module exports no init function: use it as it is.
    Unchanged,
    /// The pre-initialised module, and the name of the init export it ran (and removed).
    Rewritten { wasm: Vec<u8>, init_export: String },
}

/// Runs `wasm`'s init export (if any) once with the manifest's `env` and returns the module
/// rewritten to start from the state it left. `argv[0]` is `atoll-init` and memory is
/// limited to [`DEFAULT_INIT_MEMORY_BYTES`]; see [`preinitialize_named`] to pass the
/// function's name and its `[limits] memory`.
pub fn preinitialize(
    engine: &Engine,
    wasm: &[u8],
    env: &[(String, String)],
) -> Result<Preinit, IsolateError> {
    preinitialize_named(engine, wasm, DEFAULT_ARGV0, env, DEFAULT_INIT_MEMORY_BYTES)
}

/// The memory limit of [`preinitialize`] (the manifest's default `[limits] memory`).
pub const DEFAULT_INIT_MEMORY_BYTES: u64 = 128 << 20;

/// Longest an init function (and the `(start)` function run before it) may run: a deploy
/// must not hang on a looping init.
pub const INIT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// [`preinitialize`] with `name` as `argv[0]`, as requests will see it, and the function's
/// memory limit: init runs under it exactly as requests do (memory cannot grow past it),
/// and a result whose memory starts larger is refused, so no node is handed a snapshot it
/// could not serve.
pub fn preinitialize_named(
    engine: &Engine,
    wasm: &[u8],
    name: &str,
    env: &[(String, String)],
    max_memory_bytes: u64,
) -> Result<Preinit, IsolateError> {
    // Validates the module and its WCGI interface; everything below may assume a valid module.
    let module = engine.compile(wasm)?;
    let layout = Layout::parse(wasm)?;
    let init = match layout.init_exports.as_slice() {
        [] => return Ok(Preinit::Unchanged),
        [(name, _)] => name.clone(),
        [(first, a), (second, b), ..] if a != b => {
            return Err(IsolateError::Invalid(format!(
                "exports both `{first}` and `{second}` as different init functions; export one"
            )));
        }
        [(first, _), ..] => first.clone(),
    };
    match module
        .exports()
        .find(|export| export.name() == init)
        .map(|export| export.ty().clone())
    {
        Some(wasmer::ExternType::Function(signature))
            if signature.params().is_empty() && signature.results().is_empty() => {}
        _ => {
            return Err(IsolateError::Invalid(format!(
                "init export `{init}` must be a function taking and returning nothing"
            )));
        }
    }
    layout.check_capturable(wasm)?;

    let instrumented = instrument(wasm, &layout)?;
    let state = run_init(engine, &instrumented, &layout, &init, name, env, max_memory_bytes)?;
    let rewritten = rewrite(wasm, &layout, &state)?;
    engine
        .validate_with_memory_limit(&rewritten, max_memory_bytes)
        .map_err(|error| match error {
            IsolateError::Invalid(reason) if reason.contains("memory limit") => {
                IsolateError::Invalid(format!("after the init function, {reason}"))
            }
            IsolateError::Invalid(reason) => IsolateError::Invalid(format!(
                "the pre-initialised module is not valid ({reason}); this is a bug"
            )),
            other => other,
        })?;
    Ok(Preinit::Rewritten {
        wasm: rewritten,
        init_export: init,
    })
}

fn parse_error(error: wasmparser::BinaryReaderError) -> IsolateError {
    IsolateError::Invalid(format!("cannot parse module: {error}"))
}

fn encode_error<E: std::fmt::Display>(error: wasm_encoder::reencode::Error<E>) -> IsolateError {
    IsolateError::Invalid(format!("cannot re-encode module: {error}"))
}

fn to_usize(range: Range<u64>) -> Range<usize> {
    range.start as usize..range.end as usize
}

/// What the rewrite needs to know about the original module.
struct Layout {
    imported_functions: u32,
    imported_globals: u32,
    imported_memories: u32,
    /// Defined globals, in index order (after the imported ones).
    globals: Vec<wasmparser::GlobalType>,
    /// Defined memories, in index order (after the imported ones).
    memories: Vec<wasmparser::MemoryType>,
    /// Which init exports the module has, and the function each names.
    init_exports: Vec<(String, u32)>,
    export_names: Vec<String>,
    start: Option<u32>,
    has_data_count: bool,
    data_segments: usize,
    /// Passive data segments (they stay as they are).
    passive_segments: usize,
}

impl Layout {
    fn parse(wasm: &[u8]) -> Result<Layout, IsolateError> {
        let mut layout = Layout {
            imported_functions: 0,
            imported_globals: 0,
            imported_memories: 0,
            globals: Vec::new(),
            memories: Vec::new(),
            init_exports: Vec::new(),
            export_names: Vec::new(),
            start: None,
            has_data_count: false,
            data_segments: 0,
            passive_segments: 0,
        };
        // Memories and data segments come from the layout they share with the memory image.
        let mut memory = MemoryLayout::default();
        for payload in Parser::new(0).parse_all(wasm) {
            let payload = payload.map_err(parse_error)?;
            memory.visit(&payload).map_err(parse_error)?;
            match payload {
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        match import.map_err(parse_error)?.ty {
                            TypeRef::Func(_) | TypeRef::FuncExact(_) => layout.imported_functions += 1,
                            TypeRef::Global(_) => layout.imported_globals += 1,
                            _ => {}
                        }
                    }
                }
                Payload::GlobalSection(reader) => {
                    for global in reader {
                        layout.globals.push(global.map_err(parse_error)?.ty);
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export.map_err(parse_error)?;
                        if export.kind == ExternalKind::Func && INIT_EXPORTS.contains(&export.name) {
                            layout.init_exports.push((export.name.to_string(), export.index));
                        }
                        layout.export_names.push(export.name.to_string());
                    }
                }
                Payload::StartSection { func, .. } => layout.start = Some(func),
                Payload::DataCountSection { .. } => layout.has_data_count = true,
                _ => {}
            }
        }
        layout.imported_memories = memory.imported.len() as u32;
        layout.data_segments = memory.segments.len();
        layout.passive_segments = memory.passive_segments();
        layout.memories = memory.defined;
        // Keep the preference order of INIT_EXPORTS.
        layout
            .init_exports
            .sort_by_key(|(name, _)| INIT_EXPORTS.iter().position(|candidate| candidate == name));
        if layout
            .export_names
            .iter()
            .any(|name| name.starts_with(GLOBAL_EXPORT_PREFIX) || name.starts_with(MEMORY_EXPORT_PREFIX))
        {
            return Err(IsolateError::Invalid(
                "export names starting with `__atoll_snapshot_` are reserved".into(),
            ));
        }
        Ok(layout)
    }

    /// Whether a defined global's value is captured (mutable numeric globals; immutable ones
    /// cannot have changed, reference-typed ones cannot be written as constants).
    fn captures_global(ty: &wasmparser::GlobalType) -> bool {
        use wasmparser::ValType;
        ty.mutable
            && matches!(
                ty.content_type,
                ValType::I32 | ValType::I64 | ValType::F32 | ValType::F64 | ValType::V128
            )
    }

    /// Refuses modules whose init (or start) function may reach an instruction whose effect
    /// the snapshot cannot represent: table changes and dropped segments.
    fn check_capturable(&self, wasm: &[u8]) -> Result<(), IsolateError> {
        let mut bodies: Vec<FunctionFacts> = Vec::new();
        // Functions that may be called indirectly: in an element segment or `ref.func`'d.
        let mut escaping: HashSet<u32> = HashSet::new();
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(parse_error)? {
                Payload::ElementSection(reader) => {
                    for element in reader {
                        match element.map_err(parse_error)?.items {
                            ElementItems::Functions(functions) => {
                                for function in functions {
                                    escaping.insert(function.map_err(parse_error)?);
                                }
                            }
                            ElementItems::Expressions(_, expressions) => {
                                for expression in expressions {
                                    let mut operators =
                                        expression.map_err(parse_error)?.get_operators_reader();
                                    while !operators.eof() {
                                        if let Operator::RefFunc { function_index } =
                                            operators.read().map_err(parse_error)?
                                        {
                                            escaping.insert(function_index);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                Payload::GlobalSection(reader) => {
                    for global in reader {
                        let mut operators = global.map_err(parse_error)?.init_expr.get_operators_reader();
                        while !operators.eof() {
                            if let Operator::RefFunc { function_index } =
                                operators.read().map_err(parse_error)?
                            {
                                escaping.insert(function_index);
                            }
                        }
                    }
                }
                Payload::CodeSectionEntry(body) => {
                    let mut facts = FunctionFacts::default();
                    let mut operators = body.get_operators_reader().map_err(parse_error)?;
                    while !operators.eof() {
                        let instruction = match operators.read().map_err(parse_error)? {
                            Operator::Call { function_index } | Operator::ReturnCall { function_index } => {
                                facts.calls.push(function_index);
                                continue;
                            }
                            Operator::RefFunc { function_index } => {
                                escaping.insert(function_index);
                                continue;
                            }
                            Operator::CallIndirect { .. }
                            | Operator::ReturnCallIndirect { .. }
                            | Operator::CallRef { .. }
                            | Operator::ReturnCallRef { .. } => {
                                facts.calls_indirectly = true;
                                continue;
                            }
                            Operator::TableSet { .. } => "table.set",
                            Operator::TableGrow { .. } => "table.grow",
                            Operator::TableFill { .. } => "table.fill",
                            Operator::TableCopy { .. } => "table.copy",
                            Operator::TableInit { .. } => "table.init",
                            Operator::ElemDrop { .. } => "elem.drop",
                            Operator::DataDrop { .. } => "data.drop",
                            _ => continue,
                        };
                        facts.uncapturable.get_or_insert(instruction);
                    }
                    bodies.push(facts);
                }
                _ => {}
            }
        }

        let roots = self
            .init_exports
            .iter()
            .map(|(_, function)| *function)
            .chain(self.start);
        let mut seen: HashSet<u32> = HashSet::new();
        let mut pending: Vec<u32> = roots.collect();
        let mut indirect_added = false;
        while let Some(function) = pending.pop() {
            if !seen.insert(function) {
                continue;
            }
            let Some(defined) = function.checked_sub(self.imported_functions) else {
                continue; // a host function: it touches no table
            };
            let Some(facts) = bodies.get(defined as usize) else {
                continue;
            };
            if let Some(instruction) = facts.uncapturable {
                return Err(IsolateError::Invalid(format!(
                    "the init function may run `{instruction}`, whose effect a snapshot cannot keep"
                )));
            }
            pending.extend(&facts.calls);
            if facts.calls_indirectly && !indirect_added {
                indirect_added = true;
                pending.extend(&escaping);
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct FunctionFacts {
    calls: Vec<u32>,
    calls_indirectly: bool,
    uncapturable: Option<&'static str>,
}

/// The original module plus an export for every captured global and every defined memory.
fn instrument(wasm: &[u8], layout: &Layout) -> Result<Vec<u8>, IsolateError> {
    let mut module = wasm_encoder::Module::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(parse_error)?;
        if let Payload::ExportSection(reader) = &payload {
            let mut exports = wasm_encoder::ExportSection::new();
            RoundtripReencoder
                .parse_export_section(&mut exports, reader.clone())
                .map_err(encode_error)?;
            for (index, ty) in layout.globals.iter().enumerate() {
                if Layout::captures_global(ty) {
                    exports.export(
                        &format!("{GLOBAL_EXPORT_PREFIX}{index}"),
                        wasm_encoder::ExportKind::Global,
                        layout.imported_globals + index as u32,
                    );
                }
            }
            for index in 0..layout.memories.len() {
                exports.export(
                    &format!("{MEMORY_EXPORT_PREFIX}{index}"),
                    wasm_encoder::ExportKind::Memory,
                    layout.imported_memories + index as u32,
                );
            }
            module.section(&exports);
        } else if let Some((id, range)) = payload.as_section() {
            module.section(&wasm_encoder::RawSection {
                id,
                data: &wasm[to_usize(range)],
            });
        }
    }
    Ok(module.finish())
}

/// The state an init run left: captured global values by defined index, memory contents by
/// defined index.
struct State {
    globals: Vec<Option<wasm_encoder::ConstExpr>>,
    memories: Vec<Vec<u8>>,
}

fn run_init(
    engine: &Engine,
    instrumented: &[u8],
    layout: &Layout,
    init: &str,
    argv0: &str,
    env: &[(String, String)],
    max_memory_bytes: u64,
) -> Result<State, IsolateError> {
    let module = Module::from_binary(engine.wasmer(), instrumented).map_err(|error| {
        IsolateError::Invalid(format!("the instrumented module does not compile: {error}"))
    })?;
    let mut store = Store::new(engine.wasmer().clone());
    // One deadline covers the `(start)` function (run by `Instance::new`) and init, and the
    // host calls stop on it too.
    let signals = std::sync::Arc::new(wasi::RunSignals::default());
    let deadline = crate::deadline::arm(
        store.interrupter(),
        INIT_TIME_LIMIT,
        std::sync::Arc::clone(&signals),
    );
    let timed_out =
        || IsolateError::Invalid(format!("init function did not finish within {INIT_TIME_LIMIT:?}"));
    let context = WasiContext::new(&[argv0], env, Bytes::new(), INIT_OUTPUT_LIMIT, INIT_OUTPUT_LIMIT)
        .with_signals(std::sync::Arc::clone(&signals));
    let function_env = FunctionEnv::new(&mut store, context);
    let imports = wasi::imports(&mut store, &function_env, &module);
    // Init's memory obeys the function's limit, as every request's does.
    let plan = MemoryPlan {
        image: None,
        max_bytes: Some(max_memory_bytes),
    };
    let instance = cow_memory::instantiate_with(&plan, || {
        Instance::new(&mut store, &module, &imports).map_err(Box::new)
    })
    .map_err(|error| {
        if deadline.fired() {
            timed_out()
        } else {
            IsolateError::Invalid(format!("instantiation before the init function failed: {error}"))
        }
    })?;
    let memory = |index: usize| format!("{MEMORY_EXPORT_PREFIX}{index}");
    let wasi_memory = instance
        .exports
        .get_memory("memory")
        .map_err(|error| IsolateError::Invalid(error.to_string()))?
        .clone();
    function_env.as_mut(&mut store).set_memory(wasi_memory);
    let function = instance
        .exports
        .get_function(init)
        .map_err(|error| IsolateError::Invalid(error.to_string()))?
        .clone();

    let outcome = function.call(&mut store, &[]);
    let timed_out_now = deadline.fired();
    drop(deadline);
    let output = function_env.as_mut(&mut store).take_output();
    if timed_out_now {
        return Err(timed_out());
    }
    if let Err(error) = outcome {
        let log = crate::function::printable_log(&output.stderr);
        let log = log.trim();
        let log = if log.is_empty() {
            String::new()
        } else {
            format!(" (stderr: {log})")
        };
        return Err(IsolateError::Invalid(match error.downcast::<ProcExit>() {
            Ok(ProcExit(code)) => format!("init function `{init}` exited with status {code}{log}"),
            Err(error) => format!("init function `{init}` trapped: {}{log}", error.message()),
        }));
    }
    if !output.stderr.is_empty() {
        tracing::debug!(init, log = %crate::function::printable_log(&output.stderr), "init function log");
    }

    let mut globals = Vec::with_capacity(layout.globals.len());
    for (index, ty) in layout.globals.iter().enumerate() {
        if !Layout::captures_global(ty) {
            globals.push(None);
            continue;
        }
        let global = instance
            .exports
            .get_global(&format!("{GLOBAL_EXPORT_PREFIX}{index}"))
            .map_err(|error| IsolateError::Invalid(error.to_string()))?;
        globals.push(match global.get(&mut store) {
            Value::I32(value) => Some(wasm_encoder::ConstExpr::i32_const(value)),
            Value::I64(value) => Some(wasm_encoder::ConstExpr::i64_const(value)),
            Value::F32(value) => Some(wasm_encoder::ConstExpr::f32_const(wasm_encoder::Ieee32::new(
                value.to_bits(),
            ))),
            Value::F64(value) => Some(wasm_encoder::ConstExpr::f64_const(wasm_encoder::Ieee64::new(
                value.to_bits(),
            ))),
            Value::V128(value) => Some(wasm_encoder::ConstExpr::v128_const(value as i128)),
            _ => None,
        });
    }
    let mut memories = Vec::with_capacity(layout.memories.len());
    for index in 0..layout.memories.len() {
        let contents = instance
            .exports
            .get_memory(&memory(index))
            .map_err(|error| IsolateError::Invalid(error.to_string()))?
            .view(&store)
            .copy_to_vec()
            .map_err(|error| IsolateError::Invalid(format!("cannot read memory {index}: {error}")))?;
        memories.push(contents);
    }
    Ok(State { globals, memories })
}

/// The original module with `state` as its initial state.
fn rewrite(wasm: &[u8], layout: &Layout, state: &State) -> Result<Vec<u8>, IsolateError> {
    // With a DataCount section, code may name segments by index: keep them all in place.
    let keep_segments = layout.has_data_count;
    let kept = if keep_segments {
        layout.data_segments
    } else {
        layout.passive_segments
    };
    let mut budget = MAX_DATA_SEGMENTS.saturating_sub(kept);
    let mut snapshot_segments: Vec<(u32, Vec<Range<usize>>)> = Vec::new();
    for (index, contents) in state.memories.iter().enumerate() {
        let share = budget / (state.memories.len() - index);
        let segments = nonzero_segments(contents, share).ok_or_else(|| {
            IsolateError::Invalid(
                "the initialised memory needs more data segments than a module may have".into(),
            )
        })?;
        budget -= segments.len();
        snapshot_segments.push((layout.imported_memories + index as u32, segments));
    }
    let total_segments = kept + snapshot_segments.iter().map(|(_, s)| s.len()).sum::<usize>();

    let mut module = wasm_encoder::Module::new();
    let mut data_written = false;
    let mut reencoder = RoundtripReencoder;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(parse_error)?;
        match &payload {
            Payload::MemorySection(reader) => {
                let mut memories = wasm_encoder::MemorySection::new();
                for (index, memory) in reader.clone().into_iter().enumerate() {
                    let memory = memory.map_err(parse_error)?;
                    let page_size = 1u64 << memory.page_size_log2.unwrap_or(16);
                    let pages = state.memories[index].len() as u64 / page_size;
                    let mut ty = reencoder.memory_type(memory).map_err(encode_error)?;
                    ty.minimum = pages;
                    if ty.maximum.is_some_and(|maximum| maximum < pages) {
                        return Err(IsolateError::Invalid(
                            "the initialised memory is larger than its maximum".into(),
                        ));
                    }
                    memories.memory(ty);
                }
                module.section(&memories);
            }
            Payload::GlobalSection(reader) => {
                let mut globals = wasm_encoder::GlobalSection::new();
                for (index, global) in reader.clone().into_iter().enumerate() {
                    let global = global.map_err(parse_error)?;
                    match &state.globals[index] {
                        Some(value) => {
                            globals.global(reencoder.global_type(global.ty).map_err(encode_error)?, value);
                        }
                        None => reencoder
                            .parse_global(&mut globals, global)
                            .map_err(encode_error)?,
                    }
                }
                module.section(&globals);
            }
            Payload::ExportSection(reader) => {
                let mut exports = wasm_encoder::ExportSection::new();
                for export in reader.clone() {
                    let export = export.map_err(parse_error)?;
                    if export.kind == ExternalKind::Func && INIT_EXPORTS.contains(&export.name) {
                        continue;
                    }
                    reencoder
                        .parse_export(&mut exports, export)
                        .map_err(encode_error)?;
                }
                module.section(&exports);
            }
            Payload::StartSection { .. } => {} // it ran before the snapshot was taken
            Payload::DataCountSection { .. } => {
                module.section(&wasm_encoder::DataCountSection {
                    count: total_segments as u32,
                });
            }
            Payload::DataSection(reader) => {
                let mut data = wasm_encoder::DataSection::new();
                for segment in reader.clone() {
                    let segment = segment.map_err(parse_error)?;
                    match segment.kind {
                        DataKind::Active { memory_index, .. } if memory_index >= layout.imported_memories => {
                            if keep_segments {
                                let defined = (memory_index - layout.imported_memories) as usize;
                                data.active(memory_index, &zero_offset(&layout.memories[defined]), []);
                            }
                        }
                        _ => {
                            data.raw(&wasm[to_usize(segment.range)]);
                        }
                    }
                }
                append_snapshot(&mut data, layout, state, &snapshot_segments);
                module.section(&data);
                data_written = true;
            }
            Payload::End(_) if !data_written => {
                let mut data = wasm_encoder::DataSection::new();
                append_snapshot(&mut data, layout, state, &snapshot_segments);
                if !data.is_empty() {
                    module.section(&data);
                }
            }
            _ => {
                if let Some((id, range)) = payload.as_section() {
                    module.section(&wasm_encoder::RawSection {
                        id,
                        data: &wasm[to_usize(range)],
                    });
                }
            }
        }
    }
    Ok(module.finish())
}

fn zero_offset(memory: &wasmparser::MemoryType) -> wasm_encoder::ConstExpr {
    offset_expr(memory, 0)
}

fn offset_expr(memory: &wasmparser::MemoryType, offset: usize) -> wasm_encoder::ConstExpr {
    if memory.memory64 {
        wasm_encoder::ConstExpr::i64_const(offset as i64)
    } else {
        // Offsets of a 32-bit memory are u32, encoded as (wrapping) i32.
        wasm_encoder::ConstExpr::i32_const(offset as u32 as i32)
    }
}

fn append_snapshot(
    data: &mut wasm_encoder::DataSection,
    layout: &Layout,
    state: &State,
    segments: &[(u32, Vec<Range<usize>>)],
) {
    for (defined, (memory_index, ranges)) in segments.iter().enumerate() {
        let contents = &state.memories[defined];
        for range in ranges {
            data.active(
                *memory_index,
                &offset_expr(&layout.memories[defined], range.start),
                contents[range.clone()].iter().copied(),
            );
        }
    }
}

/// The runs of `memory` holding non-zero bytes, with zero gaps shorter than a threshold
/// folded in; the threshold doubles until at most `limit` runs remain. `None` if even one
/// run is too many.
fn nonzero_segments(memory: &[u8], limit: usize) -> Option<Vec<Range<usize>>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut position = 0;
    while let Some(start) = memory[position..].iter().position(|&byte| byte != 0) {
        let start = position + start;
        let end = memory[start..]
            .iter()
            .position(|&byte| byte == 0)
            .map_or(memory.len(), |length| start + length);
        match runs.last_mut() {
            Some(last) if start - last.end < MIN_ZERO_GAP => last.end = end,
            _ => runs.push(start..end),
        }
        position = end;
    }
    let mut gap = MIN_ZERO_GAP;
    while runs.len() > limit {
        if limit == 0 {
            return None;
        }
        gap = gap.saturating_mul(2);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(runs.len() / 2 + 1);
        for run in runs {
            match merged.last_mut() {
                Some(last) if run.start - last.end < gap => last.end = run.end,
                _ => merged.push(run),
            }
        }
        runs = merged;
    }
    Some(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_nonzero_runs_and_fold_small_gaps() {
        let mut memory = vec![0u8; 4096];
        memory[10] = 1;
        memory[20] = 2; // 9 zeros apart: folded
        memory[1000] = 3;
        memory[4095] = 4;
        let segments = nonzero_segments(&memory, 100).unwrap();
        assert_eq!(segments, vec![10..21, 1000..1001, 4095..4096]);
        assert_eq!(nonzero_segments(&memory, 1).unwrap(), vec![10..4096]);
        assert_eq!(
            nonzero_segments(&[0; 100], 0).unwrap(),
            Vec::<Range<usize>>::new()
        );
        assert!(nonzero_segments(&memory, 0).is_none());
    }

    #[test]
    fn segments_respect_the_limit() {
        let mut memory = vec![0u8; 1 << 20];
        for index in (0..memory.len()).step_by(100) {
            memory[index] = 1;
        }
        let segments = nonzero_segments(&memory, 50).unwrap();
        assert!(segments.len() <= 50);
        for index in (0..memory.len()).step_by(100) {
            assert!(segments.iter().any(|segment| segment.contains(&index)));
        }
    }
}
