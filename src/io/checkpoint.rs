//! Versioned training checkpoints: an `.npz` archive (readable by `numpy.load`) of named arrays
//! (parameters, optimiser state such as momentum buffers: `f32`; step counters: `i64`; RNG state:
//! `u64[4]`) and string metadata (model configuration as JSON or `key=value` text).
//!
//! Two reserved entries identify the file: `empf.format_version` (0-d `u64`, equal to
//! [`FORMAT_VERSION`] when written; a newer or unknown version is refused on load) and
//! `empf.version` (the writing crate's version string). Names starting with `empf.` are reserved.
//!
//! Saving is atomic (see [`crate::io::atomic_write`]): a crash or error mid-write leaves the
//! previous checkpoint intact. Loading validates every header before allocating (see
//! [`crate::io::npz`]); errors name the file and the entry.

use super::npz::{self, NpyArray};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the checkpoint layout written by this crate. Bump when the meaning of entries
/// changes; loading refuses files with a larger (or zero) version.
pub const FORMAT_VERSION: u64 = 1;

/// Name of the entry holding the format version.
pub const VERSION_KEY: &str = "empf.format_version";
/// Name of the entry holding the version of empf that wrote the file.
pub const EMPF_VERSION_KEY: &str = "empf.version";

/// A set of named arrays and strings, saved as a versioned `.npz`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    entries: BTreeMap<String, NpyArray>,
    /// The file it was loaded from (labels errors of the accessors).
    source: Option<PathBuf>,
}

