//! NumPy `.npy` arrays and `.npz` archives (a zip of `<name>.npy` entries), written and read
//! without a zip crate.
//!
//! Writing: zip entries are *stored* (no compression: binary weights and f32 state compress
//! poorly and `numpy.load` reads stored entries directly), with a fixed 1980-01-01 timestamp so the
//! same contents always give the same bytes; each `.npy` is format 1.0, little-endian, C order,
//! its header padded to 64 bytes as NumPy does.
//!
//! Reading accepts what `np.savez` and `np.savez_compressed` write: stored or deflated entries,
//! zip64 extra fields and end records, `.npy` versions 1.0 to 3.0, either byte order, C or
//! Fortran order, and the dtypes `f4 f8 i1 i2 i4 i8 u1 u2 u4 u8 b1` plus 0-d `U` / `S` strings.
//! Every size is validated before it is used: the end-of-central-directory record, each
//! central-directory entry and local header must lie inside the file, declared sizes must agree
//! with the `.npy` header's shape × item size, the CRC-32 of every entry is checked, and memory
//! for a deflated entry grows with the bytes actually inflated. Errors are [`Error::Format`]
//! naming the file and the entry.

use crate::error::{Error, Result};
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// Largest uncompressed entry accepted when reading (16 GiB).
pub const MAX_ENTRY_BYTES: u64 = 1 << 34;

/// One array of an `.npz` archive.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyArray {
    /// `<f4`.
    F32(ArrayD<f32>),
    /// `<f8`.
    F64(ArrayD<f64>),
    /// `<i8` (read also from `i1`, `i2`, `i4`).
    I64(ArrayD<i64>),
    /// `<u8` (read also from `u2`, `u4`).
    U64(ArrayD<u64>),
    /// `|u1`.
    U8(ArrayD<u8>),
    /// `|b1`.
    Bool(ArrayD<bool>),
    /// A 0-d string: written as `<U{n}` (UTF-32, what NumPy makes of a Python `str`); read from
    /// `<U{n}` or `|S{n}` (UTF-8 bytes). Trailing NULs are stripped, as NumPy does.
    Str(String),
}

impl NpyArray {
    /// The NumPy dtype this array is written with (e.g. `"<f4"`).
    pub fn descr(&self) -> String {
        match self {
            NpyArray::F32(_) => "<f4".into(),
            NpyArray::F64(_) => "<f8".into(),
            NpyArray::I64(_) => "<i8".into(),
            NpyArray::U64(_) => "<u8".into(),
            NpyArray::U8(_) => "|u1".into(),
            NpyArray::Bool(_) => "|b1".into(),
            NpyArray::Str(s) => format!("<U{}", s.chars().count().max(1)),
        }
    }

    /// Short type name for messages: `f32`, `f64`, `i64`, `u64`, `u8`, `bool`, `str`.
    pub fn type_name(&self) -> &'static str {
        match self {
            NpyArray::F32(_) => "f32",
            NpyArray::F64(_) => "f64",
            NpyArray::I64(_) => "i64",
            NpyArray::U64(_) => "u64",
            NpyArray::U8(_) => "u8",
            NpyArray::Bool(_) => "bool",
            NpyArray::Str(_) => "str",
        }
    }

    /// The shape (`[]` for a string).
    pub fn shape(&self) -> &[usize] {
        match self {
            NpyArray::F32(a) => a.shape(),
            NpyArray::F64(a) => a.shape(),
            NpyArray::I64(a) => a.shape(),
            NpyArray::U64(a) => a.shape(),
            NpyArray::U8(a) => a.shape(),
            NpyArray::Bool(a) => a.shape(),
            NpyArray::Str(_) => &[],
        }
    }

    /// Bit-exact equality (NaNs with equal bits compare equal, `0.0` and `-0.0` differ).
    pub fn bit_eq(&self, other: &NpyArray) -> bool {
        match (self, other) {
            (NpyArray::F32(a), NpyArray::F32(b)) => {
                a.shape() == b.shape() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            (NpyArray::F64(a), NpyArray::F64(b)) => {
                a.shape() == b.shape() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            _ => self == other,
        }
    }
}

// ------------------------------------------------------------------------------------------
// .npy writing

fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Preamble (magic 6 + version 2 + length 2) + dict + padding + '\n' is a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let hlen = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(10 + hlen);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(hlen as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');
    out
}

/// Write the elements of `it` as little-endian bytes, buffered.
fn write_le<T, const N: usize>(
    w: &mut dyn Write,
    it: impl Iterator<Item = T>,
    to: impl Fn(T) -> [u8; N],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 16);
    for x in it {
        buf.extend_from_slice(&to(x));
        if buf.len() >= (1 << 16) {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)
}

/// Write one array as a complete `.npy` file (format 1.0).
pub fn write_npy(w: &mut dyn Write, a: &NpyArray) -> std::io::Result<()> {
    let header = npy_header(&a.descr(), a.shape());
    if header.len() > usize::from(u16::MAX) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "npy header longer than 65535 bytes",
        ));
    }
    w.write_all(&header)?;
    match a {
        NpyArray::F32(x) => write_le(w, x.iter().copied(), f32::to_le_bytes),
        NpyArray::F64(x) => write_le(w, x.iter().copied(), f64::to_le_bytes),
        NpyArray::I64(x) => write_le(w, x.iter().copied(), i64::to_le_bytes),
        NpyArray::U64(x) => write_le(w, x.iter().copied(), u64::to_le_bytes),
        NpyArray::U8(x) => write_le(w, x.iter().copied(), |b| [b]),
        NpyArray::Bool(x) => write_le(w, x.iter().copied(), |b| [u8::from(b)]),
        NpyArray::Str(s) => {
            let mut units: Vec<u32> = s.chars().map(u32::from).collect();
            if units.is_empty() {
                units.push(0);
            }
            write_le(w, units.into_iter(), u32::to_le_bytes)
        }
    }
}

