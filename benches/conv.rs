//! Forward + backward of the target net's convolutions at batch 64 in f32, in GFLOP/s, so the
//! trainer's time budget (~400 images/s at T = 4 on 2 threads, i.e. 1600 sample-steps/s for the
//! whole net) can be split by layer:
//!
//! * stem  Conv2d 3x3 1 -> 32, 28x28, padding 1
//! * bconv1 BinaryConv2d 3x3 32 -> 64, 28x28, padding 1
//! * bconv2 BinaryConv2d 3x3 64 -> 128, 14x14, padding 1
//!
//! One "step" = one forward (with cache) + one backward over the batch; FLOPs counted as
//! `2·N·O·K·P` for forward and twice that for backward (dW and dX GEMMs). Also prints the im2col
//! block budget's effect (1 sample per GEMM vs the default side-by-side batching).
//!
//! Run: `cargo bench --bench conv` (about 15 s); `EMPF_BENCH_SECS` sets the time per case (1.0).

use empf::layers::{
    BinaryConv2d, BinaryInit, Cache, Conv2d, ConvSpec, GradMode, Layer, State, StepCtx,
};
use empf::rng::Rng;
use empf::tensor::{Tensor, from_vec, workers};
use std::time::Instant;

fn input(rng: &mut Rng, shape: &[usize]) -> Tensor<f32> {
    // spike-like: about half the entries are zero, the rest positive floats
    from_vec(
        shape,
        (0..shape.iter().product())
            .map(|_| (rng.normal() as f32).max(0.0))
            .collect(),
    )
}

fn bench(name: &str, layer: &mut dyn Layer<f32>, x: &Tensor<f32>, secs: f64) -> f64 {
    let ctx = StepCtx::train(0, 4, GradMode::Online);
    let mut cache = Cache::new();
    let y = layer
        .forward(x, &ctx, &mut State::Empty, Some(&mut cache))
        .expect("forward");
    let dy = y.mapv(|v| (v * 0.1).sin());
    // check before timing: the output and the input gradient are finite and not all zero
    let dx = layer
        .backward(&dy, &ctx, &cache, &mut State::Empty)
        .expect("backward");
    assert!(y.iter().all(|v| v.is_finite()) && y.iter().any(|&v| v != 0.0));
    assert!(dx.iter().all(|v| v.is_finite()));
    let (n, o, oh, ow) = (y.shape()[0], y.shape()[1], y.shape()[2], y.shape()[3]);
    let k = x.shape()[1] * 9;
    let fwd_flops = 2.0 * (n * o * k * oh * ow) as f64;
    let (mut tf, mut tb) = (f64::INFINITY, f64::INFINITY);
    let start = Instant::now();
    let mut reps = 0;
    while reps < 3 || start.elapsed().as_secs_f64() < secs {
        let t0 = Instant::now();
        let y = layer
            .forward(x, &ctx, &mut State::Empty, Some(&mut cache))
            .expect("forward");
        let t1 = Instant::now();
        let dx = layer
            .backward(&dy, &ctx, &cache, &mut State::Empty)
            .expect("backward");
        let t2 = Instant::now();
        std::hint::black_box((y, dx));
        tf = tf.min((t1 - t0).as_secs_f64());
        tb = tb.min((t2 - t1).as_secs_f64());
        reps += 1;
    }
    println!(
        "{name:<34} fwd {:>7.2} ms {:>5.1} GFLOP/s | bwd {:>7.2} ms {:>5.1} GFLOP/s | fwd+bwd {:>7.2} ms = {:>6.0} samples/s",
        tf * 1e3,
        fwd_flops / tf / 1e9,
        tb * 1e3,
        2.0 * fwd_flops / tb / 1e9,
        (tf + tb) * 1e3,
        n as f64 / (tf + tb)
    );
    tf + tb
}

fn main() {
    let secs: f64 = std::env::var("EMPF_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let n = 64;
    let mut rng = Rng::new(1);
    println!("batch {n}, f32, {} worker chunk(s)", workers());
    let x0 = input(&mut rng, &[n, 1, 28, 28]);
    let x1 = input(&mut rng, &[n, 32, 28, 28]);
    let x2 = input(&mut rng, &[n, 64, 14, 14]);
    let mut stem = Conv2d::<f32>::new("stem", ConvSpec::new(1, 32, 3).padding(1), false, &mut rng);
    let mut b1 = BinaryConv2d::<f32>::new(
        "bconv1",
        ConvSpec::new(32, 64, 3).padding(1),
        BinaryInit::Kaiming,
        &mut rng,
    );
    let mut b2 = BinaryConv2d::<f32>::new(
        "bconv2",
        ConvSpec::new(64, 128, 3).padding(1),
        BinaryInit::Kaiming,
        &mut rng,
    );
    // the stem's input is the image: no input gradient needed
    stem.set_input_grad(false);
    let mut total = 0.0;
    total += bench("stem 1->32 28x28 (no dx)", &mut stem, &x0, secs);
    total += bench("bconv1 32->64 28x28", &mut b1, &x1, secs);
    total += bench("bconv2 64->128 14x14", &mut b2, &x2, secs);
    println!(
        "three convs: {:.2} ms per step of 64 samples -> at T=4, {:.0} images/s from the convs alone",
        total * 1e3,
        n as f64 / (4.0 * total)
    );
    sparse_experiment(&mut b1, secs);
    // W_b = α·sign(W) is recomputed at every forward and backward: what that costs
    let w = b2
        .weight
        .value
        .as_slice()
        .expect("standard layout")
        .to_vec();
    let mut wb = vec![0.0f32; w.len()];
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        empf::layers::binary::binarize(std::hint::black_box(&w), 64 * 9, &mut wb);
    }
    let tb = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "binarize bconv2 weights (128 x 576): {:.1} us per call, x2 per step",
        tb * 1e6
    );
    // the im2col block budget: 1 = one sample per GEMM; larger = samples side by side
    for budget in [1usize, 1 << 17, 1 << 18, 1 << 19, 1 << 20] {
        b1.set_col_budget(budget);
        b2.set_col_budget(budget);
        bench(&format!("bconv1 budget {budget}"), &mut b1, &x1, secs);
        bench(&format!("bconv2 budget {budget}"), &mut b2, &x2, secs);
    }
}

