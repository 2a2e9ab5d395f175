//! A loaded function and one invocation of it.
//!
//! "Use and destroy": every request runs in a fresh instance, and everything it touched is
//! dropped with its store, so nothing one request wrote is seen by the next. Creating the
//! instance is split from running it — [`LoadedFunction::prepare`] makes a
//! [`ReadyInstance`] (store, imports, instance) before any request is known, and
//! [`ReadyInstance::run`] hands it the request and runs `_start` — so a pool can keep
//! instances ready ahead of requests (see `pool`).
//!
//! Running blocks the calling thread while the guest runs: callers on an async runtime use a
//! blocking pool so a slow guest never stalls I/O. A run can be stopped from another thread
//! through its [`InterruptHandle`] (wasmer's host interrupt), which is how timeouts work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmer::{Function, FunctionEnv, Instance, Module, Store};

use crate::artifact_cache::PreparedModule;
use crate::cgi::{self, CgiError, CgiRequest, CgiResponse};
use crate::cow_memory::{self, MemoryImage, MemoryPlan};
use crate::engine::Engine;
use crate::stream::StreamingOutput;
use crate::wasi::{self, ProcExit, RunSignals, StreamFailure, WasiContext};

/// Per-function settings from its manifest.
#[derive(Clone)]
pub struct FunctionConfig {
    /// The function's name, also `argv[0]`.
    pub name: String,
    /// The manifest's `[env]`.
    pub env: Vec<(String, String)>,
    /// Largest response (headers and body) the guest may write.
    pub max_response_bytes: usize,
    /// How much of the guest's stderr is kept for the log.
    pub max_log_bytes: usize,
    /// Largest linear memory, in bytes (`[limits] memory`).
    pub max_memory_bytes: u64,
    /// Wall-clock limit per request (`[limits] timeout`), enforced by the caller through
    /// [`InterruptHandle`].
    pub timeout: Duration,
    /// What the function may call outbound (`[outbound]`) and the node's client; `None`
    /// refuses every call.
    pub outbound: Option<Arc<crate::wasi_http::OutboundAccess>>,
    /// The key-value stores the function may use (`[kv]`) and the node's backend; `None`
    /// refuses every call.
    pub kv: Option<Arc<crate::wasi_kv::KvAccess>>,
}

/// The environment by name only: it holds the function's secrets.
impl std::fmt::Debug for FunctionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionConfig")
            .field("name", &self.name)
            .field("env", &self.env.iter().map(|(key, _)| key).collect::<Vec<_>>())
            .field("max_response_bytes", &self.max_response_bytes)
            .field("max_log_bytes", &self.max_log_bytes)
            .field("max_memory_bytes", &self.max_memory_bytes)
            .field("timeout", &self.timeout)
            .field("outbound", &self.outbound.is_some())
            .field("kv", &self.kv.is_some())
            .finish()
    }
}

impl FunctionConfig {
    pub fn new(name: impl Into<String>) -> Self {
        FunctionConfig {
            name: name.into(),
            env: Vec::new(),
            max_response_bytes: 32 * 1024 * 1024,
            max_log_bytes: 64 * 1024,
            max_memory_bytes: 128 * 1024 * 1024,
            timeout: Duration::from_secs(30),
            outbound: None,
            kv: None,
        }
    }
}

/// A compiled function, ready to serve.
#[derive(Clone)]
pub struct LoadedFunction {
    engine: Engine,
    module: Module,
    import_plan: Arc<[wasi::HostImport]>,
    memory_plan: MemoryPlan,
    config: Arc<FunctionConfig>,
    /// Whether instantiation runs guest code (a `(start)` section).
    has_start_function: bool,
}

impl std::fmt::Debug for LoadedFunction {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LoadedFunction")
            .field("name", &self.config.name)
            .finish()
    }
}

/// A successful invocation: the response and what the guest logged.
#[derive(Debug)]
pub struct Invocation {
    /// The whole response; an empty placeholder for a streamed one (`streamed` is set),
    /// whose head and body went out through the stream.
    pub response: CgiResponse,
    /// Body bytes streamed, when the response was streamed.
    pub streamed: Option<u64>,
    pub log: Vec<u8>,
    /// Time to create the instance (zero when it was prepared ahead of the request).
    pub start_time: Duration,
    /// Time `_start` ran.
    pub run_time: Duration,
}

