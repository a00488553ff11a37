//! `responses`: stored Responses-API replies (for `previous_response_id` and GET/DELETE).

use sea_query::{Expr, Iden, Query};

use super::{Db, Result, now_ms};

#[derive(Iden)]
enum Responses {
    Table,
    Id,
    Model,
    Messages,
    Response,
    CreatedAt,
}

/// The columns of a [`StoredResponse`], in its fields' order (what is stored and what is read).
const STORED_RESPONSE: [Responses; 5] = [
    Responses::Id,
    Responses::Model,
    Responses::Messages,
    Responses::Response,
    Responses::CreatedAt,
];

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
        self.execute(
            "pruning stored responses",
            Query::delete()
                .from_table(Responses::Table)
                .and_where(Expr::col(Responses::CreatedAt).lt(now - retention_ms)),
        )
        .await?;
        self.execute(
            "storing a response",
            Query::insert()
                .into_table(Responses::Table)
                .columns(STORED_RESPONSE)
                .values_panic([
                    id.into(),
                    model.into(),
                    messages.into(),
                    response.into(),
                    now.into(),
                ]),
        )
        .await?;
        Ok(())
    }

    /// One stored response.
    pub async fn get_response(&self, id: &str) -> Result<Option<StoredResponse>> {
        self.fetch_optional(
            "reading a stored response",
            Query::select()
                .columns(STORED_RESPONSE)
                .from(Responses::Table)
                .and_where(Expr::col(Responses::Id).eq(id)),
        )
        .await
    }

    /// Deletes a stored response. Returns whether it existed.
    pub async fn delete_response(&self, id: &str) -> Result<bool> {
        let r = self
            .execute(
                "deleting a stored response",
                Query::delete()
                    .from_table(Responses::Table)
                    .and_where(Expr::col(Responses::Id).eq(id)),
            )
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_db;

    #[tokio::test]
    async fn responses_are_stored_read_deleted_and_pruned() {
        let (_d, db) = test_db().await;
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
