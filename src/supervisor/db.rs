//! The supervisor's SQLite storage: the only module that touches SQL. Queries are built with sea-query and
//! run with sqlx; the schema lives in `migrations/` and is applied at start-up (WAL, foreign keys on).

mod aliases;
mod responses;

pub use responses::StoredResponse;

use std::path::Path;
use std::time::Duration;

use super::settings::{
    Kind, MODEL_SETTINGS, ModelSetting, ModelSettingsPatch, SettingValue, SettingValues,
};
use sea_query::{Alias, Expr, Iden, OnConflict, Order, Query, SqliteQueryBuilder};
use sea_query_binder::SqlxBinder;
use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

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

#[derive(Iden)]
enum Models {
    Table,
    Id,
    Name,
    FilePath,
    SizeBytes,
    Sha256,
    Architecture,
    Parameters,
    Quantization,
    ContextLength,
    NLayer,
    NEmbdKv,
    Embedding,
    HfRepoId,
    HfFilename,
    PeakRssBytes,
    CreatedAt,
    UpdatedAt,
    LastUsedAt,
    UnsupportedReason,
}

#[derive(Iden)]
enum ModelSessions {
    Table,
    Id,
    ModelId,
    Pid,
    Port,
    Instance,
    Status,
    StartedAt,
    ReadyAt,
    StoppedAt,
    StopReason,
    PeakRssBytes,
}

#[derive(Iden)]
enum Configurations {
    Table,
    Key,
    Value,
    UpdatedAt,
}

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

/// A row of `models`: one catalogue entry with the per-model settings the process manager reads
/// (every setting of [`MODEL_SETTINGS`](super::settings::MODEL_SETTINGS), read and written by name, is
/// [`Db::model_settings`] and [`Db::update_model_settings`]).
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct ModelRow {
    pub id: i64,
    pub name: String,
    pub file_path: String,
    pub size_bytes: i64,
    pub sha256: Option<String>,
    pub architecture: Option<String>,
    pub parameters: Option<i64>,
    pub quantization: Option<String>,
    pub context_length: Option<i64>,
    pub n_layer: Option<i64>,
    pub n_embd_kv: Option<i64>,
    pub embedding: bool,
    pub hf_repo_id: Option<String>,
    pub hf_filename: Option<String>,
    pub ctx_size: Option<i64>,
    pub threads: Option<i64>,
    pub parallel: Option<i64>,
    pub gpu_layers: Option<i64>,
    pub idle_timeout: Option<i64>,
    pub pinned: bool,
    pub enabled: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub max_tokens: Option<i64>,
    pub peak_rss_bytes: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_used_at: Option<i64>,
    /// Why the engine cannot run this file (`engine::model::check_runnable`'s error at scan time);
    /// `None` when it can. Requests for such a model are refused without starting a worker.
    pub unsupported_reason: Option<String>,
}

/// What a scan of MODELS_DIR learns about a file (see `catalog`).
#[derive(Clone, Debug, Default)]
pub struct ScannedModel {
    pub name: String,
    pub file_path: String,
    pub size_bytes: i64,
    pub architecture: Option<String>,
    pub parameters: Option<i64>,
    pub quantization: Option<String>,
    pub context_length: Option<i64>,
    pub n_layer: Option<i64>,
    pub n_embd_kv: Option<i64>,
    pub embedding: bool,
    /// Why the engine cannot run the file, `None` when it can.
    pub unsupported_reason: Option<String>,
}

/// A setting's value as its column stores it (`NULL` of the column's type for a reset).
fn sql_value(setting: &ModelSetting, v: &Option<SettingValue>) -> sea_query::Value {
    match (v, setting.kind) {
        (Some(SettingValue::Int(x)), _) => (*x).into(),
        (Some(SettingValue::Float(x)), _) => (*x).into(),
        (Some(SettingValue::Bool(x)), _) => (*x).into(),
        (Some(SettingValue::Text(x)), _) => x.clone().into(),
        (None, Kind::Int { .. }) => Option::<i64>::None.into(),
        (None, Kind::Float { .. }) => Option::<f64>::None.into(),
        (None, Kind::Bool { .. }) => Option::<bool>::None.into(),
        (None, Kind::Text { .. }) => Option::<String>::None.into(),
    }
}

