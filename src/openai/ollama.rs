//! Ollama's API (<https://github.com/ollama/ollama/blob/main/docs/api.md>) translated to and from our
//! OpenAI types: request types of `/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
//! `/api/pull`, `/api/show`, `/api/delete`, `/api/copy`; pure functions from them to our
//! chat/completions/embeddings requests (`options` → sampling fields, `format` → `response_format`,
//! `keep_alive` parsed), and from our worker's replies to Ollama's objects (NDJSON stream lines and the
//! final `done: true` object with its counters). No I/O: the supervisor's `ollama` module does that.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, FinishReason, JsonSchemaFormat,
    MessageContent, PromptInput, ResponseFormat, Role, SamplingFields, StopSpec, StreamOptions,
    StructuredFields, ToolCall,
};

/// A request that cannot be translated: always a 400 in Ollama's `{"error": "..."}` envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TranslateError(pub String);

fn bad(m: impl Into<String>) -> TranslateError {
    TranslateError(m.into())
}

/// How long a model stays loaded after a request (`keep_alive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// A negative value: never unloaded for idleness.
    Forever,
    /// `0`: unloaded as soon as the reply is sent.
    Unload,
    /// Kept this long after the last request.
    For(Duration),
}

/// Parses `keep_alive`: a number of seconds (negative = forever, 0 = unload) or a Go duration string
/// (`"5m"`, `"1h30m"`, `"300ms"`, `"-1m"`, `"0"`; a bare number string is seconds).
///
/// Errors: anything else.
pub fn parse_keep_alive(v: &Value) -> Result<KeepAlive, TranslateError> {
    let secs: f64 = match v {
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::String(s) => parse_duration_secs(s.trim()).ok_or_else(|| {
            bad(format!(
                "invalid keep_alive {s:?}: expected a duration such as \"5m\", \"1h\", \"30s\", \"0\" or \"-1\""
            ))
        })?,
        other => {
            return Err(bad(format!(
                "invalid keep_alive {other}: expected a number of seconds or a duration string"
            )));
        }
    };
    Ok(if secs < 0.0 {
        KeepAlive::Forever
    } else if secs == 0.0 {
        KeepAlive::Unload
    } else {
        KeepAlive::For(Duration::from_secs_f64(secs.min(1e9)))
    })
}

fn parse_duration_secs(s: &str) -> Option<f64> {
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<f64>() {
        return n.is_finite().then_some(n);
    }
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let mut total = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Some(if neg { -total } else { total })
}

/// A tool call as Ollama writes it: arguments as an object.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaToolCall {
    /// The call.
    pub function: OllamaFunction,
}

/// The function of an [`OllamaToolCall`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaFunction {
    /// Function name.
    pub name: String,
    /// Arguments (an object; a JSON string is accepted too).
    #[serde(default)]
    pub arguments: Value,
}

/// A message of `/api/chat`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    #[serde(default)]
    pub content: Option<String>,
    /// The model's earlier thinking (assistant).
    #[serde(default)]
    pub thinking: Option<String>,
    /// Base64 images: refused (no vision models).
    #[serde(default)]
    pub images: Option<Vec<Value>>,
    /// Calls an earlier assistant turn made.
    #[serde(default)]
    pub tool_calls: Option<Vec<OllamaToolCall>>,
    /// For `tool` messages: which tool answered.
    #[serde(default)]
    pub tool_name: Option<String>,
}

/// `POST /api/chat`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaChatRequest {
    /// The model.
    #[serde(alias = "name")]
    pub model: String,
    /// The conversation (empty = just load or unload the model).
    #[serde(default)]
    pub messages: Vec<OllamaMessage>,
    /// Function tools (OpenAI's shape, which Ollama uses too).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `"json"` or a JSON schema.
    #[serde(default)]
    pub format: Option<Value>,
    /// Model options (`temperature`, `num_predict`, …).
    #[serde(default)]
    pub options: Option<Map<String, Value>>,
    /// Stream NDJSON (default true).
    #[serde(default)]
    pub stream: Option<bool>,
    /// How long the model stays loaded.
    #[serde(default)]
    pub keep_alive: Option<Value>,
    /// Thinking on/off for reasoning models.
    #[serde(default)]
    pub think: Option<Value>,
}

