//! PyTorch `torch.save` checkpoints: the zip format (torch >= 1.6) and the
//! legacy pickle-stream format (torch < 1.6, or
//! `_use_new_zipfile_serialization=False`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use super::pickle::{self, Id, Obj, Pickled, ScalarType, TensorRef};
use super::{Format, RawTensor, TensorMap, WeightsError, hex_prefix, read_file, sniff_format};

/// `torch.serialization.MAGIC_NUMBER` (0x1950a86a20f9469cfc6c) as the
/// little-endian bytes of the pickled int.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// Keys under which training scripts commonly nest the actual state dict.
const WRAPPER_KEYS: [&str; 4] = ["state_dict", "model_state_dict", "model", "net"];

/// Tensors with more elements than the storage span they read (zero
/// strides, e.g. saved `expand()` views) are only accepted up to
/// `max(64 * span, MAX_EXPANDED_NUMEL)` elements, so a bogus size cannot make
/// us allocate unbounded memory.
const MAX_EXPANDED_NUMEL: u64 = 1 << 24;

/// Loads a `torch.save` checkpoint (zip or legacy format, detected from the
/// content) holding a state dict.
pub fn load_pth(path: &Path) -> Result<TensorMap, WeightsError> {
    let bytes = read_file(path)?;
    load_pth_bytes(path, &bytes)
}

/// Like [`load_pth`] on bytes already in memory; `path` is only used in errors.
pub fn load_pth_bytes(path: &Path, bytes: &[u8]) -> Result<TensorMap, WeightsError> {
    match sniff_format(bytes) {
        Some(Format::TorchZip) => load_zip_bytes(path, bytes),
        Some(Format::TorchLegacy) => load_legacy_bytes(path, bytes),
        _ => Err(WeightsError::UnknownFormat {
            path: path.to_path_buf(),
            found: hex_prefix(bytes, 12),
        }),
    }
}

// --------------------------------------------------------------------- zip

fn zip_err(path: &Path, what: impl Into<String>, reason: impl ToString) -> WeightsError {
    WeightsError::Zip {
        path: path.to_path_buf(),
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn read_entry<R: Read + std::io::Seek>(
    path: &Path,
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    file_len: u64,
) -> Result<Vec<u8>, WeightsError> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| zip_err(path, format!("opening entry '{name}'"), e))?;
    let size = f.size();
    let compressed = f.compressed_size();
    // Deflate cannot exceed ~1032:1; anything claiming more is corrupt.
    if size > compressed.saturating_mul(1100).saturating_add(1 << 16) || compressed > file_len {
        return Err(zip_err(
            path,
            format!("entry '{name}'"),
            format!(
                "implausible sizes: {size} bytes uncompressed from {compressed} compressed in a {file_len}-byte file"
            ),
        ));
    }
    let cap = usize::try_from(size.min(file_len.saturating_mul(4))).unwrap_or(0);
    let mut buf = Vec::with_capacity(cap);
    (&mut f)
        .take(size.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| zip_err(path, format!("reading entry '{name}'"), e))?;
    if buf.len() as u64 != size {
        return Err(WeightsError::Truncated {
            path: path.to_path_buf(),
            what: format!("zip entry '{name}'"),
            offset: 0,
            needed: size,
            available: buf.len() as u64,
        });
    }
    Ok(buf)
}

