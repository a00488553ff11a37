//! Parsers on recorded-style replies of each family: text before calls, several calls, malformed
//! calls left as content, and streaming (every prefix parsed in partial mode) reassembling into
//! the final parse.

use super::*;
use crate::engine::chat::reasoning::KNOWN_MARKERS;

fn syntax(format: ToolFormat) -> ReplySyntax {
    ReplySyntax {
        format,
        parse_tool_calls: true,
        reasoning: None,
        thinking_forced_open: false,
        json_reply: false,
    }
}

fn call(name: &str, arguments: &str) -> ParsedToolCall {
    ParsedToolCall {
        name: name.into(),
        arguments: arguments.into(),
        id: None,
    }
}

/// Parses every prefix of `text` as a partial reply, applies the deltas, and checks they rebuild
/// the final parse; returns the final parse.
fn streamed(syn: &ReplySyntax, text: &str) -> ParsedReply {
    let fin = parse_reply(text, syn, false);
    let mut prev = ParsedReply::default();
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut calls: Vec<ParsedToolCall> = Vec::new();
    let mut ends: Vec<usize> = (1..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    ends.push(text.len());
    for (k, &end) in ends.iter().enumerate() {
        let last = k + 1 == ends.len();
        let cur = parse_reply(&text[..end], syn, !last);
        for m in syn.format.markers() {
            assert!(
                !cur.content.contains(m) || fin.content.contains(m),
                "marker {m:?} streamed as content at {end}: {:?}",
                cur.content
            );
        }
        let d = diff(&prev, &cur);
        assert!(
            cur.content.starts_with(&prev.content),
            "content went back at {end}: {:?} -> {:?}",
            prev.content,
            cur.content
        );
        content.push_str(&d.content);
        reasoning.push_str(&d.reasoning_content);
        for c in d.tool_calls {
            if let Some(n) = c.name {
                assert_eq!(c.index, calls.len());
                calls.push(ParsedToolCall {
                    name: n,
                    arguments: c.arguments,
                    id: c.id,
                });
            } else {
                calls[c.index].arguments.push_str(&c.arguments);
            }
        }
        prev = cur;
    }
    assert_eq!(content, fin.content, "streamed content");
    assert_eq!(reasoning, fin.reasoning_content, "streamed reasoning");
    assert_eq!(calls, fin.tool_calls, "streamed calls");
    fin
}

#[test]
fn detection_from_real_templates() {
    let dir = std::path::PathBuf::from(std::env::var("CYBER_INFERENCE_ASSETS").expect(
        "CYBER_INFERENCE_ASSETS is not set: run ../shared/assets/fetch and export the folder it prints",
    ))
    .join("templates");
    for (file, want) in [
        (
            "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
            ToolFormat::Hermes,
        ),
        ("Qwen-Qwen2.5-7B-Instruct.jinja", ToolFormat::Hermes),
        ("Qwen-QwQ-32B.jinja", ToolFormat::Hermes),
        ("meta-llama-Llama-3.2-3B-Instruct.jinja", ToolFormat::Llama3),
        (
            "meta-llama-Llama-3.3-70B-Instruct.jinja",
            ToolFormat::Llama3,
        ),
        (
            "mistralai-Mistral-Nemo-Instruct-2407.jinja",
            ToolFormat::Mistral,
        ),
        (
            "Mistral-Small-3.2-24B-Instruct-2506.jinja",
            ToolFormat::Mistral,
        ),
        (
            "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
            ToolFormat::DeepSeekR1,
        ),
        (
            "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
            ToolFormat::CommandR7B,
        ),
        (
            "meetkai-functionary-medium-v3.1.jinja",
            ToolFormat::FunctionaryV31,
        ),
        (
            "meetkai-functionary-medium-v3.2.jinja",
            ToolFormat::FunctionaryV32,
        ),
        ("google-gemma-2-2b-it.jinja", ToolFormat::Generic),
    ] {
        let p = dir.join(file);
        let src = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("missing test template {}: {e}", p.display()));
        assert_eq!(ToolFormat::detect(&src), want, "{file}");
    }
}

