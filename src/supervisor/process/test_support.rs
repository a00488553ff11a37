//! Test support of the process manager's unit tests: a manager on a temporary database, a model row.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::Manager;
use crate::config::Settings;
use crate::supervisor::db::{Db, ModelRow};
use crate::supervisor::events::Events;

/// A manager whose workers are `/bin/false`, on a fresh database in a temporary folder.
pub(super) async fn manager() -> (tempfile::TempDir, Arc<Manager>, Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("t.db")).await.unwrap();
    let settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    let m = Manager::new(
        db.clone(),
        Arc::new(RwLock::new(settings)),
        Events::default(),
        Arc::default(),
        PathBuf::from("/bin/false"),
    );
    (dir, m, db)
}

/// A llama model row of 100 MiB, 30 layers, trained context 4096, `-c 8192 -np 2`.
pub(super) fn row(name: &str) -> ModelRow {
    ModelRow {
        id: 1,
        name: name.into(),
        file_path: "/x.gguf".into(),
        size_bytes: 100 << 20,
        sha256: None,
        architecture: Some("llama".into()),
        parameters: None,
        quantization: None,
        context_length: Some(4096),
        n_layer: Some(30),
        n_embd_kv: Some(192),
        embedding: false,
        reranking: false,
        hf_repo_id: None,
        hf_filename: None,
        ctx_size: Some(8192),
        threads: None,
        parallel: Some(2),
        gpu_layers: None,
        idle_timeout: None,
        pinned: false,
        enabled: true,
        temperature: None,
        top_p: None,
        top_k: None,
        max_tokens: None,
        cache_type_k: None,
        cache_type_v: None,
        peak_rss_bytes: None,
        created_at: 0,
        updated_at: 0,
        last_used_at: None,
        unsupported_reason: None,
    }
}