/// Loads the torch >= 1.6 zip format from memory.
pub(crate) fn load_zip_bytes(path: &Path, bytes: &[u8]) -> Result<TensorMap, WeightsError> {
    let file_len = bytes.len() as u64;
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        zip_err(
            path,
            format!("reading the central directory of a {file_len}-byte file; truncated?"),
            e,
        )
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let pkl_name = names
        .iter()
        .filter(|n| *n == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1))
        .min_by_key(|n| n.len())
        .cloned()
        .ok_or_else(|| WeightsError::NotAStateDict {
            path: path.to_path_buf(),
            expected: "a torch zip checkpoint with an '<archive>/data.pkl' entry".into(),
            found: format!(
                "zip entries [{}]",
                names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            ),
        })?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();

    let big_endian = match names.iter().any(|n| *n == format!("{prefix}byteorder")) {
        false => false,
        true => {
            let b = read_entry(path, &mut zip, &format!("{prefix}byteorder"), file_len)?;
            match b.trim_ascii() {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(zip_err(
                        path,
                        format!("entry '{prefix}byteorder'"),
                        format!(
                            "expected 'little' or 'big', found {:?}",
                            String::from_utf8_lossy(other)
                        ),
                    ));
                }
            }
        }
    };

    let pkl = read_entry(path, &mut zip, &pkl_name, file_len)?;
    let pickled = pickle::unpickle(path, &pkl_name, &pkl, 0)?;
    let tensors = extract_state_dict(path, &pickled)?;

    let mut storages: HashMap<String, Cow<[u8]>> = HashMap::new();
    for (_, t) in &tensors {
        let key = &t.storage.key;
        if storages.contains_key(key) {
            continue;
        }
        let entry = format!("{prefix}data/{key}");
        if !names.contains(&entry) {
            return Err(WeightsError::StorageMismatch {
                path: path.to_path_buf(),
                key: key.clone(),
                expected: format!("zip entry '{entry}'"),
                found: "no such entry".into(),
            });
        }
        let data = read_entry(path, &mut zip, &entry, file_len)?;
        let expected = storage_nbytes(path, &t.storage)?;
        if data.len() as u64 != expected {
            return Err(WeightsError::StorageMismatch {
                path: path.to_path_buf(),
                key: key.clone(),
                expected: format!(
                    "{expected} bytes ({} x {})",
                    t.storage.numel,
                    t.storage.dtype.name()
                ),
                found: format!("{} bytes in zip entry '{entry}'", data.len()),
            });
        }
        storages.insert(key.clone(), Cow::Owned(data));
    }
    materialize_all(path, tensors, &storages, big_endian)
}

fn storage_nbytes(path: &Path, s: &pickle::StorageRef) -> Result<u64, WeightsError> {
    s.numel
        .checked_mul(s.dtype.size() as u64)
        .ok_or_else(|| WeightsError::StorageMismatch {
            path: path.to_path_buf(),
            key: s.key.clone(),
            expected: "a representable byte size".into(),
            found: format!("{} elements of {}", s.numel, s.dtype.name()),
        })
}

// ------------------------------------------------------------------ legacy

