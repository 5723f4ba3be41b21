//! NumPy `.npy` files, format versions 1.0, 2.0 and 3.0, read with the `npyz` crate.
//!
//! Layout: the magic `\x93NUMPY`, a major and minor version byte, the header length (u16 for
//! v1, u32 for v2/v3, little-endian), a header that is a Python dict literal with `descr`,
//! `fortran_order` and `shape`, then the raw data. npyz parses the header and decodes the
//! elements; this file checks every length against the file before npyz allocates anything,
//! and turns the array into `f32` in C order.

use std::path::Path;

use npyz::{DType, NpyFile, NpyHeader, Order, TypeChar};

use super::{Bytes, ImportError, RawArray};

const FORMAT: &str = "NumPy .npy";
const MAGIC: &[u8; 6] = b"\x93NUMPY";
const SUPPORTED: &str =
    "float '<f2'/'<f4'/'<f8', signed/unsigned integers of 1–8 bytes and bool, either byte order";

/// The deepest header nesting read: numpy's plain headers nest 2 deep, structured dtypes a few
/// more (those are refused after parsing anyway).
const MAX_NESTING: usize = 8;

/// The deepest nesting of `(`, `[` and `{` in `text`, outside quoted strings.
fn nesting(text: &[u8]) -> usize {
    let (mut depth, mut max, mut quote) = (0usize, 0usize, None);
    for &c in text {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some(c),
            (None, b'(' | b'[' | b'{') => {
                depth += 1;
                max = max.max(depth);
            }
            (None, b')' | b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Read a `.npy` file: float (`f2`/`f4`/`f8`), integer or bool elements of either byte order,
/// C or Fortran order; returns numpy's shape with the data in C order, as `f32`.
pub fn read_npy(path: impl AsRef<Path>) -> Result<RawArray, ImportError> {
    let path = path.as_ref();
    let bytes = super::read_file(path)?;
    parse(&bytes, path)
}

pub(super) fn parse(bytes: &[u8], path: &Path) -> Result<RawArray, ImportError> {
    let b = Bytes::new(bytes, path, FORMAT);
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(ImportError::BadMagic {
            path: path.to_path_buf(),
            format: FORMAT,
            expected: "the magic \\x93NUMPY".to_string(),
            found: super::show_bytes(&bytes[..bytes.len().min(16)]),
        });
    }
    let [major, minor] = b.array::<2>(6, "format version")?;
    let (header_len, header_start) = match (major, minor) {
        (1, 0) => (usize::from(b.u16_le(8, "v1 header length")?), 10),
        (2 | 3, 0) => (b.u32_le(8, "v2/v3 header length")? as usize, 12),
        _ => {
            return Err(b.unsupported(
                6,
                format!("format version {major}.{minor}"),
                "versions 1.0, 2.0 and 3.0",
            ));
        }
    };
    // The whole header is in the file before npyz reads (and allocates) it.
    let text = b.slice(header_start, header_len, "header dict")?;
    // npyz's parser of the header's Python literal takes time exponential in bracket nesting
    // (a 276-byte header nesting 60 deep ran for minutes: found by fuzzing); numpy writes a
    // plain array's header two levels deep (the dict and the shape tuple).
    let depth = nesting(text);
    if depth > MAX_NESTING {
        return Err(b.malformed(
            header_start,
            "header dict",
            "a dict literal with 'descr', 'fortran_order' and 'shape'",
            format!(
                "brackets nested {depth} levels deep (numpy writes 2; at most {MAX_NESTING} are read)"
            ),
        ));
    }
    let data_start = header_start + header_len;
    let header = NpyHeader::from_reader(&bytes[..data_start]).map_err(|e| {
        b.malformed(
            header_start,
            "header dict",
            "a dict literal with 'descr', 'fortran_order' and 'shape'",
            e.to_string(),
        )
    })?;
    let ts = match header.dtype() {
        DType::Plain(ts) => ts,
        other => {
            return Err(b.unsupported(
                header_start,
                format!("a structured dtype (descr {})", other.descr()),
                "plain numeric dtypes such as '<f4', '<f8', '<f2', '<i4', '|u1', '|b1'",
            ));
        }
    };
    let descr = ts.to_string();
    let size = ts.size_field() as usize;
    let supported = match ts.type_char() {
        TypeChar::Float => matches!(size, 2 | 4 | 8),
        TypeChar::Int | TypeChar::Uint => matches!(size, 1 | 2 | 4 | 8),
        TypeChar::Bool => size == 1,
        _ => false,
    };
    if !supported {
        return Err(b.unsupported(header_start, format!("dtype descr '{descr}'"), SUPPORTED));
    }
    let shape: Vec<usize> = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            b.malformed(
                header_start,
                "header 'shape'",
                "dimensions that fit in memory",
                format!("{:?}", header.shape()),
            )
        })?;
    let count = super::element_count(&shape).ok_or_else(|| {
        b.malformed(
            header_start,
            "header 'shape'",
            "an element count that fits in memory",
            format!("{shape:?}"),
        )
    })?;
    let needed = count.checked_mul(size).ok_or_else(|| {
        b.malformed(
            header_start,
            "header 'shape'",
            "a byte size that fits in memory",
            format!("{shape:?} of {descr}"),
        )
    })?;
    // The data is all there (and nothing more) before npyz decodes it.
    let raw = b.slice(
        data_start,
        needed,
        &format!("data of shape {shape:?} and dtype '{descr}'"),
    )?;
    let extra = bytes.len() - data_start - needed;
    if extra != 0 {
        return Err(b.malformed(
            data_start + needed,
            "end of the data",
            format!(
                "the file to end after {needed} bytes of data (shape {shape:?}, dtype '{descr}')"
            ),
            format!("{extra} more bytes"),
        ));
    }
    let fortran = header.order() == Order::Fortran;
    let file = NpyFile::with_header(header, raw);
    let decoded: std::io::Result<Vec<f32>> = match (ts.type_char(), size) {
        (TypeChar::Float, 2) => file
            .into_vec::<half::f16>()
            .map(|v| v.into_iter().map(f32::from).collect()),
        (TypeChar::Float, 4) => file.into_vec::<f32>(),
        (TypeChar::Float, 8) => floats(file.into_vec::<f64>()),
        (TypeChar::Int, 1) => floats(file.into_vec::<i8>()),
        (TypeChar::Int, 2) => floats(file.into_vec::<i16>()),
        (TypeChar::Int, 4) => floats(file.into_vec::<i32>()),
        (TypeChar::Int, 8) => floats(file.into_vec::<i64>()),
        (TypeChar::Uint, 1) => floats(file.into_vec::<u8>()),
        (TypeChar::Uint, 2) => floats(file.into_vec::<u16>()),
        (TypeChar::Uint, 4) => floats(file.into_vec::<u32>()),
        (TypeChar::Uint, 8) => floats(file.into_vec::<u64>()),
        _ => floats(file.into_vec::<bool>()),
    };
    let values = decoded.map_err(|e| {
        b.malformed(
            data_start,
            &format!("data of shape {shape:?} and dtype '{descr}'"),
            "values of that dtype",
            e.to_string(),
        )
    })?;
    let data = if fortran {
        // Fortran order stores the first axis fastest.
        super::fortran_to_c(&values, &shape)
    } else {
        values
    };
    Ok(RawArray { shape, data })
}