/// `POST /api/generate`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaGenerateRequest {
    /// The model.
    #[serde(alias = "name")]
    pub model: String,
    /// The prompt (empty = just load or unload the model).
    #[serde(default)]
    pub prompt: Option<String>,
    /// Text after the insertion point: not supported.
    #[serde(default)]
    pub suffix: Option<String>,
    /// System prompt (replaces the Modelfile's).
    #[serde(default)]
    pub system: Option<String>,
    /// A Go prompt template: not supported (the GGUF's chat template is used).
    #[serde(default)]
    pub template: Option<String>,
    /// Token ids returned by an earlier `/api/generate`: the conversation so far.
    #[serde(default)]
    pub context: Option<Vec<u32>>,
    /// Send the prompt as is, without the chat template.
    #[serde(default)]
    pub raw: Option<bool>,
    /// Base64 images: refused.
    #[serde(default)]
    pub images: Option<Vec<Value>>,
    /// `"json"` or a JSON schema.
    #[serde(default)]
    pub format: Option<Value>,
    /// Model options.
    #[serde(default)]
    pub options: Option<Map<String, Value>>,
    /// Stream NDJSON (default true).
    #[serde(default)]
    pub stream: Option<bool>,
    /// How long the model stays loaded.
    #[serde(default)]
    pub keep_alive: Option<Value>,
    /// Thinking on/off.
    #[serde(default)]
    pub think: Option<Value>,
}

/// `input` of `/api/embed`: one text or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum EmbedInput {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
}

/// `POST /api/embed`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaEmbedRequest {
    /// The model.
    #[serde(alias = "name")]
    pub model: String,
    /// Text(s) to embed.
    pub input: EmbedInput,
    /// Truncate inputs to the context (default true; ours always refuse an over-long input).
    #[serde(default)]
    pub truncate: Option<bool>,
    /// Model options (ignored).
    #[serde(default)]
    pub options: Option<Map<String, Value>>,
    /// How long the model stays loaded.
    #[serde(default)]
    pub keep_alive: Option<Value>,
    /// Keep only the first this many dimensions (then L2-normalise again).
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// `POST /api/embeddings` (the older endpoint).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaEmbeddingsRequest {
    /// The model.
    #[serde(alias = "name")]
    pub model: String,
    /// The text.
    pub prompt: String,
    /// Model options (ignored).
    #[serde(default)]
    pub options: Option<Map<String, Value>>,
    /// How long the model stays loaded.
    #[serde(default)]
    pub keep_alive: Option<Value>,
}

/// `POST /api/show`, `DELETE /api/delete`: names one model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaModelRef {
    /// The model.
    #[serde(alias = "name")]
    pub model: String,
    /// `/api/show`: include large metadata arrays.
    #[serde(default)]
    pub verbose: Option<bool>,
}

/// `POST /api/pull`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaPullRequest {
    /// `hf.co/{owner}/{repo}[:{quant}]` (also `huggingface.co/…`).
    #[serde(alias = "name")]
    pub model: String,
    /// Stream progress (default true).
    #[serde(default)]
    pub stream: Option<bool>,
    /// Ignored.
    #[serde(default)]
    pub insecure: Option<bool>,
}

/// `POST /api/copy`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OllamaCopyRequest {
    /// An existing model.
    pub source: String,
    /// The new name.
    pub destination: String,
}

/// A pull name `hf.co/{owner}/{repo}[:{quant}]`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfName {
    /// `owner/repo`.
    pub repo_id: String,
    /// The quantization tag (`Q4_K_M`), `None` for `:latest` or none (the hub's default choice).
    pub quant: Option<String>,
}

