//! Make the MNIST subset bundled at `data/mnist-mini/`: the first 20,000 training images and the
//! first 5,000 test images of MNIST (original order, no shuffling), written as gzip IDX files with
//! the standard MNIST names (best compression, zero gzip timestamp: the output is reproducible).
//!
//! ```text
//! cargo run --release --example make_mini_mnist -- /path/to/mnist data/mnist-mini [20000 5000]
//! ```
//!
//! Prints the label histogram of each split so the class balance can be checked.

use empf::data::idx::{read_idx, write_idx};
use std::path::{Path, PathBuf};

fn find(dir: &Path, stem: &str) -> PathBuf {
    let gz = dir.join(format!("{stem}.gz"));
    if gz.is_file() { gz } else { dir.join(stem) }
}

fn main() -> empf::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: make_mini_mnist <mnist-dir> <out-dir> [n-train n-test]");
        std::process::exit(2);
    }
    let (src, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let counts = [
        args.get(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_000usize),
        args.get(3)
            .and_then(|s| s.parse().ok())
            .unwrap_or(5_000usize),
    ];
    std::fs::create_dir_all(&out).map_err(|e| empf::Error::io(&out, e))?;
    for (prefix, n) in ["train", "t10k"].into_iter().zip(counts) {
        let im = read_idx(find(&src, &format!("{prefix}-images-idx3-ubyte")))?;
        let lb = read_idx(find(&src, &format!("{prefix}-labels-idx1-ubyte")))?;
        let n = n.min(im.dims[0]).min(lb.dims[0]);
        let per: usize = im.dims[1..].iter().product();
        let mut dims = im.dims.clone();
        dims[0] = n;
        write_idx(
            out.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &dims,
            &im.data[..n * per],
            true,
        )?;
        write_idx(
            out.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &[n],
            &lb.data[..n],
            true,
        )?;
        let mut hist = [0usize; 10];
        for &l in &lb.data[..n] {
            hist[usize::from(l).min(9)] += 1;
        }
        println!(
            "{prefix}: {n} images {:?}, labels per class {hist:?}",
            &dims[1..]
        );
    }
    Ok(())
}
