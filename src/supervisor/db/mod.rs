//! The supervisor's SQLite storage: the only module that touches SQL. Queries are built with sea-query and
//! run with sqlx through the three helpers here (which map every failure to [`DbError`] once); the schema
//! lives in `migrations/` and is applied at start-up (WAL, foreign keys on). One file per table group.

mod aliases;
mod auth;
mod configurations;
mod models;
mod requests;
mod responses;
mod sessions;

pub use models::{ModelRow, ScannedModel};
pub use requests::RequestRow;

use std::path::Path;
use std::time::Duration;

use sea_query::SqliteQueryBuilder;
use sea_query_binder::SqlxBinder;
use sqlx::FromRow;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteQueryResult,
    SqliteRow,
};

/// A database operation that failed; says which operation.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("cannot migrate database {path}: {source}")]
    Migrate {
        path: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error while {op}: {source}")]
    Query {
        op: &'static str,
        source: sqlx::Error,
    },
}

impl DbError {
    /// The database file is locked by another connection or process (SQLite `SQLITE_BUSY` or
    /// `SQLITE_LOCKED`, extended codes included) after the busy timeout.
    pub fn is_busy(&self) -> bool {
        let e = match self {
            DbError::Open { source, .. } | DbError::Query { source, .. } => source,
            DbError::Migrate { .. } => return false,
        };
        let Some(db) = e.as_database_error() else {
            return false;
        };
        // Primary result codes 5 (BUSY) and 6 (LOCKED); extended codes keep them in the low byte.
        db.code()
            .and_then(|c| c.parse::<u32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6))
    }
}

type Result<T> = std::result::Result<T, DbError>;

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { op, source }
}

/// Milliseconds since the Unix epoch, the unit of every timestamp column.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The connection pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Opens (creating if missing) the database at `path` in WAL mode with foreign keys on, and applies
    /// the migrations of `migrations/`.
    ///
    /// Errors: [`DbError::Open`], [`DbError::Migrate`].
    pub async fn open(path: &Path) -> Result<Db> {
        let shown = path.display().to_string();
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|source| DbError::Open {
                path: shown.clone(),
                source,
            })?;
        sqlx::migrate!()
            .run(&pool)
            .await
            .map_err(|source| DbError::Migrate {
                path: shown,
                source,
            })?;
        Ok(Db { pool })
    }

    /// Closes the pool (flushes the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- the one way a statement is run ------------------------------------------------------------
    //
    // Each helper builds the sea-query statement for SQLite before its future starts (sea-query's
    // statements are not `Send`), runs it on the pool and maps a failure to [`DbError::Query`] naming
    // `what` was being done: the error [`DbError::is_busy`] reads for a locked database.

    /// Runs a statement that returns no rows (INSERT, UPDATE, DELETE).
    fn execute<'a>(
        &'a self,
        what: &'static str,
        stmt: &impl SqlxBinder,
    ) -> impl Future<Output = Result<SqliteQueryResult>> + Send + 'a {
        let (sql, values) = stmt.build_sqlx(SqliteQueryBuilder);
        async move {
            sqlx::query_with(&sql, values)
                .execute(&self.pool)
                .await
                .map_err(q(what))
        }
    }

    /// Every row of a query, each as a `T`.
    fn fetch_all<'a, T>(
        &'a self,
        what: &'static str,
        stmt: &impl SqlxBinder,
    ) -> impl Future<Output = Result<Vec<T>>> + Send + 'a
    where
        T: for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'a,
    {
        let (sql, values) = stmt.build_sqlx(SqliteQueryBuilder);
        async move {
            sqlx::query_as_with(&sql, values)
                .fetch_all(&self.pool)
                .await
                .map_err(q(what))
        }
    }

    /// The first row of a query as a `T`, `None` when there is none.
    fn fetch_optional<'a, T>(
        &'a self,
        what: &'static str,
        stmt: &impl SqlxBinder,
    ) -> impl Future<Output = Result<Option<T>>> + Send + 'a
    where
        T: for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'a,
    {
        let (sql, values) = stmt.build_sqlx(SqliteQueryBuilder);
        async move {
            sqlx::query_as_with(&sql, values)
                .fetch_optional(&self.pool)
                .await
                .map_err(q(what))
        }
    }
}

/// A fresh database in a temporary directory (gone with the returned guard), for the tests beside each
/// table group.
#[cfg(test)]
async fn test_db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("t.db")).await.unwrap();
    (dir, db)
}
