//! Split GGUFs (`…-00001-of-0000N.gguf`): the `gguf-split` command writes the shared SmolLM2 file as
//! parts, the reader joins them back into the same model (every key and tensor byte), the engine
//! generates the same greedy text from the parts as from the original, and broken splits (a later
//! part opened, a part missing, parts swapped, a part from another split) are clear errors.

mod support;

use std::path::{Path, PathBuf};

use cyber_inference::engine::gguf::{GgufError, GgufFile, keys};
use support::assets::{SMOL_Q4_K_M as MODEL, model};
use support::process::{bin, stdout_of};

/// `cyber-inference gguf-split ARGS… INPUT PREFIX`; returns the parts it printed.
fn split(input: &Path, prefix: &Path, args: &[&str]) -> Vec<PathBuf> {
    stdout_of(bin().arg("gguf-split").args(args).arg(input).arg(prefix))
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// 24 greedy tokens after a fixed prompt.
fn greedy(model: &Path) -> String {
    let prompt = "The capital of France is";
    stdout_of(
        bin()
            .args(["run", "-n", "24", "--temp", "0", "-p", prompt, "-m"])
            .arg(model),
    )
}

#[test]
fn split_parts_read_back_as_the_same_model() {
    let src = model(MODEL);
    let dir = tempfile::tempdir().unwrap();
    let parts = split(&src, &dir.path().join("smol"), &["--split-max-size", "40M"]);
    let names: Vec<String> = parts
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "smol-00001-of-00003.gguf",
            "smol-00002-of-00003.gguf",
            "smol-00003-of-00003.gguf"
        ]
    );
    for p in &parts {
        let size = std::fs::metadata(p).unwrap().len();
        assert!(size < 45 << 20, "{} is {size} bytes", p.display());
    }

    let orig = GgufFile::open(&src).unwrap();
    let joined = GgufFile::open(&parts[0]).unwrap();
    assert_eq!(
        joined.paths(),
        parts.iter().map(PathBuf::as_path).collect::<Vec<_>>()
    );
    assert_eq!(
        joined.file_size(),
        parts
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum::<u64>()
    );
    // Every key of the original, plus the three split keys.
    for (k, v) in orig.metadata() {
        assert_eq!(joined.get(k), Some(v), "{k}");
    }
    assert_eq!(joined.metadata().len(), orig.metadata().len() + 3);
    assert_eq!(joined.get_u32(keys::SPLIT_COUNT).unwrap(), 3);
    assert_eq!(
        joined.get_u32(keys::SPLIT_TENSORS_COUNT).unwrap() as usize,
        orig.tensors().len()
    );
    // Every tensor, in order, with the same bytes; the later ones live in the other parts.
    assert_eq!(joined.tensors().len(), orig.tensors().len());
    for (a, b) in orig.tensors().iter().zip(joined.tensors()) {
        assert_eq!((&a.name, &a.dims, a.ty), (&b.name, &b.dims, b.ty));
        assert!(orig.tensor_data(a) == joined.tensor_data(b), "{}", a.name);
    }
    let used: std::collections::BTreeSet<usize> = joined.tensors().iter().map(|t| t.part).collect();
    assert_eq!(used.into_iter().collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(joined.parameter_count(), orig.parameter_count());

    // The engine loads the parts as one model and generates what it generates from the original.
    let a = greedy(&src);
    assert!(a.len() > "The capital of France is".len(), "{a:?}");
    assert_eq!(greedy(&parts[0]), a);
}

#[test]
fn broken_splits_are_clear_errors() {
    let src = model(MODEL);
    let dir = tempfile::tempdir().unwrap();
    let parts = split(&src, &dir.path().join("m"), &["--split-max-tensors", "100"]);
    assert_eq!(parts.len(), 3);
    let msg = |r: Result<GgufFile, GgufError>| match r {
        Ok(_) => panic!("opened a broken split"),
        Err(e) => e.to_string(),
    };

    // A later part on its own names the first.
    let m = msg(GgufFile::open(&parts[1]));
    assert!(
        m.contains("part 2 of 3") && m.contains("m-00001-of-00003.gguf"),
        "{m}"
    );
    // The engine's loader and the CLI say the same.
    let out = bin().args(["inspect"]).arg(&parts[2]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("part 3 of 3"));

    // A missing part is named.
    let moved = dir.path().join("elsewhere.gguf");
    std::fs::rename(&parts[2], &moved).unwrap();
    let m = msg(GgufFile::open(&parts[0]));
    assert!(
        m.contains("m-00003-of-00003.gguf") && m.contains("part 3 of 3"),
        "{m}"
    );
    // Part 2 where part 3 belongs: the part numbers disagree.
    std::fs::copy(&parts[1], &parts[2]).unwrap();
    let m = msg(GgufFile::open(&parts[0]));
    assert!(m.contains("expected part 3 of 3"), "{m}");
    std::fs::rename(&moved, &parts[2]).unwrap();
    assert!(GgufFile::open(&parts[0]).is_ok());

    // The first part renamed: the others cannot be found.
    let renamed = dir.path().join("renamed.gguf");
    std::fs::copy(&parts[0], &renamed).unwrap();
    let m = msg(GgufFile::open(&renamed));
    assert!(m.contains("-00001-of-00003.gguf"), "{m}");

    // A part of another split of the same model (other tensor boundaries): a tensor twice or the
    // tensor count wrong, never a silently different model.
    let other = split(&src, &dir.path().join("o"), &["--split-max-tensors", "50"]);
    std::fs::copy(&other[1], &parts[1]).unwrap();
    let m = msg(GgufFile::open(&parts[0]));
    assert!(
        m.contains("also in an earlier part")
            || m.contains("split.count")
            || m.contains("split.tensors.count"),
        "{m}"
    );

    // Splitting a split is refused, and a zero limit too.
    let out = bin()
        .args(["gguf-split"])
        .arg(&other[0])
        .arg(dir.path().join("again"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already split"));
    let out = bin()
        .args(["gguf-split", "--split-max-tensors", "0"])
        .arg(&src)
        .arg(dir.path().join("zero"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("zero")),
        "a failed split leaves no part"
    );
}