/// Splits a pull name.
///
/// Errors: a name that is not `hf.co/{owner}/{repo}[:{tag}]` (Ollama's own registry is not reachable:
/// only Hugging Face repositories can be pulled).
pub fn parse_hf_name(name: &str) -> Result<HfName, TranslateError> {
    let rest = ["hf.co/", "huggingface.co/", "https://hf.co/", "https://huggingface.co/"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .ok_or_else(|| {
            bad(format!(
                "cannot pull {name:?}: only Hugging Face GGUF repositories can be pulled, named \
                 hf.co/{{owner}}/{{repo}}[:{{quantization}}] (e.g. hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M)"
            ))
        })?;
    let (repo, tag) = match rest.rsplit_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (rest, None),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad(format!(
            "cannot pull {name:?}: expected hf.co/{{owner}}/{{repo}}[:{{quantization}}]"
        )));
    }
    let quant = tag
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("latest"))
        .map(str::to_owned);
    Ok(HfName {
        repo_id: repo.to_owned(),
        quant,
    })
}

/// Our catalogue name for an Ollama model name: a `:latest` tag is dropped (Ollama adds it to names
/// without a tag).
pub fn strip_latest(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// `format`: `""`/null = none, `"json"` = any JSON object, an object = a JSON schema.
///
/// Errors: another string or type.
pub fn response_format(format: Option<&Value>) -> Result<Option<ResponseFormat>, TranslateError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(ResponseFormat {
            kind: "json_object".into(),
            json_schema: None,
            schema: None,
        })),
        Some(Value::Object(_)) => Ok(Some(ResponseFormat {
            kind: "json_schema".into(),
            json_schema: Some(JsonSchemaFormat {
                name: Some("ollama_format".into()),
                description: None,
                schema: format.cloned(),
                strict: None,
            }),
            schema: None,
        })),
        Some(other) => Err(bad(format!(
            "invalid format {other}: expected \"json\" or a JSON schema object"
        ))),
    }
}

fn opt_f32(o: &Map<String, Value>, k: &str) -> Result<Option<f32>, TranslateError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| bad(format!("option {k:?} must be a number, got {v}"))),
    }
}

fn opt_i64(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, TranslateError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| bad(format!("option {k:?} must be an integer, got {v}"))),
    }
}

/// `options` mapped onto our sampling fields, and `num_predict` as the token limit (negative = none).
/// Options about loading (`num_ctx`, `num_gpu`, `num_thread`, …) are per worker here, set in the
/// admin UI, and ignored per request, as Ollama ignores options a runner does not know.
///
/// Errors: a sampling option of the wrong type.
pub fn sampling(
    options: Option<&Map<String, Value>>,
) -> Result<(SamplingFields, Option<u32>), TranslateError> {
    let mut s = SamplingFields::default();
    let Some(o) = options else {
        return Ok((s, None));
    };
    s.temperature = opt_f32(o, "temperature")?;
    s.top_p = opt_f32(o, "top_p")?;
    s.min_p = opt_f32(o, "min_p")?;
    s.top_k = opt_i64(o, "top_k")?.map(|k| k.clamp(0, i64::from(i32::MAX)) as i32);
    s.seed = opt_i64(o, "seed")?;
    s.repeat_penalty = opt_f32(o, "repeat_penalty")?;
    s.repeat_last_n = opt_i64(o, "repeat_last_n")?.map(|k| k.clamp(-1, i64::from(i32::MAX)) as i32);
    s.presence_penalty = opt_f32(o, "presence_penalty")?;
    s.frequency_penalty = opt_f32(o, "frequency_penalty")?;
    match o.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(x)) => s.stop = Some(StopSpec::One(x.clone())),
        Some(Value::Array(a)) => {
            let v = a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("option \"stop\" must hold strings, got {x}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            s.stop = Some(StopSpec::Many(v));
        }
        Some(v) => {
            return Err(bad(format!(
                "option \"stop\" must be a list of strings, got {v}"
            )));
        }
    }
    let max = opt_i64(o, "num_predict")?
        .filter(|n| *n >= 0)
        .map(|n| n.min(i64::from(u32::MAX)) as u32);
    Ok((s, max))
}

/// Refuses images with a clear message (our engine has no vision projector support).
///
/// Errors: when `images` holds any.
pub fn refuse_images(images: Option<&Vec<Value>>, model: &str) -> Result<(), TranslateError> {
    if images.is_some_and(|v| !v.is_empty()) {
        return Err(bad(format!(
            "images are not supported: model {model:?} cannot read images (this server runs text models only)"
        )));
    }
    Ok(())
}

