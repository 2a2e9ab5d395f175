//! Copy-on-write linear memories: instance start-up that does not grow with the module's
//! initial memory image.
//!
//! Stock wasmer reserves a fresh region per instance and copies every active data segment
//! into it (a 16 MiB image costs 6–10 ms per instance). Here the module's initial memory
//! image is built once per module ([`MemoryImage::from_wasm`]) into a sealed memfd, and
//! every instance maps it `MAP_PRIVATE`: pages are shared with the page cache until the
//! guest writes one, which then gets a private copy. Start-up is a couple of syscalls
//! whatever the image size.
//!
//! # A slot
//!
//! ```text
//!  base                                                         base + bound + guard
//!  │◀──────────── bound (4 GiB, the wasm32 index space) ────────────▶│◀── offset guard ──▶│
//!  ┌──────────────────────┬────────────────────┬──────────────────────┬────────────────────┐
//!  │ image (memfd, CoW)   │ anonymous zero     │ PROT_NONE            │ PROT_NONE          │
//!  │ MAP_PRIVATE|MAP_FIXED│ pages (mprotect RW)│ (grow: mprotect RW)  │ (traps)            │
//!  └──────────────────────┴────────────────────┴──────────────────────┴────────────────────┘
//!  0               image_len          current_length
//! ```
//!
//! The whole slot is one anonymous `PROT_NONE`, `MAP_NORESERVE` reservation; the image is
//! mapped over its start, the rest of the initial pages are made accessible with
//! `mprotect`, and `memory.grow` extends the accessible part with `mprotect`. Compiled code
//! uses wasmer's static memory style (no bounds checks; out-of-bounds accesses hit
//! `PROT_NONE` and trap), exactly as with [`BaseTunables`].
//!
//! # Pooling and reset
//!
//! Every `mmap`, `mprotect` and `munmap` takes the process's mm lock for writing and may
//! shoot down TLBs on every core; with an instance per request they were a quarter of a
//! busy node's CPU. So slots are pooled and keep their image mapped between tenants, as
//! wasmtime's pooling allocator does:
//!
//! ```text
//!  drop (release)                         free list (per thread)      instantiate (acquire)
//!  PAGEMAP_SCAN (or pread) [0, initial)   ┌──────────────────────┐    same image: take it,
//!  ─ written image pages: copy the image ▶│ slot: image X, 4 pg  │──▶ no syscall at all
//!  ─ written zero pages: fill with zeros  │ slot: image Y, 1 pg  │    other/no image:
//!  > 256 written, or no pagemap:          │ slot: no image, 2 pg │──▶ mmap(anon, NONE) over
//!    madvise(DONTNEED) [0, initial)       └──────────────────────┘    the old image's range,
//!  grown: madvise(DONTNEED) + mprotect(NONE) [initial, size)          mmap the new image,
//!  list full or a step failed: munmap       ≤ MAX_FREE_SLOTS_PER_THREAD   mprotect to size
//! ```
//!
//! - A released slot is restored in place when it can be. The page map of the initial
//!   range (`/proc/self/pagemap`, one fd shared by every thread) tells which pages the
//!   tenant may have written: in the `MAP_PRIVATE` image mapping, a present page that is
//!   not a file page is a private copy-on-write copy, and gets the image's bytes back
//!   (copied from a read-only `MAP_SHARED` view of the memfd, mapped once per image);
//!   after the image, a present page that does not read zero gets zeros. Swapped-out pages
//!   count as written. The `PAGEMAP_SCAN` ioctl (Linux 6.7) asks the kernel for exactly
//!   those pages (present or swapped, neither file page nor the shared zero page) as a few
//!   runs, 64 per call, so the reset costs the same for a 16 MiB memory as for a 64 KiB
//!   one. Where the ioctl is unknown or invalid it is not tried again in the process, and
//!   one `pread` of the page map's entries (8 bytes per page) over the initial range does
//!   the same. Those pages stay resident and writable, so neither the reset nor the next
//!   tenant's writes to them touch the page tables: no mm write lock, no TLB shootdown, no
//!   copy-on-write fault. Pages only read (the image's page-cache pages, the shared zero
//!   page) are left alone.
//! - If more than [`MAX_RESTORED_PAGES`] pages were written (or the page map cannot be read,
//!   or the image cannot be viewed), the slot is `madvise(MADV_DONTNEED)`-ed over its
//!   initial range instead: that discards the private copy-on-write pages, so the next
//!   access sees the (sealed) image again, and the anonymous pages after it, which read
//!   zero again. `madvise` takes the mm lock only for reading. If the tenant grew the
//!   memory, the grown tail is always discarded that way and goes back to `PROT_NONE` with
//!   one `mprotect`: size and accessibility are the initial ones again. The slot remembers
//!   which image it shows (a `Weak<MemoryImage>`, compared by identity: a pooled slot does
//!   not keep a gone module's memfd open) and how much of it is accessible.
//! - Acquiring prefers the most recently released slot already showing the same image:
//!   the instance starts with zero syscalls. Otherwise it takes a slot showing nothing, or
//!   one whose image no module holds any more, or the least recently released; a slot
//!   showing another image is first blanked with one anonymous `PROT_NONE` `mmap` over its
//!   whole accessible range, so no byte of the other module can remain visible, even where
//!   the new image is shorter. Only then is the new image mapped and the size set.
//! - A failed syscall poisons the slot: it is unmapped, never reused.
//! - Per-thread lists need no lock and keep cores from contending; an instance dropped on
//!   another thread than it started on feeds that thread's list.
//!
//! # Arming
//!
//! [`Tunables`] never see the module's bytes, so the caller *arms* the current thread with a
//! [`MemoryPlan`] around `Instance::new` ([`instantiate_with`]). The first memory created
//! under that arming takes the image; the memory limit applies to every memory created under
//! it. Unarmed, [`CowTunables`] behave exactly like [`BaseTunables`].
//!
//! `initialize_with_data` is skipped only for the active segments the image was built from,
//! in order, and only for the memory that took the image; each skipped call is checked
//! against the image (offset, length and a sample of the bytes) so an image armed for the
//! wrong module fails instantiation instead of running with foreign data. Every later call
//! (`memory.init` of passive segments) copies as usual.
//!
//! # Trade-offs
//!
//! - The image is whatever the active data segments say. Modules whose segments the image
//!   cannot express (`global.get` offsets, imported or 64-bit or shared memories, several
//!   memories, segments that trap) get no image and use stock wasmer.
//! - The first write to each image page costs a page fault and a 4 KiB copy; a guest that
//!   rewrites its whole image pays what stock wasmer paid up front, spread over the run.
//! - Pooled slots hold 8 GiB of address space each (no memory): 16 per thread. A free slot
//!   keeps its image's memfd alive (shared page cache, counted once per image however many
//!   slots show it), until the slot is switched to another image or evicted.
//! - Restoring in place walks the page tables of the whole initial range on every release
//!   (in the kernel with `PAGEMAP_SCAN`, which skips unpopulated tables; before Linux 6.7,
//!   8 bytes of page map per 4 KiB, a 16 MiB memory: 32 KiB, one `pread`) and copies 4 KiB
//!   per written page; the pages written once stay resident (counted against the process)
//!   while the slot is pooled, and are restored on every release until the slot is
//!   discarded. Past [`MAX_RESTORED_PAGES`] written pages the `madvise` path is cheaper and
//!   taken instead. `PAGEMAP_SCAN` leaves out the shared zero page, so pages only read
//!   after the image do not count against `MAX_CHECKED_PAGES` there.
//! - `MADV_DONTNEED` (fallback and grown tails) also drops the clean image pages a tenant
//!   only read; the next tenant faults them back in from the page cache (minor faults, no
//!   copy), and its writes fault and copy again, with a TLB shootdown each.
//! - The page-map flags relied on (present, swapped, file page) need no privilege; a
//!   present page the flags cannot prove clean is treated as written (compared, or
//!   rewritten), so an unexpected entry costs a copy, never stale bytes.
//! - The list cap counts slots, not images: a thread serving more than 16 functions in
//!   turn remaps on most starts, as before.
//! - Linux only (memfd, sealing).

