//! Errors are values: every error names the layer, file or field involved and what was expected.

use std::path::PathBuf;

/// Result alias used across empf.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// All errors of the empf library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor reached a layer with a shape the layer cannot take.
    #[error("layer `{layer}`: {msg} (got shape {got:?})")]
    Shape {
        /// Name of the layer that rejected the input.
        layer: String,
        /// What the layer expected.
        msg: String,
        /// The shape it got.
        got: Vec<usize>,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file was readable but its contents are wrong.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the offset or field where known.
        msg: String,
    },
    /// A configuration or argument is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An internal invariant of the library was broken (a bug: please report it).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shape error helper.
    pub fn shape(layer: impl Into<String>, msg: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape {
            layer: layer.into(),
            msg: msg.into(),
            got: got.to_vec(),
        }
    }
    /// I/O error helper.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// Format error helper.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
