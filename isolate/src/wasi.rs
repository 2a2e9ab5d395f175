//! A lean WASI preview1 host: just what a CGI program uses.
//!
//! A WCGI guest needs its environment, stdin, stdout, stderr, a clock, randomness and
//! `proc_exit`. wasmer-wasix provides all of POSIX, but building its `WasiEnv` costs about
//! 0.4 ms per request — more than the rest of an invocation — so Atoll implements the
//! handful of calls itself. Every other `wasi_snapshot_preview1` import a module declares
//! is satisfied by a stub answering `ENOSYS`, so programs that merely *link* file or socket
//! calls still run. The one other import module is `wasi_experimental_http`, outbound HTTP
//! ([`crate::wasi_http`]); imports from any other module are refused when the module is
//! loaded.
//!
//! There is no filesystem and no preopened directory: functions are stateless by design.
//!
//! Host code is not interruptible the way guest code is, so every call here is written for
//! a hostile guest: it checks the guest's pointers and lengths against its memory *before*
//! doing any work, works in place (no buffer sized by the guest), and calls that may do a
//! lot of work (long iovec lists, `random_get` over gigabytes) do it in chunks and stop
//! once the run's deadline has fired, trapping so the run ends as a timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::stream::{BodyWriter, SendError, StreamedResponse, StreamingOutput, body_pipe};
use bytes::Bytes;
use wasmer::{
    Extern, Function, FunctionEnv, FunctionEnvMut, FunctionType, Imports, Memory, MemoryView, Module,
    RuntimeError, Store, Type, Value,
};

/// The import module name of WASI preview1.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_IO: i32 = 29;
const ERRNO_NOSYS: i32 = 52;
const ERRNO_SPIPE: i32 = 70;

/// `proc_exit` unwinds the guest with this error; the invoker turns it into an exit code.
#[derive(Debug, thiserror::Error)]
#[error("guest exited with status {0}")]
pub struct ProcExit(pub u32);

/// Per-invocation WASI state: the request in, the response and log out.
pub struct WasiContext {
    memory: Option<Memory>,
    args: Vec<u8>,
    arg_offsets: Vec<usize>,
    environ: Vec<u8>,
    environ_offsets: Vec<usize>,
    stdin: Bytes,
    stdin_position: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    max_stdout: usize,
    max_stderr: usize,
    stdout_overflow: bool,
    /// Stdout bytes the guest wrote in all (buffered and streamed).
    stdout_total: usize,
    /// Set when a run may stream its response: taken when stdout passes the threshold.
    streaming: Option<StreamingOutput>,
    /// The body being streamed, once the head is sent.
    body_writer: Option<BodyWriter>,
    /// Body bytes of the current `fd_write` not yet sent: one call's iovecs go out as
    /// chunks of up to [`CHUNK_BYTES`], not one chunk each.
    unsent: Vec<u8>,
    /// Why streaming stopped the guest, if it did.
    stream_failure: Option<StreamFailure>,
    /// The head went out and the body is dropped (HEAD): output is only counted.
    discarding: bool,
    /// What the run's host calls and its interrupter share.
    signals: Arc<RunSignals>,
    /// When this instance was created: the origin of its CPU-time clocks.
    created: Instant,
    /// Outbound HTTP (`wasi_experimental_http`): the function's access and this run's calls.
    pub(crate) http: crate::wasi_http::HttpState,
    /// Key-value stores (`atoll_kv`): the function's access and this run's calls.
    pub(crate) kv: crate::wasi_kv::KvState,
}

/// What a finished invocation left behind.
pub struct WasiOutput {
    /// Buffered stdout: the whole output, or nothing once the response is streamed.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_overflow: bool,
    /// The streamed body's writer, when the response went out as a stream.
    pub body_writer: Option<BodyWriter>,
    pub stream_failure: Option<StreamFailure>,
}

/// Why the guest was stopped while its response was being streamed.
#[derive(Debug)]
pub enum StreamFailure {
    /// Its head was not a valid CGI response.
    Malformed(crate::cgi::CgiError),
    /// The client went away.
    ClientGone,
}

