//! The node's disk cache: what it serves, kept so it can serve again without the registry.
//!
//! ```text
//! DATA/node-state.json         last applied registry revision + deployments (atomic replace)
//! DATA/modules/<sha256>.wasm   module bytes, verified against their name on every read
//! DATA/artifacts/              compiled artifacts (atoll_isolate::ArtifactCache)
//! ```
//!
//! This is static stability: a node that restarts while the registry is down serves its last
//! known routes from here. Every file is written to a temporary name, fsynced and renamed,
//! so a crash never leaves a half-written file under a real name.

use std::fs;
use std::io;
use std::path::PathBuf;

use atoll_core::durable::{remove_stale_temporaries, write_atomically};

use atoll_core::Deployment;
use serde::{Deserialize, Serialize};

/// What the node last applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CachedState {
    pub revision: u64,
    pub deployments: Vec<Deployment>,
    /// Versions that failed to load, retried after a restart (absent in older files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<Deployment>,
}

#[derive(Debug, Clone)]
pub struct NodeCache {
    directory: PathBuf,
}

impl NodeCache {
    pub fn open(directory: impl Into<PathBuf>) -> io::Result<Self> {
        let directory = directory.into();
        fs::create_dir_all(directory.join("modules"))?;
        fs::create_dir_all(directory.join("artifacts"))?;
        remove_stale_temporaries(&directory)?;
        remove_stale_temporaries(&directory.join("modules"))?;
        Ok(NodeCache { directory })
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.directory.join("artifacts")
    }

    fn state_path(&self) -> PathBuf {
        self.directory.join("node-state.json")
    }

    /// Where the module with this digest lives; `None` unless `sha256` is one (64 lowercase
    /// hex digits). The digest comes from the registry or the store: a `../` in it must
    /// never name, read or delete a file outside the cache.
    fn module_path(&self, sha256: &str) -> Option<PathBuf> {
        atoll_core::digest::is_sha256_hex(sha256)
            .then(|| self.directory.join("modules").join(format!("{sha256}.wasm")))
    }

    pub fn load_state(&self) -> io::Result<Option<CachedState>> {
        match fs::read(self.state_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub fn save_state(&self, state: &CachedState) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        write_atomically(&self.state_path(), &bytes)
    }

    /// The cached module with this digest, if present and intact.
    pub fn read_module(&self, sha256: &str) -> Option<Vec<u8>> {
        let path = self.module_path(sha256)?;
        let bytes = fs::read(&path).ok()?;
        if atoll_core::digest::sha256_hex(&bytes) != sha256 {
            tracing::warn!(path = %path.display(), "cached module does not match its digest; discarding");
            let _ = fs::remove_file(&path);
            return None;
        }
        Some(bytes)
    }

    pub fn write_module(&self, sha256: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.module_path(sha256).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{}` is not a SHA-256", sha256.escape_debug()),
            )
        })?;
        write_atomically(&path, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_verified_on_read() {
        let directory = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(directory.path()).unwrap();
        let bytes = b"module bytes";
        let sha = atoll_core::digest::sha256_hex(bytes);
        cache.write_module(&sha, bytes).unwrap();
        assert_eq!(cache.read_module(&sha).unwrap(), bytes);

        fs::write(cache.module_path(&sha).unwrap(), b"tampered").unwrap();
        assert!(cache.read_module(&sha).is_none());
        assert!(!cache.module_path(&sha).unwrap().exists());
    }

    #[test]
    fn digests_that_are_not_sha256_name_no_file() {
        let directory = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(directory.path()).unwrap();
        // A file outside the module directory whose digest does not match its "name": a
        // traversal would read it, see the mismatch and delete it.
        let victim = directory.path().join("victim.wasm");
        fs::write(&victim, b"not yours").unwrap();
        for digest in [
            "../victim",
            "../../etc/passwd",
            "",
            "ABCDEF",
            &"a".repeat(63),
            &"g".repeat(64),
        ] {
            assert!(cache.read_module(digest).is_none(), "{digest:?}");
            let error = cache.write_module(digest, b"x").unwrap_err();
            assert!(error.to_string().contains("not a SHA-256"), "{error}");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"not yours");
        assert_eq!(fs::read_dir(directory.path().join("modules")).unwrap().count(), 0);
    }

    #[test]
    fn state_round_trips_and_starts_empty() {
        let directory = tempfile::tempdir().unwrap();
        let cache = NodeCache::open(directory.path()).unwrap();
        assert!(cache.load_state().unwrap().is_none());
        let state = CachedState {
            revision: 7,
            deployments: vec![],
            quarantined: vec![],
        };
        cache.save_state(&state).unwrap();
        assert_eq!(cache.load_state().unwrap().unwrap(), state);
    }
}
