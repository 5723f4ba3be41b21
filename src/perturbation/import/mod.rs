//! Readers for the layouts the published universal perturbations come in: NumPy `.npy`,
//! MATLAB v5 `.mat` and HDF5 `.h5` (as written by h5py), in pure Rust.
//!
//! Every reader returns a [`RawArray`]: the array's logical shape and its values in row-major
//! (C) order, converted to `f32` — the shape and order `numpy.load`, `h5py` and
//! `scipy.io.loadmat` give. Nothing here trusts the file: every length and offset is checked
//! against the file's size before anything is allocated or sliced, and a malformed file is an
//! [`ImportError`] that names the file, what was expected, what was found, and where.

mod hdf5;
mod mat;
mod npy;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use self::hdf5::read_h5;
pub use self::mat::read_mat;
pub use self::npy::read_npy;

/// An n-dimensional array as stored logically, values in row-major (C) order.
#[derive(Debug, Clone, PartialEq)]
pub struct RawArray {
    /// The array's shape: numpy's for `.npy`, h5py's for `.h5`, the MATLAB dimensions for `.mat`.
    pub shape: Vec<usize>,
    /// The values, row-major (last index fastest), `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl RawArray {
    /// The number of elements the shape describes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Why a perturbation file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read at all.
    #[error("{}: cannot read the file: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start the way the format requires.
    #[error("{}: not a {format} file: expected {expected} at byte 0, found {found}", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The format the file was read as.
        format: &'static str,
        /// The signature the format requires.
        expected: String,
        /// What the file has there.
        found: String,
    },
    /// A structure runs past the end of the file (or of a decompressed element).
    #[error(
        "{}: truncated {format} file: {what} at {location} needs {needed} bytes, found only {available}",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The format the file was read as.
        format: &'static str,
        /// The structure being read.
        what: String,
        /// Where it starts.
        location: String,
        /// How many bytes it needs.
        needed: u64,
        /// How many bytes are there.
        available: u64,
    },
    /// A structure has a value the format does not allow.
    #[error(
        "{}: malformed {format} file: {location}: expected {expected}, found {found}",
        path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The format the file was read as.
        format: &'static str,
        /// The structure with the bad value and where it is, e.g. `endian indicator at byte 126`.
        location: String,
        /// What the format allows there.
        expected: String,
        /// What the file has.
        found: String,
    },
    /// A valid file that uses something these readers do not implement.
    #[error(
        "{}: unsupported {format} feature at {location}: found {feature}; supported: {supported}",
        path.display()
    )]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The format the file was read as.
        format: &'static str,
        /// Where the feature is used.
        location: String,
        /// The feature the file uses.
        feature: String,
        /// What is supported instead.
        supported: String,
    },
    /// A MATLAB v7.3 MAT-file, which is an HDF5 file with a MATLAB header.
    #[error(
        "{}: expected a MATLAB v5 MAT-file (the format of `save -v7` and older), found a MATLAB v7.3 \
         MAT-file ({found}); v7.3 files are HDF5 inside: re-save it with `save -v7`, or read its \
         datasets with h5py",
        path.display()
    )]
    MatV73 {
        /// The file.
        path: PathBuf,
        /// What gave it away.
        found: String,
    },
    /// The named array (or any suitable array) is not in the file.
    #[error("{}: expected {wanted}, found {}", path.display(), list_or_none(available))]
    NoSuchArray {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        wanted: String,
        /// What the file has instead.
        available: Vec<String>,
    },
    /// The HDF5 decoder rejected the file.
    #[error("{}: malformed or unsupported HDF5 file while {context}: {detail}", path.display())]
    Hdf5 {
        /// The file.
        path: PathBuf,
        /// What was being read.
        context: String,
        /// The decoder's description (it gives the byte offset where it has one).
        detail: String,
    },
    /// `read_any` does not know the file's extension.
    #[error(
        "{}: cannot tell the format from the extension: expected .npy, .mat, .h5 or .hdf5, found {found}",
        path.display()
    )]
    UnknownExtension {
        /// The file.
        path: PathBuf,
        /// The extension it has.
        found: String,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing suitable".to_string()
    } else {
        format!("only: {}", items.join(", "))
    }
}

