//! safetensors reading (any real numeric dtype → f32) and atomic f32 writing.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};

use super::{RawTensor, TensorMap, WeightsError, read_file};

/// Header lengths above this are rejected (the safetensors crate uses the same limit).
const MAX_HEADER: u64 = 100_000_000;

/// Whether `bytes` plausibly start a safetensors file: an 8-byte
/// little-endian header length followed by a JSON object.
pub(crate) fn looks_like_safetensors(bytes: &[u8]) -> bool {
    let Some(n) = bytes.get(..8) else {
        return false;
    };
    let mut a = [0u8; 8];
    a.copy_from_slice(n);
    let n = u64::from_le_bytes(a);
    (2..=MAX_HEADER).contains(&n) && bytes.get(8) == Some(&b'{')
}

fn st_err(path: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Checks the 8-byte header length against the file size; returns it.
fn check_header_len(path: &Path, prefix: &[u8], file_len: u64) -> Result<u64, WeightsError> {
    let Some(n) = prefix.get(..8) else {
        return Err(WeightsError::Truncated {
            path: path.to_path_buf(),
            what: "safetensors header length".into(),
            offset: 0,
            needed: 8,
            available: file_len,
        });
    };
    let mut a = [0u8; 8];
    a.copy_from_slice(n);
    let n = u64::from_le_bytes(a);
    if n > MAX_HEADER {
        return Err(st_err(
            path,
            format!("header length {n} exceeds the {MAX_HEADER}-byte limit"),
        ));
    }
    if n > file_len.saturating_sub(8) {
        return Err(WeightsError::Truncated {
            path: path.to_path_buf(),
            what: "safetensors JSON header".into(),
            offset: 8,
            needed: n,
            available: file_len.saturating_sub(8),
        });
    }
    Ok(n)
}

/// Loads a safetensors file, converting F32/F64/F16/BF16/I64/I32/I16/I8/U8/BOOL
/// tensors to f32.
pub fn load_safetensors(path: &Path) -> Result<TensorMap, WeightsError> {
    let bytes = read_file(path)?;
    load_safetensors_bytes(path, &bytes)
}

/// Like [`load_safetensors`] on bytes already in memory; `path` is only used in errors.
pub fn load_safetensors_bytes(path: &Path, bytes: &[u8]) -> Result<TensorMap, WeightsError> {
    let n = check_header_len(path, bytes, bytes.len() as u64)?;
    // Check the data section length before the crate does, to report a truncation clearly.
    let header = bytes.get(8..8 + n as usize).unwrap_or(&[]);
    let json: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| st_err(path, format!("header is not valid JSON: {e}")))?;
    if let Some(obj) = json.as_object() {
        let data_end = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "__metadata__")
            .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        // Every tensor's shape must match its byte range: the crate only says "invalid
        // shape, data type, or offset" without naming the tensor or the claim.
        for (name, v) in obj.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
            let size = match v.get("dtype").and_then(|d| d.as_str()) {
                Some("F64" | "I64" | "U64") => 8u64,
                Some("F32" | "I32" | "U32") => 4,
                Some("F16" | "BF16" | "I16" | "U16") => 2,
                Some("I8" | "U8" | "BOOL") => 1,
                _ => continue,
            };
            let shape: Option<Vec<u64>> = v
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|s| s.iter().map(|d| d.as_u64()).collect());
            let offsets: Option<Vec<u64>> = v
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .and_then(|s| s.iter().map(|d| d.as_u64()).collect());
            let (Some(shape), Some(&[b, e])) = (shape, offsets.as_deref()) else {
                continue;
            };
            let needed = shape
                .iter()
                .try_fold(size, |a, &d| a.checked_mul(d))
                .map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
            if e < b || needed != (e - b).to_string() {
                return Err(WeightsError::BadTensor {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    reason: format!(
                        "shape {shape:?} of {size}-byte values needs {needed} bytes, but its data_offsets [{b}, {e}] hold {}",
                        e.saturating_sub(b)
                    ),
                });
            }
        }
        let available = (bytes.len() as u64).saturating_sub(8 + n);
        if data_end > available {
            return Err(WeightsError::Truncated {
                path: path.to_path_buf(),
                what: "safetensors tensor data".into(),
                offset: 8 + n,
                needed: data_end,
                available,
            });
        }
    }

    let st = SafeTensors::deserialize(bytes).map_err(|e| st_err(path, e.to_string()))?;
    let mut map = TensorMap::new();
    for (name, view) in st.iter() {
        let data =
            decode(view.dtype(), view.data()).ok_or_else(|| WeightsError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
            })?;
        let shape = view.shape().to_vec();
        let t = RawTensor::new(shape.clone(), data).ok_or_else(|| WeightsError::BadTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            reason: format!("data length does not match shape {shape:?}"),
        })?;
        map.insert(name, t);
    }
    Ok(map)
}

fn decode(dtype: Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    use super::pickle::ScalarType as S;
    let st = match dtype {
        Dtype::F32 => S::F32,
        Dtype::F64 => S::F64,
        Dtype::F16 => S::F16,
        Dtype::BF16 => S::BF16,
        Dtype::I64 => S::I64,
        Dtype::I32 => S::I32,
        Dtype::I16 => S::I16,
        Dtype::I8 => S::I8,
        Dtype::U64 => S::U64,
        Dtype::U32 => S::U32,
        Dtype::U16 => S::U16,
        Dtype::U8 => S::U8,
        Dtype::BOOL => S::Bool,
        _ => return None,
    };
    super::pth::decode(st, raw, false)
}

