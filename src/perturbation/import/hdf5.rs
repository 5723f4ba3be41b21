//! HDF5 files, decoded in pure Rust by the `hdf5-reader` crate (no libhdf5).
//!
//! The published perturbations were written by h5py: superblock version 0, a symbol-table root
//! group (v1 B-tree and local heap), version-1 object headers, and one contiguous, uncompressed
//! IEEE float dataset `v`. The decoder also handles newer superblocks, link-message groups,
//! compact and chunked (deflate/shuffle) layouts; this module adds the file's name, what was
//! being read, and the conversion to `f32` in C order.

use std::path::Path;

use hdf5_reader::{Datatype, Hdf5File, error::Error as H5Error};

use super::{ImportError, RawArray};

const FORMAT: &str = "HDF5";
const SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// Read dataset `dataset` (a path such as `v` or `group/v`) of an HDF5 file: float (32/64-bit)
/// or integer elements of either byte order. Returns h5py's shape, C order, as `f32`.
pub fn read_h5(path: impl AsRef<Path>, dataset: &str) -> Result<RawArray, ImportError> {
    let path = path.as_ref();
    guarded(path, || {
        let (file, len) = open(path)?;
        read_dataset(&file, len, path, dataset)
    })
}

/// Run the decoder, turning a panic inside it into an error that names the file. hdf5-reader
/// 0.12.1 multiplies a layout message's dimensions without an overflow check (found by fuzzing:
/// a 1132-byte file with dimensions of 2³² − 1), which panics in builds with overflow checks;
/// a decoder of hostile files must not take the process down with it.
fn guarded(
    path: &Path,
    read: impl FnOnce() -> Result<RawArray, ImportError>,
) -> Result<RawArray, ImportError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string());
        Err(ImportError::Hdf5 {
            path: path.to_path_buf(),
            context: "decoding".to_string(),
            detail: format!("the HDF5 decoder (hdf5-reader) failed: {why}"),
        })
    })
}

/// `read_any`'s choice: dataset `v`, else the root group's only dataset.
pub(super) fn read_h5_default(path: &Path) -> Result<RawArray, ImportError> {
    read_h5_default_bytes(super::read_file(path)?, path)
}

/// [`read_h5_default`] on bytes in memory; `path` is named in errors.
pub(super) fn read_h5_default_bytes(bytes: Vec<u8>, path: &Path) -> Result<RawArray, ImportError> {
    guarded(path, || read_default(bytes, path))
}

fn read_default(bytes: Vec<u8>, path: &Path) -> Result<RawArray, ImportError> {
    let (file, len) = open_bytes(bytes, path)?;
    let (groups, names) = members(&file, path)?;
    let name = if names.iter().any(|n| n == "v") {
        "v".to_string()
    } else if let [only] = names.as_slice() {
        only.clone()
    } else {
        return Err(ImportError::NoSuchArray {
            path: path.to_path_buf(),
            wanted: "a dataset named \"v\" or a root group holding exactly one dataset".to_string(),
            available: names
                .into_iter()
                .chain(groups.into_iter().map(|g| format!("{g}/ (group)")))
                .collect(),
        });
    };
    read_dataset(&file, len, path, &name)
}

/// The file, and its length in bytes.
fn open(path: &Path) -> Result<(Hdf5File, u64), ImportError> {
    open_bytes(super::read_file(path)?, path)
}

fn open_bytes(bytes: Vec<u8>, path: &Path) -> Result<(Hdf5File, u64), ImportError> {
    let len = bytes.len() as u64;
    // The superblock is at 0 or, after a user block, at 512, 1024, 2048, …
    let found = std::iter::successors(Some(0usize), |&o| {
        if o == 0 { Some(512) } else { o.checked_mul(2) }
    })
    .take_while(|&o| o + SIGNATURE.len() <= bytes.len())
    .any(|o| &bytes[o..o + SIGNATURE.len()] == SIGNATURE);
    if !found {
        if !bytes.is_empty() && bytes.len() < SIGNATURE.len() && SIGNATURE.starts_with(&bytes) {
            // A prefix of the signature: the file was cut short.
            return Err(ImportError::Truncated {
                path: path.to_path_buf(),
                format: FORMAT,
                what: "signature".to_string(),
                location: "byte 0".to_string(),
                needed: SIGNATURE.len() as u64,
                available: bytes.len() as u64,
            });
        }
        return Err(ImportError::BadMagic {
            path: path.to_path_buf(),
            format: FORMAT,
            expected:
                "the signature \\x89HDF\\r\\n\\x1a\\n (or after a user block at 512, 1024, …)"
                    .to_string(),
            found: super::show_bytes(&bytes[..bytes.len().min(16)]),
        });
    }
    Hdf5File::from_vec(bytes)
        .map(|f| (f, len))
        .map_err(|e| h5_error(path, "opening the superblock", e))
}

fn h5_error(path: &Path, context: &str, e: H5Error) -> ImportError {
    ImportError::Hdf5 {
        path: path.to_path_buf(),
        context: context.to_string(),
        detail: e.to_string(),
    }
}

