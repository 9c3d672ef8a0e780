//! Every kernel at every ISA level available on this host against a naive integer/float oracle
//! computed from the unpacked values (so the scalar level is checked too, and the SIMD levels are
//! bit-exact with it for integer outputs).

use empf_simd::{
    BinOp, Binarize, Epilogue, Isa, Neuron, PackedConvWeights, PackedImage, PackedMatrix, Simd,
    SpikeOut,
};
use proptest::prelude::*;

/// Tiny deterministic generator for test data (splitmix64).
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
    /// ±1 as float, with some ±0.0 and tiny values to exercise the sign rule.
    fn sign_f32(&mut self) -> f32 {
        match self.below(16) {
            0 => 0.0,
            1 => -0.0,
            2 => -1e-30,
            _ => (self.below(2) as f32 * 2.0 - 1.0) * (0.5 + self.below(100) as f32 / 50.0),
        }
    }
    /// Spikes {0,1} as float, sometimes negative or NaN (→ 0).
    fn spike_f32(&mut self) -> f32 {
        match self.below(16) {
            0 => -0.5,
            1 => f32::NAN,
            2 => 1e-30,
            x => (x % 2) as f32,
        }
    }
}

fn levels() -> Vec<Simd> {
    Isa::available()
        .into_iter()
        .map(|i| Simd::new(i).unwrap())
        .collect()
}

fn sign_val(x: f32) -> i32 {
    if Binarize::Sign.bit(x) { 1 } else { -1 }
}
fn spike_val(x: f32) -> i32 {
    i32::from(Binarize::Positive.bit(x))
}

fn channel_count() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(63),
        Just(64),
        Just(65),
        Just(127),
        Just(129),
        1usize..300
    ]
}

fn naive_gemm(a: &[i32], w: &[i32], m: usize, n: usize, k: usize) -> Vec<i32> {
    let mut out = vec![0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|t| a[i * k + t] * w[j * k + t]).sum();
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn bgemm_and_xor_equal_naive_dot_at_every_level(
        m in 1usize..11, n in 1usize..11, k in channel_count(), seed in any::<u64>(), threads in 1usize..4
    ) {
        let mut g = Gen(seed);
        let af: Vec<f32> = (0..m * k).map(|_| g.spike_f32()).collect();
        let asf: Vec<f32> = (0..m * k).map(|_| g.sign_f32()).collect();
        let wf: Vec<f32> = (0..n * k).map(|_| g.sign_f32()).collect();
        let ai: Vec<i32> = af.iter().map(|&x| spike_val(x)).collect();
        let asi: Vec<i32> = asf.iter().map(|&x| sign_val(x)).collect();
        let wi: Vec<i32> = wf.iter().map(|&x| sign_val(x)).collect();
        let want_and = naive_gemm(&ai, &wi, m, n, k);
        let want_xor = naive_gemm(&asi, &wi, m, n, k);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let scalar = Simd::new(Isa::Scalar).unwrap();
        let ref_pack = scalar.pack_rows(&af, m, k, Binarize::Positive).unwrap();
        for s in levels() {
            pool.install(|| {
                let a = s.pack_rows(&af, m, k, Binarize::Positive).unwrap();
                let a_s = s.pack_rows(&asf, m, k, Binarize::Sign).unwrap();
                let w = s.pack_rows(&wf, n, k, Binarize::Sign).unwrap();
                assert_eq!(a, ref_pack, "{} packer differs from scalar", s.isa());
                let mut out = vec![0; m * n];
                s.bgemm(BinOp::And, &a, &w, &mut out).unwrap();
                assert_eq!(out, want_and, "{} AND", s.isa());
                s.bgemm(BinOp::Xor, &a_s, &w, &mut out).unwrap();
                assert_eq!(out, want_xor, "{} XOR", s.isa());
            });
        }
    }

    #[test]
    fn long_row_bgemm_equals_naive_dot_at_every_level(
        m in 1usize..7, n in 1usize..11, k in 8000usize..12000, seed in any::<u64>()
    ) {
        // Rows beyond the AVX-512 vertical-kernel limit (128 words) take the horizontal kernel.
        let mut g = Gen(seed);
        let af: Vec<f32> = (0..m * k).map(|_| g.spike_f32()).collect();
        let wf: Vec<f32> = (0..n * k).map(|_| g.sign_f32()).collect();
        let ai: Vec<i32> = af.iter().map(|&x| spike_val(x)).collect();
        let wi: Vec<i32> = wf.iter().map(|&x| sign_val(x)).collect();
        let asf: Vec<f32> = ai.iter().map(|&x| x as f32 * 2.0 - 1.0).collect();
        let want_and = naive_gemm(&ai, &wi, m, n, k);
        let want_xor = naive_gemm(&ai.iter().map(|&x| 2 * x - 1).collect::<Vec<_>>(), &wi, m, n, k);
        for s in levels() {
            let a = s.pack_rows(&af, m, k, Binarize::Positive).unwrap();
            let a_s = s.pack_rows(&asf, m, k, Binarize::Sign).unwrap();
            let w = s.pack_rows(&wf, n, k, Binarize::Sign).unwrap();
            let mut out = vec![0; m * n];
            s.bgemm(BinOp::And, &a, &w, &mut out).unwrap();
            prop_assert_eq!(&out, &want_and, "{} AND", s.isa());
            s.bgemm(BinOp::Xor, &a_s, &w, &mut out).unwrap();
            prop_assert_eq!(&out, &want_xor, "{} XOR", s.isa());
        }
    }

    #[test]
    fn bgemm_bit_serial_equals_naive_kbit_dot_at_every_level(
        m in 1usize..9, n in 1usize..9, k in channel_count(), bits in 1u32..9, seed in any::<u64>()
    ) {
        let mut g = Gen(seed);
        let aq: Vec<u8> = (0..m * k).map(|_| g.below(1 << bits) as u8).collect();
        let wf: Vec<f32> = (0..n * k).map(|_| g.sign_f32()).collect();
        let ai: Vec<i32> = aq.iter().map(|&x| i32::from(x)).collect();
        let wi: Vec<i32> = wf.iter().map(|&x| sign_val(x)).collect();
        let want = naive_gemm(&ai, &wi, m, n, k);
        let a = PackedMatrix::from_u8_planes(&aq, m, k, bits).unwrap();
        for s in levels() {
            let w = s.pack_rows(&wf, n, k, Binarize::Sign).unwrap();
            let mut out = vec![0; m * n];
            s.bgemm(BinOp::And, &a, &w, &mut out).unwrap();
            prop_assert_eq!(&out, &want, "{} bits={}", s.isa(), bits);
        }
    }
}