/// A row of `model_sessions`: one worker process.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct SessionRow {
    pub id: i64,
    pub model_id: i64,
    pub pid: Option<i64>,
    pub port: i64,
    pub instance: String,
    pub status: String,
    pub started_at: i64,
    pub ready_at: Option<i64>,
    pub stopped_at: Option<i64>,
    pub stop_reason: Option<String>,
    pub peak_rss_bytes: Option<i64>,
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

    // ---- models -------------------------------------------------------------------------------------

    /// Inserts a scanned file, or refreshes the metadata of the row with the same file path (per-model
    /// settings are kept). Returns the row.
    pub async fn upsert_scanned(&self, m: &ScannedModel) -> Result<ModelRow> {
        let now = now_ms();
        let (sql, values) = Query::insert()
            .into_table(Models::Table)
            .columns([
                Models::Name,
                Models::FilePath,
                Models::SizeBytes,
                Models::Architecture,
                Models::Parameters,
                Models::Quantization,
                Models::ContextLength,
                Models::NLayer,
                Models::NEmbdKv,
                Models::Embedding,
                Models::UnsupportedReason,
                Models::CreatedAt,
                Models::UpdatedAt,
            ])
            .values_panic([
                m.name.clone().into(),
                m.file_path.clone().into(),
                m.size_bytes.into(),
                m.architecture.clone().into(),
                m.parameters.into(),
                m.quantization.clone().into(),
                m.context_length.into(),
                m.n_layer.into(),
                m.n_embd_kv.into(),
                m.embedding.into(),
                m.unsupported_reason.clone().into(),
                now.into(),
                now.into(),
            ])
            .on_conflict(
                OnConflict::column(Models::FilePath)
                    .update_columns([
                        Models::SizeBytes,
                        Models::Architecture,
                        Models::Parameters,
                        Models::Quantization,
                        Models::ContextLength,
                        Models::NLayer,
                        Models::NEmbdKv,
                        Models::Embedding,
                        Models::UnsupportedReason,
                        Models::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("registering a model"))?;
        self.model_by_path(&m.file_path)
            .await?
            .ok_or(DbError::Query {
                op: "reading back a registered model",
                source: sqlx::Error::RowNotFound,
            })
    }

    async fn model_by_path(&self, path: &str) -> Result<Option<ModelRow>> {
        let (sql, values) = Query::select()
            .column(sea_query::Asterisk)
            .from(Models::Table)
            .and_where(Expr::col(Models::FilePath).eq(path))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, ModelRow, _>(&sql, values)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a model"))
    }

    /// Every model, by name.
    pub async fn list_models(&self) -> Result<Vec<ModelRow>> {
        let (sql, values) = Query::select()
            .column(sea_query::Asterisk)
            .from(Models::Table)
            .order_by(Models::Name, Order::Asc)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, ModelRow, _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing models"))
    }

    /// The model named `name`, if any.
    pub async fn get_model(&self, name: &str) -> Result<Option<ModelRow>> {
        let (sql, values) = Query::select()
            .column(sea_query::Asterisk)
            .from(Models::Table)
            .and_where(Expr::col(Models::Name).eq(name))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, ModelRow, _>(&sql, values)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a model"))
    }

    /// Every setting of [`MODEL_SETTINGS`](super::settings::MODEL_SETTINGS) of the model `name`, each
    /// read from its column as JSON (`null` = unset), in the table's order; `None` when there is no
    /// such model.
    pub async fn model_settings(&self, name: &str) -> Result<Option<SettingValues>> {
        let mut sel = Query::select();
        sel.from(Models::Table)
            .and_where(Expr::col(Models::Name).eq(name));
        for setting in MODEL_SETTINGS {
            sel.column(Alias::new(setting.column));
        }
        let (sql, values) = sel.build_sqlx(SqliteQueryBuilder);
        let Some(row) = sqlx::query_with(&sql, values)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a model's settings"))?
        else {
            return Ok(None);
        };
        MODEL_SETTINGS
            .iter()
            .map(|setting| {
                let col = setting.column;
                let v = match setting.kind {
                    Kind::Int { .. } => row.try_get::<Option<i64>, _>(col).map(|v| json!(v)),
                    Kind::Float { .. } => row.try_get::<Option<f64>, _>(col).map(|v| json!(v)),
                    Kind::Bool { .. } => row.try_get::<Option<bool>, _>(col).map(|v| json!(v)),
                    Kind::Text { .. } => row.try_get::<Option<String>, _>(col).map(|v| json!(v)),
                };
                v.map(|v| (setting, v))
                    .map_err(q("reading a model's settings"))
            })
            .collect::<Result<SettingValues>>()
            .map(Some)
    }

    /// Applies a (validated) settings patch, each setting to its column; returns the updated row, or
    /// `None` when there is no such model.
    pub async fn update_model_settings(
        &self,
        name: &str,
        p: &ModelSettingsPatch,
    ) -> Result<Option<ModelRow>> {
        let mut upd = Query::update();
        upd.table(Models::Table)
            .value(Models::UpdatedAt, now_ms())
            .and_where(Expr::col(Models::Name).eq(name));
        for (setting, v) in &p.changes {
            upd.value(Alias::new(setting.column), sql_value(setting, v));
        }
        let (sql, values) = upd.build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("updating a model's settings"))?;
        self.get_model(name).await
    }

    /// Deletes a model's row (its sessions go with it). Returns whether a row was deleted.
    pub async fn delete_model(&self, name: &str) -> Result<bool> {
        let (sql, values) = Query::delete()
            .from_table(Models::Table)
            .and_where(Expr::col(Models::Name).eq(name))
            .build_sqlx(SqliteQueryBuilder);
        let r = sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("deleting a model"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Records where a model came from (the downloader, issue 8): its SHA-256 and Hugging Face origin.
    pub async fn set_model_source(
        &self,
        name: &str,
        sha256: Option<&str>,
        hf_repo_id: Option<&str>,
        hf_filename: Option<&str>,
    ) -> Result<()> {
        let (sql, values) = Query::update()
            .table(Models::Table)
            .value(Models::Sha256, sha256.map(str::to_owned))
            .value(Models::HfRepoId, hf_repo_id.map(str::to_owned))
            .value(Models::HfFilename, hf_filename.map(str::to_owned))
            .value(Models::UpdatedAt, now_ms())
            .and_where(Expr::col(Models::Name).eq(name))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("recording a model's source"))?;
        Ok(())
    }

    /// Sets (or clears) why a model cannot run — e.g. its file became unreadable — keeping its row and
    /// settings.
    pub async fn set_unsupported_reason(&self, name: &str, reason: Option<&str>) -> Result<()> {
        let (sql, values) = Query::update()
            .table(Models::Table)
            .value(Models::UnsupportedReason, reason.map(str::to_owned))
            .value(Models::UpdatedAt, now_ms())
            .and_where(Expr::col(Models::Name).eq(name))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("marking a model"))?;
        Ok(())
    }

    /// Records that a model served a request now.
    pub async fn touch_model(&self, name: &str) -> Result<()> {
        let (sql, values) = Query::update()
            .table(Models::Table)
            .value(Models::LastUsedAt, now_ms())
            .and_where(Expr::col(Models::Name).eq(name))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("touching a model"))?;
        Ok(())
    }

    /// Raises the model's and the session's measured peak RSS to `bytes` when larger.
    pub async fn record_peak_rss(&self, model_id: i64, session_id: i64, bytes: i64) -> Result<()> {
        let (sql, values) = Query::update()
            .table(Models::Table)
            .value(Models::PeakRssBytes, bytes)
            .and_where(Expr::col(Models::Id).eq(model_id))
            .and_where(
                Expr::col(Models::PeakRssBytes)
                    .is_null()
                    .or(Expr::col(Models::PeakRssBytes).lt(bytes)),
            )
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("recording a model's peak RSS"))?;
        let (sql, values) = Query::update()
            .table(ModelSessions::Table)
            .value(ModelSessions::PeakRssBytes, bytes)
            .and_where(Expr::col(ModelSessions::Id).eq(session_id))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("recording a session's peak RSS"))?;
        Ok(())
    }

    /// Deletes the rows of models whose file is not in `present` (paths as stored). Returns their names.
    pub async fn remove_missing(&self, present: &[String]) -> Result<Vec<String>> {
        let gone: Vec<ModelRow> = self
            .list_models()
            .await?
            .into_iter()
            .filter(|m| !present.contains(&m.file_path))
            .collect();
        for m in &gone {
            self.delete_model(&m.name).await?;
        }
        Ok(gone.into_iter().map(|m| m.name).collect())
    }

    // ---- sessions -----------------------------------------------------------------------------------

    /// Records a new worker session in state `status`; returns its id.
    pub async fn insert_session(
        &self,
        model_id: i64,
        port: u16,
        instance: &str,
        status: &str,
    ) -> Result<i64> {
        let (sql, values) = Query::insert()
            .into_table(ModelSessions::Table)
            .columns([
                ModelSessions::ModelId,
                ModelSessions::Port,
                ModelSessions::Instance,
                ModelSessions::Status,
                ModelSessions::StartedAt,
            ])
            .values_panic([
                model_id.into(),
                i64::from(port).into(),
                instance.into(),
                status.into(),
                now_ms().into(),
            ])
            .build_sqlx(SqliteQueryBuilder);
        let r = sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("recording a worker session"))?;
        Ok(r.last_insert_rowid())
    }

    /// Records the pid of a session's process.
    pub async fn set_session_pid(&self, id: i64, pid: u32) -> Result<()> {
        let (sql, values) = Query::update()
            .table(ModelSessions::Table)
            .value(ModelSessions::Pid, i64::from(pid))
            .and_where(Expr::col(ModelSessions::Id).eq(id))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("recording a worker's pid"))?;
        Ok(())
    }

    /// Mirrors a state change of a session: `ready` sets ready_at, `stopped`/`failed` set stopped_at and
    /// the reason.
    pub async fn set_session_status(
        &self,
        id: i64,
        status: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        let mut upd = Query::update();
        upd.table(ModelSessions::Table)
            .value(ModelSessions::Status, status)
            .and_where(Expr::col(ModelSessions::Id).eq(id));
        match status {
            "ready" => {
                upd.value(ModelSessions::ReadyAt, now_ms());
            }
            "stopped" | "failed" => {
                upd.value(ModelSessions::StoppedAt, now_ms());
                upd.value(ModelSessions::StopReason, reason.map(str::to_owned));
            }
            _ => {}
        }
        let (sql, values) = upd.build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("mirroring a worker's state"))?;
        Ok(())
    }

    /// Sessions whose process may still be alive (loading, ready or draining).
    pub async fn live_sessions(&self) -> Result<Vec<SessionRow>> {
        let (sql, values) = Query::select()
            .column(sea_query::Asterisk)
            .from(ModelSessions::Table)
            .and_where(Expr::col(ModelSessions::Status).is_in(["loading", "ready", "draining"]))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, SessionRow, _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing live sessions"))
    }

    /// The latest `limit` sessions of a model, newest first.
    pub async fn model_sessions(&self, model_id: i64, limit: u64) -> Result<Vec<SessionRow>> {
        let (sql, values) = Query::select()
            .column(sea_query::Asterisk)
            .from(ModelSessions::Table)
            .and_where(Expr::col(ModelSessions::ModelId).eq(model_id))
            .order_by(ModelSessions::Id, Order::Desc)
            .limit(limit)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, SessionRow, _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing a model's sessions"))
    }

    // ---- configurations -----------------------------------------------------------------------------

    /// Every settings override as (key, value).
    pub async fn configurations(&self) -> Result<Vec<(String, String)>> {
        let (sql, values) = Query::select()
            .columns([Configurations::Key, Configurations::Value])
            .from(Configurations::Table)
            .order_by(Configurations::Key, Order::Asc)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, (String, String), _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("reading settings overrides"))
    }

    /// Sets an override.
    pub async fn set_configuration(&self, key: &str, value: &str) -> Result<()> {
        let (sql, values) = Query::insert()
            .into_table(Configurations::Table)
            .columns([
                Configurations::Key,
                Configurations::Value,
                Configurations::UpdatedAt,
            ])
            .values_panic([key.into(), value.into(), now_ms().into()])
            .on_conflict(
                OnConflict::column(Configurations::Key)
                    .update_columns([Configurations::Value, Configurations::UpdatedAt])
                    .to_owned(),
            )
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("writing a settings override"))?;
        Ok(())
    }

    /// Removes an override (the setting falls back to file/env/default).
    pub async fn delete_configuration(&self, key: &str) -> Result<()> {
        let (sql, values) = Query::delete()
            .from_table(Configurations::Table)
            .and_where(Expr::col(Configurations::Key).eq(key))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("removing a settings override"))?;
        Ok(())
    }

    // ---- users --------------------------------------------------------------------------------------

    /// The user named `username`, if any.
    pub async fn get_user(&self, username: &str) -> Result<Option<UserRow>> {
        let (sql, values) = Query::select()
            .columns([Users::Id, Users::Username, Users::PasswordHash])
            .from(Users::Table)
            .and_where(Expr::col(Users::Username).eq(username))
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, UserRow, _>(&sql, values)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a user"))
    }

    /// Creates a user, or replaces the password hash of an existing one.
    pub async fn upsert_user(&self, username: &str, password_hash: &str) -> Result<()> {
        let now = now_ms();
        let (sql, values) = Query::insert()
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
            )
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("writing a user"))?;
        Ok(())
    }

    /// Every user's token version (`users.token_version`).
    pub async fn token_versions(&self) -> Result<Vec<(String, i64)>> {
        let (sql, values) = Query::select()
            .columns([Users::Username, Users::TokenVersion])
            .from(Users::Table)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, (String, i64), _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("reading token versions"))
    }

    /// Bumps `username`'s token version (rejecting every token issued before); returns the new one, or
    /// `None` for an unknown user.
    pub async fn bump_token_version(&self, username: &str) -> Result<Option<i64>> {
        let (sql, values) = Query::update()
            .table(Users::Table)
            .value(Users::TokenVersion, Expr::col(Users::TokenVersion).add(1))
            .value(Users::UpdatedAt, now_ms())
            .and_where(Expr::col(Users::Username).eq(username))
            .returning_col(Users::TokenVersion)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_scalar_with::<_, i64, _>(&sql, values)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("bumping a token version"))
    }

    // ---- api keys -----------------------------------------------------------------------------------

    /// Stores a new key's hash; returns its row.
    pub async fn insert_api_key(
        &self,
        name: &str,
        key_hash: &str,
        prefix: &str,
        scopes: &str,
    ) -> Result<ApiKeyRow> {
        let (sql, values) = Query::insert()
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
            ])
            .build_sqlx(SqliteQueryBuilder);
        let r = sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("storing an API key"))?;
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
        let (sql, values) = Query::select()
            .column(sea_query::Asterisk)
            .from(ApiKeys::Table)
            .order_by(ApiKeys::Id, Order::Desc)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, ApiKeyRow, _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing API keys"))
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
        let (sql, values) = Query::select()
            .column(sea_query::Asterisk)
            .from(ApiKeys::Table)
            .and_where(Expr::col(ApiKeys::KeyHash).eq(key_hash))
            .and_where(Expr::col(ApiKeys::RevokedAt).is_null())
            .build_sqlx(SqliteQueryBuilder);
        let row = sqlx::query_as_with::<_, ApiKeyRow, _>(&sql, values)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("checking an API key"))?;
        if let Some(k) = &row {
            let (sql, values) = Query::update()
                .table(ApiKeys::Table)
                .value(ApiKeys::LastUsedAt, now_ms())
                .and_where(Expr::col(ApiKeys::Id).eq(k.id))
                .build_sqlx(SqliteQueryBuilder);
            sqlx::query_with(&sql, values)
                .execute(&self.pool)
                .await
                .map_err(q("marking an API key used"))?;
        }
        Ok(row)
    }

    /// Revokes a key; returns whether an active key was revoked.
    pub async fn revoke_api_key(&self, id: i64) -> Result<bool> {
        let (sql, values) = Query::update()
            .table(ApiKeys::Table)
            .value(ApiKeys::RevokedAt, now_ms())
            .and_where(Expr::col(ApiKeys::Id).eq(id))
            .and_where(Expr::col(ApiKeys::RevokedAt).is_null())
            .build_sqlx(SqliteQueryBuilder);
        let r = sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("revoking an API key"))?;
        Ok(r.rows_affected() > 0)
    }

    // ---- retention ----------------------------------------------------------------------------------

    /// Deletes request-log rows created before `before_ms` and ended worker sessions (not loading,
    /// ready or draining) that started before it. Returns (requests, sessions) deleted.
    pub async fn prune_history(&self, before_ms: i64) -> Result<(u64, u64)> {
        let (sql, values) = Query::delete()
            .from_table(Requests::Table)
            .and_where(Expr::col(Requests::CreatedAt).lt(before_ms))
            .build_sqlx(SqliteQueryBuilder);
        let requests = sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("pruning the request log"))?
            .rows_affected();
        let (sql, values) = Query::delete()
            .from_table(ModelSessions::Table)
            .and_where(Expr::col(ModelSessions::StartedAt).lt(before_ms))
            .and_where(Expr::col(ModelSessions::Status).is_not_in(["loading", "ready", "draining"]))
            .build_sqlx(SqliteQueryBuilder);
        let sessions = sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("pruning worker sessions"))?
            .rows_affected();
        Ok((requests, sessions))
    }

    // ---- requests -----------------------------------------------------------------------------------

    /// Logs one finished proxied request.
    pub async fn insert_request(&self, r: &RequestRow) -> Result<()> {
        let (sql, values) = Query::insert()
            .into_table(Requests::Table)
            .columns([
                Requests::Model,
                Requests::Endpoint,
                Requests::Status,
                Requests::PromptTokens,
                Requests::CompletionTokens,
                Requests::DurationMs,
                Requests::ApiKeyId,
                Requests::CreatedAt,
            ])
            .values_panic([
                r.model.clone().into(),
                r.endpoint.clone().into(),
                r.status.into(),
                r.prompt_tokens.into(),
                r.completion_tokens.into(),
                r.duration_ms.into(),
                r.api_key_id.into(),
                r.created_at.into(),
            ])
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_with(&sql, values)
            .execute(&self.pool)
            .await
            .map_err(q("logging a request"))?;
        Ok(())
    }

    /// The latest `limit` requests, newest first.
    pub async fn recent_requests(&self, limit: u64) -> Result<Vec<RequestRow>> {
        let (sql, values) = Query::select()
            .columns([
                Requests::Model,
                Requests::Endpoint,
                Requests::Status,
                Requests::PromptTokens,
                Requests::CompletionTokens,
                Requests::DurationMs,
                Requests::ApiKeyId,
                Requests::CreatedAt,
            ])
            .from(Requests::Table)
            .order_by(Requests::Id, Order::Desc)
            .limit(limit)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, RequestRow, _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing requests"))
    }

    /// Per-model counts, errors (status ≥ 400), token sums and mean duration since `since_ms`.
    pub async fn request_stats(&self, since_ms: i64) -> Result<Vec<RequestStats>> {
        let (sql, values) = Query::select()
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
            .order_by(Requests::Model, Order::Asc)
            .build_sqlx(SqliteQueryBuilder);
        sqlx::query_as_with::<_, RequestStats, _>(&sql, values)
            .fetch_all(&self.pool)
            .await
            .map_err(q("computing request statistics"))
    }
}