/// Loads the legacy (pre-1.6) format from memory.
pub(crate) fn load_legacy_bytes(path: &Path, bytes: &[u8]) -> Result<TensorMap, WeightsError> {
    let mut pos = 0usize;
    let next = |ctx: &str, pos: &mut usize| -> Result<Pickled, WeightsError> {
        let rest = bytes.get(*pos..).unwrap_or(&[]);
        let p = pickle::unpickle(path, ctx, rest, *pos as u64)?;
        *pos += p.end;
        Ok(p)
    };

    let magic = next("legacy header pickle #1 (magic number)", &mut pos)?;
    if !matches!(magic.root_obj(), Obj::BigInt(b) if b[..] == LEGACY_MAGIC) {
        return Err(WeightsError::NotAStateDict {
            path: path.to_path_buf(),
            expected:
                "a torch.save file (legacy format starts with magic number 0x1950a86a20f9469cfc6c)"
                    .into(),
            found: format!("a pickle of {}", magic.describe(magic.root)),
        });
    }
    let proto = next("legacy header pickle #2 (protocol version)", &mut pos)?;
    if proto.root_obj() != &Obj::Int(LEGACY_PROTOCOL_VERSION) {
        return Err(WeightsError::NotAStateDict {
            path: path.to_path_buf(),
            expected: format!("legacy torch.save protocol version {LEGACY_PROTOCOL_VERSION}"),
            found: proto.describe(proto.root),
        });
    }
    let sys_info = next("legacy header pickle #3 (sys_info)", &mut pos)?;
    let big_endian = matches!(
        dict_get(&sys_info, sys_info.root, "little_endian").map(|i| sys_info.get(i)),
        Some(Obj::Bool(false) | Obj::Int(0))
    );
    let main = next("legacy main pickle", &mut pos)?;
    let keys_p = next("legacy storage-key list pickle", &mut pos)?;
    let keys: Vec<String> = match keys_p.root_obj() {
        Obj::List(v) | Obj::Tuple(v) => v
            .iter()
            .map(|&i| match keys_p.get(i) {
                Obj::Str(s) => Ok(s.clone()),
                Obj::Int(n) => Ok(n.to_string()),
                _ => Err(WeightsError::NotAStateDict {
                    path: path.to_path_buf(),
                    expected: "a list of storage keys (strings)".into(),
                    found: format!("an element {}", keys_p.describe(i)),
                }),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(WeightsError::NotAStateDict {
                path: path.to_path_buf(),
                expected: "a list of storage keys after the main pickle".into(),
                found: keys_p.describe(keys_p.root),
            });
        }
    };

    // Root storages referenced by the main pickle: key -> (dtype, numel).
    let mut refs: HashMap<&str, (ScalarType, u64)> = HashMap::new();
    for o in &main.objs {
        if let Obj::Storage(s) = o {
            refs.entry(s.key.as_str()).or_insert((s.dtype, s.numel));
        }
    }

    let n_keys = keys.len();
    let mut storages: HashMap<String, Cow<[u8]>> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let Some(&(dtype, numel)) = refs.get(key.as_str()) else {
            return Err(WeightsError::StorageMismatch {
                path: path.to_path_buf(),
                key: key.clone(),
                expected: "a storage referenced by the main pickle".into(),
                found: "a key listed in the storage table but never referenced".into(),
            });
        };
        let available = bytes.len().saturating_sub(pos) as u64;
        let header =
            bytes
                .get(pos..pos.saturating_add(8))
                .ok_or_else(|| WeightsError::Truncated {
                    path: path.to_path_buf(),
                    what: format!(
                        "8-byte element count of storage '{key}' ({} of {n_keys})",
                        i + 1
                    ),
                    offset: pos as u64,
                    needed: 8,
                    available,
                })?;
        let mut count_bytes = [0u8; 8];
        count_bytes.copy_from_slice(header);
        let count = if big_endian {
            u64::from_be_bytes(count_bytes)
        } else {
            u64::from_le_bytes(count_bytes)
        };
        if count != numel {
            return Err(WeightsError::StorageMismatch {
                path: path.to_path_buf(),
                key: key.clone(),
                expected: format!(
                    "{numel} elements of {} (from its persistent id)",
                    dtype.name()
                ),
                found: format!("{count} elements in the storage header at byte offset {pos}"),
            });
        }
        pos += 8;
        let available = bytes.len().saturating_sub(pos) as u64;
        let nbytes = count.saturating_mul(dtype.size() as u64);
        if nbytes > available {
            return Err(WeightsError::Truncated {
                path: path.to_path_buf(),
                what: format!(
                    "data of storage '{key}' ({} of {n_keys}: {count} x {})",
                    i + 1,
                    dtype.name()
                ),
                offset: pos as u64,
                needed: nbytes,
                available,
            });
        }
        let end = pos + nbytes as usize; // nbytes <= available
        let data = bytes.get(pos..end).unwrap_or(&[]);
        storages.insert(key.clone(), Cow::Borrowed(data));
        pos = end;
    }

    let tensors = extract_state_dict(path, &main)?;
    for (name, t) in &tensors {
        if !storages.contains_key(&t.storage.key) {
            return Err(WeightsError::StorageMismatch {
                path: path.to_path_buf(),
                key: t.storage.key.clone(),
                expected: format!("storage data for tensor '{name}' after the main pickle"),
                found: "the key is missing from the storage table".into(),
            });
        }
    }
    materialize_all(path, tensors, &storages, big_endian)
}

