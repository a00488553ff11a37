//! The chat-specific part of `/v1/chat/completions` kept out of the HTTP handler: validating
//! `tools` / `tool_choice` / `reasoning_format`, rendering the prompt with them, and turning the
//! generated text into OpenAI's `message` (content, `reasoning_content`, `tool_calls`) or, while
//! streaming, into `delta`s — through the template family's parser in `engine::chat::tools`
//! (llama-server's `common_chat_templates_apply` + `common_chat_parse`, commit 0c1e570).

use serde_json::{Map, Value, json};

use super::backend::{BackendError, ChatOptions, Codec};
use super::error::ApiError;
use crate::engine::chat::reasoning::{self, KNOWN_MARKERS, ReasoningFormat};
use crate::engine::chat::tools::{
    self, ParsedReply, ReplyDelta, ReplySyntax, ToolFormat, forced_call_grammar,
};
use crate::openai::{
    AssistantMessage, ChatCompletionRequest, ChatMessage, FinishReason, FunctionCall,
    FunctionCallChunk, ToolCall, ToolCallChunk, ToolChoice,
};

/// How one chat request is rendered and its replies read.
#[derive(Debug, Clone)]
pub struct ChatPlan {
    /// The rendered prompt.
    pub prompt: String,
    /// How to parse the reply.
    pub syntax: ReplySyntax,
    /// A Lark grammar (llguidance) the reply must follow: set for `tool_choice: "required"` or a
    /// named function, so the reply is always a call of a given tool with valid arguments.
    pub grammar: Option<String>,
}

/// llama.cpp's generic tool instructions for templates without a call format of their own
/// (`common_chat_params_init_generic` and minja's tool polyfill).
fn generic_instructions(tools: &[Value]) -> String {
    format!(
        "You can call any of the following tools to satisfy the user's requests: {}\n\n\
         Respond in JSON format, either with `tool_call` (a request to call tools) or with \
         `response` reply to the user's request",
        Value::Array(tools.to_vec())
    )
}

/// Adds `text` to the system message (first message), creating one when there is none.
fn add_system(messages: &mut Vec<Value>, text: &str) {
    if let Some(first) = messages.first_mut()
        && first["role"] == "system"
    {
        let c = first["content"].as_str().unwrap_or("").to_string();
        first["content"] = json!(if c.is_empty() {
            text.to_string()
        } else {
            format!("{c}\n\n{text}")
        });
        return;
    }
    messages.insert(0, json!({"role": "system", "content": text}));
}

/// Messages as the chat template sees them: role, content as one string; `name`, `tool_call_id`,
/// `tool_calls` and `reasoning_content` passed through.
///
/// Errors: an empty conversation, a non-text content part (400).
pub fn template_messages(messages: &[ChatMessage]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad(
            "'messages' must contain at least one message",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let text = m
                .text(i)
                .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
            let mut v = json!({"role": m.role.template_name(), "content": text});
            if let Some(n) = &m.name {
                v["name"] = json!(n);
            }
            if let Some(id) = &m.tool_call_id {
                v["tool_call_id"] = json!(id);
            }
            if let Some(tc) = &m.tool_calls {
                v["tool_calls"] = tc.clone();
            }
            if let Some(r) = &m.reasoning_content {
                v["reasoning_content"] = json!(r);
            }
            Ok(v)
        })
        .collect()
}

/// Maps a rendering failure to the client's error (a template exception is the client's 400).
pub fn render_error(e: BackendError) -> ApiError {
    match e {
        BackendError::Template(m) => ApiError::bad(format!("chat template: {m}"), Some("messages")),
        BackendError::NoTemplate => {
            ApiError::bad("this model has no chat template; use /v1/completions", None)
        }
        other => ApiError::Internal(other.to_string()),
    }
}

/// What `tool_choice` asks for.
enum Choice {
    Auto,
    None,
    Required,
    Named(String),
}