#[cfg(test)]
mod tests {
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

    /// A validated patch from JSON fields.
    fn patch_of(v: serde_json::Value) -> ModelSettingsPatch {
        ModelSettingsPatch::parse(v.as_object().unwrap(), &crate::config::Settings::default())
            .unwrap()
    }

    #[tokio::test]
    async fn every_model_setting_has_its_column() {
        let (_d, db) = db().await;
        let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('models')")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        for s in crate::supervisor::settings::MODEL_SETTINGS {
            assert!(cols.iter().any(|c| c == s.column), "no column {}", s.column);
        }
    }

    async fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn models_upsert_keeps_settings_and_patch_resets_with_null() {
        let (_d, db) = db().await;
        let m = ScannedModel {
            name: "a".into(),
            file_path: "/m/a.gguf".into(),
            size_bytes: 10,
            ..Default::default()
        };
        let row = db.upsert_scanned(&m).await.unwrap();
        assert_eq!(row.name, "a");
        assert!(row.enabled && !row.pinned);
        let patch =
            patch_of(serde_json::json!({"ctx_size": 512, "pinned": true, "system_prompt": "Hi."}));
        let row = db
            .update_model_settings("a", &patch)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.ctx_size, Some(512));
        assert!(row.pinned);
        let by_name = |v: &SettingValues, n: &str| {
            v.iter()
                .find(|(s, _)| s.name == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let v = db.model_settings("a").await.unwrap().unwrap();
        assert_eq!(v.len(), MODEL_SETTINGS.len());
        assert_eq!(by_name(&v, "system_prompt"), "Hi.");
        assert_eq!(by_name(&v, "ctx_size"), 512);
        assert_eq!(by_name(&v, "pinned"), true);
        assert_eq!(by_name(&v, "top_k"), serde_json::Value::Null);
        assert!(db.model_settings("nope").await.unwrap().is_none());
        // A rescan with a new size keeps the settings.
        let row = db
            .upsert_scanned(&ScannedModel {
                size_bytes: 20,
                ..m.clone()
            })
            .await
            .unwrap();
        assert_eq!((row.size_bytes, row.ctx_size), (20, Some(512)));
        let patch = patch_of(
            serde_json::json!({"ctx_size": null, "system_prompt": "", "temperature": 0.5}),
        );
        let row = db
            .update_model_settings("a", &patch)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((row.ctx_size, row.temperature), (None, Some(0.5)));
        let v = db.model_settings("a").await.unwrap().unwrap();
        assert_eq!(by_name(&v, "system_prompt"), serde_json::Value::Null);
        assert!(row.pinned, "an absent field is unchanged");
        let patch = patch_of(serde_json::json!({"pinned": null}));
        let row = db
            .update_model_settings("a", &patch)
            .await
            .unwrap()
            .unwrap();
        assert!(!row.pinned, "a reset flag goes back to its default");
        assert_eq!(db.remove_missing(&[]).await.unwrap(), vec!["a".to_string()]);
        assert!(db.get_model("a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn sessions_peak_rss_keys_and_request_stats() {
        let (_d, db) = db().await;
        let row = db
            .upsert_scanned(&ScannedModel {
                name: "m".into(),
                file_path: "/m.gguf".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let s = db
            .insert_session(row.id, 9000, "nonce", "loading")
            .await
            .unwrap();
        db.set_session_pid(s, 1234).await.unwrap();
        assert_eq!(db.live_sessions().await.unwrap().len(), 1);
        db.record_peak_rss(row.id, s, 500).await.unwrap();
        db.record_peak_rss(row.id, s, 300).await.unwrap();
        let m = db.get_model("m").await.unwrap().unwrap();
        assert_eq!(m.peak_rss_bytes, Some(500), "the peak only grows");
        db.set_session_status(s, "failed", Some("killed by signal 9"))
            .await
            .unwrap();
        assert!(db.live_sessions().await.unwrap().is_empty());
        let sess = db.model_sessions(row.id, 5).await.unwrap();
        assert_eq!(sess[0].stop_reason.as_deref(), Some("killed by signal 9"));

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
        db.set_configuration("model_idle_timeout", "5")
            .await
            .unwrap();
        db.set_configuration("model_idle_timeout", "6")
            .await
            .unwrap();
        assert_eq!(
            db.configurations().await.unwrap(),
            vec![("model_idle_timeout".into(), "6".into())]
        );
        db.delete_configuration("model_idle_timeout").await.unwrap();
        assert!(db.configurations().await.unwrap().is_empty());
    }
}
