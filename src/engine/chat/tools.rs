//! Tool calls in a model's reply: which call format a chat template teaches its model (detected
//! from the template's text), the parser of each format, and the Lark grammar that forces a call
//! (`tool_choice: "required"` or a named function).
//!
//! Ported from llama.cpp's per-family chat handlers (`common/chat.cpp` and its parsers,
//! `common_chat_params_init_*` / `common_chat_parse_*`, as llama-server ran them before its
//! differential auto-parser; formats checked against the templates llama.cpp commit 0c1e570 tests
//! with, in `$CYBER_INFERENCE_ASSETS/templates`): Hermes 2/3 and Qwen 2.5/3 `<tool_call>…</tool_call>`,
//! Llama 3.x JSON and `<|python_tag|>`, Mistral `[TOOL_CALLS]` (Nemo's JSON array and Small 3.2's
//! `name[ARGS]{…}`), DeepSeek R1, Command R7B, Functionary v3.1 and v3.2, and llama.cpp's generic
//! JSON form for templates with none.
//!
//! Parsing works on the whole reply so far. With `partial` (streaming) it never returns text that
//! may be the start of a marker as content, and a call being written comes back with the
//! arguments written so far, so consecutive parses only ever extend each other and their
//! difference is what to stream. A call that does not parse is left in the content.

use serde_json::{Value, json};

use super::json_scan::{Scan, object_fields, scan_value, skip_ws};
use super::reasoning::{self, ThinkMarkers, partial_marker_len};

/// The call format of a template family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// No native format: llama.cpp's generic JSON reply `{"tool_calls": [...]}` / `{"response": …}`.
    Generic,
    /// Hermes 2 Pro / Hermes 3 / Qwen 2.5 / Qwen 3: `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`.
    Hermes,
    /// Llama 3.1–3.3: a JSON object `{"name": …, "parameters": …}` as the whole reply, or
    /// `<|python_tag|>` followed by a built-in call `name.call(k=v)` or JSON.
    Llama3,
    /// Mistral: `[TOOL_CALLS][{"name": …, "arguments": …, "id": …}]` (Nemo) or
    /// `[TOOL_CALLS]name[CALL_ID]id[ARGS]{…}` (Small 3.2, Magistral).
    Mistral,
    /// DeepSeek R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{…}\n```<｜tool▁call▁end｜>…`.
    DeepSeekR1,
    /// Command R7B: `<|START_ACTION|>[{"tool_call_id": …, "tool_name": …, "parameters": …}]<|END_ACTION|>`.
    CommandR7B,
    /// Functionary v3.1 (Llama 3.1): `<function=NAME>{…}</function>`, `<|python_tag|>code`.
    FunctionaryV31,
    /// Functionary v3.2: `>>>recipient\n…` segments (`all` = content), the first `>>>` in the prompt.
    FunctionaryV32,
}

const PYTHON_TAG: &str = "<|python_tag|>";
const DEEPSEEK_CALLS_BEGIN: [&str; 5] = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool_calls_begin｜>",
    "<｜tool calls begin｜>",
    "<｜tool\\_calls\\_begin｜>",
    "<｜tool▁calls｜>",
];
const DEEPSEEK_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DEEPSEEK_SEP: &str = "<｜tool▁sep｜>";
const DEEPSEEK_CALL_END: &str = "<｜tool▁call▁end｜>";
const DEEPSEEK_CALLS_END: &str = "<｜tool▁calls▁end｜>";

impl ToolFormat {
    /// The format a template's source teaches, by the markers it contains (llama.cpp's detection
    /// order: the most specific markers first).
    pub fn detect(source: &str) -> ToolFormat {
        if source.contains("<|END_THINKING|><|START_ACTION|>") {
            ToolFormat::CommandR7B
        } else if source.contains(DEEPSEEK_CALLS_BEGIN[0]) {
            ToolFormat::DeepSeekR1
        } else if source.contains(">>>all") {
            ToolFormat::FunctionaryV32
        } else if source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("<|start_header_id|>") && source.contains("<function=") {
            ToolFormat::FunctionaryV31
        } else if source.contains("<|start_header_id|>ipython<|end_header_id|>") {
            ToolFormat::Llama3
        } else if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else {
            ToolFormat::Generic
        }
    }

    /// A short name for logs and `/props`.
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Generic => "generic",
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3 => "llama3",
            ToolFormat::Mistral => "mistral",
            ToolFormat::DeepSeekR1 => "deepseek-r1",
            ToolFormat::CommandR7B => "command-r7b",
            ToolFormat::FunctionaryV31 => "functionary-v3.1",
            ToolFormat::FunctionaryV32 => "functionary-v3.2",
        }
    }

    /// Text markers of the format that must never be streamed as content (llama.cpp's
    /// `preserved_tokens`); a token whose text is one of them is rendered as text.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Generic => &[],
            ToolFormat::Hermes => &["<tool_call>", "</tool_call>"],
            ToolFormat::Llama3 => &[PYTHON_TAG],
            ToolFormat::Mistral => &["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"],
            ToolFormat::DeepSeekR1 => &[
                DEEPSEEK_CALLS_BEGIN[0],
                DEEPSEEK_CALL_BEGIN,
                DEEPSEEK_SEP,
                DEEPSEEK_CALL_END,
                DEEPSEEK_CALLS_END,
            ],
            ToolFormat::CommandR7B => &[
                "<|START_ACTION|>",
                "<|END_ACTION|>",
                "<|START_RESPONSE|>",
                "<|END_RESPONSE|>",
                "<|START_THINKING|>",
                "<|END_THINKING|>",
            ],
            ToolFormat::FunctionaryV31 => &["<function=", "</function>", PYTHON_TAG],
            ToolFormat::FunctionaryV32 => &[">>>"],
        }
    }
}

