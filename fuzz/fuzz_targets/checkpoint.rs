//! Arbitrary bytes into the checkpoint / .npz parser. The first byte picks the presentation:
//! as is (a whole archive), or wrapped as the one stored `w.npy` entry of a valid zip with a
//! correct CRC-32 (so mutations reach the `.npy` header parser instead of dying at the CRC).
#![no_main]

use libfuzzer_sys::fuzz_target;

/// A stored zip with one entry `w.npy` holding `npy` (layout as in tests/data_files.rs).
fn zip_with_npy(npy: &[u8]) -> Vec<u8> {
    let fname = b"w.npy";
    let mut crc = flate2::Crc::new();
    crc.update(npy);
    let mut lh = vec![20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0];
    lh.extend_from_slice(&crc.sum().to_le_bytes());
    lh.extend_from_slice(&(npy.len() as u32).to_le_bytes());
    lh.extend_from_slice(&(npy.len() as u32).to_le_bytes());
    lh.extend_from_slice(&(fname.len() as u16).to_le_bytes());
    lh.extend_from_slice(&[0, 0]);
    let mut out = vec![0x50, 0x4b, 3, 4];
    out.extend_from_slice(&lh);
    out.extend_from_slice(fname);
    out.extend_from_slice(npy);
    let cd_off = out.len() as u32;
    let mut cd = vec![0x50, 0x4b, 1, 2, 20, 0];
    cd.extend_from_slice(&lh);
    cd.extend_from_slice(&[0; 14]);
    cd.extend_from_slice(fname);
    out.extend_from_slice(&cd);
    out.extend_from_slice(&[0x50, 0x4b, 5, 6, 0, 0, 0, 0, 1, 0, 1, 0]);
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        let _ = empf::io::Checkpoint::from_bytes(data, "fuzz.npz");
        return;
    };
    if mode % 2 == 0 {
        let _ = empf::io::Checkpoint::from_bytes(rest, "fuzz.npz");
        if let Ok(m) = empf::io::npz::parse_npz(rest, "fuzz.npz") {
            // Whatever parses must write back and parse to the same arrays.
            // (Names the writer refuses, such as an empty one, are skipped.)
            let mut b = Vec::new();
            if empf::io::npz::write_npz(&mut b, m.iter().map(|(k, a)| (k.as_str(), a))).is_ok() {
                let again = empf::io::npz::parse_npz(&b, "again.npz").unwrap();
                assert!(m.len() == again.len() && m.iter().all(|(k, a)| again[k].bit_eq(a)));
            }
        }
    } else {
        let _ = empf::io::npz::parse_npz(&zip_with_npy(rest), "fuzz.npz");
    }
});
