//! What a node prepares once per function version, kept on disk so a restart redoes nothing.
//!
//! Preparing a module means: pre-initialise it (run `wizer.initialize` / `atoll_init` once
//! and capture the state as a rewritten module, see [`crate::snapshot`]), compile the result,
//! and build its copy-on-write memory image ([`crate::cow_memory`]). Per version, under a key
//! of `<module sha256>-<init digest>-<engine fingerprint>` (the init digest covers what init
//! sees: the function's name, its memory limit and its environment):
//!
//! ```text
//! KEY.snapshot.wasm   the pre-initialised module (only when the module has an init export)
//! KEY.artifact        SHA-256 of the payload + wasmer's serialized module
//! ```
//!
//! The snapshot module is written before the artifact, and the artifact's presence is what
//! marks the version prepared, so a crash in between only means preparing again. The memory
//! image is rebuilt from the (snapshot) module's data segments on load: that costs a copy of
//! the image, once per version and process, not a compile or an init run. They are written to a temporary file,
//! fsynced and renamed, so a crash never leaves a half-written artifact under the real
//! name; on load the checksum is verified before wasmer sees a byte, and a file that fails
//! it (or fails to deserialize) is deleted and recompiled.
//!
//! Wasmer frees a module's code only with the engine that compiled or deserialized it, so
//! the caller passes the engine the version will run on, one per version
//! ([`Engine::scratch`], about a millisecond): a replaced version's code goes with it. On one
//! engine for the process, a node grew by a few memory mappings per version it ever loaded.
//! The init run's compiles use a scratch engine of their own, dropped right after. Scratch
//! engines of one configuration share a fingerprint, hence artifacts.
//!
//! Loading is the crate's one `unsafe` call outside memory mapping: wasmer's
//! `Module::deserialize` trusts its input to be an artifact it produced. The checksum and the
//! fingerprint in the name make that true for every file this module accepts.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmer::Module;

use crate::cow_memory::MemoryImage;
use crate::engine::{Engine, check_interface};
use crate::error::IsolateError;
use crate::snapshot::{self, Preinit};

/// How a module came to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadKind {
    /// Deserialized from the on-disk cache.
    Cached,
    /// Compiled now (and written to the cache).
    Compiled,
}

impl LoadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadKind::Cached => "cached",
            LoadKind::Compiled => "compile",
        }
    }
}

/// A module ready to instantiate: compiled, pre-initialised, with its memory image.
#[derive(Clone)]
pub struct PreparedModule {
    pub module: Module,
    /// The initial memory image, mapped copy-on-write into every instance; `None` when the
    /// module's memory cannot be expressed as one (then wasmer copies data segments).
    pub image: Option<Arc<MemoryImage>>,
    pub kind: LoadKind,
    /// Whether an init export ran (the module is the pre-initialised rewrite).
    pub preinitialized: bool,
}

impl std::fmt::Debug for PreparedModule {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PreparedModule")
            .field("kind", &self.kind)
            .field("image_bytes", &self.image.as_ref().map(|image| image.len()))
            .field("preinitialized", &self.preinitialized)
            .finish()
    }
}

/// A directory of compiled artifacts, for engines configured like the one it was opened with.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    directory: PathBuf,
    engine: Engine,
}

impl ArtifactCache {
    pub fn open(directory: impl Into<PathBuf>, engine: Engine) -> Result<Self, IsolateError> {
        let directory = directory.into();
        fs::create_dir_all(&directory)?;
        atoll_core::durable::remove_stale_temporaries(&directory)?;
        Ok(ArtifactCache { directory, engine })
    }

