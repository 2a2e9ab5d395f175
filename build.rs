//! Builds the guest examples (a separate workspace, target wasm32-wasip1) so that `atoll up`
//! can bundle `hello` and the end-to-end tests can push real Rust guests. No compiled
//! `.wasm` is committed: they are always built from source here.
//!
//! The examples are built into `examples/target`, the same place a user's own
//! `cargo build --release --target wasm32-wasip1` in `examples/` puts them, so the
//! examples' `atoll.toml` files point at them as they are.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let examples = root.join("examples");
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "hello/src",
        "echo/src",
        "fault/src",
        "outbound/src",
        "todo/src",
        "bff/src",
        "../sdk/src",
        "../sdk/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", examples.join(path).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&examples)
        .args(["build", "--release", "--target", "wasm32-wasip1", "--quiet"])
        .env("CARGO_TARGET_DIR", examples.join("target"))
        // Flags meant for the host build must not leak into the guest build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_PROFILE_RELEASE_DEBUG")
        .status()
        .expect("run cargo to build the guest examples");
    assert!(
        status.success(),
        "building examples/ for wasm32-wasip1 failed; is the target installed? \
         run `rustup target add wasm32-wasip1`"
    );
    let wasm_dir = examples.join("target/wasm32-wasip1/release");
    println!("cargo:rustc-env=ATOLL_EXAMPLES_WASM_DIR={}", wasm_dir.display());
    println!("cargo:rustc-env=ATOLL_EXAMPLES_DIR={}", examples.display());
}
