//! Reading our workers' OpenAI server-sent events back, for the foreign-API translations: an SSE
//! decoder over arbitrary byte chunks (bounded), and an accumulator that folds `chat.completion.chunk`
//! events into the whole reply (text, reasoning, tool calls, finish reason, usage). Pure: no I/O.

use super::{ChatCompletionChunk, FinishReason, FunctionCall, ToolCall, Usage};

/// Largest SSE event accepted (bytes); a longer one is an error, never an unbounded buffer.
pub const MAX_EVENT: usize = 8 * 1024 * 1024;

/// Why a worker's stream cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StreamError {
    /// An event longer than [`MAX_EVENT`].
    #[error("an event of the worker's stream is longer than {MAX_EVENT} bytes")]
    TooLong,
    /// A `data:` payload that is not the JSON we expect.
    #[error("the worker sent an event that is not a chunk: {0}")]
    BadEvent(String),
    /// The worker reported an error inside the stream.
    #[error("{0}")]
    Worker(String),
}

/// One decoded SSE item.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    /// A `data:` payload (JSON text).
    Data(String),
    /// `data: [DONE]`.
    Done,
}

/// Splits a byte stream into SSE `data:` payloads. Feed chunks with [`SseDecoder::push`].
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
}

impl SseDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` and returns the complete events they finish, in order.
    ///
    /// Errors: [`StreamError::TooLong`] when an event grows past [`MAX_EVENT`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseItem>, StreamError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((ev_len, sep_len)) = find_event_end(&self.buf) {
            let ev: Vec<u8> = self.buf.drain(..ev_len + sep_len).take(ev_len).collect();
            let text = String::from_utf8_lossy(&ev);
            let mut data = String::new();
            for line in text.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            if data.is_empty() {
                continue;
            }
            if data.trim() == "[DONE]" {
                out.push(SseItem::Done);
            } else {
                out.push(SseItem::Data(data));
            }
        }
        if self.buf.len() > MAX_EVENT {
            return Err(StreamError::TooLong);
        }
        Ok(out)
    }
}

/// (event length, separator length) of the first complete event (`\n\n` or `\r\n\r\n`).
fn find_event_end(b: &[u8]) -> Option<(usize, usize)> {
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(c)) => Some(if a.0 <= c.0 { a } else { c }),
        (a, c) => a.or(c),
    }
}

/// The message of an `{"error": {"message": …}}` (or `{"error": "…"}`) payload, if it is one.
pub fn error_message(v: &serde_json::Value) -> Option<String> {
    let e = v.get("error")?;
    Some(
        e.get("message")
            .and_then(|m| m.as_str())
            .or_else(|| e.as_str())
            .unwrap_or("the worker failed")
            .to_owned(),
    )
}

/// Parses one `data:` payload of a chat stream.
///
/// Errors: [`StreamError::Worker`] for an error payload, [`StreamError::BadEvent`] for anything else
/// that is not a chunk.
pub fn parse_chat_chunk(data: &str) -> Result<ChatCompletionChunk, StreamError> {
    let v: serde_json::Value =
        serde_json::from_str(data).map_err(|e| StreamError::BadEvent(e.to_string()))?;
    if let Some(m) = error_message(&v) {
        return Err(StreamError::Worker(m));
    }
    serde_json::from_value(v).map_err(|e| StreamError::BadEvent(e.to_string()))
}

/// What one chunk of choice 0 adds, as the foreign streams need it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatStep {
    /// New answer text.
    pub content: String,
    /// New reasoning text.
    pub reasoning: String,
    /// Indices of tool calls that this chunk started (their id and name are now known).
    pub started_calls: Vec<usize>,
    /// (call index, argument fragment) pairs this chunk added.
    pub argument_parts: Vec<(usize, String)>,
    /// Set when the choice ended.
    pub finish: Option<FinishReason>,
}

/// Folds the chunks of a streamed chat reply (choice 0) into the whole reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatAccumulator {
    /// The answer text so far.
    pub content: String,
    /// The reasoning text so far.
    pub reasoning: String,
    /// Tool calls so far (arguments grow as fragments come).
    pub tool_calls: Vec<ToolCall>,
    /// Why the reply ended, once it did.
    pub finish: Option<FinishReason>,
    /// Token counts (from the usage chunk).
    pub usage: Option<Usage>,
}

impl ChatAccumulator {
    /// An empty reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one chunk; returns what it added.
    pub fn push(&mut self, chunk: &ChatCompletionChunk) -> ChatStep {
        let mut step = ChatStep::default();
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        for c in chunk.choices.iter().filter(|c| c.index == 0) {
            if let Some(t) = &c.delta.content {
                self.content.push_str(t);
                step.content.push_str(t);
            }
            if let Some(t) = &c.delta.reasoning_content {
                self.reasoning.push_str(t);
                step.reasoning.push_str(t);
            }
            for tc in c.delta.tool_calls.iter().flatten() {
                let i = tc.index as usize;
                while self.tool_calls.len() <= i {
                    self.tool_calls.push(ToolCall {
                        id: String::new(),
                        kind: "function".into(),
                        function: FunctionCall {
                            name: String::new(),
                            arguments: String::new(),
                        },
                    });
                }
                let call = &mut self.tool_calls[i];
                let fresh = call.id.is_empty() && call.function.name.is_empty();
                if let Some(id) = &tc.id {
                    call.id.clone_from(id);
                }
                if let Some(n) = &tc.function.name {
                    call.function.name.push_str(n);
                }
                if fresh && (tc.id.is_some() || tc.function.name.is_some()) {
                    if call.id.is_empty() {
                        call.id = format!("call_{i}");
                    }
                    step.started_calls.push(i);
                }
                if let Some(a) = &tc.function.arguments
                    && !a.is_empty()
                {
                    call.function.arguments.push_str(a);
                    step.argument_parts.push((i, a.clone()));
                }
            }
            if let Some(f) = c.finish_reason {
                self.finish = Some(f);
                step.finish = Some(f);
            }
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks_and_done() {
        let mut d = SseDecoder::new();
        assert_eq!(d.push(b"data: {\"a\"").unwrap(), vec![]);
        assert_eq!(
            d.push(b":1}\n\ndata: {\"b\":2}\r\n\r\n: comment\n\ndata: [DONE]\n\n")
                .unwrap(),
            vec![
                SseItem::Data("{\"a\":1}".into()),
                SseItem::Data("{\"b\":2}".into()),
                SseItem::Done
            ]
        );
        let mut d = SseDecoder::new();
        let big = vec![b'x'; MAX_EVENT + 1];
        assert_eq!(d.push(&big), Err(StreamError::TooLong));
    }

    fn chunk(v: serde_json::Value) -> ChatCompletionChunk {
        let mut base = serde_json::json!({"id":"c","object":"chat.completion.chunk","created":1,
            "model":"m","system_fingerprint":"f","choices":[]});
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        parse_chat_chunk(&base.to_string()).unwrap()
    }

    #[test]
    fn accumulates_text_tool_calls_finish_and_usage() {
        let mut a = ChatAccumulator::new();
        let s = a.push(&chunk(serde_json::json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]})));
        assert_eq!(s, ChatStep::default());
        let s = a.push(&chunk(serde_json::json!({"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]})));
        assert_eq!(s.content, "Hi");
        let s = a.push(&chunk(serde_json::json!({"choices":[{"index":0,"delta":{"tool_calls":[
            {"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":"{\"ci"}}]},
            "logprobs":null,"finish_reason":null}]})));
        assert_eq!(s.started_calls, vec![0]);
        assert_eq!(s.argument_parts, vec![(0, "{\"ci".to_string())]);
        let s = a.push(&chunk(serde_json::json!({"choices":[{"index":0,"delta":{"tool_calls":[
            {"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]},"logprobs":null,"finish_reason":"tool_calls"}]})));
        assert!(s.started_calls.is_empty());
        assert_eq!(s.finish, Some(FinishReason::ToolCalls));
        a.push(&chunk(serde_json::json!({"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}})));
        assert_eq!(a.content, "Hi");
        assert_eq!(a.tool_calls[0].id, "call_a");
        assert_eq!(a.tool_calls[0].function.name, "get_weather");
        assert_eq!(a.tool_calls[0].function.arguments, "{\"city\":\"Paris\"}");
        assert_eq!(a.usage.unwrap().completion_tokens, 7);
    }

    #[test]
    fn error_payloads_are_worker_errors() {
        assert_eq!(
            parse_chat_chunk(r#"{"error":{"message":"boom","type":"server_error"}}"#),
            Err(StreamError::Worker("boom".into()))
        );
        assert!(matches!(
            parse_chat_chunk("not json"),
            Err(StreamError::BadEvent(_))
        ));
    }
}
