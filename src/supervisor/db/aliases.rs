//! `model_aliases`: other names of catalogue models (Ollama's `/api/copy`, pulled `hf.co/…` names).

use sea_query::{Expr, Iden, OnConflict, Order, Query};

use super::models::Models;
use super::{Db, Result, now_ms};

#[derive(Iden)]
enum ModelAliases {
    Table,
    Alias,
    ModelId,
    CreatedAt,
}

impl Db {
    /// The catalogue name an alias stands for, if it is one.
    pub async fn resolve_alias(&self, alias: &str) -> Result<Option<String>> {
        let name: Option<(String,)> = self
            .fetch_optional(
                "resolving a model alias",
                Query::select()
                    .column((Models::Table, Models::Name))
                    .from(ModelAliases::Table)
                    .inner_join(
                        Models::Table,
                        Expr::col((Models::Table, Models::Id))
                            .equals((ModelAliases::Table, ModelAliases::ModelId)),
                    )
                    .and_where(Expr::col((ModelAliases::Table, ModelAliases::Alias)).eq(alias)),
            )
            .await?;
        Ok(name.map(|(n,)| n))
    }

    /// Makes `alias` another name of the model with id `model_id` (replacing what it named before).
    pub async fn set_alias(&self, alias: &str, model_id: i64) -> Result<()> {
        self.execute(
            "adding a model alias",
            Query::insert()
                .into_table(ModelAliases::Table)
                .columns([
                    ModelAliases::Alias,
                    ModelAliases::ModelId,
                    ModelAliases::CreatedAt,
                ])
                .values_panic([alias.into(), model_id.into(), now_ms().into()])
                .on_conflict(
                    OnConflict::column(ModelAliases::Alias)
                        .update_columns([ModelAliases::ModelId, ModelAliases::CreatedAt])
                        .to_owned(),
                ),
        )
        .await?;
        Ok(())
    }

    /// Removes one alias. Returns whether it existed.
    pub async fn delete_alias(&self, alias: &str) -> Result<bool> {
        let r = self
            .execute(
                "deleting a model alias",
                Query::delete()
                    .from_table(ModelAliases::Table)
                    .and_where(Expr::col(ModelAliases::Alias).eq(alias)),
            )
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Every (alias, model id), by alias.
    pub async fn list_aliases(&self) -> Result<Vec<(String, i64)>> {
        self.fetch_all(
            "listing model aliases",
            Query::select()
                .columns([ModelAliases::Alias, ModelAliases::ModelId])
                .from(ModelAliases::Table)
                .order_by(ModelAliases::Alias, Order::Asc),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ScannedModel, test_db};

    #[tokio::test]
    async fn aliases_resolve_replace_and_go_with_their_model() {
        let (_d, db) = test_db().await;
        let m = db
            .upsert_scanned(&ScannedModel {
                name: "smol".into(),
                file_path: "/m/smol.gguf".into(),
                size_bytes: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(db.resolve_alias("hf.co/a/b:Q4_0").await.unwrap(), None);
        db.set_alias("hf.co/a/b:Q4_0", m.id).await.unwrap();
        db.set_alias("hf.co/a/b:Q4_0", m.id).await.unwrap();
        assert_eq!(
            db.resolve_alias("hf.co/a/b:Q4_0").await.unwrap().as_deref(),
            Some("smol")
        );
        assert_eq!(db.list_aliases().await.unwrap().len(), 1);
        db.delete_model("smol").await.unwrap();
        assert_eq!(db.resolve_alias("hf.co/a/b:Q4_0").await.unwrap(), None);
        assert!(!db.delete_alias("hf.co/a/b:Q4_0").await.unwrap());
    }
}
