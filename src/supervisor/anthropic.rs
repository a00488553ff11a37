//! Anthropic's Messages API on the supervisor's port: `POST /v1/messages` (streamed as Anthropic's
//! server-sent events, or one `message`) and `POST /v1/messages/count_tokens`, through
//! [`crate::openai::anthropic`]'s translations to the model's worker (loaded on demand, the API-key
//! rules of `/v1` with `x-api-key` accepted as the key, the request log). Errors are Anthropic's
//! `{"type": "error", "error": {"type", "message"}}` with the right status.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
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
use crate::openai::anthropic::{self as an, EventWriter, MessagesRequest, TranslateError};
use crate::openai::stream::{ChatAccumulator, parse_chat_chunk};

/// SSE events buffered towards a slow client before the worker's stream waits.
const EVENTS_BUFFERED: usize = 32;

/// An error in Anthropic's envelope.
#[derive(Debug)]
pub struct AnthropicError(pub Failure);

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let status = self.0.status;
        (
            status,
            Json(an::error_body(status.as_u16(), &self.0.message)),
        )
            .into_response()
    }
}

macro_rules! into_anthropic {
    ($($t:ty),*) => {$(
        impl From<$t> for AnthropicError {
            fn from(e: $t) -> Self {
                AnthropicError(e.into())
            }
        }
    )*};
}
into_anthropic!(Failure, TranslateError, ApiError);

type Api<T> = Result<T, AnthropicError>;

/// Anthropic's clients send the key as `x-api-key`: it is taken as `Authorization: Bearer` (when no
/// Authorization header came), so the `/v1` key rules apply unchanged.
async fn x_api_key(mut req: Request, next: Next) -> Response {
    if !req.headers().contains_key(header::AUTHORIZATION)
        && let Some(k) = req.headers().get("x-api-key").and_then(|v| v.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", k.trim()))
    {
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    next.run(req).await
}

fn parse(body: &[u8]) -> Res<MessagesRequest> {
    serde_json::from_slice(body).map_err(|e| Failure::bad(format!("invalid request body: {e}")))
}

fn new_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// Folds the worker's chat stream; with `out`, writes Anthropic's events as the chunks come.
async fn fold(
    run: &mut Run,
    resp: reqwest::Response,
    mut out: Option<(&mut EventWriter, &StreamTx)>,
) -> Res<ChatAccumulator> {
    let mut acc = ChatAccumulator::new();
    let mut sse = SseReader::new(run, resp);
    let r: Res<()> = async {
        while let Some(d) = sse.next().await? {
            let step = acc.push(&parse_chat_chunk(&d)?);
            if let Some((w, tx)) = out.as_mut() {
                for (name, data) in w.step(&step, &acc) {
                    tx.send(sse_event(name, &data)).await?;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        return Err(run.fail(e));
    }
    let u = acc.usage.unwrap_or_default();
    run.finish_ok(&u);
    Ok(acc)
}

/// `POST /v1/messages`.
async fn messages(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Response> {
    let key = key?.0;
    let req = parse(&body)?;
    let oa = an::chat_request(&req, true)?;
    let mut run = Run::start(&st, &req.model, "/v1/messages", key, None).await?;
    let resp = match run.post("/v1/chat/completions", &oa).await {
        Ok(r) => r,
        Err(e) => return Err(run.fail(e).into()),
    };
    let id = new_id();
    if !req.stream.unwrap_or(false) {
        let acc = fold(&mut run, resp, None).await?;
        return Ok(Json(an::message(&id, &req.model, &acc)).into_response());
    }
    let (tx, rx) = stream_channel(&st, &run.row.name, run.endpoint, EVENTS_BUFFERED);
    let model = req.model.clone();
    tokio::spawn(async move {
        let mut w = EventWriter::new(&id, &model);
        for (name, data) in w.start() {
            if tx.send(sse_event(name, &data)).await.is_err() {
                return;
            }
        }
        match fold(&mut run, resp, Some((&mut w, &tx))).await {
            Ok(acc) => {
                for (name, data) in w.finish(&acc) {
                    if tx.send(sse_event(name, &data)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let body = an::error_body(e.status.as_u16(), &e.message);
                let _ = tx.send(sse_event("error", &body)).await;
            }
        }
    });
    channel_response(rx, "text/event-stream")
        .map_err(|e| AnthropicError(Failure::bad_gateway(e.to_string())))
}

/// `POST /v1/messages/count_tokens`: the tokens of the prompt the request renders to (system, messages
/// and tools through the model's chat template, as `/v1/messages` would evaluate them).
async fn count_tokens(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Json<Value>> {
    let key = key?.0;
    let req = parse(&body)?;
    let mut oa = an::chat_request(&req, false)?;
    oa.sampling.stream = None;
    oa.sampling.stream_options = None;
    let mut run = Run::start(&st, &req.model, "/v1/messages/count_tokens", key, None).await?;
    let r: Res<usize> = async {
        let v = run.post_json("/apply-template", &oa).await?;
        let prompt = v["prompt"]
            .as_str()
            .ok_or_else(|| Failure::bad_gateway("bad /apply-template answer"))?;
        Ok(run.tokenize(prompt, true, true).await?.len())
    }
    .await;
    match r {
        Ok(n) => {
            run.finish(200, Some((Some(n as i64), None)));
            Ok(Json(json!({"input_tokens": n})))
        }
        Err(e) => Err(run.fail(e).into()),
    }
}

/// The Messages routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .layer(DefaultBodyLimit::max(crate::http_server::MAX_BODY_BYTES))
        .route_layer(middleware::from_fn(x_api_key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn errors_are_anthropics_envelope() {
        let r = AnthropicError(Failure::not_found("nope")).into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let e: AnthropicError = ApiError::invalid_api_key("an API key is required").into();
        assert_eq!(e.0.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            an::error_body(401, "x")["error"]["type"],
            "authentication_error"
        );
    }
}
