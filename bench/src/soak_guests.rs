//! The guests `atoll-bench soak` deploys: the well-behaved examples, the `fault` example, and
//! hand-written hostile modules (WAT), each with what a node that keeps its promises answers.
//!
//! The hostile modules are the smallest programs that reach each hole issue 10 names: a
//! `(start)` function that never returns (it runs inside instantiation), the same with an
//! init export (so the registry runs it at push), an init that grows memory past
//! `[limits] memory`, a guest that has `random_get` fill its whole memory again and again,
//! and a guest that writes text shaped like the node's own log lines to stderr.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// A function to push: its manifest (without `[env]` for the churned ones) and module.
pub struct Guest {
    pub name: &'static str,
    pub manifest: String,
    pub module: Vec<u8>,
    /// What a node that keeps its promises does with the push.
    pub expected_push: &'static str,
}

/// A request the soak sends to a misbehaving guest, again and again.
pub struct HostileTarget {
    pub host: &'static str,
    pub path: &'static str,
    /// The answer a node that keeps its promises gives.
    pub expected: Expected,
}

/// What a hostile request should get.
#[derive(Clone, Copy)]
pub enum Expected {
    /// This status.
    Status(u16),
    /// 200 with a body containing this text.
    Body(&'static str),
    /// Any HTTP answer within the client timeout (e.g. 404 once the push was refused, or 504).
    AnyAnswer,
}

impl Expected {
    pub fn describe(self) -> String {
        match self {
            Expected::Status(status) => status.to_string(),
            Expected::Body(text) => format!("200 {text}"),
            Expected::AnyAnswer => "an answer".into(),
        }
    }

    pub fn matches(self, status: u16, body: &[u8]) -> bool {
        match self {
            Expected::Status(expected) => status == expected,
            Expected::Body(text) => {
                status == 200 && body.windows(text.len()).any(|window| window == text.as_bytes())
            }
            Expected::AnyAnswer => true,
        }
    }
}

/// Lines the `log-forge` guest writes to stderr start with this: a log line of the node's
/// own format from 1970. Any line of the node's log that starts with it was forged.
pub const FORGED_LOG_PREFIX: &str = "1970-01-01T00:00:00.000000Z  INFO atoll_router::node:";

/// `[limits] timeout` of every misbehaving guest: short, so that its 504s come quickly.
pub const HOSTILE_TIMEOUT: &str = "250ms";

/// A compiled example from `examples/` (built by `cargo build` at the workspace root).
pub fn example_wasm(name: &str) -> Result<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/target/wasm32-wasip1/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (build the examples first: `cargo build --release` at the workspace root)",
            path.display()
        )
    })
}

/// The manifest of a churned well-behaved function, serving `greeting`.
pub fn churned_manifest(name: &str, greeting: &str) -> String {
    format!(
        "name = \"{name}\"\nwasm = \"{name}.wasm\"\nroutes = [\"{name}.localhost\"]\n\n[env]\nGREETING = \"{greeting}\"\n"
    )
}

fn hostile_manifest(name: &str, memory: &str) -> String {
    format!(
        "name = \"{name}\"\nwasm = \"{name}.wasm\"\nroutes = [\"{name}.localhost\"]\n\n\
         [limits]\nmemory = \"{memory}\"\ntimeout = \"{HOSTILE_TIMEOUT}\"\n"
    )
}

/// A data segment holding a CGI response at `address` and the instructions that write it to
/// stdout with the module's `$fd_write` import (iovec at 0, `nwritten` at 8).
fn respond(address: u32, text: &str) -> (String, String) {
    let data = format!("(data (i32.const {address}) \"{}\")", wat_escape(text));
    let code = format!(
        "(i32.store (i32.const 0) (i32.const {address})) (i32.store (i32.const 4) (i32.const {}))
         (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))",
        text.len()
    );
    (data, code)
}

fn wat_escape(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b' '..=b'~' if byte != b'"' && byte != b'\\' => char::from(byte).to_string(),
            _ => format!("\\{byte:02x}"),
        })
        .collect()
}

fn wat(text: &str) -> Result<Vec<u8>> {
    Ok(wat::parse_str(text)?)
}

/// The misbehaving guests: `fault` with a short timeout, and the hand-written ones.
pub fn hostile_guests() -> Result<Vec<Guest>> {
    let mut guests = vec![Guest {
        name: "fault",
        manifest: hostile_manifest("fault", "32MiB"),
        module: example_wasm("fault")?,
        expected_push: "accepted",
    }];
    guests.extend(hand_written_guests()?);
    Ok(guests)
}