/// One parsed tool call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedToolCall {
    /// The function's name.
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them (an object, normally).
    pub arguments: String,
    /// The call's id when the format carries one (Mistral, Command R7B).
    pub id: Option<String>,
}

/// A reply split into content, reasoning and tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedReply {
    /// Text for `message.content`.
    pub content: String,
    /// Text for `message.reasoning_content` (empty when none).
    pub reasoning_content: String,
    /// Calls for `message.tool_calls`.
    pub tool_calls: Vec<ParsedToolCall>,
}

/// How to read one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplySyntax {
    /// The template family's call format.
    pub format: ToolFormat,
    /// Look for tool calls (the request has tools and `tool_choice` is not `none`).
    pub parse_tool_calls: bool,
    /// Extract reasoning between these markers (`None`: leave it in the content).
    pub reasoning: Option<ThinkMarkers>,
    /// The prompt ends inside an open thinking block.
    pub thinking_forced_open: bool,
    /// The reply is a JSON response format (`response_format` / `json_schema` on chat, constrained
    /// by [`crate::engine::constraint::GrammarSpec::ChatReply`]): its content is the JSON alone,
    /// without the whitespace or `` ```json `` fence around it ([`json_reply_content`]); no tool
    /// calls are looked for (llama.cpp's response format takes precedence over tools too).
    pub json_reply: bool,
}

/// Parses a reply. `partial`: the reply is still being generated (see the module docs).
pub fn parse_reply(text: &str, syntax: &ReplySyntax, partial: bool) -> ParsedReply {
    let mut reasoning = String::new();
    let mut rest = text;
    // Command R7B's thinking markers are part of its format; others are optional.
    let markers = syntax.reasoning;
    if let Some(m) = markers {
        let s = reasoning::split(text, m, syntax.thinking_forced_open, partial);
        reasoning = s.reasoning;
        rest = s.rest;
    }
    let (mut content, tool_calls) = if syntax.json_reply {
        (json_reply_content(rest, partial), Vec::new())
    } else if syntax.parse_tool_calls {
        parse_calls(syntax.format, rest, partial)
    } else {
        let mut c = rest.to_string();
        if partial {
            let keep = c.len() - partial_marker_len(&c, &reasoning_markers(markers));
            c.truncate(keep);
        }
        (c, Vec::new())
    };
    if syntax.format == ToolFormat::CommandR7B {
        content = strip_command_r_response(&content);
    }
    ParsedReply {
        content,
        reasoning_content: reasoning,
        tool_calls,
    }
}

/// The JSON of a response-format reply (see [`ReplySyntax::json_reply`]): `text` without its leading
/// whitespace, its `` ```json `` fence and the whitespace and closing fence after the JSON, as
/// llama.cpp's `response-format` parser tags the content. With `partial`, a start that may still
/// become the fence and a trailing run of whitespace and backticks (which may be the closing fence)
/// are held back, so consecutive parses only extend each other.
pub fn json_reply_content(text: &str, partial: bool) -> String {
    const FENCE: &str = "```json";
    const WS: [char; 4] = [' ', '\t', '\n', '\r'];
    let t = text.trim_start_matches(WS);
    let (body, fenced) = match t.strip_prefix(FENCE) {
        Some(b) => (b.trim_start_matches(WS), true),
        None if partial && FENCE.starts_with(t) => return String::new(),
        None => (t, false),
    };
    if partial {
        return body
            .trim_end_matches(|c| WS.contains(&c) || c == '`')
            .to_string();
    }
    let mut b = body.trim_end_matches(WS);
    if fenced && let Some(x) = b.strip_suffix("```") {
        b = x.trim_end_matches(WS);
    }
    b.to_string()
}

fn reasoning_markers(m: Option<ThinkMarkers>) -> Vec<&'static str> {
    m.map(|m| vec![m.start, m.end]).unwrap_or_default()
}

fn strip_command_r_response(c: &str) -> String {
    match c.find("<|START_RESPONSE|>") {
        Some(p) => {
            let body = &c[p + "<|START_RESPONSE|>".len()..];
            let body = body.split("<|END_RESPONSE|>").next().unwrap_or("");
            format!("{}{}", &c[..p], body)
        }
        None => c.to_string(),
    }
}

/// Accumulates content segments and calls with llama.cpp's whitespace rules: text before a call
/// loses its trailing whitespace, text after a call its leading whitespace.
#[derive(Default)]
struct Acc {
    content: String,
    calls: Vec<ParsedToolCall>,
}

