//! The registry's API token: one shared bearer secret, the simplest thing that keeps a
//! registry on a public address from taking pushes from strangers.
//!
//! Where it comes from, in order: `ATOLL_TOKEN` (when set and non-empty), the file
//! `DATA/token`, or a fresh random one (32 bytes from the OS, hex) written to `DATA/token`
//! with mode 0600 — atomically (temp file, fsync, rename, fsync dir), so a crash never
//! leaves a half-written token that would lock every client out. The caller may print
//! where the token is; nothing here ever logs the token itself.
//!
//! Checking compares SHA-256 digests of the expected and presented tokens in constant
//! time, so neither the content nor the length of the secret leaks through timing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use atoll_core::auth::generate_secret;

/// Environment variable that overrides the token file.
pub const TOKEN_ENV: &str = "ATOLL_TOKEN";
/// File name of the token inside the data directory.
pub const TOKEN_FILE: &str = "token";

/// Where the token came from (so the binary can tell the user where to find it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    /// From `ATOLL_TOKEN`.
    Env,
    /// Read from an existing token file.
    File(PathBuf),
    /// Generated now and written to this file.
    Generated(PathBuf),
}

/// Returns the registry's token: `ATOLL_TOKEN` if set and non-empty, else `DIR/token`,
/// else a new random token saved to `DIR/token` (mode 0600). Creates `data_dir` if needed.
pub fn load_or_create(data_dir: &Path) -> io::Result<(String, TokenOrigin)> {
    let from_env = std::env::var(TOKEN_ENV).ok();
    load_or_create_with(data_dir, from_env)
}

/// [`load_or_create`] with the environment value passed in (`None` = unset).
pub fn load_or_create_with(data_dir: &Path, from_env: Option<String>) -> io::Result<(String, TokenOrigin)> {
    if let Some(token) = from_env.map(|t| t.trim().to_owned())
        && !token.is_empty()
    {
        return Ok((token, TokenOrigin::Env));
    }
    let path = data_dir.join(TOKEN_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim();
            if token.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "token file {} is empty; delete it to generate a new token",
                        path.display()
                    ),
                ));
            }
            return Ok((token.to_owned(), TokenOrigin::File(path)));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::create_dir_all(data_dir)?;
    let token = generate_secret()?;
    write_private(&path, token.as_bytes())?;
    Ok((token, TokenOrigin::Generated(path)))
}

/// Writes `contents` to `path` with mode 0600, atomically.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (token, origin) = load_or_create_with(&data, None).unwrap();
        let path = data.join("token");
        assert_eq!(origin, TokenOrigin::Generated(path.clone()));
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!data.join("token.tmp").exists());

        let (again, origin) = load_or_create_with(&data, Some(String::new())).unwrap();
        assert_eq!(again, token);
        assert_eq!(origin, TokenOrigin::File(path));
    }

    #[test]
    fn env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (token, origin) = load_or_create_with(dir.path(), Some("s3cret".into())).unwrap();
        assert_eq!((token.as_str(), origin), ("s3cret", TokenOrigin::Env));
        assert!(!dir.path().join("token").exists());
    }

    #[test]
    fn empty_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("token"), "\n").unwrap();
        assert!(load_or_create_with(dir.path(), None).is_err());
    }

    #[test]
    fn generated_tokens_differ() {
        assert_ne!(generate_secret().unwrap(), generate_secret().unwrap());
    }
}