fn tool_choice(req: &ChatCompletionRequest, tools: &[Value]) -> Result<Choice, ApiError> {
    let c = match &req.tool_choice {
        None => Choice::Auto,
        Some(ToolChoice::Mode(m)) => match m.as_str() {
            "auto" => Choice::Auto,
            "none" => Choice::None,
            "required" => Choice::Required,
            other => {
                return Err(ApiError::bad(
                    format!(
                        "'tool_choice' must be \"auto\", \"none\", \"required\" or \
                         {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {other:?}"
                    ),
                    Some("tool_choice"),
                ));
            }
        },
        Some(ToolChoice::Named(n)) => {
            if n.kind != "function" {
                return Err(ApiError::bad(
                    format!("'tool_choice.type' must be \"function\", got {:?}", n.kind),
                    Some("tool_choice"),
                ));
            }
            Choice::Named(n.function.name.clone())
        }
    };
    if tools.is_empty() && matches!(c, Choice::Required | Choice::Named(_)) {
        return Err(ApiError::bad(
            "'tool_choice' asks for a tool call but the request has no 'tools'",
            Some("tool_choice"),
        ));
    }
    for (i, t) in tools.iter().enumerate() {
        let ok = t.get("type").and_then(Value::as_str) == Some("function")
            && t.get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
        if !ok {
            return Err(ApiError::bad(
                format!(
                    "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": …, \"parameters\": …}}}}"
                ),
                Some("tools"),
            ));
        }
    }
    if let Choice::Named(name) = &c
        && !tools.iter().any(|t| t["function"]["name"] == name.as_str())
    {
        return Err(ApiError::bad(
            format!("'tool_choice' names the function {name:?}, which is not in 'tools'"),
            Some("tool_choice"),
        ));
    }
    Ok(c)
}

/// Validates the chat-specific fields of `req`, renders its prompt and decides how its replies
/// are read. `default_reasoning` is the worker's `--reasoning-format`.
///
/// Errors: 400 for bad `tools`, `tool_choice`, `reasoning_format`, `chat_template_kwargs`, or a
/// conversation the template refuses (its own message).
pub fn plan(
    codec: &dyn Codec,
    req: &ChatCompletionRequest,
    default_reasoning: ReasoningFormat,
) -> Result<ChatPlan, ApiError> {
    let tools = req.tools.clone().unwrap_or_default();
    let choice = tool_choice(req, &tools)?;
    let reasoning_format = match &req.reasoning_format {
        Some(s) => s
            .parse::<ReasoningFormat>()
            .map_err(|e| ApiError::bad(e, Some("reasoning_format")))?,
        None => default_reasoning,
    };
    let source = codec.info().chat_template.clone().unwrap_or_default();
    let format = ToolFormat::detect(&source);
    let use_tools = !tools.is_empty() && !matches!(choice, Choice::None);
    let mut messages = template_messages(&req.messages)?;
    if use_tools && format == ToolFormat::Generic {
        add_system(&mut messages, &generic_instructions(&tools));
    }
    let extra_context: Map<String, Value> = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(v) = extra_context.get("enable_thinking")
        && !v.is_boolean()
    {
        return Err(ApiError::bad(
            "'chat_template_kwargs.enable_thinking' must be a boolean",
            Some("chat_template_kwargs"),
        ));
    }
    let opts = ChatOptions {
        tools: use_tools.then(|| Value::Array(tools.clone())),
        extra_context,
    };
    let prompt = codec
        .render_chat_with(&messages, &opts)
        .map_err(render_error)?;
    let markers = match reasoning_format {
        ReasoningFormat::None => None,
        ReasoningFormat::Auto => reasoning::markers_in_template(&source),
        ReasoningFormat::Deepseek => {
            reasoning::markers_in_template(&source).or(Some(KNOWN_MARKERS[0]))
        }
    };
    let forced_open = markers.is_some_and(|m| reasoning::forced_open(&prompt, m));
    let syntax = ReplySyntax {
        format,
        parse_tool_calls: use_tools,
        reasoning: markers,
        thinking_forced_open: forced_open,
        // Set by the caller once it knows the request's constraint (a JSON response format).
        json_reply: false,
    };
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let grammar = match &choice {
        Choice::Required | Choice::Named(_) => {
            let only = match &choice {
                Choice::Named(n) => Some(n.as_str()),
                _ => None,
            };
            let think_end = if forced_open {
                markers.map(|m| m.end)
            } else {
                None
            };
            Some(
                forced_call_grammar(format, &tools, only, parallel, think_end)
                    .map_err(|e| ApiError::bad(e.to_string(), Some("tool_choice")))?,
            )
        }
        _ => None,
    };
    Ok(ChatPlan {
        prompt,
        syntax,
        grammar,
    })
}

