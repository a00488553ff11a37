//! Chat templates (Jinja via minijinja) from GGUF metadata, rendered as llama.cpp renders them.
//!
//! A [`ChatTemplate`] turns an OpenAI-style message list into the prompt string the model was trained
//! on. It reproduces llama-server's `--jinja` path (`common/chat.cpp`, llama.cpp commit 0c1e570):
//! messages are first brought into llama.cpp's canonical shape, adapted to what the template
//! supports ([`Caps`]: a system message is folded into the first user turn where the template
//! ignores the system role, content is given as a string or as typed parts as the template wants),
//! then rendered with `bos_token`, `eos_token`, `add_generation_prompt`, `enable_thinking`, `tools`
//! and llama.cpp's extra context (`datetime`, `date_string`). Files without a template fall back to
//! ChatML as llama-server does; llama.cpp's hand-written templates (`src/llama-chat.cpp`) are
//! available by name and by detection in [`builtin`].

pub mod builtin;
mod caps;
mod jinja;
mod json_scan;
pub mod reasoning;
pub mod tools;

use std::path::PathBuf;

use minijinja::{Environment, Value};
use serde_json::{Map, Value as Json, json};
use time::OffsetDateTime;

pub use builtin::BuiltinTemplate;
pub use caps::Caps;

use crate::engine::gguf::{self, GgufFile};

/// Errors of chat-template loading and rendering.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template source is not valid Jinja (minijinja's message, with the line).
    #[error("chat template does not compile: {message}")]
    Syntax { message: String },
    /// The template failed while rendering; `message` is the template's own (e.g. the text given to
    /// `raise_exception`) followed by where it happened.
    #[error("chat template failed to render: {message}")]
    Render { message: String },
    /// A message of the request is not in OpenAI's shape.
    #[error("invalid message {index}: {reason}")]
    InvalidMessage { index: usize, reason: String },
    /// The `tools` of the request are not an array of OpenAI function tools.
    #[error("invalid tools: {reason}")]
    InvalidTools { reason: String },
    /// The system message cannot be merged into the next one (their contents are not strings).
    #[error("cannot merge the system message into the next message: {reason}")]
    Merge { reason: String },
    /// A GGUF metadata value needed for the template is present but unusable.
    #[error("GGUF metadata {key}: {reason}")]
    Metadata { key: String, reason: String },
    /// Reading the GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    /// No built-in template has this name.
    #[error("unknown built-in chat template {name:?} (known: {known})")]
    UnknownBuiltin { name: String, known: String },
    /// A built-in template does not accept this conversation (e.g. a role it has no slot for).
    #[error("built-in chat template {template} cannot render this conversation: {reason}")]
    Builtin {
        template: &'static str,
        reason: String,
    },
}

/// Options of one rendering.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// End the prompt with the opening of an assistant turn (llama-server's default: true).
    pub add_generation_prompt: bool,
    /// OpenAI `tools`: an array of `{type: "function", function: {name, description, parameters}}`.
    pub tools: Option<Json>,
    /// Let the model think. llama-server passes `enable_thinking: true` by default, but only to
    /// templates it finds to support thinking ([`ChatTemplate::supports_thinking`]); others get
    /// false. An `enable_thinking` boolean in `extra_context` is passed as given.
    pub enable_thinking: bool,
    /// llama-server's `preserve_reasoning` template kwarg (on by default): passed as
    /// `preserve_reasoning`, and as `preserve_thinking` / `clear_thinking` /
    /// `truncate_history_thinking` / `drop_thinking`. `None` passes none of them.
    pub preserve_reasoning: Option<bool>,
    /// The "now" of `strftime_now`, `datetime` and `date_string`; `None` is the current UTC time.
    pub now: Option<OffsetDateTime>,
    /// Extra template variables (llama-server's `chat_template_kwargs`); they override the
    /// defaults. `enable_thinking` given here as a boolean overrides the field above.
    pub extra_context: Map<String, Json>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            add_generation_prompt: true,
            tools: None,
            enable_thinking: true,
            preserve_reasoning: Some(true),
            now: None,
            extra_context: Map::new(),
        }
    }
}

/// A compiled chat template (Jinja or one of llama.cpp's built-in formats). `Send + Sync`: compile
/// once, render from any thread.
#[derive(Debug)]
pub struct ChatTemplate {
    kind: Kind,
    bos_token: String,
    eos_token: String,
    /// Strip a leading `bos_token` from the rendering (the tokenizer adds BOS itself).
    strip_bos: bool,
    /// Strip a trailing `eos_token` from the rendering (the tokenizer adds EOS itself).
    strip_eos: bool,
}

enum Kind {
    Jinja {
        env: Box<Environment<'static>>,
        source: String,
        caps: Caps,
        supports_thinking: bool,
    },
    Builtin(BuiltinTemplate),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Jinja { caps, source, .. } => f
                .debug_struct("Jinja")
                .field("caps", caps)
                .field("source_len", &source.len())
                .finish(),
            Kind::Builtin(b) => f.debug_tuple("Builtin").field(b).finish(),
        }
    }
}

/// llama-server's default template when a model has none (`CHATML_TEMPLATE_SRC`, `common/chat.cpp`).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\n  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n  {{- '<|im_start|>assistant\n' -}}\n{%- endif -%}";

