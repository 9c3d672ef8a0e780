//! IDX files (MNIST, Fashion-MNIST), raw or gzip-compressed (detected by the gzip magic bytes
//! `1f 8b`, not by the file name).
//!
//! Layout (all integers big-endian): `00 00 <dtype> <ndims>`, then `ndims` u32 dimensions, then
//! `prod(dims)` items row-major. Only dtype `0x08` (unsigned byte) is supported, which is what
//! MNIST and Fashion-MNIST use.
//!
//! Every declared size is validated before anything is allocated: the magic, the dtype, `ndims`
//! in 1..=4, `prod(dims) <= MAX_IDX_BYTES` without overflow, and (for raw files) the declared size
//! against the bytes actually present; a gzip stream is inflated incrementally so memory follows
//! the data really present, never the declared size alone. Errors are
//! [`Error::Format`] naming the file, the field and the offset.

use super::Dataset;
use crate::error::{Error, Result};
use flate2::read::MultiGzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest data section accepted (2^31 bytes): ample for any IDX image set, small enough that a
/// hostile header cannot ask for more.
pub const MAX_IDX_BYTES: usize = 1 << 31;

/// The only supported item type: unsigned byte.
pub const IDX_U8: u8 = 0x08;

/// A parsed IDX file: its dimensions and its `u8` items (row-major).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first (e.g. `[60000, 28, 28]`).
    pub dims: Vec<usize>,
    /// `dims.iter().product()` items.
    pub data: Vec<u8>,
}

fn dtype_name(t: u8) -> &'static str {
    match t {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "i16",
        0x0C => "i32",
        0x0D => "f32",
        0x0E => "f64",
        _ => "unknown",
    }
}

/// Read an IDX file (raw or gzip).
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_idx_bytes(&bytes, path)
}

/// Parse the bytes of an IDX file (raw or gzip); `path` only labels the errors.
pub fn parse_idx_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let fmt = |msg: String| Error::format(path, msg);
    if bytes.is_empty() {
        return Err(fmt("empty file (expected an IDX header)".into()));
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        parse_stream(MultiGzDecoder::new(bytes), None, path, true)
    } else {
        parse_stream(bytes, Some(bytes.len()), path, false)
    }
}

/// Map a read error: inside a gzip stream a bad stream is a format error; otherwise I/O.
fn read_err(path: &Path, gz: bool, what: &str, offset: usize, e: std::io::Error) -> Error {
    if gz {
        Error::format(
            path,
            format!(
                "gzip stream is corrupt (while reading {what} at uncompressed offset {offset}): {e}"
            ),
        )
    } else {
        Error::io(path, e)
    }
}

/// Read up to `buf.len()` bytes; returns how many were read (fewer only at end of stream).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn parse_stream<R: Read>(
    mut r: R,
    raw_len: Option<usize>,
    path: &Path,
    gz: bool,
) -> Result<IdxArray> {
    let fmt = |msg: String| Error::format(path, msg);
    let z = if gz { " (after gunzip)" } else { "" };
    let mut magic = [0u8; 4];
    let n = read_full(&mut r, &mut magic).map_err(|e| read_err(path, gz, "the magic", 0, e))?;
    if n < 4 {
        return Err(fmt(format!(
            "truncated header{z}: {n} bytes, need 4 for the magic"
        )));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(fmt(format!(
            "bad magic {:02x} {:02x} {:02x} {:02x} at offset 0{z}: expected 00 00 <dtype> <ndims>",
            magic[0], magic[1], magic[2], magic[3]
        )));
    }
    if magic[2] != IDX_U8 {
        return Err(fmt(format!(
            "unsupported dtype 0x{:02x} ({}) at offset 2{z}: only 0x08 (unsigned byte) is supported",
            magic[2],
            dtype_name(magic[2])
        )));
    }
    let ndims = usize::from(magic[3]);
    if !(1..=4).contains(&ndims) {
        return Err(fmt(format!(
            "bad number of dimensions {ndims} at offset 3{z}: expected 1 to 4"
        )));
    }
    let mut dbytes = [0u8; 16];
    let dbytes = &mut dbytes[..4 * ndims];
    let n = read_full(&mut r, dbytes).map_err(|e| read_err(path, gz, "the dimensions", 4, e))?;
    if n < dbytes.len() {
        return Err(fmt(format!(
            "truncated header{z}: file ends at offset {} inside the {ndims} dimensions (need {} bytes)",
            4 + n,
            4 + 4 * ndims
        )));
    }
    let dims: Vec<usize> = dbytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let total = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&t| t <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            fmt(format!(
                "dimensions {dims:?} (offset 4) declare more than {MAX_IDX_BYTES} bytes of data"
            ))
        })?;
    let header = 4 + 4 * ndims;
    if let Some(len) = raw_len {
        let have = len - header;
        if have != total {
            let what = if have < total {
                "truncated"
            } else {
                "trailing bytes"
            };
            return Err(fmt(format!(
                "{what}: dimensions {dims:?} declare {total} data bytes after the {header}-byte header, but the file has {have}"
            )));
        }
    }
    // Grow with the data actually inflated (at most `total` + 1 bytes, to detect trailing data).
    let mut data = Vec::with_capacity(total.min(1 << 26));
    (&mut r)
        .take(total as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| read_err(path, gz, "the data", header + data.len(), e))?;
    if data.len() < total {
        return Err(fmt(format!(
            "truncated{z}: dimensions {dims:?} declare {total} data bytes after the {header}-byte header, but the data ends after {} (offset {})",
            data.len(),
            header + data.len()
        )));
    }
    if data.len() > total {
        return Err(fmt(format!(
            "trailing bytes{z}: data continues past the {total} bytes declared by dimensions {dims:?} (offset {})",
            header + total
        )));
    }
    Ok(IdxArray { dims, data })
}

