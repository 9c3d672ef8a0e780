//! Event-camera (DVS) recordings: readers and binning into T frames.
//!
//! Formats:
//! * **N-MNIST** binary (`.bin`, Orchard et al. 2015): 5-byte (40-bit) records, big-endian bit
//!   fields: `x` (8 bits), `y` (8 bits), polarity (1 bit), timestamp in µs (23 bits). Sensor 34 × 34.
//! * **AEDAT 2.0** (the format of CIFAR10-DVS): a header of text lines each starting with `#`
//!   (the first is `#!AER-DAT2.0`), then 8-byte records, each a big-endian `u32` address and a
//!   big-endian `u32` timestamp (µs). DVS128 address layout: polarity = bit 0, `x` = bits 1..=7,
//!   `y` = bits 8..=14; addresses with bit 15 set (external / special events) are skipped.
//!   Sensor 128 × 128.
//! * **AEDAT 3.1**: `#` header lines up to `#!END-HEADER`, then packets, each a 28-byte
//!   little-endian header (type i16, source i16, size i32, timestamp offset i32, timestamp
//!   overflow i32, capacity i32, number i32, valid i32) and `number × size` bytes of events.
//!   Polarity packets (type 1, 8-byte events: u32 with valid = bit 0, polarity = bit 1,
//!   `y` = bits 2..=16, `x` = bits 17..=31, then the i32 timestamp) are read, invalid events and
//!   other packet types skipped. The sensor is taken as 128 × 128, or larger when a coordinate
//!   needs it. [`parse_aedat`] dispatches on the version line.
//!
//! Binning ([`bin_events`]): the events of one recording become `T` frames of 2 polarity channels,
//! either **by count** (frame `k` gets events `⌊kN/T⌋ .. ⌊(k+1)N/T⌋`) or **by time** (frame
//! `k` gets the events with `t − t₀ ∈ [k·D/T, (k+1)·D/T)`, `D = t_last − t₀ + 1`), optionally
//! downsampled to `h × w` (`x' = ⌊x·w / W⌋`). A frame pixel counts its events, saturating at 255.
//!
//! Errors name the file: a truncated record, a coordinate outside the sensor, a bad header.

use crate::data::augment::{AugmentConfig, hflip, sample_rng};
use crate::data::loader::{Batch, BatchInput};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::train::trainer::BatchSource;
use ndarray::IxDyn;
use std::path::{Path, PathBuf};

/// Largest event file accepted (256 MiB; a CIFAR10-DVS recording is ~1-4 MB).
pub const MAX_EVENT_BYTES: u64 = 1 << 28;

/// One DVS event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Column.
    pub x: u16,
    /// Row.
    pub y: u16,
    /// Polarity (0 = OFF, 1 = ON).
    pub p: u8,
    /// Timestamp (µs).
    pub t: u64,
}

/// A recording: the sensor size and its events in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    /// Sensor height.
    pub height: usize,
    /// Sensor width.
    pub width: usize,
    /// The events.
    pub events: Vec<Event>,
}

/// How events are split into frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramesBy {
    /// Equal event counts per frame.
    Count,
    /// Equal time spans per frame.
    Time,
}

impl FramesBy {
    /// `count` or `time`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "count" | "number" => Ok(FramesBy::Count),
            "time" => Ok(FramesBy::Time),
            _ => Err(Error::Config(format!(
                "--frames-by `{s}`: expected count or time"
            ))),
        }
    }
}

