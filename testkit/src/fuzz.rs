//! What every crate's fuzz targets (proptest, `src/fuzz.rs`) share: the case count, the
//! seed corpus on disk and plain byte mutations.

use std::path::Path;

use proptest::test_runner::Config;

/// Proptest's configuration with `cases` unless `PROPTEST_CASES` says otherwise.
pub fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// The seed inputs of one target: every file in `<manifest_dir>/fuzz-corpus/<target>/`,
/// in name order (call with `env!("CARGO_MANIFEST_DIR")`).
pub fn corpus(manifest_dir: &str, target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(manifest_dir).join("fuzz-corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|file| std::fs::read(file).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Applies byte mutations `(position, operation, byte)`: flip, insert or delete, positions
/// taken modulo the length at that point.
pub fn mutate(mut bytes: Vec<u8>, mutations: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, op, byte) in mutations {
        let len = bytes.len();
        match op % 3 {
            0 if len > 0 => bytes[at % len] ^= byte.max(1),
            1 => bytes.insert(at % (len + 1), byte),
            2 if len > 0 => {
                bytes.remove(at % len);
            }
            _ => {}
        }
    }
    bytes
}
