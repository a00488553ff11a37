//! The per-model settings, defined once: [`MODEL_SETTINGS`] is the table (name, column, type and range,
//! when a change applies, label, help) that the admin API (validation, JSON), the UI form and the database
//! code iterate, and [`with_request_defaults`] is where its per-request defaults (Ollama's Modelfile
//! parameters) are applied to the requests every API sends to a worker.

use axum::body::Bytes;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::config::Settings;

/// When a change of a setting takes effect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Applies {
    /// At the model's next load (it is part of the worker's command line).
    NextLoad,
    /// At once, in the supervisor (idle timer, pinning, enabled).
    Now,
    /// On every request for the model that does not set the field itself: the proxy fills it in.
    PerRequest(RequestField),
}

impl Applies {
    /// `next_load`, `now` or `per_request`, as the admin API reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Applies::NextLoad => "next_load",
            Applies::Now => "now",
            Applies::PerRequest(_) => "per_request",
        }
    }
}

/// Where a per-request default goes in a worker-bound request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RequestField {
    /// A top-level field of `/v1/chat/completions` and `/v1/completions` (OpenAI's / llama-server's
    /// name); the request sets it when any of `field` and `aliases` is present and not `null`. `ollama`
    /// is the Modelfile `PARAMETER` name `/api/show` reports.
    Sampling {
        field: &'static str,
        aliases: &'static [&'static str],
        ollama: &'static str,
    },
    /// A system message put first in a chat (`/v1/chat/completions`, `/apply-template`) that has no
    /// `system` (or `developer`) message; Ollama's Modelfile `SYSTEM`.
    SystemMessage,
}

/// The upper end of a whole-number setting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Max {
    Fixed(i64),
    /// The global MAX_CONTEXT_SIZE.
    MaxContextSize,
}

/// A setting's type and range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A whole number in `min..=max`; `NULL` = the global default.
    Int { min: i64, max: Max },
    /// A number in `min..=max`; `NULL` = the request's (else the worker's) value.
    Float { min: f64, max: f64 },
    /// A flag (a `NOT NULL` column); a reset sets `default`.
    Bool { default: bool },
    /// Text of at most `max_bytes` bytes; empty = `NULL`.
    Text { max_bytes: usize },
    /// One of `options` (stored as text); `NULL` = the worker's default.
    Choice { options: &'static [&'static str] },
}

/// One per-model setting: a column of `models`, a field of `PATCH /admin/api/models/{name}` and of the
/// model page's form.
#[derive(Debug)]
pub struct ModelSetting {
    /// The JSON field and form field name.
    pub name: &'static str,
    /// The column of `models`.
    pub column: &'static str,
    pub kind: Kind,
    pub applies: Applies,
    /// The form's label.
    pub label: &'static str,
    /// One line under the form field.
    pub help: &'static str,
    /// What an unset value means (the form's placeholder), from the live global settings.
    pub unset: fn(&Settings) -> String,
}

fn unset_ctx(s: &Settings) -> String {
    format!("default {}", s.default_context_size)
}
fn unset_threads(s: &Settings) -> String {
    let auto = if s.threads.is_none() { " (auto)" } else { "" };
    format!("default {}{auto}", s.worker_threads())
}
fn unset_parallel(_: &Settings) -> String {
    format!("default {}", super::process::manager::DEFAULT_PARALLEL)
}
fn unset_gpu_layers(s: &Settings) -> String {
    format!("default {}", s.gpu_layers)
}
fn unset_idle(s: &Settings) -> String {
    format!("default {}", s.model_idle_timeout)
}
fn unset_request(_: &Settings) -> String {
    "the request's value".to_owned()
}
fn unset_none(_: &Settings) -> String {
    String::new()
}
fn unset_f16(_: &Settings) -> String {
    "default f16".to_owned()
}

/// The KV cache types a worker takes (`-ctk`/`-ctv`, [`KvType::parse`](crate::engine::model::KvType)).
pub(crate) const KV_CACHE_TYPES: &[&str] = &[
    "f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1",
];

/// Longest system prompt stored (bytes).
pub(crate) const MAX_SYSTEM_PROMPT_BYTES: usize = 64 * 1024;

