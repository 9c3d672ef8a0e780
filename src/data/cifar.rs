//! CIFAR-10 and CIFAR-100 in the official binary layout.
//!
//! CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` and
//! `test_batch.bin`, each a sequence of 3073-byte records: 1 label byte (0..=9), then 3072 pixel
//! bytes (R plane, G plane, B plane, each 32 × 32 row-major), which is already the C × H × W layout
//! of [`Dataset`].
//!
//! CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`, records of 3074 bytes: the coarse
//! label (0..=19), the fine label (0..=99), then the 3072 pixel bytes. [`load_cifar100`] returns the
//! fine labels as the dataset's labels and keeps the coarse ones alongside.
//!
//! A file whose length is not a whole number of records, or that holds a label out of range, is an
//! [`Error::Format`] naming the file, the record and the problem. Sizes come from the file length,
//! which is checked before anything is allocated.

use super::Dataset;
use crate::error::{Error, Result};
use std::path::Path;

/// Pixels of one CIFAR image (3 × 32 × 32).
pub const CIFAR_PIXELS: usize = 3 * 32 * 32;

/// Largest CIFAR file accepted (1 GiB; the real files are ~30-150 MB).
pub const MAX_CIFAR_BYTES: u64 = 1 << 30;

/// CIFAR-10 class names in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Train and test splits of CIFAR-100 with both label sets.
#[derive(Clone, Debug)]
pub struct Cifar100 {
    /// Training set (fine labels, 100 classes).
    pub train: Dataset,
    /// Test set (fine labels, 100 classes).
    pub test: Dataset,
    /// Coarse label (0..20) of each training image.
    pub train_coarse: Vec<u16>,
    /// Coarse label (0..20) of each test image.
    pub test_coarse: Vec<u16>,
}

