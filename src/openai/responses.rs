//! OpenAI's Responses API (<https://platform.openai.com/docs/api-reference/responses>) translated to and
//! from our chat types: the request (`input` as text or items: messages, `function_call`,
//! `function_call_output`; `instructions`; function `tools`; `text.format`) to our chat request; the
//! reply (folded from the worker's stream) to a `response` object; the stream's chunks to the
//! Responses events (`response.created`, `response.output_item.added`, `response.output_text.delta`,
//! `response.function_call_arguments.delta`, …, `response.completed`). No I/O.

use serde::Deserialize;
use serde_json::{Value, json};

use super::stream::{ChatAccumulator, ChatStep};
use super::{
    ChatCompletionRequest, ChatMessage, FinishReason, FunctionName, JsonSchemaFormat,
    MessageContent, NamedToolChoice, ResponseFormat, Role, SamplingFields, StreamOptions,
    StructuredFields, ToolChoice,
};

/// A request that cannot be translated: a 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TranslateError(pub String);

fn bad(m: impl Into<String>) -> TranslateError {
    TranslateError(m.into())
}

/// `POST /v1/responses`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResponsesRequest {
    /// The model.
    pub model: String,
    /// A text, or input items.
    pub input: Value,
    /// A system message put first.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Function tools `{type: "function", name, description, parameters}`.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `auto`, `none`, `required` or `{type: "function", name}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Several calls in one reply.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{format: {type: text | json_object | json_schema, name, schema, strict}}`.
    #[serde(default)]
    pub text: Option<Value>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Stream events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// The stored response this one continues.
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Keep the response for `previous_response_id` and `GET` (default true).
    #[serde(default)]
    pub store: Option<bool>,
}

fn content_text(c: &Value, at: &str) -> Result<String, TranslateError> {
    match c {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        out.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some(k) => {
                        return Err(bad(format!(
                            "{at}.content[{i}]: content of type {k:?} is not supported (text only)"
                        )));
                    }
                    None => return Err(bad(format!("{at}.content[{i}]: a part needs a type"))),
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        other => Err(bad(format!("{at}.content: unexpected {other}"))),
    }
}

fn msg(role: Role, text: String) -> ChatMessage {
    ChatMessage {
        role,
        content: Some(MessageContent::Text(text)),
        name: None,
        tool_call_id: None,
        tool_calls: None,
        reasoning_content: None,
    }
}

/// `input` as chat messages: a text is one user message; items are messages, `function_call`s (joined
/// into the assistant turn before them) and `function_call_output`s (tool messages).
///
/// Errors: an unknown item type or role, non-text content.
pub fn input_messages(input: &Value) -> Result<Vec<ChatMessage>, TranslateError> {
    let items = match input {
        Value::String(s) => return Ok(vec![msg(Role::User, s.clone())]),
        Value::Array(a) => a,
        other => {
            return Err(bad(format!(
                "input: expected a string or a list, got {other}"
            )));
        }
    };
    let mut out: Vec<ChatMessage> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = it.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let role = match it.get("role").and_then(Value::as_str) {
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("system") => Role::System,
                    Some("developer") => Role::Developer,
                    r => return Err(bad(format!("{at}.role: invalid role {r:?}"))),
                };
                let text = content_text(it.get("content").unwrap_or(&Value::Null), &at)?;
                out.push(msg(role, text));
            }
            "function_call" => {
                let call_id = it.get("call_id").and_then(Value::as_str).unwrap_or("");
                let name = it
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{at}: function_call needs a name")))?;
                let args = it.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                let call = json!({"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": args}});
                match out.last_mut() {
                    Some(m) if m.role == Role::Assistant => match &mut m.tool_calls {
                        Some(Value::Array(v)) => v.push(call),
                        _ => m.tool_calls = Some(json!([call])),
                    },
                    _ => {
                        let mut m = msg(Role::Assistant, String::new());
                        m.content = None;
                        m.tool_calls = Some(json!([call]));
                        out.push(m);
                    }
                }
            }
            "function_call_output" => {
                let call_id = it
                    .get("call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{at}: function_call_output needs call_id")))?;
                let output = match it.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => content_text(v, &at)?,
                    None => String::new(),
                };
                let mut m = msg(Role::Tool, output);
                m.tool_call_id = Some(call_id.to_owned());
                out.push(m);
            }
            "reasoning" => {}
            k => {
                return Err(bad(format!(
                    "{at}: input items of type {k:?} are not supported"
                )));
            }
        }
    }
    Ok(out)
}

