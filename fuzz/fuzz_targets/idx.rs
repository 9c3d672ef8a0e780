//! Arbitrary bytes into the IDX parser. The first byte picks how the rest is presented:
//! as is (raw or gzip, detected by magic), gzip-compressed (so mutations reach the IDX parser
//! behind a valid gzip stream), or behind a valid IDX header `00 00 08 <n>` (so they reach
//! the dimension and size checks).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        let _ = empf::data::parse_idx_bytes(data, "fuzz.idx");
        return;
    };
    let bytes = match mode % 3 {
        0 => rest.to_vec(),
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(rest).unwrap();
            e.finish().unwrap()
        }
        _ => [&[0, 0, 8, 1 + mode % 4][..], rest].concat(),
    };
    if let Ok(a) = empf::data::parse_idx_bytes(&bytes, "fuzz.idx") {
        assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
    }
});