impl WasiContext {
    pub fn new(
        args: &[&str],
        env: &[(String, String)],
        stdin: Bytes,
        max_stdout: usize,
        max_stderr: usize,
    ) -> Self {
        let (args, arg_offsets) = nul_joined(args.iter().map(|arg| arg.as_bytes().to_vec()));
        let mut context = WasiContext {
            memory: None,
            args,
            arg_offsets,
            environ: Vec::new(),
            environ_offsets: Vec::new(),
            stdin: Bytes::new(),
            stdin_position: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            max_stdout,
            max_stderr,
            stdout_overflow: false,
            stdout_total: 0,
            streaming: None,
            body_writer: None,
            unsent: Vec::new(),
            stream_failure: None,
            discarding: false,
            signals: Arc::default(),
            created: Instant::now(),
            http: crate::wasi_http::HttpState::default(),
            kv: crate::wasi_kv::KvState::default(),
        };
        context.set_input(env, stdin);
        context
    }

    /// Shares the run's [`RunSignals`] with whoever interrupts it.
    pub fn with_signals(mut self, signals: Arc<RunSignals>) -> Self {
        self.signals = signals;
        self
    }

    /// Replaces the request-specific input: an instance is prepared before its request is
    /// known, and gets its environment and stdin just before `_start` runs.
    pub fn set_input(&mut self, env: &[(String, String)], stdin: Bytes) {
        let (environ, environ_offsets) = nul_joined(env.iter().map(|(key, value)| {
            let mut entry = Vec::with_capacity(key.len() + value.len() + 1);
            entry.extend_from_slice(key.as_bytes());
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            entry
        }));
        self.environ = environ;
        self.environ_offsets = environ_offsets;
        self.stdin = stdin;
        self.stdin_position = 0;
    }

    /// Lets this run stream stdout past `streaming.threshold` bytes.
    pub fn set_streaming(&mut self, streaming: Option<StreamingOutput>) {
        self.streaming = streaming;
    }

    pub fn set_memory(&mut self, memory: Memory) {
        self.memory = Some(memory);
    }

    /// Lets this instance's run call out (`None`: every call is refused).
    pub fn set_outbound(&mut self, access: Option<Arc<crate::wasi_http::OutboundAccess>>) {
        self.http = crate::wasi_http::HttpState::new(access);
    }

    /// Lets this instance's run use key-value stores (`None`: every call is refused).
    pub fn set_kv(&mut self, access: Option<Arc<crate::wasi_kv::KvAccess>>) {
        self.kv = crate::wasi_kv::KvState::new(access);
    }

    /// Outbound calls this run made.
    pub fn outbound_requests(&self) -> u32 {
        self.http.requests()
    }

    pub(crate) fn signals(&self) -> &Arc<RunSignals> {
        &self.signals
    }

    /// Adds a line from the host to the function's log (its stderr), within the log's cap.
    pub(crate) fn log_host_line(&mut self, line: &str) {
        let line = format!("atoll: {line}\n");
        if self.stderr.len() + line.len() <= self.max_stderr {
            self.stderr.extend_from_slice(line.as_bytes());
        }
    }

    pub fn take_output(&mut self) -> WasiOutput {
        WasiOutput {
            stdout: std::mem::take(&mut self.stdout),
            stderr: std::mem::take(&mut self.stderr),
            stdout_overflow: self.stdout_overflow,
            body_writer: self.body_writer.take(),
            stream_failure: self.stream_failure.take(),
        }
    }
}

/// Concatenates entries, each followed by NUL, remembering where each starts.
fn nul_joined(entries: impl Iterator<Item = Vec<u8>>) -> (Vec<u8>, Vec<usize>) {
    let mut buffer = Vec::new();
    let mut offsets = Vec::new();
    for entry in entries {
        offsets.push(buffer.len());
        buffer.extend_from_slice(&entry);
        buffer.push(0);
    }
    (buffer, offsets)
}

/// One import of a module, resolved to what the host provides for it. Computed once per
/// module ([`import_plan`]) so that creating an instance only creates the functions, in
/// import order, with no name lookups ([`externs`] + `Instance::new_by_index`).
#[derive(Debug, Clone)]
pub enum HostImport {
    ArgsGet,
    ArgsSizesGet,
    EnvironGet,
    EnvironSizesGet,
    FdRead,
    FdWrite,
    FdClose,
    FdFdstatGet,
    FdSeek,
    FdPrestatGet,
    FdPrestatDirName,
    ProcExit,
    RandomGet,
    ClockTimeGet,
    ClockResGet,
    SchedYield,
    HttpReq,
    HttpClose,
    HttpHeaderGet,
    HttpHeadersGetAll,
    HttpBodyRead,
    KvOpen,
    KvGet,
    KvSet,
    KvCas,
    KvIncrement,
    KvDelete,
    KvList,
    /// Any other function: answers `ENOSYS` when it returns an errno, traps otherwise.
    Unsupported {
        name: String,
        signature: FunctionType,
    },
}