fn new_call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

/// The ids of a reply's calls: the format's own, else fresh ones; stable across the stream.
#[derive(Debug, Default)]
struct CallIds(Vec<String>);

impl CallIds {
    fn get(&mut self, i: usize, own: Option<&str>) -> String {
        while self.0.len() <= i {
            let n = self.0.len();
            let id = if n == i {
                own.map(str::to_string)
            } else {
                None
            };
            self.0.push(id.unwrap_or_else(new_call_id));
        }
        self.0[i].clone()
    }
}

/// The final `message` and `finish_reason` of a non-streamed reply.
pub fn message(
    text: &str,
    syntax: &ReplySyntax,
    finish: FinishReason,
) -> (AssistantMessage, FinishReason) {
    let p = tools::parse_reply(text, syntax, false);
    let mut ids = CallIds::default();
    let calls: Vec<ToolCall> = p
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| ToolCall {
            id: ids.get(i, c.id.as_deref()),
            kind: "function".into(),
            function: FunctionCall {
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            },
        })
        .collect();
    let finish = if !calls.is_empty() && finish == FinishReason::Stop {
        FinishReason::ToolCalls
    } else {
        finish
    };
    let content = if calls.is_empty() || !p.content.is_empty() {
        Some(p.content)
    } else {
        None
    };
    (
        AssistantMessage {
            role: "assistant".into(),
            content,
            reasoning_content: (!p.reasoning_content.is_empty()).then_some(p.reasoning_content),
            tool_calls: (!calls.is_empty()).then_some(calls),
        },
        finish,
    )
}

/// The streaming side of one choice: the text so far, its last partial parse, the call ids.
#[derive(Debug)]
pub struct ReplyStream {
    syntax: ReplySyntax,
    text: String,
    prev: ParsedReply,
    ids: CallIds,
}

/// One streamed `delta`'s new parts.
#[derive(Debug, Default, PartialEq)]
pub struct DeltaParts {
    /// New content (`None`: nothing new).
    pub content: Option<String>,
    /// New reasoning.
    pub reasoning_content: Option<String>,
    /// New calls / argument fragments.
    pub tool_calls: Option<Vec<ToolCallChunk>>,
}

impl DeltaParts {
    /// Nothing new.
    pub fn is_empty(&self) -> bool {
        self.content.is_none() && self.reasoning_content.is_none() && self.tool_calls.is_none()
    }
}

impl ReplyStream {
    /// A stream read with `syntax`.
    pub fn new(syntax: ReplySyntax) -> ReplyStream {
        ReplyStream {
            syntax,
            text: String::new(),
            prev: ParsedReply::default(),
            ids: CallIds::default(),
        }
    }

    /// Whether any call was streamed (the finish reason is then `tool_calls`).
    pub fn has_calls(&self) -> bool {
        !self.prev.tool_calls.is_empty()
    }

    /// Adds generated text; returns what can be sent now.
    pub fn push(&mut self, text: &str) -> DeltaParts {
        self.text.push_str(text);
        self.advance(true)
    }

    /// The end of the reply: everything still held back.
    pub fn finish(&mut self) -> DeltaParts {
        self.advance(false)
    }

