//! Every weight type the engine has kernels for, on real SmolLM2-135M files made by llama.cpp's own quantizer
//! (`scripts/quantize`: `llama-quantize --allow-requantize --pure` from the shared Q4_1 file): our perplexity on
//! `../shared/vectors/ppl.txt` equal to llama.cpp's on the same file run one token per forward pass (`-ub 1`,
//! the arithmetic of llama.cpp's decode, which our batch-invariant engine uses for every batch size), and
//! its distance to llama.cpp's default batched run printed (`tests/vectors/quant-ppl.json`).
//!
//! The files live in `$CYBER_INFERENCE_ASSETS/quant/`. When one is missing, the test makes them with
//! `scripts/quantize --files`, which needs llama.cpp's `llama-quantize` (built by `../shared/tools/llama-cpp`,
//! found through `LLAMA_CPP_REF`); without it the test fails and says so. Each file's SHA-256 must equal the one
//! recorded from llama.cpp's output, so the bytes tested are the bytes llama.cpp measured.

mod support;

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use cyber_inference::engine::ggml_type::GgmlType;
use cyber_inference::engine::gguf::GgufFile;
use cyber_inference::engine::model::cli::perplexity;
use cyber_inference::engine::model::{Context, ContextParams, KvType};
use support::assets::{assets, repo_path, shared_vectors_dir};
use support::files::{read_json, sha256_file};
use support::model::load_path;

/// `tests/vectors/quant-ppl.json`.
fn record() -> &'static serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| read_json(&repo_path("tests/vectors/quant-ppl.json")))
}

/// The record of the file of weight type `ty`.
fn entry(ty: &str) -> &'static serde_json::Value {
    record()["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|e| e["type"] == ty)
        .unwrap_or_else(|| panic!("tests/vectors/quant-ppl.json has no {ty} file"))
}

fn quant_dir() -> PathBuf {
    assets().join("quant")
}

/// The path of `e`'s file, made by `scripts/quantize --files` (once per test process) when missing.
fn file_for(e: &serde_json::Value) -> PathBuf {
    static MADE: Mutex<bool> = Mutex::new(false);
    let path = quant_dir().join(e["file"].as_str().expect("file"));
    if !path.exists() {
        let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
        if !*made {
            let script = repo_path("scripts/quantize");
            let out = std::process::Command::new(&script)
                .arg("--files")
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{} is missing and `scripts/quantize --files` could not make it (it needs llama.cpp's \
                 llama-quantize from ../shared/tools/llama-cpp, found through LLAMA_CPP_REF):\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            *made = true;
        }
    }
    assert!(path.exists(), "{} is missing", path.display());
    let want = e["sha256"].as_str().expect("sha256");
    let got = sha256_file(&path);
    assert_eq!(
        got,
        want,
        "{}: not the file llama.cpp measured (remove it and run scripts/quantize --files)",
        path.display()
    );
    path
}

/// How far our perplexity may be from llama.cpp's token-by-token one (`ppl_ub1`, relative). The quantized
/// types reproduce the float arithmetic of llama.cpp's decode kernels (its repacked GEMV for Q4_0, Q4_K, Q2_K,
/// IQ4_NL, MXFP4; its AVX2 `ggml_vec_dot_*` for the others), so their perplexity is llama.cpp's to the four
/// decimals it prints. F32, F16 and BF16 sum their dot products in another order than ggml's, within 0.1%.
fn tolerance(ty: &str) -> f64 {
    match ty {
        "F32" | "F16" | "BF16" => 1e-3,
        _ => 1e-5,
    }
}

/// Our perplexity on the record's text with its parameters, against llama.cpp's token by token (`ppl_ub1`,
/// `-ub 1`: one token per forward pass, the arithmetic of its decode) within [`tolerance`]; the distance to
/// llama.cpp's batched perplexity (`ppl`, its prompt kernels, which round differently from its own decode)
/// is printed beside llama.cpp's own distance between the two.
fn check(ty: &str) {
    let e = entry(ty);
    let path = file_for(e);
    let want_ty = GgmlType::from_name(ty).expect("a ggml type");
    let f = GgufFile::open(&path).unwrap();
    let n = f.tensors().iter().filter(|t| t.ty == want_ty).count();
    assert!(n > 0, "{}: no {ty} tensor in the file", path.display());
    let model = load_path(&path, 2);
    let doc = record();
    let n_ctx = doc["n_ctx"].as_u64().unwrap() as usize;
    let n_batch = doc["n_batch"].as_u64().unwrap() as usize;
    let text =
        std::fs::read_to_string(shared_vectors_dir().join(doc["text_file"].as_str().unwrap()))
            .expect("ppl.txt");
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, true, false);
    let add_bos = if tok.add_bos() { tok.bos() } else { None };
    let mut ctx = Context::new(
        model.clone(),
        ContextParams {
            n_ctx,
            n_seq_max: 1,
            n_batch,
            n_threads: 2,
            embeddings: false,
            type_k: KvType::F16,
            type_v: KvType::F16,
        },
    )
    .expect("context");
    let r = perplexity(&mut ctx, &tokens, n_ctx, n_batch, add_bos, |_, _| {}).unwrap();
    let batched = e["ppl"].as_f64().unwrap();
    let want = e["ppl_ub1"]
        .as_f64()
        .unwrap_or_else(|| panic!("{ty}: no ppl_ub1 in the record (rerun scripts/quantize)"));
    let rel = (r.ppl - want).abs() / want;
    eprintln!(
        "{ty} ({n} {ty} tensors): PPL {:.4}; llama.cpp token by token {want} ({:.4}% apart), batched \
         {batched} ({:.3}% apart; llama.cpp's own two {:.3}% apart)",
        r.ppl,
        rel * 100.0,
        (r.ppl - batched).abs() / batched * 100.0,
        (want - batched).abs() / batched * 100.0
    );
    assert!(
        rel <= tolerance(ty),
        "{ty}: PPL {} vs llama.cpp's token-by-token {want}: {:.4}% apart",
        r.ppl,
        rel * 100.0
    );
}