// ------------------------------------------------------------------------------------------
// .npz (zip) writing

/// A writer that only counts bytes and computes their CRC-32 (first pass of an entry).
struct CrcCount {
    crc: flate2::Crc,
    n: u64,
}

impl Write for CrcCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.crc.update(buf);
        self.n += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that counts the bytes passing through.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

const DOS_DATE_1980_01_01: u16 = (1 << 5) | 1;
const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_EOCD64: u32 = 0x0606_4b50;
const SIG_EOCD64_LOC: u32 = 0x0706_4b50;

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Write `entries` as an `.npz` archive (stored zip entries named `<name>.npy`, in the order
/// given). Each array is serialised twice (once for its CRC and size, once for real) so no
/// copy of the data is ever held. Archives over 4 GiB or 65535 entries are refused.
pub fn write_npz<'a>(
    w: &mut dyn Write,
    entries: impl IntoIterator<Item = (&'a str, &'a NpyArray)>,
) -> std::io::Result<()> {
    let mut w = Counted { inner: w, n: 0 };
    let mut central = Vec::new();
    let mut count = 0usize;
    for (name, a) in entries {
        let fname = format!("{name}.npy");
        if name.is_empty() || fname.len() > usize::from(u16::MAX) || name.contains('\0') {
            return Err(invalid(format!("bad npz entry name {name:?}")));
        }
        let mut c = CrcCount {
            crc: flate2::Crc::new(),
            n: 0,
        };
        write_npy(&mut c, a)?;
        let (crc, size) = (c.crc.sum(), c.n);
        let offset = w.n;
        let (Ok(size32), Ok(off32)) = (u32::try_from(size), u32::try_from(offset)) else {
            return Err(invalid(
                "npz archive larger than 4 GiB (zip64 writing is not supported)".into(),
            ));
        };
        let flags: u16 = if fname.is_ascii() { 0 } else { 1 << 11 };
        let mut lh = Vec::with_capacity(30 + fname.len());
        lh.extend_from_slice(&SIG_LOCAL.to_le_bytes());
        for v in [20u16, flags, 0, 0, DOS_DATE_1980_01_01] {
            lh.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size32, size32] {
            lh.extend_from_slice(&v.to_le_bytes());
        }
        lh.extend_from_slice(&(fname.len() as u16).to_le_bytes());
        lh.extend_from_slice(&0u16.to_le_bytes());
        lh.extend_from_slice(fname.as_bytes());
        w.write_all(&lh)?;
        let before = w.n;
        write_npy(&mut w, a)?;
        if w.n - before != size {
            return Err(invalid(format!(
                "npz entry {name}: serialised size changed between passes"
            )));
        }
        central.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
        for v in [20u16, 20, flags, 0, 0, DOS_DATE_1980_01_01] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size32, size32] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        for v in [fname.len() as u16, 0, 0, 0, 0] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        central.extend_from_slice(&0u32.to_le_bytes());
        central.extend_from_slice(&off32.to_le_bytes());
        central.extend_from_slice(fname.as_bytes());
        count += 1;
    }
    let cd_off = w.n;
    w.write_all(&central)?;
    let (Ok(cd_off), Ok(cd_size), Ok(count)) = (
        u32::try_from(cd_off),
        u32::try_from(central.len()),
        u16::try_from(count),
    ) else {
        return Err(invalid(
            "npz archive larger than 4 GiB or 65535 entries (zip64 writing is not supported)"
                .into(),
        ));
    };
    let mut end = Vec::with_capacity(22);
    end.extend_from_slice(&SIG_EOCD.to_le_bytes());
    for v in [0u16, 0, count, count] {
        end.extend_from_slice(&v.to_le_bytes());
    }
    end.extend_from_slice(&cd_size.to_le_bytes());
    end.extend_from_slice(&cd_off.to_le_bytes());
    end.extend_from_slice(&0u16.to_le_bytes());
    w.write_all(&end)?;
    w.flush()
}

