//! Process-wide allocator tuning for the `empf` binary (the one piece of FFI outside the kernels).
//!
//! The binary's global allocator is mimalloc. By default mimalloc returns ("purges") freed pages to
//! the OS after 10 ms; the trainer frees and re-allocates activation tensors of several MB at every
//! time-step, so each step page-faults them back in and the kernel zeroes them again (about 10^5
//! page faults per `mnist-cnn` batch, ~10% of a training step). [`keep_freed_pages`] turns purging
//! off, so freed pages are reused warm; resident memory then stays at its high-water mark.

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

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_is_off_after_keep_freed_pages() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(super::keep_freed_pages(), -1);
        }
    }
}
