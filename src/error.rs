//! The library's error type: every variant names the thing (file, key, parameter) and what was
//! expected, so that a user can act on it without reading the code.

use std::path::PathBuf;

use crate::data::DataError;
use crate::weights::WeightsError;

/// Errors of the `sfr` library.
#[derive(Debug, thiserror::Error)]
pub enum SfrError {
    /// Reading a weight file failed.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Reading images or a data set failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A model name that the zoo does not know.
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },
    /// A weight file lacks a tensor that the architecture needs.
    #[error(
        "weights for `{model}` lack the tensor `{key}` (expected shape {expected:?}); is this a weight file for another architecture?"
    )]
    MissingKey {
        model: String,
        key: String,
        expected: Vec<usize>,
    },
    /// A weight tensor has the wrong shape for the architecture.
    #[error(
        "weights for `{model}`: tensor `{key}` has shape {found:?}, expected {expected:?}; is this a weight file for another architecture?"
    )]
    ShapeMismatch {
        model: String,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A weight file holds tensors the architecture does not use.
    #[error(
        "weights for `{model}` hold {count} tensors the architecture does not use (first: `{first}`); is this a weight file for another architecture?"
    )]
    UnexpectedKeys {
        model: String,
        count: usize,
        first: String,
    },
    /// A weight tensor holds NaN or infinite values.
    #[error("weights for `{model}`: tensor `{key}` holds NaN or infinite values")]
    NonFinite { model: String, key: String },
    /// A parameter outside its valid range.
    #[error("invalid {name}: {message}")]
    InvalidParameter { name: String, message: String },
    /// No images could be used.
    #[error("no usable images: {0}")]
    NoImages(String),
    /// Fetching an asset from a package registry failed.
    #[error("fetching `{what}` failed: {message}")]
    Fetch { what: String, message: String },
    /// Writing a file failed (the previous file, if any, is intact).
    #[error(transparent)]
    Write(#[from] crate::atomic::WriteError),
    /// Any other I/O error, with the path involved.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An error with what was being done when it happened. Its message is the context alone;
    /// the cause is its `source()` (programs print the chain: `reading X: <cause>`).
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<SfrError>,
    },
}

/// The library's result type.
pub type Result<T, E = SfrError> = std::result::Result<T, E>;

impl SfrError {
    /// An [`SfrError::InvalidParameter`] with a sentence that says what was expected.
    pub fn param(name: impl Into<String>, message: impl Into<String>) -> Self {
        SfrError::InvalidParameter {
            name: name.into(),
            message: message.into(),
        }
    }

    /// This error with `context` in front of it.
    pub fn context(self, context: impl Into<String>) -> Self {
        SfrError::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// An [`SfrError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SfrError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `.context(|| …)` on the library's results, as `anyhow` has it for programs.
pub trait Context<T> {
    /// Say what was being done when the error happened.
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<SfrError>> Context<T> for std::result::Result<T, E> {
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}
