//! The fused k-bit convolution + EM-PF neuron (+ 2x2 average pool) kernel against the separate
//! convolution, a scalar neuron and the pool's ordered sum: bit for bit, at every level and thread
//! count. In a test binary of its own: it sets the process-wide dense-kernel policy.

use empf_simd::{ConvInput, DenseQ, EmpfNeuron, Isa, QuantConvWeights, SignConvWeights, Simd};
use proptest::prelude::*;
use std::sync::Mutex;

/// The tests here set the process-wide policy: one at a time.
static POLICY: Mutex<()> = Mutex::new(());

/// splitmix64, for test data.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A float in `[lo, hi)` on a grid of 1/1000.
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.below(1000) as f32 / 1000.0
    }
}

/// One case: `n` samples of `steps` steps, `c -> o` channels, an `h x w` input, a `k x k` kernel.
#[derive(Debug, Clone)]
struct Case {
    n: usize,
    steps: usize,
    c: usize,
    o: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    bits: u32,
    pool: bool,
    affine: bool,
    per_channel: bool,
    /// The input is one image per sample, read at every step.
    repeated: bool,
    /// An EM-PF neuron runs on the input first (inside the kernel's packing).
    pre: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..3, 1usize..7, 1usize..10, 1usize..21),
        (
            2usize..12,
            2usize..40,
            prop_oneof![Just(1usize), Just(3)],
            0usize..2,
        ),
        (1u32..=8, any::<bool>(), any::<bool>(), any::<bool>()),
        (any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (n, steps, c, o),
                (h, w, k, pad),
                (bits, pool, affine, per_channel),
                (repeated, pre),
            )| {
                Case {
                    n,
                    steps,
                    c,
                    o,
                    // outputs of at least 2x2 (for the pool)
                    h: h.max(k + 1),
                    w: w.max(k + 1),
                    k,
                    pad: if k == 1 { 0 } else { pad },
                    bits,
                    pool,
                    affine,
                    per_channel,
                    repeated,
                    pre,
                }
            },
        )
}

/// The EM-PF neuron in scalar code (the runtime's operations, in its order) on `y`
/// (`T·N x C x HW`, step-major).
fn neuron_ref(y: &[f32], n: usize, c: usize, hw: usize, nr: &EmpfNeuron<'_>) -> Vec<f32> {
    let steps = nr.steps;
    let mut s = vec![0f32; y.len()];
    let chs = nr.leak.len() / steps;
    for i in 0..n {
        for o in 0..c {
            let ch = if chs == 1 { 0 } else { o };
            for p in 0..hw {
                let mut v = 0f32;
                for t in 0..steps {
                    let at = ((t * n + i) * c + o) * hw + p;
                    let at_p = t * chs + ch;
                    let mut m = match nr.affine {
                        Some((k, b)) => k[at_p] * y[at] + b[at_p],
                        None => y[at],
                    };
                    if t > 0 {
                        m += nr.leak[at_p] * v;
                    }
                    let th = nr.threshold[t];
                    let fire = m > th;
                    v = if fire { th } else { m };
                    s[at] = if fire { m - th } else { 0.0 };
                }
            }
        }
    }
    s
}

/// The separate path: the input neuron (on the input repeated over the steps), the k-bit
/// convolution at the scalar level, the neuron, then the pool's ordered sum.
fn reference(
    cs: &Case,
    input: &ConvInput<'_>,
    step: f32,
    qw: &QuantConvWeights,
    (scale, shift): (&[f32], &[f32]),
    nr: &EmpfNeuron<'_>,
) -> Vec<f32> {
    let scalar = Simd::new(Isa::Scalar).unwrap();
    let rows = cs.n * cs.steps;
    let mut x: Vec<f32> = if input.repeated {
        (0..cs.steps)
            .flat_map(|_| input.x.iter().copied())
            .collect()
    } else {
        input.x.to_vec()
    };
    if let Some(pre) = &input.neuron {
        x = neuron_ref(&x, cs.n, cs.c, cs.h * cs.w, pre);
    }
    assert_eq!(x.len(), rows * cs.c * cs.h * cs.w);
    let y = scalar
        .sparse_conv_q_spikes_vec(&x, step, (rows, cs.h, cs.w), 0, qw, 1, cs.pad, scale, shift)
        .unwrap();
    let (oh, ow) = (cs.h + 2 * cs.pad + 1 - cs.k, cs.w + 2 * cs.pad + 1 - cs.k);
    let s = neuron_ref(&y, cs.n, cs.o, oh * ow, nr);
    if !cs.pool {
        return s;
    }
    let (ph, pw) = (oh / 2, ow / 2);
    let mut out = vec![0f32; rows * cs.o * ph * pw];
    for pl in 0..rows * cs.o {
        for r in 0..ph {
            for q in 0..pw {
                let at = |rr: usize, cc: usize| s[(pl * oh + rr) * ow + cc];
                let (a0, a1) = (at(2 * r, 2 * q), at(2 * r, 2 * q + 1));
                let (b0, b1) = (at(2 * r + 1, 2 * q), at(2 * r + 1, 2 * q + 1));
                out[(pl * ph + r) * pw + q] = ((((0.0 + a0) + a1) + b0) + b1) * 0.25;
            }
        }
    }
    out
}

fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Fused = (input neuron,) convolution, neuron, pool, bit for bit: 1 to 6 steps (chunks of 4
    /// and a rest), several samples, step-major or repeated inputs, channel groups with partial tails, outputs not a multiple of 4,
    /// rows of up to 3 blocks of 16 pixels with tails, odd sizes under the pool, Version I and II
    /// neurons, per-channel and shared λ, 1 to 8 bits, spikes at ties, NaN, negatives and ∞; with
    /// 1, 2 and 3 threads (bands of rows). Levels without the kernel decline (`None`); AVX-512 with
    /// VNNI runs it.
    #[test]
    fn fused_conv_neuron_pool_equals_the_separate_layers(cs in case(), seed in any::<u64>()) {
        let _one = POLICY.lock().unwrap_or_else(|e| e.into_inner());
        empf_simd::set_dense_q(DenseQ::Always);
        let mut g = Gen(seed);
        let wf: Vec<f32> = (0..cs.o * cs.c * cs.k * cs.k)
            .map(|_| if g.below(2) == 0 { 1.0 } else { -1.0 })
            .collect();
        let sw = SignConvWeights::from_f32_oihw(&wf, cs.o, cs.c, cs.k, cs.k).unwrap();
        let qw = QuantConvWeights::new(&sw, cs.bits).unwrap();
        let step = match g.below(3) {
            0 => (2.0f32).powi(g.below(6) as i32 - 4),
            _ => 0.05 + g.below(100) as f32 / 200.0,
        };
        let max = ((1u32 << cs.bits) - 1) as f32;
        let rows = cs.n * cs.steps;
        let images = if cs.repeated { cs.n } else { rows };
        let x: Vec<f32> = (0..images * cs.c * cs.h * cs.w)
            .map(|_| match g.below(10) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.7,
                3 => (g.below(max as u64 + 1) as f32 + 0.5) * step, // ties
                4 | 5 => 0.0,
                _ => g.below(max as u64 + 3) as f32 * step * g.range(0.8, 1.2),
            })
            .collect();
        let scale: Vec<f32> = (0..cs.o).map(|_| g.range(0.001, 0.2)).collect();
        let shift: Vec<f32> = (0..cs.o).map(|_| g.range(-1.0, 1.0)).collect();
        let per = if cs.per_channel { cs.o } else { 1 };
        let leak: Vec<f32> = (0..cs.steps * per).map(|_| g.range(0.0, 1.2)).collect();
        let k: Vec<f32> = (0..cs.steps * per).map(|_| g.range(0.2, 2.0)).collect();
        let b: Vec<f32> = (0..cs.steps * per).map(|_| g.range(-0.5, 0.5)).collect();
        let th: Vec<f32> = (0..cs.steps).map(|_| g.range(0.0, 1.0)).collect();
        let nr = EmpfNeuron {
            steps: cs.steps,
            leak: &leak,
            affine: cs.affine.then_some((&k[..], &b[..])),
            threshold: &th,
            pool: cs.pool,
        };
        // the input neuron's parameters (per input channel, or shared)
        let per_in = if cs.per_channel { cs.c } else { 1 };
        let pleak: Vec<f32> = (0..cs.steps * per_in).map(|_| g.range(0.0, 1.2)).collect();
        let pk: Vec<f32> = (0..cs.steps * per_in).map(|_| g.range(0.2, 2.0)).collect();
        let pb: Vec<f32> = (0..cs.steps * per_in).map(|_| g.range(-0.5, 0.5)).collect();
        let pth: Vec<f32> = (0..cs.steps).map(|_| g.range(-0.1, 0.5)).collect();
        let input = ConvInput {
            x: &x,
            repeated: cs.repeated,
            neuron: cs.pre.then_some(EmpfNeuron {
                steps: cs.steps,
                leak: &pleak,
                affine: cs.affine.then_some((&pk[..], &pb[..])),
                threshold: &pth,
                pool: false,
            }),
        };
        let want = reference(&cs, &input, step, &qw, (&scale, &shift), &nr);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for s in Isa::available().into_iter().map(|i| Simd::new(i).unwrap()) {
                let got = pool
                    .install(|| {
                        s.conv_q_empf(&input, step, (images, cs.h, cs.w), &qw, 1, cs.pad, &scale, &shift, &nr)
                    })
                    .unwrap();
                match got {
                    Some(y) => prop_assert_eq!(bits(&y), bits(&want), "{} {} threads", s.isa(), threads),
                    None => prop_assert!(
                        !(s.isa() == Isa::Avx512 && vnni()),
                        "AVX-512 VNNI declined the fused kernel"
                    ),
                }
            }
        }
    }
}

