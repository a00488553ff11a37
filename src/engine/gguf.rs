//! GGUF reader over a memory map: metadata, tensor infos and the data section of a model file.
//!
//! The file is hostile until checked: every length is compared with the bytes left before anything is
//! allocated for it, every error names what was wrong and at which byte offset, and nothing panics.
//! Format: `ggml/docs/gguf.md` and `ggml/src/gguf.cpp` of llama.cpp commit 0c1e570 (versions 2 and 3,
//! little-endian only).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::ggml_type::GgmlType;

/// `"GGUF"` as the first four bytes of the file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor's data when `general.alignment` is absent (bytes).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside arrays that we accept.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// GGUF metadata keys read in more than one place (the rest live beside their single reader).
pub mod keys {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const ALIGNMENT: &str = "general.alignment";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
    pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    /// Split GGUFs (llama.cpp `gguf-split`): this file's part number, from 0 (UINT16).
    pub const SPLIT_NO: &str = "split.no";
    /// Split GGUFs: the number of parts (UINT16).
    pub const SPLIT_COUNT: &str = "split.count";
    /// Split GGUFs: the number of tensors in all parts together (INT32).
    pub const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";
    /// `{arch}.context_length`
    pub fn context_length(arch: &str) -> String {
        format!("{arch}.context_length")
    }
}

/// Errors of the GGUF reader. Offsets are bytes from the start of the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic bytes {found:02x?} at offset 0, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {version} at offset 4 (versions 2 and 3 are supported)")]
    UnsupportedVersion { version: u32 },
    #[error(
        "file truncated: {what} needs {needed} bytes at offset {offset}, file is {file_size} bytes"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_size: u64,
    },
    #[error(
        "{what} at offset {offset} has length {len}, which runs past the end of the file ({file_size} bytes)"
    )]
    LengthPastEnd {
        what: String,
        offset: u64,
        len: u64,
        file_size: u64,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("unknown metadata value type {type_id} at offset {offset}")]
    UnknownValueType { type_id: u32, offset: u64 },
    #[error("arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {offset}")]
    NestingTooDeep { offset: u64 },
    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("tensor {name:?} at offset {offset} has {n_dims} dimensions (at most {MAX_DIMS})")]
    TooManyDims {
        name: String,
        n_dims: u32,
        offset: u64,
    },
    #[error(
        "tensor {name:?} at offset {offset}: dimensions {dims:?} are invalid or their product overflows"
    )]
    BadDims {
        name: String,
        dims: Vec<u64>,
        offset: u64,
    },
    #[error("tensor {name:?} at offset {offset} has unknown ggml type id {type_id}")]
    UnknownTensorType {
        name: String,
        type_id: u32,
        offset: u64,
    },
    #[error(
        "tensor {name:?} at offset {offset}: row length {ne0} is not a multiple of {ty}'s block size {block_size}"
    )]
    NotBlockMultiple {
        name: String,
        ty: GgmlType,
        ne0: u64,
        block_size: usize,
        offset: u64,
    },
    #[error("duplicate tensor name {name:?} at offset {offset}")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("general.alignment is {value}: it must be a power of two")]
    BadAlignment { value: u64 },
    #[error(
        "tensor {name:?}: data offset {data_offset} is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        name: String,
        data_offset: u64,
        alignment: u64,
    },
    #[error("tensor {name:?}: data bytes {start}..{end} lie outside the file ({file_size} bytes)")]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        file_size: u64,
    },
    #[error("tensors {a:?} and {b:?} overlap in the data section")]
    TensorsOverlap { a: String, b: String },
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("{path}: {reason}")]
    Split { path: PathBuf, reason: String },
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
}

/// The type tag of a metadata value (`gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The type id stored in the file (`gguf_type`).
    pub fn id(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The name gguf-py uses (`"UINT32"`, `"STRING"` …).
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "UINT8",
            I8 => "INT8",
            U16 => "UINT16",
            I16 => "INT16",
            U32 => "UINT32",
            I32 => "INT32",
            F32 => "FLOAT32",
            Bool => "BOOL",
            String => "STRING",
            Array => "ARRAY",
            U64 => "UINT64",
            I64 => "INT64",
            F64 => "FLOAT64",
        }
    }

    /// Fewest bytes one value of this type takes in the file (used to bound counts before allocating).
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array. Items stay in the file's bytes (zero-copy): numbers and bools are read on access,
/// strings are borrowed, so an array never takes more memory than the bytes it occupies in the file.
#[derive(Clone)]
pub struct Array {
    elem_type: ValueType,
    len: usize,
    repr: ArrayRepr,
    backing: Arc<Backing>,
}