impl ChatTemplate {
    /// Compiles a Jinja chat template with the given special-token strings.
    ///
    /// `source` may also be the name of a built-in format (`"chatml"` gives llama-server's Jinja
    /// ChatML, other names such as `"llama3"` or `"mistral-v7"` the hand-written formats of
    /// [`builtin`]). A source that is empty gives ChatML.
    ///
    /// Errors: [`ChatError::Syntax`] when the source is not valid Jinja.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let kind = if source.is_empty() || source == "chatml" {
            jinja_kind(CHATML_TEMPLATE)?
        } else if let Some(b) = BuiltinTemplate::from_name(source) {
            Kind::Builtin(b)
        } else {
            jinja_kind(source)?
        };
        Ok(ChatTemplate {
            kind,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            strip_bos: false,
            strip_eos: false,
        })
    }

    /// One of llama.cpp's hand-written formats, by name (`"llama2"`, `"mistral-v7"`, `"zephyr"`, …).
    ///
    /// Errors: [`ChatError::UnknownBuiltin`] listing the known names.
    pub fn builtin(name: &str) -> Result<ChatTemplate, ChatError> {
        let b = BuiltinTemplate::from_name(name).ok_or_else(|| ChatError::UnknownBuiltin {
            name: name.to_string(),
            known: BuiltinTemplate::ALL
                .iter()
                .map(|b| b.name())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        Ok(ChatTemplate {
            kind: Kind::Builtin(b),
            bos_token: String::new(),
            eos_token: String::new(),
            strip_bos: false,
            strip_eos: false,
        })
    }

    /// The template of a GGUF file: `tokenizer.chat_template` (falling back to
    /// `tokenizer.chat_template.tool_use`, then to ChatML, as llama-server does), with `bos_token`
    /// and `eos_token` taken from `tokenizer.ggml.tokens` at `tokenizer.ggml.bos_token_id` /
    /// `eos_token_id` (as the token's text). A leading BOS / trailing EOS is stripped from renderings
    /// when the vocabulary adds them itself (`tokenizer.ggml.add_bos_token` / `add_eos_token`).
    ///
    /// Errors: [`ChatError::Metadata`] for a template or token table of the wrong type or a token id
    /// out of range; [`ChatError::Syntax`] when the template is not valid Jinja and is not one of
    /// llama.cpp's recognisable built-in formats either.
    pub fn from_gguf(f: &GgufFile) -> Result<ChatTemplate, ChatError> {
        Self::from_gguf_with(f, None)
    }

    /// [`ChatTemplate::from_gguf`] with the template source replaced by `source` when given
    /// (llama-server's `--chat-template-file` / `--chat-template`: a Jinja source or a built-in
    /// name), keeping the file's `bos_token` / `eos_token` and BOS/EOS stripping.
    ///
    /// Errors: as [`ChatTemplate::from_gguf`]; [`ChatError::Syntax`] when `source` is neither
    /// valid Jinja nor a built-in name.
    pub fn from_gguf_with(f: &GgufFile, source: Option<&str>) -> Result<ChatTemplate, ChatError> {
        if let Some(src) = source {
            let vocab = VocabInfo::read(f)?;
            let mut t =
                if src.is_empty() || src == "chatml" || BuiltinTemplate::from_name(src).is_some() {
                    ChatTemplate::new(src, &vocab.bos, &vocab.eos)?
                } else {
                    ChatTemplate {
                        kind: jinja_kind(&apply_llama_cpp_source_patches(src))?,
                        bos_token: vocab.bos.clone(),
                        eos_token: vocab.eos.clone(),
                        strip_bos: false,
                        strip_eos: false,
                    }
                };
            t.strip_bos = vocab.add_bos;
            t.strip_eos = vocab.add_eos;
            return Ok(t);
        }
        let meta_str = |key: &str| -> Result<Option<&str>, ChatError> {
            match f.get(key) {
                None => Ok(None),
                Some(gguf::Value::String(s)) => Ok(Some(s.as_str())),
                Some(v) => Err(ChatError::Metadata {
                    key: key.to_string(),
                    reason: format!("expected a STRING, found {}", v.describe()),
                }),
            }
        };
        let default_src = meta_str("tokenizer.chat_template")?.unwrap_or("");
        let tool_use_src = meta_str("tokenizer.chat_template.tool_use")?.unwrap_or("");
        let mut source = default_src;
        if source.is_empty() || source == "chatml" {
            source = if tool_use_src.is_empty() {
                CHATML_TEMPLATE
            } else {
                tool_use_src
            };
        }
        let vocab = VocabInfo::read(f)?;
        let source = apply_llama_cpp_source_patches(source);
        let kind = match jinja_kind(&source) {
            Ok(k) => k,
            Err(e) => match BuiltinTemplate::detect(&source) {
                Some(b) => {
                    tracing::warn!(
                        "chat template does not compile ({e}); using llama.cpp's built-in format {}",
                        b.name()
                    );
                    Kind::Builtin(b)
                }
                None => return Err(e),
            },
        };
        Ok(ChatTemplate {
            kind,
            bos_token: vocab.bos,
            eos_token: vocab.eos,
            strip_bos: vocab.add_bos,
            strip_eos: vocab.add_eos,
        })
    }

    /// The Jinja source in use (`None` for a built-in format).
    pub fn source(&self) -> Option<&str> {
        match &self.kind {
            Kind::Jinja { source, .. } => Some(source),
            Kind::Builtin(_) => None,
        }
    }

    /// The capabilities detected for a Jinja template (`None` for a built-in format).
    pub fn caps(&self) -> Option<Caps> {
        match &self.kind {
            Kind::Jinja { caps, .. } => Some(*caps),
            Kind::Builtin(_) => None,
        }
    }

    /// Whether llama-server would let this template think (`enable_thinking` is passed as true
    /// only then; see [`RenderOptions::enable_thinking`]). False for built-in formats.
    pub fn supports_thinking(&self) -> bool {
        matches!(
            self.kind,
            Kind::Jinja {
                supports_thinking: true,
                ..
            }
        )
    }

    /// The built-in format in use, if this is not a Jinja template.
    pub fn builtin_kind(&self) -> Option<BuiltinTemplate> {
        match &self.kind {
            Kind::Builtin(b) => Some(*b),
            Kind::Jinja { .. } => None,
        }
    }

    /// The `bos_token` string given to the template.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The `eos_token` string given to the template.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages` (OpenAI shape: `role`; `content` as a string, null, or an array of
    /// `{type: "text", text}` parts; `tool_calls`; `name`; `tool_call_id`; `reasoning_content`) into
    /// a prompt string, exactly as llama-server's `POST /apply-template` does. Unknown message
    /// fields are dropped, as llama.cpp drops them.
    ///
    /// Errors: [`ChatError::InvalidMessage`] / [`ChatError::InvalidTools`] for input not in OpenAI's
    /// shape; [`ChatError::Render`] with the template's own message when the template fails (e.g.
    /// `raise_exception("Conversation roles must alternate")`).
    pub fn render(&self, messages: &[Json], opts: &RenderOptions) -> Result<String, ChatError> {
        let msgs = parse_messages(messages)?;
        match &self.kind {
            Kind::Builtin(b) => b.apply(&msgs, opts.add_generation_prompt),
            Kind::Jinja {
                env,
                source,
                caps,
                supports_thinking,
            } => {
                let enable_thinking = opts.enable_thinking && *supports_thinking;
                self.render_jinja(env, source, caps, msgs, opts, enable_thinking)
            }
        }
    }

    fn render_jinja(
        &self,
        env: &Environment<'static>,
        source: &str,
        caps: &Caps,
        mut msgs: Vec<Message>,
        opts: &RenderOptions,
        enable_thinking: bool,
    ) -> Result<String, ChatError> {
        let tools = parse_tools(opts.tools.as_ref())?;
        // StepFun: llama.cpp trims message contents before rendering (issue #24181).
        if source.contains("You have access to the following functions in JSONSchema format") {
            for m in &mut msgs {
                m.trim_all();
            }
        }
        let mut messages: Vec<Map<String, Json>> = msgs.iter().map(Message::to_json).collect();
        normalize_content(&mut messages, caps);
        if !source.contains("<|channel|>") {
            for m in &mut messages {
                if m.get("role").and_then(Json::as_str) == Some("developer") {
                    m.insert("role".into(), json!("system"));
                }
            }
        }
        if !caps.supports_system_role {
            merge_system_message(&mut messages)?;
        }
        if caps.supports_tool_calls {
            for m in &mut messages {
                if m.contains_key("tool_calls") && !m.contains_key("content") {
                    m.insert("content".into(), json!(""));
                }
            }
        }
        if caps.supports_object_arguments {
            parse_string_arguments(&mut messages)?;
        }
        adapt_for_specialized_template(source, &mut messages);

        let now = opts.now.unwrap_or_else(OffsetDateTime::now_utc);
        let mut ctx = Map::new();
        ctx.insert(
            "messages".into(),
            Json::Array(messages.into_iter().map(Json::Object).collect()),
        );
        ctx.insert("bos_token".into(), json!(self.bos_token));
        ctx.insert("eos_token".into(), json!(self.eos_token));
        ctx.insert("enable_thinking".into(), json!(enable_thinking));
        if let Some(t) = tools {
            ctx.insert("tools".into(), t);
        }
        ctx.insert("datetime".into(), json!(jinja::strftime(&now, "%b %d %Y")));
        ctx.insert(
            "date_string".into(),
            json!(jinja::strftime(&now, "%d %b %Y")),
        );
        if let Some(p) = opts.preserve_reasoning {
            ctx.insert("preserve_reasoning".into(), json!(p));
        }
        for (k, v) in &opts.extra_context {
            ctx.insert(k.clone(), v.clone());
        }
        if opts.add_generation_prompt {
            ctx.insert("add_generation_prompt".into(), json!(true));
        }
        if let Some(Json::Bool(enabled)) = ctx.get("preserve_reasoning").cloned() {
            ctx.insert("preserve_thinking".into(), json!(enabled));
            ctx.insert("clear_thinking".into(), json!(!enabled));
            ctx.insert("truncate_history_thinking".into(), json!(!enabled));
            ctx.insert("drop_thinking".into(), json!(!enabled));
        }
        if let Some(Json::String(effort)) = ctx.get("reasoning_effort").cloned()
            && !effort.is_empty()
        {
            ctx.insert("reasoning_strength".into(), json!(effort));
        }
        let mut ctx_value: Vec<(String, Value)> = ctx
            .into_iter()
            .map(|(k, v)| (k, Value::from_serialize(&v)))
            .collect();
        ctx_value.push((jinja::NOW_VAR.into(), Value::from(now.unix_timestamp())));
        let ctx_value: Value = ctx_value.into_iter().collect();

        let mut out = jinja::render_capped(env, ctx_value).map_err(|e| ChatError::Render {
            message: describe_error(&e),
        })?;
        if self.strip_bos && !self.bos_token.is_empty() && out.starts_with(&self.bos_token) {
            out.drain(..self.bos_token.len());
        }
        if self.strip_eos && !self.eos_token.is_empty() && out.ends_with(&self.eos_token) {
            out.truncate(out.len() - self.eos_token.len());
        }
        Ok(out)
    }
}

fn jinja_kind(source: &str) -> Result<Kind, ChatError> {
    let env = jinja::build_env(source).map_err(|e| ChatError::Syntax {
        message: describe_error(&e),
    })?;
    let caps = caps::detect(&env);
    let supports_thinking = caps::supports_thinking(&env, source);
    Ok(Kind::Jinja {
        env: Box::new(env),
        source: source.to_string(),
        caps,
        supports_thinking,
    })
}

/// The text of a minijinja error with its causes and location, without the debug dump.
fn describe_error(e: &minijinja::Error) -> String {
    let mut msg = match e.detail() {
        Some(d) => d.to_string(),
        None => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// llama.cpp's source patches for templates its engine cannot run as shipped
/// (`common_chat_templates_init`, `common/chat.cpp`).
fn apply_llama_cpp_source_patches(source: &str) -> String {
    let mut src = source.to_string();
    if src.contains("<|channel|>") && src.contains("in message.content or") {
        src = src.replace(
            "{%- if \"<|channel|>analysis<|message|>\" in message.content or \"<|channel|>final<|message|>\" in message.content %}",
            "{%- if false %}",
        );
    }
    if src.contains("[TOOL_CALLS]") && src.contains("if (message['content'] is none or") {
        src = src.replace(
            "{%- if (message['content'] is none or message['content'] == '' or message['content']|length == 0) and (message['tool_calls'] is not defined or message['tool_calls'] is none or message['tool_calls']|length == 0) %}",
            "{%- if false %}",
        );
    }
    src
}

/// One message in llama.cpp's canonical form (`common_chat_msg`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Message {
    pub role: String,
    pub content: String,
    /// `(type, text)` with type `text` or `media_marker`.
    pub content_parts: Vec<(String, String)>,
    pub tool_calls: Vec<ToolCall>,
    pub reasoning_content: String,
    pub tool_name: String,
    pub tool_call_id: String,
}

/// A tool call of an assistant message: arguments kept as the JSON text.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ToolCall {
    pub name: String,
    pub arguments: String,
    pub id: String,
}

impl Message {
    /// The content with parts joined by newlines (llama.cpp's legacy path and string-only templates).
    pub(crate) fn flat_content(&self) -> String {
        let mut text = self.content.clone();
        for (_, t) in &self.content_parts {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(t);
        }
        text
    }

    fn trim_all(&mut self) {
        self.content = self.content.trim().to_string();
        self.reasoning_content = self.reasoning_content.trim().to_string();
        for (ty, t) in &mut self.content_parts {
            if ty == "text" {
                *t = t.trim().to_string();
            }
        }
    }

    /// `common_chat_msg::to_json_oaicompat` (`common/chat.cpp`): role, content, reasoning_content,
    /// name, tool_call_id, tool_calls, in that order; empty content becomes `""`.
    fn to_json(&self) -> Map<String, Json> {
        let mut m = Map::new();
        m.insert("role".into(), json!(self.role));
        if !self.content.is_empty() {
            m.insert("content".into(), json!(self.content));
        } else if !self.content_parts.is_empty() {
            if self.content_parts.iter().any(|(t, _)| t == "media_marker") {
                m.insert("content".into(), json!(concat_parts(&self.content_parts)));
            } else {
                let parts: Vec<Json> = self
                    .content_parts
                    .iter()
                    .map(|(ty, text)| json!({"type": ty, "text": text}))
                    .collect();
                m.insert("content".into(), Json::Array(parts));
            }
        } else {
            m.insert("content".into(), json!(""));
        }
        if !self.reasoning_content.is_empty() {
            m.insert("reasoning_content".into(), json!(self.reasoning_content));
        }
        if !self.tool_name.is_empty() {
            m.insert("name".into(), json!(self.tool_name));
        }
        if !self.tool_call_id.is_empty() {
            m.insert("tool_call_id".into(), json!(self.tool_call_id));
        }
        if !self.tool_calls.is_empty() {
            let calls: Vec<Json> = self
                .tool_calls
                .iter()
                .map(|tc| {
                    let mut c = Map::new();
                    c.insert("type".into(), json!("function"));
                    c.insert(
                        "function".into(),
                        json!({"name": tc.name, "arguments": tc.arguments}),
                    );
                    if !tc.id.is_empty() {
                        c.insert("id".into(), json!(tc.id));
                    }
                    Json::Object(c)
                })
                .collect();
            m.insert("tool_calls".into(), Json::Array(calls));
        }
        m
    }
}

/// Joins content parts with newlines, none before or after a media marker (llama.cpp's
/// `concat_content_parts`).
fn concat_parts(parts: &[(String, String)]) -> String {
    let mut text = String::new();
    let mut last_was_media = false;
    for (ty, t) in parts {
        let newline = if ty == "text" {
            let nl = !last_was_media && !text.is_empty();
            last_was_media = false;
            nl
        } else if ty == "media_marker" {
            last_was_media = true;
            false
        } else {
            continue;
        };
        if newline {
            text.push('\n');
        }
        text.push_str(t);
    }
    text
}

fn str_field(
    msg: &Map<String, Json>,
    key: &str,
    index: usize,
) -> Result<Option<String>, ChatError> {
    match msg.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ChatError::InvalidMessage {
            index,
            reason: format!("'{key}' must be a string, got {other}"),
        }),
    }
}