fn role(r: &str, i: usize) -> Result<Role, TranslateError> {
    Ok(match r {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(bad(format!(
                "messages[{i}]: invalid role {other:?} (system, user, assistant or tool)"
            )));
        }
    })
}

/// Ollama messages as ours: tool calls' object arguments become JSON strings, `tool_name` the tool
/// message's name.
///
/// Errors: an unknown role, images.
pub fn messages(msgs: &[OllamaMessage], model: &str) -> Result<Vec<ChatMessage>, TranslateError> {
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        refuse_images(m.images.as_ref(), model)?;
        let role = role(&m.role, i)?;
        let tool_calls = m
            .tool_calls
            .as_ref()
            .filter(|c| !c.is_empty())
            .map(|calls| {
                Value::Array(
                    calls
                        .iter()
                        .enumerate()
                        .map(|(j, c)| {
                            let args = match &c.function.arguments {
                                Value::String(s) => s.clone(),
                                Value::Null => "{}".into(),
                                v => v.to_string(),
                            };
                            json!({"id": format!("call_{i}_{j}"), "type": "function",
                               "function": {"name": c.function.name, "arguments": args}})
                        })
                        .collect(),
                )
            });
        out.push(ChatMessage {
            role,
            content: m.content.clone().map(MessageContent::Text),
            name: if role == Role::Tool {
                m.tool_name.clone()
            } else {
                None
            },
            tool_call_id: None,
            tool_calls,
            reasoning_content: m.thinking.clone().filter(|t| !t.is_empty()),
        });
    }
    Ok(out)
}

fn think_kwargs(think: Option<&Value>) -> Option<Map<String, Value>> {
    let on = match think? {
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty() && s != "false",
        _ => return None,
    };
    let mut m = Map::new();
    m.insert("enable_thinking".into(), Value::Bool(on));
    Some(m)
}

/// `/api/chat` as our streamed chat request (we always stream from the worker, with usage, and
/// aggregate for a non-streamed reply).
///
/// Errors: as [`messages`], [`sampling`], [`response_format`].
pub fn chat_request(r: &OllamaChatRequest) -> Result<ChatCompletionRequest, TranslateError> {
    let (mut sampling, max_tokens) = sampling(r.options.as_ref())?;
    sampling.stream = Some(true);
    sampling.stream_options = Some(StreamOptions {
        include_usage: true,
    });
    Ok(ChatCompletionRequest {
        model: Some(r.model.clone()),
        messages: messages(&r.messages, &r.model)?,
        max_tokens,
        max_completion_tokens: None,
        logprobs: None,
        top_logprobs: None,
        tools: r.tools.clone().filter(|t| !t.is_empty()),
        tool_choice: None,
        parallel_tool_calls: None,
        reasoning_format: None,
        chat_template_kwargs: think_kwargs(r.think.as_ref()),
        sampling,
        structured: StructuredFields {
            response_format: response_format(r.format.as_ref())?,
            json_schema: None,
            grammar: None,
        },
    })
}

/// The messages `/api/generate` renders through the chat template (`system`, then the prompt).
///
/// Errors: images, `template`/`suffix` (not supported).
pub fn generate_messages(r: &OllamaGenerateRequest) -> Result<Vec<ChatMessage>, TranslateError> {
    check_generate(r)?;
    let mut v = Vec::new();
    if let Some(s) = r.system.as_ref().filter(|s| !s.is_empty()) {
        v.push(text_message(Role::System, s));
    }
    v.push(text_message(Role::User, r.prompt.as_deref().unwrap_or("")));
    Ok(v)
}

/// What `/api/generate` cannot do, refused clearly.
///
/// Errors: images, a Go `template`, a `suffix`.
pub fn check_generate(r: &OllamaGenerateRequest) -> Result<(), TranslateError> {
    refuse_images(r.images.as_ref(), &r.model)?;
    if r.template.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(bad(
            "\"template\" is not supported: the model's own chat template (from its GGUF) is used; send raw: true with a prompt you formatted yourself",
        ));
    }
    if r.suffix.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(bad(
            "\"suffix\" (fill-in-the-middle) is not supported by this server",
        ));
    }
    Ok(())
}