#[derive(Clone)]
enum ArrayRepr {
    /// Fixed-size items starting at this byte offset of the file.
    Fixed { start: usize },
    /// Byte offset of each string's 8-byte length prefix (content validated as UTF-8 at parse time).
    Strings(Vec<u64>),
    /// Nested arrays.
    Arrays(Vec<Array>),
}

impl PartialEq for Array {
    fn eq(&self, other: &Self) -> bool {
        self.elem_type == other.elem_type && self.len == other.len && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for Array {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Array<{}>[{}]", self.elem_type.name(), self.len)
    }
}

impl Array {
    /// The type of every item.
    pub fn elem_type(&self) -> ValueType {
        self.elem_type
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array has no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The string at `i` of an array of STRING (None for another type or an index out of range).
    pub fn str_at(&self, i: usize) -> Option<&str> {
        match &self.repr {
            ArrayRepr::Strings(offs) => {
                let bytes = self.backing.bytes();
                let at = *offs.get(i)? as usize;
                let len = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?) as usize;
                std::str::from_utf8(bytes.get(at + 8..at + 8 + len)?).ok()
            }
            _ => None,
        }
    }

    /// Item `i` as an owned [`Value`] (strings are copied).
    pub fn get(&self, i: usize) -> Option<Value> {
        if i >= self.len {
            return None;
        }
        match &self.repr {
            ArrayRepr::Strings(_) => self.str_at(i).map(|s| Value::String(s.to_string())),
            ArrayRepr::Arrays(v) => v.get(i).cloned().map(Value::Array),
            ArrayRepr::Fixed { start } => {
                let size = self.elem_type.min_size() as usize;
                let at = start + i * size;
                let b = self.backing.bytes().get(at..at + size)?;
                let mut c = Cursor {
                    buf: b,
                    pos: 0,
                    owner: None,
                };
                c.value(self.elem_type, 0, "array item").ok()
            }
        }
    }

    /// All items as owned values.
    pub fn iter(&self) -> impl Iterator<Item = Value> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// An integer value of any integer type widened to i128 (None for floats, bools, strings, arrays).
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v as i128,
            Value::I8(v) => v as i128,
            Value::U16(v) => v as i128,
            Value::I16(v) => v as i128,
            Value::U32(v) => v as i128,
            Value::I32(v) => v as i128,
            Value::U64(v) => v as i128,
            Value::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// A float value of either float type, as f64.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A short description for error messages (`"UINT32"`, `"ARRAY of STRING"`).
    pub fn describe(&self) -> String {
        match self {
            Value::Array(a) => format!("ARRAY of {}", a.elem_type.name()),
            v => v.value_type().name().to_string(),
        }
    }

    /// The value as JSON (arrays in full).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::U8(v) => json!(v),
            Value::I8(v) => json!(v),
            Value::U16(v) => json!(v),
            Value::I16(v) => json!(v),
            Value::U32(v) => json!(v),
            Value::I32(v) => json!(v),
            Value::F32(v) => json!(v),
            Value::Bool(v) => json!(v),
            Value::String(v) => json!(v),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(|v| v.to_json()).collect()),
            Value::U64(v) => json!(v),
            Value::I64(v) => json!(v),
            Value::F64(v) => json!(v),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(a) => write!(f, "[{} × {}]", a.len(), a.elem_type.name()),
            v => write!(f, "{}", v.to_json()),
        }
    }
}

/// One tensor's description from the tensor-info section.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name (`blk.0.attn_q.weight` …).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` (ne0) is the row length, in elements.
    pub dims: Vec<u64>,
    /// The ggml type of its data.
    pub ty: GgmlType,
    /// Offset of its data from the start of the data section of its file (bytes).
    pub offset: u64,
    /// Size of its data (bytes).
    pub n_bytes: u64,
    /// The file holding its data: 0, or the part index (from 0) of a split GGUF.
    pub part: usize,
}