#[derive(Debug, Clone)]
struct ConvCase {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

/// Naive NCHW convolution with zero padding; output NHWC `[n][oh][ow][cout]`.
fn naive_conv(cc: &ConvCase, x: &[i32], wt: &[i32]) -> (Vec<i32>, usize, usize) {
    let oh = (cc.h + 2 * cc.pad - cc.k) / cc.stride + 1;
    let ow = (cc.w + 2 * cc.pad - cc.k) / cc.stride + 1;
    let mut out = vec![0; cc.n * oh * ow * cc.cout];
    for ni in 0..cc.n {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..cc.cout {
                    let mut acc = 0;
                    for ci in 0..cc.c {
                        for ky in 0..cc.k {
                            for kx in 0..cc.k {
                                let iy = (oy * cc.stride + ky) as isize - cc.pad as isize;
                                let ix = (ox * cc.stride + kx) as isize - cc.pad as isize;
                                if iy < 0 || ix < 0 || iy >= cc.h as isize || ix >= cc.w as isize {
                                    continue;
                                }
                                let xv =
                                    x[((ni * cc.c + ci) * cc.h + iy as usize) * cc.w + ix as usize];
                                acc += xv * wt[((o * cc.c + ci) * cc.k + ky) * cc.k + kx];
                            }
                        }
                    }
                    out[((ni * oh + oy) * ow + ox) * cc.cout + o] = acc;
                }
            }
        }
    }
    (out, oh, ow)
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (
        1usize..3,
        channel_count(),
        1usize..10,
        1usize..10,
        1usize..20,
        prop_oneof![Just(1usize), Just(3)],
        1usize..3,
        0usize..3,
    )
        .prop_filter("kernel fits", |(_, _, h, w, _, k, _, p)| {
            h + 2 * p >= *k && w + 2 * p >= *k
        })
        .prop_map(|(n, c, h, w, cout, k, stride, pad)| ConvCase {
            n,
            c,
            h,
            w,
            cout,
            k,
            stride,
            pad,
        })
}

/// NCHW floats → NHWC floats.
fn to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for ni in 0..n {
        for ci in 0..c {
            for p in 0..h * w {
                t[(ni * h * w + p) * c + ci] = x[(ni * c + ci) * h * w + p];
            }
        }
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn bconv_and_xor_and_bit_serial_equal_naive_conv_at_every_level(cc in conv_case(), seed in any::<u64>(), bits in 2u32..5) {
        let mut g = Gen(seed);
        let len = cc.n * cc.c * cc.h * cc.w;
        let xs: Vec<f32> = (0..len).map(|_| g.spike_f32()).collect();
        let xpm: Vec<f32> = (0..len).map(|_| g.sign_f32()).collect();
        let xq: Vec<u8> = (0..len).map(|_| g.below(1 << bits) as u8).collect();
        let wf: Vec<f32> = (0..cc.cout * cc.c * cc.k * cc.k).map(|_| g.sign_f32()).collect();
        let wi: Vec<i32> = wf.iter().map(|&v| sign_val(v)).collect();
        let (want_and, oh, ow) = naive_conv(&cc, &xs.iter().map(|&v| spike_val(v)).collect::<Vec<_>>(), &wi);
        let (want_xor, _, _) = naive_conv(&cc, &xpm.iter().map(|&v| sign_val(v)).collect::<Vec<_>>(), &wi);
        let (want_q, _, _) = naive_conv(&cc, &xq.iter().map(|&v| i32::from(v)).collect::<Vec<_>>(), &wi);
        prop_assert_eq!(Simd::conv_out_dims(cc.h, cc.w, cc.k, cc.k, cc.stride, cc.pad), Some((oh, ow)));
        let w = PackedConvWeights::from_f32_oihw(&wf, cc.cout, cc.c, cc.k, cc.k).unwrap();
        // k-bit image: NCHW u8 → NHWC u8.
        let xq_nhwc: Vec<u8> = to_nhwc(&xq.iter().map(|&v| f32::from(v)).collect::<Vec<_>>(), cc.n, cc.c, cc.h, cc.w)
            .iter().map(|&v| v as u8).collect();
        let imgq = PackedImage::from_u8_nhwc(&xq_nhwc, cc.n, cc.h, cc.w, cc.c, bits).unwrap();
        let mut out = vec![0; want_and.len()];
        for s in levels() {
            let img = s.pack_image_nchw(&xs, cc.n, cc.c, cc.h, cc.w, Binarize::Positive).unwrap();
            let img2 = s.pack_image_nhwc(&to_nhwc(&xs, cc.n, cc.c, cc.h, cc.w), cc.n, cc.h, cc.w, cc.c, Binarize::Positive).unwrap();
            prop_assert_eq!(&img, &img2);
            s.bconv(BinOp::And, &img, &w, cc.stride, cc.pad, &mut out).unwrap();
            prop_assert_eq!(&out, &want_and, "{} AND", s.isa());
            let img = s.pack_image_nchw(&xpm, cc.n, cc.c, cc.h, cc.w, Binarize::Sign).unwrap();
            s.bconv(BinOp::Xor, &img, &w, cc.stride, cc.pad, &mut out).unwrap();
            prop_assert_eq!(&out, &want_xor, "{} XOR", s.isa());
            s.bconv(BinOp::And, &imgq, &w, cc.stride, cc.pad, &mut out).unwrap();
            prop_assert_eq!(&out, &want_q, "{} bit-serial {} bits", s.isa(), bits);
        }
    }

    #[test]
    fn bconv_fused_epilogue_equals_obvious_float_epilogue_at_every_level(
        cc in conv_case(), seed in any::<u64>(), neuron in any::<bool>(), quant in any::<bool>()
    ) {
        let mut g = Gen(seed);
        let len = cc.n * cc.c * cc.h * cc.w;
        let xs: Vec<f32> = (0..len).map(|_| g.spike_f32()).collect();
        let wf: Vec<f32> = (0..cc.cout * cc.c * cc.k * cc.k).map(|_| g.sign_f32()).collect();
        let wi: Vec<i32> = wf.iter().map(|&v| sign_val(v)).collect();
        let (dots, _, _) = naive_conv(&cc, &xs.iter().map(|&v| spike_val(v)).collect::<Vec<_>>(), &wi);
        let scale: Vec<f32> = (0..cc.cout).map(|_| g.below(1000) as f32 / 500.0 - 0.3).collect();
        let bias: Vec<f32> = (0..cc.cout).map(|_| g.below(1000) as f32 / 100.0 - 5.0).collect();
        let v0: Vec<f32> = (0..dots.len()).map(|_| g.below(1000) as f32 / 500.0 - 1.0).collect();
        let nr = Neuron { lambda: 0.75, theta: 0.5 };
        // The obvious code.
        let mut want_s = vec![0f32; dots.len()];
        let mut want_v = v0.clone();
        for (e, &d) in dots.iter().enumerate() {
            let c = e % cc.cout;
            let y = scale[c] * d as f32 + bias[c];
            want_s[e] = if neuron {
                let m = nr.lambda * want_v[e] + y;
                let s = (m - nr.theta).max(0.0);
                want_v[e] = m - s;
                s
            } else {
                y
            };
        }
        let want_q: Vec<u8> = want_s.iter().map(|&s| (s / 0.25).round().clamp(0.0, 15.0) as u8).collect();
        let w = PackedConvWeights::from_f32_oihw(&wf, cc.cout, cc.c, cc.k, cc.k).unwrap();
        let ep = Epilogue { scale: &scale, bias: &bias, neuron: neuron.then_some(nr) };
        for s in levels() {
            let img = s.pack_image_nchw(&xs, cc.n, cc.c, cc.h, cc.w, Binarize::Positive).unwrap();
            let mut v = v0.clone();
            if quant {
                let mut q = vec![0u8; dots.len()];
                s.bconv_fused(BinOp::And, &img, &w, cc.stride, cc.pad, &ep, SpikeOut::Quant { out: &mut q, step: 0.25, bits: 4 }, &mut v).unwrap();
                prop_assert_eq!(&q, &want_q, "{}", s.isa());
            } else {
                let mut o = vec![0f32; dots.len()];
                s.bconv_fused(BinOp::And, &img, &w, cc.stride, cc.pad, &ep, SpikeOut::F32(&mut o), &mut v).unwrap();
                prop_assert_eq!(&o, &want_s, "{}", s.isa());
            }
            if neuron {
                prop_assert_eq!(&v, &want_v, "{} state", s.isa());
            }
        }
    }

    #[test]
    fn gemv_masked_equals_naive_float_dot_to_rounding_at_every_level(
        n in 1usize..70, k in channel_count(), seed in any::<u64>()
    ) {
        let mut g = Gen(seed);
        let x: Vec<f32> = (0..k).map(|_| g.below(2000) as f32 / 1000.0 - 1.0).collect();
        let wf: Vec<f32> = (0..n * k).map(|_| g.sign_f32()).collect();
        let scalar = Simd::new(Isa::Scalar).unwrap();
        let w = scalar.pack_rows(&wf, n, k, Binarize::Sign).unwrap();
        let abs: f64 = x.iter().map(|&v| f64::from(v.abs())).sum();
        for s in levels() {
            let mut y = vec![0f32; n];
            s.gemv_masked(&x, &w, &mut y).unwrap();
            for j in 0..n {
                let want: f64 = (0..k).map(|t| f64::from(x[t]) * f64::from(sign_val(wf[j * k + t]))).sum();
                let tol = 4.0 * f64::from(f32::EPSILON) * (abs + 1.0) * 2.0;
                prop_assert!((f64::from(y[j]) - want).abs() <= tol, "{} row {}: {} vs {}", s.isa(), j, y[j], want);
            }
        }
    }
}