fn text_message(role: Role, text: &str) -> ChatMessage {
    ChatMessage {
        role,
        content: Some(MessageContent::Text(text.to_owned())),
        name: None,
        tool_call_id: None,
        tool_calls: None,
        reasoning_content: None,
    }
}

/// `/api/generate` as our streamed text completion of `prompt` (token ids: the context plus the new
/// prompt's tokens).
///
/// Errors: as [`sampling`], [`response_format`].
pub fn completion_request(
    r: &OllamaGenerateRequest,
    prompt: Vec<u32>,
) -> Result<CompletionRequest, TranslateError> {
    let (mut sampling, max_tokens) = sampling(r.options.as_ref())?;
    sampling.stream = Some(true);
    sampling.stream_options = Some(StreamOptions {
        include_usage: true,
    });
    Ok(CompletionRequest {
        model: Some(r.model.clone()),
        prompt: PromptInput::Tokens(prompt),
        max_tokens,
        echo: None,
        logprobs: None,
        suffix: None,
        sampling,
        structured: StructuredFields {
            response_format: response_format(r.format.as_ref())?,
            json_schema: None,
            grammar: None,
        },
    })
}

/// Ollama's `done_reason`.
pub fn done_reason(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// Counters of the final object (nanoseconds and token counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whole request.
    pub total_ns: u64,
    /// Waiting for the model to load.
    pub load_ns: u64,
    /// Prompt tokens.
    pub prompt_eval_count: u32,
    /// Until the first token.
    pub prompt_eval_ns: u64,
    /// Generated tokens.
    pub eval_count: u32,
    /// From the first token to the end.
    pub eval_ns: u64,
}

impl Stats {
    fn put(&self, o: &mut Map<String, Value>) {
        o.insert("total_duration".into(), json!(self.total_ns));
        o.insert("load_duration".into(), json!(self.load_ns));
        o.insert("prompt_eval_count".into(), json!(self.prompt_eval_count));
        o.insert("prompt_eval_duration".into(), json!(self.prompt_eval_ns));
        o.insert("eval_count".into(), json!(self.eval_count));
        o.insert("eval_duration".into(), json!(self.eval_ns));
    }
}

/// Our tool calls as Ollama's (arguments parsed into an object; text that is not JSON is kept as a
/// string).
pub fn tool_calls(calls: &[ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let args = serde_json::from_str::<Value>(&c.function.arguments)
                .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
            json!({"id": c.id, "function": {"index": i, "name": c.function.name, "arguments": args}})
        })
        .collect()
}

/// One `/api/chat` object: an NDJSON line of the stream (`done: false`) or, with `final_`, the last
/// one (or the whole non-streamed reply) with `done_reason` and the counters.
pub fn chat_object(
    model: &str,
    created_at: &str,
    content: &str,
    thinking: &str,
    calls: &[ToolCall],
    final_: Option<(Option<FinishReason>, &Stats)>,
) -> Value {
    let mut msg = Map::new();
    msg.insert("role".into(), json!("assistant"));
    msg.insert("content".into(), json!(content));
    if !thinking.is_empty() {
        msg.insert("thinking".into(), json!(thinking));
    }
    if !calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(tool_calls(calls)));
    }
    let mut o = Map::new();
    o.insert("model".into(), json!(model));
    o.insert("created_at".into(), json!(created_at));
    o.insert("message".into(), Value::Object(msg));
    o.insert("done".into(), json!(final_.is_some()));
    if let Some((f, stats)) = final_ {
        o.insert("done_reason".into(), json!(done_reason(f)));
        stats.put(&mut o);
    }
    Value::Object(o)
}

/// One `/api/generate` object: a stream line, or with `final_` the last one with `context` (the
/// conversation as token ids, to send back with the next prompt) and the counters.
pub fn generate_object(
    model: &str,
    created_at: &str,
    response: &str,
    final_: Option<(Option<FinishReason>, &Stats, &[u32])>,
) -> Value {
    let mut o = Map::new();
    o.insert("model".into(), json!(model));
    o.insert("created_at".into(), json!(created_at));
    o.insert("response".into(), json!(response));
    o.insert("done".into(), json!(final_.is_some()));
    if let Some((f, stats, ctx)) = final_ {
        o.insert("done_reason".into(), json!(done_reason(f)));
        o.insert("context".into(), json!(ctx));
        stats.put(&mut o);
    }
    Value::Object(o)
}