impl Acc {
    fn text(&mut self, seg: &str) {
        let seg = if self.calls.is_empty() {
            seg
        } else {
            seg.trim_start()
        };
        self.content.push_str(seg);
    }
    fn before_call(&mut self, seg: &str) {
        self.text(seg);
        let n = self.content.trim_end().len();
        self.content.truncate(n);
    }
    /// The tail after the last call: in partial mode a possible marker start and trailing
    /// whitespace are held back.
    fn tail(&mut self, seg: &str, partial: bool, markers: &[&str]) {
        if partial {
            let cut = seg.len() - partial_marker_len(seg, markers);
            self.before_call(&seg[..cut]);
        } else {
            self.text(seg);
        }
    }
    fn done(mut self) -> (String, Vec<ParsedToolCall>) {
        if !self.calls.is_empty() {
            let n = self.content.trim_end().len();
            self.content.truncate(n);
        }
        (self.content, self.calls)
    }
}

/// Result of reading one call object.
enum ObjCall {
    /// A complete call; the object ends at `end`.
    Done { call: ParsedToolCall, end: usize },
    /// The text ended inside it; the call so far once its name is known.
    Partial(Option<ParsedToolCall>),
    /// Not a call.
    Bad,
}

/// Arguments given as a value: objects and arrays as written; a string holding JSON as its text.
fn args_text(raw: &str) -> Option<String> {
    let v: Value = serde_json::from_str(raw).ok()?;
    match v {
        Value::String(s) => {
            serde_json::from_str::<Value>(&s).ok()?;
            Some(s)
        }
        _ => Some(raw.to_string()),
    }
}

