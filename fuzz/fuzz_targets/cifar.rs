//! Arbitrary bytes into the CIFAR binary parser; the first byte picks CIFAR-10 (1 label byte) or
//! CIFAR-100 (2 label bytes). Whatever parses has one label per image per label byte.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let lb = 1 + usize::from(mode % 2);
    if let Ok((px, labels)) = empf::data::cifar::parse_cifar_records(rest, lb, "fuzz.bin") {
        assert_eq!(labels.len(), lb);
        assert!(labels.iter().all(|l| l.len() * 3072 == px.len()));
    }
});
