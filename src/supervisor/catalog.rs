//! The model catalogue: finds `*.gguf` files under MODELS_DIR, reads their metadata with `engine::gguf`
//! (architecture, parameters, quantization, context length, layer sizes) and registers them in `models`.
//! A split GGUF (`m-00001-of-00003.gguf` …) is one model: its row points at the first part, its size is
//! that of all parts, and deleting it deletes every part.

use std::path::{Path, PathBuf};

use crate::engine::gguf::{self, GgufFile, keys};

use super::db::{Db, DbError, ScannedModel};

/// Folder depth searched below MODELS_DIR (downloads may live in `repo/` sub-folders).
const MAX_DEPTH: usize = 3;

/// A scan that could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read models folder {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The outcome of a scan: registered model names and files skipped with the reason.
#[derive(Debug, Default, serde::Serialize)]
pub struct ScanReport {
    pub models: Vec<String>,
    pub removed: Vec<String>,
    pub skipped: Vec<(String, String)>,
}

/// `general.file_type` (llama.cpp's `llama_ftype`, include/llama.h at 0c1e570) → name.
pub fn ftype_name(ftype: u32) -> Option<&'static str> {
    Some(match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// Architectures whose GGUF is an embedding (encoder) model: the worker gets `--embedding`.
const EMBEDDING_ARCHES: [&str; 5] = [
    "bert",
    "nomic-bert",
    "jina-bert-v2",
    "nomic-bert-moe",
    "modern-bert",
];

/// Reads what the catalogue keeps about one GGUF file. `name` is the model id to register.
///
/// Errors: the GGUF reader's error as text (a hostile or truncated file).
pub fn describe(path: &Path, name: String) -> Result<ScannedModel, String> {
    let f = GgufFile::open(path).map_err(|e| e.to_string())?;
    let arch = f.architecture().ok().map(str::to_owned);
    let a = arch.clone().unwrap_or_default();
    let geti = |k: &str| f.get_u64(k).ok().and_then(|v| i64::try_from(v).ok());
    let quant = f
        .get_u32(keys::FILE_TYPE)
        .ok()
        .and_then(ftype_name)
        .map(str::to_owned)
        .or_else(|| {
            // The type holding the most bytes.
            let mut by: Vec<(&str, u64)> = Vec::new();
            for t in f.tensors() {
                match by.iter_mut().find(|(n, _)| *n == t.ty.name()) {
                    Some(e) => e.1 += t.n_bytes,
                    None => by.push((t.ty.name(), t.n_bytes)),
                }
            }
            by.into_iter().max_by_key(|e| e.1).map(|e| e.0.to_owned())
        });
    let n_embd = geti(&format!("{a}.embedding_length"));
    let n_head = geti(&format!("{a}.attention.head_count"));
    // `head_count_kv` may be one number or one per layer (models with uneven layers): the largest counts.
    let n_head_kv = f
        .get(&format!("{a}.attention.head_count_kv"))
        .and_then(|v| match v {
            gguf::Value::Array(arr) => arr
                .iter()
                .filter_map(|x| x.as_int())
                .max()
                .and_then(|x| i64::try_from(x).ok()),
            v => v.as_int().and_then(|x| i64::try_from(x).ok()),
        })
        .filter(|h| *h > 0)
        .or(n_head);
    let head_dim_k =
        geti(&format!("{a}.attention.key_length")).or_else(|| match (n_embd, n_head) {
            (Some(e), Some(h)) if h > 0 => Some(e / h),
            _ => None,
        });
    let head_dim_v = geti(&format!("{a}.attention.value_length")).or(head_dim_k);
    let embedding = EMBEDDING_ARCHES.contains(&a.as_str())
        || f.get(&format!("{a}.pooling_type")).is_some() && !a.starts_with("qwen");
    // llama.cpp's LLAMA_POOLING_TYPE_RANK.
    let reranking = embedding && f.get_u32(&format!("{a}.pooling_type")).ok() == Some(4);
    Ok(ScannedModel {
        name,
        file_path: path.display().to_string(),
        size_bytes: i64::try_from(f.file_size()).unwrap_or(i64::MAX),
        parameters: i64::try_from(f.parameter_count()).ok(),
        quantization: quant,
        context_length: geti(&keys::context_length(&a)),
        n_layer: geti(&format!("{a}.block_count")),
        // The mean of the key and value widths (they differ in a few architectures): the KV estimate
        // counts 2 × n_embd_kv per position and layer.
        n_embd_kv: match (n_head_kv, head_dim_k, head_dim_v) {
            (Some(h), Some(k), Some(v)) => h.checked_mul(k.saturating_add(v)).map(|x| (x + 1) / 2),
            _ => None,
        },
        embedding,
        reranking,
        architecture: arch,
        unsupported_reason: crate::engine::inspect::unsupported_reason(&f),
    })
}

/// Whether `path` lies inside `models_dir` (its folder resolved, the file itself not followed: deleting
/// a symlink there removes the link, never the file it points to elsewhere).
pub fn inside_models_dir(path: &Path, models_dir: &Path) -> bool {
    let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else {
        return false;
    };
    match (
        std::fs::canonicalize(parent),
        std::fs::canonicalize(models_dir),
    ) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// Every `*.gguf` below `dir` (to [`MAX_DEPTH`] folders), sorted.
pub fn find_gguf(dir: &Path) -> Result<Vec<PathBuf>, CatalogError> {
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(d)? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() && depth < MAX_DEPTH {
                let _ = walk(&p, depth + 1, out);
            } else if (ft.is_file() || ft.is_symlink())
                && p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out).map_err(|source| CatalogError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    out.sort();
    Ok(out)
}

/// Every file of the model whose (first) file is `path`: all parts of a split GGUF by name
/// (`…-00001-of-0000N.gguf` → parts 1..=N, present or not), else `path` alone.
pub fn model_files(path: &Path) -> Vec<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match gguf::split_name(&name) {
        Some((prefix, 1, n)) if n > 1 => (1..=n)
            .map(|i| path.with_file_name(gguf::split_file_name(prefix, i, n)))
            .collect(),
        _ => vec![path.to_path_buf()],
    }
}

/// Deletes every file of the model at `path` ([`model_files`]) that lies inside `models_dir`; files
/// already gone are skipped. Returns the paths deleted.
///
/// Errors: the first deletion that fails (the files before it are gone).
pub fn delete_model_files(path: &Path, models_dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut deleted = Vec::new();
    for p in model_files(path) {
        if !inside_models_dir(&p, models_dir) {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => deleted.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot delete {}: {e}", p.display()),
                ));
            }
        }
    }
    Ok(deleted)
}