/// Reads only the `__metadata__` map of a safetensors header (empty if absent).
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let mut f =
        std::fs::File::open(path).map_err(|e| WeightsError::io(path, "opening the file", e))?;
    let file_len = f
        .metadata()
        .map_err(|e| WeightsError::io(path, "reading file metadata", e))?
        .len();
    let mut prefix = Vec::with_capacity(8);
    (&mut f)
        .take(8)
        .read_to_end(&mut prefix)
        .map_err(|e| WeightsError::io(path, "reading the header length", e))?;
    let n = check_header_len(path, &prefix, file_len)?;
    let mut header = Vec::with_capacity(n as usize);
    (&mut f)
        .take(n)
        .read_to_end(&mut header)
        .map_err(|e| WeightsError::io(path, "reading the header", e))?;
    if header.len() as u64 != n {
        return Err(WeightsError::Truncated {
            path: path.to_path_buf(),
            what: "safetensors JSON header".into(),
            offset: 8,
            needed: n,
            available: header.len() as u64,
        });
    }
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| st_err(path, format!("header is not valid JSON: {e}")))?;
    let Some(obj) = json.as_object() else {
        return Err(st_err(path, "header is not a JSON object"));
    };
    let mut out = BTreeMap::new();
    match obj.get("__metadata__") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(m)) => {
            for (k, v) in m {
                let v = v.as_str().ok_or_else(|| {
                    st_err(
                        path,
                        format!("__metadata__ value for {k:?} is not a string: {v}"),
                    )
                })?;
                out.insert(k.clone(), v.to_string());
            }
        }
        Some(other) => {
            return Err(st_err(
                path,
                format!("__metadata__ is not an object: {other}"),
            ));
        }
    }
    Ok(out)
}

/// An f32 tensor as a safetensors [`View`]; bytes are produced on demand so
/// only one tensor is duplicated in memory at a time while writing.
struct F32View<'a>(&'a RawTensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Writes `map` as F32 safetensors with `metadata` in `__metadata__`.
/// Atomic, through [`crate::atomic::write_atomic`]: a full disk leaves the previous file intact.
pub fn save_safetensors(
    map: &TensorMap,
    metadata: &BTreeMap<String, String>,
    path: &Path,
) -> Result<(), WeightsError> {
    for (name, t) in map.iter() {
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(t.data.len()) {
            return Err(WeightsError::BadTensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                reason: format!(
                    "shape {:?} does not match {} data values",
                    t.shape,
                    t.data.len()
                ),
            });
        }
    }
    let info: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let info = (!info.is_empty()).then_some(info);
    let views = map.iter().map(|(k, t)| (k, F32View(t)));
    let bytes = safetensors::serialize(views, info).map_err(|e| st_err(path, e.to_string()))?;
    let bytes = canonical_header(bytes).map_err(|e| st_err(path, e))?;
    crate::atomic::write_atomic(path, &bytes)?;
    Ok(())
}

/// The same file with its header's keys in sorted order. The safetensors crate writes the
/// metadata from a `HashMap`, whose order changes from one process to the next; sorted, the same
/// tensors and metadata always give the same bytes (a run's output can be compared by hash).
/// The header stays padded with spaces to a multiple of 8 bytes, as the crate pads it.
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let bad = || "the safetensors crate wrote a header this reader cannot parse".to_string();
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(bad)?;
    let mut top: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("{}: {e}", bad()))?;
    if let Some(m) = top.remove("__metadata__") {
        let sorted: BTreeMap<String, String> =
            serde_json::from_value(m).map_err(|e| format!("{}: {e}", bad()))?;
        top.insert(
            "__metadata__".into(),
            serde_json::to_value(sorted).map_err(|e| e.to_string())?,
        );
    }
    let mut json = serde_json::to_vec(&top).map_err(|e| e.to_string())?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let dir = std::env::temp_dir().join(format!("sfr-st-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        let mut map = TensorMap::new();
        map.insert(
            "w",
            RawTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., -6.5]).unwrap(),
        );
        map.insert("s", RawTensor::new(vec![], vec![42.]).unwrap());
        let meta: BTreeMap<String, String> = [("arch".to_string(), "x".to_string())].into();
        save_safetensors(&map, &meta, &path).unwrap();
        assert_eq!(load_safetensors(&path).unwrap(), map);
        assert_eq!(read_safetensors_metadata(&path).unwrap(), meta);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 5, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                load_safetensors_bytes(&path, &bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let bad = TensorMap::from_iter([(
            "x".to_string(),
            RawTensor {
                shape: vec![3],
                data: vec![1.0],
            },
        )]);
        assert!(save_safetensors(&bad, &meta, &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes() {
        let dir = std::env::temp_dir().join(format!("sfr-st-canon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        let mut map = TensorMap::new();
        for i in 0..6 {
            map.insert(
                format!("t{i}").as_str(),
                RawTensor::new(vec![i + 1], vec![i as f32; i + 1]).unwrap(),
            );
        }
        let meta: BTreeMap<String, String> = (0..12)
            .map(|i| (format!("key{i}"), format!("value \"{i}\"")))
            .collect();
        // Each save builds a fresh HashMap for the crate, with its own hash keys.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..16 {
            save_safetensors(&map, &meta, &path).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            assert_eq!(n % 8, 0, "header padded to 8 bytes");
            seen.insert(bytes);
        }
        assert_eq!(seen.len(), 1, "one file, byte for byte");
        assert_eq!(load_safetensors(&path).unwrap(), map);
        assert_eq!(read_safetensors_metadata(&path).unwrap(), meta);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
