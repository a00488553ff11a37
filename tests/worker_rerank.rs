//! Reranking on the synthetic BERT cross-encoder `synth-bert-rerank` (`scripts/synth-models`: pooling type
//! rank, `cls` + `cls.output` classification head, one label) against llama.cpp's scores recorded in
//! `tests/vectors/synth/synth-bert-rerank.json`:
//! - the engine: each query/document pair laid out as llama-server's `format_prompt_rerank` gives the
//!   recorded tokens, and its score equals llama.cpp's within [`SCORE_TOL`] (the acceptance line);
//! - the worker with `--reranking`: `/rerank` and `/v1/rerank` (Jina form) and the TEI form (`texts`,
//!   `return_text`) field by field, the order, `top_n`, usage; the errors of bad requests, and the 501 of a
//!   worker started without `--reranking`.

mod support;

use cyber_inference::engine::model::{Context, ContextParams, KvType, Pooling};
use serde_json::{Value, json};
use support::synth::{load, model_file, vectors};
use support::worker::Worker;

const NAME: &str = "synth-bert-rerank";
/// Largest allowed |ours − llama.cpp| of a score.
const SCORE_TOL: f64 = 1e-4;

/// `(query index, document index, tokens, score)` of every recorded pair.
fn pairs(v: &Value) -> Vec<(usize, usize, Vec<u32>, f64)> {
    v["rerank"]["pairs"]
        .as_array()
        .expect("rerank.pairs")
        .iter()
        .map(|p| {
            (
                p["query"].as_u64().unwrap() as usize,
                p["document"].as_u64().unwrap() as usize,
                serde_json::from_value(p["tokens"].clone()).unwrap(),
                p["scores"][0].as_f64().unwrap(),
            )
        })
        .collect()
}

fn texts(v: &Value, key: &str) -> Vec<String> {
    serde_json::from_value(v["rerank"][key].clone()).unwrap()
}