#[test]
fn wrong_bit_in_one_weight_changes_the_dot_by_two() {
    // Guards against kernels that ignore tail words or bits: flip the last valid bit of a 129-wide row.
    for s in levels() {
        let k = 129;
        let a = s
            .pack_rows(&vec![1.0; k], 1, k, Binarize::Positive)
            .unwrap();
        let mut wf = vec![1.0f32; k];
        let w1 = s.pack_rows(&wf, 1, k, Binarize::Sign).unwrap();
        wf[k - 1] = -1.0;
        let w2 = s.pack_rows(&wf, 1, k, Binarize::Sign).unwrap();
        let (mut o1, mut o2) = ([0], [0]);
        s.bgemm(BinOp::And, &a, &w1, &mut o1).unwrap();
        s.bgemm(BinOp::And, &a, &w2, &mut o2).unwrap();
        assert_eq!((o1[0], o2[0]), (129, 127), "{}", s.isa());
    }
}

#[test]
fn large_conv_is_identical_across_levels_and_thread_counts() {
    // 14x14x256 -> 64, 3x3, pad 1: many tasks, full micro-tiles; every level equals scalar.
    let (n, c, h, w, cout) = (1, 256, 14, 14, 64);
    let mut g = Gen(7);
    let x: Vec<f32> = (0..n * c * h * w).map(|_| g.spike_f32()).collect();
    let wf: Vec<f32> = (0..cout * c * 9).map(|_| g.sign_f32()).collect();
    let wt = PackedConvWeights::from_f32_oihw(&wf, cout, c, 3, 3).unwrap();
    let scalar = Simd::new(Isa::Scalar).unwrap();
    let img = scalar
        .pack_image_nchw(&x, n, c, h, w, Binarize::Positive)
        .unwrap();
    let mut want = vec![0; n * h * w * cout];
    scalar
        .bconv(BinOp::And, &img, &wt, 1, 1, &mut want)
        .unwrap();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for s in levels() {
            let mut out = vec![0; want.len()];
            pool.install(|| s.bconv(BinOp::And, &img, &wt, 1, 1, &mut out))
                .unwrap();
            assert_eq!(out, want, "{} threads={threads}", s.isa());
        }
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_function() {
    let s = Simd::detect();
    let e = s
        .pack_rows(&[1.0; 5], 2, 3, Binarize::Sign)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pack_rows") && e.contains("2x3"), "{e}");
    let a = s.pack_rows(&[1.0; 6], 2, 3, Binarize::Sign).unwrap();
    let w = s.pack_rows(&[1.0; 8], 2, 4, Binarize::Sign).unwrap();
    let e = s
        .bgemm(BinOp::And, &a, &w, &mut [0; 4])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bgemm") && e.contains("2x3") && e.contains("2x4"),
        "{e}"
    );
    let w = s.pack_rows(&[1.0; 6], 2, 3, Binarize::Sign).unwrap();
    assert!(s.bgemm(BinOp::And, &a, &w, &mut [0; 3]).is_err());
    let q = PackedMatrix::from_u8_planes(&[3; 6], 2, 3, 2).unwrap();
    let e = s
        .bgemm(BinOp::Xor, &q, &w, &mut [0; 4])
        .unwrap_err()
        .to_string();
    assert!(e.contains("Xor"), "{e}");
    assert!(PackedMatrix::from_u8_planes(&[4; 6], 2, 3, 2).is_err());
    assert!(PackedMatrix::from_u8_planes(&[0; 6], 2, 3, 9).is_err());
    let img = s
        .pack_image_nhwc(&[1.0; 2 * 3 * 3 * 5], 2, 3, 3, 5, Binarize::Positive)
        .unwrap();
    let wt = PackedConvWeights::from_f32_oihw(&[1.0; 4 * 6 * 9], 4, 6, 3, 3).unwrap();
    let e = s
        .bconv(BinOp::And, &img, &wt, 1, 1, &mut [0; 72])
        .unwrap_err()
        .to_string();
    assert!(e.contains("bconv") && e.contains("channel"), "{e}");
    let wt = PackedConvWeights::from_f32_oihw(&[1.0; 4 * 5 * 9], 4, 5, 3, 3).unwrap();
    let e = s
        .bconv(BinOp::And, &img, &wt, 1, 1, &mut [0; 71])
        .unwrap_err()
        .to_string();
    assert!(e.contains("output has 71"), "{e}");
    assert!(s.bconv(BinOp::And, &img, &wt, 0, 1, &mut [0; 72]).is_err());
    assert!(
        s.bconv(BinOp::And, &img, &wt, 1, 0, &mut [0; 2 * 4])
            .is_ok()
    );
    assert!(PackedConvWeights::from_f32_oihw(&[1.0; 10], 4, 5, 3, 3).is_err());
    let e = s
        .gemv_masked(&[1.0; 4], &w, &mut [0.0; 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("gemv_masked"), "{e}");
    let ep = Epilogue {
        scale: &[1.0; 3],
        bias: &[0.0; 4],
        neuron: None,
    };
    let e = s
        .bgemm_fused(
            BinOp::And,
            &a,
            &w,
            &ep,
            SpikeOut::F32(&mut [0.0; 4]),
            &mut [],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("bgemm_fused"), "{e}");
}

#[test]
fn every_available_level_can_be_forced_and_names_its_kernel() {
    for i in Isa::available() {
        let s = Simd::new(i).unwrap();
        assert_eq!(s.isa(), i);
        assert!(s.kernel_name().starts_with(i.name()));
    }
    if cfg!(target_arch = "x86_64") {
        assert!(Simd::new(Isa::Neon).is_err());
    }
}

#[test]
fn long_all_ones_rows_do_not_overflow_narrow_accumulators() {
    // 40000 bits = 157 steps of 256 bits: crosses the AVX2 byte-accumulator widening (every 31 steps)
    // with the maximum count in every byte; XOR of opposite signs is all ones too.
    let (m, n, k) = (3, 5, 40000);
    for s in levels() {
        let a = s
            .pack_rows(&vec![1.0; m * k], m, k, Binarize::Positive)
            .unwrap();
        let w = s
            .pack_rows(&vec![1.0; n * k], n, k, Binarize::Sign)
            .unwrap();
        let wneg = s
            .pack_rows(&vec![-1.0; n * k], n, k, Binarize::Sign)
            .unwrap();
        let mut out = vec![0; m * n];
        s.bgemm(BinOp::And, &a, &w, &mut out).unwrap();
        assert!(
            out.iter().all(|&d| d == k as i32),
            "{} AND {:?}",
            s.isa(),
            &out[..3]
        );
        s.bgemm(BinOp::Xor, &a, &wneg, &mut out).unwrap();
        assert!(
            out.iter().all(|&d| d == -(k as i32)),
            "{} XOR {:?}",
            s.isa(),
            &out[..3]
        );
    }
}

/// Child half of `empf_isa_env_var_forces_the_level_or_panics_loudly`: prints the global level.
#[test]
fn env_child_print_global_level() {
    if std::env::var_os("EMPF_SIMD_ENV_CHILD").is_some() {
        println!("GLOBAL_ISA={}", Simd::global().isa());
    }
}

#[test]
fn empf_isa_env_var_forces_the_level_or_panics_loudly() {
    let run = |isa: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "env_child_print_global_level",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EMPF_SIMD_ENV_CHILD", "1")
            .env("EMPF_ISA", isa)
            .output()
    };
    // Under qemu-user without binfmt_misc the test binary cannot re-execute itself (the spawn fails,
    // or the child never runs): the probe with the always-present scalar level tells.
    match run("scalar") {
        Err(e) => {
            eprintln!(
                "SKIPPED empf_isa_env_var_forces_the_level_or_panics_loudly: cannot re-run the test binary: {e}"
            );
            return;
        }
        Ok(o) if !String::from_utf8_lossy(&o.stdout).contains("GLOBAL_ISA=scalar") => {
            eprintln!(
                "SKIPPED empf_isa_env_var_forces_the_level_or_panics_loudly: the re-run test binary did not run (status {:?}, stderr {:?})",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Ok(_) => {}
    }
    let run = |isa: &str| run(isa).unwrap();
    for i in Isa::available() {
        let o = run(i.name());
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && stdout.contains(&format!("GLOBAL_ISA={}", i.name())),
            "{stdout}"
        );
    }
    let missing = if cfg!(target_arch = "x86_64") {
        "neon"
    } else {
        "avx512"
    };
    for bad in [missing, "sse9"] {
        let o = run(bad);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !o.status.success() && all.contains("EMPF_ISA"),
            "EMPF_ISA={bad} must fail loudly: {all}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn simd_u8_plane_packers_equal_scalar_packing_at_every_level(
        rows in 1usize..6, c in channel_count(), bits in 1u32..9, seed in any::<u64>()
    ) {
        let mut g = Gen(seed);
        let x: Vec<u8> = (0..rows * c).map(|_| g.below(1 << bits) as u8).collect();
        let want = PackedMatrix::from_u8_planes(&x, rows, c, bits).unwrap();
        let want_img = PackedImage::from_u8_nhwc(&x, 1, 1, rows, c, bits).unwrap();
        for s in levels() {
            prop_assert_eq!(&s.pack_rows_u8(&x, rows, c, bits).unwrap(), &want, "{}", s.isa());
            prop_assert_eq!(&s.pack_image_u8_nhwc(&x, 1, 1, rows, c, bits).unwrap(), &want_img, "{}", s.isa());
        }
        if bits < 8 {
            let mut bad = x.clone();
            bad[rows * c - 1] = 1 << bits;
            let s = Simd::detect();
            prop_assert!(s.pack_rows_u8(&bad, rows, c, bits).is_err());
            prop_assert!(s.pack_image_u8_nhwc(&bad, 1, 1, rows, c, bits).is_err());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn bgemm_fused_equals_bgemm_then_public_epilogue_at_every_level(
        m in 1usize..40, n in 1usize..20, k in channel_count(), seed in any::<u64>(), xor in any::<bool>(), quant in any::<bool>()
    ) {
        let mut g = Gen(seed);
        let af: Vec<f32> = (0..m * k).map(|_| if xor { g.sign_f32() } else { g.spike_f32() }).collect();
        let wf: Vec<f32> = (0..n * k).map(|_| g.sign_f32()).collect();
        let scale: Vec<f32> = (0..n).map(|_| g.below(100) as f32 / 50.0 - 0.5).collect();
        let bias: Vec<f32> = (0..n).map(|_| g.below(100) as f32 / 10.0 - 5.0).collect();
        let v0: Vec<f32> = (0..m * n).map(|_| g.below(100) as f32 / 50.0 - 1.0).collect();
        let ep = Epilogue { scale: &scale, bias: &bias, neuron: Some(Neuron { lambda: 0.5, theta: 1.0 }) };
        let (op, mode) = if xor { (BinOp::Xor, Binarize::Sign) } else { (BinOp::And, Binarize::Positive) };
        let scalar = Simd::new(Isa::Scalar).unwrap();
        let a = scalar.pack_rows(&af, m, k, mode).unwrap();
        let w = scalar.pack_rows(&wf, n, k, Binarize::Sign).unwrap();
        let mut dots = vec![0; m * n];
        scalar.bgemm(op, &a, &w, &mut dots).unwrap();
        let mut want_v = v0.clone();
        let mut want_f = vec![0f32; m * n];
        let mut want_q = vec![0u8; m * n];
        if quant {
            empf_simd::epilogue(&dots, n, &ep, &mut SpikeOut::Quant { out: &mut want_q, step: 0.5, bits: 3 }, &mut want_v).unwrap();
        } else {
            empf_simd::epilogue(&dots, n, &ep, &mut SpikeOut::F32(&mut want_f), &mut want_v).unwrap();
        }
        for s in levels() {
            let mut v = v0.clone();
            if quant {
                let mut q = vec![0u8; m * n];
                s.bgemm_fused(op, &a, &w, &ep, SpikeOut::Quant { out: &mut q, step: 0.5, bits: 3 }, &mut v).unwrap();
                prop_assert_eq!(&q, &want_q, "{}", s.isa());
                prop_assert!(q.iter().all(|&x| x < 8));
            } else {
                let mut o = vec![0f32; m * n];
                s.bgemm_fused(op, &a, &w, &ep, SpikeOut::F32(&mut o), &mut v).unwrap();
                prop_assert_eq!(&o, &want_f, "{}", s.isa());
            }
            prop_assert_eq!(&v, &want_v, "{} state", s.isa());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Sparse float conv: with small-integer inputs (half zero) the float sums are exact, so every
    /// level equals the naive integer conv times scale plus shift; with arbitrary floats every level
    /// is bit-identical to the scalar level (same operations in the same order), batch 1 included
    /// (the row-band split), with and without pairing images (`pair`).
    #[test]
    fn sparse_conv_matches_naive_and_is_bit_identical_across_levels(
        cc in conv_case(), seed in any::<u64>(), pair in 0usize..3
    ) {
        let mut g = Gen(seed);
        let wf: Vec<f32> = (0..cc.cout * cc.c * cc.k * cc.k).map(|_| g.sign_f32()).collect();
        let xi: Vec<i32> = (0..cc.n * cc.c * cc.h * cc.w)
            .map(|_| if g.below(2) == 0 { 0 } else { g.below(7) as i32 })
            .collect();
        let xf: Vec<f32> = xi.iter().map(|&v| v as f32).collect();
        let xr: Vec<f32> = xi.iter().map(|&v| v as f32 * 0.377 + (v != 0) as i32 as f32 * 1e-3).collect();
        let wi: Vec<i32> = wf.iter().map(|&v| sign_val(v)).collect();
        let (want, oh, ow) = naive_conv(&cc, &xi, &wi);
        let scale: Vec<f32> = (0..cc.cout).map(|o| 0.5 + o as f32 * 0.25).collect();
        let shift: Vec<f32> = (0..cc.cout).map(|o| o as f32 - 3.0).collect();
        let sw = empf_simd::SignConvWeights::from_f32_oihw(&wf, cc.cout, cc.c, cc.k, cc.k).unwrap();
        let dims = (cc.n, cc.h, cc.w);
        let mut base = vec![0f32; cc.n * cc.cout * oh * ow];
        Simd::new(Isa::Scalar).unwrap()
            .sparse_conv(&xr, dims, 0, &sw, cc.stride, cc.pad, &scale, &shift, &mut base).unwrap();
        for s in levels() {
            let mut y = vec![f32::NAN; cc.n * cc.cout * oh * ow];
            s.sparse_conv(&xf, dims, pair, &sw, cc.stride, cc.pad, &scale, &shift, &mut y).unwrap();
            for ni in 0..cc.n {
                for o in 0..cc.cout {
                    for p in 0..oh * ow {
                        let exp = scale[o] * want[(ni * oh * ow + p) * cc.cout + o] as f32 + shift[o];
                        prop_assert_eq!(y[(ni * cc.cout + o) * oh * ow + p], exp, "{}", s.kernel_name());
                    }
                }
            }
            // the allocating form writes every output (no initialisation to fall back on)
            prop_assert_eq!(
                &s.sparse_conv_vec(&xf, dims, pair, &sw, cc.stride, cc.pad, &scale, &shift).unwrap(),
                &y
            );
            let mut yr = vec![f32::NAN; base.len()];
            s.sparse_conv(&xr, dims, pair, &sw, cc.stride, cc.pad, &scale, &shift, &mut yr).unwrap();
            prop_assert!(
                yr.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} differs from scalar", s.kernel_name()
            );
        }
        // wrong lengths are errors, not panics (one more than the output: a buffer of length 1
        // was the right length for a 1x1 single-output case)
        let mut wrong = vec![0f32; base.len() + 1];
        prop_assert!(Simd::new(Isa::Scalar).unwrap()
            .sparse_conv(&xf, dims, 1, &sw, cc.stride, cc.pad, &scale, &shift, &mut wrong).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// k-bit sparse conv: at every level, with and without pairing images, the output equals the
    /// naive integer conv times scale plus shift exactly (16-bit lanes where `taps·C·(2^k − 1)`
    /// fits, else 32-bit; several blocks of up to 128 outputs included; the masked 8-bit adds at
    /// AVX-512 for up to 6 bits) and equals the bit-serial popcount conv with the same epilogue
    /// bit for bit. Levels above `2^k − 1` are errors.
    #[test]
    fn sparse_conv_q_is_exact_at_every_level_and_equals_the_popcount_conv(
        cc in conv_case(), wide_out in any::<bool>(), bits in 1u32..=8, seed in any::<u64>(),
        pair in 0usize..3, zeros in 0u64..=8
    ) {
        let mut cc = cc;
        if wide_out {
            // two blocks of the widest kernels (128 outputs), the second partial
            cc.cout += 150;
        }
        let mut g = Gen(seed);
        let wf: Vec<f32> = (0..cc.cout * cc.c * cc.k * cc.k).map(|_| g.sign_f32()).collect();
        let max = (1u64 << bits) - 1;
        // `zeros` eighths of the levels zero: the dense and the sparse kernels both exercised
        let q: Vec<u8> = (0..cc.n * cc.c * cc.h * cc.w)
            .map(|_| match (g.below(8) < zeros, g.below(2)) {
                (true, _) => 0,
                (false, 0) => max as u8,
                _ => g.below(max + 1) as u8,
            })
            .collect();
        let xi: Vec<i32> = q.iter().map(|&v| i32::from(v)).collect();
        let wi: Vec<i32> = wf.iter().map(|&v| sign_val(v)).collect();
        let (want, oh, ow) = naive_conv(&cc, &xi, &wi);
        let scale: Vec<f32> = (0..cc.cout).map(|o| 0.01 + o as f32 * 0.37).collect();
        let shift: Vec<f32> = (0..cc.cout).map(|o| o as f32 * 0.1 - 3.0).collect();
        let sw = empf_simd::SignConvWeights::from_f32_oihw(&wf, cc.cout, cc.c, cc.k, cc.k).unwrap();
        let qw = empf_simd::QuantConvWeights::new(&sw, bits).unwrap();
        prop_assert_eq!(qw.narrow(), (cc.k * cc.k * cc.c) as u64 * max <= i16::MAX as u64);
        // the popcount conv on the NHWC planes of the same levels
        let scalar = Simd::new(Isa::Scalar).unwrap();
        let hw = cc.h * cc.w;
        let mut q_nhwc = vec![0u8; q.len()];
        for ni in 0..cc.n {
            for ci in 0..cc.c {
                for p in 0..hw {
                    q_nhwc[(ni * hw + p) * cc.c + ci] = q[(ni * cc.c + ci) * hw + p];
                }
            }
        }
        let img = scalar.pack_image_u8_nhwc(&q_nhwc, cc.n, cc.h, cc.w, cc.c, bits).unwrap();
        let pw = PackedConvWeights::from_f32_oihw(&wf, cc.cout, cc.c, cc.k, cc.k).unwrap();
        let ep = Epilogue { scale: &scale, bias: &shift, neuron: None };
        let mut pop = vec![0f32; want.len()];
        scalar
            .bconv_fused(BinOp::And, &img, &pw, cc.stride, cc.pad, &ep, SpikeOut::F32(&mut pop), &mut [])
            .unwrap();
        let dims = (cc.n, cc.h, cc.w);
        // float spikes near the levels (ties, NaN, negatives, infinities, beyond the top level) and
        // their levels by the quantiser's formula
        // a third of the steps powers of two (quantised by the exact reciprocal, no division)
        let step = match g.below(3) {
            0 => (2.0f32).powi(g.below(6) as i32 - 4),
            _ => 0.05 + g.below(100) as f32 / 200.0,
        };
        let x: Vec<f32> = q
            .iter()
            .map(|&v| {
                let v = f32::from(v);
                match g.below(8) {
                    0 => (v - 0.5) * step,
                    1 => (v + 0.3) * step,
                    2 => (v - 0.49) * step,
                    3 if v == 0.0 => f32::NAN,
                    4 if v == 0.0 => -1.5,
                    5 => f32::INFINITY,
                    6 => (v + 7.0) * step,
                    _ => v * step,
                }
            })
            .collect();
        let xq: Vec<u8> = x.iter().map(|&v| (v / step).round().clamp(0.0, max as f32) as u8).collect();
        let policies = [empf_simd::DenseQ::Always, empf_simd::DenseQ::Never, empf_simd::DenseQ::Auto];
        for (s, policy) in levels().into_iter().flat_map(|s| policies.map(|p| (s, p))) {
            empf_simd::set_dense_q(policy);
            let mut y = vec![f32::NAN; want.len()];
            s.sparse_conv_q(&q, dims, pair, &qw, cc.stride, cc.pad, &scale, &shift, &mut y).unwrap();
            for ni in 0..cc.n {
                for o in 0..cc.cout {
                    for p in 0..oh * ow {
                        let e = (ni * oh * ow + p) * cc.cout + o;
                        let got = y[(ni * cc.cout + o) * oh * ow + p];
                        prop_assert_eq!(got, scale[o] * want[e] as f32 + shift[o], "{}", s.isa());
                        prop_assert_eq!(got.to_bits(), pop[e].to_bits(), "{} vs popcount", s.isa());
                    }
                }
            }
            let yv = s.sparse_conv_q_vec(&q, dims, pair, &qw, cc.stride, cc.pad, &scale, &shift).unwrap();
            prop_assert!(yv.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{} vec", s.isa());
            // the same convolution on float spikes, quantised inside it
            let mut yq = vec![f32::NAN; want.len()];
            s.sparse_conv_q(&xq, dims, pair, &qw, cc.stride, cc.pad, &scale, &shift, &mut yq).unwrap();
            let ys = s
                .sparse_conv_q_spikes_vec(&x, step, dims, pair, &qw, cc.stride, cc.pad, &scale, &shift)
                .unwrap();
            prop_assert!(
                ys.iter().zip(&yq).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} {:?} spikes", s.isa(), policy
            );
            if bits < 8 {
                let mut bad = q.clone();
                bad[q.len() / 2] = 1 << bits;
                prop_assert!(s
                    .sparse_conv_q(&bad, dims, pair, &qw, cc.stride, cc.pad, &scale, &shift, &mut y)
                    .is_err());
            }
        }
    }

    /// The spike quantiser equals `clamp(round(x / step), 0, 2^k − 1)` (half away from zero, NaN ↦
    /// 0) at every level, ties, negatives and infinities included.
    #[test]
    fn quantise_equals_the_rounding_formula_at_every_level(
        seed in any::<u64>(), bits in 1u32..=8, len in 0usize..5000
    ) {
        let mut g = Gen(seed);
        // a third of the steps powers of two (quantised by the exact reciprocal, no division)
        let step = match g.below(3) {
            0 => (2.0f32).powi(g.below(6) as i32 - 4),
            _ => 0.05 + g.below(100) as f32 / 200.0,
        };
        let x: Vec<f32> = (0..len)
            .map(|_| match g.below(10) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -1.0,
                3 => (g.below(600) as f32 + 0.5) * step, // ties
                _ => g.below(100_000) as f32 / 1000.0,
            })
            .collect();
        let max = ((1u32 << bits) - 1) as f32;
        let want: Vec<u8> = x.iter().map(|&v| (v / step).round().clamp(0.0, max) as u8).collect();
        for s in levels() {
            let mut q = vec![0xAAu8; len];
            s.quantise(&x, step, bits, &mut q).unwrap();
            prop_assert_eq!(&q, &want, "{}", s.isa());
        }
        prop_assert!(Simd::new(Isa::Scalar).unwrap().quantise(&x, step, 9, &mut vec![0; len]).is_err());
    }

    /// The 2x2 average pool equals `((((0 + a0) + a1) + b0) + b1)·0.25` bit for bit at every level:
    /// odd sizes (the last row and column dropped), rows of 1 to 40 outputs (whole 16-lane steps
    /// and masked tails), signed zeros, infinities and NaN.
    #[test]
    fn average_pool_equals_the_ordered_sum_at_every_level(
        seed in any::<u64>(), planes in 1usize..5, h in 1usize..12, w in 1usize..82
    ) {
        let mut g = Gen(seed);
        let x: Vec<f32> = (0..planes * h * w)
            .map(|_| match g.below(12) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                3 => 0.0,
                4 => 1e30,
                _ => (g.below(2000) as f32 - 1000.0) / 337.0,
            })
            .collect();
        let (oh, ow) = (h / 2, w / 2);
        let mut want = vec![0f32; planes * oh * ow];
        for p in 0..planes {
            for i in 0..oh {
                for j in 0..ow {
                    let at = |r: usize, c: usize| x[(p * h + r) * w + c];
                    let (a0, a1) = (at(2 * i, 2 * j), at(2 * i, 2 * j + 1));
                    let (b0, b1) = (at(2 * i + 1, 2 * j), at(2 * i + 1, 2 * j + 1));
                    want[(p * oh + i) * ow + j] = ((((0.0 + a0) + a1) + b0) + b1) * 0.25;
                }
            }
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        for s in levels() {
            let mut y = vec![f32::from_bits(0x7fc0_0bad); want.len()];
            s.avg_pool_2x2(&x, (h, w), &mut y).unwrap();
            prop_assert_eq!(bits(&y), bits(&want), "{}", s.isa());
            // a wrong output length is an error, not a panic
            prop_assert!(s.avg_pool_2x2(&x, (h, w), &mut vec![0.0; want.len() + 1]).is_err());
        }
    }
}

/// A stride-1 convolution shape for the sparse-input dW: up to 80 outputs (a 64-lane block, then
/// 16/8 tails and padding lanes), pad up to k − 1.
fn dw_case() -> impl Strategy<Value = ConvCase> {
    (
        1usize..5,
        1usize..6,
        1usize..9,
        1usize..9,
        1usize..80,
        prop_oneof![Just(1usize), Just(3), Just(5)],
        0usize..5,
    )
        .prop_map(|(n, c, h, w, cout, k, p)| ConvCase {
            n,
            c,
            h,
            w,
            cout,
            k,
            stride: 1,
            pad: p.min(k - 1),
        })
        .prop_filter("kernel fits", |cc| {
            cc.h + 2 * cc.pad >= cc.k && cc.w + 2 * cc.pad >= cc.k
        })
}

/// Small-integer inputs (half of them zero, the rest 1..6) and output gradients (−4..4) of a
/// stride-1 conv case: every sum of products is exact in f32.
fn dw_ints(cc: &ConvCase, r: &mut Gen) -> (Vec<i64>, Vec<i64>) {
    let (oh, ow) = (cc.h + 2 * cc.pad + 1 - cc.k, cc.w + 2 * cc.pad + 1 - cc.k);
    let xi: Vec<i64> = (0..cc.n * cc.c * cc.h * cc.w)
        .map(|_| {
            if r.below(2) == 0 {
                0
            } else {
                r.below(7) as i64
            }
        })
        .collect();
    let gi: Vec<i64> = (0..cc.n * cc.cout * oh * ow)
        .map(|_| r.below(9) as i64 - 4)
        .collect();
    (xi, gi)
}

/// Naive `dW[o][c][i][j] = Σ x[n][c][y][x]·g[n][o][y + p − i][x + p − j]` (stride 1), in i64.
fn naive_dw(cc: &ConvCase, x: &[i64], g: &[i64]) -> Vec<i64> {
    let (oh, ow) = (cc.h + 2 * cc.pad + 1 - cc.k, cc.w + 2 * cc.pad + 1 - cc.k);
    let mut dw = vec![0i64; cc.cout * cc.c * cc.k * cc.k];
    for n in 0..cc.n {
        for o in 0..cc.cout {
            for c in 0..cc.c {
                for i in 0..cc.k {
                    for j in 0..cc.k {
                        let mut s = 0;
                        for y in 0..cc.h {
                            for xx in 0..cc.w {
                                let (oy, ox) = (y + cc.pad, xx + cc.pad);
                                if oy < i || ox < j || oy - i >= oh || ox - j >= ow {
                                    continue;
                                }
                                s += x[((n * cc.c + c) * cc.h + y) * cc.w + xx]
                                    * g[((n * cc.cout + o) * oh + oy - i) * ow + ox - j];
                            }
                        }
                        dw[((o * cc.c + c) * cc.k + i) * cc.k + j] += s;
                    }
                }
            }
        }
    }
    dw
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]

    /// Sparse-input dW: with small-integer inputs (half zero) and gradients every sum is exact in
    /// f32, so every level equals the naive integer dW; with arbitrary floats every level is
    /// bit-identical to the scalar level, under 1 and 3 threads (1 to 3 chunks of images).
    #[test]
    fn sparse_conv_dw_matches_naive_and_is_bit_identical_across_levels(
        cc in dw_case(), seed in any::<u64>()
    ) {
        let mut r = Gen(seed);
        let (xi, gi) = dw_ints(&cc, &mut r);
        let want = naive_dw(&cc, &xi, &gi);
        let xf: Vec<f32> = xi.iter().map(|&v| v as f32).collect();
        let gf: Vec<f32> = gi.iter().map(|&v| v as f32).collect();
        let xr: Vec<f32> = xi.iter().map(|&v| v as f32 * 0.377 + (v != 0) as i32 as f32 * 1e-3).collect();
        let gr: Vec<f32> = (0..gf.len()).map(|_| (r.below(2001) as f32 - 1000.0) * 1.37e-3).collect();
        let dims = (cc.n, cc.c, cc.h, cc.w);
        let len = want.len();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut base = vec![f32::NAN; len];
            pool.install(|| Simd::new(Isa::Scalar).unwrap()
                .sparse_conv_dw(&xr, dims, &gr, cc.cout, cc.k, cc.pad, &mut base)).unwrap();
            for s in levels() {
                let mut dw = vec![f32::NAN; len];
                pool.install(|| s.sparse_conv_dw(&xf, dims, &gf, cc.cout, cc.k, cc.pad, &mut dw)).unwrap();
                for (a, &b) in dw.iter().zip(&want) {
                    prop_assert_eq!(*a, b as f32, "{} threads {}", s.kernel_name(), threads);
                }
                let mut dr = vec![f32::NAN; len];
                pool.install(|| s.sparse_conv_dw(&xr, dims, &gr, cc.cout, cc.k, cc.pad, &mut dr)).unwrap();
                prop_assert!(
                    dr.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} differs from scalar ({} threads)", s.kernel_name(), threads
                );
            }
        }
    }
}

/// Naive input gradient of a stride-1 conv, `dx[n][c][y][x] = Σ_o Σ_{i,j} w[o][c][i][j]·g[n][o][y +
/// p − i][x + p − j]`, kept only where `x ≠ 0` (zero elsewhere), in i64.
fn naive_dx(cc: &ConvCase, x: &[i64], w: &[i64], g: &[i64]) -> Vec<i64> {
    let (oh, ow) = (cc.h + 2 * cc.pad + 1 - cc.k, cc.w + 2 * cc.pad + 1 - cc.k);
    let mut dx = vec![0i64; x.len()];
    for n in 0..cc.n {
        for c in 0..cc.c {
            for y in 0..cc.h {
                for xx in 0..cc.w {
                    let at = ((n * cc.c + c) * cc.h + y) * cc.w + xx;
                    if x[at] == 0 {
                        continue;
                    }
                    let mut s = 0;
                    for o in 0..cc.cout {
                        for i in 0..cc.k {
                            for j in 0..cc.k {
                                let (oy, ox) = (y + cc.pad, xx + cc.pad);
                                if oy < i || ox < j || oy - i >= oh || ox - j >= ow {
                                    continue;
                                }
                                s += w[((o * cc.c + c) * cc.k + i) * cc.k + j]
                                    * g[((n * cc.cout + o) * oh + oy - i) * ow + ox - j];
                            }
                        }
                    }
                    dx[at] = s;
                }
            }
        }
    }
    dx
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]

    /// Sparse dX (with the dW in the same pass): on small integers every level equals the naive
    /// integer input gradient at the non-zero inputs and is exactly zero elsewhere, and the dW is
    /// the one `sparse_conv_dw` gives; on arbitrary floats every level is bit-identical to the
    /// scalar level, under 1 and 3 threads.
    #[test]
    fn sparse_conv_dx_matches_naive_and_is_bit_identical_across_levels(
        cc in dw_case(), seed in any::<u64>()
    ) {
        let mut r = Gen(seed);
        let (xi, gi) = dw_ints(&cc, &mut r);
        let wi: Vec<i64> = (0..cc.cout * cc.c * cc.k * cc.k).map(|_| r.below(5) as i64 - 2).collect();
        let want = naive_dx(&cc, &xi, &wi, &gi);
        let f = |v: &[i64]| -> Vec<f32> { v.iter().map(|&v| v as f32).collect() };
        let (xf, wf, gf) = (f(&xi), f(&wi), f(&gi));
        let xr: Vec<f32> = xi.iter().map(|&v| v as f32 * 0.377 + (v != 0) as i32 as f32 * 1e-3).collect();
        let wr: Vec<f32> = (0..wf.len()).map(|_| (r.below(2001) as f32 - 1000.0) * 0.71e-3).collect();
        let gr: Vec<f32> = (0..gf.len()).map(|_| (r.below(2001) as f32 - 1000.0) * 1.37e-3).collect();
        let dims = (cc.n, cc.c, cc.h, cc.w);
        let nw = cc.cout * cc.c * cc.k * cc.k;
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let scalar = Simd::new(Isa::Scalar).unwrap();
            let mut bdw = vec![f32::NAN; nw];
            let bdx = pool.install(|| scalar.sparse_conv_backward(
                &xr, dims, &gr, cc.cout, cc.k, cc.pad, &mut bdw, Some(&wr))).unwrap().unwrap();
            let mut dw_alone = vec![f32::NAN; nw];
            pool.install(|| scalar.sparse_conv_dw(&xr, dims, &gr, cc.cout, cc.k, cc.pad, &mut dw_alone)).unwrap();
            prop_assert!(bdw.iter().zip(&dw_alone).all(|(a, b)| a.to_bits() == b.to_bits()));
            for s in levels() {
                let mut dw = vec![f32::NAN; nw];
                let dx = pool.install(|| s.sparse_conv_backward(
                    &xf, dims, &gf, cc.cout, cc.k, cc.pad, &mut dw, Some(&wf))).unwrap().unwrap();
                prop_assert_eq!(dx.len(), want.len());
                for (a, &b) in dx.iter().zip(&want) {
                    prop_assert_eq!(a.to_bits(), (b as f32).to_bits(), "{} threads {}", s.kernel_name(), threads);
                }
                let mut dw = vec![f32::NAN; nw];
                let dx = pool.install(|| s.sparse_conv_backward(
                    &xr, dims, &gr, cc.cout, cc.k, cc.pad, &mut dw, Some(&wr))).unwrap().unwrap();
                prop_assert!(
                    dx.iter().zip(&bdx).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} dx differs from scalar ({} threads)", s.kernel_name(), threads
                );
                prop_assert!(
                    dw.iter().zip(&bdw).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} dw differs from scalar ({} threads)", s.kernel_name(), threads
                );
            }
        }
    }
}

