//! Images and labels from NumPy `.npz` archives (read by [`crate::io::npz`]).
//!
//! Keys: `x_train`, `y_train`, `x_test`, `y_test` (the Keras convention), or a single set under
//! `images` / `labels` (also `x` / `y`), used for both training and testing.
//! Images: `uint8` (taken as is) or `float32` / `float64` (values in [0, 1] are scaled by 255, larger
//! ones taken as 0..255; rounded and clamped), shaped `N × H × W` (one channel), `N × C × H × W` or
//! `N × H × W × C` (channels last is recognised by a last axis of 1, 3 or 4 with a second axis that
//! is not). Labels: 1-D integers in `0..65536`; the class count is the largest label + 1.
//!
//! Errors name the file and the key: a missing key, an unsupported dtype or rank, a label count
//! that does not match, a negative or too-large label.

use super::Dataset;
use crate::error::{Error, Result};
use crate::io::npz::NpyArray;
use std::collections::BTreeMap;
use std::path::Path;

/// Convert one image array to `(pixels as N × C × H × W u8, [c, h, w])`.
pub fn images_from_array(a: &NpyArray, path: &Path, key: &str) -> Result<(Vec<u8>, [usize; 3])> {
    let fmt = |m: String| Error::format(path, format!("`{key}`: {m}"));
    let shape = a.shape().to_vec();
    let (n, c, h, w, last) = match shape[..] {
        [n, h, w] => (n, 1, h, w, false),
        [n, a1, h, w] if matches!(a1, 1 | 3 | 4) && !matches!(w, 1 | 3 | 4) => (n, a1, h, w, false),
        [n, h, w, c] if matches!(c, 1 | 3 | 4) => (n, c, h, w, true),
        [n, c, h, w] => (n, c, h, w, false),
        _ => {
            return Err(fmt(format!(
                "images must be N x H x W, N x C x H x W or N x H x W x C, got shape {shape:?}"
            )));
        }
    };
    let per = c * h * w;
    if per == 0 {
        return Err(fmt(format!("empty image dimensions {shape:?}")));
    }
    let values: Vec<u8> = match a {
        NpyArray::U8(v) => v.iter().copied().collect(),
        NpyArray::F32(v) => float_pixels(v.iter().map(|&x| f64::from(x)), v.len()),
        NpyArray::F64(v) => float_pixels(v.iter().copied(), v.len()),
        other => {
            return Err(fmt(format!(
                "images must be uint8, float32 or float64, not {}",
                other.type_name()
            )));
        }
    };
    if !last {
        return Ok((values, [c, h, w]));
    }
    let mut out = vec![0u8; n * per];
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    out[i * per + (ch * h + y) * w + x] = values[i * per + (y * w + x) * c + ch];
                }
            }
        }
    }
    Ok((out, [c, h, w]))
}

fn float_pixels(v: impl Iterator<Item = f64> + Clone, len: usize) -> Vec<u8> {
    let max = v
        .clone()
        .fold(0f64, |m, x| if x.is_finite() { m.max(x) } else { m });
    let scale = if max <= 1.0 { 255.0 } else { 1.0 };
    let mut out = Vec::with_capacity(len);
    out.extend(v.map(|x| {
        if x.is_finite() {
            (x * scale).round().clamp(0.0, 255.0) as u8
        } else {
            0
        }
    }));
    out
}

/// Convert a label array to `u16` labels.
pub fn labels_from_array(a: &NpyArray, path: &Path, key: &str) -> Result<Vec<u16>> {
    let fmt = |m: String| Error::format(path, format!("`{key}`: {m}"));
    if a.shape().len() != 1 {
        return Err(fmt(format!(
            "labels must be 1-D, got shape {:?}",
            a.shape()
        )));
    }
    let vals: Vec<i128> = match a {
        NpyArray::U8(v) => v.iter().map(|&x| i128::from(x)).collect(),
        NpyArray::I64(v) => v.iter().map(|&x| i128::from(x)).collect(),
        NpyArray::U64(v) => v.iter().map(|&x| i128::from(x)).collect(),
        other => {
            return Err(fmt(format!(
                "labels must be integers, not {}",
                other.type_name()
            )));
        }
    };
    vals.iter()
        .enumerate()
        .map(|(i, &l)| {
            u16::try_from(l).map_err(|_| fmt(format!("label {l} of sample {i} is not in 0..65536")))
        })
        .collect()
}

