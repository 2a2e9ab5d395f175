//! Compiled artifacts on disk, so a node restart does not recompile.
//!
//! Files are named `<module sha256>-<engine fingerprint>.artifact` and hold a SHA-256 of the
//! payload followed by wasmer's serialized module. They are written to a temporary file,
//! fsynced and renamed, so a crash never leaves a half-written artifact under the real
//! name; on load the checksum is verified before wasmer sees a byte, and a file that fails
//! it (or fails to deserialize) is deleted and recompiled.
//!
//! Loading is the crate's one `unsafe` call outside memory mapping: wasmer's
//! `Module::deserialize` trusts its input to be an artifact it produced. The checksum and the
//! fingerprint in the name make that true for every file this module accepts.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmer::Module;

use crate::engine::{Engine, check_interface};
use crate::error::IsolateError;

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

/// A directory of compiled artifacts for one engine.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    directory: PathBuf,
    engine: Engine,
}

impl ArtifactCache {
    pub fn open(directory: impl Into<PathBuf>, engine: Engine) -> Result<Self, IsolateError> {
        let directory = directory.into();
        fs::create_dir_all(&directory)?;
        crate::durable::remove_stale_temporaries(&directory)?;
        Ok(ArtifactCache { directory, engine })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn path_for(&self, sha256: &str) -> PathBuf {
        self.directory
            .join(format!("{sha256}-{}.artifact", self.engine.fingerprint()))
    }

    /// The compiled module for `wasm` (whose hex SHA-256 is `sha256`): from the cache when a
    /// valid artifact is there, otherwise compiled and stored.
    pub fn load_or_compile(&self, sha256: &str, wasm: &[u8]) -> Result<(Module, LoadKind), IsolateError> {
        let path = self.path_for(sha256);
        if let Some(module) = self.load(&path) {
            return Ok((module, LoadKind::Cached));
        }
        let module = self.engine.compile(wasm)?;
        let serialized = module
            .serialize()
            .map_err(|error| IsolateError::Engine(format!("serialize: {error}")))?;
        write_artifact(&path, &serialized)?;
        Ok((module, LoadKind::Compiled))
    }

    /// Whether a valid-looking artifact for `sha256` is on disk.
    pub fn contains(&self, sha256: &str) -> bool {
        self.path_for(sha256).exists()
    }

    fn load(&self, path: &Path) -> Option<Module> {
        let contents = fs::read(path).ok()?;
        let valid = contents.len() > 32 && Sha256::digest(&contents[32..])[..] == contents[..32];
        if !valid {
            tracing::warn!(path = %path.display(), "discarding corrupt artifact");
            let _ = fs::remove_file(path);
            return None;
        }
        match deserialize(&self.engine, &contents[32..]) {
            Ok(module) if check_interface(&module).is_ok() => Some(module),
            Ok(_) | Err(_) => {
                tracing::warn!(path = %path.display(), "discarding unusable artifact");
                let _ = fs::remove_file(path);
                None
            }
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
    crate::durable::write_atomically(path, &contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
        (memory (export "memory") 1)
        (func (export "_start")))"#;

    #[test]
    fn second_load_comes_from_disk_and_corruption_recompiles() {
        let directory = tempfile::tempdir().unwrap();
        let engine = Engine::new().unwrap();
        let cache = ArtifactCache::open(directory.path(), engine).unwrap();
        let wasm = wasmer::wat2wasm(HELLO.as_bytes()).unwrap().to_vec();
        let (_, kind) = cache.load_or_compile("abc", &wasm).unwrap();
        assert_eq!(kind, LoadKind::Compiled);
        assert!(cache.contains("abc"));
        let (_, kind) = cache.load_or_compile("abc", &wasm).unwrap();
        assert_eq!(kind, LoadKind::Cached);

        let path = cache.path_for("abc");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let (_, kind) = cache.load_or_compile("abc", &wasm).unwrap();
        assert_eq!(kind, LoadKind::Compiled);
    }
}
