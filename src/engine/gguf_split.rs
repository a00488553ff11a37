//! Writes a GGUF model as split parts (`PREFIX-00001-of-0000N.gguf` …) in the layout of llama.cpp's
//! `gguf-split --split` (tools/gguf-split/gguf-split.cpp at 0c1e570): the first part carries every
//! metadata key of the input, each part carries `split.no`, `split.count` and `split.tensors.count`,
//! and tensors keep their order, each part holding the next run of them. Hugging Face repos publish
//! models above 50 GB this way; [`crate::engine::gguf::GgufFile::open`] reads the parts back as one model.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::gguf::{self, DEFAULT_ALIGNMENT, GgufError, GgufFile, TensorInfo, Value, keys};

/// Errors of [`split`].
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: GgufError,
    },
    #[error("{path} is already split ({count} parts); split the original file instead")]
    AlreadySplit { path: PathBuf, count: u64 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Plan(String),
}

/// `cyber-inference gguf-split INPUT OUTPUT_PREFIX`: the options of llama.cpp's `gguf-split --split`.
#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    /// The GGUF model to split.
    pub input: PathBuf,
    /// Output path without the `-00001-of-0000N.gguf` ending (e.g. `out/model-Q4_K_M`).
    pub output_prefix: PathBuf,
    /// Most tensors per part.
    #[arg(long, default_value_t = 128)]
    pub split_max_tensors: usize,
    /// Most bytes of tensor data per part, with an optional K, M or G suffix (powers of 1024); a
    /// single tensor larger than this gets a part of its own. Overrides --split-max-tensors.
    #[arg(long, value_parser = parse_size)]
    pub split_max_size: Option<u64>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` is not a size such as 500M or 2G"))
}

/// How to cut the tensor list into parts.
#[derive(Clone, Copy, Debug)]
pub enum SplitPlan {
    /// At most this many tensors per part (≥ 1).
    MaxTensors(usize),
    /// At most this many bytes of tensor data per part (a larger tensor is a part alone).
    MaxBytes(u64),
}

/// Runs `gguf-split`; prints each part written.
///
/// Errors: as [`split`].
pub fn run(args: &SplitArgs) -> Result<(), SplitError> {
    let plan = match args.split_max_size {
        Some(b) => SplitPlan::MaxBytes(b),
        None => SplitPlan::MaxTensors(args.split_max_tensors),
    };
    for p in split(&args.input, &args.output_prefix, plan)? {
        println!("{}", p.display());
    }
    Ok(())
}

/// Splits `input` into parts named `{output_prefix}-{k:05}-of-{n:05}.gguf` and returns their paths in
/// part order. A plan that yields one part still writes one file with the split keys (as llama.cpp).
/// Parts written before an error are removed.
///
/// Errors: [`SplitError::Read`] for an unreadable input, [`SplitError::AlreadySplit`],
/// [`SplitError::Plan`] for a zero limit or more than 65535 parts, [`SplitError::Write`].
pub fn split(
    input: &Path,
    output_prefix: &Path,
    plan: SplitPlan,
) -> Result<Vec<PathBuf>, SplitError> {
    let f = GgufFile::open(input).map_err(|source| SplitError::Read {
        path: input.to_path_buf(),
        source,
    })?;
    if let Some(n) = f.get(keys::SPLIT_COUNT).and_then(Value::as_int)
        && n > 1
    {
        return Err(SplitError::AlreadySplit {
            path: input.to_path_buf(),
            count: n as u64,
        });
    }
    let groups = plan_parts(f.tensors(), plan)?;
    let n = u16::try_from(groups.len())
        .ok()
        .ok_or_else(|| SplitError::Plan(format!("{} parts is too many", groups.len())))?;
    let total = i32::try_from(f.tensors().len())
        .map_err(|_| SplitError::Plan("too many tensors".into()))?;
    let prefix = output_prefix.to_string_lossy();
    let mut written = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let path = PathBuf::from(gguf::split_file_name(&prefix, i as u32 + 1, n.into()));
        written.push(path.clone());
        if let Err(source) = write_part(&f, &path, i as u16, n, total, group) {
            for p in &written {
                let _ = std::fs::remove_file(p);
            }
            return Err(SplitError::Write { path, source });
        }
    }
    Ok(written)
}

/// Indices of the tensors of each part, in file order.
fn plan_parts(tensors: &[TensorInfo], plan: SplitPlan) -> Result<Vec<Vec<usize>>, SplitError> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut bytes = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let cur = groups.last_mut().expect("one group at least");
        let full = match plan {
            SplitPlan::MaxTensors(0) | SplitPlan::MaxBytes(0) => {
                return Err(SplitError::Plan("the split limit must be above 0".into()));
            }
            SplitPlan::MaxTensors(m) => cur.len() >= m,
            SplitPlan::MaxBytes(m) => !cur.is_empty() && bytes + t.n_bytes > m,
        };
        if full {
            groups.push(vec![i]);
            bytes = t.n_bytes;
        } else {
            cur.push(i);
            bytes += t.n_bytes;
        }
    }
    Ok(groups)
}

fn write_part(
    f: &GgufFile,
    path: &Path,
    no: u16,
    count: u16,
    total: i32,
    group: &[usize],
) -> std::io::Result<()> {
    let alignment = f.alignment;
    let mut kv: Vec<(&str, Value)> = vec![
        (keys::SPLIT_NO, Value::U16(no)),
        (keys::SPLIT_COUNT, Value::U16(count)),
        (keys::SPLIT_TENSORS_COUNT, Value::I32(total)),
    ];
    if no == 0 {
        kv.extend(
            f.metadata()
                .iter()
                .filter(|(k, _)| !k.starts_with("split."))
                .map(|(k, v)| (k.as_str(), v.clone())),
        );
    } else if alignment != DEFAULT_ALIGNMENT {
        kv.push((keys::ALIGNMENT, Value::U32(alignment as u32)));
    }
    let tensors: Vec<&TensorInfo> = group.iter().map(|&i| &f.tensors()[i]).collect();
    let mut w = Counting {
        w: BufWriter::with_capacity(1 << 20, File::create(path)?),
        pos: 0,
    };
    let put = |w: &mut Counting, b: &[u8]| w.put(b);
    put(&mut w, &gguf::GGUF_MAGIC)?;
    put(&mut w, &3u32.to_le_bytes())?;
    put(&mut w, &(tensors.len() as u64).to_le_bytes())?;
    put(&mut w, &(kv.len() as u64).to_le_bytes())?;
    let mut buf = Vec::new();
    for (k, v) in &kv {
        buf.clear();
        put_str(&mut buf, k);
        buf.extend(v.value_type().id().to_le_bytes());
        put_value(&mut buf, v);
        put(&mut w, &buf)?;
    }
    let mut offset = 0u64;
    for t in &tensors {
        buf.clear();
        put_str(&mut buf, &t.name);
        buf.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            buf.extend(d.to_le_bytes());
        }
        buf.extend(t.ty.id().to_le_bytes());
        buf.extend(offset.to_le_bytes());
        put(&mut w, &buf)?;
        offset = (offset + t.n_bytes).next_multiple_of(alignment);
    }
    let pad = |pos: u64| vec![0u8; (pos.next_multiple_of(alignment) - pos) as usize];
    let header_pad = pad(w.pos);
    put(&mut w, &header_pad)?;
    for t in &tensors {
        put(&mut w, f.tensor_data(t))?;
        put(&mut w, &pad(t.n_bytes))?;
    }
    w.w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// A writer that counts the bytes written (for the alignment padding).
struct Counting {
    w: BufWriter<File>,
    pos: u64,
}

impl Counting {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.pos += b.len() as u64;
        self.w.write_all(b)
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

/// A value's bytes without its type tag (arrays: element type, count, items).
fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend(x.to_le_bytes()),
        Value::I16(x) => buf.extend(x.to_le_bytes()),
        Value::U32(x) => buf.extend(x.to_le_bytes()),
        Value::I32(x) => buf.extend(x.to_le_bytes()),
        Value::F32(x) => buf.extend(x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_str(buf, s),
        Value::U64(x) => buf.extend(x.to_le_bytes()),
        Value::I64(x) => buf.extend(x.to_le_bytes()),
        Value::F64(x) => buf.extend(x.to_le_bytes()),
        Value::Array(a) => {
            buf.extend(a.elem_type().id().to_le_bytes());
            buf.extend((a.len() as u64).to_le_bytes());
            for item in a.iter() {
                put_value(buf, &item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn plans_cut_in_order() {
        let t = |n: u64| TensorInfo {
            name: String::new(),
            dims: vec![n],
            ty: crate::engine::ggml_type::GgmlType::F32,
            offset: 0,
            n_bytes: n,
            part: 0,
        };
        let ts = [t(10), t(10), t(30), t(5), t(5)];
        let g = plan_parts(&ts, SplitPlan::MaxTensors(2)).unwrap();
        assert_eq!(g, vec![vec![0, 1], vec![2, 3], vec![4]]);
        let g = plan_parts(&ts, SplitPlan::MaxBytes(20)).unwrap();
        assert_eq!(g, vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert!(plan_parts(&ts, SplitPlan::MaxTensors(0)).is_err());
    }
}
