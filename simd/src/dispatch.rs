//! Instruction-set detection and selection.
//!
//! The best level the CPU supports is detected once per process. `EMPF_ISA=scalar|avx2|avx512|neon`
//! forces a level for the process-wide default ([`Isa::global`]); asking for a level the host lacks is
//! an error ([`Isa::force`] returns it, the environment variable panics on first use with the reason,
//! so a benchmark can never silently measure the wrong kernel). Code that wants several levels in one
//! process (tests, benchmarks) builds explicit [`crate::Simd`] handles with [`crate::Simd::new`].

use crate::SimdError;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable scalar reference (`u64::count_ones`), the test oracle.
    Scalar,
    /// x86-64 AVX2, popcount by nibble table lookup (`vpshufb`) and `vpsadbw`.
    Avx2,
    /// x86-64 AVX-512F/BW/VL with VPOPCNTDQ (`vpopcntq`).
    Avx512,
    /// aarch64 Advanced SIMD (`cnt` + pairwise widening adds).
    Neon,
}

impl Isa {
    /// Every level, from the slowest.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    /// Short lower-case name, as accepted by `EMPF_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Descriptive name of the popcount kernel of this level (for logs and benchmark output).
    pub fn kernel_name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar u64::count_ones 1x1 reference",
            Isa::Avx2 => "avx2 vpshufb-popcount 2x4 micro-kernel",
            Isa::Avx512 => "avx512 vpopcntdq vertical 4x32 / horizontal 4x4 micro-kernels",
            Isa::Neon => "neon cnt+uadalp 2x4 micro-kernel",
        }
    }

    /// Parses a name as accepted by `EMPF_ISA` (case-insensitive).
    pub fn parse(s: &str) -> Result<Isa, SimdError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            "neon" => Ok(Isa::Neon),
            other => Err(SimdError::Isa(format!(
                "unknown ISA {other:?}: expected scalar, avx2, avx512 or neon"
            ))),
        }
    }

    /// Whether this host can run this level.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every level this host can run, from the slowest.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest level this host can run (detected once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2, Isa::Neon]
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Checks that the host can run this level.
    pub fn require(self) -> Result<Isa, SimdError> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(SimdError::Isa(format!(
                "ISA {} requested but this CPU ({}) lacks it (available: {:?})",
                self.name(),
                std::env::consts::ARCH,
                Isa::available()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
            )))
        }
    }

    /// Reads `EMPF_ISA`: `Ok(None)` when unset, an error when set to an unknown or unavailable level.
    pub fn from_env() -> Result<Option<Isa>, SimdError> {
        match std::env::var("EMPF_ISA") {
            Ok(s) if !s.trim().is_empty() => Isa::parse(&s)
                .and_then(Isa::require)
                .map(Some)
                .map_err(|e| SimdError::Isa(format!("EMPF_ISA: {e}"))),
            _ => Ok(None),
        }
    }

    /// The process-wide default level: the one set by [`Isa::force`], else `EMPF_ISA`, else
    /// [`Isa::detect`].
    ///
    /// # Panics
    /// When `EMPF_ISA` names an unknown level or one this host lacks (loudly, on first use).
    pub fn global() -> Isa {
        match GLOBAL.load(Ordering::Relaxed) {
            UNSET => {
                let isa = match Isa::from_env() {
                    Ok(Some(i)) => i,
                    Ok(None) => Isa::detect(),
                    Err(e) => panic!("{e}"),
                };
                // Another thread may have forced a level meanwhile: keep theirs.
                let _ =
                    GLOBAL.compare_exchange(UNSET, isa as u8, Ordering::Relaxed, Ordering::Relaxed);
                Isa::from_u8(GLOBAL.load(Ordering::Relaxed))
            }
            v => Isa::from_u8(v),
        }
    }

    /// Forces the process-wide default level; errors when the host lacks it.
    pub fn force(self) -> Result<(), SimdError> {
        self.require()?;
        GLOBAL.store(self as u8, Ordering::Relaxed);
        Ok(())
    }

    fn from_u8(v: u8) -> Isa {
        Isa::ALL[usize::from(v)]
    }
}

const UNSET: u8 = u8::MAX;
static GLOBAL: AtomicU8 = AtomicU8::new(UNSET);

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Name of the popcount kernel used by the process-wide default level.
pub fn kernel_name() -> &'static str {
    Isa::global().kernel_name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_roundtrips_every_name_and_rejects_unknown() {
        for i in Isa::ALL {
            assert_eq!(Isa::parse(i.name()).unwrap(), i);
            assert_eq!(Isa::parse(&i.name().to_uppercase()).unwrap(), i);
        }
        assert!(Isa::parse("sse9").is_err());
    }

    #[test]
    fn scalar_always_available_and_detect_is_available() {
        assert!(Isa::Scalar.is_available());
        assert!(Isa::detect().is_available());
    }

    #[test]
    fn forcing_a_missing_level_errors_loudly() {
        // Exactly one of avx512/neon is absent on any host.
        let missing = if cfg!(target_arch = "x86_64") {
            Isa::Neon
        } else {
            Isa::Avx512
        };
        let err = missing.require().unwrap_err().to_string();
        assert!(err.contains(missing.name()), "{err}");
        assert!(missing.force().is_err());
    }
}
