//! The deployment files cannot be built or run here (no Docker engine, no registry), so this checks what
//! can be checked without one: every compose file passes Debian's `docker-compose config -q` and has what
//! each target needs; every Dockerfile is multi-stage with a cached dependency layer, pins its base images,
//! runs as a non-root user, health-checks with the binary itself and pipes no download into a shell; the
//! images' and compose files' settings are accepted by the binary and its `healthcheck` passes with them.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::assets::repo_path;
use support::net::free_port;
use support::process::{bin, signal};

const DOCKERFILES: [&str; 3] = [
    "docker/Dockerfile",
    "docker/Dockerfile.cuda",
    "docker/Dockerfile.jetson",
];
const COMPOSE_FILES: [&str; 3] = [
    "compose/docker-compose.yml",
    "compose/docker-compose.nvidia.yml",
    "compose/docker-compose.jetson.yml",
];

fn read(rel: &str) -> String {
    let p = repo_path(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

// ---- Dockerfile parsing ----------------------------------------------------------------------------------

/// One Dockerfile instruction with its continuation lines joined.
#[derive(Debug, Clone)]
struct Instr {
    line: usize,
    keyword: String,
    args: String,
}

/// Parses instructions: comments and blank lines dropped (also inside continuations, as Docker does),
/// lines ending in `\` joined to the next.
fn parse_dockerfile(text: &str) -> Vec<Instr> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(b) => (b.trim_end(), true),
            None => (trimmed, false),
        };
        let (line, mut acc) = current.take().unwrap_or((i + 1, String::new()));
        if !acc.is_empty() {
            acc.push(' ');
        }
        acc.push_str(body);
        if continues {
            current = Some((line, acc));
        } else if !acc.trim().is_empty() {
            let acc = acc.trim().to_string();
            let (kw, args) = acc.split_once(char::is_whitespace).unwrap_or((&acc, ""));
            out.push(Instr {
                line,
                keyword: kw.to_ascii_uppercase(),
                args: args.trim().to_string(),
            });
        }
    }
    assert!(current.is_none(), "Dockerfile ends inside a continuation");
    out
}

/// Replaces `${NAME}` and `$NAME` with the global ARG defaults (ARGs before the first FROM).
fn substitute(s: &str, args: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in args {
        out = out.replace(&format!("${{{k}}}"), v);
        out = out.replace(&format!("${k}"), v);
    }
    out
}

/// A FROM line's image and stage name, with global ARGs substituted and `--platform` dropped.
fn from_image(args: &str, globals: &BTreeMap<String, String>) -> (String, Option<String>) {
    let words: Vec<&str> = args
        .split_whitespace()
        .filter(|w| !w.starts_with("--"))
        .collect();
    let image = substitute(words[0], globals);
    let name = match words.as_slice() {
        [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
        _ => None,
    };
    (image, name)
}

/// `KEY=VALUE` pairs of ENV instructions (the legacy `ENV KEY VALUE` form too).
fn env_pairs(instrs: &[Instr]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for i in instrs.iter().filter(|i| i.keyword == "ENV") {
        if i.args
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('='))
        {
            for w in i.args.split_whitespace() {
                let (k, v) = w.split_once('=').expect("ENV word without =");
                env.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        } else {
            let (k, v) = i.args.split_once(char::is_whitespace).unwrap();
            env.insert(k.to_string(), v.trim().to_string());
        }
    }
    env
}

/// A Dockerfile split into its global ARGs and its stages.
struct Dockerfile {
    text: String,
    globals: BTreeMap<String, String>,
    /// (image, stage name, instructions after FROM)
    stages: Vec<(String, Option<String>, Vec<Instr>)>,
}

fn load_dockerfile(rel: &str) -> Dockerfile {
    let text = read(rel);
    let mut globals = BTreeMap::new();
    let mut stages: Vec<(String, Option<String>, Vec<Instr>)> = Vec::new();
    for i in parse_dockerfile(&text) {
        match (i.keyword.as_str(), stages.last_mut()) {
            ("ARG", None) => {
                let (k, v) = i.args.split_once('=').unwrap_or((&i.args, ""));
                globals.insert(k.to_string(), v.trim_matches('"').to_string());
            }
            ("FROM", _) => {
                let (image, name) = from_image(&i.args, &globals);
                stages.push((image, name, Vec::new()));
            }
            (_, Some(stage)) => stage.2.push(i),
            (kw, None) => panic!("{rel}:{}: {kw} before the first FROM", i.line),
        }
    }
    Dockerfile {
        text,
        globals,
        stages,
    }
}

#[test]
fn dockerfile_parser_joins_continuations_and_skips_comments() {
    let instrs = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG A=1\nFROM x:${A} AS b\nRUN a \\\n  # note\n  && b\nENV K=v \\\n    L=w\n",
    );
    let kws: Vec<_> = instrs.iter().map(|i| i.keyword.as_str()).collect();
    assert_eq!(kws, ["ARG", "FROM", "RUN", "ENV"]);
    assert_eq!(instrs[2].args, "a && b");
    assert_eq!(instrs[2].line, 4);
    let env = env_pairs(&instrs);
    assert_eq!(env["K"], "v");
    assert_eq!(env["L"], "w");
    let globals = BTreeMap::from([("A".to_string(), "1".to_string())]);
    assert_eq!(
        from_image(&instrs[1].args, &globals),
        ("x:1".into(), Some("b".into()))
    );
}

