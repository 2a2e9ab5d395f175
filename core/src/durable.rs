//! Crash-safe file replacement, shared by every on-disk structure in Atoll (registry store,
//! node cache, artifact cache).
//!
//! `write_atomically` writes `PATH.tmp`, fsyncs it, renames it over `PATH` and fsyncs the
//! directory, so after a crash `PATH` holds either the old or the new contents — never a
//! prefix — and once it returns the new contents survive power loss. A crash can leave a
//! `*.tmp` behind; owners remove those on open. Callers serialise writes to one path.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temporary name used while `path` is being replaced.
pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replaces `path` with `bytes` durably and atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temporary = temporary_path(path);
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(directory)?.sync_all()
}

/// Removes the `*.tmp` files a crash left in `directory`; returns how many.
pub fn remove_stale_temporaries(directory: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(directory)? {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "tmp") && path.is_file() {
            tracing::warn!(path = %path.display(), "removing a temporary file left by a crash");
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_contents_and_leaves_no_temporary() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!temporary_path(&path).exists());
        assert_eq!(temporary_path(&path), directory.path().join("state.json.tmp"));
    }

    #[test]
    fn stale_temporaries_are_removed() {
        let directory = tempfile::tempdir().unwrap();
        fs::write(directory.path().join("a.json.tmp"), b"half").unwrap();
        fs::write(directory.path().join("keep.json"), b"whole").unwrap();
        assert_eq!(remove_stale_temporaries(directory.path()).unwrap(), 1);
        assert!(directory.path().join("keep.json").exists());
    }
}
