//! The registry's check of a pushed module, done the way nodes will prepare it: refuse at
//! push what no node could serve. The registry gets it as an `atoll_core::ModuleCheck`, so
//! the registry crate itself never links wasmer.

use atoll_core::{Manifest, ModuleCheck, ModuleRefusal};

use crate::engine::Engine;
use crate::error::IsolateError;
use crate::snapshot::preinitialize_named;

/// Compiles a pushed module, checks its memory against the manifest's limit and runs its
/// init export (if any) under that limit and the init deadline.
pub struct PushCheck {
    engine: Engine,
}

impl PushCheck {
    /// A check whose scratch engines are built like `engine`.
    pub fn new(engine: Engine) -> PushCheck {
        PushCheck { engine }
    }
}

impl std::fmt::Debug for PushCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushCheck").finish_non_exhaustive()
    }
}

impl ModuleCheck for PushCheck {
    fn check(&self, module: &[u8], manifest: &Manifest) -> Result<(), ModuleRefusal> {
        // A scratch engine, dropped with the compiled code once the push is checked: one
        // long-lived engine kept every pushed module's code mapped for ever.
        let engine = self
            .engine
            .scratch()
            .map_err(|e| ModuleRefusal::Failed(e.to_string()))?;
        let memory_limit = manifest.limits.memory_bytes();
        let init_env: Vec<(String, String)> = manifest
            .env
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        // The module must compile, fit its memory limit, and — if it has an init export —
        // initialise, exactly as nodes will prepare it.
        engine
            .validate_with_memory_limit(module, memory_limit)
            .and_then(|()| preinitialize_named(&engine, module, &manifest.name, &init_env, memory_limit))
            .map(drop)
            .map_err(|error| match error {
                IsolateError::Invalid(reason) => ModuleRefusal::Invalid(reason),
                other => ModuleRefusal::Failed(other.to_string()),
            })
    }
}
