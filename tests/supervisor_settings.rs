//! Per-model and global settings on the real `serve` and a real worker: the per-request defaults of a
//! model (Ollama's Modelfile parameters) reach requests that leave them out, through the OpenAI and the
//! Ollama API, and never override what a request sets; the admin API refuses a value out of range naming
//! the setting and its range; the model page renders every setting of the table; a global setting is
//! refused at run time exactly as at start-up.

mod support;

use cyber_inference::supervisor::settings::{Kind, MODEL_SETTINGS};
use serde_json::{Value, json};
use support::assets::SMOL_Q4_1 as SMOL;
use support::net::free_port;
use support::server::{Server, spawn_serve, wait_serve_exit};

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
        if let Kind::Choice { options } = d.kind {
            assert!(page.contains(&format!(r#"<select id="f-{}""#, d.name)));
            for o in options {
                assert!(page.contains(&format!(r#"<option value="{o}""#)), "{o}");
            }
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
        ("CYBER_INFERENCE_PORT", free_port().to_string()),
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
    let status = wait_serve_exit(&mut child, "with DRAIN_TIMEOUT=0");
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log.contains("CYBER_INFERENCE_DRAIN_TIMEOUT") && log.contains("must be at least 1"),
        "{log}"
    );
}

/// The pid of `model`'s worker after a short chat has loaded it.
async fn loaded_worker(s: &Server, token: &str) -> u32 {
    chat(
        s,
        json!([{"role": "user", "content": "Hi"}]),
        json!({"max_tokens": 1}),
    )
    .await;
    let w = support::server::worker_of(s, token, SMOL_ID)
        .await
        .expect("a worker after the chat");
    w["pid"].as_u64().unwrap() as u32
}

/// A model's stored `gpu_layers` reaches its worker's command line at the next load (`--gpu-layers N`),
/// over the global GPU_LAYERS; without one the global value does.
#[tokio::test(flavor = "multi_thread")]
async fn a_models_gpu_layers_reach_its_worker() {
    use support::process::proc_cmdline;
    let s = Server::start(&[SMOL], &[("GPU_LAYERS", "3")]).await;
    let token = s.login().await;
    let pid = loaded_worker(&s, &token).await;
    let cmd = proc_cmdline(pid);
    assert!(cmd.contains(" --gpu-layers 3 "), "the global value: {cmd}");

    let (st, j) = s
        .patch_model(&token, SMOL_ID, json!({"gpu_layers": 0}))
        .await;
    assert_eq!(st, 200, "{j}");
    let (st, j) = s
        .admin_post(
            &token,
            &format!("/admin/api/models/{SMOL_ID}/unload"),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{j}");
    let next = loaded_worker(&s, &token).await;
    assert_ne!(next, pid, "loaded again");
    let cmd = proc_cmdline(next);
    assert!(
        cmd.contains(" --gpu-layers 0 "),
        "the model's own value: {cmd}"
    );
}

/// A model's KV cache types (`cache_type_k`, `cache_type_v`) reach its worker at the next load
/// (`--cache-type-k/-v`; the worker's `/props` reports them), the memory estimate follows them (a
/// q8_0/q4_0 cache is smaller than the f16 one by exactly the row sizes), and a type the worker does
/// not have is refused naming the choices.
#[tokio::test(flavor = "multi_thread")]
async fn a_models_kv_cache_types_reach_its_worker_and_its_memory_estimate() {
    use support::process::proc_cmdline;
    let s = Server::start(&[SMOL], &[("DEFAULT_CONTEXT_SIZE", "4096")]).await;
    let token = s.login().await;
    let path = format!("/admin/api/models/{SMOL_ID}");
    let (_, before) = s.admin_get(&token, &path).await;
    let f16_estimate = before["memory_estimate_bytes"].as_u64().unwrap();
    let setting = |j: &Value, name: &str| {
        j["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no setting {name}: {j}"))
    };
    let k = setting(&before, "cache_type_k");
    assert_eq!(k["type"], "choice");
    assert!(
        k["options"].as_array().unwrap().contains(&json!("q8_0")),
        "{k}"
    );
    assert_eq!(k["applies"], "next_load");

    let (st, j) = s
        .patch_model(&token, SMOL_ID, json!({"cache_type_k": "q9_0"}))
        .await;
    assert_eq!(st, 400, "{j}");
    assert!(
        j.to_string().contains("cache_type_k") && j.to_string().contains("q8_0"),
        "the refusal names the setting and the choices: {j}"
    );
    let (st, j) = s
        .patch_model(
            &token,
            SMOL_ID,
            json!({"cache_type_k": "q8_0", "cache_type_v": "q4_0"}),
        )
        .await;
    assert_eq!(st, 200, "{j}");
    let (_, after) = s.admin_get(&token, &path).await;
    assert_eq!(setting(&after, "cache_type_k")["value"], "q8_0");
    let q_estimate = after["memory_estimate_bytes"].as_u64().unwrap();
    // SmolLM2-135M: 30 layers, K/V rows of 192 elements; 4096 positions. f16 rows are 384 bytes,
    // q8_0 6 × 34 = 204, q4_0 6 × 18 = 108.
    assert_eq!(
        f16_estimate - q_estimate,
        30 * 4096 * ((384 + 384) - (204 + 108)),
        "{before}\n{after}"
    );

    let pid = loaded_worker(&s, &token).await;
    let cmd = proc_cmdline(pid);
    assert!(
        cmd.contains(" --cache-type-k q8_0 ") && cmd.contains(" --cache-type-v q4_0 "),
        "{cmd}"
    );
    let w = support::server::worker_of(&s, &token, SMOL_ID)
        .await
        .unwrap();
    let props: Value = s
        .http
        .get(format!("http://127.0.0.1:{}/props", w["port"]))
        .bearer_auth(support::server::worker_key(pid))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&props["cache_type_k"], &props["cache_type_v"]),
        (&json!("q8_0"), &json!("q4_0")),
        "{props}"
    );
    // The worker answers with its quantized cache.
    let (_, generated, text) = chat(
        &s,
        json!([{"role": "user", "content": "What is the capital of France?"}]),
        json!({"max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert!(generated > 0 && !text.is_empty(), "{generated} {text:?}");
}
