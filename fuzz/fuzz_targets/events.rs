//! Arbitrary bytes into the event readers: the first byte picks N-MNIST, AEDAT 2.0 or 3.1 (as is), or
//! AEDAT 2.0 behind a valid header (so mutations reach the records). Whatever parses is binned
//! into frames by count and by time, and every event must land in a frame.
#![no_main]

use empf::data::events::{FramesBy, bin_events, parse_aedat, parse_aedat2, parse_nmnist};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let rec = match mode % 3 {
        0 => parse_nmnist(rest, "fuzz.bin"),
        1 => parse_aedat(rest, "fuzz.aedat"),
        _ => parse_aedat2(&[b"#!AER-DAT2.0\r\n".as_slice(), rest].concat(), "fuzz.aedat"),
    };
    if let Ok(r) = rec {
        let t = 1 + usize::from(mode % 7);
        for by in [FramesBy::Count, FramesBy::Time] {
            let f = bin_events(&r, t, by, r.height, r.width);
            let total: usize = f.iter().map(|&c| usize::from(c)).sum();
            assert!(total <= r.events.len());
            if r.events.len() < 255 {
                assert_eq!(total, r.events.len());
            }
        }
    }
});