/// How the host satisfies each of `module`'s imports, in import order. Imports that are not
/// WASI functions become traps (modules with such imports are refused at load anyway).
pub fn import_plan(module: &Module) -> Vec<HostImport> {
    module
        .imports()
        .map(|import| {
            let name = import.name();
            if import.module() == crate::wasi_http::HTTP_MODULE {
                match name {
                    "req" => return HostImport::HttpReq,
                    "close" => return HostImport::HttpClose,
                    "header_get" => return HostImport::HttpHeaderGet,
                    "headers_get_all" => return HostImport::HttpHeadersGetAll,
                    "body_read" => return HostImport::HttpBodyRead,
                    _ => {}
                }
            }
            if import.module() == crate::wasi_kv::KV_MODULE {
                match name {
                    "open" => return HostImport::KvOpen,
                    "get" => return HostImport::KvGet,
                    "set" => return HostImport::KvSet,
                    "cas" => return HostImport::KvCas,
                    "increment" => return HostImport::KvIncrement,
                    "delete" => return HostImport::KvDelete,
                    "list" => return HostImport::KvList,
                    _ => {}
                }
            }
            if import.module() != WASI_MODULE {
                let signature = import
                    .ty()
                    .func()
                    .cloned()
                    .unwrap_or_else(|| FunctionType::new([], []));
                return HostImport::Unsupported {
                    name: format!("{}::{name}", import.module()),
                    signature,
                };
            }
            match name {
                "args_get" => HostImport::ArgsGet,
                "args_sizes_get" => HostImport::ArgsSizesGet,
                "environ_get" => HostImport::EnvironGet,
                "environ_sizes_get" => HostImport::EnvironSizesGet,
                "fd_read" => HostImport::FdRead,
                "fd_write" => HostImport::FdWrite,
                "fd_close" => HostImport::FdClose,
                "fd_fdstat_get" => HostImport::FdFdstatGet,
                "fd_seek" => HostImport::FdSeek,
                "fd_prestat_get" => HostImport::FdPrestatGet,
                "fd_prestat_dir_name" => HostImport::FdPrestatDirName,
                "proc_exit" => HostImport::ProcExit,
                "random_get" => HostImport::RandomGet,
                "clock_time_get" => HostImport::ClockTimeGet,
                "clock_res_get" => HostImport::ClockResGet,
                "sched_yield" => HostImport::SchedYield,
                _ => HostImport::Unsupported {
                    name: name.to_string(),
                    signature: import
                        .ty()
                        .func()
                        .cloned()
                        .unwrap_or_else(|| FunctionType::new([], [])),
                },
            }
        })
        .collect()
}

/// Creates the host functions for `plan` in `store`, in import order.
pub fn externs(store: &mut Store, env: &FunctionEnv<WasiContext>, plan: &[HostImport]) -> Vec<Extern> {
    plan.iter()
        .map(|import| {
            let function = match import {
                HostImport::ArgsGet => Function::new_typed_with_env(store, env, args_get),
                HostImport::ArgsSizesGet => Function::new_typed_with_env(store, env, args_sizes_get),
                HostImport::EnvironGet => Function::new_typed_with_env(store, env, environ_get),
                HostImport::EnvironSizesGet => Function::new_typed_with_env(store, env, environ_sizes_get),
                HostImport::FdRead => Function::new_typed_with_env(store, env, fd_read),
                HostImport::FdWrite => Function::new_typed_with_env(store, env, fd_write),
                HostImport::FdClose => Function::new_typed_with_env(store, env, fd_close),
                HostImport::FdFdstatGet => Function::new_typed_with_env(store, env, fd_fdstat_get),
                HostImport::FdSeek => Function::new_typed_with_env(store, env, fd_seek),
                HostImport::FdPrestatGet => Function::new_typed_with_env(store, env, fd_prestat_get),
                HostImport::FdPrestatDirName => Function::new_typed_with_env(store, env, fd_prestat_dir_name),
                HostImport::ProcExit => Function::new_typed_with_env(store, env, proc_exit),
                HostImport::RandomGet => Function::new_typed_with_env(store, env, random_get),
                HostImport::ClockTimeGet => Function::new_typed_with_env(store, env, clock_time_get),
                HostImport::ClockResGet => Function::new_typed_with_env(store, env, clock_res_get),
                HostImport::SchedYield => Function::new_typed_with_env(store, env, sched_yield),
                HostImport::HttpReq => Function::new_typed_with_env(store, env, crate::wasi_http::req),
                HostImport::HttpClose => Function::new_typed_with_env(store, env, crate::wasi_http::close),
                HostImport::HttpHeaderGet => {
                    Function::new_typed_with_env(store, env, crate::wasi_http::header_get)
                }
                HostImport::HttpHeadersGetAll => {
                    Function::new_typed_with_env(store, env, crate::wasi_http::headers_get_all)
                }
                HostImport::HttpBodyRead => {
                    Function::new_typed_with_env(store, env, crate::wasi_http::body_read)
                }
                HostImport::KvOpen => Function::new_typed_with_env(store, env, crate::wasi_kv::open),
                HostImport::KvGet => Function::new_typed_with_env(store, env, crate::wasi_kv::get),
                HostImport::KvSet => Function::new_typed_with_env(store, env, crate::wasi_kv::set),
                HostImport::KvCas => Function::new_typed_with_env(store, env, crate::wasi_kv::cas),
                HostImport::KvIncrement => {
                    Function::new_typed_with_env(store, env, crate::wasi_kv::increment)
                }
                HostImport::KvDelete => Function::new_typed_with_env(store, env, crate::wasi_kv::delete),
                HostImport::KvList => Function::new_typed_with_env(store, env, crate::wasi_kv::list),
                HostImport::Unsupported { name, signature } => {
                    let name = name.clone();
                    let returns_errno = signature.results() == [Type::I32];
                    Function::new_with_env(store, env, signature.clone(), move |env, _| {
                        let _host = enter(&env).map_err(|stop| RuntimeError::user(Box::new(stop)))?;
                        if returns_errno {
                            Ok(vec![Value::I32(ERRNO_NOSYS)])
                        } else {
                            Err(RuntimeError::new(format!("WASI call {name} is not supported")))
                        }
                    })
                }
            };
            Extern::Function(function)
        })
        .collect()
}