/// Any element type to `f32`, as numpy's `astype(np.float32)` does (round to nearest).
trait ToF32 {
    fn to_f32(self) -> f32;
}
macro_rules! to_f32 {
    ($($t:ty),*) => {$(impl ToF32 for $t { fn to_f32(self) -> f32 { self as f32 } })*};
}
to_f32!(f64, i8, i16, i32, i64, u8, u16, u32, u64);
impl ToF32 for bool {
    fn to_f32(self) -> f32 {
        f32::from(u8::from(self))
    }
}

fn floats<T: ToF32>(v: std::io::Result<Vec<T>>) -> std::io::Result<Vec<f32>> {
    v.map(|v| v.into_iter().map(ToF32::to_f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_headers() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }          \n";
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let a = parse(&npy(h, &data), Path::new("t.npy")).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

        // Double quotes, Fortran order, big-endian f8.
        let h = "{\"descr\": \">f8\", \"fortran_order\": True, \"shape\": (2, 3)}\n";
        let data: Vec<u8> = [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let a = parse(&npy(h, &data), Path::new("t.npy")).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

        let h = "{'descr': '|u1', 'fortran_order': False, 'shape': (), }\n";
        let a = parse(&npy(h, &[7]), Path::new("t.npy")).unwrap();
        assert_eq!((a.shape.len(), a.data), (0, vec![7.0]));

        // Half floats: 1, -2, the largest, the smallest subnormal.
        let h = "{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }\n";
        let data: Vec<u8> = [0x3c00u16, 0xc000, 0x7bff, 0x0001]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse(&npy(h, &data), Path::new("t.npy")).unwrap();
        assert_eq!(a.data, vec![1.0, -2.0, 65504.0, 2f32.powi(-24)]);
    }

    #[test]
    fn rejects_bad_headers() {
        for (h, needle) in [
            (
                "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
                "'<c8'",
            ),
            ("{'descr': '<f4', 'shape': (1,), }", "fortran_order"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), ",
                "header dict",
            ),
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
                "structured",
            ),
            (
                "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,)}",
                "header dict",
            ),
        ] {
            let e = parse(&npy(h, &[0; 4]), Path::new("t.npy")).unwrap_err();
            assert!(e.to_string().contains(needle), "{h}: {e}");
            assert!(e.to_string().starts_with("t.npy: "), "{e}");
        }
        // Data shorter and longer than the shape says.
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        let e = parse(&npy(h, &[0; 7]), Path::new("t.npy")).unwrap_err();
        assert!(
            matches!(
                e,
                ImportError::Truncated {
                    needed: 8,
                    available: 7,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(&npy(h, &[0; 9]), Path::new("t.npy")).unwrap_err();
        assert!(matches!(e, ImportError::Malformed { .. }), "{e}");
    }
}
