//! Binary convolutions and the masked-add GEMV against fp32 baselines measured in the same run.
//!
//! `cargo bench -p empf-simd --bench popcount` (criterion; sample sizes kept small: the machine is
//! shared). At the end it prints a table of medians and ratios (see `simd/README.md`).
//!
//! * fp32 side: NCHW input, im2col + GEMM (`matrixmultiply::sgemm`, and the `gemm` crate), the
//!   output pixels split over the threads.
//! * binary side: NHWC float spikes packed to bits (packing included) + `Simd::bconv` (AND kernel,
//!   i32 output); k-bit side: NHWC u8 packed into k planes + bit-serial `bconv`.
//! * peak: the raw popcount GEMM on L1-resident operands (32x16 rows of 4096 bits; for AVX-512 this
//!   includes transposing the 16 B rows into panels, about 3% of the work).
//! * GEMV: float x (K) times a ±1 matrix N×K whose bits exceed the last-level cache, against an f32
//!   GEMV over the same N×K floats.

use criterion::Criterion;
use empf_simd::{BinOp, Binarize, Isa, PackedConvWeights, Simd};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

thread_local! {
    static SAMPLES: RefCell<HashMap<String, Vec<f64>>> = RefCell::new(HashMap::new());
}

/// Benchmarks `f` with criterion and returns the best (minimum) seconds per call over the batches
/// criterion ran.
fn timed(c: &mut Criterion, name: &str, mut f: impl FnMut()) -> f64 {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            let d = t.elapsed();
            SAMPLES.with(|s| {
                s.borrow_mut()
                    .entry(name.to_string())
                    .or_default()
                    .push(d.as_secs_f64() / iters as f64)
            });
            d
        })
    });
    // The minimum over criterion's batches (each a mean over many calls): on a machine shared with
    // other jobs it is the estimate least distorted by time slicing.
    SAMPLES.with(|s| {
        s.borrow()
            .get(name)
            .into_iter()
            .flatten()
            .copied()
            .fold(f64::INFINITY, f64::min)
    })
}

struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[derive(Clone, Copy)]
enum Lib {
    MatrixMultiply,
    Gemm,
}

