//! Settings: documented defaults < a TOML file < `CYBER_INFERENCE_*` environment variables, validated once.
//!
//! Names follow the original Cyber-Inference. A bad value is a start-up error that names the variable (or
//! file key) and the value. [`Settings::sources`] tells where each value came from, for the admin UI.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of every environment variable that sets a setting.
pub const ENV_PREFIX: &str = "CYBER_INFERENCE_";

/// Every setting of the supervisor. Field names are the lower-case variable names without the prefix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address the supervisor listens on. Default 127.0.0.1 (loopback only); a non-loopback address
    /// requires ADMIN_PASSWORD.
    pub host: String,
    /// Port of the supervisor's HTTP server. Default 8337.
    pub port: u16,
    /// Folder of the database, the JWT secret and logs. Default `./data`.
    pub data_dir: PathBuf,
    /// Folder scanned for `*.gguf` models and where downloads go. Default `./models`.
    pub models_dir: PathBuf,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive). Default `info`.
    /// `RUST_LOG` overrides it.
    pub log_level: String,
    /// Context size (tokens) a worker gets when the model has no setting of its own. Default 8192.
    pub default_context_size: u32,
    /// Largest context size (tokens) any worker may get. Default 32768.
    pub max_context_size: u32,
    /// Seconds without requests after which a model is unloaded (0 = never). Default 300.
    pub model_idle_timeout: u64,
    /// Most models loaded at once. Default 1.
    pub max_loaded_models: u32,
    /// Share of system memory (percent, 1–100) that loaded models may bring the machine to. Default 80.
    pub max_memory_percent: u8,
    /// First port handed to workers; each loaded model takes the next free one. Default 8338.
    pub worker_base_port: u16,
    /// Threads per worker; unset = the number of physical cores.
    #[serde(default, deserialize_with = "opt_usize")]
    pub threads: Option<usize>,
    /// Layers offloaded to the GPU (-1 = all, 0 = none). Default -1.
    pub gpu_layers: i32,
    /// Password of the `admin` user, applied at init. Unset = generated and printed once.
    #[serde(default, deserialize_with = "opt_string")]
    pub admin_password: Option<String>,
    /// Secret for signing JWTs (HS256), at least [`MIN_JWT_SECRET_BYTES`] bytes. Unset = a random
    /// 256-bit secret kept in DATA_DIR/jwt_secret.
    #[serde(default, deserialize_with = "opt_string")]
    pub jwt_secret: Option<String>,
    /// Lifetime of a login (hours). Default 24.
    pub jwt_expiry_hours: u32,
    /// Hugging Face token sent as `Authorization: Bearer` for downloads.
    #[serde(default, deserialize_with = "opt_string")]
    pub hf_token: Option<String>,
    /// Base URL of the Hugging Face hub API. Default `https://huggingface.co`.
    pub hf_endpoint: String,
    /// Host names (comma-separated) that requests may name in their `Host` header, against DNS
    /// rebinding; IP addresses and `localhost` are always accepted. Unset = any.
    #[serde(default, deserialize_with = "opt_string")]
    pub allowed_hosts: Option<String>,
    /// Seconds an unload waits for in-flight requests to end before it cuts them (each stream gets an
    /// error event, the reason is logged) and stops the worker; also the longest a request waits for a
    /// draining model before it is answered 503 with `Retry-After`. Default 60.
    pub drain_timeout: u64,
    /// Seconds the proxy waits for a client to take the next chunk of a response (it stopped reading:
    /// the kernel's buffers are full) before it drops the request: logged as 499 with the reason, the
    /// worker connection closed and its slot freed. Default 60.
    pub idle_write_timeout: u64,
    /// Days the request log (`requests`) and ended worker sessions (`model_sessions`) are kept; older
    /// rows are pruned at start-up and hourly (0 = keep forever). Default 30.
    pub retention_days: u32,
    /// Origins browsers may call the API from (CORS), comma-separated: `*`, `localhost` (any
    /// localhost origin) or exact origins. Unset = none.
    #[serde(default, deserialize_with = "opt_string")]
    pub cors_origins: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: "127.0.0.1".into(),
            port: 8337,
            data_dir: PathBuf::from("./data"),
            models_dir: PathBuf::from("./models"),
            log_level: "info".into(),
            default_context_size: 8192,
            max_context_size: 32768,
            model_idle_timeout: 300,
            max_loaded_models: 1,
            max_memory_percent: 80,
            worker_base_port: 8338,
            threads: None,
            gpu_layers: -1,
            admin_password: None,
            jwt_secret: None,
            jwt_expiry_hours: 24,
            hf_token: None,
            hf_endpoint: "https://huggingface.co".into(),
            allowed_hosts: None,
            drain_timeout: 60,
            idle_write_timeout: 60,
            retention_days: 30,
            cors_origins: None,
        }
    }
}

