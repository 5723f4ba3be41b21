//! Pure-Rust readers for PyTorch checkpoints (`.pth`/`.pt`, both the zip
//! format of torch >= 1.6 and the legacy pre-1.6 pickle stream) and for
//! safetensors files, producing a flat map of `f32` tensors.
//!
//! Nothing in a checkpoint is ever executed: pickles are interpreted by a
//! restricted unpickler ([`pickle`]) that only knows the handful of globals a
//! state dict needs and rejects everything else with
//! [`WeightsError::ForbiddenGlobal`].
//!
//! ```no_run
//! use std::path::Path;
//! let map = sfr::weights::load(Path::new("mobilenet_v2.pth"))?;
//! for (name, t) in map.iter() {
//!     println!("{name}: {:?}", t.shape);
//! }
//! # Ok::<(), sfr::weights::WeightsError>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub mod pickle;
pub mod pth;
pub mod safetensors_io;

pub use pth::load_pth;
pub use safetensors_io::{load_safetensors, read_safetensors_metadata, save_safetensors};

/// A dense tensor in row-major (C-contiguous) order.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Dimensions; empty for a scalar (which then holds exactly one value).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

impl RawTensor {
    /// Builds a tensor, checking that `data` has `shape.iter().product()` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        (numel == data.len()).then_some(Self { shape, data })
    }

    /// Number of elements implied by the shape (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Name → tensor map, ordered by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorMap {
    tensors: BTreeMap<String, RawTensor>,
}

impl TensorMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts a tensor, returning the previous one with that name, if any.
    pub fn insert(&mut self, name: impl Into<String>, tensor: RawTensor) -> Option<RawTensor> {
        self.tensors.insert(name.into(), tensor)
    }

    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut RawTensor> {
        self.tensors.get_mut(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<RawTensor> {
        self.tensors.remove(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor names, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + '_ {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// `(name, tensor)` pairs, ordered by name.
    pub fn iter(
        &self,
    ) -> impl DoubleEndedIterator<Item = (&str, &RawTensor)> + ExactSizeIterator + '_ {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Consumes the map, giving the underlying ordered map.
    pub fn into_inner(self) -> BTreeMap<String, RawTensor> {
        self.tensors
    }
}

impl IntoIterator for TensorMap {
    type Item = (String, RawTensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, RawTensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

impl<'a> IntoIterator for &'a TensorMap {
    type Item = (&'a String, &'a RawTensor);
    type IntoIter = std::collections::btree_map::Iter<'a, String, RawTensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.iter()
    }
}

impl FromIterator<(String, RawTensor)> for TensorMap {
    fn from_iter<I: IntoIterator<Item = (String, RawTensor)>>(iter: I) -> Self {
        Self {
            tensors: iter.into_iter().collect(),
        }
    }
}

/// Everything that can go wrong while reading or writing weight files.
/// Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: file not found")]
    NotFound { path: PathBuf },

    #[error(transparent)]
    Write(#[from] crate::atomic::WriteError),

    #[error("{path}: I/O error while {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path}: unrecognised weight file format: expected a zip archive (\"PK\\x03\\x04\"), \
         a legacy torch pickle (0x80 0x02 ...) or a safetensors header, found first bytes [{found}]"
    )]
    UnknownFormat { path: PathBuf, found: String },

    #[error(
        "{path}: truncated file: {what} needs {needed} bytes at byte offset {offset} \
         but only {available} are available"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },

    #[error("{path}: invalid zip archive ({what}): {reason}")]
    Zip {
        path: PathBuf,
        what: String,
        reason: String,
    },

    #[error("{path}: unknown pickle opcode 0x{opcode:02x} at byte offset {offset} of {context}")]
    UnknownOpcode {
        path: PathBuf,
        context: String,
        opcode: u8,
        offset: u64,
    },

    #[error(
        "{path}: refusing to load global `{module}.{name}` (at byte offset {offset} of {context}): \
         only state-dict globals (collections.OrderedDict, torch._utils._rebuild_*, torch.*Storage, \
         torch dtypes) are allowed; nothing from the file is ever executed"
    )]
    ForbiddenGlobal {
        path: PathBuf,
        context: String,
        module: String,
        name: String,
        offset: u64,
    },

    #[error(
        "{path}: malformed pickle at byte offset {offset} of {context} (opcode {opcode}): {reason}"
    )]
    Pickle {
        path: PathBuf,
        context: String,
        offset: u64,
        opcode: String,
        reason: String,
    },

    #[error("{path}: storage '{key}': expected {expected}, found {found}")]
    StorageMismatch {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },

    #[error("{path}: tensor '{tensor}': {reason}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error(
        "{path}: unsupported dtype {dtype} for tensor '{tensor}' (only real numeric types convert to f32)"
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{path}: not a state dict: expected {expected}, found {found}")]
    NotAStateDict {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
}