#[test]
fn hermes_text_then_two_calls() {
    let text = "Let me check both cities.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tokyo\"}}\n</tool_call>";
    let r = streamed(&syntax(ToolFormat::Hermes), text);
    assert_eq!(r.content, "Let me check both cities.");
    assert_eq!(
        r.tool_calls,
        vec![
            call("get_weather", r#"{"city": "Paris", "unit": "celsius"}"#),
            call("get_weather", r#"{"city": "Tokyo"}"#),
        ]
    );
}

#[test]
fn hermes_call_cut_by_stop_and_qwen3_thinking() {
    let mut syn = syntax(ToolFormat::Hermes);
    syn.reasoning = Some(KNOWN_MARKERS[0]);
    let text = "<think>\nThe user wants the time in UTC.\n</think>\n\n<tool_call>\n{\"name\": \"now\", \"arguments\": {\"tz\": \"UTC\"}}";
    let r = streamed(&syn, text);
    assert_eq!(r.reasoning_content, "The user wants the time in UTC.");
    assert_eq!(r.content, "");
    assert_eq!(r.tool_calls, vec![call("now", r#"{"tz": "UTC"}"#)]);
}

#[test]
fn hermes_malformed_calls_stay_content() {
    let syn = syntax(ToolFormat::Hermes);
    for text in [
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call>",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        "<tool_call>\nget_weather(city=Paris)\n</tool_call>",
        "Sure <tool_call>{\"name\": \"f\", \"arguments\": {}} trailing words",
    ] {
        let r = parse_reply(text, &syn, false);
        assert!(r.tool_calls.is_empty(), "{text}");
        assert_eq!(r.content, text);
    }
    // No tools in the request: the markup is content.
    let mut off = syn;
    off.parse_tool_calls = false;
    let t = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
    assert_eq!(parse_reply(t, &off, false).content, t);
}

#[test]
fn hermes_partial_marker_is_held_back() {
    let syn = syntax(ToolFormat::Hermes);
    assert_eq!(parse_reply("Hello <tool_c", &syn, true).content, "Hello");
    assert_eq!(
        parse_reply("Hello <tool_c", &syn, false).content,
        "Hello <tool_c"
    );
    assert_eq!(parse_reply("a < b", &syn, true).content, "a < b");
}

#[test]
fn llama3_json_calls_and_builtin() {
    let syn = syntax(ToolFormat::Llama3);
    let r = streamed(
        &syn,
        "{\"name\": \"get_weather\", \"parameters\": {\"location\": \"Berlin\"}}; {\"type\": \"function\", \"name\": \"get_time\", \"parameters\": {}}",
    );
    assert_eq!(
        r.tool_calls,
        vec![
            call("get_weather", r#"{"location": "Berlin"}"#),
            call("get_time", "{}")
        ]
    );
    let r = streamed(
        &syn,
        "<|python_tag|>brave_search.call(query=\"weather in Paris\")",
    );
    assert_eq!(
        r.tool_calls,
        vec![call("brave_search", r#"{"query":"weather in Paris"}"#)]
    );
    let r = streamed(&syn, "The capital of France is Paris.");
    assert!(r.tool_calls.is_empty());
    // A JSON reply that is not a call is content.
    let r = streamed(&syn, "{\"answer\": 42}");
    assert_eq!(r.content, "{\"answer\": 42}");
}

#[test]
fn mistral_nemo_array_and_small_args_form() {
    let syn = syntax(ToolFormat::Mistral);
    let r = streamed(
        &syn,
        "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}, \"id\": \"a1b2c3d4e\"}, {\"name\": \"get_time\", \"arguments\": {}, \"id\": \"f5g6h7i8j\"}]",
    );
    assert_eq!(r.tool_calls.len(), 2);
    assert_eq!(r.tool_calls[0].id.as_deref(), Some("a1b2c3d4e"));
    assert_eq!(r.tool_calls[0].arguments, r#"{"city": "Rome"}"#);
    let r = streamed(
        &syn,
        "I will look it up.[TOOL_CALLS]get_weather[CALL_ID]call0001[ARGS]{\"city\": \"Oslo\"}[TOOL_CALLS]get_time[ARGS]{}",
    );
    assert_eq!(r.content, "I will look it up.");
    assert_eq!(
        r.tool_calls,
        vec![
            ParsedToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city": "Oslo"}"#.into(),
                id: Some("call0001".into())
            },
            call("get_time", "{}")
        ]
    );
    let bad = "[TOOL_CALLS][{\"name\": \"x\", \"arguments\": {]";
    assert_eq!(parse_reply(bad, &syn, false).content, bad);
}

#[test]
fn deepseek_r1_forced_open_thinking_and_calls() {
    let mut syn = syntax(ToolFormat::DeepSeekR1);
    syn.reasoning = Some(KNOWN_MARKERS[0]);
    syn.thinking_forced_open = true;
    let text = "Okay, the user wants the weather.\n</think>\n\nChecking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Lima\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let r = streamed(&syn, text);
    assert_eq!(r.reasoning_content, "Okay, the user wants the weather.");
    assert_eq!(r.content, "Checking.");
    assert_eq!(
        r.tool_calls,
        vec![
            call("get_weather", r#"{"city": "Lima"}"#),
            call("get_time", "{}")
        ]
    );
    let bad =
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{oops}\n```";
    syn.reasoning = None;
    assert_eq!(parse_reply(bad, &syn, false).content, bad);
}

#[test]
fn command_r7b_thinking_action_and_response() {
    let mut syn = syntax(ToolFormat::CommandR7B);
    syn.reasoning = Some(KNOWN_MARKERS[1]);
    let text = "<|START_THINKING|>I should call the search tool.<|END_THINKING|><|START_ACTION|>[\n    {\"tool_call_id\": \"0\", \"tool_name\": \"web_search\", \"parameters\": {\"query\": \"rust 1.95\"}},\n    {\"tool_call_id\": \"1\", \"tool_name\": \"clock\", \"parameters\": {}}\n]<|END_ACTION|>";
    let r = streamed(&syn, text);
    assert_eq!(r.reasoning_content, "I should call the search tool.");
    assert_eq!(r.tool_calls.len(), 2);
    assert_eq!(r.tool_calls[0].name, "web_search");
    assert_eq!(r.tool_calls[0].id.as_deref(), Some("0"));
    assert_eq!(r.tool_calls[1].arguments, "{}");
    let r = parse_reply(
        "<|START_RESPONSE|>Hello there!<|END_RESPONSE|>",
        &syn,
        false,
    );
    assert_eq!(r.content, "Hello there!");
}

#[test]
fn functionary_v31_function_tags_and_python() {
    let syn = syntax(ToolFormat::FunctionaryV31);
    let r = streamed(
        &syn,
        "Sure.<function=get_weather>{\"location\": \"Madrid\"}</function><function=get_time>{}</function>",
    );
    assert_eq!(r.content, "Sure.");
    assert_eq!(
        r.tool_calls,
        vec![
            call("get_weather", r#"{"location": "Madrid"}"#),
            call("get_time", "{}")
        ]
    );
    let r = streamed(&syn, "<|python_tag|>print(2 + 2)");
    assert_eq!(
        r.tool_calls,
        vec![call("python", r#"{"code":"print(2 + 2)"}"#)]
    );
    let bad = "<function=f>{not json}</function>";
    assert_eq!(parse_reply(bad, &syn, false).content, bad);
}

#[test]
fn functionary_v32_recipients() {
    let syn = syntax(ToolFormat::FunctionaryV32);
    let r = streamed(
        &syn,
        "all\nLet me look that up.>>>get_weather\n{\"city\": \"Cairo\"}>>>get_time\n{\"tz\": \"EET\"}",
    );
    assert_eq!(r.content, "Let me look that up.");
    assert_eq!(
        r.tool_calls,
        vec![
            call("get_weather", r#"{"city": "Cairo"}"#),
            call("get_time", r#"{"tz": "EET"}"#)
        ]
    );
    let r = streamed(&syn, "all\nJust an answer.");
    assert_eq!(r.content, "Just an answer.");
    assert!(r.tool_calls.is_empty());
}

#[test]
fn generic_json_forms() {
    let syn = syntax(ToolFormat::Generic);
    let r = streamed(
        &syn,
        "{\"tool_calls\": [{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}, \"id\": \"123456789\"}]}",
    );
    assert_eq!(r.tool_calls[0].name, "add");
    assert_eq!(r.tool_calls[0].arguments, r#"{"a":1,"b":2}"#);
    let r = streamed(
        &syn,
        "{\"tool_call\": {\"name\": \"ping\", \"arguments\": {}}}",
    );
    assert_eq!(r.tool_calls, vec![call("ping", "{}")]);
    let r = streamed(&syn, "{\"response\": \"Hi!\"}");
    assert_eq!(r.content, "Hi!");
    let r = streamed(&syn, "Plain words.");
    assert_eq!(r.content, "Plain words.");
}

#[test]
fn reasoning_without_tools_and_format_none() {
    let syn = ReplySyntax {
        format: ToolFormat::Hermes,
        parse_tool_calls: false,
        reasoning: Some(KNOWN_MARKERS[0]),
        thinking_forced_open: false,
        json_reply: false,
    };
    let r = streamed(&syn, "<think>2+2 is 4</think>The answer is 4.");
    assert_eq!(r.reasoning_content, "2+2 is 4");
    assert_eq!(r.content, "The answer is 4.");
    let none = ReplySyntax {
        reasoning: None,
        ..syn
    };
    let r = parse_reply("<think>x</think>y", &none, false);
    assert_eq!(r.content, "<think>x</think>y");
}

#[test]
fn json_reply_content_is_the_json_without_fence_or_whitespace() {
    let syn = ReplySyntax {
        parse_tool_calls: true,
        json_reply: true,
        ..syntax(ToolFormat::Hermes)
    };
    // Replies recorded from SmolLM2 under llama.cpp's response-format grammar.
    let fenced = "```json\n{\n    \"city\": {\n        \"name\": \"New York\"\n    }\n}\n```";
    let r = streamed(&syn, fenced);
    assert_eq!(
        r.content,
        "{\n    \"city\": {\n        \"name\": \"New York\"\n    }\n}"
    );
    assert!(r.tool_calls.is_empty());
    let r = streamed(&syn, "{\"title\": \"Feline\", \"size\": \"small\"}");
    assert_eq!(r.content, "{\"title\": \"Feline\", \"size\": \"small\"}");
    let r = streamed(&syn, "\n {\"code\": \"a ``` b\"} ");
    assert_eq!(r.content, "{\"code\": \"a ``` b\"}");
    // Backticks at the end of a reply cut inside a string stay content (no closing fence there).
    assert_eq!(
        json_reply_content("{\"a\": \"x ``", false),
        "{\"a\": \"x ``"
    );
    assert_eq!(json_reply_content("```js", true), "");
    assert_eq!(json_reply_content("``", false), "``");
    // A `<tool_call>` inside the JSON is not a call.
    let r = streamed(&syn, "{\"t\": \"<tool_call>\"}");
    assert_eq!(r.content, "{\"t\": \"<tool_call>\"}");
    assert!(r.tool_calls.is_empty());
}

#[test]
fn forced_call_grammars_name_every_tool() {
    let tools = vec![
        serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
        serde_json::json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}),
    ];
    let g = forced_call_grammar(ToolFormat::Hermes, &tools, None, false, None).unwrap();
    assert!(g.starts_with("start: calls\n"), "{g}");
    assert!(
        g.contains(r#""<tool_call>\n" call0 "\n</tool_call>" | "<tool_call>\n" call1"#),
        "{g}"
    );
    assert!(g.contains(r#"{"const":"get_weather"}"#), "{g}");
    let g = forced_call_grammar(ToolFormat::Hermes, &tools, Some("get_time"), true, None).unwrap();
    assert!(
        !g.contains("get_weather") && g.contains("one (\"\\n\" one)*"),
        "{g}"
    );
    assert_eq!(
        forced_call_grammar(ToolFormat::Hermes, &tools, Some("nope"), false, None),
        Err(ToolGrammarError::NoTool(" the name \"nope\"".into()))
    );
    let g = forced_call_grammar(
        ToolFormat::DeepSeekR1,
        &tools,
        None,
        false,
        Some("</think>"),
    )
    .unwrap();
    assert!(g.starts_with("start: \"</think>\" WS calls"), "{g}");
}

/// A byte-level vocabulary (tokens 0..=255 are the bytes, 256 is EOS) for llguidance.
fn byte_compiler() -> crate::engine::constraint::GrammarCompiler {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    tokens.push(b"\xff</s>".to_vec());
    let tokenize: crate::engine::constraint::TokenizeFn =
        std::sync::Arc::new(|s: &str| s.bytes().map(u32::from).collect());
    crate::engine::constraint::GrammarCompiler::new(tokens, &[256], tokenize).unwrap()
}

/// Whether the constraint accepts `text` byte by byte and may end after it.
fn accepts(c: &mut crate::engine::constraint::Constraint, text: &str) -> bool {
    for b in text.bytes() {
        if !c.compute_mask().unwrap().is_allowed(u32::from(b)) {
            return false;
        }
        c.commit(u32::from(b)).unwrap();
    }
    c.compute_mask().unwrap().is_allowed(256)
}

#[test]
fn forced_grammars_compile_accept_the_format_and_refuse_other_text() {
    use crate::engine::constraint::GrammarSpec;
    let tools = vec![
        serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}}}),
    ];
    let g = byte_compiler();
    let hermes_call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>";
    for (format, good, bad) in [
        (ToolFormat::Hermes, hermes_call.to_string(), "Sure! <tool_call>"),
        (
            ToolFormat::Generic,
            "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}]}".to_string(),
            "{\"response\": \"hi\"}",
        ),
        (
            ToolFormat::Llama3,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"days\": 3}}".to_string(),
            "{\"name\": \"other\"",
        ),
        (
            ToolFormat::Mistral,
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}]".to_string(),
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 9}}]",
        ),
        (
            ToolFormat::FunctionaryV31,
            "<function=get_weather>{\"city\": \"Paris\", \"days\": 3}</function>".to_string(),
            "<function=get_weather>{\"days\": 3}</function>",
        ),
    ] {
        let lark = forced_call_grammar(format, &tools, None, true, None).unwrap();
        let c = g
            .compile(&GrammarSpec::Lark(lark.clone()))
            .unwrap_or_else(|e| panic!("{}: {e}\n{lark}", format.name()));
        assert!(accepts(&mut c.clone(), &good), "{}: {good}\n{lark}", format.name());
        assert!(!accepts(&mut c.clone(), bad), "{}: {bad}", format.name());
        let r = parse_reply(&good, &syntax(format), false);
        assert_eq!(r.tool_calls.len(), 1, "{}", format.name());
        assert_eq!(r.tool_calls[0].name, "get_weather");
        let args: serde_json::Value = serde_json::from_str(&r.tool_calls[0].arguments).unwrap();
        assert_eq!(args, serde_json::json!({"city": "Paris", "days": 3}));
    }
    // Parallel calls repeat; a single call does not.
    let two = format!("{hermes_call}\n{hermes_call}");
    let par = forced_call_grammar(ToolFormat::Hermes, &tools, None, true, None).unwrap();
    let one = forced_call_grammar(ToolFormat::Hermes, &tools, None, false, None).unwrap();
    assert!(accepts(
        &mut g.compile(&GrammarSpec::Lark(par)).unwrap(),
        &two
    ));
    assert!(!accepts(
        &mut g.compile(&GrammarSpec::Lark(one)).unwrap(),
        &two
    ));
}
