//! The `wasmtime-pooling` baseline: the fastest known way to start a fresh instance.
//!
//! Wasmtime's pooling allocator reserves every instance's memory slot up front, maps each
//! module's initial memory image copy-on-write from a memfd (`memory_init_cow`, on by
//! default) and resets a slot with `madvise(MADV_DONTNEED)` instead of unmapping it. Imports
//! are resolved once per module ([`InstancePre`]), so an invocation is: a `Store`, an
//! instantiation into a pooled slot, `_start`, and the store's drop.
//!
//! The WASI host here is as lean as Atoll's own (`atoll_isolate::wasi`) so that the
//! comparison is about instantiation, not about the host: the same CGI environment (built
//! per invocation with `atoll_isolate::cgi::environment`), stdin, stdout and stderr in
//! memory, `proc_exit` as a trap, and an `ENOSYS` stub for every other preview1 import the
//! module declares. The response is parsed with Atoll's CGI parser, after the store is
//! dropped, exactly like `LoadedFunction::invoke`, so both sides time the same work.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atoll_isolate::{CgiRequest, CgiResponse, cgi};
use bytes::Bytes;
use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Memory, Module,
    PoolingAllocationConfig, Store, TypedFunc, Val,
};

const WASI_MODULE: &str = "wasi_snapshot_preview1";
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_NOSYS: i32 = 52;

/// Pool slots: the bench is single-threaded and keeps one instance alive at a time, so a
/// small pool is enough (the default of 1000 only costs address space).
const POOL_SLOTS: u32 = 32;

/// `proc_exit` unwinds the guest with this error.
#[derive(Debug)]
struct ProcExit(i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "guest exited with status {}", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// An engine with the pooling allocator and copy-on-write memory images.
pub fn pooling_engine() -> Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_core_instances(POOL_SLOTS)
        .total_memories(POOL_SLOTS)
        .total_tables(POOL_SLOTS);
    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_init_cow(true);
    Ok(Engine::new(&config)?)
}

/// Per-invocation host state.
struct WasiState {
    memory: Option<Memory>,
    environ: Vec<u8>,
    environ_offsets: Vec<u32>,
    stdin: Bytes,
    stdin_position: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl WasiState {
    fn new(environment: &[(String, String)], stdin: Bytes) -> Self {
        let mut environ = Vec::new();
        let mut environ_offsets = Vec::with_capacity(environment.len());
        for (key, value) in environment {
            environ_offsets.push(environ.len() as u32);
            environ.extend_from_slice(key.as_bytes());
            environ.push(b'=');
            environ.extend_from_slice(value.as_bytes());
            environ.push(0);
        }
        WasiState {
            memory: None,
            environ,
            environ_offsets,
            stdin,
            stdin_position: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }
}

/// What one invocation measured.
#[derive(Debug)]
pub struct Timed {
    pub response: CgiResponse,
    /// Start until the instance exists and `_start` is ready to call.
    pub ready: Duration,
    /// Start until `_start` returned, the store is gone and the response is parsed.
    pub total: Duration,
}

/// A module compiled and pre-linked once; every [`invoke`](Self::invoke) gets a fresh store.
pub struct PooledFunction {
    engine: Engine,
    pre: InstancePre<WasiState>,
}

impl PooledFunction {
    pub fn new(engine: &Engine, wasm: &[u8]) -> Result<Self> {
        let module = Module::new(engine, wasm)?;
        let linker = linker(engine, &module)?;
        let pre = linker.instantiate_pre(&module)?;
        Ok(PooledFunction {
            engine: engine.clone(),
            pre,
        })
    }

    /// Runs `_start` once for `request` in a fresh instance.
    pub fn invoke(&self, request: &CgiRequest) -> Result<Timed> {
        let started = Instant::now();
        let environment = cgi::environment(request, &[]);
        let mut store = Store::new(&self.engine, WasiState::new(&environment, request.body.clone()));
        let instance = self.pre.instantiate(&mut store)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .context("the module exports no memory")?;
        store.data_mut().memory = Some(memory);
        let start: TypedFunc<(), ()> = instance.get_typed_func(&mut store, "_start")?;
        let ready = started.elapsed();

        let outcome = start.call(&mut store, ());
        let state = store.into_data();
        if let Err(error) = outcome {
            match error.downcast_ref::<ProcExit>() {
                Some(ProcExit(0)) => {}
                Some(ProcExit(code)) => bail!("guest exited with status {code}"),
                None => return Err(anyhow::Error::from(error).context("guest trapped")),
            }
        }
        let response = cgi::parse_response(Bytes::from(state.stdout))?;
        Ok(Timed {
            response,
            ready,
            total: started.elapsed(),
        })
    }
}

/// The WASI host for `module`: real calls for what a CGI program uses, `ENOSYS` for the rest.
fn linker(engine: &Engine, module: &Module) -> Result<Linker<WasiState>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(WASI_MODULE, "fd_write", fd_write)?;
    linker.func_wrap(WASI_MODULE, "fd_read", fd_read)?;
    linker.func_wrap(WASI_MODULE, "environ_get", environ_get)?;
    linker.func_wrap(WASI_MODULE, "environ_sizes_get", environ_sizes_get)?;
    linker.func_wrap(
        WASI_MODULE,
        "proc_exit",
        |_: Caller<'_, WasiState>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(ProcExit(code)))
        },
    )?;
    const IMPLEMENTED: [&str; 5] = [
        "fd_write",
        "fd_read",
        "environ_get",
        "environ_sizes_get",
        "proc_exit",
    ];
    for import in module.imports() {
        if import.module() != WASI_MODULE {
            bail!(
                "imports `{}::{}`; only {WASI_MODULE} is available",
                import.module(),
                import.name()
            );
        }
        if IMPLEMENTED.contains(&import.name()) {
            continue;
        }
        let ExternType::Func(signature) = import.ty() else {
            bail!(
                "imports `{WASI_MODULE}::{}` which is not a function",
                import.name()
            );
        };
        let name = import.name().to_string();
        linker.func_new(
            WASI_MODULE,
            import.name(),
            signature,
            move |_, _, results| match results {
                [errno] => {
                    *errno = Val::I32(ERRNO_NOSYS);
                    Ok(())
                }
                _ => Err(wasmtime::Error::msg(format!("WASI call {name} is not supported"))),
            },
        )?;
    }
    Ok(linker)
}

