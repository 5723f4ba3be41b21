//! MATLAB v5 MAT-files (`save -v6`/`-v7`): a 128-byte header, then data elements, each an
//! `miMATRIX` or an `miCOMPRESSED` (zlib) wrapping one. Numeric arrays are stored column-major;
//! they are returned in C order with the MATLAB dimensions, as `scipy.io.loadmat` returns them.
//!
//! Why our own reader and not the `matfile` crate (0.5): matfile reads all six published
//! `.mat` files in `../shared/attacks/lts4`, but not safely or clearly enough for files from
//! strangers: it decompresses `miCOMPRESSED` elements without a bound (`read_to_end`: a zlib
//! bomb is unbounded memory), multiplies the dimensions in `i32` (`product::<i32>()` overflows
//! on a 316228×316228 claim: a panic with debug assertions, a wrong count without), `unwrap`s
//! and `panic!`s on sparse arrays, prints to stderr from the library, reports every failure as
//! nom's `ErrorKind::Tag` with no offset, and silently drops char/cell/struct variables, so it
//! cannot say "`note` is a char array" (the importer tests need that: `Unsupported`, not
//! `NoSuchArray`).

use std::path::Path;

use flate2::{Decompress, FlushDecompress, Status};

use super::{Bytes, ImportError, Origin, RawArray, Scalar};

const FORMAT: &str = "MATLAB v5 MAT";
const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

const MI_INT8: u32 = 1;
const MI_UINT32: u32 = 6;
const MI_INT32: u32 = 5;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

const MX_COMPLEX: u32 = 0x0800;
const MX_LOGICAL: u32 = 0x0200;

/// Read a numeric variable from a MATLAB v5 MAT-file: `var` by name, or with `None` the first
/// real, non-logical numeric array (double, single or an integer class). Returns the MATLAB
/// dimensions and the values in C order, as `f32`.
pub fn read_mat(path: impl AsRef<Path>, var: Option<&str>) -> Result<RawArray, ImportError> {
    let path = path.as_ref();
    let bytes = super::read_file(path)?;
    parse(&bytes, path, var)
}

pub(super) fn parse(bytes: &[u8], path: &Path, var: Option<&str>) -> Result<RawArray, ImportError> {
    let b = Bytes::new(bytes, path, FORMAT);
    let text = &bytes[..bytes.len().min(116)];
    if text.starts_with(b"MATLAB 7.3") {
        return Err(ImportError::MatV73 {
            path: path.to_path_buf(),
            found: "its header text says 'MATLAB 7.3 MAT-file'".to_string(),
        });
    }
    if bytes.len() >= 520 && &bytes[512..520] == HDF5_SIGNATURE {
        return Err(ImportError::MatV73 {
            path: path.to_path_buf(),
            found: "an HDF5 signature at byte 512".to_string(),
        });
    }
    if !text.starts_with(b"MATLAB") {
        return Err(ImportError::BadMagic {
            path: path.to_path_buf(),
            format: FORMAT,
            expected: "header text starting 'MATLAB 5.0 MAT-file' (MAT v4 files are not supported)"
                .to_string(),
            found: super::show_bytes(text),
        });
    }
    let endian = b.array::<2>(126, "header endian indicator")?;
    match &endian {
        b"IM" => {}
        b"MI" => {
            return Err(b.unsupported(
                126,
                "a big-endian MAT-file (endian indicator 'MI')",
                "little-endian files (indicator 'IM')",
            ));
        }
        _ => {
            return Err(b.malformed(
                126,
                "header endian indicator",
                "'IM' or 'MI'",
                super::show_bytes(&endian),
            ));
        }
    }
    let version = b.u16_le(124, "header version")?;
    if version == 0x0200 {
        return Err(ImportError::MatV73 {
            path: path.to_path_buf(),
            found: "header version 0x0200".to_string(),
        });
    }
    if version != 0x0100 {
        return Err(b.unsupported(
            124,
            format!("header version {version:#06x}"),
            "version 0x0100 (MAT v5/v6/v7)",
        ));
    }

    let mut seen = Vec::new();
    let mut pos = 128usize;
    while pos < bytes.len() {
        let tag = Tag::read(&b, pos, "data element tag")?;
        let payload = b.slice(tag.data_at, tag.nbytes, "data element")?;
        let next = if tag.small {
            pos + 8
        } else if tag.kind == MI_COMPRESSED {
            tag.data_at + tag.nbytes
        } else {
            // Uncompressed elements are padded to 8 bytes (the last one may omit its padding).
            (tag.data_at + tag.nbytes.next_multiple_of(8)).min(bytes.len())
        };
        let found = match tag.kind {
            MI_COMPRESSED => {
                let inflated = inflate(&b, tag.data_at, payload)?;
                let inner = Bytes {
                    data: &inflated,
                    path,
                    format: FORMAT,
                    origin: Origin::Inflated { at: pos },
                };
                let itag = Tag::read(&inner, 0, "compressed element's tag")?;
                if itag.kind != MI_MATRIX {
                    return Err(inner.unsupported(
                        0,
                        format!("a compressed element of type {}", itag.kind),
                        "compressed miMATRIX (type 14) elements",
                    ));
                }
                let content = inner.slice(itag.data_at, itag.nbytes, "compressed miMATRIX")?;
                Matrix::parse(&inner, itag.data_at, content)?.select(var, &mut seen)?
            }
            MI_MATRIX => Matrix::parse(&b, tag.data_at, payload)?.select(var, &mut seen)?,
            other => {
                return Err(b.malformed(
                    pos,
                    "top-level data element type",
                    "miMATRIX (14) or miCOMPRESSED (15)",
                    format!("type {other}"),
                ));
            }
        };
        if let Some(array) = found {
            return Ok(array);
        }
        pos = next;
    }
    Err(ImportError::NoSuchArray {
        path: path.to_path_buf(),
        wanted: match var {
            Some(v) => format!("a numeric variable named {v:?}"),
            None => "a real numeric variable (double, single or integer)".to_string(),
        },
        available: seen,
    })
}