/// `common_chat_msgs_parse_oaicompat` plus llama-server's request checks (`server-common.cpp`).
pub(crate) fn parse_messages(messages: &[Json]) -> Result<Vec<Message>, ChatError> {
    let mut out = Vec::with_capacity(messages.len());
    for (index, raw) in messages.iter().enumerate() {
        let bad = |reason: String| ChatError::InvalidMessage { index, reason };
        let Json::Object(msg) = raw else {
            return Err(bad(format!("expected an object, got {raw}")));
        };
        let role = match msg.get("role") {
            Some(Json::String(r)) => r.clone(),
            Some(other) => return Err(bad(format!("'role' must be a string, got {other}"))),
            None => return Err(bad("missing 'role'".into())),
        };
        let has_content = msg.contains_key("content");
        let has_tool_calls = msg.contains_key("tool_calls");
        if role != "assistant" && !has_content {
            return Err(bad(
                "all non-assistant messages must contain 'content'".into()
            ));
        }
        if !has_content && !has_tool_calls {
            return Err(bad("expected 'content' or 'tool_calls'".into()));
        }
        let mut m = Message {
            role,
            ..Message::default()
        };
        match msg.get("content") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => m.content = s.clone(),
            Some(Json::Array(parts)) => {
                for (pi, part) in parts.iter().enumerate() {
                    let ty = part.get("type").and_then(Json::as_str).ok_or_else(|| {
                        bad(format!("content part {pi} has no string 'type': {part}"))
                    })?;
                    if ty != "text" && ty != "media_marker" {
                        return Err(bad(format!(
                            "content part {pi} has unsupported type {ty:?} (only \"text\")"
                        )));
                    }
                    let text = part.get("text").and_then(Json::as_str).ok_or_else(|| {
                        bad(format!("content part {pi} has no string 'text': {part}"))
                    })?;
                    m.content_parts.push((ty.to_string(), text.to_string()));
                }
            }
            Some(other) => {
                return Err(bad(format!(
                    "'content' must be a string, an array of parts or null, got {other}"
                )));
            }
        }
        if let Some(calls) = msg.get("tool_calls") {
            let Json::Array(calls) = calls else {
                return Err(bad(format!("'tool_calls' must be an array, got {calls}")));
            };
            for (ci, call) in calls.iter().enumerate() {
                let ty = call.get("type").and_then(Json::as_str);
                if ty != Some("function") {
                    return Err(bad(format!(
                        "tool call {ci} must have type \"function\": {call}"
                    )));
                }
                let func = call
                    .get("function")
                    .and_then(Json::as_object)
                    .ok_or_else(|| bad(format!("tool call {ci} has no 'function' object")))?;
                let name = func
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or_else(|| bad(format!("tool call {ci} has no string function name")))?;
                let arguments = match func.get("arguments") {
                    Some(Json::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => return Err(bad(format!("tool call {ci} has no 'arguments'"))),
                };
                let id = match call.get("id") {
                    None | Some(Json::Null) => String::new(),
                    Some(Json::String(s)) => s.clone(),
                    Some(v) => return Err(bad(format!("tool call {ci} has a non-string id {v}"))),
                };
                m.tool_calls.push(ToolCall {
                    name: name.to_string(),
                    arguments,
                    id,
                });
            }
        }
        m.reasoning_content = str_field(msg, "reasoning_content", index)?.unwrap_or_default();
        m.tool_name = str_field(msg, "name", index)?.unwrap_or_default();
        m.tool_call_id = str_field(msg, "tool_call_id", index)?.unwrap_or_default();
        out.push(m);
    }
    Ok(out)
}