/// Where a setting's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Default,
    File,
    Env,
    Db,
}

/// A setting that could not be read or is out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting {name}={value:?}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
    #[error("cannot read settings: {0}")]
    Read(String),
}

/// A setting [`Settings::check`] refused: its (lower-case) name, the value as shown, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidSetting {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// Strings may arrive from the environment as numbers or booleans (figment parses `123` as an integer).
fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(Option::<Scalar>::deserialize(d)?.and_then(|s| {
        let s = match s {
            Scalar::S(s) => s,
            Scalar::I(i) => i.to_string(),
            Scalar::U(u) => u.to_string(),
            Scalar::F(f) => f.to_string(),
            Scalar::B(b) => b.to_string(),
        };
        (!s.is_empty()).then_some(s)
    }))
}

/// `THREADS` accepts a positive number, or `auto` / empty for the default.
fn opt_usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        U(usize),
        S(String),
    }
    match Option::<N>::deserialize(d)? {
        None => Ok(None),
        Some(N::U(0)) => Err(serde::de::Error::custom("must be at least 1 (or `auto`)")),
        Some(N::U(n)) => Ok(Some(n)),
        Some(N::S(s)) if s.is_empty() || s.eq_ignore_ascii_case("auto") => Ok(None),
        Some(N::S(s)) => Err(serde::de::Error::custom(format!(
            "`{s}` is not a number of threads or `auto`"
        ))),
    }
}

/// The names of all settings (lower case, as TOML keys), in declaration order.
pub const SETTING_NAMES: [&str; 23] = [
    "host",
    "port",
    "data_dir",
    "models_dir",
    "log_level",
    "default_context_size",
    "max_context_size",
    "model_idle_timeout",
    "max_loaded_models",
    "max_memory_percent",
    "worker_base_port",
    "threads",
    "gpu_layers",
    "admin_password",
    "jwt_secret",
    "jwt_expiry_hours",
    "hf_token",
    "hf_endpoint",
    "allowed_hosts",
    "drain_timeout",
    "idle_write_timeout",
    "retention_days",
    "cors_origins",
];

/// Shortest JWT_SECRET accepted (bytes): HS256 with a shorter key can be brute-forced offline from one
/// token.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Settings that hold secrets: never shown or logged.
pub const SECRET_SETTINGS: [&str; 3] = ["admin_password", "jwt_secret", "hf_token"];

/// Settings loaded with the figment that produced them, so sources can be reported.
pub struct Loaded {
    pub settings: Settings,
    figment: Figment,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
}

impl Loaded {
    /// Where each setting came from (default, file or env).
    pub fn sources(&self) -> Vec<(&'static str, Source)> {
        SETTING_NAMES
            .iter()
            .map(|&name| (name, source_of(&self.figment, name)))
            .collect()
    }
}

fn source_of(figment: &Figment, name: &str) -> Source {
    match figment.find_metadata(name) {
        Some(m) if m.name.contains("environment") => Source::Env,
        Some(m) if m.name.contains("TOML") => Source::File,
        _ => Source::Default,
    }
}

/// The variable or file key that set `name`, for error messages.
fn origin(figment: &Figment, name: &str) -> String {
    match source_of(figment, name) {
        Source::Env => format!("{ENV_PREFIX}{}", name.to_ascii_uppercase()),
        Source::File => format!("{name} (config file)"),
        _ => name.to_ascii_uppercase(),
    }
}

impl Settings {
    /// Reads defaults < `config_file` (or `$CYBER_INFERENCE_DATA_DIR/config.toml`, else
    /// `./data/config.toml`, when it exists) < environment, then validates.
    ///
    /// Errors: [`ConfigError::Invalid`] naming the variable and value; [`ConfigError::Read`] for an
    /// unreadable explicit config file.
    pub fn load(config_file: Option<&Path>) -> Result<Loaded, ConfigError> {
        Self::load_from(config_file, Env::prefixed(ENV_PREFIX))
    }