/// Train and test sets from the arrays of an `.npz` archive; `path` labels the errors.
pub fn datasets_from_npz(
    arrays: &BTreeMap<String, NpyArray>,
    path: &Path,
) -> Result<(Dataset, Dataset)> {
    let pick = |names: [&'static str; 2]| names.into_iter().find(|k| arrays.contains_key(*k));
    let pairs: Vec<(&str, &str)> = if arrays.contains_key("x_train") {
        vec![("x_train", "y_train"), ("x_test", "y_test")]
    } else {
        let x = pick(["images", "x"]).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "no image array: expected keys x_train/y_train/x_test/y_test or images/labels (found {:?})",
                    arrays.keys().collect::<Vec<_>>()
                ),
            )
        })?;
        let y = if x == "images" { "labels" } else { "y" };
        vec![(x, y), (x, y)]
    };
    let mut parts = Vec::new();
    for (xk, yk) in &pairs {
        let get = |k: &str| {
            arrays
                .get(k)
                .ok_or_else(|| Error::format(path, format!("missing array `{k}`")))
        };
        let (px, chw) = images_from_array(get(xk)?, path, xk)?;
        let labels = labels_from_array(get(yk)?, path, yk)?;
        let n = px.len() / chw.iter().product::<usize>();
        if n != labels.len() {
            return Err(Error::format(
                path,
                format!("`{xk}` holds {n} images but `{yk}` {} labels", labels.len()),
            ));
        }
        parts.push((px, labels, chw));
    }
    let classes = parts
        .iter()
        .flat_map(|p| p.1.iter())
        .map(|&l| usize::from(l) + 1)
        .max()
        .unwrap_or(1);
    if parts[0].2 != parts[1].2 {
        return Err(Error::format(
            path,
            format!(
                "train images are {:?} but test images {:?}",
                parts[0].2, parts[1].2
            ),
        ));
    }
    let mut it = parts.into_iter();
    let (a, b) = (it.next(), it.next());
    match (a, b) {
        (Some((px, l, chw)), Some((px2, l2, _))) => Ok((
            Dataset::new(px, l, chw, classes)?,
            Dataset::new(px2, l2, chw, classes)?,
        )),
        _ => Err(Error::Internal("two splits expected".into())),
    }
}

/// Train and test sets from an `.npz` file.
pub fn load_npz_images(path: impl AsRef<Path>) -> Result<(Dataset, Dataset)> {
    let path = path.as_ref();
    let arrays = crate::io::npz::read_npz(path)?;
    datasets_from_npz(&arrays, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn arr_u8(shape: &[usize], f: impl Fn(usize) -> u8) -> NpyArray {
        let n = shape.iter().product();
        NpyArray::U8(ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(f).collect()).unwrap())
    }

    fn labels(v: &[i64]) -> NpyArray {
        NpyArray::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
    }

    #[test]
    fn nhwc_uint8_is_transposed_to_nchw() {
        let mut m = BTreeMap::new();
        // 2 images 2x2x3 NHWC, value = flat index
        m.insert("images".to_string(), arr_u8(&[2, 2, 2, 3], |i| i as u8));
        m.insert("labels".to_string(), labels(&[0, 4]));
        let (tr, te) = datasets_from_npz(&m, Path::new("a.npz")).unwrap();
        assert_eq!(tr.shape(), [3, 2, 2]);
        assert_eq!(tr.classes(), 5);
        // channel 1 plane of image 0: NHWC indices 1, 4, 7, 10
        assert_eq!(&tr.image(0).unwrap()[4..8], &[1, 4, 7, 10]);
        assert_eq!(te.len(), 2);
    }

    #[test]
    fn float_images_in_unit_range_are_scaled() {
        let x =
            NpyArray::F32(ArrayD::from_shape_vec(IxDyn(&[1, 1, 1, 2]), vec![0.0, 1.0]).unwrap());
        let (px, chw) = images_from_array(&x, Path::new("f.npz"), "x").unwrap();
        assert_eq!(px, vec![0, 255]);
        assert_eq!(chw, [1, 1, 2]);
    }

    #[test]
    fn bad_archives_are_errors_naming_the_file_and_key() {
        let p = Path::new("bad.npz");
        let m = BTreeMap::new();
        let e = datasets_from_npz(&m, p).unwrap_err().to_string();
        assert!(e.contains("bad.npz") && e.contains("no image array"), "{e}");
        let mut m = BTreeMap::new();
        m.insert("x".to_string(), arr_u8(&[2, 2, 2], |_| 0));
        m.insert("y".to_string(), labels(&[0]));
        let e = datasets_from_npz(&m, p).unwrap_err().to_string();
        assert!(e.contains("2 images") && e.contains("1 labels"), "{e}");
        m.insert("y".to_string(), labels(&[0, -1]));
        let e = datasets_from_npz(&m, p).unwrap_err().to_string();
        assert!(e.contains("label -1"), "{e}");
        m.insert("x".to_string(), arr_u8(&[2, 2], |_| 0));
        let e = datasets_from_npz(&m, p).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("shape"), "{e}");
        let mut m = BTreeMap::new();
        m.insert("x_train".to_string(), arr_u8(&[1, 2, 2], |_| 0));
        m.insert("y_train".to_string(), labels(&[0]));
        let e = datasets_from_npz(&m, p).unwrap_err().to_string();
        assert!(e.contains("missing array `x_test`"), "{e}");
    }
}