#[test]
fn sparse_conv_dw_rejects_bad_shapes() {
    let s = Simd::detect();
    let (x, g) = (vec![1f32; 2 * 3 * 4 * 4], vec![1f32; 2 * 5 * 4 * 4]);
    let mut dw = vec![0f32; 5 * 3 * 9];
    let d = (2, 3, 4, 4);
    assert!(s.sparse_conv_dw(&x, d, &g, 5, 3, 1, &mut dw).is_ok());
    // pad > k − 1, a zero kernel, short buffers, a kernel larger than the padded input
    assert!(s.sparse_conv_dw(&x, d, &g, 5, 3, 3, &mut dw).is_err());
    assert!(s.sparse_conv_dw(&x, d, &g, 5, 0, 0, &mut dw).is_err());
    assert!(s.sparse_conv_dw(&x[1..], d, &g, 5, 3, 1, &mut dw).is_err());
    assert!(s.sparse_conv_dw(&x, d, &g[1..], 5, 3, 1, &mut dw).is_err());
    assert!(s.sparse_conv_dw(&x, d, &g, 5, 3, 1, &mut dw[1..]).is_err());
    // the input gradient: returned with the input's length, and only with the weights; short
    // weights are an error
    let w = vec![1f32; 5 * 3 * 9];
    let dx = s.sparse_conv_backward(&x, d, &g, 5, 3, 1, &mut dw, Some(&w));
    assert_eq!(dx.unwrap().map(|v| v.len()), Some(x.len()));
    assert_eq!(
        s.sparse_conv_backward(&x, d, &g, 5, 3, 1, &mut dw, None)
            .unwrap(),
        None
    );
    assert!(
        s.sparse_conv_backward(&x, d, &g, 5, 3, 1, &mut dw, Some(&w[1..]))
            .is_err()
    );
    let e = s
        .sparse_conv_dw(&x, (2, 3, 1, 1), &g, 5, 5, 1, &mut dw)
        .unwrap_err();
    assert!(e.to_string().contains("sparse_conv_dw"), "{e}");
}
