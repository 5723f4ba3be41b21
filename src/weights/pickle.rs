//! A restricted pickle interpreter for PyTorch state dicts.
//!
//! It builds an inert object graph (an arena of [`Obj`]) instead of
//! executing anything. `GLOBAL`/`STACK_GLOBAL` resolve only names on a small
//! allow-list ([`Global`]); any other name is a
//! [`WeightsError::ForbiddenGlobal`]. `REDUCE` on an allowed global builds a
//! value (an empty `OrderedDict`, a [`TensorRef`] describing a strided view of
//! a storage, ...); `BUILD` never does more than discard the state.
//!
//! Every read is bounds-checked: malformed or truncated input yields an error
//! naming the byte offset and opcode, never a panic.

use std::collections::HashMap;
use std::path::Path;

use super::WeightsError;

/// Index of an object in [`Pickled::objs`].
pub type Id = usize;

/// Upper bound on objects (and stack and memo entries) one pickle may create, so a
/// hostile pickle cannot amplify its size into unbounded memory: an object costs up to about
/// 120 bytes from one opcode byte, so this bounds the unpickler near 64 MiB. State dicts need
/// about 20 objects per tensor: this allows some 25 000 tensors (ResNet-152 has 900).
const MAX_OBJECTS: usize = 1 << 19;

/// Element types of torch storages and tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
    /// A type torch knows but that has no f32 conversion here (complex,
    /// quantized, float8...): its name and element size in bytes.
    Other(&'static str, usize),
}

impl ScalarType {
    /// Element size in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 | Self::U64 => 8,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
            Self::Other(_, s) => s,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U64 => "uint64",
            Self::U32 => "uint32",
            Self::U16 => "uint16",
            Self::U8 => "uint8",
            Self::Bool => "bool",
            Self::Other(n, _) => n,
        }
    }

    /// `torch.FloatStorage` & co (also `torch.cuda.*Storage`).
    pub fn from_storage_name(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            // torch.UntypedStorage is a byte array (torch loads it as uint8).
            "UntypedStorage" => Self::U8,
            "ComplexFloatStorage" => Self::Other("complex64", 8),
            "ComplexDoubleStorage" => Self::Other("complex128", 16),
            "QInt8Storage" => Self::Other("qint8", 1),
            "QUInt8Storage" => Self::Other("quint8", 1),
            "QInt32Storage" => Self::Other("qint32", 4),
            "QUInt4x2Storage" => Self::Other("quint4x2", 1),
            "QUInt2x4Storage" => Self::Other("quint2x4", 1),
            _ => return None,
        })
    }

    /// `torch.float32` & co.
    pub fn from_dtype_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => Self::F64,
            "float32" | "float" => Self::F32,
            "float16" | "half" => Self::F16,
            "bfloat16" => Self::BF16,
            "int64" | "long" => Self::I64,
            "int32" | "int" => Self::I32,
            "int16" | "short" => Self::I16,
            "int8" => Self::I8,
            "uint64" => Self::U64,
            "uint32" => Self::U32,
            "uint16" => Self::U16,
            "uint8" => Self::U8,
            "bool" => Self::Bool,
            "complex32" | "chalf" => Self::Other("complex32", 4),
            "complex64" | "cfloat" => Self::Other("complex64", 8),
            "complex128" | "cdouble" => Self::Other("complex128", 16),
            "float8_e4m3fn" => Self::Other("float8_e4m3fn", 1),
            "float8_e5m2" => Self::Other("float8_e5m2", 1),
            "float8_e4m3fnuz" => Self::Other("float8_e4m3fnuz", 1),
            "float8_e5m2fnuz" => Self::Other("float8_e5m2fnuz", 1),
            "qint8" => Self::Other("qint8", 1),
            "quint8" => Self::Other("quint8", 1),
            "qint32" => Self::Other("qint32", 4),
            _ => return None,
        })
    }
}

/// The only globals the unpickler will resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    /// `torch.FloatStorage`, `torch.UntypedStorage`, ...
    StorageType(ScalarType),
    /// `torch.float32`, ...
    Dtype(ScalarType),
    /// `torch.Size` (rebuilt as a plain tuple).
    TorchSize,
}

