//! `requests`: the log of proxied requests and its statistics, and the retention pruning of old
//! history (request-log rows and ended worker sessions).

use sea_query::{Expr, Iden, Order, Query};
use serde::Serialize;

use super::sessions::ModelSessions;
use super::{Db, Result};

#[derive(Iden)]
enum Requests {
    Table,
    Id,
    Model,
    Endpoint,
    Status,
    PromptTokens,
    CompletionTokens,
    DurationMs,
    ApiKeyId,
    CreatedAt,
}

/// The columns of a [`RequestRow`], in its fields' order (what is logged and what is listed).
const REQUEST_ROW: [Requests; 8] = [
    Requests::Model,
    Requests::Endpoint,
    Requests::Status,
    Requests::PromptTokens,
    Requests::CompletionTokens,
    Requests::DurationMs,
    Requests::ApiKeyId,
    Requests::CreatedAt,
];

/// One finished proxied request, for `requests`.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct RequestRow {
    pub model: String,
    pub endpoint: String,
    pub status: i64,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub duration_ms: i64,
    pub api_key_id: Option<i64>,
    pub created_at: i64,
}

/// Aggregates of `requests` per model since a time.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct RequestStats {
    pub model: String,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub avg_duration_ms: f64,
}

impl Db {
    /// Deletes request-log rows created before `before_ms` and ended worker sessions (not loading,
    /// ready or draining) that started before it. Returns (requests, sessions) deleted.
    pub async fn prune_history(&self, before_ms: i64) -> Result<(u64, u64)> {
        let requests = self
            .execute(
                "pruning the request log",
                Query::delete()
                    .from_table(Requests::Table)
                    .and_where(Expr::col(Requests::CreatedAt).lt(before_ms)),
            )
            .await?
            .rows_affected();
        let sessions = self
            .execute(
                "pruning worker sessions",
                Query::delete()
                    .from_table(ModelSessions::Table)
                    .and_where(Expr::col(ModelSessions::StartedAt).lt(before_ms))
                    .and_where(
                        Expr::col(ModelSessions::Status)
                            .is_not_in(["loading", "ready", "draining"]),
                    ),
            )
            .await?
            .rows_affected();
        Ok((requests, sessions))
    }

    /// Logs one finished proxied request.
    pub async fn insert_request(&self, r: &RequestRow) -> Result<()> {
        self.execute(
            "logging a request",
            Query::insert()
                .into_table(Requests::Table)
                .columns(REQUEST_ROW)
                .values_panic([
                    r.model.clone().into(),
                    r.endpoint.clone().into(),
                    r.status.into(),
                    r.prompt_tokens.into(),
                    r.completion_tokens.into(),
                    r.duration_ms.into(),
                    r.api_key_id.into(),
                    r.created_at.into(),
                ]),
        )
        .await?;
        Ok(())
    }

    /// The latest `limit` requests, newest first.
    pub async fn recent_requests(&self, limit: u64) -> Result<Vec<RequestRow>> {
        self.fetch_all(
            "listing requests",
            Query::select()
                .columns(REQUEST_ROW)
                .from(Requests::Table)
                .order_by(Requests::Id, Order::Desc)
                .limit(limit),
        )
        .await
    }

    /// Per-model counts, errors (status ≥ 400), token sums and mean duration since `since_ms`.
    pub async fn request_stats(&self, since_ms: i64) -> Result<Vec<RequestStats>> {
        self.fetch_all(
            "computing request statistics",
            Query::select()
                .column(Requests::Model)
                .expr_as(
                    Expr::col(Requests::Id).count(),
                    sea_query::Alias::new("requests"),
                )
                .expr_as(
                    Expr::cust("COALESCE(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0)"),
                    sea_query::Alias::new("errors"),
                )
                .expr_as(
                    Expr::cust("COALESCE(SUM(prompt_tokens), 0)"),
                    sea_query::Alias::new("prompt_tokens"),
                )
                .expr_as(
                    Expr::cust("COALESCE(SUM(completion_tokens), 0)"),
                    sea_query::Alias::new("completion_tokens"),
                )
                .expr_as(
                    Expr::cust("COALESCE(AVG(duration_ms), 0.0)"),
                    sea_query::Alias::new("avg_duration_ms"),
                )
                .from(Requests::Table)
                .and_where(Expr::col(Requests::CreatedAt).gte(since_ms))
                .group_by_col(Requests::Model)
                .order_by(Requests::Model, Order::Asc),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ScannedModel, now_ms, test_db as db};
    use super::*;

    #[tokio::test]
    async fn history_older_than_the_retention_is_pruned() {
        let (_d, db) = db().await;
        let m = db
            .upsert_scanned(&ScannedModel {
                name: "a".into(),
                file_path: "/m/a.gguf".into(),
                size_bytes: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        let req = |created_at| RequestRow {
            model: "a".into(),
            endpoint: "/v1/completions".into(),
            status: 200,
            prompt_tokens: None,
            completion_tokens: None,
            duration_ms: 1,
            api_key_id: None,
            created_at,
        };
        let now = now_ms();
        let day = 86_400_000;
        db.insert_request(&req(now - 10 * day)).await.unwrap();
        db.insert_request(&req(now)).await.unwrap();
        let old = db.insert_session(m.id, 1, "old", "loading").await.unwrap();
        db.set_session_status(old, "stopped", None).await.unwrap();
        let live = db.insert_session(m.id, 2, "live", "ready").await.unwrap();
        let recent = db
            .insert_session(m.id, 3, "recent", "loading")
            .await
            .unwrap();
        db.set_session_status(recent, "failed", Some("x"))
            .await
            .unwrap();
        // Age the first two sessions.
        sqlx::query("UPDATE model_sessions SET started_at = ? WHERE id IN (?, ?)")
            .bind(now - 10 * day)
            .bind(old)
            .bind(live)
            .execute(&db.pool)
            .await
            .unwrap();
        let (r, s) = db.prune_history(now - 7 * day).await.unwrap();
        assert_eq!((r, s), (1, 1), "one old request, one ended old session");
        let left = db.recent_requests(10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].created_at, now);
        let ids: Vec<i64> = db
            .model_sessions(m.id, 10)
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        assert!(
            ids.contains(&live) && ids.contains(&recent) && !ids.contains(&old),
            "{ids:?}"
        );
    }

    #[tokio::test]
    async fn request_stats_count_errors_and_sum_tokens_per_model() {
        let (_d, db) = db().await;
        for (status, pt) in [(200, Some(5)), (502, None)] {
            db.insert_request(&RequestRow {
                model: "m".into(),
                endpoint: "/v1/chat/completions".into(),
                status,
                prompt_tokens: pt,
                completion_tokens: pt,
                duration_ms: 10,
                api_key_id: None,
                created_at: now_ms(),
            })
            .await
            .unwrap();
        }
        let st = db.request_stats(0).await.unwrap();
        assert_eq!(
            (st[0].requests, st[0].errors, st[0].prompt_tokens),
            (2, 1, 5)
        );
    }
}
