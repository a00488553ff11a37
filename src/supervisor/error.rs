//! Errors of the supervisor: [`ServeError`] for start-up (a clear message, non-zero exit) and
//! [`ApiError`] for HTTP answers, always in OpenAI's error shape
//! `{"error": {"message", "type", "code", "param"}}` so OpenAI clients show the message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Why `serve`, `init`, `list-models` or `remove-model` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to start: HOST={host} is not a loopback address and no admin password is set. Anyone who can reach this port would reach the admin side; set CYBER_INFERENCE_ADMIN_PASSWORD (or listen on 127.0.0.1)"
    )]
    NoPasswordOnNetwork { host: String },
    #[error("cannot create {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] super::db::DbError),
    #[error(transparent)]
    Catalog(#[from] super::catalog::CatalogError),
    #[error(transparent)]
    Auth(#[from] super::auth::AuthError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("JWT secret file {path} is invalid: {reason}")]
    Secret { path: String, reason: String },
    #[error("{0}")]
    Other(String),
}

/// An HTTP error in OpenAI's envelope.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type` (e.g. `invalid_request_error`).
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds for a `Retry-After` header (503 and 429 answers that will clear).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`, a `type` and a message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", m)
    }
    pub fn invalid_api_key(m: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", m)
        }
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "permission_error", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
    }
    pub fn bad_gateway(m: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("worker_failed"),
            ..Self::new(StatusCode::BAD_GATEWAY, "server_error", m)
        }
    }
    pub fn unavailable(code: &'static str, m: impl Into<String>) -> ApiError {
        ApiError {
            code: Some(code),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", m)
        }
    }

    /// The same error with a `Retry-After` of `secs`.
    pub fn retry_after(self, secs: u64) -> ApiError {
        ApiError {
            retry_after: Some(secs.max(1)),
            ..self
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

/// Seconds a client is told to wait when the database is locked.
pub const DB_BUSY_RETRY_S: u64 = 5;

impl From<super::db::DbError> for ApiError {
    /// A database locked by another process (SQLITE_BUSY / SQLITE_LOCKED past the busy timeout) is a
    /// 503 `database_busy` with `Retry-After`: nothing was written and the same request can succeed
    /// later. Anything else is a 500.
    fn from(e: super::db::DbError) -> ApiError {
        if e.is_busy() {
            return ApiError {
                code: Some("database_busy"),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    format!(
                        "{e} (another process holds a lock on the database file; nothing was changed, \
                         retry later)"
                    ),
                )
            }
            .retry_after(DB_BUSY_RETRY_S);
        }
        ApiError::internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_error_shape() {
        let e = ApiError::bad_gateway("worker died");
        let b = e.body();
        assert_eq!(b["error"]["message"], "worker died");
        assert_eq!(b["error"]["type"], "server_error");
        assert_eq!(b["error"]["code"], "worker_failed");
        assert_eq!(e.into_response().status(), StatusCode::BAD_GATEWAY);
    }
}