/// Scans `models_dir`, registers every readable GGUF (the id is the file stem, without the
/// `-00001-of-0000N` of a split; a clash gets the relative path with `/` → `--`, and a clash left
/// after that a `-2`, `-3` … suffix), and removes rows whose file is gone. A registered file that can
/// no longer be read keeps its row and settings, marked unreadable with the reason (it cannot load);
/// a file that cannot be registered is reported, never an error of the whole scan. Parts 2.. of a split are read with their first part, not registered alone.
/// Blocking file reads run off the runtime.
///
/// Errors: [`CatalogError::Dir`] when the folder cannot be listed, [`CatalogError::Db`].
pub async fn scan(db: &Db, models_dir: &Path) -> Result<ScanReport, CatalogError> {
    let dir = models_dir.to_path_buf();
    let found = tokio::task::spawn_blocking(move || -> Result<_, CatalogError> {
        let files = find_gguf(&dir)?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for p in &files {
            let file_name = p
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let split = gguf::split_name(&file_name).filter(|(_, _, n)| *n > 1);
            if let Some((prefix, i, n)) = split
                && i > 1
            {
                // Read with part 1; reported only when part 1 is not there.
                let first = p.with_file_name(gguf::split_file_name(prefix, 1, n));
                if !files.contains(&first) {
                    out.push((
                        p.display().to_string(),
                        Err(format!(
                            "part {i} of {n} of a split GGUF whose first part {} is missing",
                            first.display()
                        )),
                    ));
                }
                continue;
            }
            let stem = match split {
                Some((prefix, _, _)) => prefix.to_string(),
                None => p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            let name = if seen.insert(stem.clone()) {
                stem
            } else {
                let rel = p.strip_prefix(&dir).unwrap_or(p).with_extension("");
                rel.to_string_lossy().replace('/', "--")
            };
            out.push((p.display().to_string(), describe(p, name)));
        }
        Ok(out)
    })
    .await
    .map_err(|e| CatalogError::Dir {
        path: models_dir.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })??;
    let mut report = ScanReport::default();
    let existing = db.list_models().await?;
    // Rows whose file is still there stay — an unreadable one too, with its settings — so the rows of
    // files that are gone can go first and free their names.
    let present: Vec<String> = found
        .iter()
        .filter(|(path, r)| r.is_ok() || existing.iter().any(|e| &e.file_path == path))
        .map(|(path, _)| path.clone())
        .collect();
    report.removed = db.remove_missing(&present).await?;
    let mut taken: std::collections::HashSet<String> = existing
        .iter()
        .filter(|e| present.contains(&e.file_path))
        .map(|e| e.name.clone())
        .collect();
    for (path, r) in found {
        let old = existing.iter().find(|e| e.file_path == path);
        match (r, old) {
            (Ok(mut m), old) => {
                match old {
                    // A file already registered keeps its (possibly renamed) id.
                    Some(old) => m.name = old.name.clone(),
                    None => {
                        m.name = unique_name(&m.name, &taken);
                        taken.insert(m.name.clone());
                    }
                }
                match db.upsert_scanned(&m).await {
                    Ok(row) => report.models.push(row.name),
                    Err(e) => {
                        tracing::warn!(file = %path, error = %e, "cannot register GGUF");
                        report.skipped.push((path, e.to_string()));
                    }
                }
            }
            (Err(e), Some(old)) => {
                let reason = format!("unreadable: {e}");
                tracing::warn!(file = %path, model = %old.name, "{reason}");
                if let Err(e) = db.set_unsupported_reason(&old.name, Some(&reason)).await {
                    tracing::warn!(file = %path, error = %e, "cannot mark model unreadable");
                }
                report.skipped.push((path, e));
            }
            (Err(e), None) => {
                tracing::warn!(file = %path, error = %e, "skipping unreadable GGUF");
                report.skipped.push((path, e));
            }
        }
    }
    Ok(report)
}

/// `name`, or `name-2`, `name-3` … : the first not in `taken`.
fn unique_name(name: &str, taken: &std::collections::HashSet<String>) -> String {
    if !taken.contains(name) {
        return name.to_owned();
    }
    (2u32..)
        .map(|i| format!("{name}-{i}"))
        .find(|n| !taken.contains(n))
        .expect("a free suffix exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftype_names() {
        assert_eq!(ftype_name(3), Some("Q4_1"));
        assert_eq!(ftype_name(15), Some("Q4_K_M"));
        assert_eq!(ftype_name(999), None);
    }

    #[tokio::test]
    async fn scan_registers_real_files_and_skips_garbage() {
        let Ok(assets) = std::env::var("CYBER_INFERENCE_ASSETS") else {
            panic!("CYBER_INFERENCE_ASSETS is not set (see ../shared/assets/fetch)");
        };
        let src = Path::new(&assets).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&src, dir.path().join("smol.gguf")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/bad.gguf"), b"GGUF\x03\0\0\0garbage").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let r = scan(&db, dir.path()).await.unwrap();
        assert_eq!(r.models, vec!["smol".to_string()]);
        assert_eq!(r.skipped.len(), 1);
        let m = db.get_model("smol").await.unwrap().unwrap();
        assert_eq!(m.architecture.as_deref(), Some("llama"));
        assert_eq!(m.quantization.as_deref(), Some("Q4_1"));
        assert_eq!(m.context_length, Some(8192));
        assert_eq!((m.n_layer, m.n_embd_kv), (Some(30), Some(192)));
        assert!(!m.embedding);
        assert!(m.parameters.unwrap() > 100_000_000);
        let e = describe(
            &Path::new(&assets).join("models/all-MiniLM-L6-v2.F16.gguf"),
            "e".into(),
        )
        .unwrap();
        assert!(e.embedding);
        std::fs::remove_file(dir.path().join("smol.gguf")).unwrap();
        let r = scan(&db, dir.path()).await.unwrap();
        assert_eq!(r.removed, vec!["smol".to_string()]);
        assert!(scan(&db, &dir.path().join("missing")).await.is_err());
    }

    #[tokio::test]
    async fn name_clashes_get_a_suffix_and_unreadable_files_keep_their_row() {
        let Ok(assets) = std::env::var("CYBER_INFERENCE_ASSETS") else {
            panic!("CYBER_INFERENCE_ASSETS is not set (see ../shared/assets/fetch)");
        };
        let src = Path::new(&assets).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let dir = tempfile::tempdir().unwrap();
        // Scanned in path order `x/x.gguf` (`x`), `x--x.gguf` (`x--x`), `x.gguf`: its stem and its
        // relative-path name are both `x`, taken — it gets a suffix.
        std::fs::create_dir(dir.path().join("x")).unwrap();
        for f in ["x.gguf", "x/x.gguf", "x--x.gguf"] {
            std::os::unix::fs::symlink(&src, dir.path().join(f)).unwrap();
        }
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let mut r = scan(&db, dir.path()).await.unwrap();
        r.models.sort();
        assert_eq!(r.models, ["x", "x--x", "x-2"], "{:?}", r.skipped);
        assert!(
            db.get_model("x")
                .await
                .unwrap()
                .unwrap()
                .file_path
                .ends_with("x/x.gguf")
        );
        // A registered file that turns unreadable keeps its row and settings, marked with the reason.
        let patch = crate::supervisor::settings::ModelSettingsPatch::parse(
            serde_json::json!({"ctx_size": 512, "pinned": true})
                .as_object()
                .unwrap(),
            &crate::config::Settings::default(),
        )
        .unwrap();
        db.update_model_settings("x", &patch)
            .await
            .unwrap()
            .unwrap();
        let x = db.get_model("x").await.unwrap().unwrap();
        std::fs::remove_file(&x.file_path).unwrap();
        std::fs::write(&x.file_path, b"GGUF\x03\0\0\0garbage").unwrap();
        let r = scan(&db, dir.path()).await.unwrap();
        assert!(r.removed.is_empty(), "{:?}", r.removed);
        assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
        let m = db.get_model("x").await.unwrap().unwrap();
        assert_eq!((m.ctx_size, m.pinned, m.id), (Some(512), true, x.id));
        let why = m.unsupported_reason.unwrap_or_default();
        assert!(why.starts_with("unreadable: "), "{why}");
        // Readable again: the mark goes.
        std::fs::remove_file(&x.file_path).unwrap();
        std::os::unix::fs::symlink(&src, &x.file_path).unwrap();
        scan(&db, dir.path()).await.unwrap();
        assert_eq!(
            db.get_model("x").await.unwrap().unwrap().unsupported_reason,
            None
        );
    }

    #[tokio::test]
    async fn a_split_gguf_is_one_model_and_is_deleted_whole() {
        use crate::engine::gguf_split::{SplitPlan, split};
        let Ok(assets) = std::env::var("CYBER_INFERENCE_ASSETS") else {
            panic!("CYBER_INFERENCE_ASSETS is not set (see ../shared/assets/fetch)");
        };
        let src = Path::new(&assets).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(models.join("repo")).unwrap();
        let parts = split(
            &src,
            &models.join("repo/smol-Q4_1"),
            SplitPlan::MaxTensors(100),
        )
        .unwrap();
        assert_eq!(parts.len(), 3);
        let total: u64 = parts
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let r = scan(&db, &models).await.unwrap();
        assert_eq!(r.models, ["smol-Q4_1"]);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let m = db.get_model("smol-Q4_1").await.unwrap().unwrap();
        assert_eq!(m.size_bytes as u64, total);
        assert_eq!(Path::new(&m.file_path), parts[0]);
        assert_eq!(m.quantization.as_deref(), Some("Q4_1"));
        assert_eq!(model_files(Path::new(&m.file_path)), parts);
        assert_eq!(model_files(&src), std::slice::from_ref(&src));

        // Without its first part, the rest is reported, not registered.
        let aside = dir.path().join("aside.gguf");
        std::fs::rename(&parts[0], &aside).unwrap();
        let r = scan(&db, &models).await.unwrap();
        assert!(r.models.is_empty());
        assert_eq!(r.removed, ["smol-Q4_1"]);
        assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
        assert!(r.skipped[0].1.contains("first part"), "{:?}", r.skipped);
        std::fs::rename(&aside, &parts[0]).unwrap();

        // Deleting deletes every part; a file outside MODELS_DIR is never touched.
        let deleted = delete_model_files(&parts[0], &models).unwrap();
        assert_eq!(deleted, parts);
        assert!(parts.iter().all(|p| !p.exists()));
        assert!(delete_model_files(&parts[0], &models).unwrap().is_empty());
        assert!(delete_model_files(&src, &models).unwrap().is_empty());
        assert!(src.exists());
    }
}
