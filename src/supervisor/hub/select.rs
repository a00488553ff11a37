//! File selection: which GGUF files of a repo make one model (single files, split parts), which one
//! to download when none is named, and the name rules (repo ids, revisions, quantization and split
//! suffixes, the local file name) applied to the API's untrusted answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::HubError;

/// One GGUF file of a repo, as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepoFile {
    /// Path inside the repo (`rfilename`), e.g. `Q4_K_M/model-00001-of-00002.gguf`.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// The LFS oid: SHA-256 of the content, 64 lower-case hex digits (absent for non-LFS files).
    pub sha256: Option<String>,
    /// Quantization read from the name (`Q4_K_M`, `Q8_0`, `F16`, `IQ4_XS`, …), upper case.
    pub quantization: Option<String>,
    /// For split GGUFs (`…-00001-of-00003.gguf`): this part's number and the number of parts.
    pub split: Option<SplitPart>,
}

/// Position of a file in a split GGUF: `index` of `count`, both from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SplitPart {
    pub index: u32,
    pub count: u32,
}

/// One downloadable model of a repo: a single GGUF or all parts of a split GGUF, in part order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GgufModel {
    /// Name of the (first) file inside the repo; what `--filename` takes.
    pub filename: String,
    pub quantization: Option<String>,
    /// Bytes of all its files.
    pub total_size: u64,
    /// The files, part 1 first.
    pub files: Vec<RepoFile>,
    /// Parts of a split that the repo lacks (then the model cannot be downloaded).
    pub missing_parts: Vec<u32>,
    /// A multimodal projector (`mmproj-*.gguf`), not a language model: never chosen automatically.
    pub is_projector: bool,
}

/// What to download. Deserializable as the admin API's request body.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct DownloadRequest {
    /// `OWNER/NAME`.
    pub repo_id: String,
    /// Branch, tag or commit; default `main`.
    #[serde(default)]
    pub revision: Option<String>,
    /// A GGUF file of the repo (any part of a split chooses the whole split); default: [`choose_model`].
    #[serde(default)]
    pub filename: Option<String>,
}

/// Splits and checks `OWNER/NAME` (letters, digits, `-`, `_`, `.`; no `..`; at most 96 characters each).
pub(super) fn parse_repo_id(repo_id: &str) -> Result<(&str, &str), HubError> {
    let bad = || HubError::InvalidRepoId(repo_id.to_string());
    let (owner, name) = repo_id.split_once('/').ok_or_else(bad)?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.contains("..")
            && !s.starts_with(['.', '-'])
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if ok(owner) && ok(name) {
        Ok((owner, name))
    } else {
        Err(bad())
    }
}

pub(super) fn check_revision(revision: &str) -> Result<(), HubError> {
    if revision.is_empty()
        || revision.len() > 200
        || revision.contains("..")
        || revision.chars().any(|c| c.is_control() || c == '\\')
    {
        return Err(HubError::InvalidArgument {
            what: "revision",
            value: revision.chars().take(200).collect(),
            reason: "expected a branch, tag or commit name",
        });
    }
    Ok(())
}

/// The last component of a repo path: `dir/m.Q4_K_M.gguf` → `m.Q4_K_M.gguf`.
pub(super) fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether a repo path names a GGUF file.
pub(super) fn is_gguf(filename: &str) -> bool {
    filename.to_ascii_lowercase().ends_with(".gguf")
}

/// The file name a repo file gets in MODELS_DIR: its last path component, which must be a plain `.gguf`
/// name (the API's answer is untrusted: no `..`, separators or control characters).
pub(super) fn local_name(filename: &str) -> Result<&str, HubError> {
    let base = base_name(filename);
    let bad = |reason| HubError::InvalidArgument {
        what: "file name",
        value: filename.chars().take(200).collect(),
        reason,
    };
    if base.is_empty() || base.starts_with('.') || base.len() > 255 {
        return Err(bad("not a usable file name"));
    }
    if base.chars().any(|c| c.is_control() || c == '\\') {
        return Err(bad("contains control characters or backslashes"));
    }
    if !is_gguf(base) {
        return Err(bad("not a .gguf file"));
    }
    Ok(base)
}