/// Write an `.npz` file atomically (see [`crate::io::atomic_write`]).
pub fn save_npz<'a>(
    path: impl AsRef<Path>,
    entries: impl IntoIterator<Item = (&'a str, &'a NpyArray)>,
) -> Result<()> {
    crate::io::atomic_write(path, |w| write_npz(w, entries))
}

// ------------------------------------------------------------------------------------------
// Reading

/// Little-endian field reader over a byte slice with bounds checks.
fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(n)?)?;
    Some(s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

/// Read an `.npz` file.
pub fn read_npz(path: impl AsRef<Path>) -> Result<BTreeMap<String, NpyArray>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npz(&bytes, path)
}

struct CdEntry {
    name: String,
    flags: u16,
    method: u16,
    crc: u32,
    csize: u64,
    usize: u64,
    offset: u64,
}

/// Parse the bytes of an `.npz` archive; `path` only labels the errors. Keys are the entry
/// names without their `.npy` suffix.
pub fn parse_npz(bytes: &[u8], path: impl AsRef<Path>) -> Result<BTreeMap<String, NpyArray>> {
    parse_npz_checked(bytes, path.as_ref(), None, |_| Ok(()))
}

/// Like [`parse_npz`], but first reads the entry `first` (if given) alone and hands it to
/// `check` (`None` when absent), so a caller can refuse a file (e.g. a newer format version)
/// before the other entries are parsed.
pub fn parse_npz_checked(
    bytes: &[u8],
    path: &Path,
    first: Option<&str>,
    check: impl FnOnce(Option<&NpyArray>) -> Result<()>,
) -> Result<BTreeMap<String, NpyArray>> {
    let entries = directory(bytes, path)?;
    if let Some(key) = first {
        let fname = format!("{key}.npy");
        match entries.iter().find(|e| e.name == fname) {
            Some(e) => check(Some(&read_entry(bytes, e, path)?.1))?,
            None => check(None)?,
        }
    }
    let mut out = BTreeMap::new();
    for e in entries {
        let (key, arr) = read_entry(bytes, &e, path)?;
        if out.insert(key, arr).is_some() {
            return Err(Error::format(
                path,
                format!("entry `{}` appears twice", e.name),
            ));
        }
    }
    Ok(out)
}

