//! OpenAI wire types (serde) and the error envelope, shared by the worker and the supervisor.
//!
//! These types know nothing about the engine: they describe the JSON that clients send and receive on
//! `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models` and llama-server's
//! `/tokenize` / `/detokenize`. Unknown request fields are ignored (clients send many we do not use);
//! a field of the wrong type is a deserialisation error that the server maps to a 400 envelope.

pub mod anthropic;
pub mod ollama;
pub mod responses;
pub mod stream;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The body of every error response: `{"error":{"message","type","param","code"}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// The error itself.
    pub error: ErrorBody,
}

/// OpenAI's error object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable explanation, safe to show to the client.
    pub message: String,
    /// Error class: `invalid_request_error`, `authentication_error`, `not_found_error`, `server_error`,
    /// `unavailable_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`invalid_api_key`, `context_length_exceeded`, ...), when one applies.
    pub code: Option<String>,
    /// llama-server's `exceed_context_size_error`: the prompt's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_prompt_tokens: Option<u64>,
    /// llama-server's `exceed_context_size_error`: the slot's context (tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_ctx: Option<u64>,
}

/// The classes of error the servers answer with; each maps to one HTTP status and one `type` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is malformed or cannot be served as asked.
    InvalidRequest,
    /// 401: missing or wrong API key.
    Authentication,
    /// 404: unknown route or object.
    NotFound,
    /// 500: a failure on our side (details are logged, not sent).
    Server,
    /// 503: not ready yet (loading) or shutting down.
    Unavailable,
    /// 400: the prompt does not fit the context (llama-server's `exceed_context_size_error`).
    ExceedContextSize,
    /// 501: the server or model cannot do this (llama-server's `not_supported_error`).
    NotSupported,
}

impl ErrorKind {
    /// The HTTP status code of this class.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Authentication => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::Server => 500,
            ErrorKind::Unavailable => 503,
            ErrorKind::ExceedContextSize => 400,
            ErrorKind::NotSupported => 501,
        }
    }

    /// The `type` string OpenAI uses for this class.
    pub fn type_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::Server => "server_error",
            ErrorKind::Unavailable => "unavailable_error",
            ErrorKind::ExceedContextSize => "exceed_context_size_error",
            ErrorKind::NotSupported => "not_supported_error",
        }
    }
}

impl ErrorEnvelope {
    /// Builds an envelope of class `kind`.
    pub fn new(
        kind: ErrorKind,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        ErrorEnvelope {
            error: ErrorBody {
                message: message.into(),
                kind: kind.type_str().to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
                n_prompt_tokens: None,
                n_ctx: None,
            },
        }
    }
}

/// `stop`: one string or a list of strings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// A single stop string.
    One(String),
    /// Several stop strings (OpenAI allows up to 4; we accept any number).
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings, empty ones removed.
    pub fn into_vec(self) -> Vec<String> {
        let v = match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        };
        v.into_iter().filter(|s| !s.is_empty()).collect()
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and empty `choices`) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and text completions. All optional; absent = llama.cpp's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingFields {
    /// Temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = off). llama.cpp extension.
    pub top_k: Option<i32>,
    /// Minimum probability relative to the best token. llama.cpp extension.
    pub min_p: Option<f32>,
    /// Seed of the random draw; same seed + same request = same answer.
    pub seed: Option<i64>,
    /// OpenAI presence penalty, in [-2, 2].
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty, in [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// llama.cpp repetition penalty (1 = off).
    pub repeat_penalty: Option<f32>,
    /// Tokens looked back for penalties (llama.cpp `repeat_last_n`).
    pub repeat_last_n: Option<i32>,
    /// Biases added to token logits: OpenAI's object (token id as a decimal string → bias) or
    /// llama-server's forms (text keys, `[[id, bias], ["text", bias]]`, `false` = ban); the worker
    /// validates it.
    pub logit_bias: Option<serde_json::Value>,
    /// Stop strings: generation ends before them, and they never appear in the output.
    pub stop: Option<StopSpec>,
    /// llama-server: prompt tokens kept when a context shift drops tokens (-1 = the whole prompt).
    pub n_keep: Option<i64>,
    /// llama-server: tokens a context shift drops after the kept ones (0 = half of the rest).
    pub n_discard: Option<i64>,
    /// Number of choices to generate (≥ 1).
    pub n: Option<u32>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Options of the stream.
    pub stream_options: Option<StreamOptions>,
}

/// Structured-output fields shared by chat and text completions: OpenAI's `response_format` and
/// llama-server's `json_schema` and `grammar` (GBNF). At most one of them may constrain a request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StructuredFields {
    /// `{"type":"text"}` (no constraint), `{"type":"json_object"}` (optionally with llama-server's
    /// `schema`) or `{"type":"json_schema","json_schema":{...}}`.
    pub response_format: Option<ResponseFormat>,
    /// llama-server: a JSON schema the output must follow.
    pub json_schema: Option<serde_json::Value>,
    /// llama-server: a GBNF grammar (or llguidance Lark, starting with `%llguidance`) the output must
    /// follow; empty = none.
    pub grammar: Option<String>,
}

