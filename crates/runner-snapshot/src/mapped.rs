//! Zero-copy CPU restore: a snapshot's arenas mapped copy-on-write (`MAP_PRIVATE`) from the
//! page cache, each tensor's storage a `Vec` that points into the mapping.
//!
//! candle's CPU tensors own a `Vec`, and a `Vec` frees its buffer through the global
//! allocator. [`SnapshotAllocator`] is that allocator (it wraps the system one): it hands
//! out a pointer into a registered mapping when the restore asks for one, and when such a
//! buffer is freed it counts the region's live buffers down and unmaps the region after the
//! last one. Every other allocation goes straight to the system allocator; the only extra
//! work is one relaxed atomic load while no mapping is live.
//!
//! The restore uses mappings only when a binary installed the allocator
//! (`#[global_allocator]`); a library user without it gets the copying restore.
//!
//! Why: copying into fresh memory costs a page fault and a zeroed page per 4 KiB, which
//! held the copying restore to 26–43 % of the page-cache read bandwidth on the 2-core VM.
//! A mapping shares the page-cache pages instead (nothing copied, nothing zeroed, and the
//! weights are in memory once rather than twice), and the checksum pass that every restore
//! runs anyway is what faults the pages in. A page is copied only if something writes to
//! it, which candle does not do to weights.
//!
//! The price, as with llama.cpp's and safetensors' mmap loading: truncating the snapshot
//! file in place while a server uses it makes the server fault (SIGBUS). runner's own
//! writers never do that (they write a temporary file and rename it over the old one,
//! whose pages stay valid for the server that maps them).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The global allocator that lets restored CPU tensors live in a snapshot's mapping.
/// Install it in a binary with
/// `#[global_allocator] static ALLOC: runner_snapshot::SnapshotAllocator = runner_snapshot::SnapshotAllocator;`
pub struct SnapshotAllocator;

/// Most mappings live at once (one per arena of each restored model); past that the
/// restore copies instead.
const SLOTS: usize = 64;

struct Slot {
    /// The mapping's first byte, 0 while the slot is free.
    start: AtomicUsize,
    len: AtomicUsize,
    /// Buffers handed out from the mapping, plus one while the restore holds it.
    live: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array
const FREE_SLOT: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    live: AtomicUsize::new(0),
};
static SLOT_TABLE: [Slot; SLOTS] = [FREE_SLOT; SLOTS];
/// Registered mappings; 0 keeps every free on the fast path.
static MAPPINGS_LIVE: AtomicUsize = AtomicUsize::new(0);
/// One past the highest slot ever claimed: a free scans only that far (slots are claimed
/// lowest first, so usually one or two).
static SLOTS_USED: AtomicUsize = AtomicUsize::new(0);
/// Set by the allocator's first allocation: proof that it is the global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The pointer and size the next allocation of exactly that size on this thread
    /// receives (set for the span of one `Vec::with_capacity`).
    static HAND_OUT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

fn slot_of(ptr: usize) -> Option<&'static Slot> {
    let used = SLOTS_USED.load(Ordering::Acquire);
    SLOT_TABLE[..used].iter().find(|s| {
        let start = s.start.load(Ordering::Acquire);
        start != 0 && ptr >= start && ptr < start + s.len.load(Ordering::Acquire)
    })
}

fn release(slot: &Slot) {
    if slot.live.fetch_sub(1, Ordering::AcqRel) == 1 {
        let start = slot.start.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Acquire);
        slot.len.store(0, Ordering::Release);
        // Clearing `start` frees the slot for the next mapping.
        slot.start.store(0, Ordering::Release);
        MAPPINGS_LIVE.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: the region was mapped by `Mapping::new` and its last user just let go.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
    }
}