/// The names of the root group's datasets (and its groups, with a trailing `/`).
fn members(file: &Hdf5File, path: &Path) -> Result<(Vec<String>, Vec<String>), ImportError> {
    let root = file
        .root_group()
        .map_err(|e| h5_error(path, "reading the root group", e))?;
    let (groups, datasets) = root
        .member_names()
        .map_err(|e| h5_error(path, "listing the root group", e))?;
    Ok((groups, datasets))
}

/// The most bytes a dataset may decode to per byte of file: deflate's maximum ratio is about
/// 1032:1. A dataset whose chunks were never written reads as its fill value, so a 1 KiB file
/// can declare 400 GB; the decoder would allocate all of it.
const MAX_EXPANSION: u64 = 1100;

fn read_dataset(
    file: &Hdf5File,
    file_len: u64,
    path: &Path,
    name: &str,
) -> Result<RawArray, ImportError> {
    let context = format!("reading dataset {name:?}");
    let ds = match file.dataset(name) {
        Ok(ds) => ds,
        Err(e)
            if matches!(
                root_cause(&e),
                H5Error::DatasetNotFound(_) | H5Error::GroupNotFound(_)
            ) =>
        {
            let (groups, datasets) = members(file, path)?;
            let mut available: Vec<String> = datasets;
            available.extend(groups.into_iter().map(|g| format!("{g}/ (group)")));
            return Err(ImportError::NoSuchArray {
                path: path.to_path_buf(),
                wanted: format!("a dataset named {name:?}"),
                available,
            });
        }
        Err(e) => return Err(h5_error(path, &context, e)),
    };
    let shape = ds
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| ImportError::Hdf5 {
            path: path.to_path_buf(),
            context: context.clone(),
            detail: format!("dimensions {:?} do not fit in memory", ds.shape()),
        })?;
    let count = super::element_count(&shape).ok_or_else(|| ImportError::Hdf5 {
        path: path.to_path_buf(),
        context: context.clone(),
        detail: format!("dimensions {shape:?} do not fit in memory"),
    })?;
    let esize = match ds.dtype() {
        Datatype::FloatingPoint { size, .. } | Datatype::FixedPoint { size, .. } => *size as u64,
        _ => 1,
    };
    let declared = (count as u64).saturating_mul(esize);
    if declared > file_len.saturating_mul(MAX_EXPANSION) {
        return Err(ImportError::Hdf5 {
            path: path.to_path_buf(),
            context,
            detail: format!(
                "dataset {name:?} declares shape {shape:?} of {esize}-byte values \
                 ({declared} bytes), more than a {file_len}-byte file can hold even compressed \
                 {MAX_EXPANSION}:1; refused before allocating"
            ),
        });
    }
    let err = |e| h5_error(path, &context, e);
    macro_rules! read_as {
        ($t:ty) => {
            ds.read_array::<$t>()
                .map_err(err)?
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<f32>>()
        };
    }
    let data: Vec<f32> = match ds.dtype().clone() {
        Datatype::FloatingPoint { size: 4, .. } => read_as!(f32),
        Datatype::FloatingPoint { size: 8, .. } => read_as!(f64),
        Datatype::FixedPoint { size, signed, .. } => match (size, signed) {
            (1, true) => read_as!(i8),
            (1, false) => read_as!(u8),
            (2, true) => read_as!(i16),
            (2, false) => read_as!(u16),
            (4, true) => read_as!(i32),
            (4, false) => read_as!(u32),
            (8, true) => read_as!(i64),
            (8, false) => read_as!(u64),
            _ => return Err(unsupported_type(path, name, ds.dtype())),
        },
        other => return Err(unsupported_type(path, name, &other)),
    };
    if data.len() != count {
        return Err(ImportError::Hdf5 {
            path: path.to_path_buf(),
            context,
            detail: format!(
                "expected {count} elements for shape {shape:?}, decoded {}",
                data.len()
            ),
        });
    }
    Ok(RawArray { shape, data })
}

/// The error under any object-path context wrappers.
fn root_cause(mut e: &H5Error) -> &H5Error {
    while let H5Error::Context { source, .. } = e {
        e = source;
    }
    e
}

fn unsupported_type(path: &Path, name: &str, dtype: &Datatype) -> ImportError {
    ImportError::Unsupported {
        path: path.to_path_buf(),
        format: FORMAT,
        location: format!("dataset {name:?}"),
        feature: format!("element type {dtype:?}"),
        supported: "IEEE floats of 32 or 64 bits and integers of 8 to 64 bits".to_string(),
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    #[test]
    fn a_panic_in_the_decoder_is_an_error_naming_the_file() {
        let path = Path::new("bad.h5");
        let e = guarded(path, || panic!("attempt to multiply with overflow")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("bad.h5") && s.contains("attempt to multiply with overflow"),
            "{s}"
        );
        let ok = guarded(path, || {
            Ok(RawArray {
                shape: vec![1],
                data: vec![2.0],
            })
        });
        assert_eq!(ok.unwrap().data, vec![2.0]);
    }
}