/// Parse an N-MNIST `.bin` recording (34 × 34). `path` only labels the errors.
pub fn parse_nmnist(bytes: &[u8], path: impl AsRef<Path>) -> Result<Recording> {
    let path = path.as_ref();
    if bytes.len() % 5 != 0 {
        return Err(Error::format(
            path,
            format!(
                "truncated N-MNIST file: {} bytes is not a multiple of the 5-byte event record",
                bytes.len()
            ),
        ));
    }
    let mut events = Vec::with_capacity(bytes.len() / 5);
    for (i, r) in bytes.chunks_exact(5).enumerate() {
        let (x, y) = (u16::from(r[0]), u16::from(r[1]));
        if x >= 34 || y >= 34 {
            return Err(Error::format(
                path,
                format!(
                    "event {i} (byte offset {}): ({x}, {y}) is outside the 34 x 34 sensor",
                    i * 5
                ),
            ));
        }
        events.push(Event {
            x,
            y,
            p: r[2] >> 7,
            t: (u64::from(r[2] & 0x7F) << 16) | (u64::from(r[3]) << 8) | u64::from(r[4]),
        });
    }
    Ok(Recording {
        height: 34,
        width: 34,
        events,
    })
}

/// Parse an AEDAT 2.0 recording from a DVS128 (128 × 128). `path` only labels the errors.
pub fn parse_aedat2(bytes: &[u8], path: impl AsRef<Path>) -> Result<Recording> {
    let path = path.as_ref();
    if !bytes.starts_with(b"#!AER-DAT") {
        return Err(Error::format(
            path,
            "bad header: an AEDAT file starts with `#!AER-DAT` (expected version 2.0)",
        ));
    }
    let mut off = 0;
    let mut version_ok = false;
    while off < bytes.len() && bytes[off] == b'#' {
        let end = bytes[off..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| off + p + 1)
            .ok_or_else(|| Error::format(path, "bad header: a `#` line is not terminated"))?;
        if off == 0 {
            let line = String::from_utf8_lossy(&bytes[..end]);
            version_ok = line.trim_end().ends_with("2.0");
            if !version_ok {
                return Err(Error::format(
                    path,
                    format!(
                        "unsupported AEDAT version `{}` (only 2.0 is read)",
                        line.trim_end().trim_start_matches("#!AER-DAT")
                    ),
                ));
            }
        }
        off = end;
    }
    debug_assert!(version_ok);
    let body = &bytes[off..];
    if body.len() % 8 != 0 {
        return Err(Error::format(
            path,
            format!(
                "truncated AEDAT data: {} bytes after the header is not a multiple of the 8-byte event",
                body.len()
            ),
        ));
    }
    let mut events = Vec::with_capacity(body.len() / 8);
    for r in body.chunks_exact(8) {
        let a = u32::from_be_bytes([r[0], r[1], r[2], r[3]]);
        let t = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
        if a & 0x8000 != 0 {
            continue;
        }
        events.push(Event {
            x: ((a >> 1) & 0x7F) as u16,
            y: ((a >> 8) & 0x7F) as u16,
            p: (a & 1) as u8,
            t: u64::from(t),
        });
    }
    Ok(Recording {
        height: 128,
        width: 128,
        events,
    })
}

/// Parse an AEDAT file of version 2.0 or 3.1 (by its first line).
pub fn parse_aedat(bytes: &[u8], path: impl AsRef<Path>) -> Result<Recording> {
    if bytes.starts_with(b"#!AER-DAT3") {
        parse_aedat3(bytes, path)
    } else {
        parse_aedat2(bytes, path)
    }
}