/// The import object for `module` by name (for callers that instantiate by name).
pub fn imports(store: &mut Store, env: &FunctionEnv<WasiContext>, module: &Module) -> Imports {
    let plan = import_plan(module);
    let externs = externs(store, env, &plan);
    let mut imports = Imports::new();
    for (import, external) in module.imports().zip(externs) {
        imports.define(import.module(), import.name(), external);
    }
    imports
}

/// Why a host call stopped early: the run's deadline fired. The call traps, and the run
/// ends as a timeout.
#[derive(Debug, thiserror::Error)]
#[error("stopped by the deadline in a host call")]
pub struct HostCallInterrupted;

/// A host call's failure: an errno for the guest, or a trap.
pub(crate) enum CallError {
    Errno(i32),
    Interrupted,
}

impl From<i32> for CallError {
    fn from(errno: i32) -> Self {
        CallError::Errno(errno)
    }
}

/// How much a host call does between two looks at the deadline.
const CHUNK_BYTES: usize = 64 * 1024;
const CHUNK_ENTRIES: u32 = 4096;

/// What a run's host calls and whoever stops the run share.
///
/// Stopping a guest takes wasmer's host interrupt (a signal to its thread), but a signal
/// that lands while the thread is in wasmer's glue around a host call unwinds out of code
/// that holds a `RefCell` borrow of wasmer's store context, and the next call on that
/// thread panics ("RefCell already borrowed"; the soak test found it taking the node down).
/// So a stop first only raises `fired`: every host call checks it on entry and in its
/// loops and traps cleanly, which ends any guest that calls the host. Only a guest that
/// keeps running without host calls is signalled, after [`SIGNAL_GRACE`], and never while
/// it is inside a host call (`in_host`).
#[derive(Debug, Default)]
pub struct RunSignals {
    fired: AtomicBool,
    in_host: AtomicBool,
    /// When `fired` was first raised (nanoseconds since the process's first stop).
    fired_at: std::sync::atomic::AtomicU64,
    /// Wakes host calls that wait (an outbound request) when `fired` is raised.
    stopping: tokio::sync::Notify,
}

/// How long a stopped guest gets to reach a host call (and end without a signal).
pub const SIGNAL_GRACE: std::time::Duration = std::time::Duration::from_millis(5);

fn stop_clock() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