/// `response_format`. The type is kept as a string so that an unknown one is our 400, not serde's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `json_schema`: the schema and its options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<JsonSchemaFormat>,
    /// llama-server extension: the schema of a `json_object` format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
}

/// `response_format.json_schema`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    /// The schema's name (OpenAI requires one; not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the format is for (not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema (absent = any JSON value, as llama-server takes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// Enforce the schema exactly, refusing keywords that cannot be (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Text content of a message: a string or an array of parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `{"type":"text","text":...}` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// Roles of chat messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt.
    System,
    /// Newer name for the system prompt (OpenAI o-series); rendered as `system`.
    Developer,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
}

impl Role {
    /// The role name the chat template sees (`developer` is shown to templates as `system`).
    pub fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A chat message of a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// What was said (absent or null for assistant messages that only call tools).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For `tool` messages: the call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `assistant` messages: tool calls made, passed to the template unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// For `assistant` messages: the reasoning of an earlier reply (llama-server's field), passed
    /// to the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

/// `tool_choice`: `"auto"`, `"none"`, `"required"`, or `{"type":"function","function":{"name"}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `auto` (the model decides), `none` (no calls) or `required` (at least one call).
    Mode(String),
    /// Call this function.
    Named(NamedToolChoice),
}

/// `tool_choice` naming one function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function to call.
    pub function: FunctionName,
}

/// `{"name": …}` of a named tool choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionName {
    /// The function's name.
    pub name: String,
}

/// A tool call of a reply: `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// `call_…`, unique within the reply.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The call.
    pub function: FunctionCall,
}

/// The function part of a tool call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments as a JSON string (as the model wrote them).
    pub arguments: String,
}

/// One entry of a streamed `delta.tool_calls`: the first for a call carries `id`, `type` and
/// `function.name`, later ones only `function.arguments` fragments to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallChunk {
    /// Position of the call in the reply.
    pub index: u32,
    /// The call's id (first chunk only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first chunk only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name and/or argument text.
    pub function: FunctionCallChunk,
}

/// The function part of a streamed tool-call entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallChunk {
    /// The function's name (first chunk only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Argument text to append.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// Why text content of a message cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("messages[{index}].content[{part}]: unsupported content part type '{kind}' (only 'text')")]
pub struct ContentError {
    /// Index of the message.
    pub index: usize,
    /// Index of the part.
    pub part: usize,
    /// The part's type.
    pub kind: String,
}

impl ChatMessage {
    /// The message's text: a string as is, text parts joined with nothing between them (as llama-server
    /// does). `index` is the message's position, for the error.
    ///
    /// Errors: a part whose type is not `text`.
    pub fn text(&self, index: usize) -> Result<String, ContentError> {
        match &self.content {
            None => Ok(String::new()),
            Some(MessageContent::Text(s)) => Ok(s.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut out = String::new();
                for (i, p) in parts.iter().enumerate() {
                    if p.kind != "text" {
                        return Err(ContentError {
                            index,
                            part: i,
                            kind: p.kind.clone(),
                        });
                    }
                    out.push_str(p.text.as_deref().unwrap_or(""));
                }
                Ok(out)
            }
        }
    }
}

/// `POST /v1/chat/completions` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model id; accepted whatever it names (responses report the server's alias).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation (must not be empty).
    pub messages: Vec<ChatMessage>,
    /// Deprecated name of `max_completion_tokens`.
    pub max_tokens: Option<u32>,
    /// Most tokens to generate.
    pub max_completion_tokens: Option<u32>,
    /// Return log-probabilities of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Also return this many most likely alternatives per position (0–20; needs `logprobs`).
    pub top_logprobs: Option<u32>,
    /// OpenAI function tools `[{"type":"function","function":{"name","description","parameters"}}]`,
    /// given to the chat template as they are.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Whether and which tool to call (default `auto` with tools).
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    /// Allow several calls in one reply (default true, as OpenAI).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// llama-server's `reasoning_format`: `none`, `deepseek`, `deepseek-legacy` or `auto`.
    #[serde(default)]
    pub reasoning_format: Option<String>,
    /// llama-server's extra template variables, e.g. `{"enable_thinking": false}`.
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// The sampling fields.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// The structured-output fields.
    #[serde(flatten)]
    pub structured: StructuredFields,
}

/// `prompt` of a text completion: a string, strings, a token array or token arrays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// Several text prompts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt, as text or as token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum OnePrompt {
    /// Text, to be tokenized by the server.
    Text(String),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

