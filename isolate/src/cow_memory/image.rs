//! A module's initial memory image: built once per module from its active data segments
//! into a sealed memfd, which every instance's slot maps copy-on-write. Apart from the
//! slots because its life is the module's (shared by every instance on every thread, and
//! closed when the module goes), where a slot's is a thread's.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use wasmer::{Pages, WASM_PAGE_SIZE};

use super::error::CowError;
use super::os_page_size;
use crate::layout::{MemoryLayout, Offset, SegmentKind};

fn round_up(value: usize, to: usize) -> usize {
    value.div_ceil(to) * to
}

/// The initial contents of a module's memory 0, in a sealed memfd that every instance maps
/// copy-on-write.
#[derive(Debug)]
pub struct MemoryImage {
    pub(super) file: File,
    /// Bytes of the memfd, a multiple of the OS page size (0 when there is no data).
    pub(super) len: usize,
    pub(super) initial_pages: u32,
    pub(super) maximum_pages: Option<u32>,
    /// `(offset, len)` of every active segment, in module order: the calls to
    /// `initialize_with_data` the image stands for.
    pub(super) segments: Vec<(usize, usize)>,
    /// A read-only shared mapping of the memfd, made on the first reset that restores a
    /// written image page; `None` inside when it could not be made (resets then discard).
    view: OnceLock<Option<ImageView>>,
}

/// The image's memfd mapped `PROT_READ`, `MAP_SHARED`: the source for restoring image pages
/// a tenant wrote. Unmapped on drop.
#[derive(Debug)]
pub(super) struct ImageView {
    pub(super) base: NonNull<u8>,
    pub(super) len: usize,
}

#[allow(unsafe_code)]
// SAFETY: a read-only mapping of a sealed memfd: its bytes never change, so reading it from
// any thread is sound, and unmapping it (on drop) needs no particular thread.
unsafe impl Send for ImageView {}
#[allow(unsafe_code)]
// SAFETY: as above; only ever read.
unsafe impl Sync for ImageView {}

impl Drop for ImageView {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the view owns its mapping; slots only borrow it while restoring, through
        // an `Arc<MemoryImage>` that outlives the borrow.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl MemoryImage {
    /// Builds the image of `wasm`'s memory 0 from its active data segments.
    ///
    /// `Ok(None)` when the module has no memory or the image cannot express its initial
    /// state (imported, shared, 64-bit or several memories; custom page sizes; offsets that
    /// are not a single `i32.const`; segments outside the initial memory, which trap at
    /// instantiation): the caller then instantiates with stock wasmer. `Err` when the module
    /// does not parse or the memfd cannot be made.
    pub fn from_wasm(wasm: &[u8]) -> Result<Option<Arc<MemoryImage>>, CowError> {
        let layout = MemoryLayout::parse(wasm)?;
        let Some(layout) = ImageLayout::of(&layout) else {
            return Ok(None);
        };
        let initial_bytes = u64::from(layout.initial_pages) * WASM_PAGE_SIZE as u64;
        let mut end = 0usize;
        for (offset, data) in &layout.segments {
            let segment_end = *offset as u64 + data.len() as u64;
            if segment_end > initial_bytes {
                return Ok(None);
            }
            end = end.max(segment_end as usize);
        }
        let len = round_up(end, os_page_size());
        let file = create_memfd(&layout.segments, len)?;
        Ok(Some(Arc::new(MemoryImage {
            file,
            len,
            initial_pages: layout.initial_pages,
            maximum_pages: layout.maximum_pages,
            segments: layout
                .segments
                .iter()
                .map(|(offset, data)| (*offset as usize, data.len()))
                .collect(),
            view: OnceLock::new(),
        })))
    }

    /// The image's bytes, read-only (mapped on first use); `None` for an empty image or
    /// when the mapping fails.
    #[allow(unsafe_code)]
    pub(super) fn view(&self) -> Option<&ImageView> {
        self.view
            .get_or_init(|| {
                if self.len == 0 {
                    return None;
                }
                // SAFETY: a new shared read-only mapping at an address of the kernel's
                // choosing touches no existing mapping; the memfd is sealed against writes
                // and size changes, so its `len` bytes stay valid and unchanged.
                let base = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        self.len,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        self.file.as_raw_fd(),
                        0,
                    )
                };
                if base == libc::MAP_FAILED {
                    return None;
                }
                Some(ImageView {
                    base: NonNull::new(base.cast())?,
                    len: self.len,
                })
            })
            .as_ref()
    }

    /// Size of the mapped image in bytes (page-aligned; the memory beyond is zero).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the image holds no data at all (the memory starts all zero).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory's declared minimum, in 64 KiB wasm pages.
    pub fn initial_pages(&self) -> u32 {
        self.initial_pages
    }

    /// The memory's declared maximum, in 64 KiB wasm pages.
    pub fn maximum_pages(&self) -> Option<u32> {
        self.maximum_pages
    }

    /// How many active data segments the image was built from.
    pub fn data_segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// What the image is built from: memory 0's limits and its active segments, in order.
struct ImageLayout<'a> {
    initial_pages: u32,
    maximum_pages: Option<u32>,
    segments: Vec<(u32, &'a [u8])>,
}

impl<'a> ImageLayout<'a> {
    /// Memory 0's type and its active segments, or `None` when the image cannot express
    /// them.
    fn of(layout: &MemoryLayout<'a>) -> Option<ImageLayout<'a>> {
        let ([], [memory]) = (layout.imported.as_slice(), layout.defined.as_slice()) else {
            return None;
        };
        if memory.memory64 || memory.shared || memory.page_size_log2.is_some_and(|log2| log2 != 16) {
            return None;
        }
        let mut segments = Vec::new();
        for segment in &layout.segments {
            match segment.kind {
                SegmentKind::Passive => {}
                // wasmer traps on negative offsets: leave those to it.
                SegmentKind::Active {
                    memory: 0,
                    offset: Offset::I32Const(value),
                } if value >= 0 => segments.push((value as u32, segment.data)),
                SegmentKind::Active { .. } => return None,
            }
        }
        let initial_pages = u32::try_from(memory.initial).ok()?;
        let maximum_pages = memory.maximum.map(u32::try_from).transpose().ok()?;
        if initial_pages > Pages::max_value().0 {
            return None;
        }
        Some(ImageLayout {
            initial_pages,
            maximum_pages,
            segments,
        })
    }
}

/// Writes the segments, in order, into a new memfd of `len` bytes and seals it.
#[allow(unsafe_code)]
fn create_memfd(segments: &[(u32, &[u8])], len: usize) -> Result<File, CowError> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"atoll-memory-image".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(CowError::MemfdCreate(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64).map_err(CowError::SizeImage)?;
    // Later segments overwrite earlier ones, as at instantiation; untouched bytes read zero.
    for (offset, data) in segments {
        file.write_all_at(data, u64::from(*offset))
            .map_err(CowError::WriteImage)?;
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: `file` owns a valid memfd; F_ADD_SEALS takes an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(CowError::SealImage(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Memory 0's declared minimum in bytes (minimum pages × 64 KiB), imported or defined;
/// `None` when the module declares no memory or does not parse.
pub fn declared_minimum_bytes(wasm: &[u8]) -> Option<u64> {
    let layout = MemoryLayout::parse(wasm).ok()?;
    let memory = layout.memory(0)?;
    Some(memory.initial.saturating_mul(u64::from(memory.page_size())))
}