/// Reads a call object at `i` with the name under one of `name_keys` and the arguments under one
/// of `args_keys` (absent = `{}`), the id under `id` when given.
fn call_object(s: &str, i: usize, name_keys: &[&str], args_keys: &[&str]) -> ObjCall {
    let (fields, end) = object_fields(s, i);
    if end == Scan::Bad {
        return ObjCall::Bad;
    }
    let get = |keys: &[&str]| fields.iter().find(|f| keys.contains(&f.key.as_str()));
    let name = get(name_keys).and_then(|f| {
        f.end
            .and_then(|e| serde_json::from_str::<String>(&s[f.start..e]).ok())
    });
    let id = get(&["id", "tool_call_id"]).and_then(|f| {
        f.end.and_then(|e| {
            serde_json::from_str::<Value>(&s[f.start..e])
                .ok()
                .map(|v| match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
        })
    });
    let args = get(args_keys);
    match end {
        Scan::Done(e) => {
            let Some(name) = name else {
                return ObjCall::Bad;
            };
            // Only the keys of a call may appear.
            let known = |k: &str| {
                name_keys.contains(&k)
                    || args_keys.contains(&k)
                    || matches!(k, "id" | "tool_call_id" | "type")
            };
            if !fields.iter().all(|f| known(&f.key)) {
                return ObjCall::Bad;
            }
            let arguments = match args {
                Some(f) => match f.end.and_then(|fe| args_text(&s[f.start..fe])) {
                    Some(a) => a,
                    None => return ObjCall::Bad,
                },
                None => "{}".to_string(),
            };
            ObjCall::Done {
                call: ParsedToolCall {
                    name,
                    arguments,
                    id,
                },
                end: e,
            }
        }
        _ => {
            let Some(name) = name else {
                return ObjCall::Partial(None);
            };
            let arguments = match args {
                // A string value is only used once complete.
                Some(f) if s[f.start..].starts_with('"') => String::new(),
                Some(f) => match f.end {
                    Some(fe) => args_text(&s[f.start..fe]).unwrap_or_default(),
                    None => s[f.start..].trim_end().to_string(),
                },
                None => String::new(),
            };
            ObjCall::Partial(Some(ParsedToolCall {
                name,
                arguments,
                id,
            }))
        }
    }
}

/// What follows at `j`: the literal, the text running out inside it (partial), or something else.
enum Lit {
    Yes(usize),
    More,
    No,
}

fn expect(s: &str, j: usize, lit: &str, partial: bool) -> Lit {
    let rest = &s[j.min(s.len())..];
    if rest.starts_with(lit) {
        Lit::Yes(j + lit.len())
    } else if partial && lit.starts_with(rest) {
        Lit::More
    } else {
        Lit::No
    }
}

fn find_first(s: &str, from: usize, pats: &[&str]) -> Option<(usize, usize)> {
    pats.iter()
        .filter_map(|p| s[from..].find(p).map(|i| (from + i, p.len())))
        .min()
}

fn parse_calls(format: ToolFormat, text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    match format {
        ToolFormat::Hermes => parse_tagged_json(text, partial, "<tool_call>", "</tool_call>"),
        ToolFormat::Llama3 => parse_llama3(text, partial),
        ToolFormat::Mistral => parse_mistral(text, partial),
        ToolFormat::DeepSeekR1 => parse_deepseek(text, partial),
        ToolFormat::CommandR7B => parse_command_r(text, partial),
        ToolFormat::FunctionaryV31 => parse_functionary_v31(text, partial),
        ToolFormat::FunctionaryV32 => parse_functionary_v32(text, partial),
        ToolFormat::Generic => parse_generic(text, partial),
    }
}

/// `OPEN {"name": …, "arguments": …} CLOSE`, repeated, with text around.
fn parse_tagged_json(
    text: &str,
    partial: bool,
    open: &str,
    close: &str,
) -> (String, Vec<ParsedToolCall>) {
    let mut acc = Acc::default();
    let mut pos = 0;
    loop {
        let Some(m) = text[pos..].find(open).map(|p| pos + p) else {
            acc.tail(&text[pos..], partial, &[open]);
            break;
        };
        let j = skip_ws(text, m + open.len());
        if j >= text.len() && partial {
            acc.before_call(&text[pos..m]);
            break;
        }
        match call_object(text, j, &["name"], &["arguments", "parameters"]) {
            ObjCall::Done { call, end } => {
                let k = skip_ws(text, end);
                match expect(text, k, close, partial) {
                    Lit::Yes(after) => {
                        acc.before_call(&text[pos..m]);
                        acc.calls.push(call);
                        pos = after;
                    }
                    Lit::More => {
                        acc.before_call(&text[pos..m]);
                        acc.calls.push(call);
                        break;
                    }
                    // A reply that ends right after the object (the closing tag was a stop).
                    Lit::No if k >= text.len() => {
                        acc.before_call(&text[pos..m]);
                        acc.calls.push(call);
                        break;
                    }
                    Lit::No => {
                        acc.text(&text[pos..]);
                        break;
                    }
                }
            }
            ObjCall::Partial(c) if partial => {
                acc.before_call(&text[pos..m]);
                acc.calls.extend(c);
                break;
            }
            _ => {
                acc.text(&text[pos..]);
                break;
            }
        }
    }
    acc.done()
}

/// Llama 3.x: the reply is one or more JSON calls (`;`- or newline-separated), or has a
/// `<|python_tag|>` call.
fn parse_llama3(text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    if let Some(p) = text.find(PYTHON_TAG) {
        let mut acc = Acc::default();
        acc.before_call(&text[..p]);
        let body = text[p + PYTHON_TAG.len()..].trim_start();
        if body.starts_with('{') {
            let (c, calls) = json_call_list(body, partial, &["parameters", "arguments"]);
            if c.is_empty() {
                acc.calls.extend(calls);
                return acc.done();
            }
        }
        match builtin_call(body) {
            Some(call) => acc.calls.push(call),
            None if partial => {}
            None => acc.calls.push(ParsedToolCall {
                name: "python".into(),
                arguments: json!({"code": body}).to_string(),
                id: None,
            }),
        }
        return acc.done();
    }
    let t = text.trim_start();
    if t.starts_with('{') {
        return json_call_list(text, partial, &["parameters", "arguments"]);
    }
    let mut acc = Acc::default();
    acc.tail(text, partial, &[PYTHON_TAG]);
    acc.done()
}

/// A reply that is a list of JSON call objects separated by whitespace or `;`; anything else is
/// content (held back in partial mode while undecided).
fn json_call_list(text: &str, partial: bool, args_keys: &[&str]) -> (String, Vec<ParsedToolCall>) {
    let mut calls = Vec::new();
    let mut j = skip_ws(text, 0);
    loop {
        match call_object(text, j, &["name"], args_keys) {
            ObjCall::Done { call, end } => {
                calls.push(call);
                let mut k = skip_ws(text, end);
                if text[k..].starts_with(';') {
                    k = skip_ws(text, k + 1);
                }
                if k >= text.len() {
                    return (String::new(), calls);
                }
                if !text[k..].starts_with('{') {
                    return (text.to_string(), Vec::new());
                }
                j = k;
            }
            ObjCall::Partial(c) if partial => {
                calls.extend(c);
                return (String::new(), calls);
            }
            _ => return (text.to_string(), Vec::new()),
        }
    }
}

/// `name.call(key="value", n=1)` (Llama 3.1's built-in tools).
fn builtin_call(body: &str) -> Option<ParsedToolCall> {
    let open = body.find(".call(")?;
    let name = body[..open].trim();
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let inner = body[open + ".call(".len()..].trim_end();
    let inner = inner.strip_suffix(')')?;
    let mut args = serde_json::Map::new();
    let mut i = 0;
    while i < inner.len() {
        i = skip_ws(inner, i);
        if i >= inner.len() {
            break;
        }
        let eq = inner[i..].find('=')? + i;
        let key = inner[i..eq].trim().to_string();
        let v = skip_ws(inner, eq + 1);
        let Scan::Done(e) = scan_value(inner, v) else {
            return None;
        };
        args.insert(key, serde_json::from_str(&inner[v..e]).ok()?);
        i = skip_ws(inner, e);
        if inner[i..].starts_with(',') {
            i += 1;
        }
    }
    Some(ParsedToolCall {
        name: name.to_string(),
        arguments: Value::Object(args).to_string(),
        id: None,
    })
}

fn parse_mistral(text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    const TC: &str = "[TOOL_CALLS]";
    let mut acc = Acc::default();
    let Some(m) = text.find(TC) else {
        acc.tail(text, partial, &[TC]);
        return acc.done();
    };
    acc.before_call(&text[..m]);
    let mut j = m + TC.len();
    loop {
        j = skip_ws(text, j);
        if j >= text.len() {
            return acc.done();
        }
        if text[j..].starts_with('[') {
            // Nemo: a JSON array of calls.
            let mut k = j + 1;
            loop {
                k = skip_ws(text, k);
                if k >= text.len() {
                    return acc.done();
                }
                match call_object(text, k, &["name"], &["arguments", "parameters"]) {
                    ObjCall::Done { call, end } => {
                        acc.calls.push(call);
                        k = skip_ws(text, end);
                        if text[k..].starts_with(',') {
                            k += 1;
                        } else if text[k..].starts_with(']') {
                            j = k + 1;
                            break;
                        } else if k >= text.len() && partial {
                            return acc.done();
                        } else {
                            return malformed(text, m, partial);
                        }
                    }
                    // A Nemo call's id follows its arguments: the call is announced once
                    // complete, so the streamed id is the model's.
                    ObjCall::Partial(_) if partial => return acc.done(),
                    _ => return malformed(text, m, partial),
                }
            }
        } else {
            // Small 3.2 / Magistral: name[CALL_ID]id[ARGS]{…}
            let rest = &text[j..];
            let Some(a) = rest.find("[ARGS]") else {
                if partial {
                    return acc.done();
                }
                return malformed(text, m, partial);
            };
            let head = &rest[..a];
            let (name, id) = match head.split_once("[CALL_ID]") {
                Some((n, id)) => (n.trim(), Some(id.trim().to_string())),
                None => (head.trim(), None),
            };
            let v = j + a + "[ARGS]".len();
            match scan_value(text, v) {
                Scan::Done(e) => {
                    let Some(arguments) = args_text(text[v..e].trim()) else {
                        return malformed(text, m, partial);
                    };
                    acc.calls.push(ParsedToolCall {
                        name: name.to_string(),
                        arguments,
                        id,
                    });
                    j = e;
                }
                Scan::Partial if partial => {
                    acc.calls.push(ParsedToolCall {
                        name: name.to_string(),
                        arguments: text[skip_ws(text, v)..].trim_end().to_string(),
                        id,
                    });
                    return acc.done();
                }
                _ => return malformed(text, m, partial),
            }
        }
        j = skip_ws(text, j);
        match expect(text, j, TC, partial) {
            Lit::Yes(k) => j = k,
            Lit::More => return acc.done(),
            Lit::No => {
                acc.tail(&text[j..], partial, &[TC]);
                return acc.done();
            }
        }
    }
}

/// A call section that does not parse: everything from its start is content (in partial mode it
/// is held back, since the model may still be writing it).
fn malformed(text: &str, m: usize, partial: bool) -> (String, Vec<ParsedToolCall>) {
    let mut acc = Acc::default();
    if partial {
        acc.before_call(&text[..m]);
    } else {
        acc.text(text);
    }
    acc.done()
}

fn parse_deepseek(text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    let mut acc = Acc::default();
    let Some((m, len)) = find_first(text, 0, &DEEPSEEK_CALLS_BEGIN) else {
        acc.tail(text, partial, &DEEPSEEK_CALLS_BEGIN);
        return acc.done();
    };
    acc.before_call(&text[..m]);
    let mut j = m + len;
    loop {
        j = skip_ws(text, j);
        if j >= text.len() {
            return acc.done();
        }
        match expect(text, j, DEEPSEEK_CALLS_END, partial) {
            Lit::Yes(k) => {
                acc.tail(&text[k..], partial, &[]);
                return acc.done();
            }
            Lit::More => return acc.done(),
            Lit::No => {}
        }
        let k = match expect(text, j, DEEPSEEK_CALL_BEGIN, partial) {
            Lit::Yes(k) => k,
            Lit::More => return acc.done(),
            Lit::No => return malformed(text, m, partial),
        };
        let Some(sep) = text[k..].find(DEEPSEEK_SEP) else {
            return if partial {
                acc.done()
            } else {
                malformed(text, m, partial)
            };
        };
        let after_sep = k + sep + DEEPSEEK_SEP.len();
        let Some(nl) = text[after_sep..].find('\n') else {
            return if partial {
                acc.done()
            } else {
                malformed(text, m, partial)
            };
        };
        let name = text[after_sep..after_sep + nl].trim().to_string();
        let mut v = after_sep + nl + 1;
        let fence = match expect(text, v, "```json", partial) {
            Lit::Yes(e) => {
                v = e;
                true
            }
            Lit::More => return acc.done(),
            Lit::No => false,
        };
        let v = skip_ws(text, v);
        match scan_value(text, v) {
            Scan::Done(e) => {
                let Some(arguments) = args_text(&text[v..e]) else {
                    return malformed(text, m, partial);
                };
                let mut q = skip_ws(text, e);
                if fence {
                    match expect(text, q, "```", partial) {
                        Lit::Yes(e2) => q = skip_ws(text, e2),
                        Lit::More => {
                            acc.calls.push(ParsedToolCall {
                                name,
                                arguments,
                                id: None,
                            });
                            return acc.done();
                        }
                        Lit::No => return malformed(text, m, partial),
                    }
                }
                acc.calls.push(ParsedToolCall {
                    name,
                    arguments,
                    id: None,
                });
                match expect(text, q, DEEPSEEK_CALL_END, partial) {
                    Lit::Yes(e3) => j = e3,
                    Lit::More => return acc.done(),
                    Lit::No if q >= text.len() => return acc.done(),
                    Lit::No => {
                        acc.calls.pop();
                        return malformed(text, m, partial);
                    }
                }
            }
            Scan::Partial if partial => {
                acc.calls.push(ParsedToolCall {
                    name,
                    arguments: text[v..].trim_end().to_string(),
                    id: None,
                });
                return acc.done();
            }
            _ => return malformed(text, m, partial),
        }
    }
}

fn parse_command_r(text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    const START: &str = "<|START_ACTION|>";
    const END: &str = "<|END_ACTION|>";
    let markers = ToolFormat::CommandR7B.markers();
    let mut acc = Acc::default();
    let Some(m) = text.find(START) else {
        acc.tail(text, partial, markers);
        return acc.done();
    };
    acc.before_call(&text[..m]);
    let mut k = skip_ws(text, m + START.len());
    if k >= text.len() {
        return acc.done();
    }
    if !text[k..].starts_with('[') {
        return malformed(text, m, partial);
    }
    k += 1;
    loop {
        k = skip_ws(text, k);
        if k >= text.len() {
            return acc.done();
        }
        if text[k..].starts_with(']') {
            k += 1;
            break;
        }
        match call_object(text, k, &["tool_name"], &["parameters"]) {
            ObjCall::Done { call, end } => {
                acc.calls.push(call);
                k = skip_ws(text, end);
                if text[k..].starts_with(',') {
                    k += 1;
                }
            }
            ObjCall::Partial(c) if partial => {
                acc.calls.extend(c);
                return acc.done();
            }
            _ => return malformed(text, m, partial),
        }
    }
    let k = skip_ws(text, k);
    match expect(text, k, END, partial) {
        Lit::Yes(e) => acc.tail(&text[e..], partial, markers),
        Lit::More => {}
        Lit::No => acc.tail(&text[k..], partial, markers),
    }
    acc.done()
}

fn parse_functionary_v31(text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    const OPEN: &str = "<function=";
    const CLOSE: &str = "</function>";
    let mut acc = Acc::default();
    let mut pos = 0;
    loop {
        let Some((m, _)) = find_first(text, pos, &[OPEN, PYTHON_TAG]) else {
            acc.tail(&text[pos..], partial, &[OPEN, PYTHON_TAG]);
            return acc.done();
        };
        if text[m..].starts_with(PYTHON_TAG) {
            acc.before_call(&text[pos..m]);
            let code = &text[m + PYTHON_TAG.len()..];
            if !partial {
                acc.calls.push(ParsedToolCall {
                    name: "python".into(),
                    arguments: json!({"code": code}).to_string(),
                    id: None,
                });
            }
            return acc.done();
        }
        let n = m + OPEN.len();
        let Some(gt) = text[n..].find('>') else {
            if partial {
                acc.before_call(&text[pos..m]);
                return acc.done();
            }
            acc.text(&text[pos..]);
            return acc.done();
        };
        let name = text[n..n + gt].trim().to_string();
        let v = skip_ws(text, n + gt + 1);
        match scan_value(text, v) {
            Scan::Done(e) => {
                let Some(arguments) = args_text(&text[v..e]) else {
                    acc.text(&text[pos..]);
                    return acc.done();
                };
                let k = skip_ws(text, e);
                match expect(text, k, CLOSE, partial) {
                    Lit::Yes(after) => {
                        acc.before_call(&text[pos..m]);
                        acc.calls.push(ParsedToolCall {
                            name,
                            arguments,
                            id: None,
                        });
                        pos = after;
                    }
                    Lit::More => {
                        acc.before_call(&text[pos..m]);
                        acc.calls.push(ParsedToolCall {
                            name,
                            arguments,
                            id: None,
                        });
                        return acc.done();
                    }
                    Lit::No => {
                        acc.text(&text[pos..]);
                        return acc.done();
                    }
                }
            }
            Scan::Partial if partial => {
                acc.before_call(&text[pos..m]);
                acc.calls.push(ParsedToolCall {
                    name,
                    arguments: text[v.min(text.len())..].trim_end().to_string(),
                    id: None,
                });
                return acc.done();
            }
            _ => {
                acc.text(&text[pos..]);
                return acc.done();
            }
        }
    }
}

fn parse_functionary_v32(text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    let mut acc = Acc::default();
    // The prompt ends with the first `>>>`, so the reply starts with a recipient.
    let segments: Vec<&str> = text.split(">>>").collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i == last;
        let Some((recipient, body)) = seg.split_once('\n') else {
            if is_last && partial {
                break;
            }
            // No recipient line: plain content (a model that skipped the format).
            acc.text(seg);
            continue;
        };
        let recipient = recipient.trim();
        if recipient == "all" {
            if is_last {
                acc.tail(body, partial, &[">>>"]);
            } else {
                acc.before_call(body);
            }
            continue;
        }
        let body = if is_last && partial {
            &body[..body.len() - partial_marker_len(body, &[">>>"])]
        } else {
            body
        };
        let b = skip_ws(body, 0);
        match scan_value(body, b) {
            Scan::Done(e) if body[e..].trim().is_empty() => match args_text(&body[b..e]) {
                Some(arguments) => acc.calls.push(ParsedToolCall {
                    name: recipient.to_string(),
                    arguments,
                    id: None,
                }),
                None => acc.text(seg),
            },
            Scan::Partial if partial && is_last => {
                acc.calls.push(ParsedToolCall {
                    name: recipient.to_string(),
                    arguments: body[b..].trim_end().to_string(),
                    id: None,
                });
            }
            _ if recipient == "python" => {
                if !(partial && is_last) {
                    acc.calls.push(ParsedToolCall {
                        name: "python".into(),
                        arguments: json!({"code": body}).to_string(),
                        id: None,
                    });
                }
            }
            _ => acc.text(seg),
        }
    }
    acc.done()
}