#[test]
fn dockerfiles_pin_every_base_image_and_never_use_latest() {
    for rel in DOCKERFILES {
        let df = load_dockerfile(rel);
        assert!(!df.text.contains(":latest"), "{rel}: uses a `latest` tag");
        let stage_names: Vec<_> = df.stages.iter().filter_map(|s| s.1.clone()).collect();
        for (image, _, _) in &df.stages {
            assert!(
                !image.contains('$'),
                "{rel}: FROM {image} uses an ARG without a default"
            );
            if stage_names.contains(image) {
                continue;
            }
            let last = image.rsplit('/').next().unwrap();
            let tag = last.split_once(':').map(|(_, t)| t);
            assert!(
                image.contains("@sha256:") || tag.is_some_and(|t| !t.is_empty() && t != "latest"),
                "{rel}: base image {image} has no pinned tag"
            );
        }
        // Images copied from (COPY --from=IMAGE) count too.
        for (_, _, instrs) in &df.stages {
            for i in instrs.iter().filter(|i| i.keyword == "COPY") {
                if let Some(from) = i
                    .args
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("--from="))
                {
                    let from = substitute(from, &df.globals);
                    assert!(
                        stage_names.contains(&from),
                        "{rel}:{}: COPY --from={from} is not a named stage",
                        i.line
                    );
                }
            }
        }
    }
    let cpu = load_dockerfile("docker/Dockerfile");
    assert_eq!(cpu.stages[0].0, "rust:1.95-bookworm");
    assert_eq!(cpu.stages.last().unwrap().0, "debian:bookworm-slim");
}

#[test]
fn dockerfiles_pipe_no_download_into_a_shell() {
    let pipe_to_shell =
        fancy_regex::Regex::new(r"(?i)\b(curl|wget)\b[^;&]*\|\s*(sudo\s+)?(\S*/)?(ba|z|da|k)?sh\b")
            .unwrap();
    for bad in [
        "curl -sSf https://sh.rustup.rs | sh -s -- -y",
        "wget -qO- https://x | sudo bash",
        "curl https://x|/bin/sh",
    ] {
        assert!(pipe_to_shell.is_match(bad).unwrap(), "{bad}");
    }
    for rel in DOCKERFILES {
        let df = load_dockerfile(rel);
        for (_, _, instrs) in &df.stages {
            for i in instrs {
                assert!(
                    !pipe_to_shell.is_match(&i.args).unwrap(),
                    "{rel}:{}: pipes a download into a shell: {}",
                    i.line,
                    i.args
                );
                assert!(
                    !(i.keyword == "ADD" && i.args.contains("://")),
                    "{rel}:{}: ADD of a URL (unverified download)",
                    i.line
                );
            }
        }
    }
}

/// The index of the first instruction at or after `from` matching `pred`.
/// The capabilities of an `NVIDIA_DRIVER_CAPABILITIES` value, sorted (`"compute, utility"` and
/// `"utility,compute"` are the same).
fn driver_capabilities(v: &str) -> Vec<&str> {
    let mut caps: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    caps.sort_unstable();
    caps
}

/// Whether a `RUN` line installs `pkg` with `apt-get install` (the package as a word of an install
/// command, not of another command of the same line).
fn apt_installs(run: &str, pkg: &str) -> bool {
    run.split("&&").any(|cmd| {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        words.windows(2).any(|w| w == ["apt-get", "install"]) && words.contains(&pkg)
    })
}