#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use wasmer::sys::vm::{
    LinearMemory, MemoryError, MemoryStyle, TableStyle, Trap, TrapCode, VMMemory, VMMemoryDefinition,
    VMTable, VMTableDefinition,
};
use wasmer::sys::wasmparser::{self, DataKind, Operator, Parser, Payload, TypeRef};
use wasmer::sys::{BaseTunables, NativeEngineExt, Tunables};
use wasmer::{MemoryType, Pages, TableType, WASM_PAGE_SIZE};

/// How many reset slots each thread keeps for reuse.
pub const MAX_FREE_SLOTS_PER_THREAD: usize = 16;

/// Bytes sampled at each end of a skipped data segment to check the image matches.
const SEGMENT_CHECK_BYTES: usize = 16;

/// The largest 32-bit linear memory, in bytes (4 GiB).
const MAX_WASM32_BYTES: u64 = 1 << 32;

fn os_page_size() -> usize {
    static PAGE_SIZE: OnceLock<usize> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|size| *size > 0)
            .unwrap_or(4096)
    })
}

fn round_up(value: usize, to: usize) -> usize {
    value.div_ceil(to) * to
}

fn last_os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

// ------------------------------------------------------------------------------------------
// The image
// ------------------------------------------------------------------------------------------

/// The initial contents of a module's memory 0, in a sealed memfd that every instance maps
/// copy-on-write.
#[derive(Debug)]
pub struct MemoryImage {
    file: File,
    /// Bytes of the memfd, a multiple of the OS page size (0 when there is no data).
    len: usize,
    initial_pages: u32,
    maximum_pages: Option<u32>,
    /// `(offset, len)` of every active segment, in module order: the calls to
    /// `initialize_with_data` the image stands for.
    segments: Vec<(usize, usize)>,
    /// A read-only shared mapping of the memfd, made on the first reset that restores a
    /// written image page; `None` inside when it could not be made (resets then discard).
    view: OnceLock<Option<ImageView>>,
}

/// The image's memfd mapped `PROT_READ`, `MAP_SHARED`: the source for restoring image pages
/// a tenant wrote. Unmapped on drop.
#[derive(Debug)]
struct ImageView {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a read-only mapping of a sealed memfd: its bytes never change, so reading it from
// any thread is sound, and unmapping it (on drop) needs no particular thread.
unsafe impl Send for ImageView {}
// SAFETY: as above; only ever read.
unsafe impl Sync for ImageView {}

impl Drop for ImageView {
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
    pub fn from_wasm(wasm: &[u8]) -> Result<Option<Arc<MemoryImage>>, String> {
        let Some(layout) = parse_layout(wasm)? else {
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
    fn view(&self) -> Option<&ImageView> {
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

struct Layout<'a> {
    initial_pages: u32,
    maximum_pages: Option<u32>,
    segments: Vec<(u32, &'a [u8])>,
}

/// Memory 0's type and its active segments, or `None` when the image cannot express them.
fn parse_layout(wasm: &[u8]) -> Result<Option<Layout<'_>>, String> {
    let mut memory: Option<wasmparser::MemoryType> = None;
    let mut memories = 0usize;
    let mut segments = Vec::new();
    let mut expressible = true;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|error| error.to_string())? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    if let TypeRef::Memory(_) = import.map_err(|error| error.to_string())?.ty {
                        return Ok(None);
                    }
                }
            }
            Payload::MemorySection(reader) => {
                for ty in reader {
                    let ty = ty.map_err(|error| error.to_string())?;
                    memories += 1;
                    memory.get_or_insert(ty);
                }
            }
            Payload::DataSection(reader) => {
                for data in reader {
                    let data = data.map_err(|error| error.to_string())?;
                    let DataKind::Active {
                        memory_index,
                        offset_expr,
                    } = data.kind
                    else {
                        continue;
                    };
                    if memory_index != 0 {
                        expressible = false;
                        continue;
                    }
                    let mut operators = offset_expr.get_operators_reader();
                    let first = operators.read().map_err(|error| error.to_string())?;
                    let second = operators.read().map_err(|error| error.to_string())?;
                    match (first, second) {
                        // wasmer traps on negative offsets: leave those to it.
                        (Operator::I32Const { value }, Operator::End) if value >= 0 => {
                            segments.push((value as u32, data.data));
                        }
                        _ => expressible = false,
                    }
                }
            }
            _ => {}
        }
    }
    let Some(memory) = memory else {
        return Ok(None);
    };
    if !expressible
        || memories != 1
        || memory.memory64
        || memory.shared
        || memory.page_size_log2.is_some_and(|log2| log2 != 16)
    {
        return Ok(None);
    }
    let (Ok(initial_pages), maximum_pages) = (
        u32::try_from(memory.initial),
        memory.maximum.map(u32::try_from).transpose(),
    ) else {
        return Ok(None);
    };
    let Ok(maximum_pages) = maximum_pages else {
        return Ok(None);
    };
    if initial_pages > Pages::max_value().0 {
        return Ok(None);
    }
    Ok(Some(Layout {
        initial_pages,
        maximum_pages,
        segments,
    }))
}