/// `…-00001-of-00003.gguf` → part 1 of 3 (and the name without the suffix); the folder is kept in the
/// prefix.
fn split_parts(filename: &str) -> Option<(&str, SplitPart)> {
    let base_at = filename.rfind('/').map_or(0, |i| i + 1);
    let (prefix, index, count) = crate::engine::gguf::split_name(&filename[base_at..])?;
    Some((
        &filename[..base_at + prefix.len()],
        SplitPart { index, count },
    ))
}

/// The part number of a split GGUF file, if it is one.
pub(super) fn split_of(filename: &str) -> Option<SplitPart> {
    split_parts(filename).map(|(_, p)| p)
}

/// The quantization named in a file name: the last `-`/`.`-separated token that looks like one
/// (`Q4_K_M`, `q8_0`, `IQ4_XS`, `F16`, `BF16`, `F32`, `Q4_0_4_4`, `UD-Q4_K_XL`…), upper-cased.
pub(super) fn quantization_of(filename: &str) -> Option<String> {
    let base = base_name(filename);
    let stem = match split_parts(base) {
        Some((prefix, _)) => prefix,
        None => base.get(..base.len().saturating_sub(5)).unwrap_or(base),
    };
    stem.split(['-', '.'])
        .rev()
        .map(str::to_ascii_uppercase)
        .find(|t| {
            let q = t.strip_prefix('I').unwrap_or(t);
            let is_q = q.len() >= 2
                && q.starts_with('Q')
                && q.as_bytes()[1].is_ascii_digit()
                && q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            is_q || matches!(t.as_str(), "F16" | "BF16" | "F32" | "FP16" | "FP32")
        })
}

/// Groups GGUF files into models: each plain file alone, each split's parts together (part order).
/// Result: smallest first (by total size, then name).
pub(crate) fn group_models(files: &[RepoFile]) -> Vec<GgufModel> {
    let mut splits: BTreeMap<(String, u32), Vec<RepoFile>> = BTreeMap::new();
    let mut models = Vec::new();
    for f in files.iter().filter(|f| is_gguf(&f.filename)) {
        match split_parts(&f.filename) {
            Some((prefix, part)) => splits
                .entry((prefix.to_string(), part.count))
                .or_default()
                .push(f.clone()),
            None => models.push(model_of(vec![f.clone()], Vec::new())),
        }
    }
    for ((_, count), mut parts) in splits {
        parts.sort_by_key(|p| p.split.map(|s| s.index));
        parts.dedup_by_key(|p| p.split.map(|s| s.index));
        let missing = (1..=count)
            .filter(|i| !parts.iter().any(|p| p.split.is_some_and(|s| s.index == *i)))
            .collect();
        models.push(model_of(parts, missing));
    }
    models.sort_by(|a, b| {
        a.total_size
            .cmp(&b.total_size)
            .then_with(|| a.filename.cmp(&b.filename))
    });
    models
}

fn model_of(files: Vec<RepoFile>, missing_parts: Vec<u32>) -> GgufModel {
    let first = &files[0];
    let base = base_name(&first.filename);
    GgufModel {
        filename: first.filename.clone(),
        quantization: first.quantization.clone(),
        total_size: files.iter().map(|f| f.size).sum(),
        is_projector: base.to_ascii_lowercase().starts_with("mmproj"),
        missing_parts,
        files,
    }
}

/// The model to download when no file is named: Q4_K_M if present, else Q8_0, else the smallest
/// (complete, non-projector models only; `models` as from [`group_models`], smallest first).
pub(crate) fn choose_model(models: &[GgufModel]) -> Option<&GgufModel> {
    let candidates = || {
        models
            .iter()
            .filter(|m| m.missing_parts.is_empty() && !m.is_projector)
    };
    let with = |q: &str| candidates().find(|m| m.quantization.as_deref() == Some(q));
    with("Q4_K_M")
        .or_else(|| with("Q8_0"))
        .or_else(|| candidates().next())
}