impl Checkpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    fn label(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<checkpoint in memory>"))
    }

    fn entry_err(&self, name: &str, msg: impl std::fmt::Display) -> Error {
        Error::format(self.label(), format!("entry `{name}`: {msg}"))
    }

    /// Insert (or replace) any array. Names starting with `empf.` are overwritten on save.
    pub fn insert(&mut self, name: impl Into<String>, a: NpyArray) {
        self.entries.insert(name.into(), a);
    }

    /// Insert an `f32` tensor (a parameter, a gradient, a momentum buffer).
    pub fn put_tensor(&mut self, name: impl Into<String>, t: Tensor<f32>) {
        self.insert(name, NpyArray::F32(t));
    }

    /// Insert a 1-d `u64` array (e.g. an RNG state `[u64; 4]`).
    pub fn put_u64s(&mut self, name: impl Into<String>, v: &[u64]) {
        self.insert(
            name,
            NpyArray::U64(
                ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).expect("1-d shape"),
            ),
        );
    }

    /// Insert a 1-d `i64` array (e.g. step and epoch counters).
    pub fn put_i64s(&mut self, name: impl Into<String>, v: &[i64]) {
        self.insert(
            name,
            NpyArray::I64(
                ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).expect("1-d shape"),
            ),
        );
    }

    /// Insert a string (model configuration, notes).
    pub fn put_str(&mut self, name: impl Into<String>, s: impl Into<String>) {
        self.insert(name, NpyArray::Str(s.into()));
    }

    /// The entry `name`, if present.
    pub fn get(&self, name: &str) -> Option<&NpyArray> {
        self.entries.get(name)
    }

    /// Remove and return the entry `name`.
    pub fn remove(&mut self, name: &str) -> Option<NpyArray> {
        self.entries.remove(name)
    }

    /// Entry names in sorted order (including the reserved `empf.` entries of a loaded file).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn need(&self, name: &str) -> Result<&NpyArray> {
        self.entries
            .get(name)
            .ok_or_else(|| self.entry_err(name, "missing"))
    }

    fn wrong(&self, name: &str, a: &NpyArray, want: &str) -> Error {
        self.entry_err(
            name,
            format!(
                "is {} of shape {:?}, expected {want}",
                a.type_name(),
                a.shape()
            ),
        )
    }

    /// The `f32` tensor `name` (error naming the file and entry if missing or of another type).
    pub fn tensor(&self, name: &str) -> Result<&Tensor<f32>> {
        match self.need(name)? {
            NpyArray::F32(t) => Ok(t),
            a => Err(self.wrong(name, a, "f32")),
        }
    }

    /// The `f32` tensor `name`, which must have shape `shape`.
    pub fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Result<&Tensor<f32>> {
        let t = self.tensor(name)?;
        if t.shape() != shape {
            return Err(self.entry_err(
                name,
                format!("has shape {:?}, expected {shape:?}", t.shape()),
            ));
        }
        Ok(t)
    }

    /// The 1-d `u64` array `name`.
    pub fn u64s(&self, name: &str) -> Result<&[u64]> {
        match self.need(name)? {
            NpyArray::U64(a) if a.ndim() == 1 => Ok(a.as_slice().expect("standard layout")),
            a => Err(self.wrong(name, a, "1-d u64")),
        }
    }

    /// The 1-d `i64` array `name`.
    pub fn i64s(&self, name: &str) -> Result<&[i64]> {
        match self.need(name)? {
            NpyArray::I64(a) if a.ndim() == 1 => Ok(a.as_slice().expect("standard layout")),
            a => Err(self.wrong(name, a, "1-d i64")),
        }
    }

    /// The string `name`.
    pub fn str(&self, name: &str) -> Result<&str> {
        match self.need(name)? {
            NpyArray::Str(s) => Ok(s),
            a => Err(self.wrong(name, a, "str")),
        }
    }

    /// The tensor `name` converted to `f32` from `f32` or `f64` (e.g. weights saved by NumPy
    /// with its default float64), checked to have shape `shape`.
    pub fn tensor_as_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor<f32>> {
        let t = match self.need(name)? {
            NpyArray::F32(t) => t.clone(),
            NpyArray::F64(t) => t.mapv(|x| x as f32),
            a => return Err(self.wrong(name, a, "f32 or f64")),
        };
        if t.shape() != shape {
            return Err(self.entry_err(
                name,
                format!("has shape {:?}, expected {shape:?}", t.shape()),
            ));
        }
        Ok(t)
    }

    /// Store a random generator's full state (`u64[4]`).
    pub fn put_rng(&mut self, name: impl Into<String>, rng: &crate::rng::Rng) {
        self.put_u64s(name, &rng.state());
    }

    /// Restore a random generator saved by [`put_rng`](Self::put_rng).
    pub fn rng(&self, name: &str) -> Result<crate::rng::Rng> {
        let s = self.u64s(name)?;
        let s: [u64; 4] = s.try_into().map_err(|_| {
            self.entry_err(name, format!("has {} words, an RNG state has 4", s.len()))
        })?;
        Ok(crate::rng::Rng::from_state(s))
    }

    /// The format version of a loaded checkpoint (`None` for one built in memory).
    pub fn format_version(&self) -> Option<u64> {
        match self.entries.get(VERSION_KEY) {
            Some(NpyArray::U64(a)) if a.len() == 1 => a.iter().next().copied(),
            _ => None,
        }
    }

    /// The empf version that wrote a loaded checkpoint.
    pub fn empf_version(&self) -> Option<&str> {
        match self.entries.get(EMPF_VERSION_KEY) {
            Some(NpyArray::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The entries as written: user entries plus the two reserved ones.
    fn stamped(&self) -> (NpyArray, NpyArray) {
        (
            NpyArray::U64(ArrayD::from_elem(IxDyn(&[]), FORMAT_VERSION)),
            NpyArray::Str(env!("CARGO_PKG_VERSION").into()),
        )
    }

    fn write(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let (v, e) = self.stamped();
        let reserved = [(VERSION_KEY, &v), (EMPF_VERSION_KEY, &e)];
        let user = self
            .entries
            .iter()
            .filter(|(k, _)| !k.starts_with("empf."))
            .map(|(k, a)| (k.as_str(), a));
        npz::write_npz(w, reserved.into_iter().chain(user))
    }

    /// The bytes of the `.npz` file [`save`](Self::save) writes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write(&mut v)
            .map_err(|e| Error::io("<checkpoint in memory>", e))?;
        Ok(v)
    }

    /// Save atomically to `path` (`<path>.tmp` is written, fsynced and renamed over `path`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::io::atomic_write(path, |w| self.write(w))
    }

    /// Load and validate a checkpoint file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parse checkpoint bytes; `path` labels the errors. Requires the `empf.format_version`
    /// entry, with a version in `1..=FORMAT_VERSION`.
    pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // The version entry is read and checked before any other entry is parsed, so a file
        // from a newer empf is refused as such, not for some entry this version cannot read.
        let entries =
            npz::parse_npz_checked(bytes, path, Some(VERSION_KEY), |v| check_version(v, path))?;
        Ok(Checkpoint {
            entries,
            source: Some(path.to_path_buf()),
        })
    }

    /// Wrap a plain `.npz` (e.g. weights exported from another framework with `np.savez`)
    /// without requiring the version entries.
    pub fn from_npz(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Ok(Checkpoint {
            entries: npz::read_npz(path)?,
            source: Some(path.to_path_buf()),
        })
    }
}

