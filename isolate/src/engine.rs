//! The compiler and its identity.
//!
//! An [`Engine`] compiles modules with cranelift and keeps their code until it is dropped, so
//! a node runs each function version on an engine of its own ([`Engine::scratch`]) and a
//! registry checks each push on a throwaway one. Its [`fingerprint`](Engine::fingerprint)
//! names everything a compiled artifact depends on — wasmer's version, the compiler, the
//! target triple and the host CPU features — so the on-disk artifact cache never hands a
//! node code compiled for another machine or release.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmer::sys::NativeEngineExt;
use wasmer::{ExternType, Module};

use crate::error::IsolateError;
use crate::wasi::WASI_MODULE;
use crate::wasi_http::{HTTP_IMPORTS, HTTP_MODULE};
use crate::wasi_kv::{KV_IMPORTS, KV_MODULE};

/// A cheap-to-clone handle on a wasmer engine.
#[derive(Clone)]
pub struct Engine {
    inner: wasmer::Engine,
    fingerprint: Arc<str>,
    copy_on_write: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Engine")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The wasmer release this crate is built against (kept in step with Cargo.toml).
const WASMER_VERSION: &str = "7.4.2";

impl Engine {
    /// The engine Atoll runs functions on: cranelift, copy-on-write memories from pooled
    /// slots for instances armed with a memory plan.
    pub fn new() -> Result<Engine, IsolateError> {
        Engine::build(true)
    }

    /// Wasmer exactly as it comes (default tunables: every instance maps a fresh region and
    /// copies its data segments). The baseline benchmarks measure against.
    pub fn stock() -> Result<Engine, IsolateError> {
        Engine::build(false)
    }

    fn build(copy_on_write: bool) -> Result<Engine, IsolateError> {
        let compiler = wasmer::sys::Cranelift::default();
        let mut inner: wasmer::Engine = wasmer::sys::EngineBuilder::new(compiler).engine().into();
        if copy_on_write {
            // Must happen before the engine is cloned.
            crate::cow_memory::install(&mut inner);
        }
        let target = inner.target();
        let identity = format!(
            "wasmer-{WASMER_VERSION}/{}/{}/{:?}",
            inner.deterministic_id(),
            target.triple(),
            target.cpu_features()
        );
        let digest = Sha256::digest(identity.as_bytes());
        let fingerprint: Arc<str> = hex::encode(&digest[..8]).into();
        Ok(Engine {
            inner,
            fingerprint,
            copy_on_write,
        })
    }

    /// A new engine configured like this one, for modules that are only checked (a push):
    /// wasmer keeps the code of every module an engine compiled until the engine itself is
    /// dropped, so checks on one long-lived engine grew the process by two or three memory
    /// mappings per compile, for ever, towards `vm.max_map_count` (found by fuzzing). Making
    /// one costs about a millisecond.
    pub fn scratch(&self) -> Result<Engine, IsolateError> {
        Engine::build(self.copy_on_write)
    }

    /// A short hex string that changes whenever compiled code would.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub(crate) fn wasmer(&self) -> &wasmer::Engine {
        &self.inner
    }

    /// Compiles `wasm` and checks that it is a WCGI program Atoll can run.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, IsolateError> {
        if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
            return Err(IsolateError::Invalid(
                "not a WebAssembly binary (missing the \\0asm header)".into(),
            ));
        }
        let module = Module::from_binary(&self.inner, wasm)
            .map_err(|error| IsolateError::Invalid(format!("does not compile: {error}")))?;
        check_interface(&module)?;
        Ok(module)
    }

    /// Compiles and checks `wasm`, discarding the result (what a registry does on push).
    pub fn validate(&self, wasm: &[u8]) -> Result<(), IsolateError> {
        self.compile(wasm).map(drop)
    }

    /// [`validate`](Engine::validate), and refuses a module whose memory starts larger than
    /// `max_memory_bytes` (the manifest's `[limits] memory`): it could never run.
    pub fn validate_with_memory_limit(&self, wasm: &[u8], max_memory_bytes: u64) -> Result<(), IsolateError> {
        let module = self.compile(wasm)?;
        let declared = declared_memory_bytes(&module);
        if declared > max_memory_bytes {
            return Err(IsolateError::Invalid(format!(
                "its memory starts at {}, over the {} memory limit",
                human_bytes(declared),
                human_bytes(max_memory_bytes)
            )));
        }
        Ok(())
    }
}