// --------------------------------------------------------- state-dict logic

fn dict_get(p: &Pickled, dict: Id, key: &str) -> Option<Id> {
    match p.get(dict) {
        Obj::Dict(entries) => entries
            .iter()
            .rev()
            .find(|(k, _)| p.as_str(*k) == Some(key))
            .map(|&(_, v)| v),
        _ => None,
    }
}

fn find_state_dict(p: &Pickled, id: Id, depth: usize) -> Option<Id> {
    let Obj::Dict(entries) = p.get(id) else {
        return None;
    };
    if entries.is_empty()
        || entries
            .iter()
            .any(|&(_, v)| matches!(p.get(v), Obj::Tensor(_)))
    {
        return Some(id);
    }
    if depth >= 4 {
        return None;
    }
    WRAPPER_KEYS
        .iter()
        .filter_map(|k| dict_get(p, id, k))
        .find_map(|v| find_state_dict(p, v, depth + 1))
}

/// Finds the state dict in the unpickled object and lists its tensors,
/// stripping a `module.` prefix carried by every key.
fn extract_state_dict(path: &Path, p: &Pickled) -> Result<Vec<(String, TensorRef)>, WeightsError> {
    let Some(sd) = find_state_dict(p, p.root, 0) else {
        let found = match p.root_obj() {
            Obj::Dict(entries) => {
                let keys: Vec<String> = entries
                    .iter()
                    .take(12)
                    .map(|&(k, v)| format!("{} -> {}", p.describe(k), p.describe(v)))
                    .collect();
                format!("a dict without tensors: {{{}}}", keys.join(", "))
            }
            _ => p.describe(p.root),
        };
        return Err(WeightsError::NotAStateDict {
            path: path.to_path_buf(),
            expected: format!(
                "a dict of tensors, or a dict holding one under {}",
                WRAPPER_KEYS.map(|k| format!("'{k}'")).join("/")
            ),
            found,
        });
    };
    let Obj::Dict(entries) = p.get(sd) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(String, TensorRef)> = entries
        .iter()
        .filter_map(|&(k, v)| match (p.get(k), p.get(v)) {
            (Obj::Str(name), Obj::Tensor(t)) => Some((name.clone(), (**t).clone())),
            _ => None, // non-tensor leaves (ints, strings, nested config) are skipped
        })
        .collect();
    if !out.is_empty() && out.iter().all(|(k, _)| k.starts_with("module.")) {
        for (k, _) in &mut out {
            k.replace_range(.."module.".len(), "");
        }
    }
    Ok(out)
}

// ------------------------------------------------------------ tensor data

fn materialize_all(
    path: &Path,
    tensors: Vec<(String, TensorRef)>,
    storages: &HashMap<String, Cow<[u8]>>,
    big_endian: bool,
) -> Result<TensorMap, WeightsError> {
    let mut map = TensorMap::new();
    for (name, t) in tensors {
        let bytes = storages
            .get(&t.storage.key)
            .map(|c| c.as_ref())
            .unwrap_or(&[]);
        let raw = materialize(path, &name, &t, bytes, big_endian)?;
        map.insert(name, raw);
    }
    Ok(map)
}