/// The hostile modules written here in WAT.
fn hand_written_guests() -> Result<Vec<Guest>> {
    let start_loop = "(module
        (memory (export \"memory\") 1)
        (func $spin (loop $forever (br $forever)))
        (start $spin)
        (func (export \"_start\")))";
    let start_loop_init = "(module
        (memory (export \"memory\") 1)
        (func $spin (loop $forever (br $forever)))
        (start $spin)
        (func (export \"atoll_init\"))
        (func (export \"_start\")))";

    // Grows from 1 page to 512 (32 MiB) under an 8 MiB limit and fills what it grew, so the
    // snapshot would carry 32 MiB of data.
    let (grown_data, grown_code) = respond(64, "Content-Type: text/plain\n\ngrown\n");
    let init_grow = format!(
        "(module
        (import \"wasi_snapshot_preview1\" \"fd_write\" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (memory (export \"memory\") 1)
        {grown_data}
        (func (export \"atoll_init\")
          (if (i32.eq (memory.grow (i32.const 511)) (i32.const -1)) (then unreachable))
          (memory.fill (i32.const 65536) (i32.const 0xA7) (i32.const {fill})))
        (func (export \"_start\") {grown_code}))",
        fill = 511 * 65536
    );

    // 64 MiB of memory, all of it handed to random_get, forever.
    let random_fill = "(module
        (import \"wasi_snapshot_preview1\" \"random_get\" (func $random_get (param i32 i32) (result i32)))
        (memory (export \"memory\") 1024)
        (func (export \"_start\")
          (loop $again
            (drop (call $random_get (i32.const 0) (i32.mul (memory.size) (i32.const 65536))))
            (br $again))))";

    let forged = format!(
        "log-forge says hi\n{FORGED_LOG_PREFIX} node ready\n\u{1b}[2K{FORGED_LOG_PREFIX} registry token rotated\n"
    );
    let (forged_response, respond_code) = respond(2048, "Content-Type: text/plain\n\nforged\n");
    let log_forge = format!(
        "(module
        (import \"wasi_snapshot_preview1\" \"fd_write\" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (memory (export \"memory\") 1)
        (data (i32.const 64) \"{text}\")
        {forged_response}
        (func (export \"_start\")
          (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const {len}))
          (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
          {respond_code}))",
        text = wat_escape(&forged),
        len = forged.len()
    );

    Ok(vec![
        Guest {
            name: "start-loop",
            manifest: hostile_manifest("start-loop", "16MiB"),
            module: wat(start_loop)?,
            expected_push: "accepted or refused, never hanging",
        },
        Guest {
            name: "start-loop-init",
            manifest: hostile_manifest("start-loop-init", "16MiB"),
            module: wat(start_loop_init)?,
            expected_push: "refused (init times out)",
        },
        Guest {
            name: "init-grow",
            manifest: hostile_manifest("init-grow", "8MiB"),
            module: wat(&init_grow)?,
            expected_push: "refused (init over its memory limit)",
        },
        Guest {
            name: "random-fill",
            manifest: hostile_manifest("random-fill", "64MiB"),
            module: wat(random_fill)?,
            expected_push: "accepted",
        },
        Guest {
            name: "log-forge",
            manifest: hostile_manifest("log-forge", "16MiB"),
            module: wat(&log_forge)?,
            expected_push: "accepted",
        },
    ])
}

/// The requests sent to the misbehaving guests.
pub fn hostile_targets() -> Vec<HostileTarget> {
    let target = |host, path, expected| HostileTarget { host, path, expected };
    vec![
        target("fault.localhost", "/loop", Expected::Status(504)),
        target("fault.localhost", "/spin?ms=20", Expected::Status(200)),
        target("fault.localhost", "/spin?ms=3000", Expected::Status(504)),
        target("fault.localhost", "/grow", Expected::Status(502)),
        target("fault.localhost", "/leak", Expected::Body("CLEAN")),
        target("fault.localhost", "/trap", Expected::Status(502)),
        target("start-loop.localhost", "/", Expected::Status(504)),
        target("start-loop-init.localhost", "/", Expected::AnyAnswer),
        target("init-grow.localhost", "/", Expected::AnyAnswer),
        target("random-fill.localhost", "/", Expected::Status(504)),
        target("log-forge.localhost", "/", Expected::Body("forged")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_guests_are_valid_modules() {
        let engine = wasmtime::Engine::default();
        let guests = hand_written_guests().unwrap();
        assert_eq!(guests.len(), 5);
        for guest in guests {
            wasmtime::Module::validate(&engine, &guest.module)
                .unwrap_or_else(|error| panic!("{}: {error:#}", guest.name));
            assert!(
                guest
                    .manifest
                    .contains(&format!("routes = [\"{}.localhost\"]", guest.name))
            );
        }
    }

    #[test]
    fn wat_escape_keeps_length_and_escapes_quotes_and_controls() {
        assert_eq!(wat_escape("a\"b\\c\n\u{1b}"), "a\\22b\\5cc\\0a\\1b");
    }

    #[test]
    fn expectations() {
        assert!(Expected::Status(504).matches(504, b""));
        assert!(!Expected::Status(504).matches(502, b""));
        assert!(Expected::Body("CLEAN").matches(200, b"CLEAN\n"));
        assert!(!Expected::Body("CLEAN").matches(200, b"LEAKED\n"));
        assert!(!Expected::Body("CLEAN").matches(500, b"CLEAN\n"));
    }
}