/// Parse and validate the zip directory (end record, zip64 records, central directory).
fn directory(bytes: &[u8], path: &Path) -> Result<Vec<CdEntry>> {
    let fmt = |msg: String| Error::format(path, msg);
    if bytes.is_empty() {
        return Err(fmt("empty file (expected a zip archive)".into()));
    }
    // End of central directory: 22 bytes plus a comment of up to 65535 bytes, at the end.
    if bytes.len() < 22 {
        return Err(fmt(format!(
            "not a zip archive: {} bytes is too short for the end-of-central-directory record",
            bytes.len()
        )));
    }
    let lowest = bytes.len().saturating_sub(22 + 65535);
    let eocd = (lowest..=bytes.len() - 22)
        .rev()
        .find(|&i| {
            le(bytes, i, 4) == Some(u64::from(SIG_EOCD))
                && le(bytes, i + 20, 2).is_some_and(|c| i + 22 + c as usize <= bytes.len())
        })
        .ok_or_else(|| {
            fmt(
                "not a zip archive: no end-of-central-directory record (truncated or not an .npz)"
                    .into(),
            )
        })?;
    let f = |at: usize, n: usize| le(bytes, eocd + at, n).unwrap_or(0);
    let (disk, cd_disk) = (f(4, 2), f(6, 2));
    let (mut n_disk, mut n_total, mut cd_size, mut cd_off) =
        (f(8, 2), f(10, 2), f(12, 4), f(16, 4));
    let mut cd_limit = eocd as u64;
    if n_total == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_off == 0xFFFF_FFFF {
        // Zip64: a locator just before the record points at the zip64 end record.
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| le(bytes, l, 4) == Some(u64::from(SIG_EOCD64_LOC)))
            .ok_or_else(|| fmt("zip64 archive without a zip64 end-record locator".into()))?;
        let at = le(bytes, loc + 8, 8).unwrap_or(u64::MAX);
        let at = usize::try_from(at)
            .ok()
            .filter(|&a| a <= loc && le(bytes, a, 4) == Some(u64::from(SIG_EOCD64)))
            .filter(|&a| a + 56 <= loc)
            .ok_or_else(|| {
                fmt(format!(
                    "zip64 end record at offset {at} is missing or outside the file"
                ))
            })?;
        let g = |o: usize, n: usize| le(bytes, at + o, n).unwrap_or(0);
        n_disk = g(24, 8);
        n_total = g(32, 8);
        cd_size = g(40, 8);
        cd_off = g(48, 8);
        cd_limit = at as u64;
    }
    if disk != 0 || cd_disk != 0 || n_disk != n_total {
        return Err(fmt("multi-disk zip archives are not supported".into()));
    }
    let cd_end = cd_off
        .checked_add(cd_size)
        .filter(|&e| e <= cd_limit)
        .ok_or_else(|| {
            fmt(format!(
                "bad zip directory: central directory at offset {cd_off} of {cd_size} bytes runs past its end record at {cd_limit}"
            ))
        })? as usize;
    if n_total.checked_mul(46).is_none_or(|m| m > cd_size) {
        return Err(fmt(format!(
            "bad zip directory: {n_total} entries cannot fit in a {cd_size}-byte central directory"
        )));
    }
    let mut entries = Vec::with_capacity(n_total as usize);
    let mut p = cd_off as usize;
    for k in 0..n_total {
        let g = |o: usize, n: usize| le(bytes, p + o, n);
        if p + 46 > cd_end || g(0, 4) != Some(u64::from(SIG_CENTRAL)) {
            return Err(fmt(format!(
                "bad zip directory: entry {k} at offset {p} is not a central-directory header"
            )));
        }
        let (nl, el, cl) = (
            g(28, 2).unwrap_or(0) as usize,
            g(30, 2).unwrap_or(0) as usize,
            g(32, 2).unwrap_or(0) as usize,
        );
        let next = p + 46 + nl + el + cl;
        if next > cd_end {
            return Err(fmt(format!(
                "bad zip directory: entry {k} at offset {p} runs past the central directory"
            )));
        }
        let name = std::str::from_utf8(&bytes[p + 46..p + 46 + nl])
            .map_err(|_| {
                fmt(format!(
                    "bad zip directory: entry {k} at offset {p} has a name that is not UTF-8"
                ))
            })?
            .to_string();
        let mut e = CdEntry {
            flags: g(8, 2).unwrap_or(0) as u16,
            method: g(10, 2).unwrap_or(0) as u16,
            crc: g(16, 4).unwrap_or(0) as u32,
            csize: g(20, 4).unwrap_or(0),
            usize: g(24, 4).unwrap_or(0),
            offset: g(42, 4).unwrap_or(0),
            name,
        };
        // Zip64 extended information (id 1): the 8-byte values of the fields set to 0xFFFFFFFF.
        let extra = &bytes[p + 46 + nl..p + 46 + nl + el];
        let mut q = 0;
        while q + 4 <= extra.len() {
            let id = le(extra, q, 2).unwrap_or(0);
            let len = le(extra, q + 2, 2).unwrap_or(0) as usize;
            let body = extra.get(q + 4..q + 4 + len).ok_or_else(|| {
                fmt(format!(
                    "entry `{}`: extra field at offset {} runs past its header",
                    e.name,
                    p + 46 + nl + q
                ))
            })?;
            if id == 1 {
                let mut r = 0;
                for field in [&mut e.usize, &mut e.csize, &mut e.offset] {
                    if *field == 0xFFFF_FFFF {
                        *field = le(body, r, 8).ok_or_else(|| {
                            fmt(format!("entry `{}`: zip64 extra field too short", e.name))
                        })?;
                        r += 8;
                    }
                }
            }
            q += 4 + len;
        }
        entries.push(e);
        p = next;
    }
    // Entries must not overlap (each spans at least its 30-byte local header and its compressed
    // data): otherwise many directory entries could share one small deflate stream and inflate
    // to far more than the file could hold (a "zip bomb"). With this check the inflated total
    // is bounded by the deflate ratio times the file size.
    let mut spans: Vec<(u64, u64, &str)> = entries
        .iter()
        .map(|e| {
            (
                e.offset,
                e.offset.saturating_add(30).saturating_add(e.csize),
                e.name.as_str(),
            )
        })
        .collect();
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(fmt(format!(
            "bad zip directory: entry `{}` at offset {} overlaps entry `{}` at offset {}",
            w[1].2, w[1].0, w[0].2, w[0].0
        )));
    }
    Ok(entries)
}