/// Every per-model setting, in form order.
pub const MODEL_SETTINGS: &[ModelSetting] = &[
    ModelSetting {
        name: "ctx_size",
        column: "ctx_size",
        kind: Kind::Int {
            min: 1,
            max: Max::MaxContextSize,
        },
        applies: Applies::NextLoad,
        label: "Context size (tokens)",
        help: "tokens of context of each worker (llama-server --ctx-size)",
        unset: unset_ctx,
    },
    ModelSetting {
        name: "threads",
        column: "threads",
        kind: Kind::Int {
            min: 1,
            max: Max::Fixed(1024),
        },
        applies: Applies::NextLoad,
        label: "Threads",
        help: "CPU threads of the worker",
        unset: unset_threads,
    },
    ModelSetting {
        name: "parallel",
        column: "parallel",
        kind: Kind::Int {
            min: 1,
            max: Max::Fixed(256),
        },
        applies: Applies::NextLoad,
        label: "Parallel slots",
        help: "requests the worker runs at once",
        unset: unset_parallel,
    },
    ModelSetting {
        name: "gpu_layers",
        column: "gpu_layers",
        kind: Kind::Int {
            min: -1,
            max: Max::Fixed(100_000),
        },
        applies: Applies::NextLoad,
        label: "GPU layers",
        help: "layers offloaded to the GPU; -1 = all, 0 = none",
        unset: unset_gpu_layers,
    },
    ModelSetting {
        name: "cache_type_k",
        column: "cache_type_k",
        kind: Kind::Choice {
            options: KV_CACHE_TYPES,
        },
        applies: Applies::NextLoad,
        label: "KV cache keys",
        help: "element type of the KV cache's keys (llama-server -ctk); q8_0 halves the cache's memory, q4_0 quarters it, at a small cost in quality",
        unset: unset_f16,
    },
    ModelSetting {
        name: "cache_type_v",
        column: "cache_type_v",
        kind: Kind::Choice {
            options: KV_CACHE_TYPES,
        },
        applies: Applies::NextLoad,
        label: "KV cache values",
        help: "element type of the KV cache's values (llama-server -ctv)",
        unset: unset_f16,
    },
    ModelSetting {
        name: "idle_timeout",
        column: "idle_timeout",
        kind: Kind::Int {
            min: 0,
            max: Max::Fixed(365 * 86400),
        },
        applies: Applies::Now,
        label: "Idle timeout (s)",
        help: "seconds without requests before the model is unloaded; 0 = never",
        unset: unset_idle,
    },
    ModelSetting {
        name: "pinned",
        column: "pinned",
        kind: Kind::Bool { default: false },
        applies: Applies::Now,
        label: "Pinned",
        help: "loaded at start-up and never unloaded for idleness or to make room",
        unset: unset_none,
    },
    ModelSetting {
        name: "enabled",
        column: "enabled",
        kind: Kind::Bool { default: true },
        applies: Applies::Now,
        label: "Enabled",
        help: "a disabled model is refused (403) and not listed in /v1/models",
        unset: unset_none,
    },
    ModelSetting {
        name: "temperature",
        column: "temperature",
        kind: Kind::Float { min: 0.0, max: 5.0 },
        applies: Applies::PerRequest(RequestField::Sampling {
            field: "temperature",
            aliases: &[],
            ollama: "temperature",
        }),
        label: "Temperature",
        help: "0 = greedy",
        unset: unset_request,
    },
    ModelSetting {
        name: "top_p",
        column: "top_p",
        kind: Kind::Float { min: 0.0, max: 1.0 },
        applies: Applies::PerRequest(RequestField::Sampling {
            field: "top_p",
            aliases: &[],
            ollama: "top_p",
        }),
        label: "Top-p",
        help: "nucleus sampling mass",
        unset: unset_request,
    },
    ModelSetting {
        name: "top_k",
        column: "top_k",
        kind: Kind::Int {
            min: 0,
            max: Max::Fixed(1_000_000),
        },
        applies: Applies::PerRequest(RequestField::Sampling {
            field: "top_k",
            aliases: &[],
            ollama: "top_k",
        }),
        label: "Top-k",
        help: "0 = off",
        unset: unset_request,
    },
    ModelSetting {
        name: "max_tokens",
        column: "max_tokens",
        kind: Kind::Int {
            min: 1,
            max: Max::Fixed(10_000_000),
        },
        applies: Applies::PerRequest(RequestField::Sampling {
            field: "max_tokens",
            aliases: &["max_completion_tokens"],
            ollama: "num_predict",
        }),
        label: "Max tokens",
        help: "cap on generated tokens (Ollama's num_predict)",
        unset: unset_request,
    },
    ModelSetting {
        name: "system_prompt",
        column: "system_prompt",
        kind: Kind::Text {
            max_bytes: MAX_SYSTEM_PROMPT_BYTES,
        },
        applies: Applies::PerRequest(RequestField::SystemMessage),
        label: "System prompt",
        help: "the first message of chats that have no system message (Ollama's SYSTEM)",
        unset: unset_none,
    },
];

