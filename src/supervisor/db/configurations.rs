//! `configurations`: the database overrides of global settings (applied live where they can be).

use sea_query::{Expr, Iden, OnConflict, Order, Query};

use super::{Db, Result, now_ms};

#[derive(Iden)]
enum Configurations {
    Table,
    Key,
    Value,
    UpdatedAt,
}

impl Db {
    /// Every settings override as (key, value).
    pub async fn configurations(&self) -> Result<Vec<(String, String)>> {
        self.fetch_all(
            "reading settings overrides",
            Query::select()
                .columns([Configurations::Key, Configurations::Value])
                .from(Configurations::Table)
                .order_by(Configurations::Key, Order::Asc),
        )
        .await
    }

    /// Sets an override.
    pub async fn set_configuration(&self, key: &str, value: &str) -> Result<()> {
        self.execute(
            "writing a settings override",
            Query::insert()
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
                ),
        )
        .await?;
        Ok(())
    }

    /// Removes an override (the setting falls back to file/env/default).
    pub async fn delete_configuration(&self, key: &str) -> Result<()> {
        self.execute(
            "removing a settings override",
            Query::delete()
                .from_table(Configurations::Table)
                .and_where(Expr::col(Configurations::Key).eq(key)),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_db as db;

    #[tokio::test]
    async fn an_override_is_replaced_and_removed() {
        let (_d, db) = db().await;
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
