//! What a chat template supports (system role, string or typed content, tool calls, …), found by
//! rendering probe conversations as llama.cpp's `jinja::caps_get` does (`common/jinja/caps.cpp`,
//! commit 0c1e570). llama.cpp's engine records which input values a render touched; here the probe
//! inputs are [`TrackedMap`] objects that record which of their keys the template read.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, Value};
use serde_json::json;

/// Capabilities of a template, named and defaulted as llama.cpp's `jinja::caps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// The template reads `tools[i].function.name`.
    pub supports_tools: bool,
    /// The template reads `messages[i].tool_calls`.
    pub supports_tool_calls: bool,
    /// The template reads the content of a leading system message.
    pub supports_system_role: bool,
    /// The template reads the second of two tool calls.
    pub supports_parallel_tool_calls: bool,
    /// The template renders a message content given as a string.
    pub supports_string_content: bool,
    /// The template renders a message content given as an array of `{type, text}` parts.
    pub supports_typed_content: bool,
    /// The template reads tool-call arguments as an object (`arguments.arg`), not a JSON string.
    pub supports_object_arguments: bool,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            supports_tools: true,
            supports_tool_calls: true,
            supports_system_role: true,
            supports_parallel_tool_calls: true,
            supports_string_content: true,
            supports_typed_content: false,
            supports_object_arguments: false,
        }
    }
}

/// A JSON object exposed to the template as a map that remembers which keys were read.
#[derive(Debug)]
pub(crate) struct TrackedMap {
    entries: Vec<(String, Value)>,
    used: Mutex<HashSet<String>>,
}

impl TrackedMap {
    /// Whether the template read `key` of this map.
    fn was_read(&self, key: &str) -> bool {
        self.used.lock().map(|u| u.contains(key)).unwrap_or(false)
    }

    /// The value under `key`, without marking it read.
    fn peek(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl Object for TrackedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let k = key.as_str()?;
        let v = self.peek(k)?.clone();
        if let Ok(mut used) = self.used.lock() {
            used.insert(k.to_string());
        }
        Some(v)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.entries
                .iter()
                .map(|(k, _)| Value::from(k.as_str()))
                .collect(),
        )
    }
}

/// Converts JSON to template values whose objects are [`TrackedMap`]s.
pub(crate) fn tracked(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Object(m) => Value::from_object(TrackedMap {
            entries: m.iter().map(|(k, v)| (k.clone(), tracked(v))).collect(),
            used: Mutex::new(HashSet::new()),
        }),
        serde_json::Value::Array(a) => Value::from(a.iter().map(tracked).collect::<Vec<_>>()),
        other => Value::from_serialize(other),
    }
}

/// Walks `path` (map keys or sequence indices) from `root` without marking anything read, and
/// tells whether the last key was read by the template.
fn was_read(root: &Value, path: &[&str]) -> bool {
    let Some((last, init)) = path.split_last() else {
        return false;
    };
    let mut cur = root.clone();
    for seg in init {
        let next = if let Ok(i) = seg.parse::<usize>() {
            cur.get_item_by_index(i).ok()
        } else {
            cur.downcast_object_ref::<TrackedMap>()
                .and_then(|m| m.peek(seg).cloned())
        };
        match next {
            Some(n) if !n.is_undefined() => cur = n,
            _ => return false,
        }
    }
    cur.downcast_object_ref::<TrackedMap>()
        .is_some_and(|m| m.was_read(last))
}

struct Probe {
    ok: bool,
    output: String,
    messages: Value,
    tools: Value,
}

fn probe(
    env: &Environment<'static>,
    messages: serde_json::Value,
    tools: serde_json::Value,
) -> Probe {
    let messages = tracked(&messages);
    let tools = tracked(&tools);
    let ctx = minijinja::context! {
        messages => messages.clone(),
        tools => tools.clone(),
        bos_token => "",
        eos_token => "",
        add_generation_prompt => true,
    };
    let result = super::jinja::render_capped(env, ctx);
    match result {
        Ok(output) => Probe {
            ok: true,
            output,
            messages,
            tools,
        },
        Err(_) => Probe {
            ok: false,
            output: String::new(),
            messages,
            tools,
        },
    }
}

const STRING_MARKER: &str = "STRING_MARKER";

fn tool_probe_messages(args: serde_json::Value, parallel: bool) -> serde_json::Value {
    let call = |id: &str| json!({"id": id, "type": "function", "function": {"name": "tool1", "arguments": args.clone()}});
    let calls = if parallel {
        json!([call("call00001"), call("call00002")])
    } else {
        json!([call("call00001")])
    };
    json!([
        {"role": "user", "content": "User message"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "Tool response", "tool_call_id": "call00001"},
        {"role": "assistant", "content": "The tool response was 'tool response'"},
        {"role": "user", "content": "User message"},
    ])
}