/// Write an IDX file of `u8` items (atomically; gzip-compressed at the best level with a zero
/// timestamp when `gzip`, so the output is reproducible).
pub fn write_idx(path: impl AsRef<Path>, dims: &[usize], data: &[u8], gzip: bool) -> Result<()> {
    let path = path.as_ref();
    let total = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if dims.is_empty()
        || dims.len() > 4
        || total != Some(data.len())
        || dims.iter().any(|&d| u32::try_from(d).is_err())
    {
        return Err(Error::shape(
            "write_idx",
            format!("1 to 4 u32 dimensions whose product is {}", data.len()),
            dims,
        ));
    }
    let mut bytes = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    bytes.extend_from_slice(&[0, 0, IDX_U8, dims.len() as u8]);
    for &d in dims {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(data);
    crate::io::atomic_write(path, |w| {
        if gzip {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .write(w, flate2::Compression::best());
            std::io::Write::write_all(&mut enc, &bytes)?;
            enc.finish()?;
            Ok(())
        } else {
            w.write_all(&bytes)
        }
    })
}

/// MNIST-like train and test sets.
#[derive(Clone, Debug)]
pub struct Mnist {
    /// The training set.
    pub train: Dataset,
    /// The test set.
    pub test: Dataset,
}

/// Find `<prefix>-<kind>-<idx>-ubyte` in `dir`, trying the `.gz` and the `<kind>.<idx>` variants.
fn find(dir: &Path, prefix: &str, kind: &str, idx: &str) -> Result<PathBuf> {
    let names = [
        format!("{prefix}-{kind}-{idx}-ubyte"),
        format!("{prefix}-{kind}-{idx}-ubyte.gz"),
        format!("{prefix}-{kind}.{idx}-ubyte"),
        format!("{prefix}-{kind}.{idx}-ubyte.gz"),
    ];
    for n in &names {
        let p = dir.join(n);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no {}[.gz] (nor {}[.gz]) in this directory",
                names[0], names[2]
            ),
        ),
    ))
}

/// Build a dataset from an IDX image file (`[n, h, w]` or `[n, c, h, w]`) and an IDX label file
/// (`[n]`, each label `< classes`).
pub fn load_idx_pair(
    images: impl AsRef<Path>,
    labels: impl AsRef<Path>,
    classes: usize,
) -> Result<Dataset> {
    let (ip, lp) = (images.as_ref(), labels.as_ref());
    let im = read_idx(ip)?;
    let lb = read_idx(lp)?;
    dataset_from_idx(im, ip, lb, lp, classes)
}