impl RunSignals {
    /// Whether the run was asked to stop.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Asks the run to stop: the first call raises `fired`; later calls (callers repeat
    /// until the run returns) signal the guest through `interrupter` once the grace has
    /// passed, unless it is inside a host call, which ends the run itself.
    pub fn stop(&self, interrupter: &wasmer::Interrupter) {
        if !self.fired.swap(true, Ordering::SeqCst) {
            self.fired_at.store(stop_clock(), Ordering::SeqCst);
            self.stopping.notify_waiters();
            return;
        }
        let since = stop_clock().saturating_sub(self.fired_at.load(Ordering::SeqCst));
        if since < SIGNAL_GRACE.as_nanos() as u64 || self.in_host.load(Ordering::SeqCst) {
            return;
        }
        interrupter.interrupt();
    }
}

impl RunSignals {
    /// Marks the run as stopped from inside: a host call that waited until the run's
    /// deadline ends the run as a timeout, as the deadline's own stop would.
    pub(crate) fn raise(&self) {
        if !self.fired.swap(true, Ordering::SeqCst) {
            self.fired_at.store(stop_clock(), Ordering::SeqCst);
            self.stopping.notify_waiters();
        }
    }

    /// Completes once the run is asked to stop: a host call that waits selects on it.
    pub async fn stopped(&self) {
        let notified = self.stopping.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so a stop between the two is not missed.
        notified.as_mut().enable();
        if self.fired() {
            return;
        }
        notified.await;
    }
}

/// Marks the guest as inside a host call for as long as it lives; refuses to enter once
/// the run was asked to stop.
pub(crate) struct HostCall(Arc<RunSignals>);

impl HostCall {
    pub(crate) fn enter(signals: &Arc<RunSignals>) -> Result<HostCall, HostCallInterrupted> {
        signals.in_host.store(true, Ordering::SeqCst);
        let call = HostCall(Arc::clone(signals));
        if signals.fired.load(Ordering::SeqCst) {
            return Err(HostCallInterrupted);
        }
        Ok(call)
    }
}

impl Drop for HostCall {
    fn drop(&mut self) {
        self.0.in_host.store(false, Ordering::SeqCst);
    }
}

/// For host calls that touch no memory: the same entry check.
fn enter(env: &FunctionEnvMut<WasiContext>) -> Result<HostCall, HostCallInterrupted> {
    HostCall::enter(&env.data().signals)
}

impl WasiContext {
    fn check_deadline(&self) -> Result<(), CallError> {
        if self.signals.fired.load(Ordering::Relaxed) {
            Err(CallError::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// Runs `f` with the guest memory's view and the context, or answers `EFAULT` when the
/// module has no memory. A call the deadline stopped traps.
fn with_memory(
    env: &mut FunctionEnvMut<WasiContext>,
    f: impl FnOnce(&mut WasiContext, &MemoryView) -> Result<i32, CallError>,
) -> Result<i32, HostCallInterrupted> {
    with_guest_memory(env, ERRNO_FAULT, f)
}

/// What every host call that touches memory shares: it enters as a host call (a stopped
/// run traps), answers `no_memory` when the module has none, and runs `f` with the view.
/// Each import module passes its own code for a missing memory.
pub(crate) fn with_guest_memory(
    env: &mut FunctionEnvMut<WasiContext>,
    no_memory: i32,
    f: impl FnOnce(&mut WasiContext, &MemoryView) -> Result<i32, CallError>,
) -> Result<i32, HostCallInterrupted> {
    let (context, store) = env.data_and_store_mut();
    let _host = HostCall::enter(&context.signals)?;
    let Some(memory) = context.memory.clone() else {
        return Ok(no_memory);
    };
    let view = memory.view(&store);
    match f(context, &view) {
        Ok(errno) | Err(CallError::Errno(errno)) => Ok(errno),
        Err(CallError::Interrupted) => Err(HostCallInterrupted),
    }
}

/// Checks that `[address, address + length)` lies inside the guest's memory.
fn check_range(view: &MemoryView, address: u32, length: u64) -> Result<(), i32> {
    match u64::from(address).checked_add(length) {
        Some(end) if end <= view.data_size() => Ok(()),
        _ => Err(ERRNO_FAULT),
    }
}

fn read_u32(view: &MemoryView, address: u32) -> Result<u32, i32> {
    let mut bytes = [0u8; 4];
    view.read(u64::from(address), &mut bytes)
        .map_err(|_| ERRNO_FAULT)?;
    Ok(u32::from_le_bytes(bytes))
}

fn write_bytes(view: &MemoryView, address: u32, bytes: &[u8]) -> Result<(), i32> {
    view.write(u64::from(address), bytes).map_err(|_| ERRNO_FAULT)
}

fn write_u32(view: &MemoryView, address: u32, value: u32) -> Result<(), i32> {
    write_bytes(view, address, &value.to_le_bytes())
}

fn write_u64(view: &MemoryView, address: u32, value: u64) -> Result<(), i32> {
    write_bytes(view, address, &value.to_le_bytes())
}

fn write_pointer_list(
    view: &MemoryView,
    list_address: u32,
    buffer_address: u32,
    buffer: &[u8],
    offsets: &[usize],
) -> Result<i32, CallError> {
    check_range(view, list_address, 4 * offsets.len() as u64)?;
    check_range(view, buffer_address, buffer.len() as u64)?;
    for (index, offset) in offsets.iter().enumerate() {
        let pointer = buffer_address
            .checked_add(u32::try_from(*offset).map_err(|_| ERRNO_INVAL)?)
            .ok_or(ERRNO_FAULT)?;
        write_u32(view, list_address + 4 * index as u32, pointer)?;
    }
    write_bytes(view, buffer_address, buffer)?;
    Ok(ERRNO_SUCCESS)
}

/// The `(buffer, length)` pairs of an iovec list, after checking the whole list lies in
/// memory.
fn iovecs<'a>(
    view: &'a MemoryView<'a>,
    iovs: u32,
    iovs_len: u32,
) -> Result<impl Iterator<Item = Result<(u32, u32), i32>> + 'a, i32> {
    check_range(view, iovs, u64::from(iovs_len) * 8)?;
    Ok((0..iovs_len).map(move |index| {
        let entry = iovs + index * 8;
        Ok((read_u32(view, entry)?, read_u32(view, entry + 4)?))
    }))
}

fn args_get(
    mut env: FunctionEnvMut<WasiContext>,
    argv: u32,
    argv_buf: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        write_pointer_list(view, argv, argv_buf, &context.args, &context.arg_offsets)
    })
}