/// Writes the segments, in order, into a new memfd of `len` bytes and seals it.
fn create_memfd(segments: &[(u32, &[u8])], len: usize) -> Result<File, String> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"atoll-memory-image".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(last_os_error("memfd_create"));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)
        .map_err(|error| format!("sizing the memory image: {error}"))?;
    // Later segments overwrite earlier ones, as at instantiation; untouched bytes read zero.
    for (offset, data) in segments {
        file.write_all_at(data, u64::from(*offset))
            .map_err(|error| format!("writing the memory image: {error}"))?;
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: `file` owns a valid memfd; F_ADD_SEALS takes an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(last_os_error("sealing the memory image"));
    }
    Ok(file)
}

/// Memory 0's declared minimum in bytes (minimum pages × 64 KiB), imported or defined;
/// `None` when the module declares no memory or does not parse.
pub fn declared_minimum_bytes(wasm: &[u8]) -> Option<u64> {
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.ok()? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    if let TypeRef::Memory(ty) = import.ok()?.ty {
                        return Some(ty.initial.saturating_mul(u64::from(ty.page_size())));
                    }
                }
            }
            Payload::MemorySection(reader) => {
                let ty = reader.into_iter().next()?.ok()?;
                return Some(ty.initial.saturating_mul(u64::from(ty.page_size())));
            }
            // Memories are declared before any code or data.
            Payload::CodeSectionStart { .. } | Payload::DataSection(_) => return None,
            _ => {}
        }
    }
    None
}

// ------------------------------------------------------------------------------------------
// Arming
// ------------------------------------------------------------------------------------------

/// What the next instantiation on this thread should get.
#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    /// The module's initial memory image (from [`MemoryImage::from_wasm`] on the same
    /// module bytes), or `None` to copy data segments as stock wasmer does.
    pub image: Option<Arc<MemoryImage>>,
    /// The most bytes any memory of the instance may grow to; `memory.grow` beyond it
    /// returns -1 and a module declaring more fails to instantiate.
    pub max_bytes: Option<u64>,
}

#[derive(Debug)]
struct Armed {
    image: Option<Arc<MemoryImage>>,
    max_bytes: Option<u64>,
}

thread_local! {
    static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
    static FREE_SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
    /// The buffer page-map entries are read into (`PAGEMAP_CHUNK` entries, allocated on first
    /// use).
    static PAGEMAP_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Whether resets on this thread may use `PAGEMAP_SCAN` (tests turn it off to exercise
    /// the `pread` path).
    static SCAN_ENABLED: Cell<bool> = const { Cell::new(true) };
    /// Resets on this thread that `PAGEMAP_SCAN` completed (restored in place or found too
    /// many written pages).
    static SCAN_RESETS: Cell<usize> = const { Cell::new(0) };
}

/// `/proc/self/pagemap`, opened on the first reset in the process (`None` inside when it
/// cannot be opened: resets then always discard). One for every thread: `pread` and the
/// `PAGEMAP_SCAN` ioctl never use the file offset, so threads can share it, and an fd per
/// thread kept one open for every thread that ever ran a guest.
static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();

/// Set once `PAGEMAP_SCAN` failed as unknown or invalid (a kernel before 6.7): every later
/// reset in the process reads the page map with `pread` instead.
static SCAN_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// At most this many written pages (1 MiB with 4 KiB pages) are restored in place on
/// release; a tenant that wrote more gets its slot discarded with `madvise` instead.
pub const MAX_RESTORED_PAGES: usize = 256;

/// At most this many pages after the image that read zero already (mapped by a read: the
/// shared zero page) are checked on release before falling back to `madvise`.
const MAX_CHECKED_PAGES: usize = 4096;

/// `/proc/self/pagemap` entries read per `pread` (64 KiB of entries, 32 MiB of memory):
/// every `pread` of the page map has a fixed cost (mm lock, page-table walk set-up).
const PAGEMAP_CHUNK: usize = 8192;
/// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// File page or shared anonymous page: in a `MAP_PRIVATE` file mapping, a page that is
/// still the file's (page cache); a private copy-on-write copy is anonymous, without it.
const PAGEMAP_FILE: u64 = 1 << 61;

/// `struct pm_scan_arg` (include/uapi/linux/fs.h), the argument of `PAGEMAP_SCAN`.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: one run of pages `[start, end)` with the same categories.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`; the `libc` crate does not define it.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
/// `PAGEMAP_SCAN` page categories.
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Regions returned per `PAGEMAP_SCAN` call; the walk resumes where a full vector stopped.
const SCAN_REGIONS: usize = 64;

/// Runs `f` (which calls `Instance::new`) with `plan` armed for this thread, so memories the
/// engine's [`CowTunables`] create meanwhile map the image and obey the limit. The previous
/// arming is restored afterwards, also when `f` panics.
pub fn instantiate_with<R>(plan: &MemoryPlan, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Armed>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            let _ = ARMED.try_with(|armed| *armed.borrow_mut() = previous);
        }
    }
    let previous = ARMED.with(|armed| {
        armed.borrow_mut().replace(Armed {
            image: plan.image.clone(),
            max_bytes: plan.max_bytes,
        })
    });
    let _restore = Restore(previous);
    f()
}

/// For a memory about to be created: `None` when unarmed, else the image (taken: only the
/// first memory gets it) and the limit.
fn take_arming() -> Option<(Option<Arc<MemoryImage>>, Option<u64>)> {
    ARMED
        .try_with(|armed| {
            armed
                .borrow_mut()
                .as_mut()
                .map(|armed| (armed.image.take(), armed.max_bytes))
        })
        .ok()
        .flatten()
}

// ------------------------------------------------------------------------------------------
// Tunables
// ------------------------------------------------------------------------------------------

/// Wasmer tunables that create [`CowMemory`]s for instantiations armed with
/// [`instantiate_with`], and behave as [`BaseTunables`] otherwise.
#[derive(Clone, Default)]
pub struct CowTunables {
    base: BaseTunables,
}

impl CowTunables {
    pub fn new() -> Self {
        CowTunables::default()
    }
}

/// Installs [`CowTunables`] on `engine` (a `sys` engine). Do it before cloning the engine
/// or compiling with it: clones made earlier keep their tunables.
pub fn install(engine: &mut wasmer::Engine) {
    engine.set_tunables(CowTunables::new());
}

