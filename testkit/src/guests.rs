//! Hand-written WCGI guests several test suites run: what they write is the point, so they
//! are spelled out in WAT rather than built from a language toolchain.

/// `text` as a WAT data-string (every byte escaped).
fn data_string(text: &str) -> String {
    text.bytes().map(|byte| format!("\\{byte:02x}")).collect()
}

/// A guest that writes `output` (a CGI head and body) to stdout from a data segment, so
/// its memory has something for a copy-on-write image.
pub fn writer(output: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 1024) "{escaped}")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 1024))
            (i32.store (i32.const 4) (i32.const {len}))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))"#,
        escaped = data_string(output),
        len = output.len(),
    );
    wat::parse_str(wat).expect("valid WAT")
}

/// A guest that writes the CGI `head` (ending in its blank line), then `blocks` times
/// 64 KiB of `x` (one `fd_write` each), then runs the WAT instructions `tail` (e.g. a loop
/// that never ends).
pub fn bulk_writer(head: &str, blocks: u32, tail: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 2)
          (data (i32.const 256) "{escaped}")
          (func (export "_start") (local $i i32)
            (memory.fill (i32.const 65536) (i32.const 120) (i32.const 65536))
            (i32.store (i32.const 0) (i32.const 256))
            (i32.store (i32.const 4) (i32.const {head_len}))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
            (i32.store (i32.const 0) (i32.const 65536))
            (i32.store (i32.const 4) (i32.const 65536))
            (block $done
              (loop $more
                (br_if $done (i32.ge_u (local.get $i) (i32.const {blocks})))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $more)))
            {tail}))"#,
        escaped = data_string(head),
        head_len = head.len(),
    );
    wat::parse_str(wat).expect("valid WAT")
}
