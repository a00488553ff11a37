//! `models`: the catalogue (one row per GGUF file) and each model's settings, read and written by the
//! names of [`MODEL_SETTINGS`].

use sea_query::{Alias, Expr, Iden, OnConflict, Order, Query};
use serde::Serialize;
use serde_json::json;
use sqlx::sqlite::SqliteRow;
use sqlx::{FromRow, Row};

use super::sessions::ModelSessions;
use super::{Db, DbError, Result, now_ms};
use crate::supervisor::settings::{
    Kind, MODEL_SETTINGS, ModelSetting, ModelSettingsPatch, SettingValue, SettingValues,
};

#[derive(Iden)]
pub(super) enum Models {
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
    Reranking,
    HfRepoId,
    HfFilename,
    PeakRssBytes,
    CreatedAt,
    UpdatedAt,
    LastUsedAt,
    UnsupportedReason,
}

/// The columns a scan learns after the name and the path ([`ScannedModel`]'s fields in order): what
/// a rescan of the same path refreshes.
const SCANNED: [Models; 10] = [
    Models::SizeBytes,
    Models::Architecture,
    Models::Parameters,
    Models::Quantization,
    Models::ContextLength,
    Models::NLayer,
    Models::NEmbdKv,
    Models::Embedding,
    Models::Reranking,
    Models::UnsupportedReason,
];

/// A row of `models`: one catalogue entry with the per-model settings the process manager reads
/// (every setting of [`MODEL_SETTINGS`], read and written by name, is
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
    /// A reranker (pooling type rank): its worker gets `--reranking` and serves `/v1/rerank`.
    pub reranking: bool,
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
    /// The KV cache's key type (`-ctk`, a [`KvType`](crate::engine::model::KvType) name); `None` = f16.
    pub cache_type_k: Option<String>,
    /// The KV cache's value type (`-ctv`); `None` = f16.
    pub cache_type_v: Option<String>,
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
    /// A reranker (pooling type rank): its worker gets `--reranking` and serves `/v1/rerank`.
    pub reranking: bool,
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
        (None, Kind::Text { .. } | Kind::Choice { .. }) => Option::<String>::None.into(),
    }
}

/// The [`MODEL_SETTINGS`] columns of a `models` row, each decoded by its setting's kind as JSON
/// (`null` = unset), in the table's order: what [`Db::model_settings`] reads.
struct SettingsRow(SettingValues);

impl<'r> FromRow<'r, SqliteRow> for SettingsRow {
    fn from_row(row: &'r SqliteRow) -> sqlx::Result<Self> {
        MODEL_SETTINGS
            .iter()
            .map(|setting| {
                let col = setting.column;
                let v = match setting.kind {
                    Kind::Int { .. } => row.try_get::<Option<i64>, _>(col).map(|v| json!(v)),
                    Kind::Float { .. } => row.try_get::<Option<f64>, _>(col).map(|v| json!(v)),
                    Kind::Bool { .. } => row.try_get::<Option<bool>, _>(col).map(|v| json!(v)),
                    Kind::Text { .. } | Kind::Choice { .. } => {
                        row.try_get::<Option<String>, _>(col).map(|v| json!(v))
                    }
                };
                v.map(|v| (setting, v))
            })
            .collect::<sqlx::Result<SettingValues>>()
            .map(SettingsRow)
    }
}