/// The answer to a request with nothing to generate (an empty prompt or message list): the model was
/// loaded (`done_reason: "load"`) or, with `keep_alive: 0`, unloaded (`"unload"`).
pub fn load_object(model: &str, created_at: &str, unloaded: bool, chat: bool) -> Value {
    let reason = if unloaded { "unload" } else { "load" };
    if chat {
        json!({"model": model, "created_at": created_at,
               "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": reason})
    } else {
        json!({"model": model, "created_at": created_at, "response": "", "done": true,
               "done_reason": reason})
    }
}

/// Keeps the first `dims` components of each (L2-normalised) vector and normalises them again.
///
/// Errors: `dims` of 0 or more than the model's width.
pub fn truncate_dims(vectors: &mut [Vec<f32>], dims: usize) -> Result<(), TranslateError> {
    for v in vectors.iter_mut() {
        if dims == 0 || dims > v.len() {
            return Err(bad(format!(
                "invalid dimensions {dims}: the model's embeddings have {} dimensions",
                v.len()
            )));
        }
        v.truncate(dims);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
    }
    Ok(())
}

/// Ollama's `parameter_size`: `135M`, `1.7B`, `7.2B` (one decimal when under 10 of the unit).
pub fn parameter_size(n: u64) -> String {
    let (v, unit) = if n >= 1_000_000_000 {
        (n as f64 / 1e9, "B")
    } else if n >= 1_000_000 {
        (n as f64 / 1e6, "M")
    } else {
        (n as f64 / 1e3, "K")
    };
    if v < 10.0 {
        format!("{:.1}{unit}", v)
    } else {
        format!("{:.0}{unit}", v)
    }
}

/// The `details` object of tags, ps and show.
pub fn details(architecture: Option<&str>, parameters: Option<i64>, quant: Option<&str>) -> Value {
    let fam = architecture.unwrap_or("");
    json!({
        "parent_model": "", "format": "gguf", "family": fam,
        "families": if fam.is_empty() { Value::Null } else { json!([fam]) },
        "parameter_size": parameters.map(|p| parameter_size(p.max(0) as u64)).unwrap_or_default(),
        "quantization_level": quant.unwrap_or(""),
    })
}

