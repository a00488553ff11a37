//! Per-model and global settings on the real `serve` and a real worker: the per-request defaults of a
//! model (Ollama's Modelfile parameters) reach requests that leave them out, through the OpenAI and the
//! Ollama API, and never override what a request sets; the admin API refuses a value out of range naming
//! the setting and its range; the model page renders every setting of the table; a global setting is
//! refused at run time exactly as at start-up.

mod supervisor_common;

use cyber_inference::supervisor::settings::{Kind, MODEL_SETTINGS};
use serde_json::{Value, json};
use supervisor_common::{Server, spawn_serve, wait_exit};

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";
const PIRATE: &str = "You are a pirate. Answer like one.";

/// `/v1/chat/completions` with `messages` and `extra` fields; returns (prompt, completion) tokens and
/// the text.
async fn chat(s: &Server, messages: Value, extra: Value) -> (i64, i64, String) {
    let mut body = json!({"model": SMOL_ID, "messages": messages});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (st, j) = s.post_json("/v1/chat/completions", body).await;
    assert_eq!(st, 200, "{j}\n{}", s.log());
    (
        j["usage"]["prompt_tokens"].as_i64().unwrap(),
        j["usage"]["completion_tokens"].as_i64().unwrap(),
        j["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

/// Ollama's `/api/chat` (not streamed) with `messages` and `options`; returns (prompt_eval_count,
/// eval_count).
async fn ollama_chat(s: &Server, messages: Value, options: Value) -> (i64, i64) {
    let (st, j) = s
        .post_json(
            "/api/chat",
            json!({"model": SMOL_ID, "messages": messages, "stream": false, "options": options}),
        )
        .await;
    assert_eq!(st, 200, "{j}\n{}", s.log());
    (
        j["prompt_eval_count"].as_i64().unwrap(),
        j["eval_count"].as_i64().unwrap(),
    )
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn system_then_user(system: &str, text: &str) -> Value {
    json!([{"role": "system", "content": system}, {"role": "user", "content": text}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_defaults_fill_what_a_request_leaves_out() {
    let s = Server::start(&[SMOL], &[]).await;
    let token = s.login().await;
    let ask = "Write a long story about a ship at sea.";

    // Reference prompt sizes without any default: the chat template's own system message differs from
    // ours, so the sizes tell which system message a request was rendered with.
    let (pt_plain, _, _) = chat(&s, user(ask), json!({"max_tokens": 1})).await;
    let (pt_pirate, _, _) = chat(&s, system_then_user(PIRATE, ask), json!({"max_tokens": 1})).await;
    let own = "Answer in French.";
    let (pt_own, _, _) = chat(&s, system_then_user(own, ask), json!({"max_tokens": 1})).await;
    assert_ne!(pt_plain, pt_pirate);
    let (opt_plain, _) = ollama_chat(&s, user(ask), json!({"num_predict": 1})).await;
    let (opt_pirate, _) =
        ollama_chat(&s, system_then_user(PIRATE, ask), json!({"num_predict": 1})).await;

    let (st, j) = s
        .patch_model(
            &token,
            SMOL_ID,
            json!({"max_tokens": 3, "temperature": 0, "system_prompt": PIRATE}),
        )
        .await;
    assert_eq!(st, 200, "{j}");
    let (st, j) = s
        .admin_get(&token, &format!("/admin/api/models/{SMOL_ID}"))
        .await;
    assert_eq!(st, 200);
    let shown: Vec<(&str, &Value)> = j["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), &x["value"]))
        .collect();
    assert_eq!(shown.len(), MODEL_SETTINGS.len(), "{j}");
    assert!(shown.contains(&("max_tokens", &json!(3))), "{j}");
    assert!(shown.contains(&("system_prompt", &json!(PIRATE))), "{j}");

    // OpenAI: a request without max_tokens gets 3 tokens and the pirate system message; one that sets
    // them keeps its own.
    let (pt, ct, _) = chat(&s, user(ask), json!({})).await;
    assert_eq!(ct, 3, "the default max_tokens applies");
    assert_eq!(
        pt, pt_pirate,
        "the default system prompt is the first message"
    );
    let (_, ct, _) = chat(&s, user(ask), json!({"max_tokens": 5})).await;
    assert_eq!(ct, 5, "the request's max_tokens wins");
    let (_, ct, _) = chat(&s, user(ask), json!({"max_completion_tokens": 6})).await;
    assert_eq!(ct, 6, "max_completion_tokens counts as setting it");
    let (pt, _, _) = chat(&s, system_then_user(own, ask), json!({})).await;
    assert_eq!(pt, pt_own, "a request's own system message is kept alone");
    // The default temperature 0 makes answers greedy: the same every time (the worker's own default
    // samples with a random seed).
    let (_, _, a) = chat(&s, user(ask), json!({"max_tokens": 24})).await;
    let (_, _, b) = chat(&s, user(ask), json!({"max_tokens": 24})).await;
    assert_eq!(a, b, "the default temperature 0 applies");

    // Ollama: the same defaults through /api/chat, and /api/show lists them as Modelfile parameters.
    let (pt, ct) = ollama_chat(&s, user(ask), json!({})).await;
    assert_eq!((pt, ct), (opt_pirate, 3));
    let (_, ct) = ollama_chat(&s, user(ask), json!({"num_predict": 4})).await;
    assert_eq!(ct, 4, "the request's num_predict wins");
    let (st, show) = s.post_json("/api/show", json!({"model": SMOL_ID})).await;
    assert_eq!(st, 200);
    let params = show["parameters"].as_str().unwrap();
    assert!(
        params.contains("num_predict") && params.contains("temperature"),
        "{params}"
    );
    assert_eq!(show["system"], PIRATE);
    assert!(show["modelfile"].as_str().unwrap().contains(PIRATE));

    // Reset: the request is forwarded as it came.
    let (st, _) = s
        .patch_model(
            &token,
            SMOL_ID,
            json!({"max_tokens": null, "temperature": null, "system_prompt": ""}),
        )
        .await;
    assert_eq!(st, 200);
    let (pt, _, _) = chat(&s, user(ask), json!({"max_tokens": 1})).await;
    assert_eq!(pt, pt_plain);
    let (pt, _) = ollama_chat(&s, user(ask), json!({"num_predict": 1})).await;
    assert_eq!(pt, opt_plain);
}

#[tokio::test]
async fn the_admin_api_and_the_form_follow_the_settings_table() {
    let s = Server::start(&[SMOL], &[("MAX_CONTEXT_SIZE", "4096")]).await;
    let token = s.login().await;
    for (body, name, range) in [
        (json!({"temperature": 9}), "temperature", "between 0 and 5"),
        (json!({"ctx_size": 99999}), "ctx_size", "between 1 and 4096"),
        (json!({"top_p": "lots"}), "top_p", "between 0 and 1"),
        (json!({"parallel": 0}), "parallel", "between 1 and 256"),
        (json!({"pinned": "maybe"}), "pinned", "true or false"),
    ] {
        let (st, j) = s.patch_model(&token, SMOL_ID, body.clone()).await;
        let msg = j["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(st, 400, "{body}: {j}");
        assert!(
            msg.contains(&format!("`{name}`")) && msg.contains(range),
            "{body}: {msg}"
        );
    }
    let (st, j) = s
        .patch_model(&token, SMOL_ID, json!({"top_k": 40, "temperature": 9}))
        .await;
    assert_eq!(st, 400, "{j}");
    let (_, j) = s
        .admin_get(&token, &format!("/admin/api/models/{SMOL_ID}"))
        .await;
    assert_eq!(j["model"]["top_k"], Value::Null, "nothing saved: {j}");
    let (st, j) = s.patch_model(&token, SMOL_ID, json!({"bogus": 1})).await;
    assert_eq!(st, 400);
    assert!(j["error"]["message"].as_str().unwrap().contains("bogus"));

    let (st, j) = s
        .patch_model(
            &token,
            SMOL_ID,
            json!({"top_k": 40, "system_prompt": "Be <brief>.", "enabled": false}),
        )
        .await;
    assert_eq!(st, 200, "{j}");
    assert!(j["note"].as_str().unwrap().contains("now"), "{j}");
    let (st, j) = s
        .post_json(
            "/v1/chat/completions",
            json!({"model": SMOL_ID,
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        )
        .await;
    assert_eq!(st, 403, "a disabled model is refused: {j}");

    // The form has a control for every setting of the table, with its label and the saved value.
    let page = s.page(&token, &format!("/models/{SMOL_ID}")).await;
    for d in MODEL_SETTINGS {
        assert!(
            page.contains(&format!(r#"id="f-{}" name="{}""#, d.name, d.name)),
            "no field for {}",
            d.name
        );
        assert!(page.contains(d.label), "no label {}", d.label);
        assert!(page.contains(&format!(r#"id="h-{}""#, d.name)));
        if let Kind::Text { .. } = d.kind {
            assert!(page.contains(&format!(r#"<textarea id="f-{}""#, d.name)));
        }
    }
    assert!(page.contains(r#"name="top_k" inputmode="decimal" value="40""#));
    assert!(
        page.contains("Be &lt;brief&gt;.</textarea>")
            || page.contains("Be &#60;brief&#62;.</textarea>"),
        "the saved prompt, escaped"
    );
    assert!(page.contains(r#"type="checkbox" id="f-pinned" name="pinned" aria"#));
    assert!(page.contains(r#"type="checkbox" id="f-enabled" name="enabled" aria"#));
}

#[tokio::test]
async fn a_global_setting_is_refused_at_run_time_as_at_start_up() {
    let s = Server::start(&[], &[]).await;
    let token = s.login().await;
    let r = s
        .http
        .put(format!("{}/admin/api/settings", s.base))
        .bearer_auth(&token)
        .json(&json!({"drain_timeout": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let at_run: Value = r.json().await.unwrap();
    let at_run = at_run["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        at_run.contains("drain_timeout") && at_run.contains("must be at least 1"),
        "{at_run}"
    );
    assert_eq!(
        s.put_settings(&token, json!({"drain_timeout": 7})).await,
        200
    );
    // The API and the settings page show the same list, values and sources.
    let (_, j) = s.admin_get(&token, "/admin/api/settings").await;
    let page = s.page(&token, "/settings").await;
    for g in j["settings"].as_array().unwrap() {
        let name = g["name"].as_str().unwrap();
        assert!(
            page.contains(&format!(r#"id="s-{name}""#)),
            "{name} not on the page"
        );
    }
    let drain = j["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "drain_timeout")
        .unwrap();
    assert_eq!(
        (&drain["value"], &drain["source"]),
        (&json!(7), &json!("db"))
    );
    assert!(page.contains(r#"id="s-drain_timeout" name="drain_timeout" value="7""#));

    // The same value at start-up stops `serve` with the same reason.
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = [
        ("CYBER_INFERENCE_HOST", "127.0.0.1".to_owned()),
        (
            "CYBER_INFERENCE_PORT",
            supervisor_common::free_port().to_string(),
        ),
        (
            "CYBER_INFERENCE_DATA_DIR",
            dir.path().join("data").display().to_string(),
        ),
        (
            "CYBER_INFERENCE_MODELS_DIR",
            dir.path().join("models").display().to_string(),
        ),
        ("CYBER_INFERENCE_DRAIN_TIMEOUT", "0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut child = spawn_serve(dir.path(), &env);
    let status = wait_exit(&mut child, "with DRAIN_TIMEOUT=0");
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log.contains("CYBER_INFERENCE_DRAIN_TIMEOUT") && log.contains("must be at least 1"),
        "{log}"
    );
}