/// The guest's memory and the host state, borrowed together.
fn memory_and_state<'a>(caller: &'a mut Caller<'_, WasiState>) -> Option<(&'a mut [u8], &'a mut WasiState)> {
    let memory = caller.data().memory?;
    Some(memory.data_and_store_mut(caller))
}

fn slice(memory: &[u8], address: u32, length: usize) -> Result<&[u8], i32> {
    let start = address as usize;
    memory
        .get(start..start.checked_add(length).ok_or(ERRNO_FAULT)?)
        .ok_or(ERRNO_FAULT)
}

fn slice_mut(memory: &mut [u8], address: u32, length: usize) -> Result<&mut [u8], i32> {
    let start = address as usize;
    memory
        .get_mut(start..start.checked_add(length).ok_or(ERRNO_FAULT)?)
        .ok_or(ERRNO_FAULT)
}

fn read_u32(memory: &[u8], address: u32) -> Result<u32, i32> {
    let bytes = slice(memory, address, 4)?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("four bytes")))
}

fn write_u32(memory: &mut [u8], address: u32, value: u32) -> Result<(), i32> {
    slice_mut(memory, address, 4)?.copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// Runs a WASI call that needs memory, turning `Err(errno)` into its return value.
fn with_memory(
    caller: &mut Caller<'_, WasiState>,
    call: impl FnOnce(&mut [u8], &mut WasiState) -> Result<(), i32>,
) -> i32 {
    match memory_and_state(caller) {
        Some((memory, state)) => call(memory, state).map_or_else(|errno| errno, |()| ERRNO_SUCCESS),
        None => ERRNO_FAULT,
    }
}

fn fd_write(mut caller: Caller<'_, WasiState>, fd: i32, iovs: u32, iovs_len: u32, nwritten: u32) -> i32 {
    with_memory(&mut caller, |memory, state| {
        let sink = match fd {
            1 => &mut state.stdout,
            2 => &mut state.stderr,
            _ => return Err(ERRNO_BADF),
        };
        let mut total = 0u32;
        for index in 0..iovs_len {
            let entry = iovs.checked_add(index * 8).ok_or(ERRNO_FAULT)?;
            let buffer = read_u32(memory, entry)?;
            let length = read_u32(memory, entry + 4)?;
            sink.extend_from_slice(slice(memory, buffer, length as usize)?);
            total += length;
        }
        write_u32(memory, nwritten, total)
    })
}

fn fd_read(mut caller: Caller<'_, WasiState>, fd: i32, iovs: u32, iovs_len: u32, nread: u32) -> i32 {
    with_memory(&mut caller, |memory, state| {
        if fd != 0 {
            return Err(ERRNO_BADF);
        }
        let mut total = 0u32;
        for index in 0..iovs_len {
            let entry = iovs.checked_add(index * 8).ok_or(ERRNO_FAULT)?;
            let buffer = read_u32(memory, entry)?;
            let length = read_u32(memory, entry + 4)? as usize;
            let remaining = &state.stdin[state.stdin_position..];
            let chunk = &remaining[..remaining.len().min(length)];
            if chunk.is_empty() {
                break;
            }
            slice_mut(memory, buffer, chunk.len())?.copy_from_slice(chunk);
            state.stdin_position += chunk.len();
            total += chunk.len() as u32;
        }
        write_u32(memory, nread, total)
    })
}

fn environ_get(mut caller: Caller<'_, WasiState>, environ: u32, environ_buf: u32) -> i32 {
    with_memory(&mut caller, |memory, state| {
        for (index, offset) in state.environ_offsets.iter().enumerate() {
            let pointer = environ_buf.checked_add(*offset).ok_or(ERRNO_FAULT)?;
            write_u32(memory, environ + 4 * index as u32, pointer)?;
        }
        slice_mut(memory, environ_buf, state.environ.len())?.copy_from_slice(&state.environ);
        Ok(())
    })
}

fn environ_sizes_get(mut caller: Caller<'_, WasiState>, count: u32, size: u32) -> i32 {
    with_memory(&mut caller, |memory, state| {
        write_u32(memory, count, state.environ_offsets.len() as u32)?;
        write_u32(memory, size, state.environ.len() as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm_modules;

    #[test]
    fn runs_a_generated_module_in_a_pooled_slot() {
        let engine = pooling_engine().unwrap();
        let image = 64 * 1024 + 3;
        let function = PooledFunction::new(&engine, &wasm_modules::data_image_module(image)).unwrap();
        // Twice: the second run reuses the slot the first one left behind.
        for _ in 0..2 {
            let timed = function.invoke(&CgiRequest::default()).unwrap();
            assert_eq!(timed.response.status, 200);
            assert_eq!(
                timed.response.body.as_ref(),
                wasm_modules::expected_body(image).as_slice()
            );
            assert!(timed.ready <= timed.total);
        }
    }
}
