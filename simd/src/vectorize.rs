//! Compiling plain Rust loops for the host's vector extensions.
//!
//! The crates are built for the baseline x86-64 target (SSE2), so the element-wise passes of the
//! trainer (neuron charge and fire, BatchNorm) were vectorised 4 floats wide at best.
//! [`vectorized`] runs a piece of [`VectorWork`] inside a function compiled with AVX-512 (or AVX2
//! and FMA) when the CPU has it: the work's `run`, marked `#[inline(always)]`, is inlined there
//! and so compiled with those features (the technique of the `pulp` crate; a closure would not
//! do, as the compiler keeps it a separate function compiled for the baseline). Floating-point
//! results do not change: without fast-math flags the compiler neither reorders float arithmetic
//! nor fuses a multiply and an add, so only lane-independent work is widened.
//!
//! Call it inside each parallel work item (a rayon closure runs in its own function), around the
//! loop itself.

/// The extension [`vectorized`] compiles for on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorLevel {
    /// Baseline code.
    Baseline,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512 F/BW/DQ/VL, with AVX2 and FMA (x86-64).
    Avx512,
}

/// The level [`vectorized`] compiles for: that of the process-wide kernel level
/// ([`crate::Isa::global`], so `EMPF_ISA` and `Isa::force` lower it too), when the CPU also has
/// the extensions the work is compiled with (FMA; AVX-512DQ at the AVX-512 level).
pub fn vector_level() -> VectorLevel {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::Isa;
        use std::arch::is_x86_feature_detected as has;
        let fma = has!("avx2") && has!("fma");
        match Isa::global() {
            Isa::Avx512 if fma && has!("avx512dq") => VectorLevel::Avx512,
            Isa::Avx512 | Isa::Avx2 if fma => VectorLevel::Avx2,
            _ => VectorLevel::Baseline,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        VectorLevel::Baseline
    }
}

/// A piece of plain-Rust work to compile for the host's vector extension ([`vectorized`]).
pub trait VectorWork {
    /// What the work returns.
    type Output;
    /// Does the work. Implementations must be `#[inline(always)]`: only inlined code is compiled
    /// with the features.
    fn run(self) -> Self::Output;
}

/// `work.run()`, compiled for the host's best vector extension ([`vector_level`]). Same results as
/// calling `work.run()` directly.
#[inline(always)]
pub fn vectorized<W: VectorWork>(work: W) -> W::Output {
    #[cfg(target_arch = "x86_64")]
    {
        match vector_level() {
            // SAFETY: the CPU has the features (`vector_level` detected them).
            VectorLevel::Avx512 => unsafe { x86::run_avx512(work) },
            // SAFETY: as above.
            VectorLevel::Avx2 => unsafe { x86::run_avx2(work) },
            VectorLevel::Baseline => work.run(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        work.run()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::VectorWork;

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) fn run_avx512<W: VectorWork>(work: W) -> W::Output {
        work.run()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn run_avx2<W: VectorWork>(work: W) -> W::Output {
        work.run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Axpy<'a>(f32, &'a [f32], &'a mut [f32]);
    impl VectorWork for Axpy<'_> {
        type Output = f32;
        #[inline(always)]
        fn run(self) -> f32 {
            let mut sum = 0.0;
            for (y, &x) in self.2.iter_mut().zip(self.1) {
                *y += self.0 * x;
                sum += *y;
            }
            sum
        }
    }

    /// The vectorised work gives the baseline's results bit for bit (no fused multiply-adds, no
    /// reordered sums).
    #[test]
    fn vectorized_work_equals_the_baseline_bit_for_bit() {
        let x: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.731).sin()).collect();
        let y0: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.377).cos()).collect();
        let (mut a, mut b) = (y0.clone(), y0);
        let sa = vectorized(Axpy(1.37, &x, &mut a));
        let sb = Axpy(1.37, &x, &mut b).run();
        assert_eq!(sa.to_bits(), sb.to_bits());
        assert!(a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()));
    }
}