impl WeightsError {
    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::NotFound { path }
            | Self::Io { path, .. }
            | Self::UnknownFormat { path, .. }
            | Self::Truncated { path, .. }
            | Self::Zip { path, .. }
            | Self::UnknownOpcode { path, .. }
            | Self::ForbiddenGlobal { path, .. }
            | Self::Pickle { path, .. }
            | Self::StorageMismatch { path, .. }
            | Self::BadTensor { path, .. }
            | Self::UnsupportedDtype { path, .. }
            | Self::NotAStateDict { path, .. }
            | Self::Safetensors { path, .. } => path,
            Self::Write(e) => &e.path,
        }
    }

    pub(crate) fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            Self::Io {
                path: path.to_path_buf(),
                action,
                source,
            }
        }
    }
}

/// Reads a whole file, mapping a missing file to [`WeightsError::NotFound`].
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, WeightsError> {
    std::fs::read(path).map_err(|e| WeightsError::io(path, "reading the file", e))
}

/// The file formats [`load`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// torch >= 1.6 `torch.save` (zip archive with `*/data.pkl`).
    TorchZip,
    /// Pre-1.6 `torch.save` (sequence of pickles followed by raw storages).
    TorchLegacy,
    Safetensors,
}

/// Guesses the format from the first bytes of a file (never its extension).
pub fn sniff_format(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Some(Format::TorchZip);
    }
    // Before the pickle check: a header length such as 128 starts with 0x80.
    if safetensors_io::looks_like_safetensors(bytes) {
        return Some(Format::Safetensors);
    }
    if bytes.first() == Some(&0x80) {
        return Some(Format::TorchLegacy);
    }
    None
}

/// Loads a `.pth`/`.pt` checkpoint or a `.safetensors` file, deciding the
/// format from the file's content.
pub fn load(path: &Path) -> Result<TensorMap, WeightsError> {
    load_bytes(path, &read_file(path)?)
}

/// [`load`] on bytes already in memory; `path` is only named in errors.
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<TensorMap, WeightsError> {
    match sniff_format(bytes) {
        Some(Format::TorchZip) => pth::load_zip_bytes(path, bytes),
        Some(Format::TorchLegacy) => pth::load_legacy_bytes(path, bytes),
        Some(Format::Safetensors) => safetensors_io::load_safetensors_bytes(path, bytes),
        None => Err(WeightsError::UnknownFormat {
            path: path.to_path_buf(),
            found: hex_prefix(bytes, 12),
        }),
    }
}

/// `"80 02 8a 0a ..."` for error messages.
pub(crate) fn hex_prefix(bytes: &[u8], n: usize) -> String {
    let mut s = bytes
        .iter()
        .take(n)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    if bytes.len() > n {
        s.push_str(" ...");
    }
    if bytes.is_empty() {
        s.push_str("empty file");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        let mut st = vec![0x80, 0, 0, 0, 0, 0, 0, 0, b'{'];
        st.resize(200, b' ');
        assert_eq!(sniff_format(&st), Some(Format::Safetensors));
        assert_eq!(
            sniff_format(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."),
            Some(Format::TorchLegacy)
        );
        assert_eq!(sniff_format(b"PK\x03\x04rest"), Some(Format::TorchZip));
        assert_eq!(sniff_format(b""), None);
        assert_eq!(sniff_format(b"{\"a\": 1}"), None);
    }
}