/// `common_chat_tools_parse_oaicompat` + `common_chat_tools_to_json_oaicompat`: each tool becomes
/// `{type, function: {name, description, parameters}}`; an empty list is no tools at all.
fn parse_tools(tools: Option<&Json>) -> Result<Option<Json>, ChatError> {
    let tools = match tools {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Array(a)) => a,
        Some(other) => {
            return Err(ChatError::InvalidTools {
                reason: format!("expected an array, got {other}"),
            });
        }
    };
    let mut out = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let bad = |reason: String| ChatError::InvalidTools {
            reason: format!("tool {i}: {reason}"),
        };
        if tool.get("type").and_then(Json::as_str) != Some("function") {
            return Err(bad(format!("unsupported tool type in {tool}")));
        }
        let func = tool
            .get("function")
            .and_then(Json::as_object)
            .ok_or_else(|| bad("missing 'function' object".into()))?;
        let name = func
            .get("name")
            .and_then(Json::as_str)
            .ok_or_else(|| bad("missing function 'name'".into()))?;
        let description = match func.get("description") {
            None => "",
            Some(Json::String(s)) => s.as_str(),
            Some(v) => return Err(bad(format!("'description' must be a string, got {v}"))),
        };
        let parameters = func.get("parameters").cloned().unwrap_or(json!({}));
        out.push(json!({
            "type": "function",
            "function": {"name": name, "description": description, "parameters": parameters},
        }));
    }
    Ok(if out.is_empty() {
        None
    } else {
        Some(Json::Array(out))
    })
}