/// llama.cpp's generic form: the reply is `{"tool_calls": [{"name", "arguments", "id"?}]}`,
/// `{"tool_call": {…}}` or `{"response": …}`; anything else is content.
fn parse_generic(text: &str, partial: bool) -> (String, Vec<ParsedToolCall>) {
    let t = text.trim();
    if !t.starts_with('{') {
        return (text.to_string(), Vec::new());
    }
    if partial {
        // Undecided until the object is complete.
        return match scan_value(t, 0) {
            Scan::Partial => (String::new(), Vec::new()),
            _ => parse_generic(text, false),
        };
    }
    let Ok(v) = serde_json::from_str::<Value>(t) else {
        return (text.to_string(), Vec::new());
    };
    let one = |c: &Value| -> Option<ParsedToolCall> {
        let name = c.get("name")?.as_str()?.to_string();
        let arguments = match c.get("arguments") {
            Some(Value::String(s)) => s.clone(),
            Some(a) => a.to_string(),
            None => "{}".into(),
        };
        let id = c.get("id").and_then(Value::as_str).map(str::to_string);
        Some(ParsedToolCall {
            name,
            arguments,
            id,
        })
    };
    if let Some(Value::Array(calls)) = v.get("tool_calls") {
        if let Some(calls) = calls.iter().map(one).collect::<Option<Vec<_>>>() {
            return (String::new(), calls);
        }
    } else if let Some(c) = v.get("tool_call").and_then(one) {
        return (String::new(), vec![c]);
    } else if let Some(r) = v.get("response") {
        return match r {
            Value::String(s) => (s.clone(), Vec::new()),
            other => (other.to_string(), Vec::new()),
        };
    }
    (text.to_string(), Vec::new())
}