impl Global {
    /// Resolves `module.name` against the allow-list.
    pub fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Self::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch", "Size") => Self::TorchSize,
            ("torch" | "torch.cuda" | "torch.storage", n) if n.ends_with("Storage") => {
                Self::StorageType(ScalarType::from_storage_name(n)?)
            }
            ("torch", n) => Self::Dtype(ScalarType::from_dtype_name(n)?),
            _ => return None,
        })
    }
}

/// Extra view information in legacy persistent ids (very old torch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageView {
    pub view_key: String,
    /// Offset into the root storage, in elements.
    pub offset: u64,
    pub numel: u64,
}

/// A storage referenced through a persistent id
/// `('storage', storage_type, key, location, numel[, view_metadata])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: ScalarType,
    /// Number of elements of `dtype` in the (root) storage.
    pub numel: u64,
    pub location: String,
    pub view: Option<StorageView>,
}

/// A tensor as described by `_rebuild_tensor*`: a strided view of a storage.
/// Offsets, sizes and strides are in elements of `dtype`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub dtype: ScalarType,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// An unpickled value. Containers refer to other objects by [`Id`], so
/// memoised objects are shared exactly as in Python.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64: little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    Global(Global),
    Storage(Box<StorageRef>),
    Tensor(Box<TensorRef>),
}

/// The result of unpickling one pickle.
#[derive(Debug, Clone)]
pub struct Pickled {
    pub objs: Vec<Obj>,
    pub root: Id,
    /// Bytes consumed, including the STOP opcode.
    pub end: usize,
}

static NONE_OBJ: Obj = Obj::None;

impl Pickled {
    pub fn get(&self, id: Id) -> &Obj {
        self.objs.get(id).unwrap_or(&NONE_OBJ)
    }

    pub fn root_obj(&self) -> &Obj {
        self.get(self.root)
    }

    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Short human description of an object, for error messages.
    pub fn describe(&self, id: Id) -> String {
        describe(&self.objs, id)
    }
}

fn describe(objs: &[Obj], id: Id) -> String {
    match objs.get(id).unwrap_or(&NONE_OBJ) {
        Obj::None => "None".into(),
        Obj::Bool(b) => format!("bool {b}"),
        Obj::Int(i) => format!("int {i}"),
        Obj::BigInt(b) => format!("{}-byte int", b.len()),
        Obj::Float(f) => format!("float {f}"),
        Obj::Str(s) => {
            let short: String = s.chars().take(40).collect();
            format!("str {short:?}")
        }
        Obj::Bytes(b) => format!("{} bytes", b.len()),
        Obj::Tuple(v) => format!("tuple of {}", v.len()),
        Obj::List(v) => format!("list of {}", v.len()),
        Obj::Dict(v) => format!("dict of {}", v.len()),
        Obj::Set(v) => format!("set of {}", v.len()),
        Obj::Global(g) => format!("global {g:?}"),
        Obj::Storage(s) => format!("storage '{}' ({})", s.key, s.dtype.name()),
        Obj::Tensor(t) => format!("{} tensor {:?}", t.dtype.name(), t.size),
    }
}

