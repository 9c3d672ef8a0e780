//! Files empf writes and reads back: versioned checkpoints ([`checkpoint`]) stored as NumPy
//! `.npz` archives ([`npz`]), and the atomic write they share ([`atomic_write`]).

pub mod checkpoint;
pub mod npz;

pub use checkpoint::{Checkpoint, FORMAT_VERSION};
pub use npz::NpyArray;

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// `<path>.tmp`: the temporary file [`atomic_write`] writes before renaming it over `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Write a file atomically: `write` fills `<path>.tmp` (in the same directory), which is flushed,
/// fsynced and renamed over `path`; then the directory is fsynced so the rename itself is durable.
///
/// If `write` (or any step before the rename) fails, the temporary file is removed and `path` is
/// left exactly as it was: readers see either the old file or the complete new one, never a
/// partial write. Errors are [`Error::Io`] naming `path`.
pub fn atomic_write(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let tmp = tmp_path(path);
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_parent_dir(path).map_err(|e| Error::io(path, e))
}

#[cfg(unix)]
fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) -> std::io::Result<()> {
    // Directories cannot be opened for fsync on this platform; the rename is atomic regardless.
    Ok(())
}