/// `messages_inp_normalizer` (`common/chat.cpp`): content given the way the template takes it.
fn normalize_content(messages: &mut [Map<String, Json>], caps: &Caps) {
    let only_string = caps.supports_string_content && !caps.supports_typed_content;
    let only_typed = !caps.supports_string_content && caps.supports_typed_content;
    for m in messages {
        let Some(content) = m.get_mut("content") else {
            continue;
        };
        if only_typed && let Json::String(s) = content {
            *content = json!([{"type": "text", "text": s}]);
        } else if only_string && let Json::Array(parts) = content {
            let parts: Vec<(String, String)> = parts
                .iter()
                .map(|p| {
                    (
                        p.get("type")
                            .and_then(Json::as_str)
                            .unwrap_or("")
                            .to_string(),
                        p.get("text")
                            .and_then(Json::as_str)
                            .unwrap_or("")
                            .to_string(),
                    )
                })
                .collect();
            *content = json!(concat_parts(&parts));
        }
    }
}

/// `workaround::system_message_not_supported`: a leading system message is prepended (with a
/// newline) to the next message, or dropped when it is alone.
fn merge_system_message(messages: &mut Vec<Map<String, Json>>) -> Result<(), ChatError> {
    if messages
        .first()
        .and_then(|m| m.get("role"))
        .and_then(Json::as_str)
        != Some("system")
    {
        return Ok(());
    }
    let first = messages.remove(0);
    if let Some(second) = messages.first_mut() {
        let a = first
            .get("content")
            .and_then(Json::as_str)
            .ok_or_else(|| ChatError::Merge {
                reason: "the system message's content is not a string".into(),
            })?;
        let b = second
            .get("content")
            .and_then(Json::as_str)
            .ok_or_else(|| ChatError::Merge {
                reason: "the next message's content is not a string".into(),
            })?;
        let merged = format!("{a}\n{b}");
        second.insert("content".into(), json!(merged));
    } else {
        tracing::warn!("removing the system prompt: the template does not support the system role");
    }
    Ok(())
}