/// A data element tag, in the long (8-byte) or small (4-byte header + 4 data bytes) format.
struct Tag {
    kind: u32,
    nbytes: usize,
    data_at: usize,
    small: bool,
}

impl Tag {
    fn read(b: &Bytes<'_>, pos: usize, what: &str) -> Result<Tag, ImportError> {
        let first = b.u32_le(pos, what)?;
        if first >> 16 != 0 {
            // Small element: bytes in the upper half, type in the lower, data in the next 4.
            let nbytes = (first >> 16) as usize;
            if nbytes > 4 {
                return Err(b.malformed(
                    pos,
                    what,
                    "a small data element of at most 4 bytes",
                    format!("{nbytes} bytes"),
                ));
            }
            b.slice(pos, 8, what)?;
            return Ok(Tag {
                kind: first & 0xffff,
                nbytes,
                data_at: pos + 4,
                small: true,
            });
        }
        let nbytes = b.u32_le(pos + 4, what)? as usize;
        Ok(Tag {
            kind: first,
            nbytes,
            data_at: pos + 8,
            small: false,
        })
    }
}

/// Inflate an miCOMPRESSED payload, bounding the output by deflate's maximum ratio.
fn inflate(b: &Bytes<'_>, at: usize, input: &[u8]) -> Result<Vec<u8>, ImportError> {
    let limit = input.len().saturating_mul(1032).saturating_add(1024);
    let mut d = Decompress::new(true);
    let mut out: Vec<u8> = Vec::with_capacity(input.len().saturating_mul(2).min(limit));
    loop {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(b.malformed(
                    at,
                    "zlib stream of an miCOMPRESSED element",
                    format!("at most {limit} decompressed bytes (deflate's maximum ratio)"),
                    "more",
                ));
            }
            let grow = out.len().max(1 << 16).min(limit - out.len());
            out.reserve_exact(grow);
        }
        let consumed = usize::try_from(d.total_in()).unwrap_or(usize::MAX);
        let rest = input.get(consumed..).unwrap_or(&[]);
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(rest, &mut out, FlushDecompress::None)
            .map_err(|e| {
                b.malformed(
                    at + consumed,
                    "zlib stream of an miCOMPRESSED element",
                    "valid zlib data",
                    format!("corrupt data ({e})"),
                )
            })?;
        match status {
            Status::StreamEnd => return Ok(out),
            Status::Ok | Status::BufError => {
                let stalled = d.total_in() == in_before && d.total_out() == out_before;
                if stalled && out.len() < out.capacity() {
                    return Err(ImportError::Truncated {
                        path: b.path.to_path_buf(),
                        format: FORMAT,
                        what: "zlib stream of an miCOMPRESSED element (no end-of-stream marker)"
                            .to_string(),
                        location: b.location(at),
                        needed: input.len() as u64 + 1,
                        available: input.len() as u64,
                    });
                }
            }
        }
    }
}

/// An miMATRIX element's header, parsed up to its real part.
struct Matrix<'a> {
    b: Bytes<'a>,
    name: String,
    class: u32,
    flags: u32,
    dims: Vec<usize>,
    /// Offset of the real-part element's tag, within `b`.
    data_at: usize,
    /// End of the element's content, within `b`.
    end: usize,
}

