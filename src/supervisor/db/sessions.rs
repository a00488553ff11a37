//! `model_sessions`: one row per worker process started, the mirror of the process manager's state
//! machine (what a restart reaps).

use sea_query::{Expr, Iden, Order, Query};
use serde::Serialize;

use super::{Db, Result, now_ms};

#[derive(Iden)]
pub(super) enum ModelSessions {
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

impl Db {
    /// Records a new worker session in state `status`; returns its id.
    pub async fn insert_session(
        &self,
        model_id: i64,
        port: u16,
        instance: &str,
        status: &str,
    ) -> Result<i64> {
        let r = self
            .execute(
                "recording a worker session",
                Query::insert()
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
                    ]),
            )
            .await?;
        Ok(r.last_insert_rowid())
    }

    /// Records the pid of a session's process.
    pub async fn set_session_pid(&self, id: i64, pid: u32) -> Result<()> {
        self.execute(
            "recording a worker's pid",
            Query::update()
                .table(ModelSessions::Table)
                .value(ModelSessions::Pid, i64::from(pid))
                .and_where(Expr::col(ModelSessions::Id).eq(id)),
        )
        .await?;
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
        self.execute("mirroring a worker's state", &upd).await?;
        Ok(())
    }

    /// Sessions whose process may still be alive (loading, ready or draining).
    pub async fn live_sessions(&self) -> Result<Vec<SessionRow>> {
        self.fetch_all(
            "listing live sessions",
            Query::select()
                .column(sea_query::Asterisk)
                .from(ModelSessions::Table)
                .and_where(
                    Expr::col(ModelSessions::Status).is_in(["loading", "ready", "draining"]),
                ),
        )
        .await
    }

    /// The latest `limit` sessions of a model, newest first.
    pub async fn model_sessions(&self, model_id: i64, limit: u64) -> Result<Vec<SessionRow>> {
        self.fetch_all(
            "listing a model's sessions",
            Query::select()
                .column(sea_query::Asterisk)
                .from(ModelSessions::Table)
                .and_where(Expr::col(ModelSessions::ModelId).eq(model_id))
                .order_by(ModelSessions::Id, Order::Desc)
                .limit(limit),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ScannedModel, test_db as db};

    #[tokio::test]
    async fn sessions_mirror_the_state_and_the_peak_rss_only_grows() {
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
    }
}
