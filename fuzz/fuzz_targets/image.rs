//! Arbitrary bytes into the ImageFolder image decoder (PNG / JPEG by content), resized and
//! centre-cropped to a size picked by the first byte.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let size = 1 + usize::from(mode % 16);
    let ch = if mode & 0x80 != 0 { 1 } else { 3 };
    if let Ok(px) = empf::data::folder::decode_image(rest, ch, size, "fuzz.png") {
        assert_eq!(px.len(), ch * size * size);
    }
});