/// Opcode names, for error messages.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// Unpickles one pickle from the start of `data`.
///
/// `context` names the pickle in error messages (e.g. `"archive/data.pkl"`),
/// `base` is the file offset of `data[0]` (added to reported offsets).
pub fn unpickle(
    path: &Path,
    context: &str,
    data: &[u8],
    base: u64,
) -> Result<Pickled, WeightsError> {
    let mut u = Unpickler {
        path,
        context,
        data,
        base,
        pos: 0,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = u.run()?;
    Ok(Pickled {
        objs: u.objs,
        root,
        end: u.pos,
    })
}

struct Unpickler<'a> {
    path: &'a Path,
    context: &'a str,
    data: &'a [u8],
    base: u64,
    pos: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

type R<T> = Result<T, WeightsError>;

impl<'a> Unpickler<'a> {
    // ---------------------------------------------------------------- errors

    fn err(&self, at: usize, op: u8, reason: impl Into<String>) -> WeightsError {
        WeightsError::Pickle {
            path: self.path.to_path_buf(),
            context: self.context.to_string(),
            offset: self.base + at as u64,
            opcode: format!("0x{op:02x} {}", opcode_name(op)),
            reason: reason.into(),
        }
    }

    fn truncated(&self, at: usize, op: u8, what: &str, needed: u64) -> WeightsError {
        let available = self.data.len().saturating_sub(self.pos) as u64;
        WeightsError::Truncated {
            path: self.path.to_path_buf(),
            what: format!(
                "{what} of opcode {} (at byte {}) in {}",
                opcode_name(op),
                self.base + at as u64,
                self.context
            ),
            offset: self.base + self.pos as u64,
            needed,
            available,
        }
    }

    // ----------------------------------------------------------------- input

    fn take(&mut self, at: usize, op: u8, n: u64, what: &str) -> R<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let available = data.len().saturating_sub(self.pos) as u64;
        if n > available {
            return Err(self.truncated(at, op, what, n));
        }
        let end = self.pos + n as usize; // n <= available, so no overflow
        let slice = data
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(at, op, what, n))?;
        self.pos = end;
        Ok(slice)
    }

    fn arr<const N: usize>(&mut self, at: usize, op: u8, what: &str) -> R<[u8; N]> {
        let s = self.take(at, op, N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn line(&mut self, at: usize, op: u8, what: &str) -> R<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or(&[]);
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let l = rest.get(..i).unwrap_or(&[]);
                self.pos += i + 1;
                Ok(l)
            }
            None => Err(self.truncated(
                at,
                op,
                &format!("newline-terminated {what}"),
                rest.len() as u64 + 1,
            )),
        }
    }

    fn line_str(&mut self, at: usize, op: u8, what: &str) -> R<String> {
        let l = self.line(at, op, what)?;
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        std::str::from_utf8(l)
            .map(|s| s.to_string())
            .map_err(|_| self.err(at, op, format!("{what} is not valid UTF-8")))
    }

    // ----------------------------------------------------------------- stack

    fn new_obj(&mut self, o: Obj) -> Id {
        self.objs.push(o);
        self.objs.len() - 1
    }

    fn push(&mut self, o: Obj) {
        let id = self.new_obj(o);
        self.stack.push(id);
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, at: usize, op: u8) -> R<Id> {
        if self.stack.len() <= self.floor() {
            return Err(self.err(at, op, "stack underflow"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err(at, op, "stack underflow"))
    }

    fn peek(&self, at: usize, op: u8) -> R<Id> {
        if self.stack.len() <= self.floor() {
            return Err(self.err(at, op, "stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err(at, op, "stack underflow"))
    }

    fn pop_mark(&mut self, at: usize, op: u8) -> R<Vec<Id>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err(at, op, "no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err(at, op, "MARK above the top of the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn get(&self, id: Id) -> &Obj {
        self.objs.get(id).unwrap_or(&NONE_OBJ)
    }

    fn memo_put(&mut self, at: usize, op: u8, idx: u32) -> R<()> {
        let top = self.peek(at, op)?;
        self.memo.insert(idx, top);
        Ok(())
    }

    fn memo_get(&mut self, at: usize, op: u8, idx: u32) -> R<()> {
        let id = *self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(at, op, format!("memo key {idx} was never stored")))?;
        self.stack.push(id);
        Ok(())
    }

    // --------------------------------------------------------------- helpers

    fn int_of(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Obj::Int(i) => Some(*i),
            Obj::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    fn u64_of(&self, at: usize, op: u8, id: Id, what: &str) -> R<u64> {
        match self.int_of(id) {
            Some(i) if i >= 0 => Ok(i as u64),
            _ => Err(self.err(
                at,
                op,
                format!(
                    "{what}: expected a non-negative int, found {}",
                    describe(&self.objs, id)
                ),
            )),
        }
    }

    fn seq_of(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Obj::Tuple(v) | Obj::List(v) => Some(v),
            _ => None,
        }
    }

    fn u64_seq(&self, at: usize, op: u8, id: Id, what: &str) -> R<Vec<u64>> {
        let items = self.seq_of(id).ok_or_else(|| {
            self.err(
                at,
                op,
                format!(
                    "{what}: expected a tuple of ints, found {}",
                    describe(&self.objs, id)
                ),
            )
        })?;
        items
            .iter()
            .map(|&i| self.u64_of(at, op, i, what))
            .collect()
    }

    fn str_like(&self, id: Id) -> Option<String> {
        match self.get(id) {
            Obj::Str(s) => Some(s.clone()),
            Obj::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Obj::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    fn pairs(&self, at: usize, op: u8, items: Vec<Id>) -> R<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(
                at,
                op,
                format!("odd number of items ({}) for key/value pairs", items.len()),
            ));
        }
        Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
    }

    fn int_from_le(bytes: &[u8]) -> Obj {
        if bytes.is_empty() {
            return Obj::Int(0);
        }
        let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
        let fill = if negative { 0xff } else { 0x00 };
        // Drop redundant sign-extension bytes.
        let mut n = bytes.len();
        while n > 1 && bytes[n - 1] == fill && ((bytes[n - 2] & 0x80 != 0) == negative) {
            n -= 1;
        }
        let bytes = &bytes[..n];
        if n <= 8 {
            let mut a = [fill; 8];
            a[..n].copy_from_slice(bytes);
            Obj::Int(i64::from_le_bytes(a))
        } else {
            Obj::BigInt(bytes.to_vec())
        }
    }

    fn text(bytes: &[u8]) -> Obj {
        Obj::Str(String::from_utf8_lossy(bytes).into_owned())
    }

    // ------------------------------------------------------- object building

    fn resolve_global(&mut self, at: usize, module: &str, name: &str) -> R<()> {
        match Global::resolve(module, name) {
            Some(g) => {
                self.push(Obj::Global(g));
                Ok(())
            }
            None => Err(WeightsError::ForbiddenGlobal {
                path: self.path.to_path_buf(),
                context: self.context.to_string(),
                module: module.to_string(),
                name: name.to_string(),
                offset: self.base + at as u64,
            }),
        }
    }

    fn persistent_load(&mut self, at: usize, op: u8, pid: Id) -> R<Obj> {
        let items = match self.get(pid) {
            Obj::Tuple(v) => v.clone(),
            _ => {
                return Err(self.err(
                    at,
                    op,
                    format!(
                        "persistent id: expected a tuple, found {}",
                        describe(&self.objs, pid)
                    ),
                ));
            }
        };
        let kind = items
            .first()
            .and_then(|&i| self.str_like(i))
            .unwrap_or_default();
        if kind == "module" {
            return Err(self.err(
                at,
                op,
                "the checkpoint pickles a whole nn.Module (persistent id 'module'); \
                 only state dicts are supported: save model.state_dict() instead",
            ));
        }
        if kind != "storage" || !(items.len() == 5 || items.len() == 6) {
            return Err(self.err(
                at,
                op,
                format!(
                    "persistent id: expected ('storage', type, key, location, numel[, view]), found tuple of {} starting with {:?}",
                    items.len(),
                    kind
                ),
            ));
        }
        let dtype = match self.get(items[1]) {
            Obj::Global(Global::StorageType(t)) => *t,
            _ => {
                return Err(self.err(
                    at,
                    op,
                    format!(
                        "persistent id: expected a torch storage type, found {}",
                        describe(&self.objs, items[1])
                    ),
                ));
            }
        };
        let key = self
            .str_like(items[2])
            .ok_or_else(|| self.err(at, op, "persistent id: storage key is not a string"))?;
        let location = self.str_like(items[3]).unwrap_or_default();
        let numel = self.u64_of(at, op, items[4], "persistent id numel")?;
        let view = match items.get(5).map(|&i| (i, self.get(i))) {
            None | Some((_, Obj::None)) => None,
            Some((_, Obj::Tuple(v))) if v.len() == 3 => {
                let v = v.clone();
                let view_key = self
                    .str_like(v[0])
                    .ok_or_else(|| self.err(at, op, "persistent id: view key is not a string"))?;
                let offset = self.u64_of(at, op, v[1], "view offset")?;
                let numel = self.u64_of(at, op, v[2], "view size")?;
                Some(StorageView {
                    view_key,
                    offset,
                    numel,
                })
            }
            Some((i, _)) => {
                return Err(self.err(
                    at,
                    op,
                    format!(
                        "persistent id: view metadata should be None or (key, offset, size), found {}",
                        describe(&self.objs, i)
                    ),
                ));
            }
        };
        Ok(Obj::Storage(Box::new(StorageRef {
            key,
            dtype,
            numel,
            location,
            view,
        })))
    }

    fn build_tensor(&self, at: usize, op: u8, args: &[Id], dtype_arg: Option<Id>) -> R<Obj> {
        if args.len() < 4 {
            return Err(self.err(
                at,
                op,
                format!(
                    "_rebuild_tensor needs (storage, offset, size, stride, ...), got {} args",
                    args.len()
                ),
            ));
        }
        let storage = match self.get(args[0]) {
            Obj::Storage(s) => (**s).clone(),
            _ => {
                return Err(self.err(
                    at,
                    op,
                    format!(
                        "_rebuild_tensor: expected a storage (persistent id), found {}",
                        describe(&self.objs, args[0])
                    ),
                ));
            }
        };
        let offset = self.u64_of(at, op, args[1], "tensor storage_offset")?;
        let size = self.u64_seq(at, op, args[2], "tensor size")?;
        let stride = self.u64_seq(at, op, args[3], "tensor stride")?;
        if size.len() != stride.len() {
            return Err(self.err(
                at,
                op,
                format!(
                    "tensor size has {} dims but stride has {}",
                    size.len(),
                    stride.len()
                ),
            ));
        }
        let dtype = match dtype_arg {
            None => storage.dtype,
            Some(id) => match self.get(id) {
                Obj::Global(Global::Dtype(t)) => *t,
                _ => {
                    return Err(self.err(
                        at,
                        op,
                        format!(
                            "_rebuild_tensor_v3: expected a torch dtype, found {}",
                            describe(&self.objs, id)
                        ),
                    ));
                }
            },
        };
        Ok(Obj::Tensor(Box::new(TensorRef {
            storage,
            dtype,
            offset,
            size,
            stride,
        })))
    }

    /// `func(*args)` for an allowed global.
    fn call(&mut self, at: usize, op: u8, func: Id, args: Id) -> R<Id> {
        let g = match self.get(func) {
            Obj::Global(g) => *g,
            _ => {
                return Err(self.err(
                    at,
                    op,
                    format!("REDUCE on a non-callable {}", describe(&self.objs, func)),
                ));
            }
        };
        let args: Vec<Id> = match self.get(args) {
            Obj::Tuple(v) => v.clone(),
            _ => {
                return Err(self.err(
                    at,
                    op,
                    format!(
                        "REDUCE arguments: expected a tuple, found {}",
                        describe(&self.objs, args)
                    ),
                ));
            }
        };
        match g {
            Global::OrderedDict => {
                let mut pairs = Vec::new();
                if let Some(&src) = args.first() {
                    match self.get(src) {
                        Obj::Dict(d) => pairs.extend_from_slice(d),
                        Obj::List(items) | Obj::Tuple(items) => {
                            for &it in items {
                                match self.seq_of(it) {
                                    Some([k, v]) => pairs.push((*k, *v)),
                                    _ => {
                                        return Err(self.err(
                                            at,
                                            op,
                                            "OrderedDict(...) argument is not a sequence of pairs",
                                        ));
                                    }
                                }
                            }
                        }
                        _ => {
                            return Err(self.err(
                                at,
                                op,
                                format!("OrderedDict({})", describe(&self.objs, src)),
                            ));
                        }
                    }
                }
                Ok(self.new_obj(Obj::Dict(pairs)))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 => {
                let t = self.build_tensor(at, op, &args, None)?;
                Ok(self.new_obj(t))
            }
            Global::RebuildTensorV3 => {
                let t = self.build_tensor(at, op, &args, args.get(6).copied())?;
                if args.len() < 7 {
                    return Err(self.err(at, op, "_rebuild_tensor_v3 needs a dtype argument"));
                }
                Ok(self.new_obj(t))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(&t) if matches!(self.get(t), Obj::Tensor(_)) => Ok(t),
                _ => Err(self.err(at, op, "_rebuild_parameter: first argument is not a tensor")),
            },
            Global::TorchSize => match args.first() {
                Some(&t) if self.seq_of(t).is_some() => {
                    let items = self.seq_of(t).unwrap_or(&[]).to_vec();
                    Ok(self.new_obj(Obj::Tuple(items)))
                }
                None => Ok(self.new_obj(Obj::Tuple(Vec::new()))),
                Some(_) => Err(self.err(at, op, "torch.Size argument is not a sequence")),
            },
            Global::StorageType(_) | Global::Dtype(_) => Err(self.err(
                at,
                op,
                format!("calling {g:?} is not supported (only storages via persistent ids)"),
            )),
        }
    }

    // ------------------------------------------------------------- main loop

    fn run(&mut self) -> R<Id> {
        loop {
            let at = self.pos;
            let Some(&op) = self.data.get(at) else {
                return Err(WeightsError::Truncated {
                    path: self.path.to_path_buf(),
                    what: format!(
                        "next pickle opcode in {} (no STOP opcode seen)",
                        self.context
                    ),
                    offset: self.base + at as u64,
                    needed: 1,
                    available: 0,
                });
            };
            self.pos += 1;
            if self.objs.len() >= MAX_OBJECTS
                || self.stack.len() >= MAX_OBJECTS
                || self.memo.len() >= MAX_OBJECTS
            {
                return Err(self.err(
                    at,
                    op,
                    format!("more than {MAX_OBJECTS} objects: not a plausible state dict"),
                ));
            }
            match op {
                0x80 => {
                    let [v] = self.arr::<1>(at, op, "protocol version")?;
                    if v > 5 {
                        return Err(self.err(at, op, format!("unsupported pickle protocol {v}")));
                    }
                }
                0x95 => {
                    self.arr::<8>(at, op, "frame length")?;
                }
                b'.' => {
                    let root = self.pop(at, op)?;
                    return Ok(root);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop(at, op)?;
                    }
                }
                b'1' => {
                    self.pop_mark(at, op)?;
                }
                b'2' => {
                    let top = self.peek(at, op)?;
                    self.stack.push(top);
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.arr(at, op, "int32")?);
                    self.push(Obj::Int(v.into()));
                }
                b'K' => {
                    let [v] = self.arr::<1>(at, op, "uint8")?;
                    self.push(Obj::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr(at, op, "uint16")?);
                    self.push(Obj::Int(v.into()));
                }
                0x8a => {
                    let [n] = self.arr::<1>(at, op, "length")?;
                    let b = self.take(at, op, n.into(), "integer bytes")?;
                    self.push(Self::int_from_le(b));
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.arr(at, op, "length")?);
                    if n < 0 {
                        return Err(self.err(at, op, format!("negative length {n}")));
                    }
                    let b = self.take(at, op, n as u64, "integer bytes")?;
                    self.push(Self::int_from_le(b));
                }
                b'I' => {
                    let s = self.line_str(at, op, "integer")?;
                    let o =
                        match s.as_str() {
                            "00" => Obj::Bool(false),
                            "01" => Obj::Bool(true),
                            t => Obj::Int(t.parse().map_err(|_| {
                                self.err(at, op, format!("bad integer literal {t:?}"))
                            })?),
                        };
                    self.push(o);
                }
                b'L' => {
                    let s = self.line_str(at, op, "long")?;
                    let t = s.strip_suffix('L').unwrap_or(&s);
                    let v: i64 = t
                        .parse()
                        .map_err(|_| self.err(at, op, format!("unsupported long literal {t:?}")))?;
                    self.push(Obj::Int(v));
                }
                b'F' => {
                    let s = self.line_str(at, op, "float")?;
                    let v: f64 = s
                        .trim()
                        .parse()
                        .map_err(|_| self.err(at, op, format!("bad float literal {s:?}")))?;
                    self.push(Obj::Float(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.arr(at, op, "float64")?);
                    self.push(Obj::Float(v));
                }
                0x8c | b'U' => {
                    let [n] = self.arr::<1>(at, op, "length")?;
                    let b = self.take(at, op, n.into(), "string bytes")?;
                    self.push(Self::text(b));
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.arr(at, op, "length")?);
                    let b = self.take(at, op, n.into(), "string bytes")?;
                    self.push(Self::text(b));
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.arr(at, op, "length")?);
                    let b = self.take(at, op, n, "string bytes")?;
                    self.push(Self::text(b));
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.arr(at, op, "length")?);
                    if n < 0 {
                        return Err(self.err(at, op, format!("negative length {n}")));
                    }
                    let b = self.take(at, op, n as u64, "string bytes")?;
                    self.push(Self::text(b));
                }
                b'C' => {
                    let [n] = self.arr::<1>(at, op, "length")?;
                    let b = self.take(at, op, n.into(), "bytes")?;
                    self.push(Obj::Bytes(b.to_vec()));
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.arr(at, op, "length")?);
                    let b = self.take(at, op, n.into(), "bytes")?;
                    self.push(Obj::Bytes(b.to_vec()));
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.arr(at, op, "length")?);
                    let b = self.take(at, op, n, "bytes")?;
                    self.push(Obj::Bytes(b.to_vec()));
                }
                b'}' => self.push(Obj::Dict(Vec::new())),
                b']' => self.push(Obj::List(Vec::new())),
                b')' => self.push(Obj::Tuple(Vec::new())),
                0x8f => self.push(Obj::Set(Vec::new())),
                b'd' => {
                    let items = self.pop_mark(at, op)?;
                    let pairs = self.pairs(at, op, items)?;
                    self.push(Obj::Dict(pairs));
                }
                b'l' => {
                    let items = self.pop_mark(at, op)?;
                    self.push(Obj::List(items));
                }
                b't' => {
                    let items = self.pop_mark(at, op)?;
                    self.push(Obj::Tuple(items));
                }
                0x91 => {
                    let items = self.pop_mark(at, op)?;
                    self.push(Obj::Set(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at, op)?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items));
                }
                b's' => {
                    let v = self.pop(at, op)?;
                    let k = self.pop(at, op)?;
                    self.set_items(at, op, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark(at, op)?;
                    let pairs = self.pairs(at, op, items)?;
                    self.set_items(at, op, pairs)?;
                }
                b'a' => {
                    let v = self.pop(at, op)?;
                    self.append(at, op, vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark(at, op)?;
                    self.append(at, op, items)?;
                }
                b'c' => {
                    let module = self.line_str(at, op, "module name")?;
                    let name = self.line_str(at, op, "global name")?;
                    self.resolve_global(at, &module, &name)?;
                }
                0x93 => {
                    let name = self.pop(at, op)?;
                    let module = self.pop(at, op)?;
                    match (self.get(module), self.get(name)) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.resolve_global(at, &m, &n)?;
                        }
                        _ => return Err(self.err(at, op, "STACK_GLOBAL operands are not strings")),
                    }
                }
                b'R' => {
                    let args = self.pop(at, op)?;
                    let func = self.pop(at, op)?;
                    let r = self.call(at, op, func, args)?;
                    self.stack.push(r);
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop(at, op)?; // kwargs
                    }
                    let _args = self.pop(at, op)?;
                    let cls = self.pop(at, op)?;
                    match self.get(cls) {
                        Obj::Global(Global::OrderedDict) => self.push(Obj::Dict(Vec::new())),
                        _ => {
                            return Err(self.err(
                                at,
                                op,
                                format!("cannot instantiate {}", describe(&self.objs, cls)),
                            ));
                        }
                    }
                }
                b'b' => {
                    // obj.__setstate__(state): we keep no attributes (e.g. the
                    // `_metadata` of a state dict), so just check the operands.
                    let _state = self.pop(at, op)?;
                    self.peek(at, op)?;
                }
                b'Q' => {
                    let pid = self.pop(at, op)?;
                    let o = self.persistent_load(at, op, pid)?;
                    self.push(o);
                }
                b'q' => {
                    let [i] = self.arr::<1>(at, op, "memo index")?;
                    self.memo_put(at, op, i.into())?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.arr(at, op, "memo index")?);
                    self.memo_put(at, op, i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.err(at, op, "memo overflow"))?;
                    self.memo_put(at, op, i)?;
                }
                b'h' => {
                    let [i] = self.arr::<1>(at, op, "memo index")?;
                    self.memo_get(at, op, i.into())?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.arr(at, op, "memo index")?);
                    self.memo_get(at, op, i)?;
                }
                b'p' | b'g' => {
                    let s = self.line_str(at, op, "memo index")?;
                    let i: u32 = s
                        .parse()
                        .map_err(|_| self.err(at, op, format!("bad memo index {s:?}")))?;
                    if op == b'p' {
                        self.memo_put(at, op, i)?;
                    } else {
                        self.memo_get(at, op, i)?;
                    }
                }
                b'S' | b'V' | b'P' | b'i' | b'o' | 0x82..=0x84 | 0x97 | 0x98 => {
                    return Err(self.err(
                        at,
                        op,
                        "opcode not supported by this restricted unpickler (not used by torch.save)",
                    ));
                }
                _ => {
                    return Err(WeightsError::UnknownOpcode {
                        path: self.path.to_path_buf(),
                        context: self.context.to_string(),
                        opcode: op,
                        offset: self.base + at as u64,
                    });
                }
            }
        }
    }

    fn set_items(&mut self, at: usize, op: u8, pairs: Vec<(Id, Id)>) -> R<()> {
        let target = self.peek(at, op)?;
        let desc = describe(&self.objs, target);
        match self.objs.get_mut(target) {
            Some(Obj::Dict(d)) => {
                d.extend(pairs);
                Ok(())
            }
            _ => Err(self.err(at, op, format!("setting items on {desc}, expected a dict"))),
        }
    }

    fn append(&mut self, at: usize, op: u8, items: Vec<Id>) -> R<()> {
        let target = self.peek(at, op)?;
        let desc = describe(&self.objs, target);
        match self.objs.get_mut(target) {
            Some(Obj::List(l)) | Some(Obj::Set(l)) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(self.err(at, op, format!("appending to {desc}, expected a list"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(data: &[u8]) -> Result<Pickled, WeightsError> {
        unpickle(Path::new("test.pkl"), "test", data, 0)
    }

    #[test]
    fn simple_dict() {
        // pickle.dumps({'a': 1, 'b': [1.5, None]}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G?\xf8\x00\x00\x00\x00\x00\x00Neu.";
        let r = run(p).unwrap();
        let Obj::Dict(d) = r.root_obj() else { panic!() };
        assert_eq!(d.len(), 2);
        assert_eq!(r.as_str(d[0].0), Some("a"));
        assert_eq!(r.get(d[0].1), &Obj::Int(1));
        let Obj::List(l) = r.get(d[1].1) else {
            panic!()
        };
        assert_eq!(r.get(l[0]), &Obj::Float(1.5));
        assert_eq!(r.get(l[1]), &Obj::None);
    }

    #[test]
    fn forbidden_global() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.";
        match run(p) {
            Err(WeightsError::ForbiddenGlobal {
                module,
                name,
                offset,
                ..
            }) => {
                assert_eq!(
                    (module.as_str(), name.as_str(), offset),
                    ("os", "system", 2)
                );
            }
            other => panic!("{other:?}"),
        }
        // STACK_GLOBAL form (protocol 4)
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(matches!(run(p), Err(WeightsError::ForbiddenGlobal { .. })));
    }

    #[test]
    fn big_ints_and_truncation() {
        let p = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        let r = run(p).unwrap();
        assert!(matches!(r.root_obj(), Obj::BigInt(b) if b.len() == 10));
        let p = b"\x80\x02\x8a\x02\xff\xff.";
        assert_eq!(run(p).unwrap().root_obj(), &Obj::Int(-1));
        let p = b"\x80\x02\x8a\x02\x00\x80.";
        assert_eq!(run(p).unwrap().root_obj(), &Obj::Int(-32768));
        let p = b"\x80\x02\x8a\x03\x00\x80\x00.";
        assert_eq!(run(p).unwrap().root_obj(), &Obj::Int(32768));
        for cut in 0..p.len() {
            assert!(run(&p[..cut]).is_err());
        }
        // huge bogus length
        let p = b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc.";
        assert!(matches!(run(p), Err(WeightsError::Truncated { .. })));
    }

    #[test]
    fn unknown_opcode_and_underflow() {
        match run(b"\x80\x02\xffN.") {
            Err(WeightsError::UnknownOpcode {
                opcode: 0xff,
                offset: 2,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(run(b"(s."), Err(WeightsError::Pickle { .. })));
        assert!(matches!(run(b"."), Err(WeightsError::Pickle { .. })));
        assert!(matches!(run(b"h\x05."), Err(WeightsError::Pickle { .. })));
    }

    #[test]
    fn fuzz_no_panic() {
        // Deterministic pseudo-random byte soup must never panic.
        let mut x: u64 = 0x1234_5678;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push((x >> 24) as u8);
            }
            let _ = run(&v);
        }
    }
}