/// Refuse a missing, malformed, zero or newer format version.
fn check_version(v: Option<&NpyArray>, path: &Path) -> Result<()> {
    let version = match v {
        None => {
            return Err(Error::format(
                path,
                format!(
                    "not an empf checkpoint: no entry `{VERSION_KEY}` (use Checkpoint::from_npz or io::npz::read_npz for plain .npz files)"
                ),
            ));
        }
        Some(NpyArray::U64(a)) if a.len() == 1 => a.iter().next().copied().unwrap_or(0),
        Some(NpyArray::I64(a)) if a.len() == 1 => {
            u64::try_from(a.iter().next().copied().unwrap_or(0)).unwrap_or(0)
        }
        Some(a) => {
            return Err(Error::format(
                path,
                format!(
                    "entry `{VERSION_KEY}`: is {} of shape {:?}, expected a u64 scalar",
                    a.type_name(),
                    a.shape()
                ),
            ));
        }
    };
    if version > FORMAT_VERSION {
        return Err(Error::format(
            path,
            format!(
                "checkpoint format version {version} is newer than this empf {} supports (version {FORMAT_VERSION}); upgrade empf to read it",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    if version == 0 {
        return Err(Error::format(
            path,
            format!("entry `{VERSION_KEY}`: unknown checkpoint format version 0"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_name_the_entry_and_the_type() {
        let mut c = Checkpoint::new();
        c.put_u64s("rng", &[1, 2, 3, 4]);
        c.put_tensor("w", ArrayD::zeros(IxDyn(&[2, 2])));
        let e = c.tensor("rng").unwrap_err().to_string();
        assert!(
            e.contains("entry `rng`") && e.contains("u64") && e.contains("expected f32"),
            "{e}"
        );
        let e = c.tensor("nope").unwrap_err().to_string();
        assert!(e.contains("entry `nope`: missing"), "{e}");
        let e = c.tensor_shaped("w", &[4]).unwrap_err().to_string();
        assert!(e.contains("has shape [2, 2], expected [4]"), "{e}");
        assert_eq!(c.u64s("rng").unwrap(), &[1, 2, 3, 4]);
        assert!(c.rng("w").is_err());
    }

    #[test]
    fn rng_state_survives_a_save_and_load() {
        let mut r = crate::rng::Rng::new(7);
        r.next_u64();
        let mut c = Checkpoint::new();
        c.put_rng("rng/data", &r);
        c.put_u64s("short", &[1, 2, 3]);
        let back = Checkpoint::from_bytes(&c.to_bytes().unwrap(), "r.npz").unwrap();
        let mut r2 = back.rng("rng/data").unwrap();
        assert_eq!(r2.next_u64(), r.next_u64());
        let e = back.rng("short").unwrap_err().to_string();
        assert!(
            e.contains("r.npz") && e.contains("`short`") && e.contains("3 words"),
            "{e}"
        );
    }

    #[test]
    fn f64_weights_convert_to_f32_with_shape_check() {
        let mut c = Checkpoint::new();
        c.insert("w", NpyArray::F64(ArrayD::from_elem(IxDyn(&[2]), 0.1)));
        assert_eq!(
            c.tensor_as_f32("w", &[2]).unwrap().as_slice().unwrap(),
            &[0.1f32, 0.1]
        );
        assert!(c.tensor_as_f32("w", &[3]).is_err());
        assert!(c.tensor("w").is_err(), "tensor() does not silently convert");
    }

    #[test]
    fn bytes_carry_format_and_crate_version() {
        let mut c = Checkpoint::new();
        c.put_str("config", "arch=small");
        c.put_str("empf.version", "forged"); // reserved names are replaced on save
        let back = Checkpoint::from_bytes(&c.to_bytes().unwrap(), "m.npz").unwrap();
        assert_eq!(back.format_version(), Some(FORMAT_VERSION));
        assert_eq!(back.empf_version(), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(back.str("config").unwrap(), "arch=small");
    }

    #[test]
    fn plain_npz_is_refused_by_load_but_accepted_by_from_npz_bytes() {
        let a = NpyArray::F32(ArrayD::zeros(IxDyn(&[3])));
        let mut b = Vec::new();
        npz::write_npz(&mut b, [("w", &a)]).unwrap();
        let e = Checkpoint::from_bytes(&b, "plain.npz")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plain.npz") && e.contains("not an empf checkpoint"),
            "{e}"
        );
    }
}
