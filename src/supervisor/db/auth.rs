//! `users` and `api_keys`: the admin accounts (password hashes, token versions) and the hashed API keys
//! that `auth` checks.

use sea_query::{Expr, Iden, OnConflict, Order, Query};
use serde::Serialize;

use super::{Db, DbError, Result, now_ms};

#[derive(Iden)]
enum Users {
    Table,
    Id,
    Username,
    PasswordHash,
    TokenVersion,
    CreatedAt,
    UpdatedAt,
}

#[derive(Iden)]
enum ApiKeys {
    Table,
    Id,
    Name,
    KeyHash,
    Prefix,
    Scopes,
    CreatedAt,
    LastUsedAt,
    RevokedAt,
}

/// A row of `users`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub password_hash: String,
}

/// A row of `api_keys` (the hash never leaves this module's callers in `auth`).
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: i64,
    pub name: String,
    #[serde(skip)]
    pub key_hash: String,
    pub prefix: String,
    pub scopes: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl Db {
    /// The user named `username`, if any.
    pub async fn get_user(&self, username: &str) -> Result<Option<UserRow>> {
        self.fetch_optional(
            "reading a user",
            Query::select()
                .columns([Users::Id, Users::Username, Users::PasswordHash])
                .from(Users::Table)
                .and_where(Expr::col(Users::Username).eq(username)),
        )
        .await
    }

    /// Creates a user, or replaces the password hash of an existing one.
    pub async fn upsert_user(&self, username: &str, password_hash: &str) -> Result<()> {
        let now = now_ms();
        self.execute(
            "writing a user",
            Query::insert()
                .into_table(Users::Table)
                .columns([
                    Users::Username,
                    Users::PasswordHash,
                    Users::CreatedAt,
                    Users::UpdatedAt,
                ])
                .values_panic([
                    username.into(),
                    password_hash.into(),
                    now.into(),
                    now.into(),
                ])
                .on_conflict(
                    OnConflict::column(Users::Username)
                        .update_columns([Users::PasswordHash, Users::UpdatedAt])
                        .to_owned(),
                ),
        )
        .await?;
        Ok(())
    }

    /// Every user's token version (`users.token_version`).
    pub async fn token_versions(&self) -> Result<Vec<(String, i64)>> {
        self.fetch_all(
            "reading token versions",
            Query::select()
                .columns([Users::Username, Users::TokenVersion])
                .from(Users::Table),
        )
        .await
    }

    /// Bumps `username`'s token version (rejecting every token issued before); returns the new one, or
    /// `None` for an unknown user.
    pub async fn bump_token_version(&self, username: &str) -> Result<Option<i64>> {
        let version: Option<(i64,)> = self
            .fetch_optional(
                "bumping a token version",
                Query::update()
                    .table(Users::Table)
                    .value(Users::TokenVersion, Expr::col(Users::TokenVersion).add(1))
                    .value(Users::UpdatedAt, now_ms())
                    .and_where(Expr::col(Users::Username).eq(username))
                    .returning_col(Users::TokenVersion),
            )
            .await?;
        Ok(version.map(|(v,)| v))
    }

    /// Stores a new key's hash; returns its row.
    pub async fn insert_api_key(
        &self,
        name: &str,
        key_hash: &str,
        prefix: &str,
        scopes: &str,
    ) -> Result<ApiKeyRow> {
        let r = self
            .execute(
                "storing an API key",
                Query::insert()
                    .into_table(ApiKeys::Table)
                    .columns([
                        ApiKeys::Name,
                        ApiKeys::KeyHash,
                        ApiKeys::Prefix,
                        ApiKeys::Scopes,
                        ApiKeys::CreatedAt,
                    ])
                    .values_panic([
                        name.into(),
                        key_hash.into(),
                        prefix.into(),
                        scopes.into(),
                        now_ms().into(),
                    ]),
            )
            .await?;
        let id = r.last_insert_rowid();
        self.list_api_keys()
            .await?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or(DbError::Query {
                op: "reading back an API key",
                source: sqlx::Error::RowNotFound,
            })
    }

    /// Every key (revoked ones included), newest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        self.fetch_all(
            "listing API keys",
            Query::select()
                .column(sea_query::Asterisk)
                .from(ApiKeys::Table)
                .order_by(ApiKeys::Id, Order::Desc),
        )
        .await
    }

    /// Whether any key is not revoked.
    pub async fn has_active_api_keys(&self) -> Result<bool> {
        Ok(self
            .list_api_keys()
            .await?
            .iter()
            .any(|k| k.revoked_at.is_none()))
    }

    /// The active key with this hash, marking it used.
    pub async fn use_api_key(&self, key_hash: &str) -> Result<Option<ApiKeyRow>> {
        let row: Option<ApiKeyRow> = self
            .fetch_optional(
                "checking an API key",
                Query::select()
                    .column(sea_query::Asterisk)
                    .from(ApiKeys::Table)
                    .and_where(Expr::col(ApiKeys::KeyHash).eq(key_hash))
                    .and_where(Expr::col(ApiKeys::RevokedAt).is_null()),
            )
            .await?;
        if let Some(k) = &row {
            self.execute(
                "marking an API key used",
                Query::update()
                    .table(ApiKeys::Table)
                    .value(ApiKeys::LastUsedAt, now_ms())
                    .and_where(Expr::col(ApiKeys::Id).eq(k.id)),
            )
            .await?;
        }
        Ok(row)
    }

    /// Revokes a key; returns whether an active key was revoked.
    pub async fn revoke_api_key(&self, id: i64) -> Result<bool> {
        let r = self
            .execute(
                "revoking an API key",
                Query::update()
                    .table(ApiKeys::Table)
                    .value(ApiKeys::RevokedAt, now_ms())
                    .and_where(Expr::col(ApiKeys::Id).eq(id))
                    .and_where(Expr::col(ApiKeys::RevokedAt).is_null()),
            )
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_db as db;

    #[tokio::test]
    async fn an_api_key_is_checked_marked_used_and_revoked_once() {
        let (_d, db) = db().await;
        let k = db
            .insert_api_key("ci", "h1", "ci-abcd", "inference")
            .await
            .unwrap();
        assert!(db.has_active_api_keys().await.unwrap());
        assert!(db.use_api_key("h1").await.unwrap().is_some());
        assert!(db.use_api_key("nope").await.unwrap().is_none());
        assert!(db.revoke_api_key(k.id).await.unwrap());
        assert!(!db.revoke_api_key(k.id).await.unwrap());
        assert!(db.use_api_key("h1").await.unwrap().is_none());
    }
}