/// The setting named `name`.
pub(crate) fn model_setting(name: &str) -> Option<&'static ModelSetting> {
    MODEL_SETTINGS.iter().find(|s| s.name == name)
}

/// A valid value of a setting.
#[derive(Clone, Debug, PartialEq)]
pub enum SettingValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl ModelSetting {
    /// The range as the messages say it (`between 1 and 32768`, `at most 65536 bytes`).
    pub fn range(&self, s: &Settings) -> String {
        match self.kind {
            Kind::Int { min, max } => format!("between {min} and {}", self.int_max(max, s)),
            Kind::Float { min, max } => format!("between {min} and {max}"),
            Kind::Bool { .. } => "true or false".to_owned(),
            Kind::Text { max_bytes } => format!("at most {max_bytes} bytes"),
            Kind::Choice { options } => format!("one of {}", options.join(", ")),
        }
    }

    fn int_max(&self, max: Max, s: &Settings) -> i64 {
        match max {
            Max::Fixed(m) => m,
            Max::MaxContextSize => i64::from(s.max_context_size),
        }
    }

    /// Checks `v` — JSON of the setting's type, or a string as a form sends it — against the type and
    /// range (with the live global settings `s`). `null` and an empty string reset (`Ok(None)`).
    ///
    /// Errors: a message without the setting's name, saying what was wrong and the range.
    pub fn parse(&self, v: &Value, s: &Settings) -> Result<Option<SettingValue>, String> {
        let text = match v {
            Value::Null => return Ok(None),
            Value::String(t) if t.trim().is_empty() => return Ok(None),
            Value::String(t) => t.trim().to_owned(),
            other => other.to_string(),
        };
        let range = self.range(s);
        match self.kind {
            Kind::Int { min, max } => {
                let x = match v {
                    Value::Number(n) => n.as_i64(),
                    _ => text.parse::<i64>().ok(),
                }
                .ok_or_else(|| format!("“{text}” is not a whole number; must be {range}"))?;
                if x < min || x > self.int_max(max, s) {
                    return Err(format!("must be {range}, not {x}"));
                }
                Ok(Some(SettingValue::Int(x)))
            }
            Kind::Float { min, max } => {
                let x = text
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| format!("“{text}” is not a number; must be {range}"))?;
                if x < min || x > max {
                    return Err(format!("must be {range}, not {x}"));
                }
                Ok(Some(SettingValue::Float(x)))
            }
            Kind::Bool { .. } => match text.as_str() {
                "true" | "on" | "1" => Ok(Some(SettingValue::Bool(true))),
                "false" | "off" | "0" => Ok(Some(SettingValue::Bool(false))),
                _ => Err(format!("must be {range}, not “{text}”")),
            },
            Kind::Text { max_bytes } => {
                let Value::String(t) = v else {
                    return Err(format!("must be a string ({range})"));
                };
                if t.len() > max_bytes {
                    return Err(format!("must be {range}, not {} bytes", t.len()));
                }
                Ok(Some(SettingValue::Text(t.clone())))
            }
            Kind::Choice { options } => {
                let t = text.to_ascii_lowercase();
                match options.iter().find(|o| **o == t) {
                    Some(o) => Ok(Some(SettingValue::Text((*o).to_owned()))),
                    None => Err(format!("must be {range}, not “{text}”")),
                }
            }
        }
    }

    /// The value stored for a reset (`None`): `NULL`, or a flag's default.
    pub fn reset_value(&self) -> Option<SettingValue> {
        match self.kind {
            Kind::Bool { default } => Some(SettingValue::Bool(default)),
            _ => None,
        }
    }
}