impl TensorInfo {
    /// Number of elements (product of the dims).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row length in elements (ne0).
    pub fn ne0(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows (product of dims 1..).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// One file of a model: its bytes and where its data section starts.
struct Part {
    backing: Arc<Backing>,
    /// Offset of the data section from the start of this file (bytes).
    data_offset: u64,
    /// Where it was read from (None for an in-memory image).
    path: Option<PathBuf>,
}

/// A parsed GGUF model: one file, or every part of a split GGUF (`…-00001-of-00003.gguf`, written by
/// llama.cpp's `gguf-split`) read as one. Metadata comes from the first file, tensors from all of them.
/// Tensor data stays in the memory maps and is borrowed by [`GgufFile::tensor_data`].
pub struct GgufFile {
    parts: Vec<Part>,
    /// GGUF version (2 or 3) of the first file.
    pub version: u32,
    /// Alignment of tensor data in the first file (bytes).
    pub alignment: u64,
    /// Offset of the data section from the start of the first file (bytes).
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("size", &self.file_size())
            .field("n_parts", &self.parts.len())
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The file the bytes belong to (absent when re-reading one array item).
    owner: Option<&'a Arc<Backing>>,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                file_size: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos as u64;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::LengthPastEnd {
                what: what.to_string(),
                offset: at,
                len,
                file_size: self.buf.len() as u64,
            });
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
            offset: at,
        })
    }

    /// Checks a string in place (length within the file, valid UTF-8) and returns the offset of its
    /// length prefix.
    fn skip_string(&mut self, what: &str) -> Result<u64, GgufError> {
        let at = self.pos as u64;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::LengthPastEnd {
                what: what.to_string(),
                offset: at,
                len,
                file_size: self.buf.len() as u64,
            });
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
            offset: at,
        })?;
        Ok(at)
    }

    fn value(&mut self, ty: ValueType, depth: usize, what: &str) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(what)?[0] != 0),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Array => {
                let at = self.pos as u64;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep { offset: at });
                }
                let type_id = self.u32(what)?;
                let elem_type = ValueType::from_id(type_id).ok_or(GgufError::UnknownValueType {
                    type_id,
                    offset: at,
                })?;
                let len_at = self.pos as u64;
                let len = self.u64(what)?;
                // Bound the count by the bytes left before allocating anything for it.
                if len
                    .checked_mul(elem_type.min_size())
                    .is_none_or(|b| b > self.remaining())
                {
                    return Err(GgufError::LengthPastEnd {
                        what: format!("{what} (array of {})", elem_type.name()),
                        offset: len_at,
                        len,
                        file_size: self.buf.len() as u64,
                    });
                }
                let Some(owner) = self.owner else {
                    return Err(GgufError::NestingTooDeep { offset: at });
                };
                let repr = match elem_type {
                    ValueType::String => {
                        // len × 8 ≤ bytes left was checked above: this allocation is bounded by the file.
                        let mut offs = Vec::with_capacity(len as usize);
                        for _ in 0..len {
                            offs.push(self.skip_string(what)?);
                        }
                        ArrayRepr::Strings(offs)
                    }
                    ValueType::Array => {
                        let item = std::mem::size_of::<Array>() as u64;
                        if len.saturating_mul(item) > self.remaining() {
                            return Err(GgufError::LengthPastEnd {
                                what: format!("{what} (array of ARRAY)"),
                                offset: len_at,
                                len,
                                file_size: self.buf.len() as u64,
                            });
                        }
                        let mut items = Vec::with_capacity(len as usize);
                        for _ in 0..len {
                            match self.value(ValueType::Array, depth + 1, what)? {
                                Value::Array(a) => items.push(a),
                                _ => unreachable!("value(Array) returns an array"),
                            }
                        }
                        ArrayRepr::Arrays(items)
                    }
                    fixed => {
                        let start = self.pos;
                        self.take(len * fixed.min_size(), what)?;
                        ArrayRepr::Fixed { start }
                    }
                };
                Value::Array(Array {
                    elem_type,
                    len: len as usize,
                    repr,
                    backing: owner.clone(),
                })
            }
        })
    }
}

/// How [`GgufFile::open_with`] brings a model file into memory: llama.cpp's `use_mmap` (`--no-mmap`
/// turns it off) and `use_mlock` (`--mlock`), `src/llama-mmap.cpp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadMode {
    /// Map the file (pages read on demand, shared with the page cache); false reads the whole file
    /// into memory owned by the process.
    pub mmap: bool,
    /// Lock the file's bytes in RAM (`mlock`), so the weights are never swapped out. When the OS
    /// refuses (`RLIMIT_MEMLOCK`, `ulimit -l`), a warning is logged and loading goes on, as llama.cpp
    /// does.
    pub mlock: bool,
}

impl Default for LoadMode {
    /// Mapped, not locked (llama.cpp's defaults).
    fn default() -> Self {
        LoadMode {
            mmap: true,
            mlock: false,
        }
    }
}