impl PromptInput {
    /// The individual prompts.
    pub fn into_prompts(self) -> Vec<OnePrompt> {
        match self {
            PromptInput::Text(s) => vec![OnePrompt::Text(s)],
            PromptInput::Texts(v) => v.into_iter().map(OnePrompt::Text).collect(),
            PromptInput::Tokens(t) => vec![OnePrompt::Tokens(t)],
            PromptInput::TokenLists(v) => v.into_iter().map(OnePrompt::Tokens).collect(),
        }
    }
}

/// `POST /v1/completions` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// Model id; accepted whatever it names.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt(s).
    pub prompt: PromptInput,
    /// Most tokens to generate; absent = until a stop or the end of the slot's context (as
    /// llama-server; OpenAI's default is 16).
    pub max_tokens: Option<u32>,
    /// Prepend the prompt to the returned text.
    pub echo: Option<bool>,
    /// Return this many most likely alternatives per generated token (0–5 in OpenAI; we allow 20).
    pub logprobs: Option<u32>,
    /// Text after the insertion point; ignored with a warning.
    pub suffix: Option<String>,
    /// The sampling fields.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// The structured-output fields.
    #[serde(flatten)]
    pub structured: StructuredFields,
}

/// `input` of an embeddings request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One token array.
    Tokens(Vec<u32>),
    /// Several token arrays.
    TokenLists(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// The individual inputs.
    pub fn into_prompts(self) -> Vec<OnePrompt> {
        match self {
            EmbeddingInput::Text(s) => vec![OnePrompt::Text(s)],
            EmbeddingInput::Texts(v) => v.into_iter().map(OnePrompt::Text).collect(),
            EmbeddingInput::Tokens(t) => vec![OnePrompt::Tokens(t)],
            EmbeddingInput::TokenLists(v) => v.into_iter().map(OnePrompt::Tokens).collect(),
        }
    }
}

/// `encoding_format` of embeddings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// JSON numbers.
    #[default]
    Float,
    /// Base64 of the little-endian f32 bytes.
    Base64,
}

/// `POST /v1/embeddings` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    /// Model id; accepted whatever it names.
    #[serde(default)]
    pub model: Option<String>,
    /// The text(s) to embed.
    pub input: EmbeddingInput,
    /// How vectors are written.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
}

/// Token counts of a response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt(s).
    pub prompt_tokens: u32,
    /// Tokens generated (all choices).
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
    /// Details of the prompt tokens (OpenAI's `prompt_tokens_details`); absent when not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`: how the prompt tokens were obtained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cache was reused from a slot's previous request (not evaluated again);
    /// llama-server reports the same number as `timings.cache_n`.
    pub cached_tokens: u32,
}

/// Why a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the end of the slot's context.
    Length,
    /// The reply is tool calls (`message.tool_calls`).
    ToolCalls,
}

/// A most-likely alternative of a chat token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's text (lossy UTF-8).
    pub token: String,
    /// Natural log-probability.
    pub logprob: f32,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
}

/// Log-probability of one generated chat token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text (lossy UTF-8).
    pub token: String,
    /// Natural log-probability of the token under the raw logits.
    pub logprob: f32,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives, best first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprob>,
}

/// The assistant message of a chat choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The generated text (`null` when the reply is only tool calls, as OpenAI).
    pub content: Option<String>,
    /// The model's thinking, when extracted (llama-server's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The calls the reply makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Index among the `n` choices.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// Log-probabilities when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// `POST /v1/chat/completions` response (non-streamed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix time (s).
    pub created: u64,
    /// The server's alias.
    pub model: String,
    /// Build identifier of the server.
    pub system_fingerprint: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The delta of a streamed chat chunk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New reasoning text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// New calls and argument fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallChunk>>,
}

/// One choice of a streamed chat chunk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Index among the `n` choices.
    pub index: u32,
    /// What is new.
    pub delta: ChatDelta,
    /// Log-probabilities of the tokens whose text this delta carries.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// A `chat.completion.chunk` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Same id in every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix time (s).
    pub created: u64,
    /// The server's alias.
    pub model: String,
    /// Build identifier of the server.
    pub system_fingerprint: String,
    /// Choices (empty in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the last chunk when `stream_options.include_usage`; `null` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `logprobs` of a text completion choice (the legacy shape).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities (`null` for echoed prompt tokens, which we do not score).
    pub token_logprobs: Vec<Option<f32>>,
    /// Per position: alternative text → log-probability (`null` for echoed prompt tokens).
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<u32>,
}

/// One choice of a text completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The text (with the prompt first when `echo`).
    pub text: String,
    /// Index: prompt index × n + choice index.
    pub index: u32,
    /// Log-probabilities when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Why it ended (`null` in intermediate stream chunks).
    pub finish_reason: Option<FinishReason>,
}