/// `1.06 MiB`, `64 KiB`, `512 B`: exact enough that two different sizes never print alike
/// in the cases that matter (limits are whole units, memories whole 64 KiB pages).
fn human_bytes(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    let scaled = |unit: u64, name: &str| {
        if bytes.is_multiple_of(unit) {
            format!("{} {name}", bytes / unit)
        } else {
            format!("{:.2} {name}", bytes as f64 / unit as f64)
        }
    };
    match bytes {
        b if b >= GIB => scaled(GIB, "GiB"),
        b if b >= MIB => scaled(MIB, "MiB"),
        b if b >= KIB => scaled(KIB, "KiB"),
        b => format!("{b} B"),
    }
}

/// The initial size of the module's exported memory, in bytes.
pub fn declared_memory_bytes(module: &Module) -> u64 {
    module
        .exports()
        .find_map(|export| match export.ty() {
            ExternType::Memory(memory) if export.name() == "memory" => {
                Some(u64::from(memory.minimum.0) * u64::from(wasmer::WASM_PAGE_SIZE as u32))
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// A WCGI program is a WASI command: it exports `_start` and a memory, and imports nothing
/// but WASI preview1 functions and `wasi_experimental_http`'s, the latter with exactly
/// their signatures (a wrong one would only trap at the first call).
pub(crate) fn check_interface(module: &Module) -> Result<(), IsolateError> {
    let start = module.exports().find(|export| export.name() == "_start");
    match start.map(|export| export.ty().clone()) {
        Some(ExternType::Function(signature))
            if signature.params().is_empty() && signature.results().is_empty() => {}
        Some(_) => {
            return Err(IsolateError::Invalid(
                "`_start` must be a function taking and returning nothing".into(),
            ));
        }
        None => {
            return Err(IsolateError::Invalid(
                "not a WASI command: it exports no `_start` function".into(),
            ));
        }
    }
    if !module
        .exports()
        .any(|export| export.name() == "memory" && matches!(export.ty(), ExternType::Memory(_)))
    {
        return Err(IsolateError::Invalid("the module exports no `memory`".into()));
    }
    check_resources(module)?;
    for import in module.imports() {
        if import.module() == HTTP_MODULE {
            check_http_import(import.name(), import.ty())?;
            continue;
        }
        if import.module() == KV_MODULE {
            check_kv_import(import.name(), import.ty())?;
            continue;
        }
        if import.module() != WASI_MODULE {
            return Err(IsolateError::Invalid(format!(
                "imports `{}::{}`; only {WASI_MODULE}, {HTTP_MODULE} and {KV_MODULE} are available",
                import.module(),
                import.name()
            )));
        }
        if !matches!(import.ty(), ExternType::Function(_)) {
            return Err(IsolateError::Invalid(format!(
                "imports `{}::{}` which is not a function",
                import.module(),
                import.name()
            )));
        }
    }
    Ok(())
}

/// Checks an import from `wasi_experimental_http` against the ABI.
fn check_http_import(name: &str, ty: &ExternType) -> Result<(), IsolateError> {
    let Some(&(_, parameters)) = HTTP_IMPORTS.iter().find(|(known, _)| *known == name) else {
        let known: Vec<&str> = HTTP_IMPORTS.iter().map(|(known, _)| *known).collect();
        return Err(IsolateError::Invalid(format!(
            "imports `{HTTP_MODULE}::{name}`, which does not exist; the module has {}",
            known.join(", ")
        )));
    };
    let expected = wasmer::FunctionType::new(vec![wasmer::Type::I32; parameters], vec![wasmer::Type::I32]);
    match ty {
        ExternType::Function(signature) if *signature == expected => Ok(()),
        ExternType::Function(signature) => Err(IsolateError::Invalid(format!(
            "imports `{HTTP_MODULE}::{name}` as {signature}; its signature is {expected}"
        ))),
        _ => Err(IsolateError::Invalid(format!(
            "imports `{HTTP_MODULE}::{name}` which is not a function"
        ))),
    }
}

/// Checks an import from `atoll_kv` against its ABI.
fn check_kv_import(name: &str, ty: &ExternType) -> Result<(), IsolateError> {
    let Some(&(_, parameters)) = KV_IMPORTS.iter().find(|(known, _)| *known == name) else {
        let known: Vec<&str> = KV_IMPORTS.iter().map(|(known, _)| *known).collect();
        return Err(IsolateError::Invalid(format!(
            "imports `{KV_MODULE}::{name}`, which does not exist; the module has {}",
            known.join(", ")
        )));
    };
    let parameters: Vec<wasmer::Type> = parameters
        .iter()
        .map(|&wide| {
            if wide {
                wasmer::Type::I64
            } else {
                wasmer::Type::I32
            }
        })
        .collect();
    let expected = wasmer::FunctionType::new(parameters, vec![wasmer::Type::I32]);
    match ty {
        ExternType::Function(signature) if *signature == expected => Ok(()),
        ExternType::Function(signature) => Err(IsolateError::Invalid(format!(
            "imports `{KV_MODULE}::{name}` as {signature}; its signature is {expected}"
        ))),
        _ => Err(IsolateError::Invalid(format!(
            "imports `{KV_MODULE}::{name}` which is not a function"
        ))),
    }
}

/// Most elements a table may have: a function's tables are not covered by its memory
/// limit, so their size is bounded here (8 MiB of references).
pub const MAX_TABLE_ELEMENTS: u32 = 1 << 20;

/// Refuses what the per-function limits could not bound: shared memories (wasm threads)
/// are created by wasmer outside the memory limit, a second memory would not be counted in
/// it, and tables could grow without bound.
fn check_resources(module: &Module) -> Result<(), IsolateError> {
    let info = module.info();
    if info.memories.len() > 1 {
        return Err(IsolateError::Invalid(format!(
            "declares {} memories; a function has one",
            info.memories.len()
        )));
    }
    if info.memories.values().any(|memory| memory.shared) {
        return Err(IsolateError::Invalid(
            "declares a shared memory (wasm threads), which functions cannot use".into(),
        ));
    }
    for table in info.tables.values() {
        if table.minimum > MAX_TABLE_ELEMENTS {
            return Err(IsolateError::Invalid(format!(
                "declares a table of {} elements, over the limit of {MAX_TABLE_ELEMENTS}",
                table.minimum
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_engine_takes_its_compiled_code_with_it() {
        let maps = || {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .count()
        };
        let wasm = wasmer::wat2wasm(br#"(module (memory (export "memory") 1) (func (export "_start")))"#)
            .unwrap()
            .into_owned();
        let engine = Engine::new().unwrap();
        engine.scratch().unwrap().validate(&wasm).unwrap();
        let before = maps();
        for _ in 0..200 {
            engine.scratch().unwrap().validate(&wasm).unwrap();
        }
        let growth = maps().saturating_sub(before);
        // One engine for all 200 would keep ~470 more.
        assert!(growth < 100, "{growth} more memory mappings after 200 checks");
    }

    #[test]
    fn sizes_print_exactly_enough() {
        assert_eq!(human_bytes(17 * 65536), "1.06 MiB");
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(64 << 10), "64 KiB");
        assert_eq!(human_bytes(4 << 30), "4 GiB");
        assert_eq!(human_bytes(100), "100 B");
    }
}