/// Parse an AEDAT 3.1 recording (polarity events). `path` only labels the errors.
pub fn parse_aedat3(bytes: &[u8], path: impl AsRef<Path>) -> Result<Recording> {
    let path = path.as_ref();
    if !bytes.starts_with(b"#!AER-DAT3.1") {
        return Err(Error::format(
            path,
            "bad header: an AEDAT 3.1 file starts with `#!AER-DAT3.1`",
        ));
    }
    let end = b"#!END-HEADER";
    let mut off = 0;
    loop {
        if off >= bytes.len() || bytes[off] != b'#' {
            return Err(Error::format(path, "bad header: no `#!END-HEADER` line"));
        }
        let nl = bytes[off..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| off + p + 1)
            .ok_or_else(|| Error::format(path, "bad header: a `#` line is not terminated"))?;
        let done = bytes[off..].starts_with(end);
        off = nl;
        if done {
            break;
        }
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut events = Vec::new();
    let (mut maxx, mut maxy) = (127u16, 127u16);
    while off < bytes.len() {
        let h = bytes.get(off..off + 28).ok_or_else(|| {
            Error::format(
                path,
                format!("truncated packet header at byte offset {off}"),
            )
        })?;
        let ty = u16::from_le_bytes([h[0], h[1]]);
        let size = le32(&h[4..8]) as usize;
        let overflow = u64::from(le32(&h[12..16]));
        let number = le32(&h[20..24]) as usize;
        let len = size
            .checked_mul(number)
            .filter(|&l| l <= bytes.len() - off - 28);
        let Some(len) = len else {
            return Err(Error::format(
                path,
                format!(
                    "packet at byte offset {off}: {number} events of {size} bytes run past the end of the file"
                ),
            ));
        };
        let body = &bytes[off + 28..off + 28 + len];
        if ty == 1 {
            if size < 8 {
                return Err(Error::format(
                    path,
                    format!("polarity packet at byte offset {off}: event size {size} < 8"),
                ));
            }
            for e in body.chunks_exact(size) {
                let d = le32(&e[0..4]);
                if d & 1 == 0 {
                    continue;
                }
                let (x, y) = (((d >> 17) & 0x7FFF) as u16, ((d >> 2) & 0x7FFF) as u16);
                maxx = maxx.max(x);
                maxy = maxy.max(y);
                events.push(Event {
                    x,
                    y,
                    p: ((d >> 1) & 1) as u8,
                    t: (overflow << 31) | u64::from(le32(&e[4..8]) & 0x7FFF_FFFF),
                });
            }
        }
        off += 28 + len;
    }
    Ok(Recording {
        height: usize::from(maxy) + 1,
        width: usize::from(maxx) + 1,
        events,
    })
}

/// Bin a recording into `t` frames of `2 × h × w` event counts (u8, saturating), frame-major:
/// `out[((k·2 + p)·h + y)·w + x]`.
pub fn bin_events(rec: &Recording, t: usize, by: FramesBy, h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; t * 2 * h * w];
    let n = rec.events.len();
    if n == 0 || t == 0 {
        return out;
    }
    let t0 = rec.events.iter().map(|e| e.t).min().unwrap_or(0);
    let t1 = rec.events.iter().map(|e| e.t).max().unwrap_or(0);
    let span = u128::from(t1 - t0) + 1;
    for (i, e) in rec.events.iter().enumerate() {
        let k = match by {
            FramesBy::Count => i * t / n,
            FramesBy::Time => (u128::from(e.t - t0) * t as u128 / span) as usize,
        }
        .min(t - 1);
        let x = usize::from(e.x) * w / rec.width.max(1);
        let y = usize::from(e.y) * h / rec.height.max(1);
        if x < w && y < h {
            let c = &mut out[((k * 2 + usize::from(e.p.min(1))) * h + y) * w + x];
            *c = c.saturating_add(1);
        }
    }
    out
}

/// Event samples binned into frames, with labels and augmentation.
#[derive(Clone, Debug)]
pub struct EventSet {
    /// Frames of all samples: `n × t × 2 × h × w` counts.
    frames: Vec<u8>,
    /// Labels.
    labels: Vec<u16>,
    /// Frames per sample.
    t: usize,
    /// Frame size.
    hw: [usize; 2],
    /// Classes.
    classes: usize,
    /// Augmentation (flip, roll).
    pub aug: AugmentConfig,
    /// The run's seed.
    pub seed: u64,
}

impl EventSet {
    /// Binned samples (each `t × 2 × h × w` counts) and their labels.
    pub fn new(
        frames: Vec<u8>,
        labels: Vec<u16>,
        t: usize,
        hw: [usize; 2],
        classes: usize,
    ) -> Result<Self> {
        let per = t * 2 * hw[0] * hw[1];
        if per == 0 || labels.len().checked_mul(per) != Some(frames.len()) {
            return Err(Error::shape(
                "EventSet",
                "frames must be n x t x 2 x h x w",
                &[frames.len(), labels.len(), per],
            ));
        }
        if let Some(l) = labels.iter().find(|&&l| usize::from(l) >= classes) {
            return Err(Error::Config(format!(
                "EventSet: label {l} out of range for {classes} classes"
            )));
        }
        Ok(EventSet {
            frames,
            labels,
            t,
            hw,
            classes,
            aug: AugmentConfig::default(),
            seed: 0,
        })
    }

