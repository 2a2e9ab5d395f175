//! SHA-256 in lowercase hex: how modules are named everywhere (registry blobs, NATS
//! objects, the node cache, compiled artifacts), and how a digest from the network is
//! checked before it names a file.

use sha2::Digest;

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Whether `text` is a hex SHA-256 as Atoll writes them: 64 lowercase hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

/// Refuses anything but a hex SHA-256: digests name files, and one from a registry or a
/// store is untrusted input (`../`, `/`, NUL, a name longer than a path component).
pub fn check_sha256_hex(text: &str) -> Result<(), String> {
    if is_sha256_hex(text) {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a SHA-256 (64 lowercase hex digits)",
            text.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercase_hex_of_64_digits() {
        let sha = sha256_hex(b"one");
        assert!(is_sha256_hex(&sha));
        assert!(!is_sha256_hex(&sha.to_uppercase()));
        assert!(!is_sha256_hex(&sha[1..]));
        assert!(
            check_sha256_hex("../etc/passwd")
                .unwrap_err()
                .contains("not a SHA-256")
        );
    }
}