    fn advance(&mut self, partial: bool) -> DeltaParts {
        let cur = tools::parse_reply(&self.text, &self.syntax, partial);
        let d: ReplyDelta = tools::diff(&self.prev, &cur);
        self.prev = cur;
        let calls: Vec<ToolCallChunk> = d
            .tool_calls
            .into_iter()
            .map(|c| match c.name {
                Some(name) => ToolCallChunk {
                    index: c.index as u32,
                    id: Some(self.ids.get(c.index, c.id.as_deref())),
                    kind: Some("function".into()),
                    function: FunctionCallChunk {
                        name: Some(name),
                        arguments: Some(c.arguments),
                    },
                },
                None => ToolCallChunk {
                    index: c.index as u32,
                    id: None,
                    kind: None,
                    function: FunctionCallChunk {
                        name: None,
                        arguments: Some(c.arguments),
                    },
                },
            })
            .collect();
        DeltaParts {
            content: (!d.content.is_empty()).then_some(d.content),
            reasoning_content: (!d.reasoning_content.is_empty()).then_some(d.reasoning_content),
            tool_calls: (!calls.is_empty()).then_some(calls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hermes() -> ReplySyntax {
        ReplySyntax {
            format: ToolFormat::Hermes,
            parse_tool_calls: true,
            reasoning: Some(KNOWN_MARKERS[0]),
            thinking_forced_open: false,
            json_reply: false,
        }
    }

    #[test]
    fn message_with_calls_has_null_content_and_tool_calls_finish() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>";
        let (m, fin) = message(text, &hermes(), FinishReason::Stop);
        assert_eq!(fin, FinishReason::ToolCalls);
        assert_eq!(m.content, None);
        let calls = m.tool_calls.unwrap();
        assert_eq!(calls[0].function.arguments, r#"{"x": 1}"#);
        assert!(calls[0].id.starts_with("call_"));
        let v = serde_json::to_value(&calls[0]).unwrap();
        assert_eq!(v["type"], "function");
        let (m, fin) = message("plain", &hermes(), FinishReason::Length);
        assert_eq!(
            (m.content.as_deref(), fin),
            (Some("plain"), FinishReason::Length)
        );
        assert!(m.tool_calls.is_none());
    }

    #[test]
    fn stream_sends_name_first_then_fragments() {
        let mut s = ReplyStream::new(hermes());
        let mut chunks = Vec::new();
        for piece in [
            "<think>hm</think>",
            "<tool_",
            "call>\n{\"name\": \"f\", ",
            "\"arguments\": {\"x\"",
            ": 1}}\n</tool_call>",
        ] {
            chunks.push(s.push(piece));
        }
        chunks.push(s.finish());
        assert_eq!(chunks[0].reasoning_content.as_deref(), Some("hm"));
        assert!(
            chunks[1].is_empty(),
            "a partial marker is held: {:?}",
            chunks[1]
        );
        let first = chunks[2].tool_calls.as_ref().unwrap();
        assert_eq!(first[0].function.name.as_deref(), Some("f"));
        assert!(first[0].id.is_some());
        let args: String = chunks
            .iter()
            .filter_map(|c| c.tool_calls.as_ref())
            .flatten()
            .filter_map(|c| c.function.arguments.clone())
            .collect();
        assert_eq!(args, r#"{"x": 1}"#);
        assert!(chunks.iter().all(|c| c.content.is_none()));
        assert!(s.has_calls());
    }

    #[test]
    fn system_instructions_are_merged() {
        let mut m = vec![json!({"role": "system", "content": "Be brief."})];
        add_system(&mut m, "X");
        assert_eq!(m[0]["content"], "Be brief.\n\nX");
        let mut m = vec![json!({"role": "user", "content": "hi"})];
        add_system(&mut m, "X");
        assert_eq!(m[0], json!({"role": "system", "content": "X"}));
    }
}