    /// `[2, h, w]` of one frame.
    pub fn shape(&self) -> [usize; 3] {
        [2, self.hw[0], self.hw[1]]
    }

    /// Frames per sample.
    pub fn steps(&self) -> usize {
        self.t
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Labels.
    pub fn labels(&self) -> &[u16] {
        &self.labels
    }

    /// The samples at `idx` (in that order), keeping the augmentation settings.
    pub fn select(&self, idx: &[usize]) -> Result<EventSet> {
        let per = self.t * 2 * self.hw[0] * self.hw[1];
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.labels.len()) {
            return Err(Error::shape(
                "EventSet::select",
                "index out of range",
                &[bad],
            ));
        }
        let mut frames = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            frames.extend_from_slice(&self.frames[i * per..(i + 1) * per]);
        }
        let mut s = EventSet::new(
            frames,
            idx.iter().map(|&i| self.labels[i]).collect(),
            self.t,
            self.hw,
            self.classes,
        )?;
        s.aug = self.aug.clone();
        s.seed = self.seed;
        Ok(s)
    }

    /// The first `n` samples.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.labels.len());
        let per = self.t * 2 * self.hw[0] * self.hw[1];
        self.labels.truncate(n);
        self.frames.truncate(n * per);
    }

    /// Frames `idx` as `t` tensors `N × 2 × h × w`; with `aug = Some(epoch)` flip / roll applied
    /// per sample (the same shift on all its frames), seeded by (seed, epoch, index).
    pub fn frames(&self, idx: &[usize], aug: Option<usize>) -> Result<Vec<Tensor<f32>>> {
        let [h, w] = self.hw;
        let fsz = 2 * h * w;
        let per = self.t * fsz;
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.labels.len()) {
            return Err(Error::shape(
                "EventSet::frames",
                format!("index {bad} out of range for {} samples", self.labels.len()),
                &[bad],
            ));
        }
        let mut out: Vec<Vec<f32>> = vec![vec![0f32; idx.len() * fsz]; self.t];
        for (n, &i) in idx.iter().enumerate() {
            let (mut flip, mut dx, mut dy) = (false, 0isize, 0isize);
            if let Some(e) = aug {
                let mut rng = sample_rng(self.seed, e, i);
                if self.aug.flip {
                    flip = rng.below(2) == 1;
                }
                if let Some(r) = self.aug.roll {
                    dx = rng.below(2 * r + 1) as isize - r as isize;
                    dy = rng.below(2 * r + 1) as isize - r as isize;
                }
            }
            for (k, frame) in out.iter_mut().enumerate() {
                let src = &self.frames[i * per + k * fsz..i * per + (k + 1) * fsz];
                let dst = &mut frame[n * fsz..(n + 1) * fsz];
                for c in 0..2 {
                    for y in 0..h {
                        let sy = (y as isize - dy).rem_euclid(h as isize) as usize;
                        for x in 0..w {
                            let sx = (x as isize - dx).rem_euclid(w as isize) as usize;
                            dst[(c * h + y) * w + x] = f32::from(src[(c * h + sy) * w + sx]);
                        }
                    }
                }
                if flip {
                    hflip(dst, [2, h, w]);
                }
            }
        }
        out.into_iter()
            .map(|v| {
                Tensor::from_shape_vec(IxDyn(&[idx.len(), 2, h, w]), v)
                    .map_err(|e| Error::Internal(format!("event frames: {e}")))
            })
            .collect()
    }

    fn labels_of(&self, idx: &[usize]) -> Vec<usize> {
        idx.iter().map(|&i| usize::from(self.labels[i])).collect()
    }
}