impl<'a> Matrix<'a> {
    /// Parse the sub-elements of an miMATRIX whose content is `content`, at `start` in `b`.
    fn parse(b: &Bytes<'a>, start: usize, content: &'a [u8]) -> Result<Matrix<'a>, ImportError> {
        // Parse within the matrix's own bytes so nothing can read past it, keeping offsets in `b`.
        let end = start + content.len();
        let sub = Bytes {
            data: b.data.get(..end).unwrap_or(b.data),
            ..*b
        };
        // Empty miMATRIX: MATLAB writes these for empty arrays of some classes.
        if content.is_empty() {
            return Ok(Matrix {
                b: sub,
                name: String::new(),
                class: 0,
                flags: 0,
                dims: Vec::new(),
                data_at: end,
                end,
            });
        }
        let mut pos = start;
        let flags_tag = Tag::read(&sub, pos, "array flags tag")?;
        if flags_tag.kind != MI_UINT32 || flags_tag.nbytes != 8 {
            return Err(sub.malformed(
                pos,
                "array flags sub-element",
                "miUINT32 (6) of 8 bytes",
                format!("type {} of {} bytes", flags_tag.kind, flags_tag.nbytes),
            ));
        }
        let flags = sub.u32_le(flags_tag.data_at, "array flags")?;
        pos = advance(&flags_tag);

        let dims_tag = Tag::read(&sub, pos, "dimensions tag")?;
        if dims_tag.kind != MI_INT32 || dims_tag.nbytes % 4 != 0 || dims_tag.nbytes == 0 {
            return Err(sub.malformed(
                pos,
                "dimensions sub-element",
                "miINT32 (5) with a positive multiple of 4 bytes",
                format!("type {} of {} bytes", dims_tag.kind, dims_tag.nbytes),
            ));
        }
        let raw = sub.slice(dims_tag.data_at, dims_tag.nbytes, "dimensions")?;
        let mut dims = Vec::with_capacity(raw.len() / 4);
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let d = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let d = usize::try_from(d).map_err(|_| {
                sub.malformed(
                    dims_tag.data_at + 4 * i,
                    "dimension",
                    "a non-negative size",
                    d.to_string(),
                )
            })?;
            dims.push(d);
        }
        pos = advance(&dims_tag);

        let name_tag = Tag::read(&sub, pos, "array name tag")?;
        if name_tag.kind != MI_INT8 && name_tag.kind != MI_UTF8 {
            return Err(sub.malformed(
                pos,
                "array name sub-element",
                "miINT8 (1) text",
                format!("type {}", name_tag.kind),
            ));
        }
        let name_bytes = sub.slice(name_tag.data_at, name_tag.nbytes, "array name")?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        pos = advance(&name_tag);

        Ok(Matrix {
            b: sub,
            name,
            class: flags & 0xff,
            flags,
            dims,
            data_at: pos,
            end,
        })
    }

    fn class_name(&self) -> &'static str {
        match self.class {
            1 => "cell",
            2 => "struct",
            3 => "object",
            4 => "char",
            5 => "sparse",
            6 => "double",
            7 => "single",
            8 => "int8",
            9 => "uint8",
            10 => "int16",
            11 => "uint16",
            12 => "int32",
            13 => "uint32",
            14 => "int64",
            15 => "uint64",
            16 => "function",
            17 => "opaque",
            _ => "unknown class",
        }
    }

    fn describe(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(usize::to_string).collect();
        let mut kind = self.class_name().to_string();
        if self.flags & MX_LOGICAL != 0 {
            kind = "logical".to_string();
        }
        if self.flags & MX_COMPLEX != 0 {
            kind = format!("complex {kind}");
        }
        format!("{:?} ({kind} {})", self.name, dims.join("×"))
    }

    fn numeric(&self) -> bool {
        (6..=15).contains(&self.class)
    }

    /// The array if it is the one asked for, else record it in `seen` and return `None`.
    fn select(
        self,
        var: Option<&str>,
        seen: &mut Vec<String>,
    ) -> Result<Option<RawArray>, ImportError> {
        match var {
            Some(v) if v == self.name => {
                if !self.numeric() {
                    return Err(self.b.unsupported(
                        self.data_at,
                        format!("variable {}, not a numeric array", self.describe()),
                        "double, single, integer and logical arrays",
                    ));
                }
                if self.flags & MX_COMPLEX != 0 {
                    return Err(self.b.unsupported(
                        self.data_at,
                        format!("variable {}, a complex array", self.describe()),
                        "real arrays",
                    ));
                }
                self.read().map(Some)
            }
            None if self.numeric() && self.flags & (MX_COMPLEX | MX_LOGICAL) == 0 => {
                self.read().map(Some)
            }
            _ => {
                seen.push(self.describe());
                Ok(None)
            }
        }
    }

    /// Decode the real part and reorder it to C order.
    fn read(&self) -> Result<RawArray, ImportError> {
        let b = &self.b;
        let count = super::element_count(&self.dims).ok_or_else(|| {
            b.malformed(
                self.data_at,
                "dimensions",
                "an element count that fits in memory",
                format!("{:?}", self.dims),
            )
        })?;
        if self.data_at >= self.end && count == 0 {
            return Ok(RawArray {
                shape: self.dims.clone(),
                data: Vec::new(),
            });
        }
        let tag = Tag::read(b, self.data_at, "real part tag")?;
        let scalar = match tag.kind {
            1 => Scalar::I8,
            2 => Scalar::U8,
            3 => Scalar::I16,
            4 => Scalar::U16,
            5 => Scalar::I32,
            6 => Scalar::U32,
            7 => Scalar::F32,
            9 => Scalar::F64,
            12 => Scalar::I64,
            13 => Scalar::U64,
            other => {
                return Err(b.unsupported(
                    self.data_at,
                    format!("real part stored as data type {other}"),
                    "miINT8..miUINT64, miSINGLE and miDOUBLE",
                ));
            }
        };
        let needed = count.checked_mul(scalar.size()).ok_or_else(|| {
            b.malformed(
                self.data_at,
                "dimensions",
                "a byte size that fits in memory",
                format!("{:?}", self.dims),
            )
        })?;
        if tag.nbytes != needed {
            return Err(b.malformed(
                self.data_at,
                &format!("real part of {}", self.describe()),
                format!(
                    "{needed} bytes ({count} elements of {} bytes)",
                    scalar.size()
                ),
                format!("{} bytes", tag.nbytes),
            ));
        }
        let raw = b.slice(tag.data_at, tag.nbytes, "real part data")?;
        let values = super::decode_scalars(raw, scalar, false);
        Ok(RawArray {
            shape: self.dims.clone(),
            data: super::fortran_to_c(&values, &self.dims),
        })
    }
}