#[test]
fn the_gpu_checks_read_the_lines_they_check() {
    assert_eq!(
        driver_capabilities("utility, graphics,compute"),
        ["compute", "graphics", "utility"]
    );
    assert_eq!(driver_capabilities(""), Vec::<&str>::new());
    let run = "apt-get update && apt-get install -y --no-install-recommends tini libvulkan1 \
               && rm -rf /var/lib/apt/lists/*";
    assert!(apt_installs(run, "libvulkan1"));
    assert!(!apt_installs(run, "libvulkan"));
    assert!(!apt_installs(
        "echo libvulkan1 && apt-get install -y tini",
        "libvulkan1"
    ));
}

fn find(instrs: &[Instr], from: usize, pred: impl Fn(&Instr) -> bool) -> Option<usize> {
    instrs[from..].iter().position(pred).map(|p| p + from)
}

fn is_release_build(i: &Instr) -> bool {
    i.keyword == "RUN" && i.args.contains("cargo build --release --locked")
}

#[test]
fn dockerfiles_build_release_with_the_dependency_layer_before_the_sources() {
    for rel in DOCKERFILES {
        let df = load_dockerfile(rel);
        assert!(df.stages.len() >= 2, "{rel}: not multi-stage");
        let builder = df
            .stages
            .iter()
            .find(|s| s.2.iter().any(is_release_build))
            .unwrap_or_else(|| panic!("{rel}: no stage runs `cargo build --release --locked`"));
        let instrs = &builder.2;
        let manifests = find(instrs, 0, |i| {
            i.keyword == "COPY" && i.args.contains("Cargo.toml") && i.args.contains("Cargo.lock")
        })
        .unwrap_or_else(|| panic!("{rel}: the manifests are never copied on their own"));
        let deps = find(instrs, manifests, is_release_build)
            .unwrap_or_else(|| panic!("{rel}: no dependency build after copying the manifests"));
        let sources = find(instrs, 0, |i| {
            i.keyword == "COPY"
                && !i.args.contains("--from")
                && i.args
                    .split_whitespace()
                    .rev()
                    .skip(1)
                    .any(|src| src == "." || src == "src" || src.starts_with("src/"))
        })
        .unwrap_or_else(|| panic!("{rel}: the sources are never copied"));
        assert!(
            manifests < deps && deps < sources,
            "{rel}: the dependency layer (line {}) must be built before the sources are copied (line {})",
            instrs[deps].line,
            instrs[sources].line
        );
        let full = find(instrs, sources, is_release_build)
            .unwrap_or_else(|| panic!("{rel}: no release build after copying the sources"));
        assert!(
            instrs[full].args.contains("touch src/main.rs"),
            "{rel}: the real build must touch the entry points over the placeholders"
        );
        let runtime = df.stages.last().unwrap();
        assert!(
            runtime.2.iter().any(|i| i.keyword == "COPY"
                && i.args
                    .contains(&format!("--from={}", builder.1.as_deref().unwrap_or("")))
                && i.args.contains("/usr/local/bin/cyber-inference")),
            "{rel}: the runtime stage does not take the binary from the builder"
        );
    }
}

/// Runs the dependency layer's commands up to its `cargo build` in a folder holding only the manifests,
/// as the image build does, and checks cargo accepts that package with the lock file as it is (`--locked`):
/// a new `[[bench]]`, `build.rs` or an out-of-date Cargo.lock would break the image build.
#[test]
fn dependency_layer_resolves_with_the_manifests_alone() {
    let df = load_dockerfile("docker/Dockerfile");
    let builder = &df.stages[0].2;
    let deps = builder.iter().find(|i| is_release_build(i)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(repo_path(f), dir.path().join(f)).unwrap();
    }
    let setup: Vec<&str> = deps
        .args
        .split("&&")
        .map(str::trim)
        .take_while(|c| !c.starts_with("cargo build"))
        .collect();
    assert!(
        !setup.is_empty(),
        "no placeholder commands in: {}",
        deps.args
    );
    let status = Command::new("sh")
        .arg("-ec")
        .arg(setup.join(" && "))
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "placeholder commands failed: {setup:?}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal,build",
            "--depth",
            "0",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo rejects the dependency layer's package: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cyber-inference v"));
}