impl BatchSource for EventSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    /// The mean of the frames (a static summary; training and evaluation use the frames).
    fn batch(&self, idx: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)> {
        let f = self.frames(idx, None)?;
        let mut sum = f[0].clone();
        for x in &f[1..] {
            sum += x;
        }
        let k = 1.0 / self.t as f32;
        Ok((sum.mapv(|v| v * k), self.labels_of(idx)))
    }
    fn train_batch(&self, idx: &[usize], epoch: usize, _bi: usize) -> Result<Batch> {
        Ok(Batch {
            x: BatchInput::Frames(self.frames(idx, Some(epoch))?),
            labels: self.labels_of(idx),
            soft: None,
        })
    }
    fn eval_batch(&self, idx: &[usize]) -> Result<Batch> {
        Ok(Batch {
            x: BatchInput::Frames(self.frames(idx, None)?),
            labels: self.labels_of(idx),
            soft: None,
        })
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_EVENT_BYTES {
        return Err(Error::format(
            path,
            format!(
                "file is {} bytes, more than the {MAX_EVENT_BYTES} accepted for one recording",
                meta.len()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Read one recording, the format chosen by the extension (`.bin` N-MNIST, `.aedat` AEDAT 2.0).
pub fn read_recording(path: impl AsRef<Path>) -> Result<Recording> {
    let path = path.as_ref();
    let bytes = read_limited(path)?;
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("aedat") => parse_aedat(&bytes, path),
        _ => parse_nmnist(&bytes, path),
    }
}

/// Class folders of recordings (`root/<class>/*.bin|*.aedat`, classes sorted, as N-MNIST's
/// `Train/0..9` and CIFAR10-DVS's class folders are laid out), binned into `t` frames of `h × w`.
pub fn load_event_folder(
    root: impl AsRef<Path>,
    t: usize,
    by: FramesBy,
    hw: [usize; 2],
) -> Result<EventSet> {
    use rayon::prelude::*;
    let root = root.as_ref();
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(Error::format(
            root,
            "no class folders (expected root/<class>/*.bin or *.aedat)",
        ));
    }
    let mut files = Vec::new();
    for (label, d) in classes.iter().enumerate() {
        let mut fs: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("bin" | "aedat")
                )
            })
            .collect();
        fs.sort();
        files.extend(fs.into_iter().map(|f| (f, label as u16)));
    }
    if files.is_empty() {
        return Err(Error::format(
            root,
            "the class folders hold no .bin / .aedat recordings",
        ));
    }
    let binned: Vec<Result<Vec<u8>>> = files
        .par_iter()
        .map(|(f, _)| Ok(bin_events(&read_recording(f)?, t, by, hw[0], hw[1])))
        .collect();
    let mut frames = Vec::with_capacity(files.len() * t * 2 * hw[0] * hw[1]);
    for b in binned {
        frames.extend_from_slice(&b?);
    }
    EventSet::new(
        frames,
        files.iter().map(|f| f.1).collect(),
        t,
        hw,
        classes.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nmnist_bytes(ev: &[(u8, u8, u8, u32)]) -> Vec<u8> {
        ev.iter()
            .flat_map(|&(x, y, p, t)| {
                [
                    x,
                    y,
                    (p << 7) | ((t >> 16) as u8 & 0x7F),
                    (t >> 8) as u8,
                    t as u8,
                ]
            })
            .collect()
    }

    #[test]
    fn nmnist_fields_decode() {
        let b = nmnist_bytes(&[(3, 4, 1, 0x12_3456), (33, 0, 0, 7)]);
        let r = parse_nmnist(&b, "a.bin").unwrap();
        assert_eq!(
            r.events[0],
            Event {
                x: 3,
                y: 4,
                p: 1,
                t: 0x12_3456
            }
        );
        assert_eq!(
            r.events[1],
            Event {
                x: 33,
                y: 0,
                p: 0,
                t: 7
            }
        );
    }

    #[test]
    fn nmnist_bad_files_are_errors_naming_the_file() {
        let b = nmnist_bytes(&[(3, 4, 1, 5)]);
        let e = parse_nmnist(&b[..4], "t.bin").unwrap_err().to_string();
        assert!(e.contains("t.bin") && e.contains("truncated"), "{e}");
        let b = nmnist_bytes(&[(34, 4, 1, 5)]);
        let e = parse_nmnist(&b, "o.bin").unwrap_err().to_string();
        assert!(e.contains("o.bin") && e.contains("outside"), "{e}");
    }

    #[test]
    fn nmnist_sample_recording_reads_and_bins() {
        let p = Path::new("../shared/data/events/nmnist-sample.bin");
        if !p.exists() {
            eprintln!("skipping: {} not found", p.display());
            return;
        }
        let r = read_recording(p).unwrap();
        assert_eq!(r.events.len(), 4325);
        assert!(r.events.iter().all(|e| e.x < 34 && e.y < 34));
        assert!(r.events.windows(2).all(|w| w[0].t <= w[1].t));
        for by in [FramesBy::Count, FramesBy::Time] {
            let f = bin_events(&r, 10, by, 34, 34);
            let total: usize = f.iter().map(|&c| usize::from(c)).sum();
            assert_eq!(total, 4325, "{by:?}: every event lands in one frame");
        }
        let f = bin_events(&r, 10, FramesBy::Count, 34, 34);
        let per_frame: Vec<usize> = f
            .chunks(2 * 34 * 34)
            .map(|c| c.iter().map(|&v| usize::from(v)).sum())
            .collect();
        assert!(
            per_frame.iter().all(|&n| n == 432 || n == 433),
            "{per_frame:?}"
        );
        let small = bin_events(&r, 4, FramesBy::Time, 17, 17);
        assert_eq!(small.len(), 4 * 2 * 17 * 17);
        assert_eq!(small.iter().map(|&c| usize::from(c)).sum::<usize>(), 4325);
    }

    #[test]
    fn binning_by_time_splits_the_span_evenly() {
        let r = Recording {
            height: 2,
            width: 2,
            events: (0..4)
                .map(|i| Event {
                    x: 1,
                    y: 0,
                    p: (i % 2) as u8,
                    t: 100 + 10 * i,
                })
                .collect(),
        };
        let f = bin_events(&r, 2, FramesBy::Time, 2, 2);
        // span 31 µs: t − t0 ∈ {0, 10} → frame 0, {20, 30} → frame 1
        assert_eq!(f[1], 1); // frame 0, OFF, (0, 1)
        assert_eq!(f[4 + 1], 1); // frame 0, ON
        assert_eq!(f[8 + 1], 1);
        assert_eq!(f[12 + 1], 1);
    }

    fn aedat(records: &[(u32, u32)], header: &str) -> Vec<u8> {
        let mut b = header.as_bytes().to_vec();
        for &(a, t) in records {
            b.extend_from_slice(&a.to_be_bytes());
            b.extend_from_slice(&t.to_be_bytes());
        }
        b
    }

    #[test]
    fn aedat2_decodes_dvs128_addresses_and_skips_special_events() {
        let a = (5u32 << 8) | (9 << 1) | 1;
        let b = aedat(
            &[(a, 10), (0x8000, 11), (6 << 1, 12)],
            "#!AER-DAT2.0\r\n# comment\r\n",
        );
        let r = parse_aedat2(&b, "c.aedat").unwrap();
        assert_eq!(
            r.events,
            vec![
                Event {
                    x: 9,
                    y: 5,
                    p: 1,
                    t: 10
                },
                Event {
                    x: 6,
                    y: 0,
                    p: 0,
                    t: 12
                }
            ]
        );
        assert_eq!((r.height, r.width), (128, 128));
    }

    #[test]
    fn aedat_bad_files_are_errors_naming_the_file() {
        let e = parse_aedat2(b"hello", "x.aedat").unwrap_err().to_string();
        assert!(e.contains("x.aedat") && e.contains("header"), "{e}");
        let e = parse_aedat2(b"#!AER-DAT3.1\r\n", "v.aedat")
            .unwrap_err()
            .to_string();
        assert!(e.contains("v.aedat") && e.contains("version"), "{e}");
        let mut b = aedat(&[(1, 1)], "#!AER-DAT2.0\n");
        b.pop();
        let e = parse_aedat2(&b, "t.aedat").unwrap_err().to_string();
        assert!(e.contains("t.aedat") && e.contains("truncated"), "{e}");
        let e = parse_aedat2(b"#!AER-DAT2.0", "u.aedat")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not terminated"), "{e}");
    }

    /// (packet type, timestamp overflow, events as (data word, timestamp)).
    type Packet = (u16, u32, Vec<(u32, u32)>);

    fn aedat3(packets: &[Packet]) -> Vec<u8> {
        let mut b = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#!END-HEADER\r\n".to_vec();
        for (ty, ovf, evs) in packets {
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&8u32.to_le_bytes());
            b.extend_from_slice(&4u32.to_le_bytes());
            b.extend_from_slice(&ovf.to_le_bytes());
            b.extend_from_slice(&(evs.len() as u32).to_le_bytes());
            b.extend_from_slice(&(evs.len() as u32).to_le_bytes());
            b.extend_from_slice(&(evs.len() as u32).to_le_bytes());
            for (d, t) in evs {
                b.extend_from_slice(&d.to_le_bytes());
                b.extend_from_slice(&t.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn aedat3_reads_valid_polarity_events_and_skips_other_packets() {
        let ev = |x: u32, y: u32, p: u32, valid: u32| (x << 17) | (y << 2) | (p << 1) | valid;
        let b = aedat3(&[
            (1, 0, vec![(ev(5, 7, 1, 1), 100), (ev(6, 7, 0, 0), 101)]),
            (2, 0, vec![(0, 0)]),
            (1, 1, vec![(ev(200, 3, 0, 1), 5)]),
        ]);
        let r = parse_aedat(&b, "d.aedat").unwrap();
        assert_eq!(
            r.events,
            vec![
                Event {
                    x: 5,
                    y: 7,
                    p: 1,
                    t: 100
                },
                Event {
                    x: 200,
                    y: 3,
                    p: 0,
                    t: (1 << 31) | 5
                }
            ]
        );
        assert_eq!((r.height, r.width), (128, 201));
        let e = parse_aedat(&b[..b.len() - 3], "t.aedat")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.aedat") && e.contains("past the end"), "{e}");
        let e = parse_aedat(b"#!AER-DAT3.1\r\n", "h.aedat")
            .unwrap_err()
            .to_string();
        assert!(e.contains("END-HEADER"), "{e}");
    }

    #[test]
    fn event_folder_loads_and_augments_deterministically() {
        let d = std::env::temp_dir().join(format!("empf-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for c in ["0", "1"] {
            std::fs::create_dir_all(d.join(c)).unwrap();
            let ev: Vec<_> = (0..50u32)
                .map(|i| ((i % 34) as u8, (i * 3 % 34) as u8, (i % 2) as u8, i * 100))
                .collect();
            std::fs::write(d.join(c).join("a.bin"), nmnist_bytes(&ev)).unwrap();
        }
        let mut s = load_event_folder(&d, 5, FramesBy::Count, [17, 17]).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.labels(), &[0, 1]);
        let b = s.eval_batch(&[1, 0]).unwrap();
        let BatchInput::Frames(f) = b.x else { panic!() };
        assert_eq!(f.len(), 5);
        assert_eq!(f[0].shape(), &[2, 2, 17, 17]);
        let total: f32 = f.iter().map(|x| x.sum()).sum();
        assert_eq!(total, 100.0);
        s.aug = AugmentConfig::parse("flip,roll:3").unwrap();
        s.seed = 4;
        let BatchInput::Frames(a1) = s.train_batch(&[0], 2, 0).unwrap().x else {
            panic!()
        };
        let BatchInput::Frames(a2) = s.train_batch(&[0], 2, 0).unwrap().x else {
            panic!()
        };
        assert_eq!(a1, a2);
        assert_eq!(
            a1.iter().map(|x| x.sum()).sum::<f32>(),
            50.0,
            "flip and roll keep every event"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