impl CowTunables {
    fn create(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        location: Option<NonNull<VMMemoryDefinition>>,
    ) -> Option<Result<VMMemory, MemoryError>> {
        let (image, max_bytes) = take_arming()?;
        if ty.shared || !matches!(style, MemoryStyle::Static) {
            // Armed means limited: a memory this module cannot create would escape the
            // limit under stock tunables, so refuse it (modules declaring one are refused at
            // load; this is the second line).
            return Some(Err(MemoryError::InvalidMemory {
                reason: "shared and dynamic memories are not supported under a memory limit".into(),
            }));
        }
        let image = image.filter(|image| {
            image.initial_pages == ty.minimum.0 && image.maximum_pages == ty.maximum.map(|m| m.0)
        });
        // SAFETY: forwarded from `create_vm_memory`'s contract, or `None` for host memories.
        Some(
            unsafe { CowMemory::new(ty, style, image, max_bytes, location) }
                .map(|memory| VMMemory(Box::new(memory))),
        )
    }
}

impl Tunables for CowTunables {
    fn memory_style(&self, memory: &MemoryType) -> MemoryStyle {
        self.base.memory_style(memory)
    }

    fn table_style(&self, table: &TableType) -> TableStyle {
        self.base.table_style(table)
    }

    fn create_host_memory(&self, ty: &MemoryType, style: &MemoryStyle) -> Result<VMMemory, MemoryError> {
        match self.create(ty, style, None) {
            Some(memory) => memory,
            None => self.base.create_host_memory(ty, style),
        }
    }

    /// # Safety
    /// `vm_definition_location` must point to a valid, owned `VMMemoryDefinition` (in the
    /// instance's `VMContext`) that outlives the memory.
    unsafe fn create_vm_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        vm_definition_location: NonNull<VMMemoryDefinition>,
    ) -> Result<VMMemory, MemoryError> {
        match self.create(ty, style, Some(vm_definition_location)) {
            Some(memory) => memory,
            // SAFETY: the caller upholds the contract, which is the same.
            None => unsafe { self.base.create_vm_memory(ty, style, vm_definition_location) },
        }
    }

    fn create_host_table(&self, ty: &TableType, style: &TableStyle) -> Result<VMTable, String> {
        self.base.create_host_table(ty, style)
    }

    /// # Safety
    /// `vm_definition_location` must point to a valid, owned `VMTableDefinition`.
    unsafe fn create_vm_table(
        &self,
        ty: &TableType,
        style: &TableStyle,
        vm_definition_location: NonNull<VMTableDefinition>,
    ) -> Result<VMTable, String> {
        // Tables are not covered by the memory limit: cap how far they can grow.
        let bounded = TableType {
            maximum: Some(ty.maximum.map_or(crate::engine::MAX_TABLE_ELEMENTS, |maximum| {
                maximum.min(crate::engine::MAX_TABLE_ELEMENTS)
            })),
            ..*ty
        };
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { self.base.create_vm_table(&bounded, style, vm_definition_location) }
    }
}

// ------------------------------------------------------------------------------------------
// Slots
// ------------------------------------------------------------------------------------------

/// A reserved region of `len` bytes at `base`.
///
/// Its layout, between instances (on a free list) and as an instance starts:
///
/// - `[0, image.len)`: the image's memfd mapped `MAP_PRIVATE`, readable and writable; every
///   byte reads as the image (private copy-on-write pages may remain resident, restored to
///   the image's bytes);
/// - `[image.len, accessible)`: anonymous, readable and writable; every byte reads zero
///   (resident pages may remain, zeroed);
/// - `[accessible, len)`: anonymous `PROT_NONE`, with no page, or zeroed ones hidden when a
///   slot restored in place was shrunk for a smaller memory (they read zero once grown
///   into).
///
/// `image.len <= accessible` always (an image never extends past the initial memory). A
/// live memory may dirty `[0, accessible)` and grow `accessible`; [`Slot::release`] restores
/// the layout above before the slot goes back on a list.
#[derive(Debug)]
struct Slot {
    base: NonNull<u8>,
    len: usize,
    /// The image mapped at offset 0; never an empty image (those map nothing). Held weakly:
    /// the mapping needs no file descriptor, so when its module is gone the image's memfd
    /// is closed at once, not when this (pooled) slot is next reused. A `Weak` keeps its
    /// allocation, so comparing it with a live image by address stays sound.
    image: Option<Weak<MemoryImage>>,
    /// Bytes of `image` mapped at offset 0 (0 without an image).
    image_len: usize,
    /// Bytes from the base that are readable and writable.
    accessible: usize,
    /// A syscall on the slot failed midway: its layout is unknown, so it is unmapped
    /// instead of reused.
    poisoned: bool,
}

// SAFETY: a slot is an address range this process owns exclusively; nothing about it is
// tied to the thread that mapped it (the image is a `Weak` of a `File`, both `Send`).
unsafe impl Send for Slot {}

/// Whether a slot holding `held` already shows `wanted` (same memfd, or both none).
fn same_image(held: Option<&Weak<MemoryImage>>, wanted: Option<&Arc<MemoryImage>>) -> bool {
    match (held, wanted) {
        (Some(held), Some(wanted)) => std::ptr::eq(held.as_ptr(), Arc::as_ptr(wanted)),
        (None, None) => true,
        _ => false,
    }
}

impl Slot {
    /// A slot of `len` bytes showing `image` (if any, and not empty) followed by zeros, with
    /// `[0, initial_bytes)` accessible: from this thread's list if it has one (best a slot
    /// already holding `image`, which then costs no syscall at all), else a new
    /// reservation.
    ///
    /// `image.len() <= initial_bytes <= 4 GiB < len` (the caller checks).
    fn acquire(len: usize, image: Option<&Arc<MemoryImage>>, initial_bytes: usize) -> Result<Slot, String> {
        let image = image.filter(|image| image.len > 0);
        debug_assert!(image.is_none_or(|image| image.len <= initial_bytes));
        debug_assert!(initial_bytes <= len);
        let pooled = FREE_SLOTS
            .try_with(|slots| {
                let mut slots = slots.borrow_mut();
                // Most recently released first among slots already holding the image; else
                // one holding nothing, else one whose image nobody else holds any more (its
                // module is gone), else the least recently released.
                let index = slots
                    .iter()
                    .rposition(|slot| slot.len == len && same_image(slot.image.as_ref(), image))
                    .or_else(|| {
                        slots
                            .iter()
                            .position(|slot| slot.len == len && slot.image.is_none())
                    })
                    .or_else(|| {
                        slots.iter().position(|slot| {
                            slot.len == len
                                && slot.image.as_ref().is_some_and(|held| held.strong_count() == 0)
                        })
                    })
                    .or_else(|| slots.iter().position(|slot| slot.len == len))?;
                Some(slots.remove(index))
            })
            .ok()
            .flatten();
        let mut slot = match pooled {
            Some(slot) => slot,
            None => Slot::reserve(len)?,
        };
        // On failure `slot` is dropped here, unmapping it whatever state it was left in.
        slot.show(image)?;
        slot.set_accessible(initial_bytes)?;
        Ok(slot)
    }

