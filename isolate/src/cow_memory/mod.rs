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
//!
//! # Where things are
//!
//! - `image`: [`MemoryImage`], its sealed memfd and the read-only view resets copy from;
//!   which module layouts it can express. The module is parsed by `crate::layout`, which
//!   the snapshot rewriter reads too.
//! - `slot`: a slot and the syscalls on it (`mmap`, `mprotect`, `madvise`, `munmap`),
//!   acquire and release, and this thread's free list.
//! - `free_list`: which free slot an acquire takes, and the capped list itself, as plain
//!   data without any mapping (unit-tested on their own).
//! - `pagemap`: restoring a released slot in place from the page map (`PAGEMAP_SCAN` or
//!   `pread`).
//! - `tunables`: arming ([`MemoryPlan`], [`instantiate_with`]), [`CowTunables`] and
//!   [`CowMemory`], the `LinearMemory` wasmer drives.
//! - `error`: [`CowError`], which step or syscall failed.
//!
//! `unsafe` is allowed item by item (the crate denies it), each use with its `SAFETY`
//! comment.
//!
//! [`BaseTunables`]: wasmer::sys::BaseTunables
//! [`Tunables`]: wasmer::sys::Tunables

use std::sync::OnceLock;

mod error;
mod free_list;
mod image;
mod pagemap;
mod slot;
mod tunables;

pub use error::CowError;
pub use image::{MemoryImage, declared_minimum_bytes};
pub use pagemap::{
    MAX_RESTORED_PAGES, pagemap_scan_resets_on_this_thread, pagemap_scan_supported,
    use_pagemap_scan_on_this_thread,
};
pub use slot::{MAX_FREE_SLOTS_PER_THREAD, free_slots_on_this_thread};
pub use tunables::{CowMemory, CowTunables, MemoryPlan, install, instantiate_with};

/// The largest 32-bit linear memory, in bytes (4 GiB).
const MAX_WASM32_BYTES: u64 = 1 << 32;

/// The OS page size (4096 if `sysconf` does not say).
#[allow(unsafe_code)]
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
