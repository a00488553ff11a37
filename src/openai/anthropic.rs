//! Anthropic's Messages API (<https://docs.anthropic.com/en/api/messages>) translated to and from our
//! OpenAI types: the request (system, content blocks text / tool_use / tool_result / thinking, tools,
//! tool_choice, stop_sequences, max_tokens) to our chat request; our chat reply (folded from the
//! worker's stream) to a `message`; and the streamed chunks to Anthropic's event sequence
//! (`message_start`, `content_block_start`, `content_block_delta`, `content_block_stop`,
//! `message_delta`, `message_stop`). No I/O.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::stream::{ChatAccumulator, ChatStep};
use super::{
    ChatCompletionRequest, ChatMessage, FinishReason, FunctionName, MessageContent,
    NamedToolChoice, Role, SamplingFields, StopSpec, StreamOptions, StructuredFields, ToolChoice,
};

/// A request that cannot be translated: a 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TranslateError(pub String);

fn bad(m: impl Into<String>) -> TranslateError {
    TranslateError(m.into())
}

/// `system`: a string or text blocks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SystemPrompt {
    /// Plain text.
    Text(String),
    /// Text blocks.
    Blocks(Vec<Value>),
}

/// `content` of a message: a string or blocks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content blocks (`text`, `tool_use`, `tool_result`, `thinking`; `image` and `document` are
    /// refused).
    Blocks(Vec<Value>),
}

/// One message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: Content,
}

/// A tool: `{name, description, input_schema}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Tool {
    /// The tool's name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of its input.
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// `custom` (absent) for client tools; server tools (`web_search_…`) are refused.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AnthropicToolChoice {
    /// `auto`, `any`, `tool` or `none`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `tool`: which one.
    #[serde(default)]
    pub name: Option<String>,
    /// At most one call per reply.
    #[serde(default)]
    pub disable_parallel_tool_use: Option<bool>,
}

/// `POST /v1/messages` (and, without `max_tokens`, `/v1/messages/count_tokens`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessagesRequest {
    /// The model.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most tokens to generate (required by `/v1/messages`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// The system prompt.
    #[serde(default)]
    pub system: Option<SystemPrompt>,
    /// Strings that end the reply.
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    /// Stream events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Sampling temperature (0–1).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling.
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool to call.
    #[serde(default)]
    pub tool_choice: Option<AnthropicToolChoice>,
    /// `{"type": "enabled", "budget_tokens": N}` or `{"type": "disabled"}`.
    #[serde(default)]
    pub thinking: Option<Value>,
}

fn text_of_blocks(blocks: &[Value], what: &str) -> Result<String, TranslateError> {
    let mut out = String::new();
    for (i, b) in blocks.iter().enumerate() {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => out.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            other => {
                return Err(bad(format!(
                    "{what}[{i}]: only text blocks are supported here, got {}",
                    other.unwrap_or("a block without type")
                )));
            }
        }
    }
    Ok(out)
}

fn msg(role: Role, content: Option<String>) -> ChatMessage {
    ChatMessage {
        role,
        content: content.map(MessageContent::Text),
        name: None,
        tool_call_id: None,
        tool_calls: None,
        reasoning_content: None,
    }
}