/// Why an invocation produced no response. Every variant carries the guest's stderr (when
/// it ran) for the node log.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("instantiation failed: {reason}")]
    Instantiate { reason: String },
    #[error("guest trapped: {reason}")]
    Trap { reason: String, log: Vec<u8> },
    #[error("guest exited with status {code}")]
    Exit { code: u32, log: Vec<u8> },
    #[error("malformed CGI output: {source}")]
    MalformedOutput { source: CgiError, log: Vec<u8> },
    #[error("response is over the {limit}-byte limit")]
    ResponseTooLarge { limit: usize, log: Vec<u8> },
    #[error("stopped after the {limit:?} timeout")]
    Timeout { limit: Duration, log: Vec<u8> },
    #[error("the client went away while the response was streamed")]
    ClientGone { log: Vec<u8> },
}

impl InvokeError {
    /// The guest's stderr, if it ran.
    pub fn log(&self) -> &[u8] {
        match self {
            InvokeError::Instantiate { .. } => &[],
            InvokeError::Trap { log, .. }
            | InvokeError::Exit { log, .. }
            | InvokeError::MalformedOutput { log, .. }
            | InvokeError::ResponseTooLarge { log, .. }
            | InvokeError::Timeout { log, .. }
            | InvokeError::ClientGone { log } => log,
        }
    }

    /// A short label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            InvokeError::Instantiate { .. } => "instantiate_error",
            InvokeError::Trap { .. } => "trap",
            InvokeError::Exit { .. } => "exit",
            InvokeError::MalformedOutput { .. } => "malformed_output",
            InvokeError::ResponseTooLarge { .. } => "response_too_large",
            InvokeError::Timeout { .. } => "timeout",
            InvokeError::ClientGone { .. } => "client_gone",
        }
    }
}

/// A guest's stderr as one line of text for the node's log: line breaks, other control
/// characters, bidi overrides and backslashes are escaped (`\n`, `\u{1b}`, `\\`), so a
/// guest cannot forge log lines or hide text, and trailing whitespace is dropped.
pub fn printable_log(log: &[u8]) -> String {
    let text = String::from_utf8_lossy(log);
    let text = text.trim_end();
    let mut printable = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '\\' => printable.push_str("\\\\"),
            '\n' => printable.push_str("\\n"),
            '\r' => printable.push_str("\\r"),
            '\t' => printable.push('\t'),
            character
                if character.is_control()
                    || matches!(character, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                printable.extend(character.escape_unicode());
            }
            character => printable.push(character),
        }
    }
    printable
}

/// Stops a running instance from another thread.
#[derive(Clone)]
pub struct InterruptHandle {
    interrupter: wasmer::Interrupter,
    signals: Arc<RunSignals>,
}

impl std::fmt::Debug for InterruptHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("InterruptHandle")
            .field("fired", &self.signals.fired())
            .finish()
    }
}

impl InterruptHandle {
    /// Asks the running guest to stop; its run then ends with [`InvokeError::Timeout`].
    /// If the guest is not running yet the request may be missed: call again until the run
    /// has returned.
    pub fn interrupt(&self) {
        self.signals.stop(&self.interrupter);
    }
}

/// An instance created ahead of its request.
pub struct ReadyInstance {
    store: Store,
    env: FunctionEnv<WasiContext>,
    start: Function,
    config: Arc<FunctionConfig>,
    start_time: Duration,
    signals: Arc<RunSignals>,
}

// SAFETY: wasmer 7's `Store` is not `Send` only because it holds raw pointers into its own
// heap objects (instances, memories, tables, globals) and an optional `on_called` hook that
// is not `Send`. A `ReadyInstance` owns its store outright: nothing else holds a pointer
// into it, no `on_called` hook is ever installed, and its environment (`WasiContext`) is
// `Send`. Moving the whole store to another thread between calls is therefore a move of
// owned memory, like wasmtime's `Store<T: Send>`. wasmer's thread-local state (trap
// handling, the interrupt registry) is only used while a call runs, and a call starts and
// ends on one thread. This lets a pool prepare instances on one thread and run them on
// another.
#[allow(unsafe_code)]
unsafe impl Send for ReadyInstance {}

impl std::fmt::Debug for ReadyInstance {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ReadyInstance")
            .field("function", &self.config.name)
            .finish()
    }
}