/// Experiment (not library code): a spike-sparse forward that skips zero inputs, scattering
/// `x[c,i,j] · W_b[:, c, u, v]` into a channels-last accumulator (an axpy of length O per nonzero
/// input and tap), in plain safe Rust (SSE2 auto-vectorised, no FMA). Prints its time against the
/// dense im2col + GEMM forward at several input densities, to locate the break-even density a
/// SIMD sparse kernel (in `empf-simd`) would have to beat. 3x3, stride 1, padding 1 only.
fn sparse_experiment(layer: &mut BinaryConv2d<f32>, secs: f64) {
    use rayon::prelude::*;
    let spec = layer.spec();
    let (n, c, h, w, o, k) = (64, spec.in_ch, 28, 28, spec.out_ch, spec.kernel);
    let p = spec.padding;
    let wb = layer.binary_weights();
    let wbs = wb.as_slice().expect("standard layout");
    // wt[(ci, u, v)][o]
    let kk = c * k * k;
    let mut wt = vec![0.0f32; kk * o];
    for oc in 0..o {
        for r in 0..kk {
            wt[r * o + oc] = wbs[oc * kk + r];
        }
    }
    let ctx = StepCtx::eval(0, 1);
    let mut rng = Rng::new(7);
    for density in [0.05, 0.1, 0.2, 0.5] {
        let x = from_vec(
            &[n, c, h, w],
            (0..n * c * h * w)
                .map(|_| {
                    if rng.uniform() < density {
                        rng.uniform() as f32
                    } else {
                        0.0
                    }
                })
                .collect(),
        );
        let xs = x.as_slice().expect("standard layout");
        let sparse = |y: &mut [f32]| {
            y.par_chunks_mut(o * h * w).enumerate().for_each_init(
                || vec![0.0f32; h * w * o],
                |acc, (s, ys)| {
                    acc.fill(0.0);
                    let xsamp = &xs[s * c * h * w..(s + 1) * c * h * w];
                    for ci in 0..c {
                        for i in 0..h {
                            for j in 0..w {
                                let xv = xsamp[(ci * h + i) * w + j];
                                if xv == 0.0 {
                                    continue;
                                }
                                for u in 0..k {
                                    let oi = (i + p) as isize - u as isize;
                                    if oi < 0 || oi >= h as isize {
                                        continue;
                                    }
                                    for v in 0..k {
                                        let oj = (j + p) as isize - v as isize;
                                        if oj < 0 || oj >= w as isize {
                                            continue;
                                        }
                                        let q = oi as usize * w + oj as usize;
                                        let a = &mut acc[q * o..(q + 1) * o];
                                        let wr = &wt[((ci * k + u) * k + v) * o..][..o];
                                        for (a, &wv) in a.iter_mut().zip(wr) {
                                            *a += xv * wv;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    // channels-last -> NCHW
                    for q in 0..h * w {
                        for oc in 0..o {
                            ys[oc * h * w + q] = acc[q * o + oc];
                        }
                    }
                },
            )
        };
        let dense_y = layer
            .forward(&x, &ctx, &mut State::Empty, None)
            .expect("forward");
        let mut y = vec![f32::NAN; dense_y.len()];
        sparse(&mut y);
        let scale = dense_y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, b) in y.iter().zip(dense_y.iter()) {
            assert!((a - b).abs() <= 1e-4 * scale, "sparse experiment disagrees");
        }
        let (mut td, mut ts) = (f64::INFINITY, f64::INFINITY);
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < secs / 2.0 {
            let t = Instant::now();
            std::hint::black_box(layer.forward(&x, &ctx, &mut State::Empty, None).unwrap());
            td = td.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            sparse(&mut y);
            ts = ts.min(t.elapsed().as_secs_f64());
        }
        println!(
            "sparse-input forward experiment, bconv1, density {density:.2}: dense {:.2} ms, sparse {:.2} ms ({:.2}x)",
            td * 1e3,
            ts * 1e3,
            td / ts
        );
    }
}