fn args_sizes_get(
    mut env: FunctionEnvMut<WasiContext>,
    count: u32,
    size: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        write_u32(view, count, context.arg_offsets.len() as u32)?;
        write_u32(view, size, context.args.len() as u32)?;
        Ok(ERRNO_SUCCESS)
    })
}

fn environ_get(
    mut env: FunctionEnvMut<WasiContext>,
    environ: u32,
    environ_buf: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        write_pointer_list(
            view,
            environ,
            environ_buf,
            &context.environ,
            &context.environ_offsets,
        )
    })
}

fn environ_sizes_get(
    mut env: FunctionEnvMut<WasiContext>,
    count: u32,
    size: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        write_u32(view, count, context.environ_offsets.len() as u32)?;
        write_u32(view, size, context.environ.len() as u32)?;
        Ok(ERRNO_SUCCESS)
    })
}

fn fd_read(
    mut env: FunctionEnvMut<WasiContext>,
    fd: i32,
    iovs: u32,
    iovs_len: u32,
    nread: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        if fd != 0 {
            return Err(ERRNO_BADF.into());
        }
        check_range(view, nread, 4)?;
        let mut total: u32 = 0;
        for (index, iovec) in iovecs(view, iovs, iovs_len)?.enumerate() {
            if (index as u32).is_multiple_of(CHUNK_ENTRIES) {
                context.check_deadline()?;
            }
            let (buffer, length) = iovec?;
            check_range(view, buffer, u64::from(length))?;
            let remaining = &context.stdin[context.stdin_position..];
            let chunk = &remaining[..remaining.len().min(length as usize)];
            if chunk.is_empty() {
                break;
            }
            for (offset, piece) in chunk.chunks(CHUNK_BYTES).enumerate() {
                context.check_deadline()?;
                write_bytes(view, buffer + (offset * CHUNK_BYTES) as u32, piece)?;
            }
            context.stdin_position += chunk.len();
            total = total.saturating_add(chunk.len() as u32);
        }
        write_u32(view, nread, total)?;
        Ok(ERRNO_SUCCESS)
    })
}

