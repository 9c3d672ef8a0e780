//! Process-wide allocator tuning for the `empf` binary (the one piece of FFI outside the kernels).
//!
//! The binary's global allocator is mimalloc. By default mimalloc returns ("purges") freed pages to
//! the OS after 10 ms; the trainer frees and re-allocates activation tensors of several MB at every
//! time-step, so each step page-faults them back in and the kernel zeroes them again (about 10^5
//! page faults per `mnist-cnn` batch, ~10% of a training step). [`keep_freed_pages`] turns purging
//! off, so freed pages are reused warm; resident memory then stays at its high-water mark.

use std::alloc::{GlobalAlloc, Layout};
use std::os::raw::{c_int, c_long};

// Link mimalloc even where nothing else uses it (this crate's own tests): it defines the two
// functions declared below.
extern crate libmimalloc_sys as _;

// mimalloc's `mi_option_purge_delay` (enum `mi_option_e` in mimalloc.h, v2 and v3: index 15).
const MI_OPTION_PURGE_DELAY: c_int = 15;

unsafe extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
    fn mi_option_get(option: c_int) -> c_long;
}

/// Never return freed pages to the OS (mimalloc `purge_delay = -1`, as the environment variable
/// `MIMALLOC_PURGE_DELAY=-1` would). Does nothing when that variable is set (the user's choice
/// wins). Returns the purge delay in force afterwards (ms; −1 = never).
pub fn keep_freed_pages() -> i64 {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` only stores a value in mimalloc's option table (thread-safe,
        // may be called at any time); index 15 is `mi_option_purge_delay` in the linked mimalloc
        // (libmimalloc-sys 0.1.x, v2 and v3 headers), and -1 is a documented value of it.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // SAFETY: `mi_option_get` reads mimalloc's option table; any index below `_mi_option_last`
    // is valid.
    let v = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
    #[allow(clippy::useless_conversion)] // `c_long` is `i32` on some targets
    i64::from(v)
}

/// A global-allocator wrapper that keeps freed large blocks (≥ [`BlockCache::MIN_BLOCK`]) and
/// hands them back to the next request of the same rounded size.
///
/// A training step allocates and frees the same activation, gradient and cache tensors (several
/// MB each) at every time-step. Passed straight to a general-purpose allocator, that churn
/// fragments its arenas: resident memory drifts to about twice the live bytes, and by how much
/// depends on which thread happened to free which block (run-to-run noise of ±10 % in peak RSS).
/// With exact-size reuse a repeating step touches the same blocks every time, so resident memory
/// is the live peak of each block size and does not creep with the number of time-steps; reuse
/// also skips the page faults of fresh memory.
///
/// Blocks are rounded up to [`BlockCache::GRAIN`] and allocated from `A` with 64-byte alignment
/// (requests with a larger alignment pass through). At most [`BlockCache::SLOTS`] blocks and
/// `cap` bytes are kept; a block that does not fit is returned to `A`.
pub struct BlockCache<A> {
    inner: A,
    cap: usize,
    free: std::sync::Mutex<Slots>,
}

/// One kept block.
#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    size: usize,
    /// `misses` when the block was kept.
    stamp: u64,
}

struct Slots {
    slot: [Slot; BlockCache::<()>::SLOTS],
    len: usize,
    bytes: usize,
    /// Requests no kept block could serve.
    misses: u64,
}

impl Slots {
    /// Drop entry `i` (swap-remove) and return it.
    fn remove(&mut self, i: usize) -> Slot {
        let s = self.slot[i];
        self.len -= 1;
        self.slot[i] = self.slot[self.len];
        self.bytes -= s.size;
        s
    }
}

/// Blocks handed back to the inner allocator by one miss (at most).
const RELEASE: usize = 4;

impl<A> BlockCache<A> {
    /// Smallest block size kept (64 KiB: the GEMM packing buffers are of this order).
    pub const MIN_BLOCK: usize = 64 << 10;
    /// Block sizes are rounded up to a multiple of this (64 KiB).
    pub const GRAIN: usize = 64 << 10;
    /// Most blocks kept at once.
    pub const SLOTS: usize = 256;
    /// The cap of the `empf` binary and its profiling examples (1 GiB of freed blocks).
    pub const DEFAULT_CAP: usize = 1 << 30;
    const ALIGN: usize = 64;

    /// Wrap `inner`, keeping at most `cap` bytes of freed blocks.
    pub const fn new(inner: A, cap: usize) -> Self {
        BlockCache {
            inner,
            cap,
            free: std::sync::Mutex::new(Slots {
                slot: [Slot {
                    ptr: 0,
                    size: 0,
                    stamp: 0,
                }; BlockCache::<()>::SLOTS],
                len: 0,
                bytes: 0,
                misses: 0,
            }),
        }
    }

    /// The layout a block of `layout` is allocated with, when it is one this cache handles.
    fn block(layout: Layout) -> Option<Layout> {
        if layout.size() < Self::MIN_BLOCK || layout.align() > Self::ALIGN {
            return None;
        }
        let size = layout.size().checked_next_multiple_of(Self::GRAIN)?;
        Layout::from_size_align(size, Self::ALIGN).ok()
    }

    /// Keep `p` (a block of `size` bytes); false when the cache is full.
    fn keep(&self, p: *mut u8, size: usize) -> bool {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if f.len == Self::SLOTS || f.bytes + size > self.cap {
            return false;
        }
        let n = f.len;
        f.slot[n] = Slot {
            ptr: p as usize,
            size,
            stamp: f.misses,
        };
        f.len += 1;
        f.bytes += size;
        true
    }

    /// Misses after which a kept block that was never reused goes back to the inner allocator.
    pub const STALE: u64 = 64;

    /// Bytes held in freed blocks.
    pub fn cached_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

impl<A: GlobalAlloc> BlockCache<A> {
    /// A kept block of exactly `size` bytes, or `None`. On a miss, blocks kept for more than
    /// [`BlockCache::STALE`] misses (sizes the program stopped asking for: a phase with other
    /// shapes began) go back to `inner`, at most [`RELEASE`] per miss.
    fn reuse(&self, size: usize) -> Option<*mut u8> {
        let mut stale = [None; RELEASE];
        {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = f.slot[..f.len].iter().position(|s| s.size == size) {
                return Some(f.remove(i).ptr as *mut u8);
            }
            f.misses += 1;
            let (mut i, mut n) = (0, 0);
            while i < f.len && n < RELEASE {
                if f.misses - f.slot[i].stamp > Self::STALE {
                    stale[n] = Some(f.remove(i));
                    n += 1;
                } else {
                    i += 1;
                }
            }
        }
        for s in stale.into_iter().flatten() {
            let l = Layout::from_size_align(s.size, Self::ALIGN).expect("a kept layout");
            // SAFETY: kept blocks were allocated by `inner` with `(size, ALIGN)`, and this one
            // was just removed from the cache, so nobody else owns it.
            unsafe { self.inner.dealloc(s.ptr as *mut u8, l) };
        }
        None
    }
}

// SAFETY: every block handed out is either a fresh block from `inner` (with the layout `block`
// computes, which `dealloc` recomputes from the caller's layout) or a block of exactly that layout
// that `inner` allocated earlier and a caller freed; kept blocks are owned by the cache alone until
// handed out again. Requests `block` does not handle go to `inner` unchanged.
unsafe impl<A: GlobalAlloc> GlobalAlloc for BlockCache<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::block(layout) {
            // SAFETY: `b` has a non-zero size (≥ MIN_BLOCK).
            Some(b) => self
                .reuse(b.size())
                .unwrap_or_else(|| unsafe { self.inner.alloc(b) }),
            // SAFETY: forwarded as given.
            None => unsafe { self.inner.alloc(layout) },
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::block(layout) {
            Some(b) => match self.reuse(b.size()) {
                Some(p) => {
                    // SAFETY: `p` is a block of `b.size() ≥ layout.size()` bytes owned by us.
                    unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                    p
                }
                // SAFETY: non-zero size.
                None => unsafe { self.inner.alloc_zeroed(b) },
            },
            // SAFETY: forwarded as given.
            None => unsafe { self.inner.alloc_zeroed(layout) },
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match Self::block(layout) {
            Some(b) => {
                if !self.keep(ptr, b.size()) {
                    // SAFETY: `ptr` was allocated by `inner` with layout `b`.
                    unsafe { self.inner.dealloc(ptr, b) }
                }
            }
            // SAFETY: forwarded as given.
            None => unsafe { self.inner.dealloc(ptr, layout) },
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (Self::block(layout), Self::block(new)) {
            // SAFETY: forwarded as given (neither size is a cached block).
            (None, None) => unsafe { self.inner.realloc(ptr, layout, new_size) },
            // the same block still fits
            (Some(a), Some(b)) if a.size() == b.size() => ptr,
            _ => {
                // SAFETY: `new` has a non-zero size (new_size ≥ 1 per the GlobalAlloc contract);
                // both blocks are valid for the copied length; the old block is freed once.
                unsafe {
                    let p = self.alloc(new);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    p
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BlockCache;
    use std::alloc::{GlobalAlloc, Layout, System};

    const MB: usize = 1 << 20;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    #[test]
    fn block_cache_reuses_freed_blocks_of_the_same_rounded_size_and_zeroes_them() {
        let c = BlockCache::new(System, 64 * MB);
        unsafe {
            let a = c.alloc(layout(3 * MB + 5));
            a.write_bytes(7, 3 * MB + 5);
            c.dealloc(a, layout(3 * MB + 5));
            assert_eq!(c.cached_bytes(), 3 * MB + BlockCache::<System>::GRAIN);
            // another size: a fresh block; the same rounded size: the kept one
            let b = c.alloc(layout(5 * MB));
            assert_ne!(a, b);
            let z = c.alloc_zeroed(layout(3 * MB + 100));
            assert_eq!(z, a);
            assert!(
                std::slice::from_raw_parts(z, 3 * MB + 100)
                    .iter()
                    .all(|&v| v == 0)
            );
            assert_eq!(c.cached_bytes(), 0);
            // small requests pass through and are not kept
            let s = c.alloc(layout(1000));
            c.dealloc(s, layout(1000));
            assert_eq!(c.cached_bytes(), 0);
            c.dealloc(b, layout(5 * MB));
            c.dealloc(z, layout(3 * MB + 100));
            assert_eq!(c.cached_bytes(), 8 * MB + BlockCache::<System>::GRAIN);
        }
    }

    #[test]
    fn block_cache_respects_its_cap_and_releases_blocks_no_longer_asked_for() {
        let c = BlockCache::new(System, 4 * MB);
        unsafe {
            let (a, b) = (c.alloc(layout(3 * MB)), c.alloc(layout(2 * MB)));
            c.dealloc(a, layout(3 * MB));
            c.dealloc(b, layout(2 * MB)); // over the cap: back to `System`
            assert_eq!(c.cached_bytes(), 3 * MB);
            // a phase with other sizes: after STALE misses the 3 MB block is given back
            let mut held = Vec::new();
            for i in 0..=BlockCache::<System>::STALE as usize {
                held.push(c.alloc(layout((8 + i) * MB)));
            }
            assert_eq!(c.cached_bytes(), 0);
            for (i, p) in held.into_iter().enumerate() {
                c.dealloc(p, layout((8 + i) * MB));
            }
            assert!(c.cached_bytes() <= 4 * MB);
        }
    }

    #[test]
    fn block_cache_realloc_keeps_the_contents_across_both_kinds_of_block() {
        let c = BlockCache::new(System, 64 * MB);
        unsafe {
            let mut p = c.alloc(layout(1000));
            let mut size = 1000;
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            for new in [2 * MB, 2 * MB + 10, 6 * MB, 500, 3 * MB] {
                p = c.realloc(p, layout(size), new);
                assert!(!p.is_null());
                for i in 0..size.min(new).min(1000) {
                    assert_eq!(*p.add(i), i as u8, "{size} -> {new}");
                }
                size = new;
            }
            c.dealloc(p, layout(size));
        }
    }

    #[test]
    fn purge_delay_is_off_after_keep_freed_pages() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(super::keep_freed_pages(), -1);
        }
    }
}
