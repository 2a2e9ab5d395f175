//! The wasmer side: tunables that create [`CowMemory`]s (a pooled slot, optionally showing
//! an image) for instantiations armed with a [`MemoryPlan`], and the `LinearMemory` those
//! memories implement. Everything that speaks wasmer's VM interfaces is here, so the
//! image, slot and page-map code below it never sees wasmer's VM types.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmer::sys::vm::{
    LinearMemory, MemoryError, MemoryStyle, TableStyle, Trap, TrapCode, VMMemory, VMMemoryDefinition,
    VMTable, VMTableDefinition,
};
use wasmer::sys::{BaseTunables, NativeEngineExt, Tunables};
use wasmer::{MemoryType, Pages, TableType, WASM_PAGE_SIZE};

use super::MAX_WASM32_BYTES;
use super::image::MemoryImage;
use super::slot::Slot;

/// Bytes sampled at each end of a skipped data segment to check the image matches.
const SEGMENT_CHECK_BYTES: usize = 16;

thread_local! {
    static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
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
    #[allow(unsafe_code)]
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
    #[allow(unsafe_code)]
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
    #[allow(unsafe_code)]
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

#[allow(unsafe_code)]
// SAFETY: the memory exclusively owns its slot; wasmer moves memories between threads with
// their store and serialises access to them as it does for `VMOwnedMemory`.
unsafe impl Send for CowMemory {}
#[allow(unsafe_code)]
// SAFETY: as above; `&self` methods only read, except the atomic segment counter.
unsafe impl Sync for CowMemory {}

impl CowMemory {
    /// Creates a memory of type `ty` in a (pooled) slot, mapping `image` at offset 0.
    ///
    /// # Safety
    /// When `location` is `Some`, it must point to a valid, writable `VMMemoryDefinition`
    /// that outlives this memory (the one in the instance's `VMContext`).
    #[allow(unsafe_code)]
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
        let slot = Slot::acquire(slot_len, image.as_ref(), initial_bytes)?;
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
        Ok(slot.set_accessible(to)?)
    }

    /// Writes base and length where compiled code reads them.
    #[allow(unsafe_code)]
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
    #[allow(unsafe_code)]
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
    #[allow(unsafe_code)]
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
    #[allow(unsafe_code)]
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