/// `workaround::func_args_not_string`: tool-call arguments given as JSON text become objects.
fn parse_string_arguments(messages: &mut [Map<String, Json>]) -> Result<(), ChatError> {
    for (index, m) in messages.iter_mut().enumerate() {
        let Some(Json::Array(calls)) = m.get_mut("tool_calls") else {
            continue;
        };
        for call in calls {
            if let Some(args) = call.pointer_mut("/function/arguments")
                && let Json::String(s) = args
            {
                *args = serde_json::from_str(s).map_err(|e| ChatError::InvalidMessage {
                    index,
                    reason: format!("tool call arguments are not valid JSON: {e}"),
                })?;
            }
        }
    }
    Ok(())
}

/// The message adjustments of llama.cpp's specialised handlers (`common/parsers/*.cpp`) that
/// change the prompt: Ministral 3 wants system/assistant content as typed blocks (reasoning as a
/// `thinking` block); GPT-OSS and LFM2 read reasoning from `thinking`.
fn adapt_for_specialized_template(src: &str, messages: &mut [Map<String, Json>]) {
    let ministral3 = src.contains("[SYSTEM_PROMPT]")
        && src.contains("[TOOL_CALLS]")
        && src.contains("[ARGS]")
        && !src.contains("[CALL_ID]");
    let gpt_oss = src.contains("<|channel|>");
    let lfm2 = (src.contains("<|tool_list_start|>") && src.contains("<|tool_list_end|>"))
        || (src.contains("List of tools: [") && !src.contains("<|tool_list_start|>"));
    if ministral3 {
        for m in messages.iter_mut() {
            let role = m.get("role").and_then(Json::as_str).unwrap_or("");
            if role != "system" && role != "assistant" {
                continue;
            }
            let mut blocks = Vec::new();
            if let Some(Json::String(r)) = m.get("reasoning_content") {
                blocks.push(json!({"type": "thinking", "thinking": r}));
            }
            match m.get("content") {
                Some(Json::String(s)) => blocks.push(json!({"type": "text", "text": s})),
                Some(Json::Array(a)) => blocks.extend(a.iter().cloned()),
                _ => {}
            }
            m.insert("content".into(), Json::Array(blocks));
            m.shift_remove("reasoning_content");
        }
    } else if gpt_oss || lfm2 {
        for m in messages.iter_mut() {
            if let Some(Json::String(r)) = m.get("reasoning_content").cloned() {
                m.insert("thinking".into(), json!(r));
                let has_calls =
                    matches!(m.get("tool_calls"), Some(Json::Array(a)) if !a.is_empty());
                if gpt_oss && has_calls {
                    m.shift_remove("content");
                }
            }
        }
    }
}

/// Special-token facts of a GGUF vocabulary that templates need.
struct VocabInfo {
    bos: String,
    eos: String,
    add_bos: bool,
    add_eos: bool,
}

