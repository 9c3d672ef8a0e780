//! Class folders of images (the "ImageFolder" convention): `root/<class>/*.{png,jpg,jpeg}`.
//!
//! Classes are the sub-directories of `root` sorted by name (label = position in that order);
//! files are sorted by name within a class, so the dataset order does not depend on the file
//! system. Every image is decoded (in parallel with rayon; each image by one task, so the result is
//! independent of the thread count), converted to RGB (or grey for `channels == 1`), resized so its
//! shorter side is `size` (bilinear), and centre-cropped to `size × size`.
//!
//! Errors name the file: an undecodable or truncated image, an image larger than
//! [`MAX_IMAGE_SIDE`] (checked from the header before the pixels are decoded), an empty root.

use super::Dataset;
use crate::error::{Error, Result};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Largest width or height of an image accepted.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// A class-folder dataset as read: the images and the class names in label order.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// The images, `[channels, size, size]`.
    pub data: Dataset,
    /// Class names (sub-directory names), label order.
    pub classes: Vec<String>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v = Vec::new();
    for ent in rd {
        v.push(ent.map_err(|e| Error::io(dir, e))?.path());
    }
    v.sort();
    Ok(v)
}

/// Class names (label order) and the (file, label) list of an ImageFolder root.
pub type FolderScan = (Vec<String>, Vec<(PathBuf, u16)>);

/// The class names and the (file, label) list of an ImageFolder root, sorted.
pub fn scan_folder(root: impl AsRef<Path>) -> Result<FolderScan> {
    let root = root.as_ref();
    let mut classes = Vec::new();
    let mut files = Vec::new();
    for d in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
        let label = classes.len();
        if label > usize::from(u16::MAX) {
            return Err(Error::format(root, "more than 65536 class folders"));
        }
        classes.push(
            d.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
        for f in sorted_entries(&d)?.into_iter().filter(|p| is_image(p)) {
            files.push((f, label as u16));
        }
    }
    if classes.is_empty() {
        return Err(Error::format(
            root,
            "no class folders (expected root/<class>/*.png|jpg|jpeg)",
        ));
    }
    if files.is_empty() {
        return Err(Error::format(
            root,
            "the class folders hold no .png/.jpg/.jpeg files",
        ));
    }
    Ok((classes, files))
}

