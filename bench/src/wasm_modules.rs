//! The WCGI modules `atoll-bench isolate` starts: the real `hello` example and generated
//! modules whose only difference is the size of their initial memory image.
//!
//! A generated module is the smallest WCGI program that still depends on its data: one
//! active data segment of `image_bytes` non-zero bytes at address 1024, and a `_start` that
//! copies the image's *last* byte into its response before writing it to stdout with
//! `wasi_snapshot_preview1.fd_write`. An engine therefore has to make the whole image
//! visible (copying it, or mapping it copy-on-write) before `_start` can run, and the
//! response proves it did: the body is `hello ` followed by [`expected_last_byte`].
//!
//! The binary is built with `wasm-encoder` rather than from WAT text: 16 MiB of escaped
//! bytes is 48 MiB of text to parse, the binary is a memcpy.
//!
//! ```text
//! memory (pages = ceil((1024 + image) / 64 KiB))
//! 0        8          12       16                         1024                1024+image
//! ├ iovec ─┼ nwritten ─┼───────┼ "Content-Type: …hello ?" ┼─ image (non-zero) ─┤
//!   {16, len}                                   ▲ '?' ← image[last] at run time
//! ```

use wasm_encoder::{
    CodeSection, ConstExpr, DataSection, EntityType, ExportKind, ExportSection, Function, FunctionSection,
    ImportSection, MemArg, MemArgTarget, MemorySection, MemoryType, Module, TypeSection, ValType,
};

/// Where the image starts in linear memory.
const IMAGE_ADDRESS: u32 = 1024;
/// Where the CGI response text starts (the iovec and `nwritten` sit below it).
const RESPONSE_ADDRESS: u32 = 16;
/// The response; its last byte is overwritten with the image's last byte at run time.
const RESPONSE: &[u8] = b"Content-Type: text/plain\n\nhello ?";
const PAGE: u64 = 64 * 1024;

/// The byte at `index` of a generated image: printable, never zero, not all the same.
fn image_byte(index: usize) -> u8 {
    b'a' + (index % 26) as u8
}

/// The byte `_start` copies into the response of a module with an image of `image_bytes`.
pub fn expected_last_byte(image_bytes: usize) -> u8 {
    image_byte(image_bytes - 1)
}

/// The response body a generated module with an image of `image_bytes` answers with.
pub fn expected_body(image_bytes: usize) -> Vec<u8> {
    let mut body = b"hello ".to_vec();
    body.push(expected_last_byte(image_bytes));
    body
}

/// A WCGI module with an active data segment of `image_bytes` non-zero bytes.
pub fn data_image_module(image_bytes: usize) -> Vec<u8> {
    assert!(
        image_bytes > 0,
        "the image must hold at least the byte _start reads"
    );
    let image_end = u64::from(IMAGE_ADDRESS) + image_bytes as u64;
    let response_len = RESPONSE.len() as u32;
    let placeholder = RESPONSE_ADDRESS + response_len - 1;
    let last_image_byte = u32::try_from(image_end - 1).expect("image fits a 32-bit memory");

    let mut types = TypeSection::new();
    // 0: fd_write(fd, iovs, iovs_len, nwritten) -> errno
    types.ty().function([ValType::I32; 4], [ValType::I32]);
    // 1: _start
    types.ty().function([], []);

    let mut imports = ImportSection::new();
    imports.import("wasi_snapshot_preview1", "fd_write", EntityType::Function(0));

    let mut functions = FunctionSection::new();
    functions.function(1); // function index 1 (0 is the import)

    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: image_end.div_ceil(PAGE),
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });

    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0);
    exports.export("_start", ExportKind::Func, 1);

    let byte = MemArg {
        offset: 0,
        align: 0,
        target: MemArgTarget::Memory(0),
        ordering: None,
    };
    let mut start = Function::new([]);
    start
        .instructions()
        // response[last] = image[last]
        .i32_const(placeholder as i32)
        .i32_const(last_image_byte as i32)
        .i32_load8_u(byte)
        .i32_store8(byte)
        // fd_write(1, iovs = 0, 1, nwritten = 8); trap unless it answered success
        .i32_const(1)
        .i32_const(0)
        .i32_const(1)
        .i32_const(8)
        .call(0)
        .if_(wasm_encoder::BlockType::Empty)
        .unreachable()
        .end()
        .end();
    let mut code = CodeSection::new();
    code.function(&start);

    let mut header = Vec::with_capacity(RESPONSE_ADDRESS as usize + RESPONSE.len());
    header.extend_from_slice(&RESPONSE_ADDRESS.to_le_bytes()); // iovec.buf
    header.extend_from_slice(&response_len.to_le_bytes()); // iovec.len
    header.resize(RESPONSE_ADDRESS as usize, 0); // nwritten + padding
    header.extend_from_slice(RESPONSE);
    let mut data = DataSection::new();
    data.active(0, &ConstExpr::i32_const(0), header);
    data.active(
        0,
        &ConstExpr::i32_const(IMAGE_ADDRESS as i32),
        (0..image_bytes).map(image_byte),
    );

    let mut module = Module::new();
    module
        .section(&types)
        .section(&imports)
        .section(&functions)
        .section(&memories)
        .section(&exports)
        .section(&code)
        .section(&data);
    module.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_16mib_module_is_a_valid_wcgi_program() {
        let image = 16 * 1024 * 1024;
        let wasm = data_image_module(image);
        assert!(wasm.len() > image, "the image is in the binary");
        atoll_isolate::Engine::new()
            .unwrap()
            .validate(&wasm)
            .expect("atoll accepts the generated module");
    }

    #[test]
    fn generated_module_answers_with_its_last_image_byte() {
        let image = 1024 * 1024 + 7;
        let engine = atoll_isolate::Engine::new().unwrap();
        let function = atoll_isolate::LoadedFunction::new(
            engine.clone(),
            engine.compile(&data_image_module(image)).unwrap(),
            atoll_isolate::FunctionConfig::new("image"),
        );
        let invocation = function.invoke(&atoll_isolate::CgiRequest::default()).unwrap();
        assert_eq!(invocation.response.status, 200);
        assert_eq!(invocation.response.body.as_ref(), expected_body(image).as_slice());
    }
}