/// `POST /v1/completions` response, and each chunk of its stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// `cmpl-…`.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix time (s).
    pub created: u64,
    /// The server's alias.
    pub model: String,
    /// Build identifier of the server.
    pub system_fingerprint: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (absent in stream chunks except the usage one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// An embedding vector as floats or base64.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `[n_embd]` floats.
    Float(Vec<f32>),
    /// Base64 of the `[n_embd]` little-endian f32 bytes.
    Base64(String),
}

/// One embedding of a response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    /// The vector (L2-normalised).
    pub embedding: EmbeddingVector,
    /// Index of the input.
    pub index: u32,
}

/// Token counts of an embeddings response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Tokens of all inputs.
    pub prompt_tokens: u32,
    /// Same as `prompt_tokens`.
    pub total_tokens: u32,
}

/// `POST /v1/embeddings` response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: String,
    /// One per input, in order.
    pub data: Vec<Embedding>,
    /// The server's alias.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingUsage,
}

/// One model of `/v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelObject {
    /// The alias clients name it by.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix time (s) of the load.
    pub created: u64,
    /// Owner string.
    pub owned_by: String,
}

/// `GET /v1/models` response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelObject>,
}

/// `POST /tokenize` request (llama-server).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizeRequest {
    /// Text to tokenize.
    pub content: String,
    /// Add BOS/EOS as the vocabulary says (default false, as llama-server).
    #[serde(default)]
    pub add_special: bool,
    /// Parse special-token text such as `<|im_start|>` (default true, as llama-server).
    #[serde(default = "default_true")]
    pub parse_special: bool,
    /// Return `{id, piece}` objects instead of ids.
    #[serde(default)]
    pub with_pieces: bool,
}

fn default_true() -> bool {
    true
}

/// A token with its piece (`with_pieces`): the piece is a string, or byte values when not valid UTF-8.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenPiece {
    /// Token id.
    pub id: u32,
    /// Its text, or its bytes.
    pub piece: serde_json::Value,
}

/// `POST /detokenize` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeRequest {
    /// Token ids.
    pub tokens: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_has_openai_shape() {
        let e = ErrorEnvelope::new(ErrorKind::InvalidRequest, "bad", Some("messages"), None);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"message":"bad","type":"invalid_request_error","param":"messages","code":null}})
        );
        assert_eq!(ErrorKind::Authentication.status(), 401);
    }

    #[test]
    fn chat_request_accepts_string_and_parts() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"x","messages":[{"role":"system","content":"s"},
               {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
               {"role":"assistant","content":null,"tool_calls":[]},{"role":"tool","content":"r","tool_call_id":"1"}],
               "stop":"x","logit_bias":{"5":-100},"n":2,"unknown_field":1}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 4);
        assert_eq!(r.messages[1].text(1).unwrap(), "ab");
        assert_eq!(r.messages[2].text(2).unwrap(), "");
        assert_eq!(r.sampling.stop.clone().unwrap().into_vec(), vec!["x"]);
        assert_eq!(r.sampling.n, Some(2));
        assert_eq!(r.sampling.logit_bias.unwrap()["5"], -100.0);
    }

    #[test]
    fn wrong_field_type_is_an_error() {
        let r = serde_json::from_str::<ChatCompletionRequest>(
            r#"{"messages":[{"role":"user","content":"a"}],"temperature":"hot"}"#,
        );
        assert!(r.is_err());
        let r = serde_json::from_str::<ChatCompletionRequest>(r#"{"messages":"a"}"#);
        assert!(r.is_err());
    }

    #[test]
    fn image_part_is_rejected_with_position() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}"#,
        )
        .unwrap();
        let e = m.text(3).unwrap_err();
        assert_eq!(e.index, 3);
        assert!(e.to_string().contains("image_url"));
    }

    #[test]
    fn prompt_variants() {
        for (json, n) in [
            (r#""a""#, 1),
            (r#"["a","b"]"#, 2),
            (r#"[1,2,3]"#, 1),
            (r#"[[1],[2,3]]"#, 2),
        ] {
            let p: PromptInput = serde_json::from_str(json).unwrap();
            assert_eq!(p.into_prompts().len(), n, "{json}");
        }
        let p: PromptInput = serde_json::from_str("[1,2]").unwrap();
        assert_eq!(p.into_prompts(), vec![OnePrompt::Tokens(vec![1, 2])]);
    }

    #[test]
    fn chunk_omits_absent_fields() {
        let c = ChatCompletionChunk {
            id: "i".into(),
            object: "chat.completion.chunk".into(),
            created: 1,
            model: "m".into(),
            system_fingerprint: "f".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: Some("assistant".into()),
                    ..ChatDelta::default()
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["choices"][0]["delta"],
            serde_json::json!({"role":"assistant"})
        );
        assert!(v.get("usage").is_none());
    }
}
