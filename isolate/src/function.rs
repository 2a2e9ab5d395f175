//! A loaded function and one invocation of it.
//!
//! "Use and destroy": every request gets a fresh `Store` and `Instance`, runs `_start` as a
//! CGI program, and everything it touched is dropped with the store. Nothing one request
//! wrote can be seen by the next. The instance is created from a module compiled before
//! the function was routed (see the node's sync), so no request waits for a compiler.
//!
//! Invocations block the calling thread while the guest runs: callers on an async runtime
//! run them on a blocking pool so a slow guest never stalls I/O.

use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmer::{FunctionEnv, Instance, Module, Store};

use crate::cgi::{self, CgiError, CgiRequest, CgiResponse};
use crate::engine::Engine;
use crate::wasi::{self, ProcExit, WasiContext};

/// Per-function settings from its manifest.
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// The function's name, also `argv[0]`.
    pub name: String,
    /// The manifest's `[env]`.
    pub env: Vec<(String, String)>,
    /// Largest response (headers and body) the guest may write.
    pub max_response_bytes: usize,
    /// How much of the guest's stderr is kept for the log.
    pub max_log_bytes: usize,
}

impl FunctionConfig {
    pub fn new(name: impl Into<String>) -> Self {
        FunctionConfig {
            name: name.into(),
            env: Vec::new(),
            max_response_bytes: 64 * 1024 * 1024,
            max_log_bytes: 64 * 1024,
        }
    }
}

/// A compiled function, ready to serve.
#[derive(Clone)]
pub struct LoadedFunction {
    engine: Engine,
    module: Module,
    config: FunctionConfig,
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
    pub response: CgiResponse,
    pub log: Vec<u8>,
    /// Time from the start of instantiation until the instance was ready to run.
    pub start_time: Duration,
}

/// Why an invocation produced no response. Every variant maps to a 502 at the edge and
/// carries the guest's stderr for the node log.
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
}

impl InvokeError {
    /// The guest's stderr, if it ran.
    pub fn log(&self) -> &[u8] {
        match self {
            InvokeError::Instantiate { .. } => &[],
            InvokeError::Trap { log, .. }
            | InvokeError::Exit { log, .. }
            | InvokeError::MalformedOutput { log, .. }
            | InvokeError::ResponseTooLarge { log, .. } => log,
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
        }
    }
}

impl LoadedFunction {
    pub fn new(engine: Engine, module: Module, config: FunctionConfig) -> Self {
        LoadedFunction {
            engine,
            module,
            config,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Runs the function once for `request` in a fresh instance. Blocks while the guest runs.
    pub fn invoke(&self, request: &CgiRequest) -> Result<Invocation, InvokeError> {
        let started = Instant::now();
        let environment = cgi::environment(request, &self.config.env);
        let context = WasiContext::new(
            &[self.config.name.as_str()],
            &environment,
            request.body.clone(),
            self.config.max_response_bytes,
            self.config.max_log_bytes,
        );
        let mut store = Store::new(self.engine.wasmer().clone());
        let env = FunctionEnv::new(&mut store, context);
        let imports = wasi::imports(&mut store, &env, &self.module);
        let instance =
            Instance::new(&mut store, &self.module, &imports).map_err(|error| InvokeError::Instantiate {
                reason: error.to_string(),
            })?;
        let memory = instance
            .exports
            .get_memory("memory")
            .map_err(|error| InvokeError::Instantiate {
                reason: error.to_string(),
            })?
            .clone();
        env.as_mut(&mut store).set_memory(memory);
        let start = instance
            .exports
            .get_function("_start")
            .map_err(|error| InvokeError::Instantiate {
                reason: error.to_string(),
            })?
            .clone();
        let start_time = started.elapsed();

        let outcome = start.call(&mut store, &[]);
        let output = env.as_mut(&mut store).take_output();
        let log = output.stderr;
        if output.stdout_overflow {
            return Err(InvokeError::ResponseTooLarge {
                limit: self.config.max_response_bytes,
                log,
            });
        }
        if let Err(error) = outcome {
            match error.downcast::<ProcExit>() {
                Ok(ProcExit(0)) => {}
                Ok(ProcExit(code)) => return Err(InvokeError::Exit { code, log }),
                Err(error) => {
                    return Err(InvokeError::Trap {
                        reason: error.message(),
                        log,
                    });
                }
            }
        }
        match cgi::parse_response(Bytes::from(output.stdout)) {
            Ok(response) => Ok(Invocation {
                response,
                log,
                start_time,
            }),
            Err(source) => Err(InvokeError::MalformedOutput { source, log }),
        }
    }
}