#[test]
fn runtime_images_run_as_non_root_with_the_binary_as_health_check() {
    for rel in DOCKERFILES {
        let df = load_dockerfile(rel);
        let (_, _, runtime) = df.stages.last().unwrap();
        let user = runtime
            .iter()
            .rev()
            .find(|i| i.keyword == "USER")
            .unwrap_or_else(|| panic!("{rel}: the runtime stage sets no USER (runs as root)"));
        let name = user.args.split(':').next().unwrap();
        assert!(
            !["root", "0", ""].contains(&name),
            "{rel}:{}: USER {} is root",
            user.line,
            user.args
        );
        let checks: Vec<_> = runtime
            .iter()
            .filter(|i| i.keyword == "HEALTHCHECK")
            .collect();
        assert_eq!(checks.len(), 1, "{rel}: wants exactly one HEALTHCHECK");
        let hc = &checks[0].args;
        let cmd = hc
            .split_once("CMD")
            .unwrap_or_else(|| panic!("{rel}: HEALTHCHECK without CMD: {hc}"))
            .1;
        let words: Vec<String> = match serde_json::from_str::<Vec<String>>(cmd.trim()) {
            Ok(v) => v,
            Err(_) => cmd.split_whitespace().map(String::from).collect(),
        };
        assert_eq!(
            words[..2],
            ["cyber-inference", "healthcheck"],
            "{rel}: HEALTHCHECK must run `cyber-inference healthcheck`: {hc}"
        );
        for opt in ["--interval=", "--timeout=", "--retries="] {
            assert!(hc.contains(opt), "{rel}: HEALTHCHECK lacks {opt}");
        }
        // No curl or wget in the runtime image.
        for i in runtime.iter().filter(|i| i.keyword == "RUN") {
            assert!(
                !i.args
                    .split_whitespace()
                    .any(|w| w == "curl" || w == "wget"),
                "{rel}:{}: installs or runs curl/wget in the runtime image",
                i.line
            );
        }
        let has = |kw: &str, args: &str| {
            runtime
                .iter()
                .any(|i| i.keyword == kw && i.args.contains(args))
        };
        assert!(has("EXPOSE", "8337"), "{rel}: no EXPOSE 8337");
        assert!(has("STOPSIGNAL", "SIGTERM"), "{rel}: no STOPSIGNAL SIGTERM");
        assert!(
            has("VOLUME", "/data") && has("VOLUME", "/models"),
            "{rel}: volumes /data and /models"
        );
        let env = env_pairs(runtime);
        for (k, v) in [
            ("CYBER_INFERENCE_HOST", "0.0.0.0"),
            ("CYBER_INFERENCE_DATA_DIR", "/data"),
            ("CYBER_INFERENCE_MODELS_DIR", "/models"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{rel}: ENV {k}");
        }
        let entry = runtime
            .iter()
            .rev()
            .find(|i| i.keyword == "ENTRYPOINT")
            .unwrap_or_else(|| panic!("{rel}: no ENTRYPOINT"));
        let cmd = runtime.iter().rev().find(|i| i.keyword == "CMD").unwrap();
        let entry: Vec<String> = serde_json::from_str(&entry.args).unwrap();
        let cmd: Vec<String> = serde_json::from_str(&cmd.args).unwrap();
        assert!(
            entry.last().is_some_and(|e| e == "cyber-inference"),
            "{rel}: {entry:?}"
        );
        assert_eq!(cmd, ["serve"], "{rel}: CMD");
        if rel != "docker/Dockerfile" {
            // The GPU images: the container toolkit mounts NVIDIA's Vulkan driver (ICD) only for the
            // `graphics` capability, and the engine's Vulkan backend needs the loader beside it.
            let caps = env
                .get("NVIDIA_DRIVER_CAPABILITIES")
                .map(String::as_str)
                .unwrap_or("");
            assert_eq!(
                driver_capabilities(caps),
                ["compute", "graphics", "utility"],
                "{rel}: NVIDIA_DRIVER_CAPABILITIES={caps}"
            );
            assert!(env.contains_key("NVIDIA_VISIBLE_DEVICES"), "{rel}");
            for pkg in ["libvulkan1", "libglvnd0"] {
                assert!(
                    runtime
                        .iter()
                        .any(|i| i.keyword == "RUN" && apt_installs(&i.args, pkg)),
                    "{rel}: the runtime stage does not apt-get install {pkg} (the Vulkan loader \
                     and the GL dispatch library NVIDIA's Vulkan driver links against)"
                );
            }
            assert!(
                df.text.contains("Vulkan") && df.text.contains("GPU_LAYERS"),
                "{rel}: the header must say how the image runs models on the GPU"
            );
        }
    }
    let cuda = load_dockerfile("docker/Dockerfile.cuda");
    assert!(cuda.globals.contains_key("CUDA_VERSION"));
    assert!(
        cuda.stages.last().unwrap().0.starts_with("nvidia/cuda:"),
        "the CUDA image's runtime is an NVIDIA CUDA base"
    );
    let jetson = load_dockerfile("docker/Dockerfile.jetson");
    assert!(
        jetson
            .stages
            .last()
            .unwrap()
            .0
            .starts_with("nvcr.io/nvidia/l4t-")
    );
}

#[test]
fn dockerignore_keeps_outputs_state_and_secrets_out_of_the_context() {
    let lines: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    for must in [
        "target", ".git", "data", "models", ".env", "*.gguf", ".cargo",
    ] {
        assert!(
            lines.iter().any(|l| l == must),
            ".dockerignore lacks {must}"
        );
    }
    for keep in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "migrations",
        "templates",
        "static",
    ] {
        assert!(
            !lines.iter().any(|l| l == keep || l == &format!("{keep}/")),
            ".dockerignore drops {keep}, which the build needs"
        );
    }
}