/// The model a download request means: the named file (any part of a split picks the whole split) or
/// [`choose_model`]. Errors: [`HubError::NoGguf`], [`HubError::FileNotInRepo`],
/// [`HubError::IncompleteSplit`].
pub(super) fn select_model(
    repo: &str,
    revision: &str,
    files: &[RepoFile],
    filename: Option<&str>,
) -> Result<GgufModel, HubError> {
    let models = group_models(files);
    if models.is_empty() {
        return Err(no_gguf(repo, revision, files));
    }
    let model = match filename {
        Some(name) => models
            .iter()
            .find(|m| m.files.iter().any(|f| f.filename == name))
            .ok_or_else(|| HubError::FileNotInRepo {
                repo: repo.into(),
                file: name.into(),
                available: models
                    .iter()
                    .map(|m| m.filename.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
        None => choose_model(&models).ok_or_else(|| no_gguf(repo, revision, files))?,
    };
    if !model.missing_parts.is_empty() {
        return Err(HubError::IncompleteSplit {
            repo: repo.into(),
            file: model.filename.clone(),
            count: model.files[0].split.map_or(0, |s| s.count),
            missing: model.missing_parts.clone(),
        });
    }
    Ok(model.clone())
}

pub(super) fn no_gguf(repo: &str, revision: &str, files: &[RepoFile]) -> HubError {
    let others = if files.is_empty() {
        " (the repo lists no files)".to_string()
    } else {
        let names: Vec<_> = files.iter().take(5).map(|f| f.filename.as_str()).collect();
        format!(
            " (it has {} file(s): {}{})",
            files.len(),
            names.join(", "),
            if files.len() > 5 { ", …" } else { "" }
        )
    };
    HubError::NoGguf {
        repo: repo.into(),
        revision: revision.into(),
        others,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64) -> RepoFile {
        RepoFile {
            filename: name.into(),
            size,
            sha256: Some(format!("{:064x}", size)),
            quantization: quantization_of(name),
            split: split_of(name),
        }
    }

    #[test]
    fn quantization_is_read_from_names() {
        let q = |n| quantization_of(n);
        assert_eq!(
            q("SmolLM2-135M-Instruct.Q4_K_M.gguf").as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(
            q("qwen2.5-0.5b-instruct-q8_0.gguf").as_deref(),
            Some("Q8_0")
        );
        assert_eq!(
            q("Llama-3.2-1B-Instruct-IQ4_XS.gguf").as_deref(),
            Some("IQ4_XS")
        );
        assert_eq!(q("all-MiniLM-L6-v2.F16.gguf").as_deref(), Some("F16"));
        assert_eq!(q("model-BF16-00002-of-00003.gguf").as_deref(), Some("BF16"));
        assert_eq!(
            q("Q4_K_M/Big-UD-Q4_K_XL-00001-of-00002.gguf").as_deref(),
            Some("Q4_K_XL")
        );
        assert_eq!(q("model.gguf"), None);
        // A size like 135M or a version like v2 is no quantization.
        assert_eq!(q("SmolLM2-135M-v2.gguf"), None);
    }

    #[test]
    fn split_suffixes_are_recognised_exactly() {
        assert_eq!(
            split_of("a/m-00002-of-00003.gguf"),
            Some(SplitPart { index: 2, count: 3 })
        );
        assert_eq!(split_of("m-00004-of-00003.gguf"), None);
        assert_eq!(split_of("m-00000-of-00003.gguf"), None);
        assert_eq!(split_of("m-0002-of-00003.gguf"), None);
        assert_eq!(split_of("m-00002-of-00003.bin"), None);
        assert_eq!(split_of("00002-of-00003.gguf"), None);
        assert_eq!(split_of("é.gguf"), None);
    }

    #[test]
    fn choice_prefers_q4_k_m_then_q8_0_then_smallest() {
        let all = vec![
            file("m.Q8_0.gguf", 800),
            file("m.Q4_K_M.gguf", 500),
            file("m.Q2_K.gguf", 300),
            file("mmproj-m-f16.gguf", 10),
            file("README.md", 1),
        ];
        let pick =
            |files: &[RepoFile]| choose_model(&group_models(files)).map(|m| m.filename.clone());
        assert_eq!(pick(&all).as_deref(), Some("m.Q4_K_M.gguf"));
        assert_eq!(pick(&all[..1]).as_deref(), Some("m.Q8_0.gguf"));
        let no_preferred = [all[2].clone(), all[3].clone(), file("m.F16.gguf", 2000)];
        // The projector is smaller but is never chosen.
        assert_eq!(pick(&no_preferred).as_deref(), Some("m.Q2_K.gguf"));
    }

    #[test]
    fn splits_are_one_model_and_any_part_selects_all() {
        let files = vec![
            file("big/m-Q4_K_M-00002-of-00002.gguf", 600),
            file("big/m-Q4_K_M-00001-of-00002.gguf", 700),
            file("m.Q8_0.gguf", 900),
        ];
        let models = group_models(&files);
        assert_eq!(models.len(), 2);
        let split = models.iter().find(|m| m.files.len() == 2).unwrap();
        assert_eq!(split.total_size, 1300);
        assert_eq!(split.filename, "big/m-Q4_K_M-00001-of-00002.gguf");
        assert_eq!(split.quantization.as_deref(), Some("Q4_K_M"));
        let chosen = select_model("o/r", "main", &files, None).unwrap();
        assert_eq!(chosen, *split);
        let by_part = select_model(
            "o/r",
            "main",
            &files,
            Some("big/m-Q4_K_M-00002-of-00002.gguf"),
        )
        .unwrap();
        assert_eq!(
            by_part.files[0].split,
            Some(SplitPart { index: 1, count: 2 })
        );
        assert_eq!(
            by_part.files[1].split,
            Some(SplitPart { index: 2, count: 2 })
        );
    }

    #[test]
    fn incomplete_splits_missing_files_and_empty_repos_are_errors() {
        let files = vec![
            file("m-Q4_K_M-00001-of-00003.gguf", 10),
            file("m-Q4_K_M-00003-of-00003.gguf", 10),
            file("m.Q8_0.gguf", 50),
        ];
        // Automatic choice skips the broken split.
        assert_eq!(
            select_model("o/r", "main", &files, None).unwrap().filename,
            "m.Q8_0.gguf"
        );
        match select_model("o/r", "main", &files, Some("m-Q4_K_M-00003-of-00003.gguf")) {
            Err(HubError::IncompleteSplit { missing, count, .. }) => {
                assert_eq!((missing, count), (vec![2], 3))
            }
            other => panic!("{other:?}"),
        }
        let e = select_model("o/r", "main", &files, Some("nope.gguf")).unwrap_err();
        assert!(matches!(e, HubError::FileNotInRepo { .. }), "{e}");
        assert!(e.to_string().contains("m.Q8_0.gguf"), "{e}");
        let e = select_model("o/r", "main", &[file("config.json", 5)], None).unwrap_err();
        assert!(matches!(e, HubError::NoGguf { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
        assert_eq!(e.http_status(), 422);
    }

    #[test]
    fn local_names_never_leave_models_dir() {
        assert_eq!(
            local_name("sub/dir/m.Q4_K_M.gguf").unwrap(),
            "m.Q4_K_M.gguf"
        );
        for bad in [
            "../",
            "a/..",
            "a/.hidden.gguf",
            "a\\..\\b.gguf",
            "m.bin",
            "",
            "a/",
            "x\n.gguf",
        ] {
            assert!(local_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repo_ids_and_revisions_are_checked() {
        assert_eq!(
            parse_repo_id("bartowski/SmolLM2-135M-Instruct-GGUF").unwrap(),
            ("bartowski", "SmolLM2-135M-Instruct-GGUF")
        );
        for bad in [
            "noslash", "a/b/c", "../x", "a/..", "/x", "a/", "a b/c", "a/b?c", "a/.x",
        ] {
            assert!(parse_repo_id(bad).is_err(), "{bad}");
        }
        assert!(check_revision("refs/pr/1").is_ok());
        assert!(check_revision("").is_err());
        assert!(check_revision("../../x").is_err());
    }
}