fn fd_write(
    mut env: FunctionEnvMut<WasiContext>,
    fd: i32,
    iovs: u32,
    iovs_len: u32,
    nwritten: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        if fd != 1 && fd != 2 {
            return Err(ERRNO_BADF.into());
        }
        check_range(view, nwritten, 4)?;
        let mut total: u32 = 0;
        for (index, iovec) in iovecs(view, iovs, iovs_len)?.enumerate() {
            if (index as u32).is_multiple_of(CHUNK_ENTRIES) {
                context.check_deadline()?;
            }
            let (buffer, length) = iovec?;
            check_range(view, buffer, u64::from(length))?;
            if fd == 1 {
                if let Err(error) = context.write_stdout(view, buffer, length) {
                    context.unsent.clear();
                    return Err(error);
                }
                total = total.saturating_add(length);
                continue;
            }
            if context.stderr.len().saturating_add(length as usize) > context.max_stderr {
                // The log is best effort: keep its head, pretend the rest was written.
                total = total.saturating_add(length);
                continue;
            }
            let mut copied = 0u32;
            while copied < length {
                context.check_deadline()?;
                let piece = (length - copied).min(CHUNK_BYTES as u32);
                let start = context.stderr.len();
                context.stderr.resize(start + piece as usize, 0);
                view.read(u64::from(buffer + copied), &mut context.stderr[start..])
                    .map_err(|_| ERRNO_FAULT)?;
                copied += piece;
            }
            total = total.saturating_add(length);
        }
        if fd == 1 {
            context.send_unsent()?;
        }
        write_u32(view, nwritten, total)?;
        Ok(ERRNO_SUCCESS)
    })
}

impl WasiContext {
    /// Takes `length` bytes at `buffer` as stdout: buffered, or streamed once the buffer
    /// passed the streaming threshold. A write that would pass the response limit is
    /// refused whole (`EIO`) and the run ends as "response too large".
    fn write_stdout(&mut self, view: &MemoryView, buffer: u32, length: u32) -> Result<(), CallError> {
        if self.stdout_total.saturating_add(length as usize) > self.max_stdout {
            self.stdout_overflow = true;
            return Err(ERRNO_IO.into());
        }
        self.stdout_total += length as usize;
        if self.discarding {
            return Ok(());
        }
        let mut copied = 0u32;
        while copied < length {
            self.check_deadline()?;
            let piece = (length - copied).min(CHUNK_BYTES as u32);
            let address = u64::from(buffer + copied);
            if self.body_writer.is_some() {
                let start = self.unsent.len();
                self.unsent.resize(start + piece as usize, 0);
                view.read(address, &mut self.unsent[start..])
                    .map_err(|_| ERRNO_FAULT)?;
                if self.unsent.len() >= CHUNK_BYTES {
                    self.send_unsent()?;
                }
            } else {
                let start = self.stdout.len();
                self.stdout.resize(start + piece as usize, 0);
                view.read(address, &mut self.stdout[start..])
                    .map_err(|_| ERRNO_FAULT)?;
                if self
                    .streaming
                    .as_ref()
                    .is_some_and(|streaming| self.stdout.len() > streaming.threshold)
                {
                    self.start_streaming()?;
                }
            }
            copied += piece;
        }
        Ok(())
    }

    /// Parses the buffered head, hands it on with the body's reader, and sends what was
    /// buffered of the body. A head that is not valid CGI stops the guest.
    fn start_streaming(&mut self) -> Result<(), CallError> {
        let Some(streaming) = self.streaming.take() else {
            return Ok(());
        };
        let output = Bytes::from(std::mem::take(&mut self.stdout));
        match crate::cgi::parse_response(output) {
            Err(error) => {
                self.stream_failure = Some(StreamFailure::Malformed(error));
                Err(CallError::Interrupted)
            }
            Ok(response) => {
                let (writer, reader) = body_pipe(streaming.capacity);
                (streaming.on_start)(StreamedResponse {
                    status: response.status,
                    headers: response.headers,
                    body: reader,
                });
                self.body_writer = Some(writer);
                if streaming.discard_body {
                    self.discarding = true;
                    return Ok(());
                }
                self.stream(response.body)
            }
        }
    }

    /// Sends what this call has gathered of the body, if anything.
    fn send_unsent(&mut self) -> Result<(), CallError> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.unsent));
        self.stream(chunk)
    }

    /// Sends a body chunk, waiting while the client is slower than the guest, but never
    /// past the run's stop; a client that went away stops the guest.
    fn stream(&mut self, chunk: Bytes) -> Result<(), CallError> {
        let signals = &self.signals;
        let Some(writer) = self.body_writer.as_mut() else {
            return Ok(());
        };
        match writer.send(chunk, || signals.fired()) {
            Ok(()) => Ok(()),
            Err(SendError::Stopped) => Err(CallError::Interrupted),
            Err(SendError::ReaderGone | SendError::ReaderStalled) => {
                self.stream_failure = Some(StreamFailure::ClientGone);
                Err(CallError::Interrupted)
            }
        }
    }
}

fn fd_close(env: FunctionEnvMut<WasiContext>, fd: i32) -> Result<i32, HostCallInterrupted> {
    let _host = enter(&env)?;
    Ok(if (0..=2).contains(&fd) {
        ERRNO_SUCCESS
    } else {
        ERRNO_BADF
    })
}