/// Shapes that do not fit are errors naming the function, and a policy of sparse kernels declines.
#[test]
fn bad_neuron_shapes_are_errors_and_the_sparse_policy_declines() {
    let wf = vec![1f32; 4 * 2 * 9];
    let sw = SignConvWeights::from_f32_oihw(&wf, 4, 2, 3, 3).unwrap();
    let qw = QuantConvWeights::new(&sw, 4).unwrap();
    let x = vec![0.5f32; 2 * 2 * 6 * 6];
    let (sc, sh) = (vec![1f32; 4], vec![0f32; 4]);
    let (leak, th) = (vec![0.5f32; 2], vec![1f32; 2]);
    let good = EmpfNeuron {
        steps: 2,
        leak: &leak,
        affine: None,
        threshold: &th,
        pool: true,
    };
    let _one = POLICY.lock().unwrap_or_else(|e| e.into_inner());
    let s = Simd::global();
    let spikes = ConvInput {
        x: &x,
        repeated: false,
        neuron: None,
    };
    for bad in [
        EmpfNeuron { steps: 3, ..good }, // 2 images are not 3 steps
        EmpfNeuron { steps: 0, ..good }, // no steps
        EmpfNeuron {
            threshold: &th[..1],
            ..good
        }, // θ per step
        EmpfNeuron {
            leak: &[0.5; 6],
            ..good
        }, // λ neither per step nor per step and channel
        EmpfNeuron {
            affine: Some((&leak, &th[..1])),
            ..good
        },
    ] {
        let e = s
            .conv_q_empf(&spikes, 0.25, (2, 6, 6), &qw, 1, 1, &sc, &sh, &bad)
            .unwrap_err();
        assert!(e.to_string().contains("conv_q_empf"), "{e}");
    }
    // an input neuron that pools, or of other steps, is an error
    let pre_bad = [
        EmpfNeuron { pool: true, ..good },
        EmpfNeuron {
            pool: false,
            steps: 1,
            threshold: &th[..1],
            leak: &leak[..1],
            ..good
        },
    ];
    for pre in pre_bad {
        let input = ConvInput {
            neuron: Some(pre),
            ..spikes
        };
        let e = s.conv_q_empf(&input, 0.25, (2, 6, 6), &qw, 1, 1, &sc, &sh, &good);
        assert!(e.is_err(), "{pre:?}");
    }
    // a 1x1 output cannot be pooled
    let x1 = vec![0.5f32; 2 * 2 * 3 * 3];
    let small = ConvInput { x: &x1, ..spikes };
    assert!(
        s.conv_q_empf(&small, 0.25, (2, 3, 3), &qw, 1, 0, &sc, &sh, &good)
            .is_err()
    );
    empf_simd::set_dense_q(DenseQ::Never);
    let none = s.conv_q_empf(&spikes, 0.25, (2, 6, 6), &qw, 1, 1, &sc, &sh, &good);
    empf_simd::set_dense_q(DenseQ::Auto);
    assert_eq!(none, Ok(None));
}