/// The request as our streamed chat request, after `history` (the conversation of the
/// `previous_response_id` chain, oldest first).
///
/// Errors: as [`input_messages`]; a non-function tool; a bad `tool_choice` or `text.format`.
pub fn chat_request(
    r: &ResponsesRequest,
    history: Vec<ChatMessage>,
) -> Result<ChatCompletionRequest, TranslateError> {
    let mut messages = Vec::new();
    if let Some(i) = r.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(msg(Role::System, i.clone()));
    }
    messages.extend(history);
    messages.extend(input_messages(&r.input)?);
    if messages.is_empty() {
        return Err(bad("input: at least one item is required"));
    }
    let tools = match &r.tools {
        Some(t) if !t.is_empty() => Some(
            t.iter()
                .map(|t| match t.get("type").and_then(Value::as_str) {
                    Some("function") => Ok(json!({"type": "function", "function": {
                        "name": t.get("name").cloned().unwrap_or(Value::Null),
                        "description": t.get("description").cloned().unwrap_or(json!("")),
                        "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
                    }})),
                    k => Err(bad(format!(
                        "tools: tools of type {} are not supported (function tools only)",
                        k.unwrap_or("?")
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let tool_choice = match &r.tool_choice {
        None => None,
        Some(Value::String(s)) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Some(ToolChoice::Mode(s.clone()))
        }
        Some(v) if v.get("type").and_then(Value::as_str) == Some("function") => {
            Some(ToolChoice::Named(NamedToolChoice {
                kind: "function".into(),
                function: FunctionName {
                    name: v
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad("tool_choice.name: required"))?
                        .to_owned(),
                },
            }))
        }
        Some(v) => return Err(bad(format!("tool_choice: unsupported {v}"))),
    };
    let response_format = match r.text.as_ref().and_then(|t| t.get("format")) {
        None | Some(Value::Null) => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(ResponseFormat {
                kind: "json_object".into(),
                json_schema: None,
                schema: None,
            }),
            Some("json_schema") => Some(ResponseFormat {
                kind: "json_schema".into(),
                json_schema: Some(JsonSchemaFormat {
                    name: f.get("name").and_then(Value::as_str).map(str::to_owned),
                    description: None,
                    schema: f.get("schema").cloned(),
                    strict: f.get("strict").and_then(Value::as_bool),
                }),
                schema: None,
            }),
            k => return Err(bad(format!("text.format.type: unsupported {k:?}"))),
        },
    };
    Ok(ChatCompletionRequest {
        model: Some(r.model.clone()),
        messages,
        max_tokens: r.max_output_tokens,
        max_completion_tokens: None,
        logprobs: None,
        top_logprobs: None,
        tools,
        tool_choice,
        parallel_tool_calls: r.parallel_tool_calls,
        reasoning_format: None,
        chat_template_kwargs: None,
        sampling: SamplingFields {
            temperature: r.temperature,
            top_p: r.top_p,
            stream: Some(true),
            stream_options: Some(StreamOptions {
                include_usage: true,
            }),
            ..SamplingFields::default()
        },
        structured: StructuredFields {
            response_format,
            json_schema: None,
            grammar: None,
        },
    })
}

/// The reply as chat messages, to continue the conversation later (`previous_response_id`).
pub fn reply_messages(acc: &ChatAccumulator) -> ChatMessage {
    let mut m = msg(Role::Assistant, acc.content.clone());
    if !acc.tool_calls.is_empty() {
        m.tool_calls = serde_json::to_value(&acc.tool_calls).ok();
        if acc.content.is_empty() {
            m.content = None;
        }
    }
    m
}

/// What identifies a response and its items.
#[derive(Debug, Clone)]
pub struct Ids {
    /// `resp_…`.
    pub response: String,
    /// `msg_…` of the text item.
    pub message: String,
    /// Unix seconds.
    pub created_at: u64,
}

fn text_item(ids: &Ids, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": ids.message, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(ids: &Ids, i: usize, c: &super::ToolCall, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}_{i}", ids.response), "call_id": c.id,
           "name": c.function.name, "arguments": c.function.arguments, "status": status})
}