    /// The engine this cache was opened with: what per-version engines are made from
    /// ([`Engine::scratch`]).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn prepared_key(
        engine: &Engine,
        sha256: &str,
        name: &str,
        init_env: &[(String, String)],
        max_memory_bytes: u64,
    ) -> String {
        let mut digest = Sha256::new();
        digest.update(name.as_bytes());
        digest.update(max_memory_bytes.to_le_bytes());
        for (key, value) in init_env {
            digest.update([0]);
            digest.update(key.as_bytes());
            digest.update([0]);
            digest.update(value.as_bytes());
        }
        let env_digest = hex::encode(&digest.finalize()[..8]);
        format!("{sha256}-{env_digest}-{}", engine.fingerprint())
    }

    /// The prepared form of `wasm` (hex SHA-256 `sha256`) for function `name` whose init
    /// runs with `init_env` under a memory limit of `max_memory_bytes`: from disk when it was
    /// prepared before, otherwise prepared now and stored. Blocking and CPU-heavy on a miss.
    /// `sha256` names files, so anything but 64 lowercase hex digits is refused.
    ///
    /// The module is compiled or deserialized on `engine`, which keeps its code for as long
    /// as the engine lives: run the module on `engine` (a wasmer module only runs on the
    /// engine that made it), and give every version that may be dropped an engine of its
    /// own ([`Engine::scratch`]) so its code goes with it.
    pub fn load_or_prepare(
        &self,
        engine: &Engine,
        sha256: &str,
        wasm: &[u8],
        name: &str,
        init_env: &[(String, String)],
        max_memory_bytes: u64,
    ) -> Result<PreparedModule, IsolateError> {
        atoll_core::digest::check_sha256_hex(sha256).map_err(IsolateError::Invalid)?;
        let key = ArtifactCache::prepared_key(engine, sha256, name, init_env, max_memory_bytes);
        let artifact_path = self.directory.join(format!("{key}.artifact"));
        let snapshot_path = self.directory.join(format!("{key}.snapshot.wasm"));
        if let Some(module) = ArtifactCache::load(engine, &artifact_path) {
            let snapshot = fs::read(&snapshot_path).ok();
            let preinitialized = snapshot.is_some();
            let image = memory_image(snapshot.as_deref().unwrap_or(wasm));
            return Ok(PreparedModule {
                module,
                image,
                kind: LoadKind::Cached,
                preinitialized,
            });
        }
        // The init run compiles the module two or three times; none of that code is needed
        // afterwards, so it goes with this engine.
        let preinit_engine = engine.scratch()?;
        let (final_wasm, preinitialized) =
            match snapshot::preinitialize_named(&preinit_engine, wasm, name, init_env, max_memory_bytes)? {
                Preinit::Unchanged => {
                    let _ = fs::remove_file(&snapshot_path);
                    (std::borrow::Cow::Borrowed(wasm), false)
                }
                Preinit::Rewritten { wasm: rewritten, .. } => {
                    atoll_core::durable::write_atomically(&snapshot_path, &rewritten)?;
                    (std::borrow::Cow::Owned(rewritten), true)
                }
            };
        drop(preinit_engine);
        let module = engine.compile(&final_wasm)?;
        let serialized = module
            .serialize()
            .map_err(|error| IsolateError::Engine(format!("serialize: {error}")))?;
        write_artifact(&artifact_path, &serialized)?;
        Ok(PreparedModule {
            module,
            image: memory_image(&final_wasm),
            kind: LoadKind::Compiled,
            preinitialized,
        })
    }

    fn load(engine: &Engine, path: &Path) -> Option<Module> {
        let contents = fs::read(path).ok()?;
        let valid = contents.len() > 32 && Sha256::digest(&contents[32..])[..] == contents[..32];
        if !valid {
            tracing::warn!(path = %path.display(), "discarding corrupt artifact");
            let _ = fs::remove_file(path);
            return None;
        }
        match deserialize(engine, &contents[32..]) {
            Ok(module) if check_interface(&module).is_ok() => Some(module),
            Ok(_) | Err(_) => {
                tracing::warn!(path = %path.display(), "discarding unusable artifact");
                let _ = fs::remove_file(path);
                None
            }
        }
    }
}