fn read_entry(bytes: &[u8], e: &CdEntry, path: &Path) -> Result<(String, NpyArray)> {
    let name = &e.name;
    let fmt = |msg: String| Error::format(path, format!("entry `{name}`: {msg}"));
    let key = name
        .strip_suffix(".npy")
        .ok_or_else(|| fmt("not a .npy entry (an .npz holds only <name>.npy files)".into()))?;
    if e.flags & 1 != 0 {
        return Err(fmt("encrypted zip entries are not supported".into()));
    }
    if e.usize > MAX_ENTRY_BYTES {
        return Err(fmt(format!(
            "declared size {} exceeds the limit of {MAX_ENTRY_BYTES} bytes",
            e.usize
        )));
    }
    let off = usize::try_from(e.offset).unwrap_or(usize::MAX);
    let g = |o: usize, n: usize| le(bytes, off.saturating_add(o), n);
    if g(0, 4) != Some(u64::from(SIG_LOCAL)) {
        return Err(fmt(format!(
            "no local file header at offset {} (bad zip directory or truncated file)",
            e.offset
        )));
    }
    let (nl, el) = (
        g(26, 2).unwrap_or(0) as usize,
        g(28, 2).unwrap_or(0) as usize,
    );
    let start = off + 30 + nl + el;
    let data = usize::try_from(e.csize)
        .ok()
        .and_then(|c| bytes.get(start..start.checked_add(c)?))
        .ok_or_else(|| {
            fmt(format!(
                "truncated: {} compressed bytes at offset {start} run past the end of the file ({} bytes)",
                e.csize,
                bytes.len()
            ))
        })?;
    let inflated;
    let raw: &[u8] = match e.method {
        0 => {
            if e.csize != e.usize {
                return Err(fmt(format!(
                    "stored entry with compressed size {} != size {}",
                    e.csize, e.usize
                )));
            }
            data
        }
        8 => {
            let mut v = Vec::with_capacity((e.usize as usize).min(1 << 26));
            flate2::read::DeflateDecoder::new(data)
                .take(e.usize + 1)
                .read_to_end(&mut v)
                .map_err(|err| fmt(format!("corrupt deflate stream: {err}")))?;
            if v.len() as u64 != e.usize {
                return Err(fmt(format!(
                    "inflates to {} bytes, the zip directory says {}",
                    v.len(),
                    e.usize
                )));
            }
            inflated = v;
            &inflated
        }
        m => {
            return Err(fmt(format!(
                "compression method {m} is not supported (only stored and deflate)"
            )));
        }
    };
    let mut crc = flate2::Crc::new();
    crc.update(raw);
    if crc.sum() != e.crc {
        return Err(fmt(format!(
            "CRC-32 mismatch (stored {:08x}, computed {:08x}): the entry is corrupt",
            e.crc,
            crc.sum()
        )));
    }
    let arr = parse_npy(raw).map_err(fmt)?;
    Ok((key.to_string(), arr))
}

/// A value of the Python literal in an `.npy` header.
#[derive(Debug)]
enum Py {
    Str(String),
    Bool(bool),
    Int(u64),
    Tuple(Vec<Py>),
    Other,
}

struct PyParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl PyParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!(
                "header: expected `{}` at byte {}",
                c as char, self.i
            ))
        }
    }
    fn value(&mut self, depth: usize) -> std::result::Result<Py, String> {
        if depth > 4 {
            return Err("header: nesting too deep".into());
        }
        match self.peek() {
            Some(q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i] != q {
                    self.i += 1;
                }
                if self.i >= self.s.len() {
                    return Err("header: unterminated string".into());
                }
                let v = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                Ok(Py::Str(v))
            }
            Some(b'(' | b'[') => {
                let close = if self.s[self.i] == b'(' { b')' } else { b']' };
                let tuple = close == b')';
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(close) {
                        self.i += 1;
                        break;
                    }
                    items.push(self.value(depth + 1)?);
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(c) if c == close => {}
                        _ => return Err(format!("header: bad sequence at byte {}", self.i)),
                    }
                }
                Ok(if tuple { Py::Tuple(items) } else { Py::Other })
            }
            Some(b'{') => {
                // Nested dicts only occur in structured dtypes, which are rejected later.
                self.dict(depth + 1)?;
                Ok(Py::Other)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let v = std::str::from_utf8(&self.s[start..self.i])
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or_else(|| format!("header: integer too large at byte {start}"))?;
                if self.s.get(self.i) == Some(&b'L') {
                    self.i += 1; // Python 2 long suffix
                }
                Ok(Py::Int(v))
            }
            Some(_) => {
                for (word, v) in [("True", Py::Bool(true)), ("False", Py::Bool(false))] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(v);
                    }
                }
                Err(format!("header: unexpected character at byte {}", self.i))
            }
            None => Err("header: unexpected end".into()),
        }
    }
    fn dict(&mut self, depth: usize) -> std::result::Result<Vec<(String, Py)>, String> {
        self.expect(b'{')?;
        let mut out = Vec::new();
        loop {
            if self.peek() == Some(b'}') {
                self.i += 1;
                return Ok(out);
            }
            let Py::Str(k) = self.value(depth + 1)? else {
                return Err(format!(
                    "header: dictionary key at byte {} is not a string",
                    self.i
                ));
            };
            self.expect(b':')?;
            let v = self.value(depth + 1)?;
            out.push((k, v));
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {}
                _ => return Err(format!("header: expected `,` or `}}` at byte {}", self.i)),
            }
        }
    }
}

