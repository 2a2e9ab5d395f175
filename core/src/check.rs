//! What a registry asks of a pushed module before it stores it: that every node could
//! serve it. The registry does not compile WebAssembly itself (it would link wasmer and
//! cranelift into `atoll dns` and every tool built on the registry); the binary passes in a
//! [`ModuleCheck`] (atoll-isolate's `PushCheck`, which compiles the module and runs its init
//! exactly as nodes will).

use crate::manifest::Manifest;

/// Proves that `module`, deployed with `manifest`, is servable. Implementations block
/// (compile, run init under the manifest's limits): callers run them on a blocking thread.
pub trait ModuleCheck: Send + Sync + 'static {
    /// `Ok` when every node could prepare and serve the module.
    fn check(&self, module: &[u8], manifest: &Manifest) -> Result<(), ModuleRefusal>;
}

/// Why a module was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleRefusal {
    /// The module itself is at fault (does not compile, is not a WASI command, breaks its
    /// limits in init): the pusher's error, answered with 422.
    #[error("invalid module: {0}")]
    Invalid(String),
    /// The checker failed for another reason (an engine that cannot be built): 500.
    #[error("engine: {0}")]
    Failed(String),
}