impl Db {
    /// Inserts a scanned file, or refreshes the metadata of the row with the same file path (per-model
    /// settings are kept). Returns the row.
    pub async fn upsert_scanned(&self, m: &ScannedModel) -> Result<ModelRow> {
        let now = now_ms();
        self.execute(
            "registering a model",
            Query::insert()
                .into_table(Models::Table)
                .columns(
                    [Models::Name, Models::FilePath]
                        .into_iter()
                        .chain(SCANNED)
                        .chain([Models::CreatedAt, Models::UpdatedAt]),
                )
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
                    m.reranking.into(),
                    m.unsupported_reason.clone().into(),
                    now.into(),
                    now.into(),
                ])
                .on_conflict(
                    OnConflict::column(Models::FilePath)
                        .update_columns(SCANNED.into_iter().chain([Models::UpdatedAt]))
                        .to_owned(),
                ),
        )
        .await?;
        self.model_by_path(&m.file_path)
            .await?
            .ok_or(DbError::Query {
                op: "reading back a registered model",
                source: sqlx::Error::RowNotFound,
            })
    }

    async fn model_by_path(&self, path: &str) -> Result<Option<ModelRow>> {
        self.fetch_optional(
            "reading a model",
            Query::select()
                .column(sea_query::Asterisk)
                .from(Models::Table)
                .and_where(Expr::col(Models::FilePath).eq(path)),
        )
        .await
    }

    /// Every model, by name.
    pub async fn list_models(&self) -> Result<Vec<ModelRow>> {
        self.fetch_all(
            "listing models",
            Query::select()
                .column(sea_query::Asterisk)
                .from(Models::Table)
                .order_by(Models::Name, Order::Asc),
        )
        .await
    }

    /// The model named `name`, if any.
    pub async fn get_model(&self, name: &str) -> Result<Option<ModelRow>> {
        self.fetch_optional(
            "reading a model",
            Query::select()
                .column(sea_query::Asterisk)
                .from(Models::Table)
                .and_where(Expr::col(Models::Name).eq(name)),
        )
        .await
    }

    /// Every setting of [`MODEL_SETTINGS`] of the model `name`, each
    /// read from its column as JSON (`null` = unset), in the table's order; `None` when there is no
    /// such model.
    pub async fn model_settings(&self, name: &str) -> Result<Option<SettingValues>> {
        let mut sel = Query::select();
        sel.from(Models::Table)
            .and_where(Expr::col(Models::Name).eq(name));
        for setting in MODEL_SETTINGS {
            sel.column(Alias::new(setting.column));
        }
        let row: Option<SettingsRow> = self
            .fetch_optional("reading a model's settings", &sel)
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// Applies a (validated) settings patch, each setting to its column; returns the updated row, or
    /// `None` when there is no such model. A change of a setting that applies at the next load (context
    /// size, slots, KV cache types, …) also forgets the measured peak RSS, which was measured with the
    /// old values: the memory estimate goes back to its formula until the next worker is measured.
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
        if p.changes
            .iter()
            .any(|(s, _)| s.applies == crate::supervisor::settings::Applies::NextLoad)
        {
            upd.value(Models::PeakRssBytes, Option::<i64>::None);
        }
        self.execute("updating a model's settings", &upd).await?;
        self.get_model(name).await
    }

    /// Deletes a model's row (its sessions go with it). Returns whether a row was deleted.
    pub async fn delete_model(&self, name: &str) -> Result<bool> {
        let r = self
            .execute(
                "deleting a model",
                Query::delete()
                    .from_table(Models::Table)
                    .and_where(Expr::col(Models::Name).eq(name)),
            )
            .await?;
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
        self.execute(
            "recording a model's source",
            Query::update()
                .table(Models::Table)
                .value(Models::Sha256, sha256.map(str::to_owned))
                .value(Models::HfRepoId, hf_repo_id.map(str::to_owned))
                .value(Models::HfFilename, hf_filename.map(str::to_owned))
                .value(Models::UpdatedAt, now_ms())
                .and_where(Expr::col(Models::Name).eq(name)),
        )
        .await?;
        Ok(())
    }

    /// Sets (or clears) why a model cannot run — e.g. its file became unreadable — keeping its row and
    /// settings.
    pub async fn set_unsupported_reason(&self, name: &str, reason: Option<&str>) -> Result<()> {
        self.execute(
            "marking a model",
            Query::update()
                .table(Models::Table)
                .value(Models::UnsupportedReason, reason.map(str::to_owned))
                .value(Models::UpdatedAt, now_ms())
                .and_where(Expr::col(Models::Name).eq(name)),
        )
        .await?;
        Ok(())
    }

    /// Records that a model served a request now.
    pub async fn touch_model(&self, name: &str) -> Result<()> {
        self.execute(
            "touching a model",
            Query::update()
                .table(Models::Table)
                .value(Models::LastUsedAt, now_ms())
                .and_where(Expr::col(Models::Name).eq(name)),
        )
        .await?;
        Ok(())
    }

    /// Raises the model's and the session's measured peak RSS to `bytes` when larger.
    pub async fn record_peak_rss(&self, model_id: i64, session_id: i64, bytes: i64) -> Result<()> {
        self.execute(
            "recording a model's peak RSS",
            Query::update()
                .table(Models::Table)
                .value(Models::PeakRssBytes, bytes)
                .and_where(Expr::col(Models::Id).eq(model_id))
                .and_where(
                    Expr::col(Models::PeakRssBytes)
                        .is_null()
                        .or(Expr::col(Models::PeakRssBytes).lt(bytes)),
                ),
        )
        .await?;
        self.execute(
            "recording a session's peak RSS",
            Query::update()
                .table(ModelSessions::Table)
                .value(ModelSessions::PeakRssBytes, bytes)
                .and_where(Expr::col(ModelSessions::Id).eq(session_id)),
        )
        .await?;
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
}

#[cfg(test)]
mod tests {
    use super::super::test_db as db;
    use super::*;

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
}