    /// Reserves a new slot: all anonymous `PROT_NONE`.
    fn reserve(len: usize) -> Result<Slot, String> {
        // SAFETY: a fresh anonymous reservation at an address of the kernel's choosing
        // touches no existing mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_os_error("reserving a linear memory"));
        }
        Ok(Slot {
            base: NonNull::new(base.cast()).expect("mmap returned a null mapping"),
            len,
            image: None,
            image_len: 0,
            accessible: 0,
            poisoned: false,
        })
    }

    /// Makes the slot (a free one, in the layout of [`Slot`]) show `image` at offset 0 and
    /// zeros after it. Nothing to do when it already does.
    fn show(&mut self, image: Option<&Arc<MemoryImage>>) -> Result<(), String> {
        if same_image(self.image.as_ref(), image) {
            return Ok(());
        }
        if self.image.is_some() {
            // Replace every byte the old image's mapping covers (and the zero pages after
            // it, which keeps the slot one anonymous run): nothing of another module stays
            // visible, even where the new image is shorter or absent.
            let blank = self.accessible;
            // SAFETY: `[base, base + accessible)` lies inside this slot, which no memory
            // uses while it is being acquired; MAP_FIXED replaces only our own mappings.
            let reset = unsafe {
                libc::mmap(
                    self.base.as_ptr().cast(),
                    blank,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if reset == libc::MAP_FAILED {
                self.poisoned = true;
                return Err(last_os_error("clearing a pooled linear memory"));
            }
            self.image = None;
            self.image_len = 0;
            self.accessible = 0;
        }
        if let Some(image) = image {
            // SAFETY: `[base, base + image.len)` lies inside the slot (image.len <= 4 GiB <
            // len), which no memory uses while it is being acquired, so MAP_FIXED replaces
            // only our own (page-less) anonymous mapping. The memfd is sealed against writes
            // and size changes.
            let mapped = unsafe {
                libc::mmap(
                    self.base.as_ptr().cast(),
                    image.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    image.file.as_raw_fd(),
                    0,
                )
            };
            if mapped == libc::MAP_FAILED {
                self.poisoned = true;
                return Err(last_os_error("mapping the memory image"));
            }
            self.image = Some(Arc::downgrade(image));
            self.image_len = image.len;
            self.accessible = self.accessible.max(image.len);
        }
        Ok(())
    }

    /// Makes exactly `[0, bytes)` readable and writable: `mprotect` of the difference, or
    /// nothing when the slot is already that size. Shrinking must not cut into the image
    /// (`bytes >= image.len`) and is only for ranges that read zero (a reset slot).
    fn set_accessible(&mut self, bytes: usize) -> Result<(), String> {
        debug_assert!(bytes <= MAX_WASM32_BYTES as usize && bytes <= self.len);
        debug_assert!(self.image_len <= bytes);
        let (from, to, protection) = match bytes.cmp(&self.accessible) {
            std::cmp::Ordering::Equal => return Ok(()),
            std::cmp::Ordering::Greater => (self.accessible, bytes, libc::PROT_READ | libc::PROT_WRITE),
            std::cmp::Ordering::Less => (bytes, self.accessible, libc::PROT_NONE),
        };
        // SAFETY: `[from, to)` lies within the slot's first 4 GiB, which this slot owns;
        // beyond the image it is anonymous, so changing its protection exposes only zero
        // pages or (shrinking) hides pages already discarded.
        let result = unsafe { libc::mprotect(self.base.as_ptr().add(from).cast(), to - from, protection) };
        if result != 0 {
            self.poisoned = true;
            return Err(last_os_error("resizing a linear memory"));
        }
        self.accessible = bytes;
        Ok(())
    }

    /// Undoes everything a tenant wrote and makes the slot `initial_bytes` long again. The
    /// image stays mapped. The slot goes back to this thread's list, or is unmapped if the
    /// list is full or a step failed.
    ///
    /// When the tenant wrote at most [`MAX_RESTORED_PAGES`] pages of the initial range,
    /// those pages are restored in place ([`Slot::restore_written_pages`]) and stay
    /// resident: no syscall besides reading the page map. Otherwise `madvise(MADV_DONTNEED)`
    /// over the accessible range drops the private copies of image pages (the image shows
    /// again) and the anonymous pages (zeros again). A grown tail is always discarded with
    /// `madvise` and goes back to `PROT_NONE` with one `mprotect`.
    fn release(mut self, initial_bytes: usize) {
        if self.poisoned {
            return drop(self);
        }
        // The initial range is restored in place if it can be; whatever is not (all of it,
        // or only a grown tail) is discarded.
        let initial = initial_bytes.min(self.accessible);
        let discard_from = if self.restore_written_pages(initial) {
            initial
        } else {
            0
        };
        if self.accessible > discard_from {
            // SAFETY: `[base + discard_from, base + accessible)` lies inside this slot, which
            // nothing references any more (its memory was dropped); discarding its pages is
            // what we want, and the mappings themselves stay.
            let result = unsafe {
                libc::madvise(
                    self.base.as_ptr().add(discard_from).cast(),
                    self.accessible - discard_from,
                    libc::MADV_DONTNEED,
                )
            };
            if result != 0 {
                return drop(self);
            }
        }
        // Only a grown tail (anonymous and just discarded) goes back to PROT_NONE.
        if self.set_accessible(initial_bytes.min(self.accessible)).is_err() {
            return drop(self);
        }
        let mut slot = Some(self);
        let _ = FREE_SLOTS.try_with(|slots| {
            let mut slots = slots.borrow_mut();
            if slots.len() < MAX_FREE_SLOTS_PER_THREAD {
                slots.push(slot.take().expect("slot pushed once"));
            }
        });
        // Otherwise `slot` is dropped here, unmapping it (and letting go of its image).
    }
}

impl Slot {
    /// Restores, in place, every page of `[0, bytes)` the tenant may have written,
    /// found with `PAGEMAP_SCAN` ([`Slot::scan_written_regions`]) or else by reading
    /// `/proc/self/pagemap`: in the image, a page whose entry is present but not
    /// a file page is a private copy-on-write copy and gets the image's bytes back; after
    /// the image, any present page gets zeros back (unless it reads zero already: the shared
    /// zero page is left alone). A swapped-out page counts as written in both. Pages not
    /// present, or present as the image's page-cache page, already read as the image or zero.
    ///
    /// `false` when the page map cannot be read, the image cannot be viewed, or more than
    /// [`MAX_RESTORED_PAGES`] pages were written (or [`MAX_CHECKED_PAGES`] zero-region pages
    /// merely read): the caller then discards the whole range instead, which also covers
    /// any pages restored before giving up.
    fn restore_written_pages(&self, bytes: usize) -> bool {
        let page = os_page_size();
        let image_len = self.image_len;
        // The memory being released holds the image, so it is alive; if not, discard.
        let image = match &self.image {
            Some(held) => match held.upgrade() {
                Some(image) => Some(image),
                None => return false,
            },
            None => None,
        };
        let view = match &image {
            Some(image) => match image.view() {
                Some(view) => Some(view),
                None => return false,
            },
            None => None,
        };
        debug_assert!(bytes <= self.accessible && image_len <= bytes);
        let pages = bytes / page;
        let first = self.base.as_ptr() as usize / page;
        let image_pages = image_len / page;
        let Some(file) = PAGEMAP
            .get_or_init(|| File::open("/proc/self/pagemap").ok())
            .as_ref()
        else {
            return false;
        };
        let scan = |buffer: &RefCell<Vec<u8>>| {
            if !SCAN_UNSUPPORTED.load(Ordering::Relaxed) && SCAN_ENABLED.try_with(Cell::get).unwrap_or(false)
            {
                let mut restorer = Restorer::new(self, page, image_pages, view);
                if let Some(done) = self.scan_written_regions(file, bytes, &mut restorer) {
                    let _ = SCAN_RESETS.try_with(|resets| resets.set(resets.get() + 1));
                    return done;
                }
                // The scan could not finish: read the page map instead. Pages restored so
                // far are private copies, so they are visited (and rewritten) again.
            }
            let mut restorer = Restorer::new(self, page, image_pages, view);
            let Ok(mut raw) = buffer.try_borrow_mut() else {
                return false;
            };
            raw.resize(PAGEMAP_CHUNK * 8, 0);
            let mut done = 0usize;
            while done < pages {
                let chunk = (pages - done).min(PAGEMAP_CHUNK);
                let raw = &mut raw[..chunk * 8];
                if file.read_exact_at(raw, ((first + done) * 8) as u64).is_err() {
                    return false;
                }
                for (offset, entry) in raw.chunks_exact(8).enumerate() {
                    let entry = u64::from_ne_bytes(entry.try_into().expect("8-byte entry"));
                    let index = done + offset;
                    let candidate = if index < image_pages {
                        entry & PAGEMAP_SWAPPED != 0
                            || (entry & PAGEMAP_PRESENT != 0 && entry & PAGEMAP_FILE == 0)
                    } else {
                        entry & (PAGEMAP_SWAPPED | PAGEMAP_PRESENT) != 0
                    };
                    if candidate && !restorer.restore(index) {
                        return false;
                    }
                }
                done += chunk;
            }
            true
        };
        PAGEMAP_BUFFER.try_with(scan).unwrap_or(false)
    }

    /// Finds the pages of `[0, bytes)` the tenant may have written with the `PAGEMAP_SCAN`
    /// ioctl on `pagemap` and restores them with `restorer`: the kernel walks the page
    /// tables and returns only runs of pages that are present or swapped, and neither file
    /// (page-cache) pages nor the shared zero page, in a few dozen bytes instead of 8 bytes
    /// per page.
    ///
    /// `Some(true)` when every such page was restored, `Some(false)` when there were too
    /// many (the caller discards), `None` when the ioctl failed or misbehaved (the caller
    /// reads the page map instead; an unknown or invalid ioctl, on kernels before 6.7, is
    /// not tried again in this process).
    fn scan_written_regions(
        &self,
        pagemap: &File,
        bytes: usize,
        restorer: &mut Restorer<'_>,
    ) -> Option<bool> {
        const MAX_PAGES: usize = MAX_RESTORED_PAGES + MAX_CHECKED_PAGES + 1;
        let base = self.base.as_ptr() as u64;
        let end = base + bytes as u64;
        let page = restorer.page as u64;
        let mut regions = [PageRegion::default(); SCAN_REGIONS];
        let mut cursor = base;
        let mut seen = 0usize;
        while cursor < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: 0,
                start: cursor,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: SCAN_REGIONS as u64,
                // Never 0 (which means no limit): `seen < MAX_PAGES` here.
                max_pages: (MAX_PAGES - seen) as u64,
                // Not a file page and not the zero page (both bits inverted, then required),
                // and present or swapped.
                category_inverted: PAGE_IS_FILE | PAGE_IS_PFNZERO,
                category_mask: PAGE_IS_FILE | PAGE_IS_PFNZERO,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            };
            // SAFETY: `arg` is a valid `struct pm_scan_arg` whose `vec` points at
            // `SCAN_REGIONS` writable `struct page_region`s that outlive the call; the
            // kernel only reads `arg`, writes `arg.walk_end` and at most `vec_len` regions,
            // and only inspects the page tables of `[start, end)`, inside this slot.
            let filled = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if filled < 0 {
                let error = std::io::Error::last_os_error().raw_os_error();
                if matches!(error, Some(libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP)) {
                    SCAN_UNSUPPORTED.store(true, Ordering::Relaxed);
                }
                return None;
            }
            let filled = usize::try_from(filled)
                .ok()
                .filter(|filled| *filled <= SCAN_REGIONS)?;
            if arg.walk_end <= cursor || arg.walk_end > end {
                return None;
            }
            for region in &regions[..filled] {
                if region.start < cursor || region.end > arg.walk_end || region.start >= region.end {
                    return None;
                }
                let mut address = region.start;
                while address < region.end {
                    seen += 1;
                    if !restorer.restore(((address - base) / page) as usize) {
                        return Some(false);
                    }
                    address += page;
                }
            }
            if seen >= MAX_PAGES && arg.walk_end < end {
                return Some(false);
            }
            cursor = arg.walk_end;
        }
        Some(true)
    }
}