/// Maps `path` read-only, or reads it whole without `mode.mmap`; then locks it with `mode.mlock`.
/// Errors: [`GgufError::Io`] naming the path (a refused lock is only a warning).
fn map_file(path: &Path, mode: LoadMode) -> Result<Backing, GgufError> {
    let io = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let backing = if len == 0 {
        Backing::Owned(Vec::new())
    } else if !mode.mmap {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut buf).map_err(io)?;
        Backing::Owned(buf)
    } else {
        // SAFETY: the map is read-only; a file changed underneath us by another process is the
        // documented risk of every mmap reader (llama.cpp's included) and is not undefined behaviour
        // for reads of plain bytes on the platforms we support.
        Backing::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
    };
    if mode.mlock {
        lock_bytes(path, backing.bytes());
    }
    Ok(backing)
}

/// `mlock`s `bytes` (llama.cpp `llama_mlock::raw_lock`); a refusal is a warning naming the limit to
/// raise. The lock lasts as long as the memory: unmapping (or freeing a large buffer, which the
/// allocator unmaps) releases it.
fn lock_bytes(path: &Path, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: mlock only pins the pages of a live allocation we borrow; it reads or writes nothing.
    let rc = unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let limit = {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit into the struct we own.
            if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } == 0 {
                if r.rlim_cur == libc::RLIM_INFINITY {
                    "unlimited".to_string()
                } else {
                    format!("{} bytes", r.rlim_cur)
                }
            } else {
                "unknown".to_string()
            }
        };
        tracing::warn!(
            "--mlock: failed to mlock the {}-byte file {}: {err} (RLIMIT_MEMLOCK is {limit}); \
             going on without the lock; try increasing RLIMIT_MEMLOCK ('ulimit -l' as root)",
            bytes.len(),
            path.display()
        );
    } else {
        tracing::info!(bytes = bytes.len(), "--mlock: model file locked in memory");
    }
}

/// The parts of a split GGUF's file name (llama.cpp `llama_split_prefix`): `m-Q4_K_M-00002-of-00003.gguf`
/// → (`m-Q4_K_M`, 2, 3), the part number from 1. None for a name without that ending (`.gguf` in any
/// case) or with a part number of 0 or above the count.
pub fn split_name(file_name: &str) -> Option<(&str, u32, u32)> {
    let stem = file_name.get(..file_name.len().checked_sub(5)?)?;
    if !file_name.get(stem.len()..)?.eq_ignore_ascii_case(".gguf") {
        return None;
    }
    // "-NNNNN-of-NNNNN" is 15 characters.
    let cut = stem.len().checked_sub(15)?;
    let (prefix, tail) = (stem.get(..cut)?, stem.get(cut..)?);
    let b = tail.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b[0] != b'-' || &tail[6..10] != "-of-" || !digits(1..6) || !digits(10..15) {
        return None;
    }
    let index: u32 = tail[1..6].parse().ok()?;
    let count: u32 = tail[10..15].parse().ok()?;
    (index >= 1 && index <= count).then_some((prefix, index, count))
}