/// The conversation as our chat messages: `system` first, a user turn's `tool_result` blocks as `tool`
/// messages (before its text), an assistant turn's `tool_use` blocks as its `tool_calls` and its
/// `thinking` as `reasoning_content`.
///
/// Errors: an unknown role, an image/document block, a block of the wrong shape.
pub fn messages(r: &MessagesRequest) -> Result<Vec<ChatMessage>, TranslateError> {
    let mut out = Vec::new();
    match &r.system {
        Some(SystemPrompt::Text(s)) if !s.is_empty() => {
            out.push(msg(Role::System, Some(s.clone())))
        }
        Some(SystemPrompt::Blocks(b)) if !b.is_empty() => {
            out.push(msg(Role::System, Some(text_of_blocks(b, "system")?)))
        }
        _ => {}
    }
    for (i, m) in r.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(bad(format!(
                    "messages.{i}.role: expected \"user\" or \"assistant\", got {other:?}"
                )));
            }
        };
        let blocks = match &m.content {
            Content::Text(s) => {
                out.push(msg(role, Some(s.clone())));
                continue;
            }
            Content::Blocks(b) => b,
        };
        let mut text = String::new();
        let mut thinking = String::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some("thinking") => {
                    thinking.push_str(b.get("thinking").and_then(Value::as_str).unwrap_or(""))
                }
                Some("redacted_thinking") => {}
                Some("tool_use") if role == Role::Assistant => {
                    let id = b.get("id").and_then(Value::as_str).unwrap_or("");
                    let name = b
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("{at}: tool_use needs a name")))?;
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(json!({"id": id, "type": "function",
                        "function": {"name": name, "arguments": input.to_string()}}));
                }
                Some("tool_result") if role == Role::User => {
                    let id = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("{at}: tool_result needs tool_use_id")))?;
                    let content = match b.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(a)) => text_of_blocks(a, &format!("{at}.content"))?,
                        Some(other) => {
                            return Err(bad(format!("{at}.content: unexpected {other}")));
                        }
                    };
                    let content = if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        format!("Error: {content}")
                    } else {
                        content
                    };
                    let mut t = msg(Role::Tool, Some(content));
                    t.tool_call_id = Some(id.to_owned());
                    results.push(t);
                }
                Some(k @ ("image" | "document")) => {
                    return Err(bad(format!(
                        "{at}: {k} blocks are not supported: this server runs text models only"
                    )));
                }
                Some(k) => {
                    return Err(bad(format!(
                        "{at}: unsupported block type {k:?} in a {} message",
                        m.role
                    )));
                }
                None => return Err(bad(format!("{at}: a content block needs a type"))),
            }
        }
        out.extend(results);
        if role == Role::Assistant {
            let mut a = msg(
                Role::Assistant,
                (!text.is_empty() || calls.is_empty()).then_some(text),
            );
            if !calls.is_empty() {
                a.tool_calls = Some(Value::Array(calls));
            }
            a.reasoning_content = (!thinking.is_empty()).then_some(thinking);
            out.push(a);
        } else if !text.is_empty() || blocks.iter().all(|b| b["type"] == "text") {
            out.push(msg(Role::User, Some(text)));
        }
    }
    Ok(out)
}

/// The request as our streamed chat request (we always stream from the worker, with usage).
///
/// Errors: as [`messages`]; a missing `max_tokens` when `need_max_tokens`; server tools; a
/// `tool_choice` naming no tool.
pub fn chat_request(
    r: &MessagesRequest,
    need_max_tokens: bool,
) -> Result<ChatCompletionRequest, TranslateError> {
    if need_max_tokens && r.max_tokens.is_none() {
        return Err(bad("max_tokens: Field required"));
    }
    if r.messages.is_empty() {
        return Err(bad("messages: at least one message is required"));
    }
    let tools = match &r.tools {
        Some(t) if !t.is_empty() => Some(
            t.iter()
                .map(|t| {
                    if let Some(k) = t.kind.as_deref().filter(|k| *k != "custom") {
                        return Err(bad(format!(
                            "tools: server tool {k:?} is not supported (only client tools with an input_schema)"
                        )));
                    }
                    Ok(json!({"type": "function", "function": {
                        "name": t.name, "description": t.description.clone().unwrap_or_default(),
                        "parameters": t.input_schema.clone().unwrap_or_else(|| json!({"type": "object"})),
                    }}))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let (tool_choice, parallel) = match &r.tool_choice {
        None => (None, None),
        Some(c) => {
            let choice = match c.kind.as_str() {
                "auto" => ToolChoice::Mode("auto".into()),
                "any" => ToolChoice::Mode("required".into()),
                "none" => ToolChoice::Mode("none".into()),
                "tool" => ToolChoice::Named(NamedToolChoice {
                    kind: "function".into(),
                    function: FunctionName {
                        name: c
                            .name
                            .clone()
                            .ok_or_else(|| bad("tool_choice.name: required for type \"tool\""))?,
                    },
                }),
                k => {
                    return Err(bad(format!(
                        "tool_choice.type: expected auto, any, tool or none, got {k:?}"
                    )));
                }
            };
            (Some(choice), c.disable_parallel_tool_use.map(|d| !d))
        }
    };
    let thinking = r
        .thinking
        .as_ref()
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        .map(|t| {
            let mut m = Map::new();
            m.insert("enable_thinking".into(), Value::Bool(t == "enabled"));
            m
        });
    Ok(ChatCompletionRequest {
        model: Some(r.model.clone()),
        messages: messages(r)?,
        max_tokens: r.max_tokens,
        max_completion_tokens: None,
        logprobs: None,
        top_logprobs: None,
        tools,
        tool_choice,
        parallel_tool_calls: parallel,
        reasoning_format: None,
        chat_template_kwargs: thinking,
        sampling: SamplingFields {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            stop: r.stop_sequences.clone().map(StopSpec::Many),
            stream: Some(true),
            stream_options: Some(StreamOptions {
                include_usage: true,
            }),
            ..SamplingFields::default()
        },
        structured: StructuredFields::default(),
    })
}

/// Anthropic's `stop_reason`.
pub fn stop_reason(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Length) => "max_tokens",
        Some(FinishReason::ToolCalls) => "tool_use",
        _ => "end_turn",
    }
}

fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => json!({"value": other}),
        Err(_) => json!({}),
    }
}