// ---- compose ---------------------------------------------------------------------------------------------

/// Debian's `docker-compose` on PATH (`config` needs no Docker engine); panics where it is not installed,
/// so the compose files are never left unchecked by a passing test.
fn docker_compose() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("docker-compose"))
                .find(|p| p.is_file())
        })
        .expect(
            "docker-compose is not on PATH, so the compose files cannot be validated: install it \
             (apt-get install docker-compose; .ci/run does)",
        )
}

/// `docker-compose -f FILE [--env-file ENV] config ARGS` with a clean environment plus `vars`.
fn compose_config(
    bin: &Path,
    file: &str,
    env_file: Option<&Path>,
    vars: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("-f")
        .arg(repo_path(file));
    if let Some(e) = env_file {
        cmd.arg("--env-file").arg(e);
    }
    cmd.arg("config").args(args).envs(vars.iter().copied());
    cmd.output().expect("cannot run docker-compose")
}

#[test]
fn compose_files_pass_docker_compose_config_with_the_env_file() {
    let compose = docker_compose();
    let dir = tempfile::tempdir().unwrap();
    // The example, filled in as the README says.
    let example = read("compose/.env.example");
    assert!(example.contains("CYBER_INFERENCE_ADMIN_PASSWORD="));
    let filled = example.replace(
        "CYBER_INFERENCE_ADMIN_PASSWORD=",
        "CYBER_INFERENCE_ADMIN_PASSWORD=a-long-test-passphrase",
    );
    let env_file = dir.path().join(".env");
    std::fs::write(&env_file, filled).unwrap();
    let empty_env = dir.path().join("empty.env");
    std::fs::write(&empty_env, "").unwrap();
    let unfilled_env = dir.path().join("unfilled.env");
    std::fs::write(&unfilled_env, &example).unwrap();
    for file in COMPOSE_FILES {
        let out = compose_config(&compose, file, Some(&env_file), &[], &["-q"]);
        assert!(
            out.status.success(),
            "docker-compose config -q rejects {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The example as shipped (no password) and an empty .env must both refuse, naming the variable.
        for env in [&unfilled_env, &empty_env] {
            let out = compose_config(&compose, file, Some(env), &[], &["-q"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("CYBER_INFERENCE_ADMIN_PASSWORD"),
                "{file} accepted a missing admin password: {err}"
            );
        }
    }
}

/// A compose file as resolved by `docker-compose config`, as JSON.
fn resolved(bin: &Path, file: &str) -> serde_json::Value {
    let out = compose_config(
        bin,
        file,
        None,
        &[("CYBER_INFERENCE_ADMIN_PASSWORD", "a-long-test-passphrase")],
        &[],
    );
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml_ng::from_slice(&out.stdout).expect("docker-compose config printed invalid YAML")
}

#[test]
fn compose_files_have_what_each_target_needs() {
    let compose = docker_compose();
    for file in COMPOSE_FILES {
        let doc = resolved(&compose, file);
        let services = doc["services"].as_object().unwrap();
        assert_eq!(services.len(), 1, "{file}: one service");
        let svc = services.values().next().unwrap();
        assert_eq!(svc["restart"], "unless-stopped", "{file}");
        assert!(
            svc["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["target"] == 8337 && p["published"] == 8337),
            "{file}: port 8337: {}",
            svc["ports"]
        );
        let volumes: Vec<&str> = svc["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for (vol, target, name) in [
            ("cyber-data", "/data", "cyber-inference-data"),
            ("cyber-models", "/models", "cyber-inference-models"),
        ] {
            assert!(
                volumes
                    .iter()
                    .any(|v| v.starts_with(&format!("{vol}:{target}"))),
                "{file}: named volume {vol} at {target}: {volumes:?}"
            );
            assert_eq!(
                doc["volumes"][vol]["name"], name,
                "{file}: volume {vol} must be named {name} (shared by all targets)"
            );
        }
        assert!(svc["mem_limit"].is_string(), "{file}: no memory limit");
        let test: Vec<&str> = svc["healthcheck"]["test"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            test[..3],
            ["CMD", "cyber-inference", "healthcheck"],
            "{file}"
        );
        assert_eq!(svc["logging"]["driver"], "json-file", "{file}");
        assert!(
            svc["logging"]["options"]["max-size"].is_string(),
            "{file}: log rotation"
        );
        assert!(
            svc["logging"]["options"]["max-file"].is_string(),
            "{file}: log rotation"
        );
        let env = svc["environment"].as_object().unwrap();
        assert_eq!(
            env["CYBER_INFERENCE_ADMIN_PASSWORD"],
            "a-long-test-passphrase"
        );
        for k in [
            "CYBER_INFERENCE_MAX_MEMORY_PERCENT",
            "CYBER_INFERENCE_MAX_LOADED_MODELS",
            "CYBER_INFERENCE_DEFAULT_CONTEXT_SIZE",
        ] {
            assert!(env.contains_key(k), "{file}: {k} not set");
        }
        let dockerfile = svc["build"]["dockerfile"].as_str().unwrap();
        assert!(
            DOCKERFILES.contains(&dockerfile),
            "{file}: builds {dockerfile}"
        );
        assert!(
            Path::new(svc["build"]["context"].as_str().unwrap())
                .join(dockerfile)
                .is_file(),
            "{file}: build context does not hold {dockerfile}"
        );
    }
    let nvidia = resolved(&compose, "compose/docker-compose.nvidia.yml");
    let dev =
        &nvidia["services"]["cyber-inference"]["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(dev["driver"], "nvidia");
    let dev_caps: Vec<&str> = dev["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    // `gpu` selects the NVIDIA driver; `graphics` makes the toolkit mount its Vulkan ICD (Docker turns the
    // request's driver capabilities into NVIDIA_DRIVER_CAPABILITIES, so compute and utility stay listed).
    for cap in ["gpu", "compute", "utility", "graphics"] {
        assert!(
            dev_caps.contains(&cap),
            "nvidia: the GPU reservation lacks the {cap} capability: {dev_caps:?}"
        );
    }
    let jetson = resolved(&compose, "compose/docker-compose.jetson.yml");
    let js = &jetson["services"]["cyber-inference"];
    assert_eq!(js["runtime"], "nvidia");
    assert_eq!(js["environment"]["CYBER_INFERENCE_MAX_LOADED_MODELS"], "1");
    for (file, doc) in [("nvidia", &nvidia), ("jetson", &jetson)] {
        let env = &doc["services"]["cyber-inference"]["environment"];
        assert_eq!(
            env["CYBER_INFERENCE_GPU_LAYERS"], "-1",
            "{file}: every layer on the GPU by default"
        );
        let caps = env["NVIDIA_DRIVER_CAPABILITIES"].as_str().unwrap_or("");
        assert_eq!(
            driver_capabilities(caps),
            ["compute", "graphics", "utility"],
            "{file}: NVIDIA_DRIVER_CAPABILITIES={caps} (graphics mounts the Vulkan driver)"
        );
    }
}

/// The settings each image and compose file give the binary are valid, and the compose file's own health
/// check command passes against a live `/health` with them (HOST 0.0.0.0 → asks 127.0.0.1).
#[test]
fn compose_environment_is_accepted_by_the_binary_and_its_health_check_passes() {
    let compose = docker_compose();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let answered = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut n = 0;
        for stream in server.incoming() {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 1024];
            let got = s.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..got]).to_string();
            if req.starts_with("QUIT") {
                break;
            }
            assert!(req.starts_with("GET /health HTTP/1.1\r\n"), "{req}");
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"status\":\"ok\"}")
                .unwrap();
            n += 1;
        }
        n
    });
    let data = tempfile::tempdir().unwrap();
    for file in COMPOSE_FILES {
        let doc = resolved(&compose, file);
        let svc = &doc["services"]["cyber-inference"];
        let dockerfile = load_dockerfile(svc["build"]["dockerfile"].as_str().unwrap());
        let image_env = env_pairs(&dockerfile.stages.last().unwrap().2);
        let test: Vec<&str> = svc["healthcheck"]["test"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let mut cmd = bin();
        cmd.env_clear()
            .args(&test[2..])
            .envs(&image_env)
            .envs(
                svc["environment"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())),
            )
            // Paths and the port of this test instead of the image's.
            .env("CYBER_INFERENCE_DATA_DIR", data.path())
            .env("CYBER_INFERENCE_MODELS_DIR", data.path())
            .env("CYBER_INFERENCE_PORT", port.to_string());
        assert_eq!(image_env["CYBER_INFERENCE_HOST"], "0.0.0.0");
        let out = cmd.output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("healthy"),
            "{file}: `{}` failed with the image's and compose file's environment: {}",
            test[1..].join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    use std::io::Write;
    std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap()
        .write_all(b"QUIT")
        .unwrap();
    assert_eq!(answered.join().unwrap(), COMPOSE_FILES.len());
}