/// fp32 3x3 stride-1 same-padding convolution by im2col + GEMM, output pixels split over `threads`.
#[allow(clippy::too_many_arguments)]
fn float_conv(
    lib: Lib,
    x: &[f32],
    wt: &[f32],
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    threads: usize,
) -> f32 {
    let hw = h * w;
    let k = c * 9;
    let per = hw.div_ceil(threads);
    (0..threads)
        .into_par_iter()
        .map(|t| {
            let p0 = (t * per).min(hw);
            let p1 = ((t + 1) * per).min(hw);
            let len = p1 - p0;
            if len == 0 {
                return 0.0;
            }
            let mut cols = vec![0f32; k * len];
            for ci in 0..c {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let row = &mut cols[(ci * 9 + ky * 3 + kx) * len..][..len];
                        for (r, p) in row.iter_mut().zip(p0..p1) {
                            let iy = (p / w + ky).wrapping_sub(1);
                            let ix = (p % w + kx).wrapping_sub(1);
                            *r = if iy < h && ix < w {
                                x[(ci * h + iy) * w + ix]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
            let mut out = vec![0f32; cout * len];
            match lib {
                // SAFETY: wt is cout×k, cols is k×len, out is cout×len, all row-major with the
                // strides given.
                Lib::MatrixMultiply => unsafe {
                    matrixmultiply::sgemm(
                        cout,
                        k,
                        len,
                        1.0,
                        wt.as_ptr(),
                        k as isize,
                        1,
                        cols.as_ptr(),
                        len as isize,
                        1,
                        0.0,
                        out.as_mut_ptr(),
                        len as isize,
                        1,
                    )
                },
                // SAFETY: as above (gemm takes column stride first, then row stride).
                Lib::Gemm => unsafe {
                    gemm::gemm(
                        cout,
                        len,
                        k,
                        out.as_mut_ptr(),
                        1,
                        len as isize,
                        false,
                        wt.as_ptr(),
                        1,
                        k as isize,
                        cols.as_ptr(),
                        1,
                        len as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                },
            }
            out[0]
        })
        .sum()
}

fn f32_gemv(x: &[f32], w: &[f32], y: &mut [f32]) {
    let k = x.len();
    y.par_chunks_mut(64).enumerate().for_each(|(t, ys)| {
        for (j, yj) in ys.iter_mut().enumerate() {
            let row = &w[(t * 64 + j) * k..][..k];
            let mut acc = [0f32; 16];
            for (a, b) in row.chunks_exact(16).zip(x.chunks_exact(16)) {
                for l in 0..16 {
                    acc[l] += a[l] * b[l];
                }
            }
            *yj = acc.iter().sum();
        }
    });
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .without_plots()
        .configure_from_args();
    let levels: Vec<Simd> = [Isa::Avx512, Isa::Avx2, Isa::Neon]
        .into_iter()
        .filter(|i| i.is_available())
        .map(|i| Simd::new(i).unwrap())
        .collect();
    let best = levels
        .first()
        .copied()
        .unwrap_or_else(|| Simd::new(Isa::Scalar).unwrap());
    println!(
        "detected: {} ({})",
        Isa::detect(),
        Isa::detect().kernel_name()
    );
    let quick = std::env::var_os("EMPF_BENCH_QUICK").is_some();
    let mut table = Vec::new();
    let mut g = Gen(1);

    // Peak rate of the micro-kernel on L1-resident operands, 1 thread.
    let mut peaks = HashMap::new();
    for s in &levels {
        let (m, n, kw) = (32usize, 16usize, 64usize);
        let a: Vec<u64> = (0..m * kw).map(|_| g.next()).collect();
        let b: Vec<u64> = (0..n * kw).map(|_| g.next()).collect();
        let mut out = vec![0u32; m * n];
        let t = timed(&mut c, &format!("peak/{}", s.isa()), || {
            s.popcount_gemm(BinOp::And, black_box(&a), m, &b, n, kw, &mut out)
                .unwrap();
        });
        let rate = (m * n * kw * 64) as f64 / t;
        peaks.insert(s.isa(), rate);
        table.push(format!(
            "peak {:<7} {:>8.1} Gbit-MAC/s (L1-resident {m}x{n}x{} bits)",
            s.isa().name(),
            rate / 1e9,
            kw * 64
        ));
    }

    let shapes: &[(usize, usize)] = if quick {
        &[(14, 256)]
    } else {
        &[(56, 64), (28, 128), (14, 256), (7, 512)]
    };
    let mut conv_rows = Vec::new();
    for &threads in &[1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for &(hw, ch) in shapes {
            let (h, w, cc, cout) = (hw, hw, ch, ch);
            let xf: Vec<f32> = (0..cc * h * w).map(|_| (g.next() % 2) as f32).collect();
            let wf: Vec<f32> = (0..cout * cc * 9)
                .map(|_| {
                    if g.next().is_multiple_of(2) {
                        1.0
                    } else {
                        -1.0
                    }
                })
                .collect();
            let x_nhwc: Vec<f32> = {
                let mut t = vec![0f32; xf.len()];
                for ci in 0..cc {
                    for p in 0..h * w {
                        t[p * cc + ci] = xf[ci * h * w + p];
                    }
                }
                t
            };
            let wt = PackedConvWeights::from_f32_oihw(&wf, cout, cc, 3, 3).unwrap();
            let mut out = vec![0i32; h * w * cout];
            let tag = format!("{h}x{w}x{cc}->{cout}/t{threads}");
            let t_mm = timed(&mut c, &format!("conv/{tag}/f32-matrixmultiply"), || {
                pool.install(|| {
                    black_box(float_conv(
                        Lib::MatrixMultiply,
                        &xf,
                        &wf,
                        cc,
                        h,
                        w,
                        cout,
                        threads,
                    ))
                });
            });
            let t_gemm = timed(&mut c, &format!("conv/{tag}/f32-gemm"), || {
                pool.install(|| {
                    black_box(float_conv(Lib::Gemm, &xf, &wf, cc, h, w, cout, threads))
                });
            });
            let mut row = format!(
                "| {h}²x{cc} | {threads} | {:.3} | {:.3} |",
                t_mm * 1e3,
                t_gemm * 1e3
            );
            for s in &levels {
                let t1 = timed(&mut c, &format!("conv/{tag}/{}-1bit", s.isa()), || {
                    pool.install(|| {
                        let img = s
                            .pack_image_nhwc(&x_nhwc, 1, h, w, cc, Binarize::Positive)
                            .unwrap();
                        s.bconv(BinOp::And, &img, &wt, 1, 1, &mut out).unwrap();
                        black_box(&out);
                    })
                });
                let useful = (h * w * cout * cc * 9) as f64;
                let frac = useful / t1 / threads as f64 / peaks[&s.isa()];
                row += &format!(
                    " {} 1b {:.3} ms: {:.1}x mm, {:.1}x gemm, {:.0}% peak;",
                    s.isa(),
                    t1 * 1e3,
                    t_mm / t1,
                    t_gemm / t1,
                    frac * 100.0
                );
                if s.isa() == best.isa() {
                    for bits in [2u32, 4] {
                        let xq: Vec<u8> = x_nhwc
                            .iter()
                            .map(|_| (g.next() % (1 << bits)) as u8)
                            .collect();
                        let tk =
                            timed(&mut c, &format!("conv/{tag}/{}-{bits}bit", s.isa()), || {
                                pool.install(|| {
                                    let img = s.pack_image_u8_nhwc(&xq, 1, h, w, cc, bits).unwrap();
                                    s.bconv(BinOp::And, &img, &wt, 1, 1, &mut out).unwrap();
                                    black_box(&out);
                                })
                            });
                        row += &format!(
                            " {bits}b {:.3} ms = {:.2}·k·t1b;",
                            tk * 1e3,
                            tk / t1 / bits as f64
                        );
                    }
                }
            }
            println!("{row}");
            conv_rows.push(row);
        }
    }

    // Masked-add GEMV with weights beyond the LLC (32 MiB here): 8192 x 36864 bits = 37.7 MB.
    let (n, k) = if quick { (2048, 36864) } else { (8192, 36864) };
    let x: Vec<f32> = (0..k).map(|_| (g.next() % 1000) as f32 / 1000.0).collect();
    let wf: Vec<f32> = (0..n * k)
        .map(|i| {
            if (i * 2654435761) >> 7 & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    let wb = best.pack_rows(&wf, n, k, Binarize::Sign).unwrap();
    let mut gemv_rows = Vec::new();
    for &threads in &[1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut y = vec![0f32; n];
        let tf = timed(&mut c, &format!("gemv/{n}x{k}/t{threads}/f32"), || {
            pool.install(|| f32_gemv(&x, &wf, &mut y))
        });
        let mut row = format!("| {n}x{k} | {threads} | f32 {:.2} ms |", tf * 1e3);
        for s in &levels {
            let tb = timed(
                &mut c,
                &format!("gemv/{n}x{k}/t{threads}/{}", s.isa()),
                || pool.install(|| s.gemv_masked(&x, &wb, &mut y).unwrap()),
            );
            row += &format!(" {} {:.2} ms = {:.1}x |", s.isa(), tb * 1e3, tf / tb);
        }
        println!("{row}");
        gemv_rows.push(row);
    }
    drop(wf);

    println!("\n==== summary (best batch means; ratios = fp32 time / binary time, same run) ====");
    for r in &table {
        println!("{r}");
    }
    println!(
        "| shape (3x3, C->C) | threads | f32 matrixmultiply ms | f32 gemm ms | binary (packing included) |"
    );
    for r in &conv_rows {
        println!("{r}");
    }
    for r in &gemv_rows {
        println!("{r}");
    }
    c.final_summary();
}