/// An array of `shape` from its items in storage order; Fortran order is the transpose of C
/// order over the reversed dimensions.
fn build<T: Clone>(
    shape: &[usize],
    fortran: bool,
    v: Vec<T>,
) -> std::result::Result<ArrayD<T>, String> {
    if fortran {
        let rev: Vec<usize> = shape.iter().rev().copied().collect();
        Ok(ArrayD::from_shape_vec(IxDyn(&rev), v)
            .map_err(|e| e.to_string())?
            .reversed_axes()
            .as_standard_layout()
            .into_owned())
    } else {
        ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| e.to_string())
    }
}

/// Read `n` items of `N` bytes each, in the given byte order.
fn items<T, const N: usize>(raw: &[u8], big: bool, from: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| {
            let mut a: [u8; N] = c.try_into().expect("chunk of N bytes");
            if big {
                a.reverse();
            }
            from(a)
        })
        .collect()
}

/// Parse a complete `.npy` file (header and data). Errors are plain messages; callers add the
/// file and entry.
pub fn parse_npy(b: &[u8]) -> std::result::Result<NpyArray, String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array: missing the \\x93NUMPY magic".into());
    }
    let (major, minor) = (b[6], b[7]);
    let (hlen, pre): (usize, usize) = match major {
        1 => (le(b, 8, 2).unwrap_or(0) as usize, 10),
        2 | 3 => (
            le(b, 8, 4)
                .ok_or("truncated .npy preamble")?
                .try_into()
                .unwrap_or(usize::MAX),
            12,
        ),
        _ => {
            return Err(format!(
                ".npy format version {major}.{minor} is not supported"
            ));
        }
    };
    let htext = pre
        .checked_add(hlen)
        .and_then(|end| b.get(pre..end))
        .ok_or_else(|| format!("truncated .npy header: {hlen} bytes declared"))?;
    let mut p = PyParser { s: htext, i: 0 };
    let dict = p.dict(0)?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (k, v) in dict {
        match (k.as_str(), v) {
            ("descr", Py::Str(s)) => descr = Some(s),
            ("descr", _) => return Err("structured dtypes are not supported".into()),
            ("fortran_order", Py::Bool(f)) => fortran = Some(f),
            ("shape", Py::Tuple(t)) => {
                let dims =
                    t.into_iter()
                        .map(|d| match d {
                            Py::Int(v) => usize::try_from(v)
                                .map_err(|_| "shape dimension too large".to_string()),
                            _ => Err("shape holds a non-integer".to_string()),
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                shape = Some(dims);
            }
            (k, _) => return Err(format!("header: unexpected or malformed key `{k}`")),
        }
    }
    let (Some(descr), Some(fortran), Some(shape)) = (descr, fortran, shape) else {
        return Err("header lacks `descr`, `fortran_order` or `shape`".into());
    };
    if shape.len() > 32 {
        return Err(format!("{} dimensions (at most 32)", shape.len()));
    }
    let order = descr.as_bytes().first().copied().unwrap_or(b'?');
    if !matches!(order, b'<' | b'>' | b'|' | b'=') {
        return Err(format!("dtype `{descr}`: unknown byte order"));
    }
    let big = order == b'>';
    let kind = descr.as_bytes().get(1).copied().unwrap_or(b'?');
    let width: usize = descr
        .get(2..)
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("dtype `{descr}` is not supported"))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let itemsize = match kind {
        b'U' => width.checked_mul(4),
        _ => Some(width),
    }
    .ok_or_else(|| format!("dtype `{descr}` is too wide"))?;
    let data = &b[pre + hlen..];
    let need = count
        .checked_mul(itemsize)
        .ok_or_else(|| format!("shape {shape:?} of `{descr}` overflows"))?;
    if data.len() != need {
        return Err(format!(
            "{}: shape {shape:?} of `{descr}` needs {need} data bytes, the entry has {}",
            if data.len() < need {
                "truncated"
            } else {
                "trailing bytes"
            },
            data.len()
        ));
    }
    let unsupported = || format!("dtype `{descr}` is not supported");
    Ok(match (kind, width) {
        (b'f', 4) => NpyArray::F32(build(
            &shape,
            fortran,
            items(data, big, f32::from_le_bytes),
        )?),
        (b'f', 8) => NpyArray::F64(build(
            &shape,
            fortran,
            items(data, big, f64::from_le_bytes),
        )?),
        (b'i', 1) => NpyArray::I64(build(
            &shape,
            fortran,
            items(data, big, |a| i64::from(i8::from_le_bytes(a))),
        )?),
        (b'i', 2) => NpyArray::I64(build(
            &shape,
            fortran,
            items(data, big, |a| i64::from(i16::from_le_bytes(a))),
        )?),
        (b'i', 4) => NpyArray::I64(build(
            &shape,
            fortran,
            items(data, big, |a| i64::from(i32::from_le_bytes(a))),
        )?),
        (b'i', 8) => NpyArray::I64(build(
            &shape,
            fortran,
            items(data, big, i64::from_le_bytes),
        )?),
        (b'u', 1) => NpyArray::U8(build(&shape, fortran, data.to_vec())?),
        (b'u', 2) => NpyArray::U64(build(
            &shape,
            fortran,
            items(data, big, |a| u64::from(u16::from_le_bytes(a))),
        )?),
        (b'u', 4) => NpyArray::U64(build(
            &shape,
            fortran,
            items(data, big, |a| u64::from(u32::from_le_bytes(a))),
        )?),
        (b'u', 8) => NpyArray::U64(build(
            &shape,
            fortran,
            items(data, big, u64::from_le_bytes),
        )?),
        (b'b', 1) => NpyArray::Bool(build(
            &shape,
            fortran,
            data.iter().map(|&x| x != 0).collect(),
        )?),
        (b'U' | b'S', _) => {
            if !shape.is_empty() {
                return Err(format!(
                    "string arrays of shape {shape:?} are not supported (only 0-d strings)"
                ));
            }
            let s = if kind == b'U' {
                let units = items(data, big, u32::from_le_bytes);
                let end = units.iter().rposition(|&u| u != 0).map_or(0, |i| i + 1);
                units[..end]
                    .iter()
                    .map(|&u| char::from_u32(u).ok_or_else(|| format!("invalid code point {u:#x}")))
                    .collect::<std::result::Result<String, _>>()?
            } else {
                let end = data.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
                String::from_utf8(data[..end].to_vec())
                    .map_err(|_| "byte string is not UTF-8".to_string())?
            };
            NpyArray::Str(s)
        }
        _ => return Err(unsupported()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<(String, NpyArray)> {
        vec![
            (
                "w".into(),
                NpyArray::F32(
                    ArrayD::from_shape_vec(
                        IxDyn(&[2, 3]),
                        vec![1.5, -0.0, f32::NAN, 3.0, 1e-40, -7.25],
                    )
                    .unwrap(),
                ),
            ),
            (
                "rng".into(),
                NpyArray::U64(
                    ArrayD::from_shape_vec(IxDyn(&[4]), vec![1, u64::MAX, 3, 0]).unwrap(),
                ),
            ),
            (
                "step".into(),
                NpyArray::I64(ArrayD::from_elem(IxDyn(&[]), -42)),
            ),
            ("meta".into(), NpyArray::Str("{\"arch\": \"π-net\"}".into())),
            ("empty".into(), NpyArray::F64(ArrayD::zeros(IxDyn(&[0, 5])))),
            (
                "mask".into(),
                NpyArray::Bool(
                    ArrayD::from_shape_vec(IxDyn(&[3]), vec![true, false, true]).unwrap(),
                ),
            ),
            (
                "bytes".into(),
                NpyArray::U8(ArrayD::from_shape_vec(IxDyn(&[1, 1, 2]), vec![0, 255]).unwrap()),
            ),
        ]
    }

    fn to_bytes(e: &[(String, NpyArray)]) -> Vec<u8> {
        let mut v = Vec::new();
        write_npz(&mut v, e.iter().map(|(k, a)| (k.as_str(), a))).unwrap();
        v
    }

    #[test]
    fn npz_round_trip_is_bit_exact_and_deterministic() {
        let s = sample();
        let b = to_bytes(&s);
        assert_eq!(b, to_bytes(&s), "same contents give the same bytes");
        let back = parse_npz(&b, "t.npz").unwrap();
        assert_eq!(back.len(), s.len());
        for (k, a) in &s {
            assert!(back[k].bit_eq(a), "{k}: {:?} vs {a:?}", back[k]);
        }
    }

    #[test]
    fn npy_header_is_64_byte_aligned() {
        for shape in [&[][..], &[7], &[1, 2, 3, 4, 5, 6]] {
            let h = npy_header("<f4", shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(*h.last().unwrap(), b'\n');
        }
    }

    #[test]
    fn fortran_order_and_big_endian_are_read() {
        // 2x3 int32, Fortran order, big-endian: columns stored first.
        let dict = "{'descr': '>i4', 'fortran_order': True, 'shape': (2, 3), }";
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        for v in [1i32, 4, 2, 5, 3, 6] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let NpyArray::I64(a) = parse_npy(&b).unwrap() else {
            panic!()
        };
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(
            a.iter().copied().collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6]
        );
    }

    #[test]
    fn crc_mismatch_names_the_entry() {
        let mut b = to_bytes(&sample()[..1]);
        // Flip a data byte (last byte of the entry's payload, just before the central directory).
        let cd = b.len() - 22 - (46 + "w.npy".len());
        b[cd - 1] ^= 0x40;
        let e = parse_npz(&b, "c.npz").unwrap_err().to_string();
        assert!(
            e.contains("c.npz") && e.contains("`w.npy`") && e.contains("CRC"),
            "{e}"
        );
    }

    #[test]
    fn bad_zip_directory_fields_are_named() {
        let good = to_bytes(&sample()[..1]);
        let eocd = good.len() - 22;
        let patch = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            parse_npz(&b, "z.npz").unwrap_err().to_string()
        };
        // Entry count far beyond what the central directory can hold.
        let e = patch(eocd + 8, &[0x60, 0xea, 0x60, 0xea]);
        assert!(e.contains("60000 entries cannot fit"), "{e}");
        // Central directory offset past the end record.
        let e = patch(eocd + 16, &u32::MAX.to_le_bytes()[..3]);
        assert!(
            e.contains("bad zip directory") && e.contains("runs past"),
            "{e}"
        );
        // Local header offset (central directory field at +42) pointing at garbage.
        let cd = eocd - (46 + "w.npy".len());
        let e = patch(cd + 42, &[3, 0, 0, 0]);
        assert!(
            e.contains("`w.npy`") && e.contains("no local file header at offset 3"),
            "{e}"
        );
        // Unsupported compression method (central directory field at +10).
        let e = patch(cd + 10, &[14, 0]);
        assert!(e.contains("compression method 14"), "{e}");
        // Two directory entries sharing one local header (the zip-bomb layout).
        let two = to_bytes(&sample()[..2]);
        let eocd2 = two.len() - 22;
        let cd_off = u32::from_le_bytes(two[eocd2 + 16..eocd2 + 20].try_into().unwrap()) as usize;
        let second = cd_off + 46 + "w.npy".len();
        let mut b = two.clone();
        b[second + 42..second + 46].copy_from_slice(&[0, 0, 0, 0]);
        let e = parse_npz(&b, "bomb.npz").unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
        // An entry that is not a .npy file.
        let e = patch(cd + 46 + 2, b"x");
        assert!(
            e.contains("`w.xpy`") && e.contains("not a .npy entry"),
            "{e}"
        );
    }

    #[test]
    fn structured_and_object_dtypes_are_rejected() {
        for dict in [
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
            "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }",
        ] {
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            b.extend_from_slice(&[0; 8]);
            assert!(parse_npy(&b).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Any truncation of a valid archive is an error naming the file; never a panic.
        #[test]
        fn truncated_archives_error(cut in 0usize..100_000) {
            let b = to_bytes(&sample());
            let cut = cut % b.len();
            let e = parse_npz(&b[..cut], "t.npz").unwrap_err().to_string();
            prop_assert!(e.starts_with("t.npz: "), "{}", e);
        }

        /// Single-byte corruptions never panic (they may or may not be detected by the CRC:
        /// a flipped byte in a name or an unused field can still parse).
        #[test]
        fn corrupted_bytes_never_panic(at in 0usize..100_000, x in 1u8..=255) {
            let mut b = to_bytes(&sample());
            let at = at % b.len();
            b[at] ^= x;
            let _ = parse_npz(&b, "t.npz");
        }

        /// Random f32 tensors of random shapes round-trip bit-exactly.
        #[test]
        fn random_f32_round_trip(shape in proptest::collection::vec(0usize..5, 0..4), seed in any::<u64>()) {
            let n: usize = shape.iter().product();
            let mut r = crate::rng::Rng::new(seed);
            let v: Vec<f32> = (0..n).map(|_| f32::from_bits(r.next_u64() as u32)).collect();
            let a = NpyArray::F32(ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap());
            let b = to_bytes(&[("x".into(), a.clone())]);
            prop_assert!(parse_npz(&b, "r.npz").unwrap()["x"].bit_eq(&a));
        }
    }
}