/// The runtime image's command (ENTRYPOINT + CMD without the init wrapper) run outside Docker with the
/// image's environment, temp DATA_DIR/MODELS_DIR and a free port: without an admin password it refuses to
/// start and says why; with one it serves, the image's HEALTHCHECK command exits 0 while `/health` is up,
/// and 1 once SIGTERM has stopped it.
#[test]
fn image_command_refuses_without_password_and_health_check_follows_the_server() {
    let df = load_dockerfile("docker/Dockerfile");
    let runtime = &df.stages.last().unwrap().2;
    let last = |kw: &str| -> Vec<String> {
        let i = runtime.iter().rev().find(|i| i.keyword == kw).unwrap();
        serde_json::from_str(&i.args).unwrap()
    };
    let mut command: Vec<String> = last("ENTRYPOINT");
    command.extend(last("CMD"));
    let bin_at = command
        .iter()
        .position(|w| w == "cyber-inference")
        .expect("the image's command does not run cyber-inference");
    assert_eq!(command[bin_at + 1..], ["serve"]);
    let healthcheck: Vec<String> = {
        let hc = &runtime
            .iter()
            .find(|i| i.keyword == "HEALTHCHECK")
            .unwrap()
            .args;
        serde_json::from_str(hc.split_once("CMD").unwrap().1.trim()).unwrap()
    };
    let image_env = env_pairs(runtime);
    assert_eq!(image_env["CYBER_INFERENCE_HOST"], "0.0.0.0");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = (dir.path().join("data"), dir.path().join("models"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&models).unwrap();
    let run = |argv: &[String], password: Option<&str>| {
        let mut cmd = bin();
        cmd.env_clear()
            .args(&argv[1..])
            .envs(&image_env)
            .env("CYBER_INFERENCE_DATA_DIR", &data)
            .env("CYBER_INFERENCE_MODELS_DIR", &models)
            .env("CYBER_INFERENCE_PORT", port.to_string());
        if let Some(p) = password {
            cmd.env("CYBER_INFERENCE_ADMIN_PASSWORD", p);
        }
        cmd
    };
    let serve = &command[bin_at..];

    let out = run(serve, None).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ADMIN_PASSWORD"),
        "started on 0.0.0.0 without an admin password, or did not say why: {err}"
    );

    let mut server = run(serve, Some("a-long-test-passphrase"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let check = || run(&healthcheck, None).output().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut up = check();
    while !up.status.success() && std::time::Instant::now() < deadline {
        assert!(
            server.try_wait().unwrap().is_none(),
            "serve exited before /health came up"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
        up = check();
    }
    assert!(
        up.status.success(),
        "healthcheck never passed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(signal(server.id(), "TERM"), "kill -TERM failed");
    let status = server.wait().unwrap();
    assert!(
        status.success(),
        "serve did not exit cleanly on SIGTERM: {status}"
    );
    let down = check();
    assert_eq!(
        down.status.code(),
        Some(1),
        "healthcheck passed with the server stopped"
    );
}
