//! Whether this machine can run the GPU tests: a Vulkan loader and a driver (ICD) for the adapter they
//! ask for. A GPU test that finds none FAILS, naming what is missing, unless the environment says no GPU
//! tests are wanted (`CYBER_INFERENCE_NO_GPU_TESTS=1`): then it prints a note and returns. CI installs
//! Mesa's software Vulkan driver (lavapipe, adapter "llvmpipe"), so the tests run there on the CPU.

use std::path::{Path, PathBuf};

/// The variable that turns the GPU tests off (`1`).
pub const NO_GPU_TESTS_ENV: &str = "CYBER_INFERENCE_NO_GPU_TESTS";

/// The adapter the GPU tests run on: `CYBER_INFERENCE_DEVICE` when set (a real GPU's name or index, as
/// the worker's `--device` takes it), else `llvmpipe` (Mesa's lavapipe, present wherever
/// `mesa-vulkan-drivers` is installed).
pub fn test_device() -> String {
    std::env::var("CYBER_INFERENCE_DEVICE")
        .ok()
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| "llvmpipe".to_string())
}

/// Folders the Vulkan loader reads driver manifests from (`VK_DRIVER_FILES` / `VK_ICD_FILENAMES`
/// replace them; `XDG_DATA_DIRS`' `vulkan/icd.d` are searched besides `/etc` and `/usr/share`).
fn icd_manifests() -> Vec<PathBuf> {
    let explicit = std::env::var("VK_DRIVER_FILES")
        .or_else(|_| std::env::var("VK_ICD_FILENAMES"))
        .ok()
        .filter(|v| !v.is_empty());
    if let Some(list) = explicit {
        return list.split(':').map(PathBuf::from).collect();
    }
    let mut dirs: Vec<PathBuf> = vec![
        "/etc/vulkan/icd.d".into(),
        "/usr/local/share/vulkan/icd.d".into(),
        "/usr/share/vulkan/icd.d".into(),
    ];
    if let Ok(x) = std::env::var("XDG_DATA_DIRS") {
        dirs.extend(x.split(':').map(|d| Path::new(d).join("vulkan/icd.d")));
    }
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect()
}

/// Whether the Vulkan loader (`libvulkan.so.1`) is in one of the usual library folders or
/// `LD_LIBRARY_PATH`.
fn loader_present() -> bool {
    let mut dirs: Vec<PathBuf> = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    if let Ok(l) = std::env::var("LD_LIBRARY_PATH") {
        dirs.extend(l.split(':').map(PathBuf::from));
    }
    dirs.iter().any(|d| d.join("libvulkan.so.1").exists())
}

/// Why the GPU tests cannot run on `device` here (`None`: they can): no Vulkan loader, or no driver
/// manifest — for `llvmpipe`, none of Mesa's lavapipe (`libvulkan_lvp`).
pub fn missing_vulkan(device: &str) -> Option<String> {
    if !loader_present() {
        return Some(
            "no Vulkan loader (libvulkan.so.1): install libvulkan1 (.ci/run does)".to_string(),
        );
    }
    let manifests = icd_manifests();
    let software = device.eq_ignore_ascii_case("llvmpipe");
    let found = manifests.iter().any(|m| {
        let text = std::fs::read_to_string(m).unwrap_or_default();
        text.contains("\"ICD\"") && (!software || text.contains("lvp"))
    });
    if found {
        return None;
    }
    Some(if software {
        format!(
            "no lavapipe Vulkan driver (an ICD manifest naming libvulkan_lvp among {} manifest(s)): \
             install mesa-vulkan-drivers (.ci/run does)",
            manifests.len()
        )
    } else {
        format!("no Vulkan driver manifest (ICD) for adapter {device:?}")
    })
}

/// For a GPU test: `true` when it can run on [`test_device`]; `false`, after printing a note, when it
/// cannot and `CYBER_INFERENCE_NO_GPU_TESTS=1` asks to skip; panics with what is missing otherwise.
pub fn gpu_tests_can_run(test: &str) -> bool {
    let device = test_device();
    let Some(why) = missing_vulkan(&device) else {
        return true;
    };
    if std::env::var(NO_GPU_TESTS_ENV).is_ok_and(|v| v == "1") {
        eprintln!("{test}: skipped ({NO_GPU_TESTS_ENV}=1): {why}");
        return false;
    }
    panic!(
        "{test} needs a Vulkan adapter ({device}): {why}; set {NO_GPU_TESTS_ENV}=1 to skip the GPU tests"
    );
}

/// The Vulkan loader's variables of this process's environment (`VK_*`, `XDG_DATA_DIRS`,
/// `LP_NUM_THREADS`), for a harnessed `serve`, whose environment is otherwise cleared.
pub fn vulkan_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("VK_") || k == "XDG_DATA_DIRS" || k == "LP_NUM_THREADS")
        .collect()
}
