//! Issue 16 (tool calling, reasoning, correct edges) end to end: the real worker binary on
//! SmolLM2 Q4_1, with a tool-calling template from `$CYBER_INFERENCE_ASSETS/templates` given by
//! `--chat-template-file`, driven over HTTP and by the official `openai` Python client
//! (`tests/py/test_worker_tools.py`).

mod support;

use serde_json::{Value, json};
use support::assets::{SMOL_Q4_1 as SMOL, model, template};
use support::python::run_client_script;
use support::worker::Worker;

#[tokio::test]
async fn usage_never_exceeds_the_slot_context_and_completions_run_to_it() {
    let w = Worker::start(&model(SMOL), &["-c", "48"]);
    let bias = w.ban_eog().await;
    // Chat: no max_tokens, end-of-generation banned: the reply runs to the end of the context.
    let (st, v) = w
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Count to one hundred."}],
                    "temperature": 0, "logit_bias": bias}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let u = &v["usage"];
    let total = u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        total, 48,
        "prompt + completion fill the context exactly: {u}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Completions without max_tokens: not 16 tokens, but until the context ends.
    let (st, v) = w
        .post(
            "/v1/completions",
            &json!({"prompt": "One, two, three,", "temperature": 0, "logit_bias": bias}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let u = &v["usage"];
    let p = u["prompt_tokens"].as_u64().unwrap();
    let c = u["completion_tokens"].as_u64().unwrap();
    assert!(c > 16, "max_tokens absent must not mean 16: {u}");
    assert_eq!(p + c, 48, "{u}");
    // Streamed, the usage chunk obeys the same bound.
    let body = reqwest::Client::new()
        .post(format!("{}/v1/completions", w.base))
        .json(
            &json!({"prompt": "One, two, three,", "temperature": 0, "logit_bias": bias,
                      "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage: Value = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|v| v.get("usage").is_some())
        .expect("a usage chunk")["usage"]
        .clone();
    assert_eq!(usage["total_tokens"], 48, "{usage}");
}

#[tokio::test]
async fn roles_out_of_order_are_a_400_with_the_templates_message() {
    let w = Worker::start(
        &model(SMOL),
        &[
            "--chat-template-file",
            template("mistralai-Mistral-Nemo-Instruct-2407.jinja")
                .to_str()
                .unwrap(),
        ],
    );
    let (st, v) = w
        .post(
            "/v1/chat/completions",
            &json!({"messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "assistant", "content": "Anything else?"}],
                "max_tokens": 4}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("conversation roles must alternate user/assistant"),
        "the template's own message: {msg}"
    );
    // In order, the same template answers.
    let (st, v) = w
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn bad_tool_fields_are_400s() {
    let hermes = template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja");
    let w = Worker::start(
        &model(SMOL),
        &["--chat-template-file", hermes.to_str().unwrap()],
    );
    let user = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let tool = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    for (body, param) in [
        (
            json!({"messages": user, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": user, "tools": [tool], "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"messages": user, "tools": [tool],
                   "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"messages": user, "tools": [{"type": "function"}]}),
            "tools",
        ),
        (
            json!({"messages": user, "reasoning_format": "verbose"}),
            "reasoning_format",
        ),
    ] {
        let (st, v) = w.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // tool_choice "none": the reply is plain content, whatever it says.
    let (st, v) = w
        .post(
            "/v1/chat/completions",
            &json!({"messages": user, "tools": [tool], "tool_choice": "none",
                    "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
}

#[test]
fn python_openai_client_tool_calls_and_agent_loop() {
    let hermes = template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja");
    let w = Worker::start(
        &model(SMOL),
        &[
            "-np",
            "2",
            "-a",
            "smol",
            "--chat-template-file",
            hermes.to_str().unwrap(),
        ],
    );
    run_client_script("test_worker_tools.py", &[&w.base], || w.stderr());
}
