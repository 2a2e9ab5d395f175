//! Resetting a released slot in place: the page map (`PAGEMAP_SCAN`, or a `pread` of
//! `/proc/self/pagemap`) says which pages a tenant wrote, and only those get their initial
//! bytes back. Kept apart from the slot's own syscalls because it is the part with kernel
//! ABI (`struct pm_scan_arg`, page-map entry bits) and its own fallbacks; it adds
//! [`Slot::restore_written_pages`], which [`Slot::release`] calls.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::image::ImageView;
use super::os_page_size;
use super::slot::Slot;

thread_local! {
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
    pub(super) fn restore_written_pages(&self, bytes: usize) -> bool {
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
    #[allow(unsafe_code)]
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
    #[allow(unsafe_code)]
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