/// Restores single pages of a released slot, counting them against the limits.
struct Restorer<'a> {
    slot: &'a Slot,
    page: usize,
    image_pages: usize,
    view: Option<&'a ImageView>,
    /// Pages restored (written), and zero-region pages only checked (they read zero).
    restored: usize,
    checked: usize,
}

impl<'a> Restorer<'a> {
    fn new(slot: &'a Slot, page: usize, image_pages: usize, view: Option<&'a ImageView>) -> Self {
        Self {
            slot,
            page,
            image_pages,
            view,
            restored: 0,
            checked: 0,
        }
    }

    /// Gives page `index` of the slot (in its initial range) its initial bytes back: the
    /// image's in the image, zeros after it (not written if it reads zero already). `false`
    /// once more than [`MAX_RESTORED_PAGES`] pages were restored (or [`MAX_CHECKED_PAGES`]
    /// checked): the caller discards the whole range, which also covers the pages restored
    /// so far.
    fn restore(&mut self, index: usize) -> bool {
        let page = self.page;
        debug_assert!((index + 1) * page <= self.slot.accessible);
        // SAFETY: `[index * page, (index + 1) * page)` lies in the initial range within
        // `[0, accessible)`, readable and writable, in this slot, which nothing references
        // any more (its memory was dropped), so no one else reads or writes it meanwhile.
        let target =
            unsafe { std::slice::from_raw_parts_mut(self.slot.base.as_ptr().add(index * page), page) };
        let in_image = index < self.image_pages;
        if !in_image && target.iter().all(|byte| *byte == 0) {
            // Already zero (typically the shared zero page a read mapped): writing would
            // fault in a private copy for nothing.
            self.checked += 1;
            return self.checked <= MAX_CHECKED_PAGES;
        }
        self.restored += 1;
        if self.restored > MAX_RESTORED_PAGES {
            return false;
        }
        if in_image {
            let view = self.view.expect("an image region implies a view");
            // SAFETY: `(index + 1) * page <= image_len == view.len`; the view is a
            // read-only mapping of the sealed image, distinct from the slot, alive while
            // the image `restore_written_pages` upgraded from `slot.image` is.
            let source = unsafe { std::slice::from_raw_parts(view.base.as_ptr().add(index * page), page) };
            target.copy_from_slice(source);
        } else {
            target.fill(0);
        }
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: the slot owns its whole range and nothing references it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// How many slots this thread holds for reuse (for tests and metrics).
pub fn free_slots_on_this_thread() -> usize {
    FREE_SLOTS.try_with(|slots| slots.borrow().len()).unwrap_or(0)
}

/// Whether resets on this thread find written pages with the `PAGEMAP_SCAN` ioctl when the
/// kernel has it (the default), or always read `/proc/self/pagemap` (for tests).
pub fn use_pagemap_scan_on_this_thread(enabled: bool) {
    let _ = SCAN_ENABLED.try_with(|scan| scan.set(enabled));
}

/// Whether `PAGEMAP_SCAN` has not (yet) failed as unsupported in this process.
pub fn pagemap_scan_supported() -> bool {
    !SCAN_UNSUPPORTED.load(Ordering::Relaxed)
}

/// How many resets on this thread `PAGEMAP_SCAN` completed (for tests and metrics).
pub fn pagemap_scan_resets_on_this_thread() -> usize {
    SCAN_RESETS.try_with(Cell::get).unwrap_or(0)
}

// ------------------------------------------------------------------------------------------
// The memory
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Definition {
    /// Owned here (host memories), at a stable address.
    Host(Box<std::cell::UnsafeCell<VMMemoryDefinition>>),
    /// In the instance's `VMContext`, where compiled code reads it.
    Instance(NonNull<VMMemoryDefinition>),
}

impl Definition {
    fn as_ptr(&self) -> NonNull<VMMemoryDefinition> {
        match self {
            Definition::Host(cell) => NonNull::new(cell.get()).expect("boxed definition"),
            Definition::Instance(location) => *location,
        }
    }
}

/// A wasm32 linear memory in a pooled slot, optionally starting from a copy-on-write
/// [`MemoryImage`].
#[derive(Debug)]
pub struct CowMemory {
    /// `None` only while dropping.
    slot: Option<Slot>,
    definition: Definition,
    ty: MemoryType,
    style: MemoryStyle,
    /// Current size in bytes (the accessible prefix of the slot).
    size_bytes: usize,
    /// The declared minimum in bytes: the size the slot goes back to when reset.
    initial_bytes: usize,
    /// Upper bound on growth, in bytes: the declared maximum, the plan's limit and 4 GiB.
    limit_bytes: u64,
    image: Option<Arc<MemoryImage>>,
    /// How many of the image's segments `initialize_with_data` has skipped so far.
    skipped_segments: AtomicUsize,
}

// SAFETY: the memory exclusively owns its slot; wasmer moves memories between threads with
// their store and serialises access to them as it does for `VMOwnedMemory`.
unsafe impl Send for CowMemory {}
// SAFETY: as above; `&self` methods only read, except the atomic segment counter.
unsafe impl Sync for CowMemory {}

impl CowMemory {
    /// Creates a memory of type `ty` in a (pooled) slot, mapping `image` at offset 0.
    ///
    /// # Safety
    /// When `location` is `Some`, it must point to a valid, writable `VMMemoryDefinition`
    /// that outlives this memory (the one in the instance's `VMContext`).
    unsafe fn new(
        ty: &MemoryType,
        style: &MemoryStyle,
        image: Option<Arc<MemoryImage>>,
        max_bytes: Option<u64>,
        location: Option<NonNull<VMMemoryDefinition>>,
    ) -> Result<CowMemory, MemoryError> {
        if ty.minimum > Pages::max_value() {
            return Err(MemoryError::MinimumMemoryTooLarge {
                min_requested: ty.minimum,
                max_allowed: Pages::max_value(),
            });
        }
        if let Some(maximum) = ty.maximum {
            if maximum > Pages::max_value() {
                return Err(MemoryError::MaximumMemoryTooLarge {
                    max_requested: maximum,
                    max_allowed: Pages::max_value(),
                });
            }
            if maximum < ty.minimum {
                return Err(MemoryError::InvalidMemory {
                    reason: format!(
                        "the maximum ({} pages) is less than the minimum ({} pages)",
                        maximum.0, ty.minimum.0
                    ),
                });
            }
        }
        let page = WASM_PAGE_SIZE as u64;
        let mut limit_bytes = MAX_WASM32_BYTES;
        if let Some(maximum) = ty.maximum {
            limit_bytes = limit_bytes.min(u64::from(maximum.0) * page);
        }
        if let Some(max_bytes) = max_bytes {
            limit_bytes = limit_bytes.min(max_bytes);
        }
        let initial_bytes = u64::from(ty.minimum.0) * page;
        if initial_bytes > limit_bytes {
            return Err(MemoryError::MinimumMemoryTooLarge {
                min_requested: ty.minimum,
                max_allowed: Pages((limit_bytes / page) as u32),
            });
        }
        let initial_bytes = initial_bytes as usize;

        let bound = MemoryStyle::static_bound().bytes().0;
        let guard = usize::try_from(style.offset_guard_size())
            .map_err(|error| MemoryError::Generic(format!("offset guard: {error}")))?;
        let slot_len = bound
            .checked_add(guard)
            .ok_or_else(|| MemoryError::Generic("slot size overflows".into()))?;
        // The slot comes with the image mapped and the initial pages accessible.
        let slot = Slot::acquire(slot_len, image.as_ref(), initial_bytes).map_err(MemoryError::Region)?;
        let base = slot.base.as_ptr();
        let mut memory = CowMemory {
            slot: Some(slot),
            definition: match location {
                Some(location) => Definition::Instance(location),
                None => Definition::Host(Box::new(std::cell::UnsafeCell::new(VMMemoryDefinition {
                    base,
                    current_length: 0,
                }))),
            },
            ty: *ty,
            style: *style,
            size_bytes: initial_bytes,
            initial_bytes,
            limit_bytes,
            image,
            skipped_segments: AtomicUsize::new(0),
        };
        memory.publish();
        Ok(memory)
    }

    /// Makes the slot's first `to` bytes readable and writable (the new ones: zero pages).
    fn make_accessible(&mut self, to: usize) -> Result<(), MemoryError> {
        let slot = self.slot.as_mut().expect("live memory has a slot");
        if to <= slot.accessible {
            return Ok(());
        }
        slot.set_accessible(to).map_err(MemoryError::Region)
    }

    /// Writes base and length where compiled code reads them.
    fn publish(&mut self) {
        let base = self.slot.as_ref().expect("live memory has a slot").base;
        let mut definition = self.definition.as_ptr();
        // SAFETY: the definition is either boxed here or the `VMContext` location the
        // creator promised is valid for this memory's lifetime; wasmer does not access it
        // concurrently with `&mut self` methods.
        unsafe {
            let definition = definition.as_mut();
            definition.base = base.as_ptr();
            definition.current_length = self.size_bytes;
        }
    }

    fn could_not_grow(&self, delta: Pages) -> MemoryError {
        MemoryError::CouldNotGrow {
            current: self.size(),
            attempted_delta: delta,
        }
    }

    /// Whether this memory was created from an image (for tests and metrics).
    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// The skipped call must be the next segment of the image, with the image's bytes.
    fn matches_next_segment(&self, image: &MemoryImage, start: usize, data: &[u8]) -> Option<bool> {
        let index = self.skipped_segments.load(Ordering::Relaxed);
        let &(offset, len) = image.segments.get(index)?;
        if offset != start || len != data.len() {
            return Some(false);
        }
        // Sample the segment's ends; later segments may overwrite earlier ones in the
        // image, so only compare a segment no later segment overlaps.
        let overlapped = image.segments[index + 1..]
            .iter()
            .any(|&(other, other_len)| other < start + len && start < other + other_len);
        if !overlapped {
            let base = self.slot.as_ref().expect("live memory has a slot").base;
            let head = len.min(SEGMENT_CHECK_BYTES);
            let tail = len - len.min(SEGMENT_CHECK_BYTES);
            // SAFETY: `[start, start + len)` lies in the initial memory (checked by wasmer
            // against `current_length` before calling), which is mapped readable.
            let mapped = unsafe { std::slice::from_raw_parts(base.as_ptr().add(start), len) };
            if mapped[..head] != data[..head] || mapped[tail..] != data[tail..] {
                return Some(false);
            }
        }
        Some(true)
    }
}

impl Drop for CowMemory {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.release(self.initial_bytes);
        }
    }
}