/// Decode one encoded image (PNG or JPEG bytes) to `channels × size × size` u8 pixels: shorter
/// side resized to `size`, centre crop. `path` only labels the errors.
pub fn decode_image(
    bytes: &[u8],
    channels: usize,
    size: usize,
    path: impl AsRef<Path>,
) -> Result<Vec<u8>> {
    let path = path.as_ref();
    if size == 0 || size > MAX_IMAGE_SIDE as usize || !(channels == 1 || channels == 3) {
        return Err(Error::Config(format!(
            "image size must be in 1..={MAX_IMAGE_SIDE} and channels 1 or 3 (got {size}, {channels})"
        )));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::format(path, format!("cannot read the image header: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| Error::format(path, format!("cannot decode the image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::format(path, "image has zero width or height"));
    }
    let img = if w.min(h) != size {
        // shorter side to `size`, the other scaled in proportion (at least `size`)
        let (nw, nh) = if w <= h {
            (size, (h * size).div_ceil(w).max(size))
        } else {
            ((w * size).div_ceil(h).max(size), size)
        };
        img.resize_exact(nw as u32, nh as u32, FilterType::Triangle)
    } else {
        img
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (x0, y0) = ((w - size) / 2, (h - size) / 2);
    let mut out = vec![0u8; channels * size * size];
    if channels == 3 {
        let rgb = img.to_rgb8();
        for y in 0..size {
            for x in 0..size {
                let p = rgb.get_pixel((x0 + x) as u32, (y0 + y) as u32).0;
                for c in 0..3 {
                    out[(c * size + y) * size + x] = p[c];
                }
            }
        }
    } else {
        let g = img.to_luma8();
        for y in 0..size {
            for x in 0..size {
                out[y * size + x] = g.get_pixel((x0 + x) as u32, (y0 + y) as u32).0[0];
            }
        }
    }
    Ok(out)
}

/// Read an ImageFolder root into a dataset of `channels × size × size` images.
pub fn load_folder(root: impl AsRef<Path>, channels: usize, size: usize) -> Result<ImageFolder> {
    let (classes, files) = scan_folder(root)?;
    let per = channels * size * size;
    let decoded: Vec<Result<Vec<u8>>> = files
        .par_iter()
        .map(|(p, _)| {
            let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            decode_image(&bytes, channels, size, p)
        })
        .collect();
    let mut px = Vec::with_capacity(files.len() * per);
    for d in decoded {
        px.extend_from_slice(&d?);
    }
    let labels = files.iter().map(|f| f.1).collect();
    let data = Dataset::new(px, labels, [channels, size, size], classes.len())?;
    Ok(ImageFolder { data, classes })
}

/// Train and test splits of a root holding `train/` and `test/` (or `val/`) ImageFolders, or a
/// single ImageFolder used for both when there is no such split.
pub fn load_folder_splits(
    root: impl AsRef<Path>,
    channels: usize,
    size: usize,
) -> Result<(ImageFolder, ImageFolder)> {
    let root = root.as_ref();
    let train = root.join("train");
    let test = ["test", "val"]
        .iter()
        .map(|s| root.join(s))
        .find(|p| p.is_dir());
    match (train.is_dir(), test) {
        (true, Some(test)) => {
            let tr = load_folder(&train, channels, size)?;
            let te = load_folder(&test, channels, size)?;
            if tr.classes != te.classes {
                return Err(Error::format(
                    &test,
                    format!(
                        "class folders differ from those of {} ({} vs {} classes)",
                        train.display(),
                        te.classes.len(),
                        tr.classes.len()
                    ),
                ));
            }
            Ok((tr, te))
        }
        _ => {
            let all = load_folder(root, channels, size)?;
            Ok((all.clone(), all))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Write a `w × h` RGB PNG whose pixel (x, y) is (x, y, v).
    pub(crate) fn write_png(path: &Path, w: u32, h: u32, v: u8) {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, v]));
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("empf-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn classes_are_sorted_folders_and_pixels_are_planar() {
        let d = tmp("sorted");
        for (c, v) in [("zebra", 9u8), ("ant", 1)] {
            std::fs::create_dir_all(d.join(c)).unwrap();
            write_png(&d.join(c).join("b.png"), 4, 4, v);
            write_png(&d.join(c).join("a.PNG"), 4, 4, v + 1);
        }
        std::fs::write(d.join("ant").join("notes.txt"), "x").unwrap();
        let f = load_folder(&d, 3, 4).unwrap();
        assert_eq!(f.classes, vec!["ant", "zebra"]);
        assert_eq!(f.data.labels(), &[0, 0, 1, 1]);
        let img = f.data.image(0).unwrap();
        // a.PNG of ant: R plane = x, G plane = y, B plane = 2
        assert_eq!(img[1], 1);
        assert_eq!(img[16 + 4], 1);
        assert_eq!(img[32], 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn shorter_side_is_resized_then_centre_cropped() {
        let d = tmp("resize");
        std::fs::create_dir_all(d.join("c")).unwrap();
        write_png(&d.join("c").join("x.png"), 16, 8, 0);
        let f = load_folder(&d, 3, 4).unwrap();
        assert_eq!(f.data.shape(), [3, 4, 4]);
        let g = load_folder(&d, 1, 2).unwrap();
        assert_eq!(g.data.shape(), [1, 2, 2]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_image_is_an_error_naming_the_file() {
        let d = tmp("corrupt");
        std::fs::create_dir_all(d.join("c")).unwrap();
        write_png(&d.join("c").join("ok.png"), 4, 4, 0);
        let good = std::fs::read(d.join("c").join("ok.png")).unwrap();
        std::fs::write(d.join("c").join("bad.png"), &good[..good.len() / 2]).unwrap();
        let e = load_folder(&d, 3, 4).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
        std::fs::write(d.join("c").join("bad.png"), b"not an image").unwrap();
        let e = load_folder(&d, 3, 4).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn empty_root_is_an_error_naming_it() {
        let d = tmp("empty");
        let e = load_folder(&d, 3, 4).unwrap_err().to_string();
        assert!(e.contains("no class folders"), "{e}");
        std::fs::create_dir_all(d.join("c")).unwrap();
        let e = load_folder(&d, 3, 4).unwrap_err().to_string();
        assert!(e.contains("hold no"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