/// Modelfile `PARAMETER` lines (`/api/show`'s `parameters`): the model's default sampling fields.
pub fn modelfile_parameters(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<30} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_numbers_and_durations() {
        assert_eq!(parse_keep_alive(&json!(0)).unwrap(), KeepAlive::Unload);
        assert_eq!(parse_keep_alive(&json!("0")).unwrap(), KeepAlive::Unload);
        assert_eq!(parse_keep_alive(&json!(-1)).unwrap(), KeepAlive::Forever);
        assert_eq!(parse_keep_alive(&json!("-1m")).unwrap(), KeepAlive::Forever);
        assert_eq!(
            parse_keep_alive(&json!("5m")).unwrap(),
            KeepAlive::For(Duration::from_secs(300))
        );
        assert_eq!(
            parse_keep_alive(&json!("1h30m")).unwrap(),
            KeepAlive::For(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_keep_alive(&json!(3600)).unwrap(),
            KeepAlive::For(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_keep_alive(&json!("300ms")).unwrap(),
            KeepAlive::For(Duration::from_millis(300))
        );
        assert!(parse_keep_alive(&json!("5 minutes")).is_err());
        assert!(parse_keep_alive(&json!(true)).is_err());
        assert!(parse_keep_alive(&json!("")).is_err());
    }

    #[test]
    fn chat_example_from_the_api_docs_with_options_and_schema_format() {
        // docs/api.md: "Chat request (Structured outputs)" with the "Request with options" fields.
        let r: OllamaChatRequest = serde_json::from_value(json!({
            "model": "llama3.1",
            "messages": [{"role": "user", "content": "Ollama is 22 years old and busy saving the world. Return a JSON object with the age and availability."}],
            "stream": false,
            "format": {"type": "object", "properties": {"age": {"type": "integer"}, "available": {"type": "boolean"}},
                       "required": ["age", "available"]},
            "options": {"temperature": 0, "num_predict": 100, "top_k": 20, "top_p": 0.9, "seed": 42,
                        "stop": ["\n", "user:"], "repeat_penalty": 1.2, "num_ctx": 1024, "num_thread": 8},
            "keep_alive": "10m"
        }))
        .unwrap();
        let c = chat_request(&r).unwrap();
        assert_eq!(c.max_tokens, Some(100));
        assert_eq!(c.sampling.temperature, Some(0.0));
        assert_eq!(c.sampling.top_k, Some(20));
        assert_eq!(c.sampling.seed, Some(42));
        assert_eq!(c.sampling.repeat_penalty, Some(1.2));
        assert_eq!(
            c.sampling.stop,
            Some(StopSpec::Many(vec!["\n".into(), "user:".into()]))
        );
        assert_eq!(
            c.sampling.stream,
            Some(true),
            "always streamed from the worker"
        );
        let rf = c.structured.response_format.unwrap();
        assert_eq!(rf.kind, "json_schema");
        assert_eq!(
            rf.json_schema.unwrap().schema.unwrap()["required"],
            json!(["age", "available"])
        );
        assert_eq!(c.messages[0].role, Role::User);
        // The worker's own request type reads what we send.
        let wire = serde_json::to_value(chat_request(&r).unwrap()).unwrap();
        let back: ChatCompletionRequest = serde_json::from_value(wire).unwrap();
        assert_eq!(back.max_tokens, Some(100));
    }

    #[test]
    fn format_json_tools_and_tool_messages() {
        assert_eq!(
            response_format(Some(&json!("json"))).unwrap().unwrap().kind,
            "json_object"
        );
        assert_eq!(response_format(Some(&json!(""))).unwrap(), None);
        assert!(response_format(Some(&json!("yaml"))).is_err());
        // docs/api.md "Chat request (with history, with tools)": an assistant turn with a call, then the
        // tool's answer.
        let r: OllamaChatRequest = serde_json::from_value(json!({
            "model": "llama3.2",
            "messages": [
                {"role": "user", "content": "What is the weather today in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_current_weather",
                    "arguments": {"location": "Paris, FR", "format": "celsius"}}}]},
                {"role": "tool", "content": "22 degrees", "tool_name": "get_current_weather"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_current_weather",
                "description": "Get the current weather for a location",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]
        }))
        .unwrap();
        assert_eq!(r.stream, None, "absent = streamed (the default)");
        let c = chat_request(&r).unwrap();
        assert_eq!(c.tools.as_ref().unwrap().len(), 1);
        let calls = c.messages[1].tool_calls.as_ref().unwrap();
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["location"], "Paris, FR");
        assert_eq!(c.messages[2].role, Role::Tool);
        assert_eq!(c.messages[2].name.as_deref(), Some("get_current_weather"));
        let bad_role: OllamaChatRequest = serde_json::from_value(
            json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
        )
        .unwrap();
        assert!(chat_request(&bad_role).unwrap_err().0.contains("robot"));
    }

    #[test]
    fn images_template_and_suffix_are_refused_clearly() {
        let r: OllamaGenerateRequest = serde_json::from_value(json!({
            "model": "llava", "prompt": "What is in this picture?", "stream": false,
            "images": ["iVBORw0KGgoAAAANSUhEUgAAAG0AAABmCAYAAADBPx+VAAAACXBIWXMAAAsTAAALEwEAmpwYAAAAAXNSR0IArs4c6QAAAARnQU1BAACxjwv8YQUAAA3VSURBVHgB7Z27r8TGFca/"]
        }))
        .unwrap();
        let e = generate_messages(&r).unwrap_err();
        assert!(e.0.contains("images are not supported"), "{e}");
        let chat: OllamaChatRequest = serde_json::from_value(json!({"model": "llava",
            "messages": [{"role": "user", "content": "what is in this image?", "images": ["aGVsbG8="]}]}))
        .unwrap();
        assert!(chat_request(&chat).is_err());
        let t: OllamaGenerateRequest = serde_json::from_value(
            json!({"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}),
        )
        .unwrap();
        assert!(check_generate(&t).unwrap_err().0.contains("template"));
        let s: OllamaGenerateRequest = serde_json::from_value(
            json!({"model": "codellama:code", "prompt": "def compute_gcd(a, b):", "suffix": "    return result"}),
        )
        .unwrap();
        assert!(check_generate(&s).unwrap_err().0.contains("suffix"));
    }

    #[test]
    fn generate_example_system_prompt_and_token_prompt() {
        let r: OllamaGenerateRequest = serde_json::from_value(json!({
            "model": "llama3.2", "prompt": "Why is the sky blue?", "system": "Be brief.",
            "context": [1, 2, 3], "options": {"num_predict": -1, "temperature": 0.8}
        }))
        .unwrap();
        let m = generate_messages(&r).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, Role::System);
        let c = completion_request(&r, vec![1, 2, 3, 4]).unwrap();
        assert_eq!(c.prompt, PromptInput::Tokens(vec![1, 2, 3, 4]));
        assert_eq!(c.max_tokens, None, "num_predict -1 = no limit");
        assert!(sampling(Some(json!({"temperature": "hot"}).as_object().unwrap())).is_err());
    }

    #[test]
    fn reply_objects_have_ollamas_shape() {
        let stats = Stats {
            total_ns: 10,
            load_ns: 1,
            prompt_eval_count: 26,
            prompt_eval_ns: 2,
            eval_count: 290,
            eval_ns: 7,
        };
        let line = chat_object(
            "m",
            "2023-08-04T08:52:19.385406455-07:00",
            "The",
            "",
            &[],
            None,
        );
        assert_eq!(
            line,
            json!({"model": "m", "created_at": "2023-08-04T08:52:19.385406455-07:00",
                   "message": {"role": "assistant", "content": "The"}, "done": false})
        );
        let calls = vec![ToolCall {
            id: "call_0".into(),
            kind: "function".into(),
            function: super::super::FunctionCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Tokyo\"}".into(),
            },
        }];
        let last = chat_object(
            "m",
            "t",
            "",
            "",
            &calls,
            Some((Some(FinishReason::ToolCalls), &stats)),
        );
        assert_eq!(last["done"], true);
        assert_eq!(last["done_reason"], "stop");
        assert_eq!(last["eval_count"], 290);
        assert_eq!(last["prompt_eval_count"], 26);
        assert_eq!(
            last["message"]["tool_calls"][0]["function"]["arguments"]["city"],
            "Tokyo"
        );
        let g = generate_object(
            "m",
            "t",
            "",
            Some((Some(FinishReason::Length), &stats, &[1, 2])),
        );
        assert_eq!(g["done_reason"], "length");
        assert_eq!(g["context"], json!([1, 2]));
        assert_eq!(load_object("m", "t", true, false)["done_reason"], "unload");
    }

    #[test]
    fn names_sizes_and_dimensions() {
        assert_eq!(
            parse_hf_name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M").unwrap(),
            HfName {
                repo_id: "bartowski/Llama-3.2-1B-Instruct-GGUF".into(),
                quant: Some("Q4_K_M".into())
            }
        );
        assert_eq!(
            parse_hf_name("huggingface.co/a/b:latest").unwrap().quant,
            None
        );
        assert!(parse_hf_name("llama3.2").is_err());
        assert!(parse_hf_name("hf.co/only-owner").is_err());
        assert_eq!(strip_latest("smol:latest"), "smol");
        assert_eq!(parameter_size(134_515_008), "135M");
        assert_eq!(parameter_size(1_711_376_384), "1.7B");
        assert_eq!(parameter_size(8_030_261_248), "8.0B");
        let mut v = vec![vec![0.6, 0.0, 0.8]];
        truncate_dims(&mut v, 2).unwrap();
        assert_eq!(v[0], vec![1.0, 0.0]);
        assert!(truncate_dims(&mut v, 5).is_err());
        let d = details(Some("llama"), Some(134_515_008), Some("Q4_1"));
        assert_eq!(d["families"], json!(["llama"]));
        assert_eq!(d["quantization_level"], "Q4_1");
    }
}