fn probe_tools() -> serde_json::Value {
    json!([{
        "name": "tool",
        "type": "function",
        "function": {
            "name": "tool1",
            "description": "Tool description",
            "parameters": {
                "type": "object",
                "properties": {"arg": {"type": "string", "description": "Arg description"}},
                "required": ["arg"],
            },
        },
    }])
}

/// Detects the capabilities of the template stored in `env`, with llama.cpp's probe inputs.
///
/// Content kinds: llama.cpp watches whether a string content is iterated or indexed; minijinja
/// happily iterates strings, so here a content kind counts as supported when the probe renders
/// without error and the marker text shows up in the output (for typed content: without the
/// parts' Python repr around it).
pub(crate) fn detect(env: &Environment<'static>) -> Caps {
    let mut caps = Caps::default();

    // Content as a string vs as typed parts.
    let p = probe(
        env,
        json!([{"role": "user", "content": STRING_MARKER}]),
        json!([]),
    );
    let string_ok = p.ok && p.output.contains(STRING_MARKER);
    let p = probe(
        env,
        json!([{"role": "user", "content": [{"type": "text", "text": STRING_MARKER}]}]),
        json!([]),
    );
    let typed_ok = p.ok
        && p.output.contains(STRING_MARKER)
        && !p.output.contains("'type'")
        && !p.output.contains("\"type\"");
    if !string_ok && typed_ok {
        caps.supports_string_content = false;
        caps.supports_typed_content = true;
    } else if string_ok && typed_ok {
        caps.supports_typed_content = true;
    }

    // System role: is the system message's content read at all?
    let p = probe(
        env,
        json!([
            {"role": "system", "content": "System message"},
            {"role": "user", "content": "User message"},
        ]),
        json!([]),
    );
    if !was_read(&p.messages, &["0", "content"]) {
        caps.supports_system_role = false;
    }

    // Tools with object arguments.
    let p = probe(
        env,
        tool_probe_messages(json!({"arg": "value"}), false),
        probe_tools(),
    );
    if p.ok {
        if !was_read(&p.tools, &["0", "function", "name"]) {
            caps.supports_tools = false;
        }
        if !was_read(&p.messages, &["1", "tool_calls"]) {
            caps.supports_tool_calls = false;
        } else if was_read(
            &p.messages,
            &["1", "tool_calls", "0", "function", "arguments", "arg"],
        ) {
            caps.supports_object_arguments = true;
        }
    }
    if !caps.supports_object_arguments {
        let p = probe(
            env,
            tool_probe_messages(json!(r#"{"arg": "value"}"#), false),
            probe_tools(),
        );
        if !p.ok {
            caps.supports_tool_calls = false;
            caps.supports_tools = false;
        } else {
            if !was_read(&p.tools, &["0", "function", "name"]) {
                caps.supports_tools = false;
            }
            if !was_read(&p.messages, &["1", "tool_calls"]) {
                caps.supports_tool_calls = false;
            }
        }
    }

    // Parallel tool calls: is the second call's function read?
    let args = if caps.supports_object_arguments {
        json!({"arg": "value"})
    } else {
        json!(r#"{"arg": "value"}"#)
    };
    let p = probe(env, tool_probe_messages(args, true), probe_tools());
    if !p.ok || !was_read(&p.messages, &["1", "tool_calls", "1", "function"]) {
        caps.supports_parallel_tool_calls = false;
    }
    caps
}

/// Renders `messages` with `enable_thinking` as llama.cpp's template analyser does (no tools,
/// empty special tokens); `None` when the template fails.
fn render_plain(
    env: &Environment<'static>,
    messages: serde_json::Value,
    add_generation_prompt: bool,
    enable_thinking: bool,
) -> Option<String> {
    let mut ctx = serde_json::Map::new();
    ctx.insert("messages".into(), messages);
    ctx.insert("bos_token".into(), json!(""));
    ctx.insert("eos_token".into(), json!(""));
    ctx.insert("enable_thinking".into(), json!(enable_thinking));
    if add_generation_prompt {
        ctx.insert("add_generation_prompt".into(), json!(true));
    }
    super::jinja::render_capped(env, Value::from_serialize(&ctx)).ok()
}

/// Whether llama-server would pass `enable_thinking: true` to this template: it does so only when
/// the template "supports thinking" — a specialised handler says so (`common/parsers/*.cpp`), or
/// the differential analyser (`common/chat-diff-analyzer.cpp`, `analyze_reasoning`) finds reasoning
/// markers. This follows the analyser's two main probes: reasoning content rendered in the history,
/// and a generation prompt that only grows (or only shrinks) when thinking is switched on.
pub(crate) fn supports_thinking(env: &Environment<'static>, src: &str) -> bool {
    let has = |s: &str| src.contains(s);
    // Specialised handlers (`common_chat_try_specialized_template`), in llama.cpp's order.
    if has("[SYSTEM_PROMPT]") && has("[TOOL_CALLS]") && has("[ARGS]") && !has("[CALL_ID]") {
        return true; // Ministral 3
    }
    if has("<|channel|>")
        || (has("<atem:function_calls>") && has("<|eom|>"))
        || (has("<|tool_calls_section_begin|>") && has("<|tool_call_begin|>"))
        || (has("<|open|>") && has("<|close|>") && has("<|end_of_msg|>"))
        || (has("<role>ASSISTANT</role>") && has("<arg_key>"))
        || (has("<|START_TEXT|>") && has("<|START_ACTION|>"))
        || (has("<|tool_list_start|>") && has("<|tool_list_end|>"))
        || (has("List of tools: [") && !has("<|tool_list_start|>"))
    {
        return true;
    }
    if has(">>>all") && has(">>>${recipient}") {
        return false; // Functionary v3.2 leaves it unset
    }
    if has("<|role_sep|>") && has("<|message_sep|>") && !has("<|function_call|>") {
        return false; // GigaChat v3
    }
    if (has("]<]minimax[>[") && has("<tool_call>") && has("<invoke name="))
        || (has("dsml_token") && has("DSML") && (has("function_calls") || has("tool_calls")))
        || has("'<|tool_call>call:'")
        || (has("Tool usage guidelines:") && has("<function name=\"") && has("<param name=\""))
    {
        return true;
    }
    // Analyser workarounds: old Qwen/DeepSeek thinking templates, Granite 3.3, Nemotron Nano v2.
    if (has("content.split('</think>')") && !has("reasoning_content") && !has("<SPECIAL_12>"))
        || has(
            "Write your thoughts between <think></think> and write your response between <response></response>",
        )
        || (has("<SPECIAL_10>")
            && has("<SPECIAL_11>")
            && has("<SPECIAL_12>")
            && has("<TOOL_RESPONSE>"))
    {
        return true;
    }
    const USER: &str = "U_USER_MSG Hello END_U";
    const ASSISTANT: &str = "A_ASST_MSG I can help END_A";
    const THINKING: &str = "REASON_PART I am thinking END_R";
    // Probe 1: reasoning content shows up in the history, followed by a closing marker.
    if let Some(out) = render_plain(
        env,
        json!([
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ASSISTANT, "reasoning_content": THINKING},
        ]),
        false,
        true,
    ) && let Some(pos) = out.find(THINKING)
    {
        let after = out[pos + THINKING.len()..].trim_start();
        if after.starts_with('<') || after.starts_with('[') {
            return true;
        }
    }
    // Probe 2: the generation prompt gains or loses a tail when thinking is switched on.
    let msgs = json!([{"role": "user", "content": USER}]);
    if let (Some(a), Some(b)) = (
        render_plain(env, msgs.clone(), true, false),
        render_plain(env, msgs, true, true),
    ) && a != b
    {
        let prefix = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
        let (ra, rb) = (&a[floor_char(&a, prefix)..], &b[floor_char(&b, prefix)..]);
        let suffix = ra
            .bytes()
            .rev()
            .zip(rb.bytes().rev())
            .take_while(|(x, y)| x == y)
            .count();
        let left = &ra[..ra.len() - suffix];
        let right = &rb[..rb.len() - suffix];
        if (left.trim().is_empty() && !right.trim().is_empty() && b.ends_with(right.trim()))
            || (right.trim().is_empty() && !left.trim().is_empty() && a.ends_with(left.trim()))
        {
            return true;
        }
    }
    false
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::super::jinja::build_env;
    use super::*;

    #[test]
    fn chatml_supports_system_and_strings_only() {
        let env = build_env(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        )
        .unwrap();
        let caps = detect(&env);
        assert!(caps.supports_system_role);
        assert!(caps.supports_string_content);
        assert!(!caps.supports_typed_content);
        assert!(!caps.supports_tool_calls);
        assert!(!caps.supports_tools);
    }

    #[test]
    fn rejecting_system_role_is_detected() {
        let env = build_env(
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
             {% for m in messages %}{{ m.content }}{% endfor %}",
        )
        .unwrap();
        assert!(!detect(&env).supports_system_role);
    }

    #[test]
    fn typed_only_templates_are_detected() {
        let env = build_env(
            "{% for m in messages %}{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let caps = detect(&env);
        assert!(!caps.supports_string_content);
        assert!(caps.supports_typed_content);
    }

    #[test]
    fn tool_calls_with_object_arguments_are_detected() {
        let env = build_env(
            "{% for t in tools %}{{ t.function.name }}{% endfor %}{% for m in messages %}{{ m.content }}\
             {% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments.arg }}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let caps = detect(&env);
        assert!(caps.supports_tools);
        assert!(caps.supports_tool_calls);
        assert!(caps.supports_object_arguments);
        assert!(caps.supports_parallel_tool_calls);
    }
}