impl LinearMemory for CowMemory {
    fn ty(&self) -> MemoryType {
        let mut ty = self.ty;
        ty.minimum = self.size();
        ty
    }

    fn size(&self) -> Pages {
        Pages((self.size_bytes / WASM_PAGE_SIZE) as u32)
    }

    fn style(&self) -> MemoryStyle {
        self.style
    }

    fn grow(&mut self, delta: Pages) -> Result<Pages, MemoryError> {
        let previous = self.size();
        if delta.0 == 0 {
            return Ok(previous);
        }
        let new_bytes = u64::from(previous.0) + u64::from(delta.0);
        let new_bytes = new_bytes * WASM_PAGE_SIZE as u64;
        if new_bytes > self.limit_bytes {
            return Err(self.could_not_grow(delta));
        }
        let new_bytes = new_bytes as usize;
        self.make_accessible(new_bytes)?;
        self.size_bytes = new_bytes;
        self.publish();
        Ok(previous)
    }

    fn grow_at_least(&mut self, min_size: u64) -> Result<(), MemoryError> {
        let current = self.size_bytes as u64;
        if current < min_size {
            let pages = (min_size - current).div_ceil(WASM_PAGE_SIZE as u64);
            let pages = u32::try_from(pages).map_err(|_| self.could_not_grow(Pages(u32::MAX)))?;
            self.grow(Pages(pages))?;
        }
        Ok(())
    }

