//! Kernel-only timing of the sparse float and the k-bit convolutions (the dense VNNI kernel, the
//! sparse ones, and the automatic choice; spikes quantised inside, step 0.1) on mnist-cnn's two
//! binary conv shapes, 8 images in pairs as the runtime runs them (random spikes of a given
//! density, uniform in [0, 1.5)): `cargo run --release --example conv_kernels [density]
//! [bits] [32|64: only the shape of that many input channels]`; the minimum of 200 calls, so
//! noise from other processes drops out (`RAYON_NUM_THREADS=1` for one core).
use empf_simd::{DenseQ, QuantConvWeights, SignConvWeights, Simd};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let density: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(0.25);
    let bits: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let s = Simd::global();
    let mut seed = 1u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let only: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    for (c, o, hw) in [(32usize, 64usize, 28usize), (64, 128, 14)] {
        if only != 0 && only != c {
            continue;
        }
        let (n, pair) = (8, 2);
        let x: Vec<f32> = (0..n * c * hw * hw)
            .map(|_| {
                if rnd() < density {
                    (rnd() * 1.5) as f32
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(x.len(), n * c * hw * hw);
        let nzf = x.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
        let w: Vec<f32> = (0..o * c * 9)
            .map(|_| if rnd() < 0.5 { 1.0 } else { -1.0 })
            .collect();
        let sw = SignConvWeights::from_f32_oihw(&w, o, c, 3, 3).unwrap();
        let qw = QuantConvWeights::new(&sw, bits).unwrap();
        let step = 0.1;
        let mut q = vec![0u8; x.len()];
        s.quantise(&x, step, bits, &mut q).unwrap();
        let nzq = q.iter().filter(|&&v| v != 0).count() as f64 / q.len() as f64;
        println!("density: spikes {nzf:.3}, levels {nzq:.3}");
        let (sc, sh) = (vec![1f32; o], vec![0f32; o]);
        let time = |f: &mut dyn FnMut()| {
            let mut best = f64::MAX;
            for _ in 0..200 {
                let t = Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            best * 1e3
        };
        let tf = time(&mut || {
            std::hint::black_box(
                s.sparse_conv_vec(&x, (n, hw, hw), pair, &sw, 1, 1, &sc, &sh)
                    .unwrap(),
            );
        });
        // the k-bit conv on the float spikes (quantised inside): dense, sparse, and the default
        let mut tq = [0f64; 3];
        for (t, policy) in tq
            .iter_mut()
            .zip([DenseQ::Always, DenseQ::Never, DenseQ::Auto])
        {
            empf_simd::set_dense_q(policy);
            *t = time(&mut || {
                std::hint::black_box(
                    s.sparse_conv_q_spikes_vec(&x, step, (n, hw, hw), pair, &qw, 1, 1, &sc, &sh)
                        .unwrap(),
                );
            });
        }
        println!(
            "{c}->{o} {hw}x{hw}: float {tf:.3} ms; {bits}-bit: dense {:.3} ms ({:.2}x), sparse {:.3} ms ({:.2}x), auto {:.3} ms ({:.2}x)",
            tq[0],
            tf / tq[0],
            tq[1],
            tf / tq[1],
            tq[2],
            tf / tq[2],
        );
    }
}