/// The file name of part `index` (from 1) of `count` (llama.cpp `llama_split_path`:
/// `PREFIX-%05d-of-%05d.gguf`).
pub fn split_file_name(prefix: &str, index: u32, count: u32) -> String {
    format!("{prefix}-{index:05}-of-{count:05}.gguf")
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl GgufFile {
    /// Maps and parses the file at `path`. When it is the first part of a split GGUF (`split.count` > 1,
    /// as llama.cpp's `gguf-split` writes), the other parts are opened from the same folder by the
    /// same naming (`PREFIX-0000k-of-0000N.gguf`, llama.cpp `llama_split_path`) and their tensors are
    /// joined to the first file's; metadata is the first file's.
    ///
    /// Errors: [`GgufError::Io`] when the file cannot be opened or mapped; [`GgufError::Split`] for a
    /// later part given instead of the first, a first part whose name does not follow the pattern, a
    /// missing or unreadable part (its path and parse error), or parts that disagree (part number,
    /// part count, a tensor in two parts, the tensor total); else any parse error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        Self::open_with(path, LoadMode::default())
    }

    /// [`GgufFile::open`] with every part brought into memory as `mode` says (read instead of mapped,
    /// locked in RAM). Errors: as [`GgufFile::open`]; a refused `mlock` is only a warning.
    pub fn open_with(path: impl AsRef<Path>, mode: LoadMode) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let mut f = Self::parse(map_file(path, mode)?)?;
        f.parts[0].path = Some(path.to_path_buf());
        let split_err = |path: &Path, reason: String| GgufError::Split {
            path: path.to_path_buf(),
            reason,
        };
        let int_key = |f: &GgufFile, key: &str| -> Result<Option<u64>, GgufError> {
            match f.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_int()
                    .and_then(|i| u64::try_from(i).ok())
                    .map(Some)
                    .ok_or_else(|| Self::wrong(key, "an unsigned integer", v)),
            }
        };
        let count = int_key(&f, keys::SPLIT_COUNT)?.unwrap_or(1);
        let no = int_key(&f, keys::SPLIT_NO)?.unwrap_or(0);
        if count <= 1 {
            return Ok(f);
        }
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let named = split_name(&file_name);
        if no != 0 {
            let first = named.map_or_else(
                || "its first part".to_string(),
                |(prefix, _, n)| split_file_name(prefix, 1, n),
            );
            return Err(split_err(
                path,
                format!(
                    "this is part {} of {count} of a split GGUF; open the first part ({first})",
                    no + 1
                ),
            ));
        }
        let Some((prefix, 1, n)) = named.filter(|(_, _, n)| u64::from(*n) == count) else {
            return Err(split_err(
                path,
                format!(
                    "this is part 1 of {count} of a split GGUF, but its name does not end in \
                     `-00001-of-{count:05}.gguf`, so the other parts cannot be found"
                ),
            ));
        };
        let dir = path.parent().unwrap_or(Path::new(""));
        for i in 1..n {
            let p = dir.join(split_file_name(prefix, i + 1, n));
            let part = map_file(&p, mode)
                .and_then(Self::parse)
                .map_err(|e| split_err(&p, format!("part {} of {n} cannot be read: {e}", i + 1)))?;
            let (pno, pcount) = (
                int_key(&part, keys::SPLIT_NO).map_err(|e| split_err(&p, e.to_string()))?,
                int_key(&part, keys::SPLIT_COUNT).map_err(|e| split_err(&p, e.to_string()))?,
            );
            if pno != Some(u64::from(i)) || pcount != Some(count) {
                return Err(split_err(
                    &p,
                    format!(
                        "expected part {} of {n} (split.no {i}, split.count {n}), found split.no \
                         {pno:?}, split.count {pcount:?}",
                        i + 1
                    ),
                ));
            }
            let GgufFile { parts, tensors, .. } = part;
            let index = f.parts.len();
            for mut t in tensors {
                if f.tensor_index.contains_key(&t.name) {
                    return Err(split_err(
                        &p,
                        format!("tensor {:?} is also in an earlier part", t.name),
                    ));
                }
                t.part = index;
                f.tensor_index.insert(t.name.clone(), f.tensors.len());
                f.tensors.push(t);
            }
            f.parts.extend(parts.into_iter().map(|mut q| {
                q.path = Some(p.clone());
                q
            }));
        }
        if let Some(total) = int_key(&f, keys::SPLIT_TENSORS_COUNT)?
            && total != f.tensors.len() as u64
        {
            return Err(split_err(
                path,
                format!(
                    "split.tensors.count is {total}, but the {n} parts hold {} tensors",
                    f.tensors.len()
                ),
            ));
        }
        Ok(f)
    }

    /// Parses a GGUF image held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Backing::Owned(bytes))
    }

    /// Parses one file (a split part on its own: no other part is opened).
    fn parse(backing: Backing) -> Result<Self, GgufError> {
        let backing = Arc::new(backing);
        let buf = backing.bytes();
        let file_size = buf.len() as u64;
        let mut c = Cursor {
            buf,
            pos: 0,
            owner: Some(&backing),
        };
        let magic = c.take(4, "magic").map_err(|_| GgufError::BadMagic {
            found: buf[..buf.len().min(4)].to_vec(),
        })?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let at = c.pos as u64;
        let n_tensors = c.u64("tensor count")?;
        // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        if n_tensors.checked_mul(24).is_none_or(|b| b > c.remaining()) {
            return Err(GgufError::LengthPastEnd {
                what: "tensor count".into(),
                offset: at,
                len: n_tensors,
                file_size,
            });
        }
        let at = c.pos as u64;
        let n_kv = c.u64("metadata count")?;
        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        if n_kv.checked_mul(13).is_none_or(|b| b > c.remaining()) {
            return Err(GgufError::LengthPastEnd {
                what: "metadata count".into(),
                offset: at,
                len: n_kv,
                file_size,
            });
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key_at = c.pos as u64;
            let key = c.string("metadata key")?;
            let type_at = c.pos as u64;
            let type_id = c.u32("metadata value type")?;
            let ty = ValueType::from_id(type_id).ok_or(GgufError::UnknownValueType {
                type_id,
                offset: type_at,
            })?;
            let value = c.value(ty, 0, &format!("value of {key:?}"))?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey {
                    key,
                    offset: key_at,
                });
            }
            metadata.push((key, value));
        }

        let alignment = match key_index.get(keys::ALIGNMENT).map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) => *a as u64,
            Some(v) => {
                return Err(GgufError::WrongType {
                    key: keys::ALIGNMENT.into(),
                    expected: "UINT32",
                    found: v.describe(),
                });
            }
        };
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment { value: alignment });
        }

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let info_at = c.pos as u64;
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimension count")?;
            if n_dims as usize > MAX_DIMS {
                return Err(GgufError::TooManyDims {
                    name,
                    n_dims,
                    offset: info_at,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            let type_at = c.pos as u64;
            let type_id = c.u32("tensor type")?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                name: name.clone(),
                type_id,
                offset: type_at,
            })?;
            let offset = c.u64("tensor data offset")?;
            // ggml: every dim fits in i64 and the element count does too.
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| {
                    if d > i64::MAX as u64 {
                        None
                    } else {
                        acc.checked_mul(d)
                    }
                })
                .filter(|&n| n <= i64::MAX as u64);
            let Some(n_elements) = n_elements else {
                return Err(GgufError::BadDims {
                    name,
                    dims,
                    offset: info_at,
                });
            };
            let ne0 = dims.first().copied().unwrap_or(1);
            if ne0 % ty.block_size() as u64 != 0 {
                return Err(GgufError::NotBlockMultiple {
                    name,
                    ty,
                    ne0,
                    block_size: ty.block_size(),
                    offset: info_at,
                });
            }
            let n_bytes = (n_elements / ty.block_size() as u64)
                .checked_mul(ty.type_size() as u64)
                .ok_or_else(|| GgufError::BadDims {
                    name: name.clone(),
                    dims: dims.clone(),
                    offset: info_at,
                })?;
            if offset % alignment != 0 {
                return Err(GgufError::Misaligned {
                    name,
                    data_offset: offset,
                    alignment,
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor {
                    name,
                    offset: info_at,
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
                part: 0,
            });
        }

        let data_offset = align_up(c.pos as u64, alignment).unwrap_or(u64::MAX);
        for t in &tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(_), Some(e)) if e <= file_size => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        file_size,
                    });
                }
            }
        }
        // Tensors must not share bytes (ggml lays them out back to back with padding).
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(GgufError::TensorsOverlap {
                    a: w[0].name.clone(),
                    b: w[1].name.clone(),
                });
            }
        }

        Ok(GgufFile {
            parts: vec![Part {
                backing,
                data_offset,
                path: None,
            }],
            version,
            alignment,
            data_offset,
            metadata,
            key_index,
            tensors,
            tensor_index,
        })
    }

    /// Size of the whole model: the file, or all parts of a split GGUF together (bytes).
    pub fn file_size(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| p.backing.bytes().len() as u64)
            .sum()
    }

    /// The files read: one, or every part of a split GGUF in part order (empty for an in-memory image).
    pub fn paths(&self) -> Vec<&Path> {
        self.parts
            .iter()
            .filter_map(|p| p.path.as_deref())
            .collect()
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    fn wrong(key: &str, expected: &'static str, v: &Value) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: v.describe(),
        }
    }

    /// An unsigned integer of any width that fits in u32 (llama.cpp accepts any integer type for
    /// hyper-parameters). Errors: missing key, a non-integer, or a value out of range.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        v.as_int()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| Self::wrong(key, "an unsigned 32-bit integer", v))
    }

    /// An integer of any width that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_int()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| Self::wrong(key, "an unsigned 64-bit integer", v))
    }

    /// An integer of any width that fits in i32.
    pub fn get_i32(&self, key: &str) -> Result<i32, GgufError> {
        let v = self.require(key)?;
        v.as_int()
            .and_then(|i| i32::try_from(i).ok())
            .ok_or_else(|| Self::wrong(key, "a 32-bit integer", v))
    }

    /// A FLOAT32 or FLOAT64 value as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        v.as_float()
            .map(|f| f as f32)
            .ok_or_else(|| Self::wrong(key, "FLOAT32", v))
    }

    /// A BOOL value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Self::wrong(key, "BOOL", v)),
        }
    }

    /// A STRING value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(Self::wrong(key, "STRING", v)),
        }
    }

    /// An ARRAY value of any element type.
    pub fn get_array(&self, key: &str) -> Result<&Array, GgufError> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(Self::wrong(key, "ARRAY", v)),
        }
    }

    /// An ARRAY of STRING.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let a = self.get_array(key)?;
        let wrong = || GgufError::WrongType {
            key: key.into(),
            expected: "ARRAY of STRING",
            found: format!("ARRAY of {}", a.elem_type.name()),
        };
        if a.elem_type != ValueType::String {
            return Err(wrong());
        }
        (0..a.len())
            .map(|i| a.str_at(i).ok_or_else(wrong))
            .collect()
    }

    /// An ARRAY of FLOAT32/FLOAT64 as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let a = self.get_array(key)?;
        a.iter()
            .map(|v| v.as_float().map(|f| f as f32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                expected: "ARRAY of FLOAT32",
                found: format!("ARRAY of {}", a.elem_type.name()),
            })
    }

    /// An ARRAY of any integer type whose items fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let a = self.get_array(key)?;
        a.iter()
            .map(|v| v.as_int().and_then(|i| i32::try_from(i).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                expected: "ARRAY of INT32",
                found: format!("ARRAY of {}", a.elem_type.name()),
            })
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str(keys::ARCHITECTURE)
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor's data (checked against its file's size when the file was parsed).
    /// `info` must come from this model's [`GgufFile::tensors`].
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let part = &self.parts[info.part];
        let start = (part.data_offset + info.offset) as usize;
        &part.backing.bytes()[start..start + info.n_bytes as usize]
    }

    /// Total number of elements in all tensors (the parameter count).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_elements()).sum()
    }

    /// A fingerprint of the model: SHA-256 over, for each file in part order, its size (u64 LE) and
    /// its bytes before the data section (header, metadata, tensor infos: names, shapes, types and
    /// offsets). Two files with different metadata or tensor layout differ; reading it touches only
    /// the headers (a few MB at most), not the tensor data. Saved slot files carry it
    /// ([`crate::engine::model::Context::seq_state_save`]).
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for p in &self.parts {
            let bytes = p.backing.bytes();
            h.update((bytes.len() as u64).to_le_bytes());
            let end = usize::try_from(p.data_offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            h.update(&bytes[..end]);
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny writer for hand-made GGUF images.
    pub(crate) struct Builder {
        pub kv: Vec<u8>,
        pub n_kv: u64,
        pub ti: Vec<u8>,
        pub n_t: u64,
        pub data: Vec<u8>,
    }

    impl Builder {
        pub fn new() -> Self {
            Builder {
                kv: vec![],
                n_kv: 0,
                ti: vec![],
                n_t: 0,
                data: vec![],
            }
        }
        fn str(buf: &mut Vec<u8>, s: &str) {
            buf.extend((s.len() as u64).to_le_bytes());
            buf.extend(s.as_bytes());
        }
        pub fn kv_u32(mut self, k: &str, v: u32) -> Self {
            Self::str(&mut self.kv, k);
            self.kv.extend(4u32.to_le_bytes());
            self.kv.extend(v.to_le_bytes());
            self.n_kv += 1;
            self
        }
        pub fn kv_str(mut self, k: &str, v: &str) -> Self {
            Self::str(&mut self.kv, k);
            self.kv.extend(8u32.to_le_bytes());
            Self::str(&mut self.kv, v);
            self.n_kv += 1;
            self
        }
        pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
            Self::str(&mut self.ti, name);
            self.ti.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.ti.extend(d.to_le_bytes());
            }
            self.ti.extend(ty.to_le_bytes());
            self.ti.extend(offset.to_le_bytes());
            self.n_t += 1;
            self
        }
        pub fn build(self) -> Vec<u8> {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend(self.n_t.to_le_bytes());
            b.extend(self.n_kv.to_le_bytes());
            b.extend(self.kv);
            b.extend(self.ti);
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
            b.extend(self.data);
            b
        }
    }

    #[test]
    fn parses_a_small_file() {
        let mut bld = Builder::new()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2);
        bld = bld.tensor("a", &[4, 2], 0, 0).tensor("b", &[32], 8, 32);
        bld.data = vec![0u8; 32 + 34];
        let f = GgufFile::from_bytes(bld.build()).unwrap();
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(f.tensor("b").unwrap().n_bytes, 34);
        assert!(matches!(
            f.get_str("llama.block_count"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.get_u32("nope"),
            Err(GgufError::MissingKey { .. })
        ));
    }

    #[test]
    fn split_keys_are_checked_before_any_other_part_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, img: Vec<u8>| {
            let p = dir.path().join(name);
            std::fs::write(&p, img).unwrap();
            p
        };
        let err = |p: &Path| GgufFile::open(p).expect_err("a broken split").to_string();
        // A first part whose name gives no way to find the others.
        let img = Builder::new().kv_u32(keys::SPLIT_COUNT, 2).build();
        let m = err(&write("model.gguf", img.clone()));
        assert!(
            m.contains("part 1 of 2") && m.contains("-00001-of-00002.gguf"),
            "{m}"
        );
        // The name and split.count disagree.
        let m = err(&write("m-00001-of-00003.gguf", img));
        assert!(m.contains("-00001-of-00002.gguf"), "{m}");
        // A later part.
        let img = Builder::new()
            .kv_u32(keys::SPLIT_COUNT, 2)
            .kv_u32(keys::SPLIT_NO, 1)
            .build();
        let m = err(&write("m-00002-of-00002.gguf", img));
        assert!(
            m.contains("part 2 of 2") && m.contains("m-00001-of-00002.gguf"),
            "{m}"
        );
        // A count of the wrong type.
        let img = Builder::new().kv_str(keys::SPLIT_COUNT, "two").build();
        let m = err(&write("s-00001-of-00002.gguf", img));
        assert!(m.contains("split.count"), "{m}");
        // A missing part is named; a count of 1 is an ordinary file.
        let img = Builder::new().kv_u32(keys::SPLIT_COUNT, 2).build();
        let m = err(&write("t-00001-of-00002.gguf", img));
        assert!(
            m.contains("t-00002-of-00002.gguf") && m.contains("part 2 of 2"),
            "{m}"
        );
        let img = Builder::new().kv_u32(keys::SPLIT_COUNT, 1).build();
        assert!(GgufFile::open(write("u-00001-of-00001.gguf", img)).is_ok());
        assert_eq!(split_name("a/b-00002-of-00010.GGUF"), Some(("a/b", 2, 10)));
        assert_eq!(split_name("b-00000-of-00010.gguf"), None);
        assert_eq!(split_name("b-00011-of-00010.gguf"), None);
        assert_eq!(split_name("b-0001-of-00010.gguf"), None);
        assert_eq!(split_file_name("x", 3, 12), "x-00003-of-00012.gguf");
    }

    #[test]
    fn rejects_hostile_headers() {
        assert!(matches!(
            GgufFile::from_bytes(b"GGUX\x03\0\0\0".to_vec()),
            Err(GgufError::BadMagic { .. })
        ));
        assert!(matches!(
            GgufFile::from_bytes(b"GG".to_vec()),
            Err(GgufError::BadMagic { .. })
        ));
        assert!(matches!(
            GgufFile::from_bytes(b"GGUF\x01\0\0\0".to_vec()),
            Err(GgufError::UnsupportedVersion { version: 1 })
        ));
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend(u64::MAX.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::LengthPastEnd { .. })
        ));
        // A string whose length runs past the end.
        let mut img = Builder::new().kv_str("k", "v").build();
        img[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::LengthPastEnd { .. })
        ));
        // Five dims, unknown type, misaligned, out of bounds, duplicate.
        let five = Builder::new().tensor("t", &[1, 1, 1, 1, 1], 0, 0).build();
        assert!(matches!(
            GgufFile::from_bytes(five),
            Err(GgufError::TooManyDims { .. })
        ));
        let unk = Builder::new().tensor("t", &[1], 4, 0).build();
        assert!(matches!(
            GgufFile::from_bytes(unk),
            Err(GgufError::UnknownTensorType { type_id: 4, .. })
        ));
        let mis = Builder::new().tensor("t", &[1], 0, 3).build();
        assert!(matches!(
            GgufFile::from_bytes(mis),
            Err(GgufError::Misaligned { .. })
        ));
        let oob = Builder::new().tensor("t", &[1000], 0, 0).build();
        assert!(matches!(
            GgufFile::from_bytes(oob),
            Err(GgufError::TensorOutOfBounds { .. })
        ));
        let mut dup = Builder::new()
            .tensor("t", &[8], 0, 0)
            .tensor("t", &[8], 0, 32);
        dup.data = vec![0; 64];
        assert!(matches!(
            GgufFile::from_bytes(dup.build()),
            Err(GgufError::DuplicateTensor { .. })
        ));
        let ovf = Builder::new().tensor("t", &[u64::MAX / 2, 4], 0, 0).build();
        assert!(matches!(
            GgufFile::from_bytes(ovf),
            Err(GgufError::BadDims { .. })
        ));
        let blk = Builder::new().tensor("t", &[33], 2, 0).build();
        assert!(matches!(
            GgufFile::from_bytes(blk),
            Err(GgufError::NotBlockMultiple { .. })
        ));
    }
}