    fn load_from(config_file: Option<&Path>, env: Env) -> Result<Loaded, ConfigError> {
        let file = match config_file {
            Some(p) => {
                if !p.is_file() {
                    return Err(ConfigError::Read(format!(
                        "config file {} does not exist",
                        p.display()
                    )));
                }
                Some(p.to_path_buf())
            }
            None => {
                let data_dir = std::env::var_os(format!("{ENV_PREFIX}DATA_DIR"))
                    .map(PathBuf::from)
                    .unwrap_or_else(|| Settings::default().data_dir);
                let p = data_dir.join("config.toml");
                p.is_file().then_some(p)
            }
        };
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(f) = &file {
            figment = figment.merge(Toml::file_exact(f));
        }
        // Ignore other programs' variables that share the prefix only partly (e.g. _ASSETS in tests).
        let env = env.filter(|k| SETTING_NAMES.contains(&k.as_str().to_ascii_lowercase().as_str()));
        figment = figment.merge(env);
        let settings: Settings = figment.extract().map_err(|e| figment_error(&figment, e))?;
        settings.validate(&figment)?;
        Ok(Loaded {
            settings,
            figment,
            config_file: file,
        })
    }

    fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        self.check().map_err(|e| ConfigError::Invalid {
            name: origin(figment, e.name),
            value: e.value,
            reason: e.reason,
        })
    }

    /// Checks every range and format rule of the settings: the one check of a start-up (defaults <
    /// file < environment) and of every run-time change (the admin API's overrides, the database's at
    /// start-up), so a value refused at one is refused at the other.
    ///
    /// Errors: the first bad setting, its value (a secret's only as its length) and why.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        let bad = |name: &'static str, value: String, reason: &str| InvalidSetting {
            name,
            value,
            reason: reason.into(),
        };
        if self.port == 0 {
            return Err(bad(
                "port",
                self.port.to_string(),
                "must be between 1 and 65535",
            ));
        }
        if self.worker_base_port == 0 {
            return Err(bad(
                "worker_base_port",
                "0".into(),
                "must be between 1 and 65535",
            ));
        }
        if !(1..=100).contains(&self.max_memory_percent) {
            return Err(bad(
                "max_memory_percent",
                self.max_memory_percent.to_string(),
                "must be between 1 and 100",
            ));
        }
        if self.max_loaded_models == 0 {
            return Err(bad("max_loaded_models", "0".into(), "must be at least 1"));
        }
        if self.default_context_size == 0 || self.max_context_size == 0 {
            let (n, v) = if self.default_context_size == 0 {
                ("default_context_size", 0)
            } else {
                ("max_context_size", 0)
            };
            return Err(bad(n, v.to_string(), "must be at least 1"));
        }
        if self.default_context_size > self.max_context_size {
            return Err(bad(
                "default_context_size",
                self.default_context_size.to_string(),
                &format!(
                    "must not exceed MAX_CONTEXT_SIZE ({})",
                    self.max_context_size
                ),
            ));
        }
        if let Some(o) = &self.cors_origins
            && let Err(e) = crate::http_server::cors_layer(o)
        {
            return Err(bad("cors_origins", o.clone(), &e));
        }
        if self.gpu_layers < -1 {
            return Err(bad(
                "gpu_layers",
                self.gpu_layers.to_string(),
                "must be -1 (all), 0 or a layer count",
            ));
        }
        if let Some(k) = &self.jwt_secret
            && k.len() < MIN_JWT_SECRET_BYTES
        {
            return Err(bad(
                "jwt_secret",
                format!("(hidden, {} bytes)", k.len()),
                &format!(
                    "must be at least {MIN_JWT_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`), or unset for a generated one"
                ),
            ));
        }
        if self.drain_timeout == 0 {
            return Err(bad("drain_timeout", "0".into(), "must be at least 1"));
        }
        if self.idle_write_timeout == 0 {
            return Err(bad("idle_write_timeout", "0".into(), "must be at least 1"));
        }
        if self.jwt_expiry_hours == 0 {
            return Err(bad("jwt_expiry_hours", "0".into(), "must be at least 1"));
        }
        if self.host.parse::<std::net::IpAddr>().is_err() && self.host != "localhost" {
            return Err(bad(
                "host",
                self.host.clone(),
                "must be an IP address or `localhost`",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(bad(
                "log_level",
                self.log_level.clone(),
                "must be error, warn, info, debug, trace or a tracing filter",
            ));
        }
        if !(self.hf_endpoint.starts_with("http://") || self.hf_endpoint.starts_with("https://")) {
            return Err(bad(
                "hf_endpoint",
                self.hf_endpoint.clone(),
                "must be an http:// or https:// URL",
            ));
        }
        for h in self.allowed_host_list() {
            if h.is_empty()
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(bad(
                    "allowed_hosts",
                    self.allowed_hosts.clone().unwrap_or_default(),
                    "must be host names separated by commas (no scheme, port or path)",
                ));
            }
        }
        Ok(())
    }

    /// ALLOWED_HOSTS as lower-case names (empty = any host).
    pub fn allowed_host_list(&self) -> Vec<String> {
        self.allowed_hosts
            .as_deref()
            .map(|l| {
                l.split(',')
                    .map(|h| h.trim().to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether HOST is a loopback address (only then may the supervisor run without an admin password).
    pub fn host_is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The threads a worker gets: THREADS, else the number of available cores.
    pub fn worker_threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

fn figment_error(figment: &Figment, e: figment::Error) -> ConfigError {
    let name = e.path.last().cloned().unwrap_or_default();
    let value = match &e.kind {
        figment::error::Kind::InvalidType(actual, _)
        | figment::error::Kind::InvalidValue(actual, _) => actual.to_string(),
        _ => String::new(),
    };
    // Prefer the raw text of the variable, when it came from the environment.
    let var = format!("{ENV_PREFIX}{}", name.to_ascii_uppercase());
    let value = match std::env::var(&var) {
        Ok(v) if source_of(figment, &name) == Source::Env => v,
        _ => value,
    };
    if name.is_empty() {
        return ConfigError::Read(e.to_string());
    }
    ConfigError::Invalid {
        name: origin(figment, &name),
        value,
        reason: e.kind.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    fn check(vars: &[(&str, &str)]) -> Result<Settings, String> {
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Some(
                Settings::load(None)
                    .map(|l| l.settings)
                    .map_err(|e| e.to_string()),
            );
            Ok(())
        });
        out.unwrap()
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let s = check(&[]).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.port, 8337);
        assert_eq!(s.host, "127.0.0.1");
    }

    #[test]
    fn env_overrides_and_strings_may_look_like_numbers() {
        let s = check(&[
            ("CYBER_INFERENCE_PORT", "9000"),
            ("CYBER_INFERENCE_ADMIN_PASSWORD", "12345"),
            ("CYBER_INFERENCE_THREADS", "3"),
        ])
        .unwrap();
        assert_eq!(s.port, 9000);
        assert_eq!(s.admin_password.as_deref(), Some("12345"));
        assert_eq!(s.threads, Some(3));
    }

    #[test]
    fn invalid_values_name_the_variable_and_value() {
        let e = check(&[("CYBER_INFERENCE_PORT", "70000")]).unwrap_err();
        assert!(
            e.contains("CYBER_INFERENCE_PORT") && e.contains("70000"),
            "{e}"
        );
        let e = check(&[("CYBER_INFERENCE_MAX_MEMORY_PERCENT", "150")]).unwrap_err();
        assert!(
            e.contains("CYBER_INFERENCE_MAX_MEMORY_PERCENT") && e.contains("150"),
            "{e}"
        );
        let e = check(&[("CYBER_INFERENCE_MODEL_IDLE_TIMEOUT", "soon")]).unwrap_err();
        assert!(
            e.contains("CYBER_INFERENCE_MODEL_IDLE_TIMEOUT") && e.contains("soon"),
            "{e}"
        );
        let e = check(&[("CYBER_INFERENCE_THREADS", "many")]).unwrap_err();
        assert!(
            e.contains("CYBER_INFERENCE_THREADS") && e.contains("many"),
            "{e}"
        );
    }

    #[test]
    fn a_short_jwt_secret_is_refused_without_showing_it() {
        let e = check(&[("CYBER_INFERENCE_JWT_SECRET", "short-secret")]).unwrap_err();
        assert!(
            e.contains("CYBER_INFERENCE_JWT_SECRET") && e.contains("at least 32 bytes"),
            "{e}"
        );
        assert!(!e.contains("short-secret"), "the secret is not echoed: {e}");
        let ok = "0123456789abcdef0123456789abcdef";
        let s = check(&[("CYBER_INFERENCE_JWT_SECRET", ok)]).unwrap();
        assert_eq!(s.jwt_secret.as_deref(), Some(ok));
    }

    #[test]
    fn file_sits_between_defaults_and_env() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", "port = 9100\nmax_loaded_models = 3\n")?;
            jail.set_env("CYBER_INFERENCE_PORT", "9200");
            let l = Settings::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(l.settings.port, 9200);
            assert_eq!(l.settings.max_loaded_models, 3);
            let src: std::collections::HashMap<_, _> = l.sources().into_iter().collect();
            assert_eq!(src["port"], Source::Env);
            assert_eq!(src["max_loaded_models"], Source::File);
            assert_eq!(src["host"], Source::Default);
            jail.create_file("bad.toml", "max_memory_percent = 150\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("max_memory_percent") && e.contains("150"), "{e}");
            Ok(())
        });
    }
}