#[test]
fn rerank_scores_equal_llama_cpp() {
    let v = vectors(NAME);
    let model = load(NAME);
    assert_eq!(model.pooling(), Pooling::Rank);
    assert_eq!(model.hparams().n_cls_out, 1);
    assert_eq!(v["n_cls_out"], 1);
    let (queries, docs) = (texts(&v, "queries"), texts(&v, "documents"));
    let mut ctx = Context::new(
        model.clone(),
        ContextParams {
            n_ctx: 512,
            n_seq_max: 1,
            n_batch: 512,
            n_threads: 2,
            embeddings: true,
            type_k: KvType::F16,
            type_v: KvType::F16,
        },
    )
    .expect("context");
    let cases = pairs(&v);
    assert_eq!(cases.len(), queries.len() * docs.len());
    let mut worst = 0.0f64;
    for (qi, di, want_tokens, want) in &cases {
        let tokens = model.rerank_tokens(&queries[*qi], &docs[*di]);
        assert_eq!(&tokens, want_tokens, "pair ({qi}, {di}): tokens");
        let got = ctx.rank(&tokens).expect("rank");
        assert_eq!(got.len(), 1, "n_cls_out scores");
        let d = (got[0] as f64 - want).abs();
        worst = worst.max(d);
        assert!(
            d <= SCORE_TOL,
            "pair ({qi}, {di}): score {} vs llama.cpp {want} (|d| = {d:.3e})",
            got[0]
        );
    }
    eprintln!(
        "{} pairs, max |ours - llama.cpp| = {worst:.3e}",
        cases.len()
    );
    // The scores differ between pairs (the test would not see a constant head).
    let spread = cases.iter().map(|c| c.3).fold(f64::MIN, f64::max)
        - cases.iter().map(|c| c.3).fold(f64::MAX, f64::min);
    assert!(spread > 0.5, "recorded scores spread {spread}");
    // Rank pooling gives scores, not embeddings.
    let err = ctx.embed(&cases[0].2).unwrap_err().to_string();
    assert!(err.contains("rank"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_endpoints_answer_as_llama_server() {
    let v = vectors(NAME);
    let path = model_file(NAME);
    let (queries, docs) = (texts(&v, "queries"), texts(&v, "documents"));
    let cases = pairs(&v);
    let w = Worker::start(&path, &["--reranking", "-a", "ranker"]);
    for (qi, query) in queries.iter().enumerate() {
        // Expected: llama.cpp's scores of this query, best first.
        let mut want: Vec<(usize, f64, usize)> = cases
            .iter()
            .filter(|c| c.0 == qi)
            .map(|c| (c.1, c.3, c.2.len()))
            .collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        let n_tokens: usize = want.iter().map(|w| w.2).sum();
        for path in ["/rerank", "/v1/rerank", "/reranking", "/v1/reranking"] {
            let (st, r) = w
                .post(path, &json!({"query": query, "documents": docs}))
                .await;
            assert_eq!(st, 200, "{path}: {r}");
            assert_eq!(r["model"], "ranker", "{path}");
            assert_eq!(r["object"], "list");
            assert_eq!(r["usage"]["prompt_tokens"], n_tokens, "{path}: {r}");
            assert_eq!(r["usage"]["total_tokens"], n_tokens);
            let results = r["results"].as_array().expect("results");
            assert_eq!(results.len(), docs.len());
            for (k, (res, (di, score, _))) in results.iter().zip(&want).enumerate() {
                assert_eq!(res.as_object().unwrap().len(), 2, "{path}: {res}");
                assert_eq!(res["index"], *di, "{path}: result {k} of query {qi}: {r}");
                let got = res["relevance_score"].as_f64().expect("relevance_score");
                assert!(
                    (got - score).abs() <= SCORE_TOL,
                    "{path}: document {di}: {got} vs llama.cpp {score}"
                );
            }
        }
        // top_n keeps the best; the request's model name is echoed.
        let (st, r) = w
            .post(
                "/v1/rerank",
                &json!({"model": "m", "query": query, "documents": docs, "top_n": 2}),
            )
            .await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["model"], "m");
        let idx: Vec<u64> = r["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, [want[0].0 as u64, want[1].0 as u64]);
        assert_eq!(
            r["usage"]["prompt_tokens"], n_tokens,
            "usage counts every document"
        );
        // TEI: `texts` → a bare array of {index, score, text}.
        let (st, r) = w
            .post(
                "/rerank",
                &json!({"query": query, "texts": docs, "return_text": true, "top_n": 3}),
            )
            .await;
        assert_eq!(st, 200, "{r}");
        let arr = r.as_array().expect("TEI answers an array");
        assert_eq!(arr.len(), 3);
        for (res, (di, score, _)) in arr.iter().zip(&want) {
            assert_eq!(res["index"], *di);
            assert!((res["score"].as_f64().unwrap() - score).abs() <= SCORE_TOL);
            assert_eq!(res["text"], docs[*di]);
            assert_eq!(res.as_object().unwrap().len(), 3);
        }
    }
    // Bad requests: llama-server's messages.
    let bad = [
        (json!({"documents": ["a"]}), "\"query\" must be provided"),
        (
            json!({"query": 3, "documents": ["a"]}),
            "\"query\" must be a string",
        ),
        (
            json!({"query": "q", "documents": []}),
            "\"documents\" must be a non-empty string array",
        ),
        (
            json!({"query": "q"}),
            "\"documents\" must be a non-empty string array",
        ),
        (
            json!({"query": "q", "documents": [1]}),
            "\"documents\" must be a non-empty string array",
        ),
        (
            json!({"query": "q", "documents": vec!["d"; 513]}),
            "at most 512",
        ),
        (
            json!({"query": "q", "documents": ["d"], "top_n": -1}),
            "\"top_n\"",
        ),
        (
            json!({"query": "q", "documents": ["word ".repeat(600)]}),
            "n_ctx",
        ),
    ];
    for (body, want) in bad {
        let (st, r) = w.post("/rerank", &body).await;
        assert_eq!(st, 400, "{body}: {r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{body}: {msg:?} lacks {want:?}");
    }
    // Embeddings are refused: rank pooling gives scores.
    let (st, r) = w.post("/v1/embeddings", &json!({"input": "x"})).await;
    assert_eq!(st, 501, "{r}");
    let (st, _) = w.post("/embedding", &json!({"content": "x"})).await;
    assert_eq!(st, 501);
    drop(w);

    // Without --reranking, /rerank is llama-server's 501.
    let w = Worker::start(&path, &[]);
    let (st, r) = w
        .post("/rerank", &json!({"query": "q", "documents": ["d"]}))
        .await;
    assert_eq!(st, 501, "{r}");
    assert_eq!(
        r["error"]["message"],
        "This server does not support reranking. Start it with `--reranking`"
    );
    assert_eq!(r["error"]["type"], "not_supported_error");
}

/// Through the supervisor: the catalogue knows the file as a reranker, its worker is started with
/// `--reranking` (not `--embedding`), and `/v1/rerank` is proxied to it by the request's `model`,
/// with llama.cpp's scores in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_serves_a_reranker() {
    use support::server::{Server, worker_of};
    let v = vectors(NAME);
    let path = model_file(NAME);
    let (queries, docs) = (texts(&v, "queries"), texts(&v, "documents"));
    let cases = pairs(&v);
    let s = Server::start(&[], &[]).await;
    std::os::unix::fs::symlink(&path, s.models_dir().join(format!("{NAME}.gguf"))).unwrap();
    let token = s.login().await;
    let (st, j) = s
        .admin_post(&token, "/admin/api/models/scan", json!({}))
        .await;
    assert_eq!(st, 200, "{j}");
    let (st, m) = s
        .admin_get(&token, &format!("/admin/api/models/{NAME}"))
        .await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["model"]["reranking"], true, "{m}");
    let (st, r) = s
        .post_json(
            "/v1/rerank",
            json!({"model": NAME, "query": queries[0], "documents": docs, "top_n": 2}),
        )
        .await;
    assert_eq!(st, 200, "{r}\n{}", s.log());
    let mut want: Vec<(usize, f64)> = cases
        .iter()
        .filter(|c| c.0 == 0)
        .map(|c| (c.1, c.3))
        .collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1));
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "top_n: {r}");
    for (res, (di, score)) in results.iter().zip(&want) {
        assert_eq!(res["index"], *di, "{r}");
        let got = res["relevance_score"].as_f64().unwrap();
        assert!((got - score).abs() <= SCORE_TOL, "{got} vs {score}");
    }
    let w = worker_of(&s, &token, NAME).await.expect("a worker");
    let cmd = support::process::proc_cmdline(w["pid"].as_u64().unwrap() as u32);
    assert!(
        cmd.contains(" --reranking") && !cmd.contains(" --embedding"),
        "{cmd}"
    );
    // A chat model is not a reranker: its worker answers 501 through the proxy, not a hang.
    let (st, r) = s
        .post_json("/v1/embeddings", json!({"model": NAME, "input": "x"}))
        .await;
    assert_eq!(st, 501, "rank pooling gives no embeddings: {r}");
}
