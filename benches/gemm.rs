//! GEMM choice for `tensor::gemm`: matrixmultiply (through ndarray's `general_mat_mul`, what
//! `tensor::gemm` uses), matrixmultiply's `sgemm` called directly, and the `gemm` crate (single
//! thread, and 2 rayon threads for reference), on the shapes the convolutions of the target net
//! produce (batch-64 CIFAR/MNIST-size net, see `benches/conv.rs`), forward and both backward GEMMs.
//!
//! Checks every implementation against `tensor::gemm` before timing; prints GFLOP/s and the ratio
//! to `tensor::gemm` measured in the same run.
//!
//! Run: `cargo bench --bench gemm` (about 20 s). `EMPF_BENCH_SECS` sets the time per case (0.25).
#![allow(unsafe_code)]

use empf::tensor::gemm;
use std::time::Instant;

/// One GEMM case: `C (m x n) = op(A) (m x k) · op(B) (k x n)`.
struct Case {
    what: &'static str,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
}

fn strides(rows: usize, cols: usize, t: bool) -> (isize, isize) {
    // (row stride, column stride) of op(X) (rows x cols) for X stored row-major, transposed if t
    if t {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
}

fn mm_direct(c: &Case, a: &[f32], b: &[f32], out: &mut [f32]) {
    let (rsa, csa) = strides(c.m, c.k, c.ta);
    let (rsb, csb) = strides(c.k, c.n, c.tb);
    // SAFETY: a, b, out hold m*k, k*n and m*n f32 laid out with exactly these strides, and out
    // does not alias a or b.
    unsafe {
        matrixmultiply::sgemm(
            c.m,
            c.k,
            c.n,
            1.0,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            out.as_mut_ptr(),
            c.n as isize,
            1,
        )
    }
}

fn gemm_crate(c: &Case, a: &[f32], b: &[f32], out: &mut [f32], par: gemm::Parallelism) {
    let (rsa, csa) = strides(c.m, c.k, c.ta);
    let (rsb, csb) = strides(c.k, c.n, c.tb);
    // SAFETY: as in `mm_direct`; `read_dst = false` so `out`'s previous contents are ignored, and
    // dst = 0·dst + 1·A·B.
    unsafe {
        gemm::gemm(
            c.m,
            c.n,
            c.k,
            out.as_mut_ptr(),
            1,
            c.n as isize,
            false,
            a.as_ptr(),
            csa,
            rsa,
            b.as_ptr(),
            csb,
            rsb,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn time(secs: f64, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut reps = 0;
    while reps < 3 || start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    best
}

fn main() {
    let secs: f64 = std::env::var("EMPF_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.25);
    // Shapes of the target net's convs: stem 1->32 at 28x28, BConv 32->64 at 28x28 (K=288, P=784),
    // BConv 64->128 at 14x14 (K=576, P=196). "xS" = S samples laid side by side (conv.rs batching).
    let cases = [
        Case {
            what: "stem fwd 32x9·9x784",
            m: 32,
            k: 9,
            n: 784,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv1 fwd W·col",
            m: 64,
            k: 288,
            n: 784,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv1 fwd W·col x4",
            m: 64,
            k: 288,
            n: 3136,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv1 dW=dY·colT x4",
            m: 64,
            k: 3136,
            n: 288,
            ta: false,
            tb: true,
        },
        Case {
            what: "bconv1 dWT=col·dYT x4",
            m: 288,
            k: 3136,
            n: 64,
            ta: false,
            tb: true,
        },
        Case {
            what: "bconv1 dW=dY·colT(NN) x4",
            m: 64,
            k: 3136,
            n: 288,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv1 dW=dY·colT x1",
            m: 64,
            k: 784,
            n: 288,
            ta: false,
            tb: true,
        },
        Case {
            what: "bconv2 dW=dY·colT x2",
            m: 128,
            k: 392,
            n: 576,
            ta: false,
            tb: true,
        },
        Case {
            what: "bconv1 dWT=col·dYT(NN) x1",
            m: 288,
            k: 784,
            n: 64,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv1 dcol=WT·dY x4",
            m: 288,
            k: 64,
            n: 3136,
            ta: true,
            tb: false,
        },
        Case {
            what: "bconv2 fwd W·col",
            m: 128,
            k: 576,
            n: 196,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv2 fwd W·col x9",
            m: 128,
            k: 576,
            n: 1764,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv2 dW=dY·colT x9",
            m: 128,
            k: 1764,
            n: 576,
            ta: false,
            tb: true,
        },
        Case {
            what: "bconv2 dWT=col·dYT x9",
            m: 576,
            k: 1764,
            n: 128,
            ta: false,
            tb: true,
        },
        Case {
            what: "bconv2 dWT=col·dYT(NN) x2",
            m: 576,
            k: 392,
            n: 128,
            ta: false,
            tb: false,
        },
        Case {
            what: "bconv2 dcol=WT·dY x9",
            m: 576,
            k: 128,
            n: 1764,
            ta: true,
            tb: false,
        },
    ];
    let mut rng = empf::rng::Rng::new(1);
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9}   (GFLOP/s, best of runs; ratio to tensor::gemm)",
        "shape", "tensor", "mm-direct", "gemm-1t", "gemm-2t"
    );
    let mut totals = [0.0f64; 4];
    for c in &cases {
        let a: Vec<f32> = (0..c.m * c.k).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..c.k * c.n).map(|_| rng.normal() as f32).collect();
        let mut reference = vec![0.0f32; c.m * c.n];
        gemm(c.m, c.k, c.n, 1.0, &a, c.ta, &b, c.tb, 0.0, &mut reference);
        let mut out = vec![f32::NAN; c.m * c.n];
        let check = |out: &[f32], name: &str| {
            let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (x, y) in out.iter().zip(&reference) {
                assert!(
                    (x - y).abs() <= 1e-4 * scale,
                    "{name} disagrees on {}",
                    c.what
                );
            }
        };
        mm_direct(c, &a, &b, &mut out);
        check(&out, "matrixmultiply::sgemm");
        out.fill(f32::NAN);
        gemm_crate(c, &a, &b, &mut out, gemm::Parallelism::None);
        check(&out, "gemm crate");
        out.fill(f32::NAN);
        gemm_crate(c, &a, &b, &mut out, gemm::Parallelism::Rayon(2));
        check(&out, "gemm crate 2t");
        let flops = 2.0 * (c.m * c.k * c.n) as f64;
        let t = [
            time(secs, || {
                gemm(c.m, c.k, c.n, 1.0, &a, c.ta, &b, c.tb, 0.0, &mut out)
            }),
            time(secs, || mm_direct(c, &a, &b, &mut out)),
            time(secs, || {
                gemm_crate(c, &a, &b, &mut out, gemm::Parallelism::None)
            }),
            time(secs, || {
                gemm_crate(c, &a, &b, &mut out, gemm::Parallelism::Rayon(2))
            }),
        ];
        for (tot, ti) in totals.iter_mut().zip(&t) {
            *tot += ti;
        }
        let g: Vec<String> = t
            .iter()
            .map(|ti| format!("{:>5.1} {:.2}x", flops / ti / 1e9, t[0] / ti))
            .collect();
        println!("{:<24} {}", c.what, g.join(" "));
    }
    println!(
        "total time ratio vs tensor::gemm: mm-direct {:.2}x, gemm-1t {:.2}x, gemm-2t {:.2}x (>1 = faster)",
        totals[0] / totals[1],
        totals[0] / totals[2],
        totals[0] / totals[3]
    );
}