impl VocabInfo {
    fn read(f: &GgufFile) -> Result<VocabInfo, ChatError> {
        let model = match f.get("tokenizer.ggml.model") {
            Some(gguf::Value::String(s)) => s.as_str(),
            _ => "",
        };
        // llama.cpp's per-model defaults (`llama_vocab::impl::load`, src/llama-vocab.cpp).
        let (def_bos, def_eos, def_add_bos, def_add_eos): (Option<i128>, Option<i128>, bool, bool) =
            match model {
                "llama" => (Some(1), Some(2), true, false),
                "bert" => (Some(101), Some(102), true, true),
                "gpt2" => (Some(11), Some(11), false, false),
                _ => (None, None, false, false),
            };
        let id = |key: &str, def: Option<i128>| -> Result<Option<i128>, ChatError> {
            match f.get(key) {
                None => Ok(def),
                Some(v) => v.as_int().map(Some).ok_or_else(|| ChatError::Metadata {
                    key: key.to_string(),
                    reason: format!("expected an integer, found {}", v.describe()),
                }),
            }
        };
        let flag = |key: &str, def: bool| match f.get(key) {
            Some(gguf::Value::Bool(b)) => *b,
            _ => def,
        };
        let bos_id = id("tokenizer.ggml.bos_token_id", def_bos)?;
        let eos_id = id("tokenizer.ggml.eos_token_id", def_eos)?;
        let tokens = match f.get("tokenizer.ggml.tokens") {
            Some(gguf::Value::Array(a)) => Some(a),
            None => None,
            Some(v) => {
                return Err(ChatError::Metadata {
                    key: "tokenizer.ggml.tokens".into(),
                    reason: format!("expected an ARRAY of STRING, found {}", v.describe()),
                });
            }
        };
        let types = match f.get("tokenizer.ggml.token_type") {
            Some(gguf::Value::Array(a)) => Some(a),
            _ => None,
        };
        let text = |key: &str, id: Option<i128>, explicit: bool| -> Result<String, ChatError> {
            let (Some(id), Some(tokens)) = (id, tokens) else {
                return Ok(String::new());
            };
            // -1 (LLAMA_TOKEN_NULL) means "no such token".
            if id < 0 {
                return Ok(String::new());
            }
            let item = usize::try_from(id).ok().and_then(|i| tokens.get(i));
            let Some(item) = item else {
                if !explicit {
                    return Ok(String::new());
                }
                return Err(ChatError::Metadata {
                    key: key.to_string(),
                    reason: format!(
                        "token id {id} is out of range (the vocabulary has {} tokens)",
                        tokens.len()
                    ),
                });
            };
            let gguf::Value::String(s) = &item else {
                return Err(ChatError::Metadata {
                    key: "tokenizer.ggml.tokens".into(),
                    reason: format!("token {id} is {}, not a STRING", item.describe()),
                });
            };
            let ty = types
                .and_then(|t| t.get(id as usize))
                .and_then(|v| v.as_int())
                .unwrap_or(1);
            Ok(token_piece(model, s, ty))
        };
        Ok(VocabInfo {
            bos: text(
                "tokenizer.ggml.bos_token_id",
                bos_id,
                f.get("tokenizer.ggml.bos_token_id").is_some(),
            )?,
            eos: text(
                "tokenizer.ggml.eos_token_id",
                eos_id,
                f.get("tokenizer.ggml.eos_token_id").is_some(),
            )?,
            add_bos: flag("tokenizer.ggml.add_bos_token", def_add_bos),
            add_eos: flag("tokenizer.ggml.add_eos_token", def_add_eos),
        })
    }
}

/// A token's text as llama.cpp's `token_to_piece(special = true)` gives it: control and
/// user-defined tokens (types 3, 4) as stored; normal SPM tokens with `▁` as a space; normal BPE
/// tokens decoded from GPT-2's byte-to-unicode alphabet.
fn token_piece(model: &str, text: &str, token_type: i128) -> String {
    if token_type == 3 || token_type == 4 {
        return text.to_string();
    }
    match model {
        "llama" => text.replace('\u{2581}', " "),
        "gpt2" => {
            let bytes: Option<Vec<u8>> = text.chars().map(gpt2_unicode_to_byte).collect();
            match bytes {
                Some(b) => String::from_utf8_lossy(&b).into_owned(),
                None => text.to_string(),
            }
        }
        _ => text.to_string(),
    }
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the other
/// 68 bytes to U+0100 onwards in order.
fn gpt2_unicode_to_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if cp < 256 && printable(cp) {
        return Some(cp as u8);
    }
    let mut n = 256u32;
    for b in 0u32..256 {
        if !printable(b) {
            if n == cp {
                return Some(b as u8);
            }
            n += 1;
        }
    }
    None
}

/// Arguments of `cyber-inference chat-template`.
#[derive(Debug, clap::Args)]
pub struct ChatTemplateArgs {
    /// The GGUF file whose `tokenizer.chat_template` to render (without one: ChatML).
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// The messages: a JSON array of OpenAI chat messages (or `@FILE` to read them from a file).
    #[arg(long, value_name = "JSON")]
    pub messages: String,
    /// Do not end the prompt with the opening of an assistant turn.
    #[arg(long)]
    pub no_generation_prompt: bool,
    /// OpenAI `tools` as a JSON array (or `@FILE`).
    #[arg(long, value_name = "JSON")]
    pub tools: Option<String>,
    /// Pass `enable_thinking: false` to the template.
    #[arg(long)]
    pub no_thinking: bool,
    /// Use this template instead of the file's: Jinja source, `@FILE`, or a built-in name
    /// (chatml, llama2, llama3, mistral-v7, zephyr, phi3, gemma, …).
    #[arg(long, value_name = "TEMPLATE")]
    pub chat_template: Option<String>,
}

/// Errors of the `chat-template` command.
#[derive(Debug, thiserror::Error)]
pub enum ChatCliError {
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid JSON: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("--messages must be a JSON array of messages")]
    NotAnArray,
}

fn arg_text(arg: &str) -> Result<String, ChatCliError> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|source| ChatCliError::Read {
            path: path.into(),
            source,
        }),
        None => Ok(arg.to_string()),
    }
}