/// Build a dataset from parsed IDX image and label arrays (paths label the errors).
pub fn dataset_from_idx(
    im: IdxArray,
    images_path: &Path,
    lb: IdxArray,
    labels_path: &Path,
    classes: usize,
) -> Result<Dataset> {
    let chw = match im.dims[..] {
        [_, h, w] => [1, h, w],
        [_, c, h, w] => [c, h, w],
        _ => {
            return Err(Error::format(
                images_path,
                format!(
                    "image file must have 3 dimensions [n, h, w] or 4 [n, c, h, w], got {:?}",
                    im.dims
                ),
            ));
        }
    };
    if chw.contains(&0) {
        return Err(Error::format(
            images_path,
            format!("image dimensions {:?} contain a zero", im.dims),
        ));
    }
    if lb.dims.len() != 1 {
        return Err(Error::format(
            labels_path,
            format!("label file must have 1 dimension [n], got {:?}", lb.dims),
        ));
    }
    if lb.dims[0] != im.dims[0] {
        return Err(Error::format(
            labels_path,
            format!(
                "count mismatch: {} labels but {} has {} images",
                lb.dims[0],
                images_path.display(),
                im.dims[0]
            ),
        ));
    }
    if let Some((i, &l)) = lb
        .data
        .iter()
        .enumerate()
        .find(|(_, l)| usize::from(**l) >= classes)
    {
        return Err(Error::format(
            labels_path,
            format!(
                "label {l} of item {i} (offset {}) is out of range 0..{classes}",
                8 + i
            ),
        ));
    }
    Dataset::new(
        im.data,
        lb.data.iter().map(|&l| u16::from(l)).collect(),
        chw,
        classes,
    )
}

/// Load MNIST (or Fashion-MNIST, same file names) from `dir`: `train-images-idx3-ubyte[.gz]`,
/// `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`
/// (the `train-images.idx3-ubyte` spelling is accepted too). Ten classes.
pub fn load_mnist(dir: impl AsRef<Path>) -> Result<Mnist> {
    let dir = dir.as_ref();
    let split = |prefix: &str| -> Result<Dataset> {
        load_idx_pair(
            find(dir, prefix, "images", "idx3")?,
            find(dir, prefix, "labels", "idx1")?,
            10,
        )
    };
    Ok(Mnist {
        train: split("train")?,
        test: split("t10k")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_raw_and_gzip_identically() {
        let b = idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let a = parse_idx_bytes(&b, "x").unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(parse_idx_bytes(&gz(&b), "x").unwrap(), a);
    }

    #[test]
    fn huge_declared_dims_rejected_before_allocation() {
        let b = idx(&[u32::MAX, u32::MAX, 2], &[]);
        let e = parse_idx_bytes(&b, "big").unwrap_err().to_string();
        assert!(e.contains("declare more than"), "{e}");
        // The same through gzip: the cap applies before any data is read.
        let e = parse_idx_bytes(&gz(&b), "big").unwrap_err().to_string();
        assert!(e.contains("declare more than"), "{e}");
        // Within the cap but absent from a gzip stream: truncated, without allocating 2 GiB.
        let e = parse_idx_bytes(&gz(&idx(&[1 << 15, 1 << 15], &[1, 2])), "g")
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let mut b = idx(&[1], &[0, 0, 0, 0]);
        b[2] = 0x0D;
        let e = parse_idx_bytes(&b, "f.idx").unwrap_err().to_string();
        assert!(e.contains("f.idx") && e.contains("0x0d (f32)"), "{e}");
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = std::env::temp_dir().join(format!("empf-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for gzip in [false, true] {
            let p = dir.join(format!("a-{gzip}"));
            write_idx(&p, &[2, 2, 2], &[9, 8, 7, 6, 5, 4, 3, 2], gzip).unwrap();
            let a = read_idx(&p).unwrap();
            assert_eq!(a.dims, vec![2, 2, 2]);
            assert_eq!(a.data, vec![9, 8, 7, 6, 5, 4, 3, 2]);
        }
        assert!(write_idx(dir.join("bad"), &[3], &[1, 2], false).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any byte string either parses to a consistent array or errors: never panics.
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(a) = parse_idx_bytes(&b, "fuzz") {
                prop_assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
            }
        }

        /// Every proper prefix of a valid file is an error naming the file.
        #[test]
        fn every_truncation_is_an_error(n in 1usize..5, cut in 0usize..1000) {
            let data: Vec<u8> = (0..n * 3).map(|i| i as u8).collect();
            let full = idx(&[n as u32, 3], &data);
            let cut = cut % full.len();
            let e = parse_idx_bytes(&full[..cut], "cut.idx").unwrap_err().to_string();
            prop_assert!(e.starts_with("cut.idx: "), "{}", e);
        }
    }
}