/// The offset after a sub-element (padded to 8 bytes).
fn advance(tag: &Tag) -> usize {
    if tag.small {
        tag.data_at + 4
    } else {
        tag.data_at + tag.nbytes.next_multiple_of(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut h = b"MATLAB 5.0 MAT-file, test".to_vec();
        h.resize(116, b' ');
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&0x0100u16.to_le_bytes());
        h.extend_from_slice(b"IM");
        h
    }

    fn element(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = kind.to_le_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v.resize(v.len().next_multiple_of(8), 0);
        v
    }

    fn matrix(name: &str, class: u32, dims: &[i32], real: &[u8], real_kind: u32) -> Vec<u8> {
        let mut c = element(6, &[class.to_le_bytes(), 0u32.to_le_bytes()].concat());
        c.extend(element(
            5,
            &dims
                .iter()
                .flat_map(|d| d.to_le_bytes())
                .collect::<Vec<_>>(),
        ));
        c.extend(element(1, name.as_bytes()));
        c.extend(element(real_kind, real));
        element(14, &c)
    }

    #[test]
    fn reads_plain_matrices_in_c_order() {
        // A 2×3 double [[0,1,2],[3,4,5]], stored column-major, after a char variable.
        let col: Vec<u8> = [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut f = header();
        f.extend(matrix("s", 4, &[1, 2], &[104, 0, 105, 0], 4));
        f.extend(matrix("x", 6, &[2, 3], &col, 9));
        let a = parse(&f, Path::new("t.mat"), None).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let a = parse(&f, Path::new("t.mat"), Some("x")).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        let e = parse(&f, Path::new("t.mat"), Some("y")).unwrap_err();
        assert!(e.to_string().contains("\"x\" (double 2×3)"), "{e}");
        let e = parse(&f, Path::new("t.mat"), Some("s")).unwrap_err();
        assert!(e.to_string().contains("not a numeric array"), "{e}");
    }

    #[test]
    fn detects_v73() {
        let mut f = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".to_vec();
        f.resize(128, b' ');
        let e = parse(&f, Path::new("t.mat"), None).unwrap_err();
        assert!(matches!(e, ImportError::MatV73 { .. }), "{e}");
    }
}