/// Every weight type people download, each in one file.
const TYPES: [&str; 16] = [
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q5_1", "Q4_0",
    "Q4_1", "IQ4_NL", "IQ4_XS", "MXFP4",
];

#[test]
fn the_record_covers_every_weight_type() {
    for ty in TYPES {
        let e = entry(ty);
        let types = e["tensor_types"].as_array().expect("tensor_types");
        assert!(
            types.iter().any(|t| t == ty),
            "{ty}: the recorded file has no {ty} tensor: {types:?}"
        );
        assert!(e["ppl"].as_f64().is_some_and(|p| p > 1.0), "{ty}: ppl");
    }
    assert_eq!(record()["files"].as_array().unwrap().len(), TYPES.len());
}

macro_rules! ppl_tests {
    ($($(#[$m:meta])* $name:ident => $ty:literal),* $(,)?) => {
        $(
            #[test]
            $(#[$m])*
            fn $name() {
                check($ty);
            }
        )*
    };
}

ppl_tests! {
    f32_perplexity_matches_llama_cpp => "F32",
    f16_perplexity_matches_llama_cpp => "F16",
    bf16_perplexity_matches_llama_cpp => "BF16",
    q8_0_perplexity_matches_llama_cpp => "Q8_0",
    q6_k_perplexity_matches_llama_cpp => "Q6_K",
    q5_k_perplexity_matches_llama_cpp => "Q5_K",
    q4_k_perplexity_matches_llama_cpp => "Q4_K",
    q3_k_perplexity_matches_llama_cpp => "Q3_K",
    q2_k_perplexity_matches_llama_cpp => "Q2_K",
    q5_0_perplexity_matches_llama_cpp => "Q5_0",
    q5_1_perplexity_matches_llama_cpp => "Q5_1",
    q4_0_perplexity_matches_llama_cpp => "Q4_0",
    q4_1_perplexity_matches_llama_cpp => "Q4_1",
    iq4_nl_perplexity_matches_llama_cpp => "IQ4_NL",
    iq4_xs_perplexity_matches_llama_cpp => "IQ4_XS",
    mxfp4_perplexity_matches_llama_cpp => "MXFP4",
}