/// Runs `chat-template`: prints the prompt `-m FILE`'s template makes of `--messages`.
///
/// Errors: unreadable file or JSON, invalid messages, or a template that fails (with its message).
pub fn run(args: &ChatTemplateArgs) -> Result<(), ChatCliError> {
    let prompt = render_cli(args)?;
    print!("{prompt}");
    Ok(())
}

/// The prompt `run` prints.
pub fn render_cli(args: &ChatTemplateArgs) -> Result<String, ChatCliError> {
    let messages: Json =
        serde_json::from_str(&arg_text(&args.messages)?).map_err(|source| ChatCliError::Json {
            what: "--messages",
            source,
        })?;
    let Json::Array(messages) = messages else {
        return Err(ChatCliError::NotAnArray);
    };
    let tools = match &args.tools {
        Some(t) => {
            Some(
                serde_json::from_str(&arg_text(t)?).map_err(|source| ChatCliError::Json {
                    what: "--tools",
                    source,
                })?,
            )
        }
        None => None,
    };
    let file = GgufFile::open(&args.model).map_err(ChatError::from)?;
    let template = match &args.chat_template {
        Some(t) => {
            let vocab = VocabInfo::read(&file)?;
            let mut tmpl = ChatTemplate::new(&arg_text(t)?, &vocab.bos, &vocab.eos)?;
            tmpl.strip_bos = vocab.add_bos;
            tmpl.strip_eos = vocab.add_eos;
            tmpl
        }
        None => ChatTemplate::from_gguf(&file)?,
    };
    let opts = RenderOptions {
        add_generation_prompt: !args.no_generation_prompt,
        tools,
        enable_thinking: !args.no_thinking,
        ..RenderOptions::default()
    };
    Ok(template.render(&messages, &opts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_now() -> RenderOptions {
        RenderOptions {
            now: Some(OffsetDateTime::from_unix_timestamp(1_795_437_296).unwrap()),
            ..RenderOptions::default()
        }
    }

    #[test]
    fn chatml_fallback_renders_like_llama_server() {
        let t = ChatTemplate::new("", "<s>", "</s>").unwrap();
        let out = t
            .render(
                &[
                    json!({"role": "system", "content": "S"}),
                    json!({"role": "user", "content": "U"}),
                ],
                &fixed_now(),
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn system_message_is_folded_into_the_first_user_turn() {
        // Gemma-style: rejects nothing, just never reads the system content.
        let src = "{% for m in messages %}{% if m.role != 'system' %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert!(!t.caps().unwrap().supports_system_role);
        let out = t
            .render(
                &[
                    json!({"role": "system", "content": "Be brief."}),
                    json!({"role": "user", "content": "Hi"}),
                ],
                &fixed_now(),
            )
            .unwrap();
        assert_eq!(out, "<user>Be brief.\nHi</user>");
    }

    #[test]
    fn raise_exception_text_reaches_the_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t
            .render(&[json!({"role": "user", "content": "x"})], &fixed_now())
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("roles must alternate"), "{msg}");
        assert!(matches!(err, ChatError::Render { .. }));
    }

    #[test]
    fn syntax_errors_are_typed() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(err, ChatError::Syntax { .. }), "{err}");
    }

    #[test]
    fn bad_messages_are_typed_errors() {
        let t = ChatTemplate::new("", "", "").unwrap();
        for (bad, what) in [
            (json!("hello"), "expected an object"),
            (json!({"content": "x"}), "missing 'role'"),
            (json!({"role": "user"}), "must contain 'content'"),
            (json!({"role": "user", "content": 5}), "'content' must be"),
            (
                json!({"role": "user", "content": [{"type": "image_url"}]}),
                "unsupported type",
            ),
        ] {
            let err = t.render(&[bad], &fixed_now()).unwrap_err();
            assert!(
                matches!(err, ChatError::InvalidMessage { index: 0, .. })
                    && err.to_string().contains(what),
                "{err}"
            );
        }
    }

    #[test]
    fn typed_content_is_flattened_for_string_templates() {
        let t = ChatTemplate::new("", "", "").unwrap();
        let out = t
            .render(
                &[json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})],
                &RenderOptions {
                    add_generation_prompt: false,
                    ..fixed_now()
                },
            )
            .unwrap();
        assert_eq!(out, "<|im_start|>user\na\nb<|im_end|>\n");
    }

    #[test]
    fn tools_and_extra_context_reach_the_template() {
        let src = "{{ tools | tojson }}|{{ enable_thinking }}|{{ date_string }}|{{ strftime_now('%Y-%m-%d') }}|{{ custom }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let mut opts = fixed_now();
        opts.tools = Some(
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        );
        opts.extra_context.insert("custom".into(), json!("x"));
        let out = t
            .render(&[json!({"role": "user", "content": "u"})], &opts)
            .unwrap();
        assert_eq!(
            out,
            r#"[{"type": "function", "function": {"name": "f", "description": "", "parameters": {"type": "object"}}}]|False|23 Nov 2026|2026-11-23|x"#
        );
    }

    #[test]
    fn gpt2_byte_alphabet_decodes() {
        assert_eq!(gpt2_unicode_to_byte('Ġ'), Some(b' '));
        assert_eq!(gpt2_unicode_to_byte('a'), Some(b'a'));
        assert_eq!(token_piece("gpt2", "Ġhello", 1), " hello");
        assert_eq!(token_piece("gpt2", "<|im_start|>", 3), "<|im_start|>");
    }
}
