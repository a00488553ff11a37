//! all-MiniLM-L6-v2 embeddings against llama.cpp's (`../shared/vectors`): cosine ≥ 0.9999 for every text,
//! through the library and through `cyber-inference embed`.

mod support;

use cyber_inference::engine::model::{Context, ContextParams};
use support::assets::{MINILM, model};
use support::model::*;
use support::process::bin;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn reference() -> Vec<(String, Vec<f32>)> {
    let v = vectors(MINILM);
    v["embeddings"]
        .as_array()
        .expect("embeddings list")
        .iter()
        .map(|e| {
            (
                e["text"].as_str().expect("text").to_string(),
                e["embedding"]
                    .as_array()
                    .expect("embedding")
                    .iter()
                    .map(|x| x.as_f64().expect("number") as f32)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn minilm_embeddings_match_llama_cpp() {
    let model = load(MINILM);
    assert!(model.is_encoder());
    let mut ctx = Context::new(
        model.clone(),
        ContextParams {
            n_ctx: 512,
            n_batch: 512,
            n_threads: 2,
            embeddings: true,
            ..Default::default()
        },
    )
    .unwrap();
    let refs = reference();
    assert_eq!(refs.len(), 8);
    for (text, want) in &refs {
        let tokens = model.tokenizer().encode(text, true, true);
        let got = ctx.embed(&tokens).unwrap();
        assert_eq!(got.len(), 384);
        let norm: f64 = got.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{text:?}: norm {norm}");
        let c = cosine(&got, want);
        eprintln!("{text:?}: cosine {c:.7}");
        assert!(c >= 0.9999, "{text:?}: cosine {c} < 0.9999");
    }
}

#[test]
fn embed_cli_prints_one_normalised_line_per_text() {
    let refs = reference();
    let out = bin()
        .args(["embed", "-t", "1", "-m"])
        .arg(model(MINILM))
        .arg(&refs[0].0)
        .arg(&refs[1].0)
        .output()
        .expect("running cyber-inference embed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    for (line, (t, want)) in lines.iter().zip(&refs) {
        let v: Vec<f32> = line.split(' ').map(|x| x.parse().unwrap()).collect();
        assert!(cosine(&v, want) >= 0.9999, "{t:?}");
    }
}
