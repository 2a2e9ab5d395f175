//! A slot: one reserved 8 GiB region a linear memory lives in, the syscalls that show an
//! image in it and size it, and this thread's list of reset slots kept for reuse. Every
//! `mmap`, `mprotect` and `madvise` on a slot is here, beside the layout invariant they
//! keep (see [`Slot`]); which free slot to take is decided in `free_list`.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Weak};

use super::MAX_WASM32_BYTES;
use super::error::CowError;
use super::free_list::{Fit, FreeList};
use super::image::MemoryImage;

/// How many reset slots each thread keeps for reuse.
pub const MAX_FREE_SLOTS_PER_THREAD: usize = 16;

thread_local! {
    static FREE_SLOTS: RefCell<FreeList<Slot>> =
        const { RefCell::new(FreeList::new(MAX_FREE_SLOTS_PER_THREAD)) };
}

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
pub(super) struct Slot {
    pub(super) base: NonNull<u8>,
    pub(super) len: usize,
    /// The image mapped at offset 0; never an empty image (those map nothing). Held weakly:
    /// the mapping needs no file descriptor, so when its module is gone the image's memfd
    /// is closed at once, not when this (pooled) slot is next reused. A `Weak` keeps its
    /// allocation, so comparing it with a live image by address stays sound.
    pub(super) image: Option<Weak<MemoryImage>>,
    /// Bytes of `image` mapped at offset 0 (0 without an image).
    pub(super) image_len: usize,
    /// Bytes from the base that are readable and writable.
    pub(super) accessible: usize,
    /// A syscall on the slot failed midway: its layout is unknown, so it is unmapped
    /// instead of reused.
    poisoned: bool,
}

#[allow(unsafe_code)]
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
    /// How this free slot stands towards a memory of `len` bytes wanting `image` (never an
    /// empty one); `None` when it is another size.
    fn fit(&self, len: usize, image: Option<&Arc<MemoryImage>>) -> Option<Fit> {
        if self.len != len {
            return None;
        }
        Some(match &self.image {
            _ if same_image(self.image.as_ref(), image) => Fit::Same,
            None => Fit::Blank,
            Some(held) if held.strong_count() == 0 => Fit::Orphaned,
            Some(_) => Fit::Other,
        })
    }

    /// A slot of `len` bytes showing `image` (if any, and not empty) followed by zeros, with
    /// `[0, initial_bytes)` accessible: from this thread's list if it has one (best a slot
    /// already holding `image`, which then costs no syscall at all), else a new
    /// reservation.
    ///
    /// `image.len() <= initial_bytes <= 4 GiB < len` (the caller checks).
    pub(super) fn acquire(
        len: usize,
        image: Option<&Arc<MemoryImage>>,
        initial_bytes: usize,
    ) -> Result<Slot, CowError> {
        let image = image.filter(|image| image.len > 0);
        debug_assert!(image.is_none_or(|image| image.len <= initial_bytes));
        debug_assert!(initial_bytes <= len);
        let pooled = FREE_SLOTS
            .try_with(|slots| slots.borrow_mut().take(|slot| slot.fit(len, image)))
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
    #[allow(unsafe_code)]
    fn reserve(len: usize) -> Result<Slot, CowError> {
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
            return Err(CowError::Reserve(std::io::Error::last_os_error()));
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
    #[allow(unsafe_code)]
    fn show(&mut self, image: Option<&Arc<MemoryImage>>) -> Result<(), CowError> {
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
                return Err(CowError::Blank(std::io::Error::last_os_error()));
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
                return Err(CowError::MapImage(std::io::Error::last_os_error()));
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
    #[allow(unsafe_code)]
    pub(super) fn set_accessible(&mut self, bytes: usize) -> Result<(), CowError> {
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
            return Err(CowError::Resize(std::io::Error::last_os_error()));
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
    ///
    /// [`MAX_RESTORED_PAGES`]: super::MAX_RESTORED_PAGES
    #[allow(unsafe_code)]
    pub(super) fn release(mut self, initial_bytes: usize) {
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
            slot = slots
                .borrow_mut()
                .push(slot.take().expect("slot pushed once"))
                .err();
        });
        // Otherwise `slot` is dropped here, unmapping it (and letting go of its image).
    }
}

impl Drop for Slot {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the slot owns its whole range and nothing references it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// How many slots this thread holds for reuse (for tests and metrics).
pub fn free_slots_on_this_thread() -> usize {
    FREE_SLOTS.try_with(|slots| slots.borrow().len()).unwrap_or(0)
}
