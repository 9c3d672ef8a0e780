//! Data files end to end: the real MNIST files (when present), the bundled subset, every kind of
//! bad IDX file, and checkpoints (round trip, atomic writes, corruption, versions, NumPy output).

use empf::data::idx::{load_idx_pair, parse_idx_bytes, read_idx};
use empf::data::{bundled_mnist_dir, load_mnist};
use empf::io::checkpoint::{Checkpoint, FORMAT_VERSION, VERSION_KEY};
use empf::io::npz::{self, NpyArray};
use empf::io::{atomic_write, tmp_path};
use ndarray::{ArrayD, IxDyn};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A fresh temporary directory for one test.
fn tmp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("empf-data-files-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shared_mnist() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist");
    if d.join("t10k-images-idx3-ubyte.gz").is_file() {
        Some(d)
    } else {
        println!(
            "skipped: MNIST not found at {} (shared data absent)",
            d.display()
        );
        None
    }
}

fn idx_bytes(magic: [u8; 4], dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = magic.to_vec();
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

// ------------------------------------------------------------------------------------------
// MNIST

#[test]
fn real_mnist_has_standard_counts_histograms_and_pixel_statistics() {
    let Some(dir) = shared_mnist() else { return };
    let m = load_mnist(&dir).unwrap();
    assert_eq!(m.test.len(), 10_000);
    assert_eq!(m.train.len(), 60_000);
    assert_eq!(m.test.shape(), [1, 28, 28]);
    assert_eq!(m.test.classes(), 10);
    // Published class counts of the MNIST test and training sets.
    assert_eq!(
        m.test.label_histogram(),
        vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(
        m.train.label_histogram(),
        vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    // The usual normalisation constants of MNIST training pixels: mean 0.1307, std 0.3081.
    let (mean, std) = m.train.channel_stats();
    assert!((mean[0] - 0.1307).abs() < 5e-4, "mean {mean:?}");
    assert!((std[0] - 0.3081).abs() < 5e-4, "std {std:?}");
    // First test label is a 7 (the well-known first MNIST test digit).
    assert_eq!(m.test.labels()[0], 7);
    let (x, y) = m.test.batch(&[0, 9_999]).unwrap();
    assert_eq!(x.shape(), &[2, 1, 28, 28]);
    assert_eq!(y[0], 7);
    assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn bundled_subset_loads_and_is_the_head_of_mnist() {
    let dir = bundled_mnist_dir();
    let m = load_mnist(&dir).unwrap();
    assert_eq!((m.train.len(), m.test.len()), (20_000, 5_000));
    assert_eq!(
        m.train.label_histogram(),
        vec![1994, 2281, 1929, 2076, 1945, 1775, 1971, 2093, 1922, 2014]
    );
    assert_eq!(
        m.test.label_histogram(),
        vec![460, 571, 530, 500, 500, 456, 462, 512, 489, 520]
    );
    let size: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size <= 5 << 20, "bundled data is {size} bytes, over 5 MB");
    if let Some(full) = shared_mnist() {
        let f = load_mnist(full).unwrap();
        let head: Vec<usize> = (0..5_000).collect();
        assert_eq!(f.test.subset(&head).unwrap(), m.test);
        let head: Vec<usize> = (0..20_000).collect();
        assert_eq!(f.train.subset(&head).unwrap(), m.train);
    }
}

#[test]
fn missing_mnist_directory_error_names_directory_and_file() {
    let d = tmp_dir("missing");
    let e = load_mnist(&d).unwrap_err().to_string();
    assert!(
        e.contains(d.to_str().unwrap()) && e.contains("train-images-idx3-ubyte"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------
// Bad IDX files: each names the file and the problem.

/// Write `bytes` to `<dir>/<name>`, read it, and check the error mentions the file and `want`.
fn assert_idx_error(dir: &Path, name: &str, bytes: &[u8], want: &[&str]) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = read_idx(&p).unwrap_err().to_string();
    assert!(e.contains(name), "error does not name the file: {e}");
    assert!(
        want.iter().any(|w| e.contains(w)),
        "error for {name} lacks any of {want:?}: {e}"
    );
}

#[test]
fn each_kind_of_bad_idx_file_gives_a_named_error() {
    let d = tmp_dir("bad-idx");
    let good = idx_bytes([0, 0, 8, 3], &[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(parse_idx_bytes(&good, "good").is_ok());
    assert_idx_error(&d, "empty", &[], &["empty file"]);
    assert_idx_error(&d, "truncated", &good[..good.len() - 3], &["truncated"]);
    assert_idx_error(&d, "short-header", &good[..9], &["truncated header"]);
    assert_idx_error(
        &d,
        "trailing",
        &[&good[..], &[0]].concat(),
        &["trailing bytes"],
    );
    assert_idx_error(
        &d,
        "magic",
        &idx_bytes([7, 7, 8, 1], &[1], &[0]),
        &["bad magic"],
    );
    assert_idx_error(
        &d,
        "dtype",
        &idx_bytes([0, 0, 0x0c, 1], &[1], &[0; 4]),
        &["unsupported dtype 0x0c"],
    );
    assert_idx_error(
        &d,
        "zero-dims",
        &[0, 0, 8, 0],
        &["bad number of dimensions 0"],
    );
    assert_idx_error(
        &d,
        "many-dims",
        &idx_bytes([0, 0, 8, 9], &[1; 9], &[0]),
        &["bad number of dimensions 9"],
    );
    assert_idx_error(
        &d,
        "huge-dims",
        &idx_bytes([0, 0, 8, 3], &[60_000, 60_000, 60_000], &[]),
        &["declare more than"],
    );
    assert_idx_error(
        &d,
        "gz-garbage",
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xde, 0xad, 0xbe, 0xef],
        &["gzip stream is corrupt"],
    );
    let gz = gzip(&good);
    assert_idx_error(
        &d,
        "gz-truncated",
        &gz[..gz.len() - 12],
        &["gzip stream is corrupt", "truncated"],
    );
    assert_idx_error(
        &d,
        "gz-trailing",
        &gzip(&[&good[..], &[9, 9]].concat()),
        &["trailing bytes"],
    );
    let mut flipped = gz.clone();
    let n = flipped.len();
    flipped[n - 8] ^= 0xff; // CRC-32 in the gzip trailer
    assert_idx_error(&d, "gz-crc", &flipped, &["gzip stream is corrupt"]);
}

#[test]
fn bad_image_label_pairs_give_named_errors() {
    let d = tmp_dir("bad-pair");
    let images = d.join("images");
    std::fs::write(&images, idx_bytes([0, 0, 8, 3], &[3, 2, 2], &[0; 12])).unwrap();
    let check = |name: &str, labels: Vec<u8>, want: &str| {
        let p = d.join(name);
        std::fs::write(&p, labels).unwrap();
        let e = load_idx_pair(&images, &p, 10).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{e}");
    };
    check(
        "count-mismatch",
        idx_bytes([0, 0, 8, 1], &[2], &[1, 2]),
        "count mismatch: 2 labels but",
    );
    check(
        "label-range",
        idx_bytes([0, 0, 8, 1], &[3], &[1, 10, 2]),
        "label 10 of item 1 (offset 9) is out of range 0..10",
    );
    check(
        "label-dims",
        idx_bytes([0, 0, 8, 2], &[3, 1], &[1, 1, 2]),
        "label file must have 1 dimension",
    );
    let flat = d.join("flat-images");
    std::fs::write(&flat, idx_bytes([0, 0, 8, 1], &[3], &[0; 3])).unwrap();
    let lp = d.join("ok-labels");
    std::fs::write(&lp, idx_bytes([0, 0, 8, 1], &[3], &[0; 3])).unwrap();
    let e = load_idx_pair(&flat, &lp, 10).unwrap_err().to_string();
    assert!(
        e.contains("flat-images") && e.contains("3 dimensions"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------
// Checkpoints

fn sample_checkpoint() -> Checkpoint {
    let mut c = Checkpoint::new();
    let w: Vec<f32> = (0..3 * 5 * 7)
        .map(|i| f32::from_bits(0x3f80_0000 ^ (i as u32).wrapping_mul(0x9e37_79b9)))
        .collect();
    c.put_tensor(
        "layers/0/weight",
        ArrayD::from_shape_vec(IxDyn(&[3, 5, 7]), w).unwrap(),
    );
    c.put_tensor(
        "optim/momentum/layers/0/weight",
        ArrayD::from_shape_vec(IxDyn(&[2]), vec![f32::NAN, -0.0]).unwrap(),
    );
    c.put_tensor("scalar", ArrayD::from_elem(IxDyn(&[]), 1.5));
    c.put_u64s("rng", &[0xdead_beef, u64::MAX, 0, 1 << 63]);
    c.put_i64s("counters", &[12_345, -1]);
    c.put_str("config", "{\"arch\": \"vgg-small\", \"T\": 4}");
    c
}

#[test]
fn checkpoint_round_trip_is_bit_exact() {
    let d = tmp_dir("ckpt-rt");
    let p = d.join("model.npz");
    let c = sample_checkpoint();
    c.save(&p).unwrap();
    assert!(!tmp_path(&p).exists(), "temporary file left behind");
    let back = Checkpoint::load(&p).unwrap();
    assert_eq!(back.format_version(), Some(FORMAT_VERSION));
    for name in c.names() {
        assert!(
            back.get(name).unwrap().bit_eq(c.get(name).unwrap()),
            "entry {name} changed"
        );
    }
    assert_eq!(back.len(), c.len() + 2, "two reserved entries added");
    assert_eq!(
        back.u64s("rng").unwrap(),
        &[0xdead_beef, u64::MAX, 0, 1 << 63]
    );
    // Saving what was loaded gives the same bytes.
    assert_eq!(back.to_bytes().unwrap(), std::fs::read(&p).unwrap());
}

#[test]
fn failed_atomic_write_leaves_the_old_file_intact() {
    let d = tmp_dir("ckpt-atomic");
    let p = d.join("model.npz");
    let old = sample_checkpoint();
    old.save(&p).unwrap();
    let before = std::fs::read(&p).unwrap();
    // A write that dies halfway: half of a new checkpoint's bytes, then an error.
    let mut new = sample_checkpoint();
    new.put_str("config", "something else");
    let bytes = new.to_bytes().unwrap();
    let e = atomic_write(&p, |w| {
        w.write_all(&bytes[..bytes.len() / 2])?;
        Err(std::io::Error::other("simulated crash mid-write"))
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.npz") && e.contains("simulated crash"),
        "{e}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before, "old checkpoint changed");
    assert!(!tmp_path(&p).exists(), "temporary file left behind");
    assert_eq!(
        Checkpoint::load(&p).unwrap().str("config").unwrap(),
        old.str("config").unwrap()
    );
    // A stale temporary file from an earlier crash does not get in the way.
    std::fs::write(tmp_path(&p), b"stale").unwrap();
    new.save(&p).unwrap();
    assert_eq!(
        Checkpoint::load(&p).unwrap().str("config").unwrap(),
        "something else"
    );
    // Saving into a directory that does not exist fails cleanly, naming the path.
    let e = new
        .save(d.join("no/such/dir/m.npz"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("m.npz"), "{e}");
}

#[test]
fn corrupt_and_truncated_checkpoints_error_cleanly() {
    let bytes = sample_checkpoint().to_bytes().unwrap();
    // Every truncation point (stride 7 to keep it fast) is an error naming the file.
    for cut in (0..bytes.len()).step_by(7) {
        let e = Checkpoint::from_bytes(&bytes[..cut], "cut.npz")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cut.npz: "), "cut {cut}: {e}");
    }
    // A flipped payload byte is caught by the entry's CRC and names the entry.
    let c = sample_checkpoint();
    let mut one = Checkpoint::new();
    one.insert("scalar", c.get("scalar").unwrap().clone());
    let mut b = one.to_bytes().unwrap();
    let at = b
        .windows(4)
        .position(|w| w == 1.5f32.to_le_bytes())
        .unwrap();
    b[at] ^= 1;
    let e = Checkpoint::from_bytes(&b, "flip.npz")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("flip.npz") && e.contains("`scalar.npy`") && e.contains("CRC"),
        "{e}"
    );
    // Garbage and empty files.
    for (name, junk) in [("empty.npz", &b""[..]), ("junk.npz", &[7u8; 100][..])] {
        let e = Checkpoint::from_bytes(junk, name).unwrap_err().to_string();
        assert!(e.starts_with(name), "{e}");
    }
}

/// A stored zip holding one `<name>.npy` entry with the given raw bytes and a valid CRC, so
/// that what is tested is the check of the `.npy` header itself.
fn zip_with_npy(name: &str, npy: &[u8]) -> Vec<u8> {
    zip_stored(&[(name, npy)])
}

/// A stored zip of `<name>.npy` entries holding the given raw bytes (valid CRCs).
fn zip_stored(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, npy) in entries {
        let fname = format!("{name}.npy");
        let mut crc = flate2::Crc::new();
        crc.update(npy);
        // Header fields from "version needed": version 20, flags 0, stored, time 0, date 1980-01-01.
        let mut lh = vec![20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0];
        lh.extend_from_slice(&crc.sum().to_le_bytes());
        lh.extend_from_slice(&(npy.len() as u32).to_le_bytes());
        lh.extend_from_slice(&(npy.len() as u32).to_le_bytes());
        lh.extend_from_slice(&(fname.len() as u16).to_le_bytes());
        lh.extend_from_slice(&[0, 0]);
        let offset = out.len() as u32;
        out.extend_from_slice(&[0x50, 0x4b, 3, 4]);
        out.extend_from_slice(&lh);
        out.extend_from_slice(fname.as_bytes());
        out.extend_from_slice(npy);
        central.extend_from_slice(&[0x50, 0x4b, 1, 2, 20, 0]);
        central.extend_from_slice(&lh);
        central.extend_from_slice(&[0; 10]); // comment length, disk, internal and external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(fname.as_bytes());
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&central);
    let n = (entries.len() as u16).to_le_bytes();
    out.extend_from_slice(&[0x50, 0x4b, 5, 6, 0, 0, 0, 0, n[0], n[1], n[0], n[1]]);
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    b.extend_from_slice(dict.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn hostile_npy_headers_are_rejected_before_allocating() {
    let ok = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
        &[0; 8],
    );
    assert!(npz::parse_npz(&zip_with_npy("w", &ok), "ok.npz").is_ok());
    let cases = [
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }",
            "overflows",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000,), }",
            "truncated",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            "trailing bytes",
        ),
        (
            "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
            "not supported",
        ),
        ("{'descr': '<f4', 'shape': (2,), }", "lacks"),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), ",
            "header",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
            "too large",
        ),
    ];
    for (dict, want) in cases {
        let e = npz::parse_npz(&zip_with_npy("w", &npy(dict, &[0; 8])), "h.npz")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("h.npz") && e.contains("`w.npy`") && e.contains(want),
            "{dict}: {e}"
        );
    }
}

#[test]
fn newer_or_missing_format_version_is_rejected() {
    let newer = NpyArray::U64(ArrayD::from_elem(IxDyn(&[]), FORMAT_VERSION + 1));
    let mut b = Vec::new();
    npz::write_npz(&mut b, [(VERSION_KEY, &newer)]).unwrap();
    let e = Checkpoint::from_bytes(&b, "future.npz")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("future.npz")
            && e.contains(&format!("version {}", FORMAT_VERSION + 1))
            && e.contains("newer"),
        "{e}"
    );
    // The version is checked before other entries are parsed: a newer file holding an entry
    // this version cannot read is still reported as newer.
    let mut v = Vec::new();
    empf::io::npz::write_npy(&mut v, &newer).unwrap();
    let exotic = npy(
        "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
        &[0; 8],
    );
    let b = zip_stored(&[("a.exotic", &exotic), (VERSION_KEY, &v)]);
    assert!(
        npz::parse_npz(&b, "f2.npz")
            .unwrap_err()
            .to_string()
            .contains("not supported")
    );
    let e = Checkpoint::from_bytes(&b, "f2.npz")
        .unwrap_err()
        .to_string();
    assert!(e.contains("newer"), "{e}");
    let zero = NpyArray::U64(ArrayD::from_elem(IxDyn(&[]), 0));
    let mut b = Vec::new();
    npz::write_npz(&mut b, [(VERSION_KEY, &zero)]).unwrap();
    assert!(
        Checkpoint::from_bytes(&b, "zero.npz")
            .unwrap_err()
            .to_string()
            .contains("unknown")
    );
    let text = NpyArray::Str("1".into());
    let mut b = Vec::new();
    npz::write_npz(&mut b, [(VERSION_KEY, &text)]).unwrap();
    assert!(
        Checkpoint::from_bytes(&b, "str.npz")
            .unwrap_err()
            .to_string()
            .contains("expected a u64 scalar")
    );
}

// ------------------------------------------------------------------------------------------
// Files written by NumPy (hex dumps of in-memory np.savez / np.savez_compressed output):
//   np.savez(f, w=np.array([[0.5,-1.25,3.0],[1e-3,-0.0,7.0]], dtype=np.float32),
//            f=np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2,3)), s='héllo')
//   np.savez_compressed(f, w=np.array([[0.5,-1.25],[2.0,4.0]], dtype=np.float32), step=np.int64(42))
// NumPy writes zip64 local headers (sizes 0xFFFFFFFF plus a zip64 extra field); the
// compressed file uses deflate.

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn reads_np_savez_output_with_fortran_order_and_unicode() {
    let m = npz::parse_npz(&unhex(NP_SAVEZ), "np.npz").unwrap();
    let NpyArray::F32(w) = &m["w"] else {
        panic!("{:?}", m["w"])
    };
    assert_eq!(w.shape(), &[2, 3]);
    assert_eq!(
        w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        [0.5f32, -1.25, 3.0, 1e-3, -0.0, 7.0].map(f32::to_bits)
    );
    let NpyArray::I64(f) = &m["f"] else { panic!() };
    assert_eq!(
        f.iter().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    assert_eq!(m["s"], NpyArray::Str("héllo".into()));
    // Plain .npz files are not checkpoints, but can be wrapped.
    assert!(Checkpoint::from_bytes(&unhex(NP_SAVEZ), "np.npz").is_err());
}

#[test]
fn reads_np_savez_compressed_output() {
    let m = npz::parse_npz(&unhex(NP_SAVEZ_COMPRESSED), "npc.npz").unwrap();
    let NpyArray::F32(w) = &m["w"] else { panic!() };
    assert_eq!(
        w.iter().copied().collect::<Vec<_>>(),
        vec![0.5, -1.25, 2.0, 4.0]
    );
    assert_eq!(m["step"], NpyArray::I64(ArrayD::from_elem(IxDyn(&[]), 42)));
}

// Generated with numpy 2.4.6:
const NP_SAVEZ: &str = "\
504b03042d000000000000002100e014cf41ffffffffffffffff05001400772e6e707901001000980000000000000098\
00000000000000934e554d5059010076007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572\
273a2046616c73652c20277368617065273a2028322c2033292c207d2020202020202020202020202020202020202020\
20202020202020202020202020202020202020202020202020202020202020202020202020200a0000003f0000a0bf00\
0040406f12833a000000800000e040504b03042d000000000000002100ca6474e2ffffffffffffffff05001400662e6e\
70790100100098000000000000009800000000000000934e554d5059010076007b276465736372273a20273c6934272c\
2027666f727472616e5f6f72646572273a20547275652c20277368617065273a2028322c2033292c207d202020202020\
202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020\
20202020200a000000000300000001000000040000000200000005000000504b03042d000000000000002100a609f608\
ffffffffffffffff05001400732e6e70790100100094000000000000009400000000000000934e554d5059010076007b\
276465736372273a20273c5535272c2027666f727472616e5f6f72646572273a2046616c73652c20277368617065273a\
2028292c207d202020202020202020202020202020202020202020202020202020202020202020202020202020202020\
20202020202020202020202020202020202020200a68000000e90000006c0000006c0000006f000000504b01022d032d\
000000000000002100e014cf419800000098000000050000000000000000000000800100000000772e6e7079504b0102\
2d032d000000000000002100ca6474e298000000980000000500000000000000000000008001cf000000662e6e707950\
4b01022d032d000000000000002100a609f608940000009400000005000000000000000000000080019e010000732e6e\
7079504b0506000000000300030099000000690200000000";
const NP_SAVEZ_COMPRESSED: &str = "\
504b03042d0000000800000021005a181c19ffffffffffffffff05001400772e6e707901001000900000000000000055\
000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e9366a2aea3a09e965f54529498179f5f94920a\
12774bcc294e058a17672416a402f91a463a0a469a3a0ab50a64032e0606067b068605fb81b4030343830300504b0304\
2d000000080000002100a4cf830effffffffffffffff08001400737465702e6e70790100100088000000000000004600\
0000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e9369a1aea3a09e965f54529498179f5f94920a12\
774bcc294e058a17672416a402f91a9a3a0ab50a14012e2d06080000504b01022d032d0000000800000021005a181c19\
5500000090000000050000000000000000000000800100000000772e6e7079504b01022d032d000000080000002100a4\
cf830e460000008800000008000000000000000000000080018c000000737465702e6e7079504b050600000000020002\
00690000000c0100000000";
