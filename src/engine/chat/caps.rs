//! What a chat template supports (system role, string or typed content, tool calls, …), found by
//! rendering probe conversations as llama.cpp's `jinja::caps_get` does (`common/jinja/caps.cpp`,
//! commit 0c1e570). llama.cpp's engine records which input values a render touched; here the probe
//! inputs are [`TrackedMap`] objects that record which of their keys the template read.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, Value};
use serde_json::json;

use super::jinja::TEMPLATE_NAME;

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
    let result = env.get_template(TEMPLATE_NAME).and_then(|t| t.render(ctx));
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
