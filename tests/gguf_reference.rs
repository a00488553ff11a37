//! The GGUF reader against gguf-py's dumps of the shared models (`../shared/vectors/*.inspect.json`), every
//! vocabulary file of llama.cpp's suites, and the `inspect` command's JSON.

mod support;

use cyber_inference::engine::gguf::{GgufFile, Value};
use serde_json::Value as Json;
use support::assets::{MODELS, SMOL_Q4_K_M, assets, model, repo_path, shared_vector_json};
use support::process::{bin, stdout_of};

/// Compares one of our metadata values with a JSON value of gguf-py (floats are f32 written exactly).
fn same(ours: &Value, theirs: &Json) -> bool {
    match ours {
        Value::F32(f) => theirs
            .as_f64()
            .is_some_and(|t| (t as f32).to_bits() == f.to_bits()),
        Value::F64(f) => theirs.as_f64().is_some_and(|t| t.to_bits() == f.to_bits()),
        Value::Bool(b) => theirs.as_bool() == Some(*b),
        Value::String(s) => theirs.as_str() == Some(s.as_str()),
        Value::Array(_) => false,
        v => v.as_int().is_some_and(|i| {
            theirs.as_i64().map(|t| t as i128) == Some(i)
                || theirs.as_u64().map(|t| t as i128) == Some(i)
        }),
    }
}

#[test]
fn shared_models_match_gguf_py_dumps() {
    for name in MODELS {
        let f = GgufFile::open(model(name)).unwrap();
        let r = shared_vector_json(&format!("{name}.inspect.json"));
        assert_eq!(f.file_size(), r["size"].as_u64().unwrap(), "{name} size");
        assert_eq!(
            f.version as u64,
            r["version"].as_u64().unwrap(),
            "{name} version"
        );
        assert_eq!(
            f.alignment,
            r["alignment"].as_u64().unwrap(),
            "{name} alignment"
        );
        assert_eq!(
            f.data_offset,
            r["data_offset"].as_u64().unwrap(),
            "{name} data_offset"
        );
        assert_eq!(
            f.tensors().len() as u64,
            r["tensor_count"].as_u64().unwrap(),
            "{name} tensor_count"
        );
        assert_eq!(
            f.metadata().len() as u64,
            r["kv_count"].as_u64().unwrap(),
            "{name} kv_count"
        );

        let meta = r["metadata"].as_array().unwrap();
        assert_eq!(meta.len(), f.metadata().len(), "{name}: metadata count");
        for ((key, value), m) in f.metadata().iter().zip(meta) {
            assert_eq!(key, m["key"].as_str().unwrap(), "{name}: key order");
            assert_eq!(
                value.value_type().name(),
                m["type"].as_str().unwrap(),
                "{name}: type of {key}"
            );
            match value {
                Value::Array(a) => {
                    assert_eq!(
                        a.elem_type().name(),
                        m["array_type"].as_str().unwrap(),
                        "{name}: {key} item type"
                    );
                    assert_eq!(
                        a.len() as u64,
                        m["array_len"].as_u64().unwrap(),
                        "{name}: {key} length"
                    );
                    let head = m["array_head"].as_array().unwrap();
                    assert!(!head.is_empty() || a.is_empty());
                    for (i, want) in head.iter().enumerate() {
                        let got = a.get(i).unwrap();
                        assert!(
                            same(&got, want),
                            "{name}: {key}[{i}] = {got:?}, gguf-py {want}"
                        );
                    }
                }
                v => assert!(
                    same(v, &m["value"]),
                    "{name}: {key} = {v:?}, gguf-py {}",
                    m["value"]
                ),
            }
        }

        let tensors = r["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), f.tensors().len());
        for (t, want) in f.tensors().iter().zip(tensors) {
            assert_eq!(t.name, want["name"].as_str().unwrap());
            assert_eq!(t.ty.name(), want["type"].as_str().unwrap(), "{}", t.name);
            assert_eq!(
                t.ty.id() as u64,
                want["type_id"].as_u64().unwrap(),
                "{}",
                t.name
            );
            let shape: Vec<u64> = want["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(t.dims, shape, "{}", t.name);
            assert_eq!(t.offset, want["offset"].as_u64().unwrap(), "{}", t.name);
            assert_eq!(t.n_bytes, want["n_bytes"].as_u64().unwrap(), "{}", t.name);
            assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
        }
    }
}

#[test]
fn every_vocab_file_parses() {
    // Every vocabulary GGUF the asset manifest lists (llama.cpp's tokenizer suites, no weights).
    let manifest = std::fs::read_to_string(repo_path("../shared/assets/MANIFEST.tsv")).unwrap();
    let listed: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|p| p.starts_with("vocab/") && p.ends_with(".gguf"))
        .collect();
    assert!(
        listed.len() >= 19,
        "manifest lists {} vocabulary files",
        listed.len()
    );
    for rel in listed {
        let p = assets().join(rel);
        let f = GgufFile::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let tokens = f
            .get_str_array("tokenizer.ggml.tokens")
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!tokens.is_empty(), "{}", p.display());
        assert!(f.get_str("tokenizer.ggml.model").is_ok(), "{}", p.display());
    }
}

#[test]
fn inspect_json_shows_the_same_numbers() {
    for name in MODELS {
        let out = stdout_of(
            bin()
                .args(["inspect", "--json", "--tensors"])
                .arg(model(name)),
        );
        let got: Json = serde_json::from_str(&out).unwrap();
        let r = shared_vector_json(&format!("{name}.inspect.json"));
        for k in [
            "size",
            "version",
            "alignment",
            "data_offset",
            "tensor_count",
            "kv_count",
        ] {
            assert_eq!(got[k], r[k], "{name}: {k}");
        }
        assert_eq!(got["tensors"], r["tensors"], "{name}: tensors");
        assert_eq!(
            got["runnable"], true,
            "{name}: {}",
            got["unsupported_reason"]
        );
        let keys = |v: &Json| {
            v["metadata"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["key"].clone(),
                        m["type"].clone(),
                        m.get("array_len").cloned(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&got), keys(&r), "{name}: metadata");
        let n_params: u64 = r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product::<u64>()
            })
            .sum();
        assert_eq!(
            got["parameters"].as_u64(),
            Some(n_params),
            "{name}: parameters"
        );
    }
    let text = bin()
        .arg("inspect")
        .arg(model(SMOL_Q4_K_M))
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    for want in [
        "architecture:    llama",
        "context length:  8192",
        "49152 tokens, tokenizer gpt2",
        "Q6_K",
        "chat template:   yes",
        "runnable:        yes",
    ] {
        assert!(
            text.contains(want),
            "inspect output lacks {want:?}:\n{text}"
        );
    }
}

#[test]
fn inspect_rejects_a_bad_file_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(
        &p,
        b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff\0\0\0\0\0\0\0\0",
    )
    .unwrap();
    let out = bin().arg("inspect").arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tensor count") && err.contains("offset 8"),
        "{err}"
    );
}