impl LoadedFunction {
    /// A function whose instances copy the module's data segments (stock wasmer), with the
    /// memory limit enforced.
    pub fn new(engine: Engine, module: Module, config: FunctionConfig) -> Self {
        LoadedFunction::with_image(engine, module, None, config)
    }

    /// A function whose instances map `image` (built from the same module bytes that
    /// `module` was compiled from) copy-on-write.
    pub fn with_image(
        engine: Engine,
        module: Module,
        image: Option<Arc<MemoryImage>>,
        config: FunctionConfig,
    ) -> Self {
        let memory_plan = MemoryPlan {
            image,
            max_bytes: Some(config.max_memory_bytes),
        };
        LoadedFunction {
            engine,
            has_start_function: module.info().start_function.is_some(),
            import_plan: wasi::import_plan(&module).into(),
            module,
            memory_plan,
            config: Arc::new(config),
        }
    }

    /// A function from a prepared (pre-initialised, compiled, imaged) module.
    pub fn from_prepared(engine: Engine, prepared: PreparedModule, config: FunctionConfig) -> Self {
        LoadedFunction::with_image(engine, prepared.module, prepared.image, config)
    }

    /// Whether instances map a copy-on-write memory image.
    pub fn has_memory_image(&self) -> bool {
        self.memory_plan.image.is_some()
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &FunctionConfig {
        &self.config
    }

    /// Creates an instance ahead of its request. A `(start)` function runs in here: it runs
    /// under the function's timeout (see [`crate::deadline`]), so a looping one costs one
    /// bounded run and ends in [`InvokeError::Timeout`].
    pub fn prepare(&self) -> Result<ReadyInstance, InvokeError> {
        self.prepare_with(|store, signals| {
            self.has_start_function
                .then(|| crate::deadline::arm(store.interrupter(), self.config.timeout, Arc::clone(signals)))
        })
    }

    /// Creates an instance for a request that is waiting: `arm` receives the instance's
    /// interrupt handle before any guest code (a `(start)` function) runs, so the request's
    /// own timeout can stop it.
    pub fn prepare_for_request(
        &self,
        arm: impl FnOnce(InterruptHandle),
    ) -> Result<ReadyInstance, InvokeError> {
        self.prepare_with(|store, signals| {
            arm(InterruptHandle {
                interrupter: store.interrupter(),
                signals: Arc::clone(signals),
            });
            None
        })
    }

    fn prepare_with(
        &self,
        arm: impl FnOnce(&Store, &Arc<RunSignals>) -> Option<crate::deadline::DeadlineGuard>,
    ) -> Result<ReadyInstance, InvokeError> {
        let started = Instant::now();
        let signals = Arc::new(RunSignals::default());
        let context = WasiContext::new(
            &[self.config.name.as_str()],
            &[],
            Bytes::new(),
            self.config.max_response_bytes,
            self.config.max_log_bytes,
        )
        .with_signals(Arc::clone(&signals));
        let mut context = context;
        context.set_outbound(self.config.outbound.clone());
        context.set_kv(self.config.kv.clone());
        let mut store = Store::new(self.engine.wasmer().clone());
        let env = FunctionEnv::new(&mut store, context);
        let externs = wasi::externs(&mut store, &env, &self.import_plan);
        let instantiate_error = |error: &dyn std::fmt::Display| InvokeError::Instantiate {
            reason: error.to_string(),
        };
        let deadline = arm(&store, &signals);
        let instantiated = cow_memory::instantiate_with(&self.memory_plan, || {
            Instance::new_by_index(&mut store, &self.module, &externs).map_err(Box::new)
        });
        drop(deadline);
        let instance = match instantiated {
            Ok(instance) => instance,
            Err(error) if signals.fired() => {
                tracing::debug!(function = %self.config.name, %error, "start function interrupted");
                return Err(InvokeError::Timeout {
                    limit: self.config.timeout,
                    log: env.as_mut(&mut store).take_output().stderr,
                });
            }
            Err(error) => return Err(instantiate_error(&error)),
        };
        let memory = instance
            .exports
            .get_memory("memory")
            .map_err(|e| instantiate_error(&e))?
            .clone();
        env.as_mut(&mut store).set_memory(memory);
        let start = instance
            .exports
            .get_function("_start")
            .map_err(|e| instantiate_error(&e))?
            .clone();
        Ok(ReadyInstance {
            store,
            env,
            start,
            config: Arc::clone(&self.config),
            start_time: started.elapsed(),
            signals,
        })
    }

    /// Runs the function once for `request` in a fresh instance. Blocks while the guest runs.
    pub fn invoke(&self, request: &CgiRequest) -> Result<Invocation, InvokeError> {
        let ready = self.prepare()?;
        let start_time = ready.start_time;
        let mut invocation = ready.run(request)?;
        invocation.start_time = start_time;
        Ok(invocation)
    }
}

impl ReadyInstance {
    /// How long creating this instance took.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    pub fn interrupt_handle(&self) -> InterruptHandle {
        InterruptHandle {
            interrupter: self.store.interrupter(),
            signals: Arc::clone(&self.signals),
        }
    }

