//! Secrets: values a function reads as environment variables that nobody reads back.
//!
//! The registry seals each value with the operator's key (ChaCha20-Poly1305 from `ring`,
//! a fresh random nonce per value, the function's and the variable's names as associated
//! data, so a sealed value cannot be moved to another function or name), and keeps, sends
//! and nodes cache only the sealed form: the store, the watch stream and the node's disk
//! hold no value in clear. A node opens them with the same key when it prepares the
//! function, and hands them to requests only (never to the init that is snapshotted, so no
//! memory image or compiled artifact holds one). The API and the CLI list names only.

use std::collections::BTreeMap;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

/// Longest secret value.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// Most secrets one function may have.
pub const MAX_SECRETS: usize = 100;
/// Most bytes of names and values one function's secrets may hold together (as its
/// `[env]`): each request copies them into the guest, and each watch line carries them.
pub const MAX_SECRETS_TOTAL_BYTES: usize = 64 * 1024;

/// A function's secrets by variable name, sealed.
pub type SealedSecrets = BTreeMap<String, SealedSecret>;

/// One sealed value: nonce and ciphertext (with its tag), hex.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    pub nonce: String,
    pub sealed: String,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedSecret(..)")
    }
}

/// The operator's key (32 bytes), read from a file of 64 hex characters
/// (`openssl rand -hex 32 > secrets.key`).
pub struct SecretKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A key from 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|bytes| bytes.len() == 32)
            .ok_or("a secrets key is 64 hex characters (32 bytes; `openssl rand -hex 32`)")?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| "unusable secrets key")?;
        Ok(SecretKey {
            key: LessSafeKey::new(key),
        })
    }

    /// The key in `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("reading the secrets key {}: {error}", path.display()))?;
        SecretKey::from_hex(&text).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// Seals `value` as function `function`'s variable `name`.
    pub fn seal(&self, function: &str, name: &str, value: &[u8]) -> Result<SealedSecret, String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|error| format!("no randomness for a nonce: {error}"))?;
        let mut sealed = value.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated(function, name)),
                &mut sealed,
            )
            .map_err(|_| "sealing failed".to_string())?;
        Ok(SealedSecret {
            nonce: hex::encode(nonce),
            sealed: hex::encode(sealed),
        })
    }

    /// Opens function `function`'s variable `name`: `Err` names the variable when the key is
    /// not the one it was sealed with (or the value was changed or moved).
    pub fn open(&self, function: &str, name: &str, secret: &SealedSecret) -> Result<String, String> {
        let refused = || format!("secret {name} of `{function}` does not open with this node's secrets key");
        let nonce: [u8; NONCE_LEN] = hex::decode(&secret.nonce)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(refused)?;
        let mut sealed = hex::decode(&secret.sealed).map_err(|_| refused())?;
        let value = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated(function, name)),
                &mut sealed,
            )
            .map_err(|_| refused())?;
        String::from_utf8(value.to_vec()).map_err(|_| format!("secret {name} of `{function}` is not UTF-8"))
    }
}

fn associated(function: &str, name: &str) -> Vec<u8> {
    [function.as_bytes(), b"\0", name.as_bytes()].concat()
}

/// Checks a secret's name (an environment variable: `[A-Z_][A-Z0-9_]*`, at most 128) and
/// value (UTF-8, at most [`MAX_SECRET_BYTES`]).
pub fn check(name: &str, value: &[u8]) -> Result<(), String> {
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if !name_ok {
        return Err(format!(
            "secret name `{name}` is not an environment variable name (A-Z, 0-9, _; not starting with a digit)"
        ));
    }
    if crate::env_names::is_request_variable(name) || crate::env_names::is_binding_variable(name) {
        return Err(format!(
            "secret name `{name}` is set by each request or by the node (HTTP_*, CGI variables, \
             ATOLL_SERVICE_*, ATOLL_ORIGIN): a client could choose its value"
        ));
    }
    if value.len() > MAX_SECRET_BYTES {
        return Err(format!(
            "secret {name} is {} bytes, over the {MAX_SECRET_BYTES} byte limit",
            value.len()
        ));
    }
    if std::str::from_utf8(value).is_err() {
        return Err(format!("secret {name} is not UTF-8 text"));
    }
    if value.contains(&0) {
        return Err(format!(
            "secret {name} holds a NUL byte, which would cut it short in the environment"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_sealed_value_opens_only_with_its_key_function_and_name() {
        let key = SecretKey::from_hex(KEY).unwrap();
        let sealed = key.seal("shop", "API_KEY", b"s3cret").unwrap();
        assert!(!sealed.sealed.contains(&hex::encode("s3cret")), "not in clear");
        assert_eq!(key.open("shop", "API_KEY", &sealed).unwrap(), "s3cret");
        assert_ne!(
            key.seal("shop", "API_KEY", b"s3cret").unwrap(),
            sealed,
            "a fresh nonce each time"
        );
        assert!(
            key.open("cart", "API_KEY", &sealed).is_err(),
            "moved to another function"
        );
        assert!(key.open("shop", "OTHER", &sealed).unwrap_err().contains("OTHER"));
        let other = SecretKey::from_hex(&KEY.replace("00", "ff")).unwrap();
        assert!(other.open("shop", "API_KEY", &sealed).is_err(), "another key");
        let mut changed = sealed.clone();
        changed.sealed.replace_range(0..2, "00");
        assert!(key.open("shop", "API_KEY", &changed).is_err(), "a changed byte");
        assert!(
            format!("{sealed:?} {key:?}").len() < 40,
            "Debug prints nothing secret"
        );
    }

    #[test]
    fn keys_names_and_values_are_checked() {
        assert!(SecretKey::from_hex("abcd").is_err());
        assert!(SecretKey::from_hex(&format!(" {KEY}\n")).is_ok());
        assert!(check("API_KEY", b"x").is_ok());
        for bad in [
            "",
            "api_key",
            "1KEY",
            "A-B",
            &"A".repeat(129),
            "HTTP_PROXY",
            "HTTP_API_TOKEN",
            "REQUEST_METHOD",
            "ATOLL_SERVICE_AUTH",
            "ATOLL_ORIGIN",
        ] {
            assert!(check(bad, b"x").is_err(), "{bad}");
        }
        assert!(
            check("K", &vec![b'x'; MAX_SECRET_BYTES + 1])
                .unwrap_err()
                .contains("limit")
        );
        assert!(check("K", &[0xff]).is_err());
        assert!(check("K", b"a\0b").unwrap_err().contains("NUL"));
    }
}
