//! The worker's HTTP error type and its one mapping to OpenAI's error envelope and a status code.
//! Internal failures are logged with their details; the client gets a generic message.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::openai::{ErrorEnvelope, ErrorKind};

/// Everything a worker endpoint can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request cannot be served as asked (400). `param` names the field at fault.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, for the client.
        message: String,
        /// The request field at fault.
        param: Option<&'static str>,
        /// A machine-readable code.
        code: Option<&'static str>,
    },
    /// The prompt does not fit a slot's context (400, llama-server's `exceed_context_size_error`
    /// with `n_prompt_tokens` and `n_ctx`; code `context_length_exceeded` as OpenAI).
    #[error("{message}")]
    ContextExceeded {
        /// What is wrong, for the client.
        message: String,
        /// The request field at fault.
        param: &'static str,
        /// The prompt's tokens.
        n_prompt_tokens: usize,
        /// The slot's context (tokens).
        n_ctx: usize,
    },
    /// The server or the model cannot do this (501, llama-server's `not_supported_error`).
    #[error("{0}")]
    NotSupported(String),
    /// Temporarily unable (503), with the reason.
    #[error("{0}")]
    Unavailable(String),
    /// Missing or wrong API key (401).
    #[error("invalid API key")]
    Unauthorized,
    /// Unknown route (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The model is still loading (503).
    #[error("the model is loading")]
    Loading,
    /// The scheduler is gone (shutting down) (503).
    #[error("the worker is shutting down")]
    ShuttingDown,
    /// Every slot is busy and the queue is full (503 with `Retry-After`).
    #[error("the worker is busy: {0} requests are running or waiting")]
    Busy(usize),
    /// A failure on our side (500); the detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param,
            code: None,
        }
    }

    /// The status and envelope of this error — the single mapping used by every endpoint.
    pub fn envelope(&self) -> (StatusCode, ErrorEnvelope) {
        let (kind, message, param, code) = match self {
            ApiError::BadRequest {
                message,
                param,
                code,
            } => (ErrorKind::InvalidRequest, message.clone(), *param, *code),
            ApiError::ContextExceeded {
                message,
                param,
                n_prompt_tokens,
                n_ctx,
            } => {
                let mut env = ErrorEnvelope::new(
                    ErrorKind::ExceedContextSize,
                    message.clone(),
                    Some(param),
                    Some("context_length_exceeded"),
                );
                env.error.n_prompt_tokens = Some(*n_prompt_tokens as u64);
                env.error.n_ctx = Some(*n_ctx as u64);
                return (StatusCode::BAD_REQUEST, env);
            }
            ApiError::NotSupported(m) => (ErrorKind::NotSupported, m.clone(), None, None),
            ApiError::Unavailable(m) => (ErrorKind::Unavailable, m.clone(), None, None),
            ApiError::Unauthorized => (
                ErrorKind::Authentication,
                "invalid or missing API key (send 'Authorization: Bearer KEY')".to_string(),
                None,
                Some("invalid_api_key"),
            ),
            ApiError::NotFound(p) => (ErrorKind::NotFound, format!("no route {p}"), None, None),
            ApiError::Loading => (
                ErrorKind::Unavailable,
                "the model is loading".to_string(),
                None,
                Some("model_loading"),
            ),
            ApiError::ShuttingDown => (
                ErrorKind::Unavailable,
                "the worker is shutting down".to_string(),
                None,
                None,
            ),
            ApiError::Busy(n) => (
                ErrorKind::Unavailable,
                format!(
                    "the worker is busy: {n} requests are running or waiting for a slot; retry shortly"
                ),
                None,
                Some("queue_full"),
            ),
            ApiError::Internal(detail) => {
                tracing::error!("internal error: {detail}");
                (
                    ErrorKind::Server,
                    "internal server error (see the worker's log)".to_string(),
                    None,
                    None,
                )
            }
        };
        let status =
            StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, ErrorEnvelope::new(kind, message, param, code))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.envelope();
        let mut r = (status, Json(body)).into_response();
        if let ApiError::Busy(_) = self {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

/// Parses a JSON request body; malformed JSON or a wrong field type is a 400 naming the problem (serde's
/// message gives the field, line and column).
///
/// Errors: [`ApiError::BadRequest`].
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::bad(format!("{what}: {e}"), None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_status_and_type() {
        let cases = [
            (
                ApiError::bad("x", Some("messages")),
                400,
                "invalid_request_error",
            ),
            (ApiError::Unauthorized, 401, "authentication_error"),
            (ApiError::NotFound("/x".into()), 404, "not_found_error"),
            (ApiError::Loading, 503, "unavailable_error"),
            (ApiError::ShuttingDown, 503, "unavailable_error"),
            (
                ApiError::Internal("secret detail".into()),
                500,
                "server_error",
            ),
        ];
        for (e, status, kind) in cases {
            let (s, env) = e.envelope();
            assert_eq!(s.as_u16(), status);
            assert_eq!(env.error.kind, kind);
            assert!(!env.error.message.contains("secret"));
        }
    }

    #[test]
    fn parse_errors_are_400() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            a: u32,
        }
        let e = parse_json::<T>(b"{").unwrap_err();
        assert!(e.to_string().starts_with("malformed JSON"));
        let e = parse_json::<T>(br#"{"a":"x"}"#).unwrap_err();
        assert!(e.to_string().starts_with("invalid request"), "{e}");
    }
}