fn fd_fdstat_get(
    mut env: FunctionEnvMut<WasiContext>,
    fd: i32,
    stat: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |_, view| {
        if !(0..=2).contains(&fd) {
            return Err(ERRNO_BADF.into());
        }
        // fdstat: filetype u8 (2 = character device), flags u16, rights base u64, inheriting u64.
        let mut record = [0u8; 24];
        record[0] = 2;
        let rights: u64 = if fd == 0 { 1 << 1 } else { 1 << 6 }; // fd_read / fd_write
        record[8..16].copy_from_slice(&rights.to_le_bytes());
        write_bytes(view, stat, &record)?;
        Ok(ERRNO_SUCCESS)
    })
}

fn fd_seek(
    env: FunctionEnvMut<WasiContext>,
    fd: i32,
    _offset: i64,
    _whence: i32,
    _new: u32,
) -> Result<i32, HostCallInterrupted> {
    let _host = enter(&env)?;
    Ok(if (0..=2).contains(&fd) {
        ERRNO_SPIPE
    } else {
        ERRNO_BADF
    })
}

fn fd_prestat_get(
    env: FunctionEnvMut<WasiContext>,
    _fd: i32,
    _prestat: u32,
) -> Result<i32, HostCallInterrupted> {
    let _host = enter(&env)?;
    Ok(ERRNO_BADF)
}

fn fd_prestat_dir_name(
    env: FunctionEnvMut<WasiContext>,
    _fd: i32,
    _path: u32,
    _len: u32,
) -> Result<i32, HostCallInterrupted> {
    let _host = enter(&env)?;
    Ok(ERRNO_BADF)
}

fn sched_yield(env: FunctionEnvMut<WasiContext>) -> Result<i32, HostCallInterrupted> {
    let _host = enter(&env)?;
    Ok(ERRNO_SUCCESS)
}

fn proc_exit(_env: FunctionEnvMut<WasiContext>, code: u32) -> Result<(), ProcExit> {
    Err(ProcExit(code))
}

/// Fills the guest's buffer in place, a chunk at a time: checked against memory first, so a
/// bad pointer costs nothing, and stopped by the deadline, so a 4 GiB request costs at most
/// what the function's timeout allows.
fn random_get(
    mut env: FunctionEnvMut<WasiContext>,
    buffer: u32,
    length: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        check_range(view, buffer, u64::from(length))?;
        let mut chunk = vec![0u8; (length as usize).min(CHUNK_BYTES)];
        let mut filled = 0u32;
        while filled < length {
            context.check_deadline()?;
            let piece = &mut chunk[..(length - filled).min(CHUNK_BYTES as u32) as usize];
            getrandom::fill(piece).map_err(|_| ERRNO_IO)?;
            write_bytes(view, buffer + filled, piece)?;
            filled += piece.len() as u32;
        }
        Ok(ERRNO_SUCCESS)
    })
}

/// Nanoseconds on the monotonic clock: wall time when the process started plus the time
/// elapsed since, from `Instant`, so it never goes backwards within a process and reads
/// close to wall time (a value an init function froze into a snapshot stays plausible).
fn monotonic_nanos() -> u64 {
    static ORIGIN: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (started, wall) = ORIGIN.get_or_init(|| (Instant::now(), realtime_nanos()));
    wall.saturating_add(started.elapsed().as_nanos() as u64)
}

fn realtime_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

fn clock_time_get(
    mut env: FunctionEnvMut<WasiContext>,
    clock: i32,
    _precision: i64,
    time: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |context, view| {
        let nanos = match clock {
            0 => realtime_nanos(),
            1 => monotonic_nanos(),
            // Process and thread CPU time: a guest is one thread that has run since its
            // instance was made; the elapsed time is what it can have used, and monotonic.
            2 | 3 => context.created.elapsed().as_nanos() as u64,
            _ => return Err(ERRNO_INVAL.into()),
        };
        write_u64(view, time, nanos)?;
        Ok(ERRNO_SUCCESS)
    })
}

fn clock_res_get(
    mut env: FunctionEnvMut<WasiContext>,
    clock: i32,
    resolution: u32,
) -> Result<i32, HostCallInterrupted> {
    with_memory(&mut env, |_, view| {
        if !(0..=3).contains(&clock) {
            return Err(ERRNO_INVAL.into());
        }
        write_u64(view, resolution, 1_000)?;
        Ok(ERRNO_SUCCESS)
    })
}
