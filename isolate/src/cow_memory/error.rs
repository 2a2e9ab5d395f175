//! What can fail while building a memory image or preparing a slot, named by the step and
//! the syscall: a caller (or a test) can tell a module that does not parse from a node out
//! of memfds or address space. Each message reads as the `String` errors these replaced.
//!
//! None of them reaches [`IsolateError`](crate::IsolateError): a failed slot becomes the
//! `MemoryError` wasmer expects from a memory that cannot be created or grown (and so an
//! instantiation or `memory.grow` failure), and a failed image is logged by the artifact
//! cache, whose module then runs without one.

use std::io;

use wasmer::sys::vm::MemoryError;

/// Why a memory image could not be built or a slot set up.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// The module does not parse.
    #[error(transparent)]
    Parse(#[from] wasmparser::BinaryReaderError),
    /// `memfd_create` for an image failed.
    #[error("memfd_create: {0}")]
    MemfdCreate(io::Error),
    /// Sizing the image's memfd (`ftruncate`) failed.
    #[error("sizing the memory image: {0}")]
    SizeImage(io::Error),
    /// Writing a data segment into the image's memfd (`pwrite`) failed.
    #[error("writing the memory image: {0}")]
    WriteImage(io::Error),
    /// Sealing the image's memfd (`fcntl(F_ADD_SEALS)`) failed.
    #[error("sealing the memory image: {0}")]
    SealImage(io::Error),
    /// Reserving a new slot (`mmap` of anonymous `PROT_NONE`) failed.
    #[error("reserving a linear memory: {0}")]
    Reserve(io::Error),
    /// Blanking a pooled slot's old image (`mmap` with `MAP_FIXED`) failed.
    #[error("clearing a pooled linear memory: {0}")]
    Blank(io::Error),
    /// Mapping an image into a slot (`mmap` of the memfd with `MAP_FIXED`) failed.
    #[error("mapping the memory image: {0}")]
    MapImage(io::Error),
    /// Changing how much of a slot is accessible (`mprotect`) failed.
    #[error("resizing a linear memory: {0}")]
    Resize(io::Error),
}

impl From<CowError> for MemoryError {
    /// A slot that cannot be set up is a region wasmer cannot use.
    fn from(error: CowError) -> Self {
        MemoryError::Region(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_before() {
        let os = || io::Error::from_raw_os_error(libc::ENOMEM);
        let text = os().to_string();
        assert_eq!(
            CowError::MemfdCreate(os()).to_string(),
            format!("memfd_create: {text}")
        );
        assert_eq!(
            CowError::Reserve(os()).to_string(),
            format!("reserving a linear memory: {text}")
        );
        let parse = crate::layout::MemoryLayout::parse(b"not wasm").unwrap_err();
        assert_eq!(CowError::from(parse.clone()).to_string(), parse.to_string());
        assert!(matches!(
            MemoryError::from(CowError::Resize(os())),
            MemoryError::Region(message) if message == format!("resizing a linear memory: {text}")
        ));
    }
}