/// Copies the (possibly strided) view `t` of `storage` into a contiguous
/// row-major f32 tensor.
fn materialize(
    path: &Path,
    name: &str,
    t: &TensorRef,
    storage: &[u8],
    big_endian: bool,
) -> Result<RawTensor, WeightsError> {
    let bad = |reason: String| WeightsError::BadTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    let es = t.dtype.size() as u64;
    // Storage extent in elements of the tensor's dtype.
    let (base, limit) = match &t.storage.view {
        None => (0u64, storage.len() as u64 / es),
        Some(v) => (v.offset, v.offset.saturating_add(v.numel)),
    };
    if limit.saturating_mul(es) > storage.len() as u64 {
        return Err(bad(format!(
            "storage view [{base}, {limit}) exceeds the {}-byte storage '{}'",
            storage.len(),
            t.storage.key
        )));
    }
    let start = base
        .checked_add(t.offset)
        .ok_or_else(|| bad("storage offset overflows".into()))?;
    let numel = t
        .size
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("size {:?} overflows", t.size)))?;
    let shape: Vec<usize> = t
        .size
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| bad(format!("size {:?} too large", t.size)))?;
    if numel == 0 {
        if start > limit {
            return Err(bad(format!(
                "storage offset {start} beyond storage end {limit}"
            )));
        }
        return Ok(RawTensor {
            shape,
            data: Vec::new(),
        });
    }
    // Highest element touched.
    let mut last = start;
    for (&d, &s) in t.size.iter().zip(&t.stride) {
        last = (d - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or_else(|| bad("stride arithmetic overflows".into()))?;
    }
    if last >= limit {
        return Err(WeightsError::StorageMismatch {
            path: path.to_path_buf(),
            key: t.storage.key.clone(),
            expected: format!(
                "at least {} elements of {} for tensor '{name}' (offset {}, size {:?}, stride {:?})",
                last + 1,
                t.dtype.name(),
                t.offset,
                t.size,
                t.stride
            ),
            found: format!("{limit} elements"),
        });
    }
    let span = last - start + 1;
    if numel > span && numel > span.saturating_mul(64).max(MAX_EXPANDED_NUMEL) {
        return Err(bad(format!(
            "{numel} elements claimed over only {span} stored (zero strides); refusing to expand"
        )));
    }
    // Decode the touched range once, then gather (start/span <= limit <= len/es).
    let lo = (start * es) as usize;
    let hi = ((last + 1) * es) as usize;
    let raw = storage
        .get(lo..hi)
        .ok_or_else(|| bad("storage range out of bounds".into()))?;
    let dense = decode(t.dtype, raw, big_endian).ok_or_else(|| WeightsError::UnsupportedDtype {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: t.dtype.name().to_string(),
    })?;

    let contiguous = {
        let mut expect = 1u64;
        let mut ok = true;
        for (&d, &s) in t.size.iter().zip(&t.stride).rev() {
            if d != 1 && s != expect {
                ok = false;
                break;
            }
            expect = expect.saturating_mul(d);
        }
        ok
    };
    if contiguous && span == numel {
        return Ok(RawTensor { shape, data: dense });
    }

    // Strides of size-1 dims never move the offset (and may be arbitrary);
    // every other stride is <= span, so the odometer below cannot overflow.
    let stride: Vec<usize> = t
        .size
        .iter()
        .zip(&t.stride)
        .map(|(&d, &s)| if d <= 1 { 0 } else { s as usize })
        .collect();
    let mut data = Vec::with_capacity(numel as usize);
    let mut idx = vec![0usize; shape.len()];
    let mut off = 0usize;
    for _ in 0..numel {
        data.push(dense.get(off).copied().unwrap_or(0.0));
        // Advance the odometer (last dimension fastest).
        for dim in (0..shape.len()).rev() {
            idx[dim] += 1;
            off += stride[dim];
            if idx[dim] < shape[dim] {
                break;
            }
            off -= stride[dim] * shape[dim];
            idx[dim] = 0;
        }
    }
    Ok(RawTensor { shape, data })
}

