//! Arbitrary bytes into the deployable-model loader (`empf::infer::format`). The first byte picks
//! the presentation: as is (a whole file, checksum included), or as a file body resealed with a
//! correct checksum (so mutations reach the structural checks instead of dying at the checksum).
//! Whatever loads must write back to the same bytes, and preparing a runtime for it must return
//! (an error or a runtime) without panicking.
#![no_main]

use empf::infer::format::{Model, fnv1a};
use empf::infer::{Precision, Runtime};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        let _ = Model::from_bytes(data, "fuzz.empfm");
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut b = rest.to_vec();
        b.extend_from_slice(&fnv1a(rest).to_le_bytes());
        b
    };
    if let Ok(m) = Model::from_bytes(&bytes, "fuzz.empfm") {
        assert_eq!(m.to_bytes(), bytes, "a loaded model writes back to the same bytes");
        // small inputs only: the runtime is not asked to run a hostile model's huge tensors
        if m.input.iter().product::<usize>() <= 4096 && m.steps <= 8 {
            let _ = Runtime::new(m, Precision::Float, None, empf_simd::Simd::global());
        }
    }
});
