//! `responses`: stored Responses-API replies (for `previous_response_id` and GET/DELETE).

use sea_query::{Expr, Iden, Query, SqliteQueryBuilder};
use sea_query_binder::SqlxBinder;

use super::{Db, Result, now_ms, q};

#[derive(Iden)]
enum Responses {
    Table,
    Id,
    Model,
    Messages,
    Response,
    CreatedAt,
}

/// A stored response.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredResponse {
    /// `resp_…`.
    pub id: String,
    /// The catalogue model that answered.
    pub model: String,
    /// The conversation up to and including this reply (JSON array of chat messages).
    pub messages: String,
    /// The response object (JSON).
    pub response: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

impl Db {
    /// Stores a response and removes those older than `retention_ms`.
    pub async fn insert_response(
        &self,
        id: &str,
        model: &str,
        messages: &str,
        response: &str,
        retention_ms: i64,
    ) -> Result<()> {
        let now = now_ms();
        let (sql, values) = Query::delete()
            .from_table(Responses::Table)
            .and_where(Expr::col(Responses::CreatedAt).lt(now - retention_ms))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("pruning stored responses"))?;
        let (sql, values) = Query::insert()
            .into_table(Responses::Table)
            .columns([
                Responses::Id,
                Responses::Model,
                Responses::Messages,
                Responses::Response,
                Responses::CreatedAt,
            ])
            .values_panic([
                id.into(),
                model.into(),
                messages.into(),
                response.into(),
                now.into(),
            ])
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("storing a response"))?;
        Ok(())
    }

    /// One stored response.
    pub async fn get_response(&self, id: &str) -> Result<Option<StoredResponse>> {
        let (sql, values) = Query::select()
            .columns([
                Responses::Id,
                Responses::Model,
                Responses::Messages,
                Responses::Response,
                Responses::CreatedAt,
            ])
            .from(Responses::Table)
            .and_where(Expr::col(Responses::Id).eq(id))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with(&sql, values)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a stored response"))
    }

    /// Deletes a stored response. Returns whether it existed.
    pub async fn delete_response(&self, id: &str) -> Result<bool> {
        let (sql, values) = Query::delete()
            .from_table(Responses::Table)
            .and_where(Expr::col(Responses::Id).eq(id))
            .build_sqlx(SqliteQueryBuilder);
        let r = sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("deleting a stored response"))?;
        Ok(r.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use crate::supervisor::db::Db;

    #[tokio::test]
    async fn responses_are_stored_read_deleted_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        db.insert_response("resp_a", "m", "[]", "{}", 1_000_000)
            .await
            .unwrap();
        let r = db.get_response("resp_a").await.unwrap().unwrap();
        assert_eq!((r.model.as_str(), r.messages.as_str()), ("m", "[]"));
        // A retention of -1 ms prunes everything already there.
        db.insert_response("resp_b", "m", "[]", "{}", -1)
            .await
            .unwrap();
        assert!(db.get_response("resp_a").await.unwrap().is_none());
        assert!(db.delete_response("resp_b").await.unwrap());
        assert!(!db.delete_response("resp_b").await.unwrap());
    }
}