/// The JSON schema of one call object `{"name": NAME, "arguments": PARAMETERS}` (keys named per
/// format), from an OpenAI tool `{"type":"function","function":{"name","parameters"}}`.
fn call_schema(tool: &Value, name_key: &str, args_key: &str) -> Option<Value> {
    let f = tool.get("function")?;
    let name = f.get("name")?.as_str()?;
    let params = f
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}));
    Some(with_guidance(json!({
        "type": "object",
        "properties": {name_key: {"const": name}, args_key: params},
        "required": [name_key, args_key],
        "additionalProperties": false,
    })))
}

/// llguidance's JSON options for a forced call: fixed separators (`", "`, `": "`), so the model
/// cannot spend its tokens on whitespace, and lenient about schema keywords llguidance lacks.
fn with_guidance(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "lenient": true}),
        );
    }
    schema
}

/// Why a forced-call grammar cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolGrammarError {
    /// No tool (after filtering by name) to call.
    #[error("tool_choice asks for a tool call but no tool matches{0}")]
    NoTool(String),
    /// A tool is not `{"type":"function","function":{"name",…}}`.
    #[error("tools[{0}] is not a function tool with a name")]
    BadTool(usize),
    /// The format has no forced-call grammar here.
    #[error("forcing a tool call is not supported for the {0} call format")]
    Unsupported(&'static str),
}

