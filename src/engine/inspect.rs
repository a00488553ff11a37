//! `cyber-inference inspect`: what a GGUF file holds, as text or JSON (the fields of gguf-py's dump).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value as Json, json};

use crate::engine::gguf::{GgufError, GgufFile, Value, keys};

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// List every tensor (name, type, shape, bytes).
    #[arg(long)]
    pub tensors: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Quantization mix: per ggml type name, (tensor count, bytes).
pub fn type_mix(f: &GgufFile) -> BTreeMap<&'static str, (usize, u64)> {
    let mut mix = BTreeMap::new();
    for t in f.tensors() {
        let e = mix.entry(t.ty.name()).or_insert((0usize, 0u64));
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    mix
}

/// The summary that `inspect` prints, as JSON. Metadata arrays carry their type, length and first 8 items.
pub fn summary_json(f: &GgufFile, with_tensors: bool) -> Json {
    let arch = f.architecture().ok();
    let ctx = arch.and_then(|a| f.get_u64(&keys::context_length(a)).ok());
    let vocab = f.get_array(keys::TOKENIZER_TOKENS).map(|a| a.len()).ok();
    let unsupported = unsupported_reason(f);
    let metadata: Vec<Json> = f
        .metadata()
        .iter()
        .map(|(k, v)| match v {
            Value::Array(a) => json!({
                "key": k, "type": "ARRAY", "array_type": a.elem_type().name(), "array_len": a.len(),
                "array_head": a.iter().take(8).map(|v| v.to_json()).collect::<Vec<_>>(),
            }),
            v => json!({"key": k, "type": v.value_type().name(), "value": v.to_json()}),
        })
        .collect();
    let mix: serde_json::Map<String, Json> = type_mix(f)
        .into_iter()
        .map(|(t, (n, b))| (t.to_string(), json!({"tensors": n, "bytes": b})))
        .collect();
    let mut out = json!({
        "size": f.file_size(),
        "version": f.version,
        "alignment": f.alignment,
        "data_offset": f.data_offset,
        "tensor_count": f.tensors().len(),
        "kv_count": f.metadata().len(),
        "architecture": arch,
        "name": f.get_str(keys::NAME).ok(),
        "parameters": f.parameter_count(),
        "quantization": mix,
        "context_length": ctx,
        "vocab_size": vocab,
        "tokenizer_model": f.get_str(keys::TOKENIZER_MODEL).ok(),
        "chat_template": f.get(keys::CHAT_TEMPLATE).is_some(),
        "runnable": unsupported.is_none(),
        "unsupported_reason": unsupported,
        "metadata": metadata,
    });
    if with_tensors {
        out["tensors"] = f
            .tensors()
            .iter()
            .map(|t| {
                json!({"name": t.name, "type": t.ty.name(), "type_id": t.ty.id(), "shape": t.dims,
                       "offset": t.offset, "n_bytes": t.n_bytes})
            })
            .collect();
    }
    out
}

/// Why this engine cannot run `f` (the error its loader would give: architecture, a missing key or
/// tensor, a tensor type without a kernel, the tokenizer), or `None` when it can.
pub fn unsupported_reason(f: &GgufFile) -> Option<String> {
    crate::engine::model::check_runnable(f)
        .err()
        .map(|e| e.to_string())
}

/// Human-readable count: 134.52M, 1.10B.
pub fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.2}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Runs `inspect`. Errors: the file cannot be opened or is not valid GGUF.
pub fn run(args: &InspectArgs) -> Result<(), GgufError> {
    let f = GgufFile::open(&args.file)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary_json(&f, args.tensors)).unwrap_or_default()
        );
        return Ok(());
    }
    let s = summary_json(&f, false);
    let show = |v: &Json| match v {
        Json::Null => "-".to_string(),
        Json::String(s) => s.clone(),
        v => v.to_string(),
    };
    println!("file:            {}", args.file.display());
    println!("size:            {} bytes", f.file_size());
    let paths = f.paths();
    if paths.len() > 1 {
        println!(
            "split:           {} parts (sizes summed above)",
            paths.len()
        );
        for p in paths {
            println!("                 {}", p.display());
        }
    }
    println!(
        "GGUF version:    {} (alignment {}, data at byte {})",
        f.version, f.alignment, f.data_offset
    );
    println!("architecture:    {}", show(&s["architecture"]));
    println!("name:            {}", show(&s["name"]));
    println!(
        "parameters:      {} ({})",
        f.parameter_count(),
        human_count(f.parameter_count())
    );
    println!("context length:  {}", show(&s["context_length"]));
    println!(
        "vocabulary:      {} tokens, tokenizer {}",
        show(&s["vocab_size"]),
        show(&s["tokenizer_model"])
    );
    println!(
        "chat template:   {}",
        if f.get(keys::CHAT_TEMPLATE).is_some() {
            "yes"
        } else {
            "no"
        }
    );
    match s["unsupported_reason"].as_str() {
        None => println!("runnable:        yes"),
        Some(why) => println!("runnable:        no: {why}"),
    }
    println!("tensors:         {}", f.tensors().len());
    println!("quantization mix:");
    for (t, (n, b)) in type_mix(&f) {
        println!("  {t:<8} {n:>5} tensors {b:>14} bytes");
    }
    println!("metadata ({} keys):", f.metadata().len());
    for (k, v) in f.metadata() {
        let mut text = v.to_string();
        if text.len() > 120 {
            text = format!("{}…", text.chars().take(117).collect::<String>());
        }
        println!("  {k:<45} {:<8} {text}", v.describe());
    }
    if args.tensors {
        println!("tensors:");
        for t in f.tensors() {
            println!(
                "  {:<40} {:<8} {:<22} {:>12} bytes",
                t.name,
                t.ty.name(),
                format!("{:?}", t.dims),
                t.n_bytes
            );
        }
    }
    Ok(())
}
