//! OpenAI's Responses API on the supervisor's port: `POST /v1/responses` (streamed as its events, or
//! one `response`), `GET` and `DELETE /v1/responses/{id}`, through [`crate::openai::responses`]'s
//! translations to the model's worker (loaded on demand, the `/v1` API-key rules, the request log).
//! Responses are stored in SQLite (unless `store: false`) for [`RETENTION_MS`] so that
//! `previous_response_id` continues their conversation. Errors are OpenAI's envelope.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;
use super::auth::ApiKey;
use super::error::ApiError;
use super::foreign::{
    Failure, Res, Run, SseReader, StreamTx, channel_response, sse_event, stream_channel,
};
use crate::openai::ChatMessage;
use crate::openai::responses::{self as rs, EventWriter, Ids, ResponsesRequest};
use crate::openai::stream::{ChatAccumulator, parse_chat_chunk};

/// How long stored responses are kept (30 days).
pub const RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;
/// SSE events buffered towards a slow client.
const EVENTS_BUFFERED: usize = 32;

fn api_error(f: Failure) -> ApiError {
    let kind = match f.status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    ApiError::new(f.status, kind, f.message)
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The conversation of a stored response (what `previous_response_id` continues).
async fn history(st: &AppState, id: &str) -> Res<Vec<ChatMessage>> {
    let row = st.db.get_response(id).await?.ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            format!("previous_response_id: no stored response '{id}'"),
        )
    })?;
    serde_json::from_str(&row.messages).map_err(|e| {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored response '{id}' is unreadable: {e}"),
        )
    })
}

/// Folds the worker's stream (writing events to `out` when given), stores the response unless
/// `store: false`, logs the request.
async fn fold(
    run: &mut Run,
    resp: reqwest::Response,
    req: &ResponsesRequest,
    ids: &Ids,
    mut conversation: Vec<ChatMessage>,
    mut out: Option<(&mut EventWriter, &StreamTx)>,
) -> Res<(ChatAccumulator, Value)> {
    let mut acc = ChatAccumulator::new();
    let mut sse = SseReader::new(run, resp);
    let r: Res<()> = async {
        while let Some(d) = sse.next().await? {
            let step = acc.push(&parse_chat_chunk(&d)?);
            if let Some((w, tx)) = out.as_mut() {
                for (name, data) in w.step(&step, &acc) {
                    tx.send(sse_event(&name, &data)).await?;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        return Err(run.fail(e));
    }
    let body = rs::response(req, ids, Some(&acc));
    if req.store.unwrap_or(true) {
        conversation.push(rs::reply_messages(&acc));
        let msgs = serde_json::to_string(&conversation).unwrap_or_else(|_| "[]".into());
        if let Err(e) = run
            .st
            .db
            .insert_response(
                &ids.response,
                &run.row.name,
                &msgs,
                &body.to_string(),
                RETENTION_MS,
            )
            .await
        {
            return Err(run.fail(e.into()));
        }
    }
    let u = acc.usage.unwrap_or_default();
    run.finish_ok(&u);
    Ok((acc, body))
}

/// `POST /v1/responses`.
async fn create(
    State(st): State<AppState>,
    ApiKey(key): ApiKey,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ResponsesRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    let past = match &req.previous_response_id {
        Some(id) => history(&st, id).await.map_err(api_error)?,
        None => Vec::new(),
    };
    let oa = rs::chat_request(&req, past).map_err(|e| ApiError::bad_request(e.0))?;
    // What is stored: the conversation without the instructions (they apply per request).
    let conversation: Vec<ChatMessage> = if req.instructions.as_ref().is_some_and(|i| !i.is_empty())
    {
        oa.messages[1..].to_vec()
    } else {
        oa.messages.clone()
    };
    let mut run = Run::start(&st, &req.model, "/v1/responses", key, None)
        .await
        .map_err(api_error)?;
    let resp = match run.post("/v1/chat/completions", &oa).await {
        Ok(r) => r,
        Err(e) => return Err(api_error(run.fail(e))),
    };
    let ids = Ids {
        response: format!("resp_{}", uuid::Uuid::new_v4().simple()),
        message: format!("msg_{}", uuid::Uuid::new_v4().simple()),
        created_at: now_s(),
    };
    if !req.stream.unwrap_or(false) {
        let (_, body) = fold(&mut run, resp, &req, &ids, conversation, None)
            .await
            .map_err(api_error)?;
        return Ok(Json(body).into_response());
    }
    let (tx, rx) = stream_channel(&st, &run.row.name, run.endpoint, EVENTS_BUFFERED);
    tokio::spawn(async move {
        let mut w = EventWriter::new(ids.clone());
        for (name, data) in w.start(&req) {
            if tx.send(sse_event(&name, &data)).await.is_err() {
                return;
            }
        }
        match fold(
            &mut run,
            resp,
            &req,
            &ids,
            conversation,
            Some((&mut w, &tx)),
        )
        .await
        {
            Ok((acc, _)) => {
                for (name, data) in w.finish(&req, &acc) {
                    if tx.send(sse_event(&name, &data)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let body = json!({"type": "error", "code": null, "message": e.message, "param": null,
                                  "sequence_number": 0});
                let _ = tx.send(sse_event("error", &body)).await;
            }
        }
    });
    channel_response(rx, "text/event-stream").map_err(|e| ApiError::internal(e.to_string()))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no stored response '{id}'"))
}

/// `GET /v1/responses/{id}`.
async fn get_one(
    State(st): State<AppState>,
    _k: ApiKey,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = st
        .db
        .get_response(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    let v: Value =
        serde_json::from_str(&row.response).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(v))
}

/// `DELETE /v1/responses/{id}`.
async fn delete_one(
    State(st): State<AppState>,
    _k: ApiKey,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !st.db.delete_response(&id).await? {
        return Err(not_found(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "response.deleted", "deleted": true}),
    ))
}

/// The Responses routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/responses", post(create))
        .route(
            "/v1/responses/{id}",
            axum::routing::get(get_one).delete(delete_one),
        )
        .layer(DefaultBodyLimit::max(crate::http_server::MAX_BODY_BYTES))
}