/// A Lark grammar (llguidance syntax, with `%json` sub-grammars) that accepts exactly one call of
/// one of `tools` — only the one named `only` when given — in `format`'s syntax, or one or more
/// calls when `parallel` (llama.cpp builds the same shape in GBNF in its `common_chat_params_init_*`).
/// `think_end`: the generation prompt leaves a thinking block open, so the grammar first closes
/// it with this marker (the reasoning of a forced call is empty).
///
/// Errors: [`ToolGrammarError`].
pub fn forced_call_grammar(
    format: ToolFormat,
    tools: &[Value],
    only: Option<&str>,
    parallel: bool,
    think_end: Option<&str>,
) -> Result<String, ToolGrammarError> {
    let (name_key, args_key) = match format {
        ToolFormat::Llama3 => ("name", "parameters"),
        ToolFormat::CommandR7B => ("tool_name", "parameters"),
        _ => ("name", "arguments"),
    };
    let mut schemas = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or(ToolGrammarError::BadTool(i))?;
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let s = match format {
            ToolFormat::FunctionaryV31 | ToolFormat::FunctionaryV32 => {
                let p = t["function"]
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"}));
                (name.to_string(), with_guidance(p))
            }
            _ => (
                name.to_string(),
                call_schema(t, name_key, args_key).ok_or(ToolGrammarError::BadTool(i))?,
            ),
        };
        schemas.push(s);
    }
    if schemas.is_empty() {
        return Err(ToolGrammarError::NoTool(
            only.map(|o| format!(" the name {o:?}")).unwrap_or_default(),
        ));
    }
    let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut rules = Vec::new();
    let mut alts = Vec::new();
    for (i, (name, schema)) in schemas.iter().enumerate() {
        let body = match format {
            ToolFormat::Hermes => {
                format!("{} call{i} {}", lit("<tool_call>\n"), lit("\n</tool_call>"))
            }
            ToolFormat::Generic | ToolFormat::Llama3 => format!("call{i}"),
            ToolFormat::Mistral => format!("call{i}"),
            ToolFormat::CommandR7B => format!("call{i}"),
            ToolFormat::DeepSeekR1 => {
                // DeepSeek's schema is the arguments alone.
                let p = with_guidance(schema["properties"][args_key].clone());
                rules.push(format!("args{i}: %json {p}"));
                format!(
                    "{} args{i} {}",
                    lit(&format!(
                        "{DEEPSEEK_CALL_BEGIN}function{DEEPSEEK_SEP}{name}\n```json\n"
                    )),
                    lit(&format!("\n```{DEEPSEEK_CALL_END}"))
                )
            }
            ToolFormat::FunctionaryV31 => {
                format!(
                    "{} call{i} {}",
                    lit(&format!("<function={name}>")),
                    lit("</function>")
                )
            }
            ToolFormat::FunctionaryV32 => format!("{} call{i}", lit(&format!("{name}\n"))),
        };
        if format != ToolFormat::DeepSeekR1 {
            rules.push(format!("call{i}: %json {schema}"));
        }
        alts.push(body);
    }
    let one = format!("one: {}", alts.join(" | "));
    let start = match format {
        ToolFormat::Hermes | ToolFormat::FunctionaryV31 => {
            if parallel {
                "calls: one (\"\\n\" one)*".to_string()
            } else {
                "calls: one".to_string()
            }
        }
        ToolFormat::Generic => {
            // {"tool_calls": [call, …]}
            let sep = if parallel { " (\", \" one)*" } else { "" };
            format!("calls: \"{{\\\"tool_calls\\\": [\" one{sep} \"]}}\"")
        }
        ToolFormat::Llama3 => {
            if parallel {
                "calls: one (\"; \" one)*".to_string()
            } else {
                "calls: one".to_string()
            }
        }
        ToolFormat::Mistral => {
            let sep = if parallel { " (\", \" one)*" } else { "" };
            format!("calls: \"[TOOL_CALLS][\" one{sep} \"]\"")
        }
        ToolFormat::CommandR7B => {
            let sep = if parallel { " (\", \" one)*" } else { "" };
            format!("calls: \"<|START_ACTION|>[\" one{sep} \"]<|END_ACTION|>\"")
        }
        ToolFormat::DeepSeekR1 => {
            let rep = if parallel { " (\"\\n\" one)*" } else { "" };
            format!(
                "calls: {} one{rep} {}",
                lit(DEEPSEEK_CALLS_BEGIN[0]),
                lit(DEEPSEEK_CALLS_END)
            )
        }
        ToolFormat::FunctionaryV32 => {
            if parallel {
                "calls: one (\">>>\" one)*".to_string()
            } else {
                "calls: one".to_string()
            }
        }
    };
    let top = match think_end {
        Some(end) => format!("start: {} WS calls\nWS: /[ \\t\\n]*/", lit(end)),
        None => "start: calls".to_string(),
    };
    let mut g = vec![top, start, one];
    g.extend(rules);
    Ok(g.join("\n") + "\n")
}