/// Read any supported file, choosing the reader by extension (case-insensitive): `.npy`;
/// `.mat` (its first numeric variable); `.h5`/`.hdf5` (dataset `v`, else the root group's only
/// dataset).
pub fn read_any(path: impl AsRef<Path>) -> Result<RawArray, ImportError> {
    let path = path.as_ref();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("npy") => read_npy(path),
        Some("mat") => read_mat(path, None),
        Some("h5") | Some("hdf5") => self::hdf5::read_h5_default(path),
        other => Err(ImportError::UnknownExtension {
            path: path.to_path_buf(),
            found: match other {
                Some(e) => format!(".{e}"),
                None => "no extension".to_string(),
            },
        }),
    }
}

/// [`read_any`] on bytes already in memory: the format is chosen by `path`'s extension, and
/// `path` is named in errors (nothing is read from it).
pub fn read_any_bytes(path: &Path, bytes: &[u8]) -> Result<RawArray, ImportError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("npy") => npy::parse(bytes, path),
        Some("mat") => mat::parse(bytes, path, None),
        Some("h5") | Some("hdf5") => self::hdf5::read_h5_default_bytes(bytes.to_vec(), path),
        other => Err(ImportError::UnknownExtension {
            path: path.to_path_buf(),
            found: match other {
                Some(e) => format!(".{e}"),
                None => "no extension".to_string(),
            },
        }),
    }
}

/// Read a whole file, naming it in the error.
fn read_file(path: &Path) -> Result<Vec<u8>, ImportError> {
    std::fs::read(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A few bytes, printed for an error message.
fn show_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "no bytes (empty)".to_string();
    }
    let mut s = format!("bytes {}", hex::encode(&bytes[..bytes.len().min(16)]));
    if bytes.len() > 16 {
        s.push('…');
    }
    let text: String = bytes
        .iter()
        .take(16)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    let _ = write!(s, " ({text:?})");
    s
}

/// Where a byte buffer came from, for error locations.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// The file itself.
    File,
    /// A zlib-decompressed element whose tag is at this file offset.
    Inflated { at: usize },
}

/// A bounds-checked view of a byte buffer that knows which file it belongs to.
#[derive(Clone, Copy)]
struct Bytes<'a> {
    data: &'a [u8],
    path: &'a Path,
    format: &'static str,
    origin: Origin,
}

impl<'a> Bytes<'a> {
    fn new(data: &'a [u8], path: &'a Path, format: &'static str) -> Self {
        Self {
            data,
            path,
            format,
            origin: Origin::File,
        }
    }

    fn location(&self, offset: usize) -> String {
        match self.origin {
            Origin::File => format!("byte {offset}"),
            Origin::Inflated { at } => {
                format!("byte {offset} of the decompressed element whose tag is at file byte {at}")
            }
        }
    }