/// The `response` object: in progress (`acc` = `None`, no output yet) or finished.
pub fn response(r: &ResponsesRequest, ids: &Ids, acc: Option<&ChatAccumulator>) -> Value {
    let mut output = Vec::new();
    let (status, incomplete, usage) = match acc {
        None => ("in_progress", Value::Null, Value::Null),
        Some(a) => {
            if !a.content.is_empty() || a.tool_calls.is_empty() {
                output.push(text_item(ids, &a.content, "completed"));
            }
            for (i, c) in a.tool_calls.iter().enumerate() {
                output.push(call_item(ids, i, c, "completed"));
            }
            let u = a.usage.unwrap_or_default();
            let (status, inc) = if a.finish == Some(FinishReason::Length) {
                ("incomplete", json!({"reason": "max_output_tokens"}))
            } else {
                ("completed", Value::Null)
            };
            (
                status,
                inc,
                json!({"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                       "total_tokens": u.total_tokens,
                       "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.map_or(0, |d| d.cached_tokens)},
                       "output_tokens_details": {"reasoning_tokens": 0}}),
            )
        }
    };
    json!({
        "id": ids.response, "object": "response", "created_at": ids.created_at, "status": status,
        "model": r.model, "output": output, "error": null, "incomplete_details": incomplete,
        "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
        "parallel_tool_calls": r.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": r.previous_response_id, "temperature": r.temperature,
        "top_p": r.top_p, "tool_choice": r.tool_choice.clone().unwrap_or(json!("auto")),
        "tools": r.tools.clone().unwrap_or_default(),
        "text": r.text.clone().unwrap_or(json!({"format": {"type": "text"}})),
        "store": r.store.unwrap_or(true), "usage": usage, "metadata": {},
    })
}

/// Turns our chat chunks into the Responses stream's events.
#[derive(Debug, Clone)]
pub struct EventWriter {
    ids: Ids,
    seq: u64,
    /// Output index of the text item, once added.
    text_at: Option<usize>,
    /// Output index of each tool call's item.
    calls_at: Vec<(usize, usize)>,
    next: usize,
}

impl EventWriter {
    /// A writer for the response `ids`.
    pub fn new(ids: Ids) -> Self {
        EventWriter {
            ids,
            seq: 0,
            text_at: None,
            calls_at: Vec::new(),
            next: 0,
        }
    }

    fn ev(&mut self, kind: &str, mut v: Value) -> (String, Value) {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        (kind.to_owned(), v)
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self, r: &ResponsesRequest) -> Vec<(String, Value)> {
        let resp = response(r, &self.ids, None);
        vec![
            self.ev("response.created", json!({"response": resp})),
            self.ev("response.in_progress", json!({"response": resp})),
        ]
    }

    fn open_text(&mut self, out: &mut Vec<(String, Value)>) -> usize {
        if let Some(i) = self.text_at {
            return i;
        }
        let i = self.next;
        self.next += 1;
        self.text_at = Some(i);
        let item = text_item(&self.ids, "", "in_progress");
        let mut item_empty = item.clone();
        item_empty["content"] = json!([]);
        let id = self.ids.message.clone();
        out.push(self.ev(
            "response.output_item.added",
            json!({"output_index": i, "item": item_empty}),
        ));
        out.push(self.ev(
            "response.content_part.added",
            json!({"item_id": id, "output_index": i, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}),
        ));
        i
    }

