//! Arbitrary bytes into the `.npz` image-dataset reader (archive parser, then the image / label
//! conversion).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = empf::io::npz::parse_npz(data, "fuzz.npz") {
        let _ = empf::data::npy::datasets_from_npz(&m, std::path::Path::new("fuzz.npz"));
    }
});
