//! llama-server's reranking: `POST /rerank` (also `/reranking`, `/v1/rerank`, `/v1/reranking`) with
//! `--reranking` (pooling rank, embeddings on), in the Jina (`documents`, `relevance_score`) and TEI
//! (`texts`, `score`, `return_text`) forms, as `tools/server/server-context.cpp` (`post_rerank`) and
//! `tools/server/server-common.cpp` (`format_prompt_rerank`, `format_response_rerank`) answer them.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::backend::Pooling;
use super::error::{ApiError, parse_json};
use super::http::{AppState, prepare};
use super::metrics::Endpoint;

/// Most documents one rerank request may carry (each is one forward pass).
pub const MAX_RERANK_DOCUMENTS: usize = 512;

/// llama-server's refusal when reranking is off.
pub(super) const NOT_RERANKING: &str =
    "This server does not support reranking. Start it with `--reranking`";

/// `json_value(body, key, default)` for a string array: the array when `key` holds one of strings,
/// else `None` (llama-server falls back to the default on a missing or mistyped field).
fn string_array(body: &Value, key: &str) -> Option<Vec<String>> {
    body.get(key)?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// One scored document, before sorting.
#[derive(Debug, Clone, PartialEq)]
struct Scored {
    index: usize,
    score: f32,
    n_tokens: usize,
}

/// `format_response_rerank`: the results sorted by score, best first (ties keep request order), cut to
/// `top_n`; `{index, relevance_score}` each, or `{index, score, text?}` in the TEI form (which answers
/// the bare array), else wrapped in `{model, object: "list", usage, results}`.
fn response(
    mut scored: Vec<Scored>,
    docs: Vec<String>,
    tei: bool,
    return_text: bool,
    top_n: usize,
    model: String,
) -> Value {
    let n_tokens: usize = scored.iter().map(|s| s.n_tokens).sum();
    scored.sort_by(|a, b| b.score.total_cmp(&a.score));
    scored.truncate(top_n);
    let label = if tei { "score" } else { "relevance_score" };
    let results: Vec<Value> = scored
        .iter()
        .map(|s| {
            let mut e = json!({"index": s.index, label: s.score});
            if tei && return_text {
                e["text"] = json!(docs[s.index]);
            }
            e
        })
        .collect();
    if tei {
        return Value::Array(results);
    }
    json!({
        "model": model,
        "object": "list",
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        "results": results,
    })
}

/// `POST /rerank`: `query` (a string) and `documents` (or TEI's `texts`, strings), optional `top_n`
/// (default: every document) and, in the TEI form, `return_text`. Each document is scored by the
/// classification head over `format_prompt_rerank`'s layout of the pair (the first of the head's
/// `n_cls_out` values).
///
/// Errors: 501 without `--reranking`; 400 for a missing or non-string `query`, no documents, more than
/// [`MAX_RERANK_DOCUMENTS`], a negative `top_n`, or a pair longer than a slot's context.
pub(super) async fn rerank(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    st.metrics.count_request(Endpoint::Embeddings);
    if !st.info.reranking() {
        return Err(ApiError::NotSupported(NOT_RERANKING.into()));
    }
    let ready = st.ready()?;
    let req: Value = parse_json(&body)?;
    if !req.is_object() {
        return Err(ApiError::bad(
            "the request body must be a JSON object",
            None,
        ));
    }
    let tei = req.get("texts").is_some();
    let query = match req.get("query") {
        None => return Err(ApiError::bad("\"query\" must be provided", Some("query"))),
        Some(Value::String(q)) => q.clone(),
        Some(_) => return Err(ApiError::bad("\"query\" must be a string", Some("query"))),
    };
    let docs = string_array(&req, "documents")
        .or_else(|| string_array(&req, "texts"))
        .unwrap_or_default();
    if docs.is_empty() {
        return Err(ApiError::bad(
            "\"documents\" must be a non-empty string array",
            Some("documents"),
        ));
    }
    if docs.len() > MAX_RERANK_DOCUMENTS {
        return Err(ApiError::bad(
            format!(
                "{} documents; at most {MAX_RERANK_DOCUMENTS} per request",
                docs.len()
            ),
            Some("documents"),
        ));
    }
    let top_n = match req.get("top_n").and_then(Value::as_i64) {
        None => docs.len(),
        Some(n) if n >= 0 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            return Err(ApiError::bad(
                format!("\"top_n\" must not be negative (got {n})"),
                Some("top_n"),
            ));
        }
    };
    let return_text = req
        .get("return_text")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .map_or_else(|| st.info.alias.clone(), str::to_string);

    let codec = ready.codec.clone();
    let body_len = body.len();
    let (docs, inputs) = prepare(body_len, move || {
        let inputs: Vec<Vec<u32>> = docs
            .iter()
            .map(|d| codec.rerank_tokens(&query, d))
            .collect();
        (docs, inputs)
    })
    .await?;
    for ids in &inputs {
        if ids.is_empty() {
            return Err(ApiError::bad(
                "a query/document pair is empty (0 tokens)",
                Some("documents"),
            ));
        }
        if ids.len() > ready.n_ctx_seq {
            return Err(ApiError::ContextExceeded {
                message: format!(
                    "a query/document pair has {} tokens but the context is n_ctx = {} tokens",
                    ids.len(),
                    ready.n_ctx_seq
                ),
                param: "documents",
                n_prompt_tokens: ids.len(),
                n_ctx: ready.n_ctx_seq,
            });
        }
    }
    let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let rows = super::native::embed_all(
        ready,
        inputs,
        Some(Pooling::Rank),
        super::native::Normalize(-1),
    )
    .await?;
    let mut scored = Vec::with_capacity(rows.len());
    for (index, (r, n_tokens)) in rows.iter().zip(lens).enumerate() {
        let score = r.first().and_then(|v| v.first()).copied().ok_or_else(|| {
            ApiError::Internal(format!(
                "document {index}: the classification head gave no score"
            ))
        })?;
        scored.push(Scored {
            index,
            score,
            n_tokens,
        });
    }
    Ok(Json(response(scored, docs, tei, return_text, top_n, model)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(scores: &[f32]) -> Vec<Scored> {
        scores
            .iter()
            .enumerate()
            .map(|(index, &score)| Scored {
                index,
                score,
                n_tokens: 10 + index,
            })
            .collect()
    }

    #[test]
    fn results_are_sorted_cut_to_top_n_and_shaped_as_llama_server() {
        let docs: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let v = response(
            scored(&[0.5, 2.0, -1.0]),
            docs.clone(),
            false,
            true,
            2,
            "m".into(),
        );
        assert_eq!(
            v,
            json!({"model": "m", "object": "list",
                   "usage": {"prompt_tokens": 33, "total_tokens": 33},
                   "results": [{"index": 1, "relevance_score": 2.0},
                               {"index": 0, "relevance_score": 0.5}]})
        );
        // TEI: a bare array, `score`, the text only with return_text.
        let v = response(
            scored(&[0.5, 2.0, -1.0]),
            docs.clone(),
            true,
            true,
            9,
            "m".into(),
        );
        assert_eq!(
            v,
            json!([{"index": 1, "score": 2.0, "text": "b"},
                   {"index": 0, "score": 0.5, "text": "a"},
                   {"index": 2, "score": -1.0, "text": "c"}])
        );
        let v = response(scored(&[1.0, 1.0]), docs, true, false, 0, "m".into());
        assert_eq!(v, json!([]));
    }

    #[test]
    fn string_arrays_fall_back_on_a_mistyped_field() {
        let body = json!({"documents": [1, 2], "texts": ["x"]});
        assert_eq!(string_array(&body, "documents"), None);
        assert_eq!(string_array(&body, "texts"), Some(vec!["x".to_string()]));
        assert_eq!(string_array(&body, "missing"), None);
    }
}