    fn vmmemory(&self) -> NonNull<VMMemoryDefinition> {
        self.definition.as_ptr()
    }

    fn try_clone(&self) -> Result<Box<dyn LinearMemory + Send + Sync + 'static>, MemoryError> {
        Err(MemoryError::MemoryNotShared)
    }

    /// # Safety
    /// As for [`LinearMemory::initialize_with_data`]: `start + data.len()` must lie within
    /// the current memory (wasmer checks it before calling).
    unsafe fn initialize_with_data(&self, start: usize, data: &[u8]) -> Result<(), Trap> {
        if let Some(image) = &self.image {
            match self.matches_next_segment(image, start, data) {
                Some(true) => {
                    // The image already holds this segment.
                    self.skipped_segments.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Some(false) => {
                    return Err(Trap::user(
                        "the memory image does not belong to this module's data segments".into(),
                    ));
                }
                None => {} // Past the active segments: `memory.init`, copy.
            }
        }
        if start
            .checked_add(data.len())
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(Trap::lib(TrapCode::HeapAccessOutOfBounds));
        }
        let base = self.slot.as_ref().expect("live memory has a slot").base;
        // SAFETY: `[start, start + data.len())` is within the accessible memory (checked
        // above); `data` comes from the module, never from this memory.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), base.as_ptr().add(start), data.len());
        }
        Ok(())
    }

    /// A new memory (in its own slot, without an image) holding a copy of this one.
    fn copy(&self) -> Result<Box<dyn LinearMemory + Send + Sync + 'static>, MemoryError> {
        // SAFETY: a host memory: no `VMContext` location.
        let mut copy = unsafe { CowMemory::new(&self.ty, &self.style, None, Some(self.limit_bytes), None)? };
        let current = self.size();
        if current > copy.size() {
            copy.grow(Pages(current.0 - copy.size().0))?;
        }
        let source = self.slot.as_ref().expect("live memory has a slot").base;
        let target = copy.slot.as_ref().expect("live memory has a slot").base;
        // SAFETY: both memories have `size_bytes` accessible bytes at their bases, in
        // distinct slots.
        unsafe {
            std::ptr::copy_nonoverlapping(source.as_ptr(), target.as_ptr(), self.size_bytes);
        }
        Ok(Box::new(copy))
    }
}
