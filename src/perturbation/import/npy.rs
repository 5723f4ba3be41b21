//! NumPy `.npy` files, format versions 1.0, 2.0 and 3.0.
//!
//! Layout: the magic `\x93NUMPY`, a major and minor version byte, the header length (u16 for
//! v1, u32 for v2/v3, little-endian), a header that is a Python dict literal with `descr`,
//! `fortran_order` and `shape`, then the raw data.

use std::path::Path;

use super::{Bytes, ImportError, RawArray, Scalar};

const FORMAT: &str = "NumPy .npy";
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Read a `.npy` file: float (`f2`/`f4`/`f8`), integer or bool elements of either byte order,
/// C or Fortran order; returns numpy's shape with the data in C order, as `f32`.
pub fn read_npy(path: impl AsRef<Path>) -> Result<RawArray, ImportError> {
    let path = path.as_ref();
    let bytes = super::read_file(path)?;
    parse(&bytes, path)
}

fn parse(bytes: &[u8], path: &Path) -> Result<RawArray, ImportError> {
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
    let (header_len, header_start) = match major {
        1 => (usize::from(b.u16_le(8, "v1 header length")?), 10),
        2 | 3 => (b.u32_le(8, "v2/v3 header length")? as usize, 12),
        _ => {
            return Err(b.unsupported(
                6,
                format!("format version {major}.{minor}"),
                "versions 1.x, 2.x and 3.x",
            ));
        }
    };
    let header = b.slice(header_start, header_len, "header dict")?;
    let text: String = if major == 3 {
        std::str::from_utf8(header)
            .map_err(|e| {
                b.malformed(
                    header_start + e.valid_up_to(),
                    "v3 header",
                    "UTF-8 text",
                    "an invalid UTF-8 sequence",
                )
            })?
            .to_string()
    } else {
        // v1/v2 headers are latin-1.
        header.iter().map(|&c| char::from(c)).collect()
    };
    let dict = Literal::parse(&text).map_err(|(pos, expected, found)| {
        b.malformed(
            header_start + byte_offset(&text, pos),
            "header dict",
            expected,
            found,
        )
    })?;
    let Literal::Dict(entries) = &dict else {
        return Err(b.malformed(header_start, "header", "a dict literal", dict.to_string()));
    };
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| matches!(k, Literal::Str(s) if s == key))
            .map(|(_, v)| v)
            .ok_or_else(|| {
                b.malformed(
                    header_start,
                    "header dict",
                    format!("a '{key}' key"),
                    format!(
                        "keys {}",
                        entries
                            .iter()
                            .map(|(k, _)| k.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    };

    let descr = match get("descr")? {
        Literal::Str(s) => s.clone(),
        other => {
            return Err(b.unsupported(
                header_start,
                format!("a structured dtype (descr {other})"),
                "plain numeric dtypes such as '<f4', '<f8', '<f2', '<i4', '|u1', '|b1'",
            ));
        }
    };
    let (kind, big_endian) = parse_descr(&descr).ok_or_else(|| {
        b.unsupported(
            header_start,
            format!("dtype descr '{descr}'"),
            "float '<f2'/'<f4'/'<f8', signed/unsigned integers of 1–8 bytes and bool, either byte order",
        )
    })?;
    let fortran = match get("fortran_order")? {
        Literal::Bool(v) => *v,
        other => {
            return Err(b.malformed(
                header_start,
                "header 'fortran_order'",
                "True or False",
                other.to_string(),
            ));
        }
    };
    let shape: Vec<usize> = match get("shape")? {
        Literal::Tuple(items) => items
            .iter()
            .map(|it| match it {
                Literal::Int(n) => Ok(*n),
                other => Err(b.malformed(
                    header_start,
                    "header 'shape'",
                    "a tuple of non-negative integers",
                    format!("element {other}"),
                )),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(b.malformed(header_start, "header 'shape'", "a tuple", other.to_string()));
        }
    };

    let data_start = header_start + header_len;
    let count = super::element_count(&shape).ok_or_else(|| {
        b.malformed(
            header_start,
            "header 'shape'",
            "an element count that fits in memory",
            format!("{shape:?}"),
        )
    })?;
    let needed = count.checked_mul(kind.size()).ok_or_else(|| {
        b.malformed(
            header_start,
            "header 'shape'",
            "a byte size that fits in memory",
            format!("{shape:?} of {descr}"),
        )
    })?;
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
    let values = super::decode_scalars(raw, kind, big_endian);
    let data = if fortran {
        // Fortran order stores the first axis fastest.
        super::fortran_to_c(&values, &shape)
    } else {
        values
    };
    Ok(RawArray { shape, data })
}

/// The byte offset of char index `pos` in `text`.
fn byte_offset(text: &str, pos: usize) -> usize {
    text.char_indices().nth(pos).map_or(text.len(), |(i, _)| i)
}

/// `'<f4'` → (F32, little-endian). `None` for anything unsupported.
fn parse_descr(descr: &str) -> Option<(Scalar, bool)> {
    let mut chars = descr.chars();
    let order = chars.next()?;
    let kind = chars.next()?;
    let size: usize = chars.as_str().parse().ok()?;
    let big_endian = match order {
        '<' => false,
        '>' => true,
        '=' => cfg!(target_endian = "big"),
        // "Not applicable": only single-byte types.
        '|' if size == 1 => false,
        _ => return None,
    };
    let scalar = match (kind, size) {
        ('f', 2) => Scalar::F16,
        ('f', 4) => Scalar::F32,
        ('f', 8) => Scalar::F64,
        ('i', 1) => Scalar::I8,
        ('i', 2) => Scalar::I16,
        ('i', 4) => Scalar::I32,
        ('i', 8) => Scalar::I64,
        ('u', 1) => Scalar::U8,
        ('u', 2) => Scalar::U16,
        ('u', 4) => Scalar::U32,
        ('u', 8) => Scalar::U64,
        ('b', 1) => Scalar::Bool,
        _ => return None,
    };
    Some((scalar, big_endian))
}

/// The subset of Python literals an `.npy` header uses.
#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    Int(usize),
    Bool(bool),
    None,
    Tuple(Vec<Literal>),
    List(Vec<Literal>),
    Dict(Vec<(Literal, Literal)>),
}

impl std::fmt::Display for Literal {
    /// Python syntax.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn seq(f: &mut std::fmt::Formatter<'_>, items: &[Literal]) -> std::fmt::Result {
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{it}")?;
            }
            Ok(())
        }
        match self {
            Literal::Str(s) => write!(f, "'{s}'"),
            Literal::Int(n) => write!(f, "{n}"),
            Literal::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Literal::None => f.write_str("None"),
            Literal::Tuple(items) => {
                f.write_str("(")?;
                seq(f, items)?;
                f.write_str(if items.len() == 1 { ",)" } else { ")" })
            }
            Literal::List(items) => {
                f.write_str("[")?;
                seq(f, items)?;
                f.write_str("]")
            }
            Literal::Dict(entries) => {
                f.write_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// A parse failure: (char position, expected, found).
type ParseErr = (usize, String, String);

struct Parser {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Literal {
    fn parse(text: &str) -> Result<Literal, ParseErr> {
        let mut p = Parser {
            chars: text.chars().collect(),
            pos: 0,
            depth: 0,
        };
        let v = p.value()?;
        p.skip_ws();
        if p.pos != p.chars.len() {
            return Err(p.err("the end of the header (spaces and a newline)"));
        }
        Ok(v)
    }
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn err(&self, expected: &str) -> ParseErr {
        let found = match self.peek() {
            Some(_) => {
                let s: String = self.chars[self.pos..].iter().take(12).collect();
                format!("{s:?}")
            }
            None => "the end of the header".to_string(),
        };
        (self.pos, expected.to_string(), found)
    }

    fn value(&mut self) -> Result<Literal, ParseErr> {
        self.skip_ws();
        self.depth += 1;
        if self.depth > 32 {
            return Err(self.err("nesting at most 32 deep"));
        }
        let v = match self.peek() {
            Some('{') => self.dict(),
            Some('(') => self.seq('(', ')').map(Literal::Tuple),
            Some('[') => self.seq('[', ']').map(Literal::List),
            Some(q @ ('\'' | '"')) => self.string(q),
            Some(c) if c.is_ascii_digit() => self.int(),
            Some(c) if c.is_ascii_alphabetic() => self.word(),
            _ => Err(self.err("a Python literal")),
        };
        self.depth -= 1;
        v
    }

    fn dict(&mut self) -> Result<Literal, ParseErr> {
        self.pos += 1; // '{'
        let mut entries = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() == Some('}') {
                self.pos += 1;
                return Ok(Literal::Dict(entries));
            }
            let k = self.value()?;
            self.skip_ws();
            if self.peek() != Some(':') {
                return Err(self.err("':' after a dict key"));
            }
            self.pos += 1;
            let v = self.value()?;
            entries.push((k, v));
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {}
                _ => return Err(self.err("',' or '}' in the dict")),
            }
        }
    }

    fn seq(&mut self, open: char, close: char) -> Result<Vec<Literal>, ParseErr> {
        debug_assert_eq!(self.peek(), Some(open));
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() == Some(close) {
                self.pos += 1;
                return Ok(items);
            }
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(c) if c == close => {}
                _ => return Err(self.err(&format!("',' or '{close}'"))),
            }
        }
    }

    fn string(&mut self, quote: char) -> Result<Literal, ParseErr> {
        self.pos += 1;
        let mut s = String::new();
        loop {
            match self.peek() {
                None => return Err(self.err(&format!("a closing {quote}"))),
                Some(c) if c == quote => {
                    self.pos += 1;
                    return Ok(Literal::Str(s));
                }
                Some('\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c) => s.push(c),
                        None => return Err(self.err("an escaped character")),
                    }
                    self.pos += 1;
                }
                Some(c) => {
                    s.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn int(&mut self) -> Result<Literal, ParseErr> {
        let start = self.pos;
        let mut n: usize = 0;
        while let Some(d) = self.peek().and_then(|c| c.to_digit(10)) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(d as usize))
                .ok_or_else(|| {
                    (
                        start,
                        "an integer that fits in usize".into(),
                        "a larger one".into(),
                    )
                })?;
            self.pos += 1;
        }
        // Python 2 long suffix, as in headers written by old numpy.
        if matches!(self.peek(), Some('L' | 'l')) {
            self.pos += 1;
        }
        Ok(Literal::Int(n))
    }

    fn word(&mut self) -> Result<Literal, ParseErr> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        let w: String = self.chars[start..self.pos].iter().collect();
        match w.as_str() {
            "True" => Ok(Literal::Bool(true)),
            "False" => Ok(Literal::Bool(false)),
            "None" => Ok(Literal::None),
            _ => {
                self.pos = start;
                Err(self.err("True, False or None"))
            }
        }
    }
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

        // Python 2 longs, a 1-tuple, double quotes, Fortran order, big-endian f8.
        let h = "{\"descr\": \">f8\", \"fortran_order\": True, \"shape\": (2L, 3L)}\n";
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
    }

    #[test]
    fn rejects_bad_headers() {
        for (h, needle) in [
            (
                "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
                "'<c8'",
            ),
            ("{'descr': '<f4', 'shape': (1,), }", "'fortran_order'"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), ",
                "the end of the header",
            ),
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
                "structured",
            ),
            (
                "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,)}",
                "True, False or None",
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