    /// `len` bytes at `offset`, or a `Truncated` error naming `what`.
    fn slice(&self, offset: usize, len: usize, what: &str) -> Result<&'a [u8], ImportError> {
        let available = self.data.len().saturating_sub(offset);
        if len > available {
            return Err(ImportError::Truncated {
                path: self.path.to_path_buf(),
                format: self.format,
                what: what.to_string(),
                location: self.location(offset),
                needed: len as u64,
                available: available as u64,
            });
        }
        Ok(&self.data[offset..offset + len])
    }

    fn array<const N: usize>(&self, offset: usize, what: &str) -> Result<[u8; N], ImportError> {
        let s = self.slice(offset, N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16_le(&self, offset: usize, what: &str) -> Result<u16, ImportError> {
        Ok(u16::from_le_bytes(self.array(offset, what)?))
    }

    fn u32_le(&self, offset: usize, what: &str) -> Result<u32, ImportError> {
        Ok(u32::from_le_bytes(self.array(offset, what)?))
    }

    fn malformed(
        &self,
        offset: usize,
        what: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> ImportError {
        ImportError::Malformed {
            path: self.path.to_path_buf(),
            format: self.format,
            location: format!("{what} at {}", self.location(offset)),
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn unsupported(
        &self,
        offset: usize,
        feature: impl Into<String>,
        supported: impl Into<String>,
    ) -> ImportError {
        ImportError::Unsupported {
            path: self.path.to_path_buf(),
            format: self.format,
            location: self.location(offset),
            feature: feature.into(),
            supported: supported.into(),
        }
    }
}

/// A stored element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Scalar {
    fn size(self) -> usize {
        match self {
            Scalar::I8 | Scalar::U8 => 1,
            Scalar::I16 | Scalar::U16 => 2,
            Scalar::I32 | Scalar::U32 | Scalar::F32 => 4,
            Scalar::I64 | Scalar::U64 | Scalar::F64 => 8,
        }
    }
}

/// Decode `bytes` (a whole number of elements) to `f32`, rounding to nearest like numpy's
/// `astype(np.float32)`.
fn decode_scalars(bytes: &[u8], kind: Scalar, big_endian: bool) -> Vec<f32> {
    macro_rules! conv {
        ($t:ty, $n:literal) => {
            bytes
                .chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    let v = if big_endian {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    };
                    v as f32
                })
                .collect()
        };
    }
    match kind {
        Scalar::I8 => bytes.iter().map(|&b| f32::from(b as i8)).collect(),
        Scalar::U8 => bytes.iter().map(|&b| f32::from(b)).collect(),
        Scalar::I16 => conv!(i16, 2),
        Scalar::U16 => conv!(u16, 2),
        Scalar::I32 => conv!(i32, 4),
        Scalar::U32 => conv!(u32, 4),
        Scalar::I64 => conv!(i64, 8),
        Scalar::U64 => conv!(u64, 8),
        Scalar::F32 => conv!(f32, 4),
        Scalar::F64 => conv!(f64, 8),
    }
}

/// The number of elements of `shape`, or `None` on overflow.
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Reorder column-major (Fortran) data of `shape` into row-major (C) order.
fn fortran_to_c(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let n = data.len();
    if shape.len() < 2 || n == 0 {
        return data.to_vec();
    }
    // Column-major strides.
    let mut strides = vec![0usize; shape.len()];
    let mut s = 1usize;
    for (st, &d) in strides.iter_mut().zip(shape) {
        *st = s;
        s = s.saturating_mul(d);
    }
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    let mut off = 0usize;
    for _ in 0..n {
        out.push(data.get(off).copied().unwrap_or(f32::NAN));
        // Advance the row-major odometer (last axis fastest), tracking the column-major offset.
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            off += strides[ax];
            if idx[ax] < shape[ax] {
                break;
            }
            off -= strides[ax] * shape[ax];
            idx[ax] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortran_to_c_matches_transpose() {
        // shape (2, 3), column-major storage of [[0,1,2],[3,4,5]] is 0,3,1,4,2,5.
        let f = [0.0, 3.0, 1.0, 4.0, 2.0, 5.0];
        assert_eq!(
            fortran_to_c(&f, &[2, 3]),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        // shape (2, 2, 2): element (i,j,k) = 4i+2j+k, column-major offset i + 2j + 4k.
        let mut f3 = vec![0.0; 8];
        for i in 0..2 {
            for j in 0..2 {
                for k in 0..2 {
                    f3[i + 2 * j + 4 * k] = (4 * i + 2 * j + k) as f32;
                }
            }
        }
        let c: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(fortran_to_c(&f3, &[2, 2, 2]), c);
    }

    #[test]
    fn unknown_extension() {
        let e = read_any("x.txt").unwrap_err();
        assert!(matches!(e, ImportError::UnknownExtension { .. }), "{e}");
        assert!(e.to_string().contains(".txt"), "{e}");
    }
}