/// A validated change of a model's settings: for each setting named, its new value (`None` = reset:
/// `NULL`, the global default; a flag goes back to its default). Settings not named stay as they are.
#[derive(Clone, Debug, Default)]
pub struct ModelSettingsPatch {
    pub changes: Vec<(&'static ModelSetting, Option<SettingValue>)>,
}

impl ModelSettingsPatch {
    /// Validates every field of `fields` (names of [`MODEL_SETTINGS`]; values as [`ModelSetting::parse`]
    /// takes them) against the live settings `s`.
    ///
    /// Errors: each bad field's name mapped to its message (`unknown setting` for a name not in the
    /// table).
    pub fn parse(fields: &Map<String, Value>, s: &Settings) -> Result<Self, Map<String, Value>> {
        let mut errors = Map::new();
        let mut changes = Vec::new();
        for (k, v) in fields {
            let Some(setting) = model_setting(k) else {
                errors.insert(k.clone(), json!("unknown setting"));
                continue;
            };
            match setting.parse(v, s) {
                Ok(x) => changes.push((setting, x.or_else(|| setting.reset_value()))),
                Err(e) => {
                    errors.insert(k.clone(), json!(e));
                }
            }
        }
        if errors.is_empty() {
            Ok(ModelSettingsPatch { changes })
        } else {
            Err(errors)
        }
    }

    /// A patch of one already valid value.
    pub fn one(name: &str, v: SettingValue) -> Self {
        ModelSettingsPatch {
            changes: model_setting(name)
                .map(|s| (s, Some(v)))
                .into_iter()
                .collect(),
        }
    }