// SAFETY: every pointer this returns is either the system allocator's or a registered
// mapping's (page-aligned base; hand-outs are checked against the layout's alignment),
// and each is released by the matching path in `dealloc`/`realloc`.
unsafe impl GlobalAlloc for SnapshotAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        if MAPPINGS_LIVE.load(Ordering::Relaxed) != 0 {
            let (ptr, size) = HAND_OUT.with(|h| h.get());
            if ptr != 0 && size == layout.size() && ptr.is_multiple_of(layout.align()) {
                HAND_OUT.with(|h| h.set((0, 0)));
                return ptr as *mut u8;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if MAPPINGS_LIVE.load(Ordering::Acquire) != 0 {
            if let Some(slot) = slot_of(ptr as usize) {
                return release(slot);
            }
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if MAPPINGS_LIVE.load(Ordering::Acquire) != 0 {
            if let Some(slot) = slot_of(ptr as usize) {
                // A mapped buffer that grows or shrinks moves to ordinary memory.
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let moved = System.alloc(new_layout);
                if !moved.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    release(slot);
                }
                return moved;
            }
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Whether [`SnapshotAllocator`] is this process's global allocator.
pub fn allocator_installed() -> bool {
    // An allocation through the global allocator sets the flag if it is ours.
    drop(std::hint::black_box(Box::new(0u64)));
    INSTALLED.load(Ordering::Relaxed)
}

/// One private, copy-on-write mapping of a byte range of a file, registered with the
/// allocator. The restore (or a cold load of safetensors weights) holds one reference;
/// every buffer taken from it holds another.
pub struct Mapping {
    slot: &'static Slot,
    /// Where the requested range starts inside the mapping (the mapping itself starts on a
    /// page boundary).
    base: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `file` from `offset`; `None` when no slot is free (the caller
    /// copies instead).
    pub fn new(file: &File, offset: u64, len: usize) -> std::io::Result<Option<Mapping>> {
        let page = crate::page_size() as u64;
        let start = offset / page * page;
        let lead = (offset - start) as usize;
        let map_len = lead + len;
        // SAFETY: a fresh mapping of a file we hold open; nothing else refers to it yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the range was just mapped; the advice only steers readahead (the two are
        // separate calls: madvise's advice values are not flags).
        unsafe {
            libc::madvise(ptr, map_len, libc::MADV_SEQUENTIAL);
            libc::madvise(ptr, map_len, libc::MADV_WILLNEED);
        }
        Ok(Self::register(ptr, map_len, lead, len))
    }

    /// `len` bytes of fresh anonymous memory (zero pages until written), page-aligned and
    /// rounded up to whole pages, registered like a file mapping: a direct read fills it
    /// and tensors take buffers from it. `None` when no slot is free.
    pub fn anonymous(len: usize) -> std::io::Result<Option<Mapping>> {
        let map_len = len.max(1).next_multiple_of(crate::page_size());
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self::register(ptr, map_len, 0, len))
    }

    /// Claims a slot for a fresh mapping of `map_len` bytes at `ptr`, whose useful `len`
    /// bytes start `lead` bytes in; unmaps it and answers `None` when every slot is taken.
    fn register(ptr: *mut libc::c_void, map_len: usize, lead: usize, len: usize) -> Option<Self> {
        let claimed = SLOT_TABLE.iter().enumerate().find(|(_, s)| {
            s.start
                .compare_exchange(0, ptr as usize, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        let Some((index, slot)) = claimed else {
            // SAFETY: nothing was handed out from the mapping.
            unsafe { libc::munmap(ptr, map_len) };
            return None;
        };
        slot.live.store(1, Ordering::Release);
        slot.len.store(map_len, Ordering::Release);
        SLOTS_USED.fetch_max(index + 1, Ordering::AcqRel);
        MAPPINGS_LIVE.fetch_add(1, Ordering::AcqRel);
        Some(Mapping {
            slot,
            base: ptr as usize + lead,
            len,
        })
    }

    /// The first byte of the mapping's useful range, for filling an anonymous mapping
    /// from several threads (each writes its own bytes, before any buffer is taken).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Bytes mapped from [`as_mut_ptr`](Self::as_mut_ptr) on: the useful length rounded
    /// up to whole pages past the range's start.
    pub fn capacity(&self) -> usize {
        let start = self.slot.start.load(Ordering::Acquire);
        start + self.slot.len.load(Ordering::Acquire) - self.base
    }

    /// The mapped bytes (read-only here: the restore only checks them).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes from `base` are mapped for as long as `self` holds its
        // reference.
        unsafe { std::slice::from_raw_parts(self.base as *const u8, self.len) }
    }

    /// A vector of `n` values of `T` over the mapped bytes from `offset`, or `None` where
    /// the allocator did not hand the mapping out (the caller copies instead). `T` must be
    /// a plain number type for which every bit pattern is a value.
    pub fn take_vec<T: Copy>(&self, offset: usize, n: usize) -> Option<Vec<T>> {
        let bytes = n.checked_mul(std::mem::size_of::<T>())?;
        if n == 0 || offset.checked_add(bytes)? > self.len {
            return None;
        }
        let ptr = self.base + offset;
        if !ptr.is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        self.slot.live.fetch_add(1, Ordering::AcqRel);
        HAND_OUT.with(|h| h.set((ptr, bytes)));
        let mut v = Vec::<T>::with_capacity(n);
        HAND_OUT.with(|h| h.set((0, 0)));
        if v.as_ptr() as usize != ptr {
            // Not handed out (another global allocator): `v` is ordinary memory.
            release(self.slot);
            return None;
        }
        if v.capacity() != n {
            return None; // dropping `v` gives its reference back
        }
        // SAFETY: the capacity is `n`, and the mapped bytes are initialised file contents,
        // a valid value of `T` whatever they are.
        unsafe { v.set_len(n) };
        Some(v)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        release(self.slot);
    }
}

/// Mappings live right now (for tests: freed tensors must unmap their region).
pub fn live_mappings() -> usize {
    MAPPINGS_LIVE.load(Ordering::Acquire)
}
