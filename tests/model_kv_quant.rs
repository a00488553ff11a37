//! A quantized KV cache (`-ctk`/`-ctv`) on the real SmolLM2 file: perplexity on `../shared/vectors/ppl.txt`
//! with each cache type within 1% (q8_0, q4_0; see [`tolerance`] for the others) of llama.cpp's with the same
//! types, whose cache stores Walsh–Hadamard-rotated keys and values as ours does (recorded by `scripts/kv-quant-ppl` in
//! `tests/vectors/kv-quant-ppl.json`), and the cache's bytes as computed (`KvLayout::cache_bytes_typed`, what
//! the memory estimate uses) equal to what the process really commits for it.

mod support;

use std::sync::{Mutex, MutexGuard, OnceLock};

use cyber_inference::engine::gguf::GgufFile;
use cyber_inference::engine::kv_layout::kv_layout;
use cyber_inference::engine::model::cli::perplexity;
use cyber_inference::engine::model::{Context, ContextParams, KvType};
use support::assets::{model, repo_path, shared_vectors_dir};
use support::files::{read_json, sha256_file};
use support::model::load;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The tests of this file run one at a time: the memory test reads the process's RSS.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn record() -> &'static serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let doc = read_json(&repo_path("tests/vectors/kv-quant-ppl.json"));
        assert_eq!(
            doc["model"]["sha256"].as_str(),
            Some(sha256_file(&model(SMOL)).as_str()),
            "tests/vectors/kv-quant-ppl.json was made from another {SMOL}"
        );
        doc
    })
}

fn context(ty: KvType, n_ctx: usize, n_batch: usize) -> Context {
    Context::new(
        load(SMOL),
        ContextParams {
            n_ctx,
            n_seq_max: 1,
            n_batch,
            n_threads: 2,
            embeddings: false,
            type_k: ty,
            type_v: ty,
        },
    )
    .expect("context")
}

/// How far (relative) our perplexity may be from llama.cpp's with cache type `name`: 1% for q8_0 and q4_0
/// (issue 18's bar) and f16; 2% for the other types, whose rounding on this 838-token text moves the
/// perplexity by more than that bar on its own — llama.cpp's two f16 runs of the same file (`-ub 128` and
/// `-ub 1`) are already 1.5% apart.
fn tolerance(name: &str) -> f64 {
    match name {
        "f16" | "q8_0" | "q4_0" => 0.01,
        _ => 0.02,
    }
}

/// Our perplexity with keys and values cached as `name`, against llama.cpp's with the same `-ctk`/`-ctv`.
fn check(name: &str) {
    let _g = serial();
    let doc = record();
    let run = doc["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| r["type_k"] == name)
        .unwrap_or_else(|| panic!("tests/vectors/kv-quant-ppl.json has no {name} run"));
    let ty = KvType::parse(name).expect("a cache type");
    let n_ctx = doc["n_ctx"].as_u64().unwrap() as usize;
    let n_batch = doc["n_batch"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(shared_vectors_dir().join("ppl.txt")).expect("ppl.txt");
    let mut ctx = context(ty, n_ctx, n_batch);
    let model = load(SMOL);
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, true, false);
    let add_bos = if tok.add_bos() { tok.bos() } else { None };
    let r = perplexity(&mut ctx, &tokens, n_ctx, n_batch, add_bos, |_, _| {}).unwrap();
    let want = run["ppl"].as_f64().unwrap();
    let want_ub1 = run["ppl_ub1"].as_f64().unwrap();
    let rel = (r.ppl - want).abs() / want;
    eprintln!(
        "-ctk {name} -ctv {name}: PPL {:.4}; llama.cpp {want} ({:.3}% apart), token by token {want_ub1} ({:.3}% apart)",
        r.ppl,
        rel * 100.0,
        (r.ppl - want_ub1).abs() / want_ub1 * 100.0
    );
    assert!(
        rel <= tolerance(name),
        "-ctk {name}: PPL {} vs llama.cpp's {want}: {:.3}% apart (more than {}%)",
        r.ppl,
        rel * 100.0,
        tolerance(name) * 100.0
    );
}

#[test]
fn perplexity_with_an_f16_cache_matches_llama_cpp() {
    check("f16");
}

#[test]
fn perplexity_with_a_q8_0_cache_is_within_1_percent_of_llama_cpp() {
    check("q8_0");
}

#[test]
fn perplexity_with_a_q4_0_cache_is_within_1_percent_of_llama_cpp() {
    check("q4_0");
}

#[test]
fn perplexity_with_the_other_cache_types_is_within_1_percent_of_llama_cpp() {
    for name in ["q4_1", "q5_0", "q5_1", "iq4_nl", "bf16"] {
        check(name);
    }
}

/// Anonymous resident memory of this process (`RssAnon`, bytes): what the heap commits. `VmRSS` also
/// counts the model file's mapped pages, which the kernel may fault in by whole large folios (2 MiB and
/// more) whenever any weight is read, so it moves with things the cache does not do.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon");
    kb * 1024
}

#[test]
fn the_cache_commits_the_bytes_the_estimate_computes() {
    let _g = serial();
    let f = GgufFile::open(model(SMOL)).unwrap();
    let layout = kv_layout(&f).unwrap();
    let _ = load(SMOL);
    // The first large context of a process also pays a one-time ~6 MiB beside its cache (allocator and
    // page-table state); a small context first pays some of it, the slack covers the rest.
    drop(context(KvType::F16, 512, 512));
    let n_ctx = 16384;
    for ty in [KvType::F16, KvType::Q8_0, KvType::Q4_0, KvType::F32] {
        let want = layout.cache_bytes_typed(n_ctx as u64, 1, ty, ty);
        let before = rss();
        let ctx = context(ty, n_ctx, 512);
        let grown = rss().saturating_sub(before);
        drop(ctx);
        eprintln!(
            "-ctk/-ctv {}: estimate {:.1} MiB, RSS grew {:.1} MiB",
            ty.name(),
            want as f64 / 1048576.0,
            grown as f64 / 1048576.0
        );
        // The cache is committed whole at creation (never less), and a context's thread pool and
        // one-time costs are a few MiB beside it.
        let slack = 12 << 20;
        assert!(
            grown + (1 << 20) >= want && grown <= want + slack,
            "{}: the cache should commit {want} bytes, RSS grew by {grown}",
            ty.name()
        );
    }
    assert_eq!(
        layout.cache_bytes_typed(4096, 2, KvType::Q8_0, KvType::Q4_0),
        2 * 4096 * 30 * (192 / 32 * 34 + 192 / 32 * 18),
        "SmolLM2: 30 layers, 3 KV heads of 64"
    );
}