/// Converts packed elements to f32; `None` for dtypes without a conversion.
pub(crate) fn decode(dtype: ScalarType, raw: &[u8], big_endian: bool) -> Option<Vec<f32>> {
    fn conv<const N: usize>(raw: &[u8], be: bool, f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        raw.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                if be {
                    a.reverse();
                }
                f(a)
            })
            .collect()
    }
    let be = big_endian;
    Some(match dtype {
        ScalarType::F32 => conv::<4>(raw, be, f32::from_le_bytes),
        ScalarType::F64 => conv::<8>(raw, be, |a| f64::from_le_bytes(a) as f32),
        ScalarType::F16 => conv::<2>(raw, be, |a| half::f16::from_le_bytes(a).to_f32()),
        ScalarType::BF16 => conv::<2>(raw, be, |a| half::bf16::from_le_bytes(a).to_f32()),
        ScalarType::I64 => conv::<8>(raw, be, |a| i64::from_le_bytes(a) as f32),
        ScalarType::I32 => conv::<4>(raw, be, |a| i32::from_le_bytes(a) as f32),
        ScalarType::I16 => conv::<2>(raw, be, |a| f32::from(i16::from_le_bytes(a))),
        ScalarType::U64 => conv::<8>(raw, be, |a| u64::from_le_bytes(a) as f32),
        ScalarType::U32 => conv::<4>(raw, be, |a| u32::from_le_bytes(a) as f32),
        ScalarType::U16 => conv::<2>(raw, be, |a| f32::from(u16::from_le_bytes(a))),
        ScalarType::I8 => raw.iter().map(|&b| f32::from(b as i8)).collect(),
        ScalarType::U8 => raw.iter().map(|&b| f32::from(b)).collect(),
        ScalarType::Bool => raw
            .iter()
            .map(|&b| if b != 0 { 1.0 } else { 0.0 })
            .collect(),
        ScalarType::Other(..) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::pickle::StorageRef;

    fn tref(size: Vec<u64>, stride: Vec<u64>, offset: u64) -> TensorRef {
        TensorRef {
            storage: StorageRef {
                key: "0".into(),
                dtype: ScalarType::F32,
                numel: 12,
                location: "cpu".into(),
                view: None,
            },
            dtype: ScalarType::F32,
            offset,
            size,
            stride,
        }
    }

    fn storage() -> Vec<u8> {
        (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn strided_views() {
        let p = Path::new("x");
        let s = storage();
        // 3x4 contiguous
        let r = materialize(p, "t", &tref(vec![3, 4], vec![4, 1], 0), &s, false).unwrap();
        assert_eq!(r.data, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        // transpose -> 4x3
        let r = materialize(p, "t", &tref(vec![4, 3], vec![1, 4], 0), &s, false).unwrap();
        assert_eq!(
            r.data,
            vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
        );
        // slice rows 1.. with offset
        let r = materialize(p, "t", &tref(vec![2, 2], vec![4, 1], 5), &s, false).unwrap();
        assert_eq!(r.data, vec![5., 6., 9., 10.]);
        // scalar
        let r = materialize(p, "t", &tref(vec![], vec![], 7), &s, false).unwrap();
        assert_eq!((r.shape.len(), r.data), (0, vec![7.]));
        // expanded (stride 0)
        let r = materialize(p, "t", &tref(vec![2, 3], vec![0, 1], 0), &s, false).unwrap();
        assert_eq!(r.data, vec![0., 1., 2., 0., 1., 2.]);
        // size-1 dim with an absurd stride (torch allows any stride there)
        let r = materialize(
            p,
            "t",
            &tref(vec![3, 1, 2], vec![4, u64::MAX, 1], 1),
            &s,
            false,
        )
        .unwrap();
        assert_eq!(r.data, vec![1., 2., 5., 6., 9., 10.]);
        // out of bounds
        assert!(materialize(p, "t", &tref(vec![4, 4], vec![4, 1], 0), &s, false).is_err());
        assert!(
            materialize(
                p,
                "t",
                &tref(vec![u64::MAX, 2], vec![u64::MAX, 1], 0),
                &s,
                false
            )
            .is_err()
        );
        assert!(
            materialize(
                p,
                "t",
                &tref(vec![1 << 40, 1 << 20], vec![0, 0], 0),
                &s,
                false
            )
            .is_err()
        );
    }
}