    /// Runs `_start` for `request`. Blocks while the guest runs; consumes the instance.
    pub fn run(self, request: &CgiRequest) -> Result<Invocation, InvokeError> {
        self.run_streaming(request, None)
    }

    /// Runs `_start` for `request`, streaming the response through `streaming` once the
    /// guest's output passes its threshold (see [`crate::stream`]). Blocks while the guest
    /// runs; consumes the instance. A run that fails after its head was streamed aborts
    /// the body and still returns its error.
    pub fn run_streaming(
        mut self,
        request: &CgiRequest,
        streaming: Option<StreamingOutput>,
    ) -> Result<Invocation, InvokeError> {
        let environment = cgi::environment(request, &self.config.env);
        let context = self.env.as_mut(&mut self.store);
        context.set_input(&environment, request.body.clone());
        context.set_streaming(streaming);
        let started = Instant::now();
        let own_deadline = started + self.config.timeout;
        context.http.set_deadline(
            request
                .deadline
                .map_or(own_deadline, |earlier| earlier.min(own_deadline)),
        );
        context.http.set_depth(request.service_depth);
        let outcome = self.start.call(&mut self.store, &[]);
        let run_time = started.elapsed();
        let output = self.env.as_mut(&mut self.store).take_output();
        let log = output.stderr;
        if output.stdout_overflow {
            return Err(InvokeError::ResponseTooLarge {
                limit: self.config.max_response_bytes,
                log,
            });
        }
        match output.stream_failure {
            Some(StreamFailure::Malformed(source)) => {
                return Err(InvokeError::MalformedOutput { source, log });
            }
            Some(StreamFailure::ClientGone) => return Err(InvokeError::ClientGone { log }),
            None => {}
        }
        if let Err(error) = outcome {
            match error.downcast::<ProcExit>() {
                Ok(ProcExit(0)) => {}
                Ok(ProcExit(code)) => return Err(InvokeError::Exit { code, log }),
                Err(_) if self.signals.fired() => {
                    return Err(InvokeError::Timeout {
                        limit: self.config.timeout,
                        log,
                    });
                }
                Err(error) => {
                    return Err(InvokeError::Trap {
                        reason: error.message(),
                        log,
                    });
                }
            }
        }
        if let Some(writer) = output.body_writer {
            let streamed = writer.sent();
            writer.finish();
            return Ok(Invocation {
                response: CgiResponse {
                    status: http::StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    body: Bytes::new(),
                },
                streamed: Some(streamed),
                log,
                start_time: Duration::ZERO,
                run_time,
            });
        }
        match cgi::parse_response(Bytes::from(output.stdout)) {
            Ok(response) => Ok(Invocation {
                response,
                streamed: None,
                log,
                start_time: Duration::ZERO,
                run_time,
            }),
            Err(source) => Err(InvokeError::MalformedOutput { source, log }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::printable_log;

    #[test]
    fn guest_logs_cannot_forge_lines() {
        let forged = b"hello\n2026-11-30T00:00:00Z  INFO atoll: admin logged in\r\x1b[2J\\n\xe2\x80\xae\n\n";
        let printed = printable_log(forged);
        assert!(!printed.contains(['\n', '\r', '\u{1b}', '\u{202e}']), "{printed}");
        assert_eq!(
            printed,
            "hello\\n2026-11-30T00:00:00Z  INFO atoll: admin logged in\\r\\u{1b}[2J\\\\n\\u{202e}"
        );
        assert_eq!(printable_log(b"caf\xc3\xa9\ttab"), "caf\u{e9}\ttab");
    }
}