/// The whole reply as a `message` object.
pub fn message(id: &str, model: &str, acc: &ChatAccumulator) -> Value {
    let mut content = Vec::new();
    if !acc.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": acc.reasoning, "signature": ""}));
    }
    if !acc.content.is_empty() || acc.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": acc.content}));
    }
    for c in &acc.tool_calls {
        content.push(
            json!({"type": "tool_use", "id": c.id, "name": c.function.name,
                            "input": tool_input(&c.function.arguments)}),
        );
    }
    let u = acc.usage.unwrap_or_default();
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(acc.finish), "stop_sequence": null,
        "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens},
    })
}

/// Which block is open in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Thinking,
    Text,
    Tool(usize),
}

/// Turns our chat chunks into Anthropic's stream events, one `(event name, data)` pair each.
#[derive(Debug, Clone)]
pub struct EventWriter {
    id: String,
    model: String,
    open: Option<Open>,
    index: usize,
    /// Argument text of tool calls received before their block could open.
    started: bool,
}

impl EventWriter {
    /// A writer for message `id` of `model`.
    pub fn new(id: &str, model: &str) -> Self {
        EventWriter {
            id: id.to_owned(),
            model: model.to_owned(),
            open: None,
            index: 0,
            started: false,
        }
    }

    /// `message_start` (and a `ping`, as Anthropic sends).
    pub fn start(&mut self) -> Vec<(&'static str, Value)> {
        self.started = true;
        vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ),
            ("ping", json!({"type": "ping"})),
        ]
    }

    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if let Some(o) = self.open.take() {
            if o == Open::Thinking {
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "signature_delta", "signature": ""}}),
                ));
            }
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.index}),
            ));
            self.index += 1;
        }
    }

    fn open(&mut self, want: Open, block: Value, out: &mut Vec<(&'static str, Value)>) {
        if self.open == Some(want) {
            return;
        }
        self.close(out);
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": self.index, "content_block": block}),
        ));
        self.open = Some(want);
    }

    /// The events of one chunk's additions (`acc` already holds them).
    pub fn step(&mut self, step: &ChatStep, acc: &ChatAccumulator) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if !step.reasoning.is_empty() {
            self.open(
                Open::Thinking,
                json!({"type": "thinking", "thinking": ""}),
                &mut out,
            );
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "thinking_delta", "thinking": step.reasoning}}),
            ));
        }
        if !step.content.is_empty() {
            self.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "text_delta", "text": step.content}}),
            ));
        }
        for &i in &step.started_calls {
            if let Some(c) = acc.tool_calls.get(i) {
                self.open(
                    Open::Tool(i),
                    json!({"type": "tool_use", "id": c.id, "name": c.function.name, "input": {}}),
                    &mut out,
                );
            }
        }
        for (i, part) in &step.argument_parts {
            if let Some(c) = acc.tool_calls.get(*i) {
                self.open(
                    Open::Tool(*i),
                    json!({"type": "tool_use", "id": c.id, "name": c.function.name, "input": {}}),
                    &mut out,
                );
            }
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "input_json_delta", "partial_json": part}}),
            ));
        }
        out
    }

    /// The closing events: the open block's stop, `message_delta` (stop reason, usage) and
    /// `message_stop`. A reply with no block at all gets an empty text block first.
    pub fn finish(&mut self, acc: &ChatAccumulator) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if self.open.is_none() && self.index == 0 {
            self.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
        }
        self.close(&mut out);
        let u = acc.usage.unwrap_or_default();
        out.push((
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": stop_reason(acc.finish), "stop_sequence": null},
                   "usage": {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// Anthropic's error object `{"type": "error", "error": {"type", "message"}}` for an HTTP status.
pub fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::stream::parse_chat_chunk;

    fn req(v: Value) -> MessagesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn basic_request_from_the_docs() {
        let r = req(json!({
            "model": "claude-sonnet-4-20250514", "max_tokens": 1024,
            "system": [{"type": "text", "text": "You are a helpful assistant."}],
            "messages": [{"role": "user", "content": "Hello, world"}],
            "stop_sequences": ["\n\nHuman:"], "temperature": 0.5, "top_k": 40
        }));
        let c = chat_request(&r, true).unwrap();
        assert_eq!(c.messages.len(), 2);
        assert_eq!(c.messages[0].role, Role::System);
        assert_eq!(c.max_tokens, Some(1024));
        assert_eq!(
            c.sampling.stop,
            Some(StopSpec::Many(vec!["\n\nHuman:".into()]))
        );
        assert_eq!(c.sampling.top_k, Some(40));
        let mut no_max = r.clone();
        no_max.max_tokens = None;
        assert!(
            chat_request(&no_max, true)
                .unwrap_err()
                .0
                .contains("max_tokens")
        );
        assert!(
            chat_request(&no_max, false).is_ok(),
            "count_tokens needs none"
        );
    }

    #[test]
    fn tool_use_round_trip_from_the_docs() {
        // docs "Tool use": the assistant's tool_use, then the user's tool_result.
        let r = req(json!({
            "model": "m", "max_tokens": 1024,
            "tools": [{"name": "get_weather", "description": "Get the current weather in a given location",
                       "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "What's the weather like in San Francisco?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "I'll check."},
                    {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                     "input": {"location": "San Francisco, CA"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"}]}
            ]
        }));
        let c = chat_request(&r, true).unwrap();
        assert_eq!(
            c.tools.as_ref().unwrap()[0]["function"]["name"],
            "get_weather"
        );
        assert_eq!(
            c.tools.as_ref().unwrap()[0]["function"]["parameters"]["required"],
            json!(["location"])
        );
        assert_eq!(c.tool_choice, Some(ToolChoice::Mode("required".into())));
        assert_eq!(c.parallel_tool_calls, Some(false));
        assert_eq!(c.messages.len(), 3);
        let calls = c.messages[1].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["id"], "toolu_01A09q90qw90lq917835lq9");
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["location"], "San Francisco, CA");
        assert_eq!(c.messages[2].role, Role::Tool);
        assert_eq!(
            c.messages[2].tool_call_id.as_deref(),
            Some("toolu_01A09q90qw90lq917835lq9")
        );
        let named = req(
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "tool_choice": {"type": "tool", "name": "get_weather"}}),
        );
        assert!(matches!(
            chat_request(&named, true).unwrap().tool_choice,
            Some(ToolChoice::Named(_))
        ));
    }

    #[test]
    fn images_and_bad_roles_are_refused() {
        let r = req(
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
            {"type": "text", "text": "What is in the above image?"}]}]}),
        );
        assert!(
            chat_request(&r, true)
                .unwrap_err()
                .0
                .contains("image blocks are not supported")
        );
        let r = req(
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
        );
        assert!(chat_request(&r, true).is_err());
    }

    fn chunk(delta: Value, finish: Value) -> crate::openai::ChatCompletionChunk {
        parse_chat_chunk(
            &json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "system_fingerprint": "f",
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn stream_events_follow_anthropics_sequence() {
        let mut acc = ChatAccumulator::new();
        let mut w = EventWriter::new("msg_1", "m");
        let mut names: Vec<&str> = w.start().into_iter().map(|e| e.0).collect();
        let mut all = Vec::new();
        for (d, f) in [
            (json!({"content": "Hel"}), Value::Null),
            (json!({"content": "lo"}), Value::Null),
            (
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{\"location\":"}}]}),
                Value::Null,
            ),
            (
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                json!("tool_calls"),
            ),
        ] {
            let c = chunk(d, f);
            let s = acc.push(&c);
            all.extend(w.step(&s, &acc));
        }
        all.extend(w.finish(&acc));
        names.extend(all.iter().map(|e| e.0));
        assert_eq!(
            names,
            vec![
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(all[0].1["content_block"]["type"], "text");
        assert_eq!(all[4].1["content_block"]["type"], "tool_use");
        assert_eq!(all[4].1["index"], 1);
        assert_eq!(all[5].1["delta"]["partial_json"], "{\"location\":");
        assert_eq!(all[8].1["delta"]["stop_reason"], "tool_use");
        let m = message("msg_1", "m", &acc);
        assert_eq!(m["content"][1]["input"]["location"], "Paris");
        assert_eq!(m["stop_reason"], "tool_use");
        // An empty reply still has one (empty) text block.
        let mut w = EventWriter::new("msg_2", "m");
        let ev = w.finish(&ChatAccumulator::new());
        assert_eq!(ev[0].0, "content_block_start");
        assert_eq!(error_body(404, "x")["error"]["type"], "not_found_error");
    }
}