    /// The events of one chunk's additions (`acc` already holds them).
    pub fn step(&mut self, step: &ChatStep, acc: &ChatAccumulator) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if !step.content.is_empty() {
            let i = self.open_text(&mut out);
            let id = self.ids.message.clone();
            out.push(self.ev(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": i, "content_index": 0, "delta": step.content, "logprobs": []}),
            ));
        }
        for &c in &step.started_calls {
            if let Some(call) = acc.tool_calls.get(c) {
                let i = self.next;
                self.next += 1;
                self.calls_at.push((c, i));
                let mut item = call_item(&self.ids, c, call, "in_progress");
                item["arguments"] = json!("");
                out.push(self.ev(
                    "response.output_item.added",
                    json!({"output_index": i, "item": item}),
                ));
            }
        }
        for (c, part) in &step.argument_parts {
            if let Some(&(_, i)) = self.calls_at.iter().find(|(x, _)| x == c) {
                let id = format!("fc_{}_{c}", self.ids.response);
                out.push(self.ev(
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": i, "delta": part}),
                ));
            }
        }
        out
    }

    /// The closing events of every item, then `response.completed` (or `response.incomplete`).
    pub fn finish(&mut self, r: &ResponsesRequest, acc: &ChatAccumulator) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if self.text_at.is_none() && acc.tool_calls.is_empty() {
            self.open_text(&mut out);
        }
        if let Some(i) = self.text_at {
            let id = self.ids.message.clone();
            out.push(self.ev(
                "response.output_text.done",
                json!({"item_id": id, "output_index": i, "content_index": 0, "text": acc.content, "logprobs": []}),
            ));
            out.push(self.ev(
                "response.content_part.done",
                json!({"item_id": id, "output_index": i, "content_index": 0,
                       "part": {"type": "output_text", "text": acc.content, "annotations": []}}),
            ));
            let item = text_item(&self.ids, &acc.content, "completed");
            out.push(self.ev(
                "response.output_item.done",
                json!({"output_index": i, "item": item}),
            ));
        }
        for (c, i) in self.calls_at.clone() {
            if let Some(call) = acc.tool_calls.get(c) {
                let id = format!("fc_{}_{c}", self.ids.response);
                out.push(self.ev(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": i, "arguments": call.function.arguments}),
                ));
                let item = call_item(&self.ids, c, call, "completed");
                out.push(self.ev(
                    "response.output_item.done",
                    json!({"output_index": i, "item": item}),
                ));
            }
        }
        let resp = response(r, &self.ids, Some(acc));
        let kind = if resp["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        out.push(self.ev(kind, json!({"response": resp})));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::stream::parse_chat_chunk;

    fn req(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn text_input_instructions_and_format() {
        // API reference "Create a model response": text input, instructions.
        let r = req(
            json!({"model": "gpt-4.1", "instructions": "Talk like a pirate.",
            "input": "Tell me a three sentence bedtime story about a unicorn.", "max_output_tokens": 50,
            "text": {"format": {"type": "json_schema", "name": "story", "strict": true,
                                "schema": {"type": "object", "properties": {"story": {"type": "string"}}}}}}),
        );
        let c = chat_request(&r, Vec::new()).unwrap();
        assert_eq!(c.messages.len(), 2);
        assert_eq!(c.messages[0].role, Role::System);
        assert_eq!(c.max_tokens, Some(50));
        let f = c.structured.response_format.unwrap();
        assert_eq!(f.kind, "json_schema");
        assert_eq!(f.json_schema.unwrap().name.as_deref(), Some("story"));
    }

    #[test]
    fn function_call_items_round_trip() {
        // Function-calling guide: the model's function_call item, then its function_call_output.
        let r = req(
            json!({"model": "m", "tools": [{"type": "function", "name": "get_weather",
                "description": "Get current temperature for a given location.",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}],
            "tool_choice": "required",
            "input": [
                {"role": "user", "content": "What is the weather like in Paris today?"},
                {"type": "function_call", "id": "fc_12345xyz", "call_id": "call_12345xyz", "name": "get_weather",
                 "arguments": "{\"location\":\"Paris, France\"}"},
                {"type": "function_call_output", "call_id": "call_12345xyz", "output": "14 degrees"}
            ]}),
        );
        let c = chat_request(&r, Vec::new()).unwrap();
        assert_eq!(c.messages.len(), 3);
        assert_eq!(c.messages[1].role, Role::Assistant);
        assert_eq!(
            c.messages[1].tool_calls.as_ref().unwrap()[0]["id"],
            "call_12345xyz"
        );
        assert_eq!(c.messages[2].tool_call_id.as_deref(), Some("call_12345xyz"));
        assert_eq!(c.tools.unwrap()[0]["function"]["name"], "get_weather");
        assert_eq!(c.tool_choice, Some(ToolChoice::Mode("required".into())));
        let bad_tool = req(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}));
        assert!(chat_request(&bad_tool, Vec::new()).is_err());
        let image = req(json!({"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}]}));
        assert!(
            chat_request(&image, Vec::new())
                .unwrap_err()
                .0
                .contains("input_image")
        );
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
    fn stream_events_and_the_final_response() {
        let r = req(json!({"model": "m", "input": "hi"}));
        let ids = Ids {
            response: "resp_1".into(),
            message: "msg_1".into(),
            created_at: 1,
        };
        let mut w = EventWriter::new(ids.clone());
        let mut acc = ChatAccumulator::new();
        let mut ev = w.start(&r);
        for (d, f) in [
            (json!({"content": "Hel"}), Value::Null),
            (json!({"content": "lo"}), json!("stop")),
        ] {
            let s = acc.push(&chunk(d, f));
            ev.extend(w.step(&s, &acc));
        }
        ev.extend(w.finish(&r, &acc));
        let kinds: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            kinds,
            vec![
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let seqs: Vec<u64> = ev
            .iter()
            .map(|e| e.1["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (0..10).collect::<Vec<_>>());
        let done = &ev[9].1["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["status"], "completed");
        let m = reply_messages(&acc);
        assert_eq!(m.role, Role::Assistant);
    }
}