/// The copy-on-write image of `wasm`'s memory, or `None` (stock data-segment copies).
fn memory_image(wasm: &[u8]) -> Option<Arc<MemoryImage>> {
    match MemoryImage::from_wasm(wasm) {
        Ok(image) => image,
        Err(error) => {
            tracing::warn!(%error, "no copy-on-write memory image; instances copy data segments");
            None
        }
    }
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, payload: &[u8]) -> Result<Module, wasmer::DeserializeError> {
    // SAFETY: `payload` passed its SHA-256 check, so it is byte for byte what
    // `Module::serialize` wrote for an engine with this fingerprint (wasmer version,
    // compiler, target and CPU features are all in the file name).
    unsafe { Module::deserialize(engine.wasmer(), payload) }
}

fn write_artifact(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    let mut contents = Vec::with_capacity(32 + payload.len());
    contents.extend_from_slice(&Sha256::digest(payload));
    contents.extend_from_slice(payload);
    atoll_core::durable::write_atomically(path, &contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
        (memory (export "memory") 1)
        (func (export "_start")))"#;

    /// A module whose init export runs on prepare; `seed` makes each one a new module.
    fn preinitialized_module(seed: u32) -> Vec<u8> {
        wasmer::wat2wasm(
            format!(
                r#"(module
                  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
                  (memory (export "memory") 1)
                  (global $seed (mut i32) (i32.const 0))
                  (func (export "atoll_init")
                    (global.set $seed (i32.const {seed}))
                    (i32.store (i32.const 64) (i32.const {seed})))
                  (func (export "_start")))"#
            )
            .as_bytes(),
        )
        .unwrap()
        .into_owned()
    }

    fn memory_mappings() -> usize {
        fs::read_to_string("/proc/self/maps").unwrap().lines().count()
    }

    #[test]
    fn the_init_runs_compiles_do_not_stay_on_the_versions_engine() {
        let directory = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(directory.path(), Engine::new().unwrap()).unwrap();
        let engine = cache.engine().scratch().unwrap();
        let prepare = |seed| {
            let wasm = preinitialized_module(seed);
            let sha256 = atoll_core::digest::sha256_hex(&wasm);
            let prepared = cache
                .load_or_prepare(&engine, &sha256, &wasm, "seeded", &[], 64 << 20)
                .unwrap();
            assert!(prepared.preinitialized && prepared.kind == LoadKind::Compiled);
        };
        prepare(0);
        let before = memory_mappings();
        const MODULES: u32 = 20;
        for seed in 1..=MODULES {
            prepare(seed);
        }
        // The version's own compile leaves two or three mappings on its engine; with the
        // init run's compiles (the module, its instrumented copy, the rewrite) on it too,
        // eight or so.
        let growth = memory_mappings().saturating_sub(before) as u32;
        assert!(
            growth < 4 * MODULES,
            "{growth} more memory mappings on one engine after preparing {MODULES} modules"
        );
    }

    #[test]
    fn second_load_comes_from_disk_and_corruption_recompiles() {
        let directory = tempfile::tempdir().unwrap();
        let engine = Engine::new().unwrap();
        let cache = ArtifactCache::open(directory.path(), engine.clone()).unwrap();
        let wasm = wasmer::wat2wasm(HELLO.as_bytes()).unwrap().to_vec();
        let prepare = || {
            cache
                .load_or_prepare(
                    &engine,
                    &atoll_core::digest::sha256_hex(&wasm),
                    &wasm,
                    "hello",
                    &[],
                    64 << 20,
                )
                .unwrap()
                .kind
        };
        assert_eq!(prepare(), LoadKind::Compiled);
        let artifacts: Vec<_> = fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "artifact"))
            .collect();
        assert_eq!(artifacts.len(), 1, "{artifacts:?}");
        assert_eq!(prepare(), LoadKind::Cached);

        let path = &artifacts[0];
        let mut bytes = fs::read(path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(path, bytes).unwrap();
        let kind = prepare();
        assert_eq!(kind, LoadKind::Compiled);
    }
}
