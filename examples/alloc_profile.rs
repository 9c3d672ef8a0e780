//! Where the training memory goes: live bytes (counted by a wrapping allocator) against peak RSS,
//! for one `mnist-cnn` online configuration, with the per-size peak count of blocks ≥ 64 KiB
//! (what [`empf_simd::alloc::BlockCache`] keeps) and a histogram of the smaller allocations.
//!
//! `cargo run --release --example alloc_profile -- 4` (the argument is T).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static HIST: Mutex<[(usize, usize, usize); 64]> = Mutex::new([(0, 0, 0); 64]);
static M: empf_simd::alloc::BlockCache<mimalloc::MiMalloc> = empf_simd::alloc::BlockCache::new(
    mimalloc::MiMalloc,
    empf_simd::alloc::BlockCache::<()>::DEFAULT_CAP,
);
static SMALL: Mutex<[(usize, usize); 21]> = Mutex::new([(0, 0); 21]);
fn big(size: usize, d: isize) {
    if size < (64 << 10) {
        if d > 0 && size > 0 {
            let b = (usize::BITS - size.leading_zeros()) as usize;
            if let Ok(mut s) = SMALL.lock() {
                s[b.min(20)].0 += 1;
                s[b.min(20)].1 += size;
            }
        }
        return;
    }
    let size = size.next_multiple_of(65536);
    let mut h = HIST.lock().unwrap();
    for e in h.iter_mut() {
        if e.0 == size || e.0 == 0 {
            e.0 = size;
            e.1 = (e.1 as isize + d) as usize;
            e.2 = e.2.max(e.1);
            return;
        }
    }
}
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let n = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(n, Relaxed);
        big(l.size(), 1);
        unsafe { M.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let n = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(n, Relaxed);
        big(l.size(), 1);
        unsafe { M.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        big(l.size(), -1);
        unsafe { M.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        big(l.size(), -1);
        big(n, 1);
        if n > l.size() {
            let v = LIVE.fetch_add(n - l.size(), Relaxed) + n - l.size();
            PEAK.fetch_max(v, Relaxed);
        } else {
            LIVE.fetch_sub(l.size() - n, Relaxed);
        }
        unsafe { M.realloc(p, l, n) }
    }
}
#[global_allocator]
static G: Counting = Counting;
fn main() {
    empf_simd::alloc::keep_freed_pages();
    let t: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4);
    let cfg = empf::model::zoo::named_config("mnist-cnn").unwrap();
    PEAK.store(0, Relaxed);
    let rows = empf::bench::bench_train(
        &cfg,
        64,
        3,
        &[empf::train::step::BpMode::Online],
        &[t],
        &empf::bench::TrainBenchOptions {
            seed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    println!(
        "T={t} live-peak {:.1} MiB, live-now {:.1} MiB, rss {:.1} MiB, caches {:.1}",
        PEAK.load(Relaxed) as f64 / 1048576.0,
        LIVE.load(Relaxed) as f64 / 1048576.0,
        rows[0].peak_rss.unwrap() as f64 / 1048576.0,
        rows[0].peak_cache_bytes as f64 / 1048576.0
    );
    let h = HIST.lock().unwrap();
    let mut tot = 0;
    for e in h.iter().filter(|e| e.0 > 0) {
        println!("  {:8.2} MiB x peak {}", e.0 as f64 / 1048576.0, e.2);
        tot += e.0 * e.2;
    }
    for (b, e) in SMALL
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|e| e.1.0 > 0)
    {
        println!(
            "  small < 2^{b}: {} allocs, {:.1} MiB",
            e.0,
            e.1 as f64 / 1048576.0
        );
    }
    println!("  sum of per-size peaks {:.1} MiB", tot as f64 / 1048576.0);
}