/// Parse the records of a CIFAR binary file. `label_bytes` is 1 (CIFAR-10: the label) or 2
/// (CIFAR-100: coarse, fine). Returns the pixels and, per label byte position, the labels.
/// `path` only labels the errors.
pub fn parse_cifar_records(
    bytes: &[u8],
    label_bytes: usize,
    path: impl AsRef<Path>,
) -> Result<(Vec<u8>, Vec<Vec<u16>>)> {
    let path = path.as_ref();
    let limits: &[(u16, &str)] = match label_bytes {
        1 => &[(10, "label")],
        2 => &[(20, "coarse label"), (100, "fine label")],
        _ => {
            return Err(Error::Config(format!(
                "CIFAR records have 1 or 2 label bytes, not {label_bytes}"
            )));
        }
    };
    let rec = label_bytes + CIFAR_PIXELS;
    if bytes.is_empty() {
        return Err(Error::format(path, "empty file (expected CIFAR records)"));
    }
    if bytes.len() % rec != 0 {
        return Err(Error::format(
            path,
            format!(
                "truncated or not a CIFAR-{} file: {} bytes is not a multiple of the {rec}-byte record \
                 ({} whole records, {} bytes left over)",
                if label_bytes == 1 { 10 } else { 100 },
                bytes.len(),
                bytes.len() / rec,
                bytes.len() % rec
            ),
        ));
    }
    let n = bytes.len() / rec;
    let mut labels = vec![Vec::with_capacity(n); label_bytes];
    let mut pixels = Vec::with_capacity(n * CIFAR_PIXELS);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        for (j, &(limit, what)) in limits.iter().enumerate() {
            let l = u16::from(r[j]);
            if l >= limit {
                return Err(Error::format(
                    path,
                    format!(
                        "record {i} (byte offset {}): {what} {l} is out of range (must be < {limit})",
                        i * rec + j
                    ),
                ));
            }
            labels[j].push(l);
        }
        pixels.extend_from_slice(&r[label_bytes..]);
    }
    Ok((pixels, labels))
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_CIFAR_BYTES {
        return Err(Error::format(
            path,
            format!(
                "file is {} bytes, larger than any CIFAR file ({MAX_CIFAR_BYTES} bytes at most)",
                meta.len()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Read one CIFAR-10 binary file into a dataset (10 classes, 3 × 32 × 32).
pub fn read_cifar10_file(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = read_limited(path)?;
    let (px, mut labels) = parse_cifar_records(&bytes, 1, path)?;
    Dataset::new(px, labels.remove(0), [3, 32, 32], 10)
}

/// Find `name` in `dir` or in the official sub-directory `sub` of it.
fn locate(dir: &Path, sub: &str, name: &str) -> Result<std::path::PathBuf> {
    for p in [dir.join(name), dir.join(sub).join(name)] {
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::io(
        dir.join(name),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("CIFAR file `{name}` not found in this directory nor in its `{sub}/`"),
        ),
    ))
}

fn concat(parts: Vec<Dataset>, classes: usize) -> Result<Dataset> {
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for d in &parts {
        for i in 0..d.len() {
            px.extend_from_slice(d.image(i).unwrap_or_default());
        }
        labels.extend_from_slice(d.labels());
    }
    Dataset::new(px, labels, [3, 32, 32], classes)
}

/// CIFAR-10 from a directory holding `data_batch_{1..5}.bin` and `test_batch.bin` (directly or in
/// `cifar-10-batches-bin/`): (train, test).
pub fn load_cifar10(dir: impl AsRef<Path>) -> Result<(Dataset, Dataset)> {
    let dir = dir.as_ref();
    let sub = "cifar-10-batches-bin";
    let mut parts = Vec::new();
    for b in 1..=5 {
        parts.push(read_cifar10_file(locate(
            dir,
            sub,
            &format!("data_batch_{b}.bin"),
        )?)?);
    }
    let train = concat(parts, 10)?;
    let test = read_cifar10_file(locate(dir, sub, "test_batch.bin")?)?;
    Ok((train, test))
}

/// One CIFAR-100 binary file: the dataset (fine labels) and the coarse labels.
pub fn read_cifar100_file(path: impl AsRef<Path>) -> Result<(Dataset, Vec<u16>)> {
    let path = path.as_ref();
    let bytes = read_limited(path)?;
    let (px, mut labels) = parse_cifar_records(&bytes, 2, path)?;
    let fine = labels.pop().unwrap_or_default();
    let coarse = labels.pop().unwrap_or_default();
    Ok((Dataset::new(px, fine, [3, 32, 32], 100)?, coarse))
}

/// CIFAR-100 from a directory holding `train.bin` and `test.bin` (directly or in
/// `cifar-100-binary/`).
pub fn load_cifar100(dir: impl AsRef<Path>) -> Result<Cifar100> {
    let dir = dir.as_ref();
    let sub = "cifar-100-binary";
    let (train, train_coarse) = read_cifar100_file(locate(dir, sub, "train.bin")?)?;
    let (test, test_coarse) = read_cifar100_file(locate(dir, sub, "test.bin")?)?;
    Ok(Cifar100 {
        train,
        test,
        train_coarse,
        test_coarse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(labels: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, l) in labels.iter().enumerate() {
            v.extend_from_slice(l);
            v.extend((0..CIFAR_PIXELS).map(|p| ((p + i) % 251) as u8));
        }
        v
    }

    #[test]
    fn cifar10_records_give_labels_and_planar_pixels() {
        let b = records(&[&[3], &[9]]);
        let (px, l) = parse_cifar_records(&b, 1, "x.bin").unwrap();
        assert_eq!(l, vec![vec![3, 9]]);
        assert_eq!(px.len(), 2 * CIFAR_PIXELS);
        assert_eq!(px[CIFAR_PIXELS], 1);
    }

    #[test]
    fn cifar100_records_give_coarse_and_fine_labels() {
        let b = records(&[&[19, 99], &[0, 5]]);
        let (_, l) = parse_cifar_records(&b, 2, "x.bin").unwrap();
        assert_eq!(l, vec![vec![19, 0], vec![99, 5]]);
    }

    #[test]
    fn truncated_file_is_an_error_naming_the_file() {
        let mut b = records(&[&[1]]);
        b.pop();
        let e = parse_cifar_records(&b, 1, "data_batch_1.bin")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("truncated"),
            "{e}"
        );
        let e = parse_cifar_records(&[], 1, "t.bin")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.bin") && e.contains("empty"), "{e}");
    }

    #[test]
    fn label_out_of_range_is_an_error_naming_the_record() {
        let b = records(&[&[1], &[10]]);
        let e = parse_cifar_records(&b, 1, "b.bin").unwrap_err().to_string();
        assert!(
            e.contains("b.bin") && e.contains("record 1") && e.contains("10"),
            "{e}"
        );
        let b = records(&[&[20, 0]]);
        let e = parse_cifar_records(&b, 2, "c.bin").unwrap_err().to_string();
        assert!(e.contains("coarse label 20"), "{e}");
        let b = records(&[&[0, 100]]);
        let e = parse_cifar_records(&b, 2, "c.bin").unwrap_err().to_string();
        assert!(e.contains("fine label 100"), "{e}");
    }

    #[test]
    fn load_cifar10_reads_the_official_file_names_from_a_directory() {
        let dir = std::env::temp_dir().join(format!("empf-cifar10-{}", std::process::id()));
        let sub = dir.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&sub).unwrap();
        for b in 1..=5u8 {
            std::fs::write(
                sub.join(format!("data_batch_{b}.bin")),
                records(&[&[b], &[0]]),
            )
            .unwrap();
        }
        std::fs::write(sub.join("test_batch.bin"), records(&[&[7]])).unwrap();
        let (train, test) = load_cifar10(&dir).unwrap();
        assert_eq!(train.len(), 10);
        assert_eq!(train.labels()[..4], [1, 0, 2, 0]);
        assert_eq!(test.labels(), &[7]);
        assert_eq!(train.shape(), [3, 32, 32]);
        std::fs::remove_file(sub.join("test_batch.bin")).unwrap();
        let e = load_cifar10(&dir).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