    /// What the admin API says after saving: which of the changed settings apply at the next load.
    pub fn note(&self) -> String {
        let later: Vec<&str> = self
            .changes
            .iter()
            .filter(|(s, _)| s.applies == Applies::NextLoad)
            .map(|(s, _)| s.name)
            .collect();
        if later.is_empty() {
            "saved; applies now".to_owned()
        } else {
            format!(
                "saved; {} apply at the next load, the rest now",
                later.join(", ")
            )
        }
    }
}

/// Every setting of a model with its value as JSON (`null` = unset), in table order: what
/// [`Db::model_settings`](super::db::Db::model_settings) reads.
pub(crate) type SettingValues = Vec<(&'static ModelSetting, Value)>;

/// One setting of a model as the admin API shows it.
#[derive(Serialize)]
pub(crate) struct SettingInfo {
    pub name: &'static str,
    pub value: Value,
    /// `int`, `float`, `bool`, `text` or `choice`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub min: Option<Value>,
    pub max: Option<Value>,
    /// The values a `choice` takes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<&'static [&'static str]>,
    /// `next_load`, `now` or `per_request`.
    pub applies: &'static str,
    pub label: &'static str,
    pub help: &'static str,
    /// What an unset value means.
    pub default: String,
}

/// Every per-model setting with its value (of `values`), type, range, when it applies, label and help.
pub(crate) fn describe(values: &SettingValues, s: &Settings) -> Vec<SettingInfo> {
    values
        .iter()
        .map(|&(d, ref value)| {
            let (kind, min, max) = match d.kind {
                Kind::Int { min, max } => ("int", Some(json!(min)), Some(json!(d.int_max(max, s)))),
                Kind::Float { min, max } => ("float", Some(json!(min)), Some(json!(max))),
                Kind::Bool { .. } => ("bool", None, None),
                Kind::Text { max_bytes } => ("text", None, Some(json!(max_bytes))),
                Kind::Choice { .. } => ("choice", None, None),
            };
            SettingInfo {
                name: d.name,
                value: value.clone(),
                kind,
                min,
                max,
                options: match d.kind {
                    Kind::Choice { options } => Some(options),
                    _ => None,
                },
                applies: d.applies.as_str(),
                label: d.label,
                help: d.help,
                default: (d.unset)(s),
            }
        })
        .collect()
}

/// The per-request defaults a model has set (of its `values`), with their values.
pub(crate) fn request_defaults(values: &SettingValues) -> Vec<(RequestField, Value)> {
    values
        .iter()
        .filter_map(|(d, v)| match d.applies {
            Applies::PerRequest(f) if !v.is_null() => Some((f, v.clone())),
            _ => None,
        })
        .collect()
}

/// Applies `defaults` to a worker-bound request `body` for `path`: each sampling default goes into a
/// `/v1/chat/completions` or `/v1/completions` request that does not set the field (absent or `null`;
/// a field the client sets always wins), the system prompt goes first into a chat
/// (`/v1/chat/completions`, `/apply-template`) without a `system` or `developer` message. Returns
/// whether `body` changed.
pub(crate) fn apply_defaults(
    defaults: &[(RequestField, Value)],
    path: &str,
    body: &mut Value,
) -> bool {
    let chat = matches!(path, "/v1/chat/completions" | "/chat/completions");
    let completion = matches!(path, "/v1/completions" | "/completions");
    let template = path == "/apply-template";
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    let mut changed = false;
    for (f, v) in defaults {
        match *f {
            RequestField::Sampling { field, aliases, .. } if chat || completion => {
                let set = std::iter::once(field)
                    .chain(aliases.iter().copied())
                    .any(|k| obj.get(k).is_some_and(|x| !x.is_null()));
                if !set {
                    obj.insert(field.to_owned(), v.clone());
                    changed = true;
                }
            }
            RequestField::SystemMessage if chat || template => {
                let Some(Value::Array(msgs)) = obj.get_mut("messages") else {
                    continue;
                };
                let has_system = msgs
                    .iter()
                    .any(|m| matches!(m["role"].as_str(), Some("system" | "developer")));
                if !has_system {
                    msgs.insert(0, json!({"role": "system", "content": v}));
                    changed = true;
                }
            }
            _ => {}
        }
    }
    changed
}

/// The body to send to a worker at `path`, given its model's per-request `defaults`
/// ([`request_defaults`]): `body` untouched when there are none (or none applies), else parsed, given
/// the defaults ([`apply_defaults`]) and serialized again. The one place every API's worker-bound
/// requests (the OpenAI proxy, Ollama, Anthropic, Responses) get their model's defaults.
pub(crate) fn with_request_defaults(
    defaults: &[(RequestField, Value)],
    path: &str,
    body: Bytes,
) -> Bytes {
    if defaults.is_empty() {
        return body;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    if !apply_defaults(defaults, path, &mut v) {
        return body;
    }
    serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body)
}

/// The Modelfile view of a model's per-request `defaults` for Ollama's `/api/show`: the `PARAMETER`
/// (name, value) pairs and the `SYSTEM` text.
pub(crate) fn ollama_parameters(
    defaults: &[(RequestField, Value)],
) -> (Vec<(&'static str, String)>, Option<String>) {
    let mut params = Vec::new();
    let mut system = None;
    for (f, v) in defaults {
        match f {
            RequestField::Sampling { ollama, .. } => params.push((*ollama, v.to_string())),
            RequestField::SystemMessage => system = v.as_str().map(str::to_owned),
        }
    }
    (params, system)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model's values with `set` and the rest unset.
    fn values(set: &[(&str, Value)]) -> SettingValues {
        MODEL_SETTINGS
            .iter()
            .map(|d| {
                let v = set.iter().find(|(n, _)| *n == d.name);
                (d, v.map_or(Value::Null, |(_, v)| v.clone()))
            })
            .collect()
    }

    #[test]
    fn values_are_checked_against_type_and_range() {
        let s = Settings::default();
        let p = |name: &str, v: Value| model_setting(name).unwrap().parse(&v, &s);
        assert_eq!(
            p("ctx_size", json!(2048)),
            Ok(Some(SettingValue::Int(2048)))
        );
        assert_eq!(
            p("ctx_size", json!("2048")),
            Ok(Some(SettingValue::Int(2048)))
        );
        assert_eq!(p("ctx_size", json!("")), Ok(None));
        assert_eq!(p("ctx_size", Value::Null), Ok(None));
        let e = p("ctx_size", json!(99_999)).unwrap_err();
        assert!(
            e.contains("between 1 and 32768") && e.contains("99999"),
            "{e}"
        );
        assert!(p("threads", json!("two")).unwrap_err().contains("two"));
        assert!(p("threads", json!(1.5)).is_err());
        let e = p("temperature", json!(9)).unwrap_err();
        assert!(e.contains("between 0 and 5") && e.contains('9'), "{e}");
        assert!(p("top_p", json!("NaN")).is_err());
        assert_eq!(p("top_p", json!(0.5)), Ok(Some(SettingValue::Float(0.5))));
        assert_eq!(p("pinned", json!(true)), Ok(Some(SettingValue::Bool(true))));
        assert!(p("pinned", json!("maybe")).is_err());
        assert!(p("system_prompt", json!(3)).is_err());
        let long = "x".repeat(MAX_SYSTEM_PROMPT_BYTES + 1);
        assert!(
            p("system_prompt", json!(long))
                .unwrap_err()
                .contains("at most")
        );
    }

    #[test]
    fn a_patch_reports_every_bad_field_and_resets_flags_to_their_default() {
        let s = Settings::default();
        let m: Map<String, Value> = serde_json::from_value(json!({
            "ctx_size": "999999", "threads": "two", "temperature": "0.7", "bogus": 1
        }))
        .unwrap();
        let e = ModelSettingsPatch::parse(&m, &s).unwrap_err();
        assert!(e["ctx_size"].as_str().unwrap().contains("32768"));
        assert!(e["threads"].as_str().unwrap().contains("two"));
        assert_eq!(e["bogus"], "unknown setting");
        assert!(!e.contains_key("temperature"));
        let m: Map<String, Value> =
            serde_json::from_value(json!({"enabled": null, "idle_timeout": ""})).unwrap();
        let p = ModelSettingsPatch::parse(&m, &s).unwrap();
        let by_name: Vec<(&str, Option<SettingValue>)> =
            p.changes.iter().map(|(d, v)| (d.name, v.clone())).collect();
        assert_eq!(
            by_name,
            vec![
                ("enabled", Some(SettingValue::Bool(true))),
                ("idle_timeout", None)
            ]
        );
        assert!(p.note().contains("now"));
    }

    #[test]
    fn defaults_fill_only_what_the_request_leaves_out() {
        assert!(request_defaults(&values(&[("ctx_size", json!(512))])).is_empty());
        let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        assert_eq!(
            with_request_defaults(&[], "/v1/chat/completions", body.clone()),
            body,
            "no defaults: the bytes are untouched"
        );
        let d = request_defaults(&values(&[
            ("temperature", json!(0.25)),
            ("max_tokens", json!(3)),
            ("system_prompt", json!("Be brief.")),
        ]));
        let mut chat = json!({"model": "m", "temperature": null,
            "messages": [{"role": "user", "content": "hi"}]});
        assert!(apply_defaults(&d, "/v1/chat/completions", &mut chat));
        assert_eq!(chat["temperature"], 0.25);
        assert_eq!(chat["max_tokens"], 3);
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(chat["messages"][1]["role"], "user");
        let mut own = json!({"temperature": 1.0, "max_completion_tokens": 9,
            "messages": [{"role": "developer", "content": "mine"}, {"role": "user", "content": "hi"}]});
        let before = own.clone();
        assert!(!apply_defaults(&d, "/v1/chat/completions", &mut own));
        assert_eq!(own, before, "fields the client set win");
        let mut text = json!({"prompt": "x"});
        assert!(apply_defaults(&d, "/v1/completions", &mut text));
        assert_eq!(
            text,
            json!({"prompt": "x", "temperature": 0.25, "max_tokens": 3})
        );
        let mut tpl = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(apply_defaults(&d, "/apply-template", &mut tpl));
        assert_eq!(tpl["messages"][0]["content"], "Be brief.");
        assert!(tpl.get("temperature").is_none());
        let mut emb = json!({"input": "x"});
        assert!(!apply_defaults(&d, "/v1/embeddings", &mut emb));
        let changed = with_request_defaults(&d, "/v1/completions", Bytes::from_static(b"{}"));
        assert_eq!(&changed[..], br#"{"temperature":0.25,"max_tokens":3}"#);
        let (params, system) = ollama_parameters(&d);
        assert_eq!(
            params,
            vec![("temperature", "0.25".into()), ("num_predict", "3".into())]
        );
        assert_eq!(system.as_deref(), Some("Be brief."));
    }
}