/// What is new in a reply between two parses, in the shape of OpenAI's streamed `delta`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplyDelta {
    /// New content text.
    pub content: String,
    /// New reasoning text.
    pub reasoning_content: String,
    /// New calls (with their name) and new argument text of calls already announced.
    pub tool_calls: Vec<ToolCallDelta>,
}

/// One entry of `delta.tool_calls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    /// Position of the call in the reply.
    pub index: usize,
    /// Set in the first delta of a call.
    pub name: Option<String>,
    /// The call's own id when the format has one (first delta only).
    pub id: Option<String>,
    /// Argument text to append.
    pub arguments: String,
}

impl ReplyDelta {
    /// Nothing new.
    pub fn is_empty(&self) -> bool {
        self.content.is_empty() && self.reasoning_content.is_empty() && self.tool_calls.is_empty()
    }
}

/// `cur` minus its common prefix with `prev` (on a character boundary). Parses of a growing
/// reply extend each other, so this is normally `cur[prev.len()..]`
/// (llama.cpp's `common_chat_msg_diff::compute_diffs`).
fn suffix<'a>(prev: &str, cur: &'a str) -> &'a str {
    if let Some(s) = cur.strip_prefix(prev) {
        return s;
    }
    let mut n = prev
        .bytes()
        .zip(cur.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    while !cur.is_char_boundary(n) {
        n -= 1;
    }
    &cur[n..]
}

/// The delta from one parse of a reply to the next.
pub fn diff(prev: &ParsedReply, cur: &ParsedReply) -> ReplyDelta {
    let mut d = ReplyDelta {
        content: suffix(&prev.content, &cur.content).to_string(),
        reasoning_content: suffix(&prev.reasoning_content, &cur.reasoning_content).to_string(),
        tool_calls: Vec::new(),
    };
    for (i, c) in cur.tool_calls.iter().enumerate() {
        match prev.tool_calls.get(i) {
            Some(p) => {
                let a = suffix(&p.arguments, &c.arguments);
                if !a.is_empty() {
                    d.tool_calls.push(ToolCallDelta {
                        index: i,
                        name: None,
                        id: None,
                        arguments: a.to_string(),
                    });
                }
            }
            None => d.tool_calls.push(ToolCallDelta {
                index: i,
                name: Some(c.name.clone()),
                id: c.id.clone(),
                arguments: c.arguments.clone(),
            }),
        }
    }
    d
}

#[cfg(test)]
mod tests;
