//! OpenAI's Responses API end to end (issue 19): the real `cyber-inference serve` with a real worker on
//! the shared SmolLM2-135M, driven by the official `openai` Python client
//! (`tests/py/test_responses_client.py`): `responses.create` streamed and not, `previous_response_id`
//! continuing a conversation (stored in SQLite), GET/DELETE of a stored response, a function-call round
//! trip, `text.format` json_schema, errors in OpenAI's envelope; then with API keys required, 401.

mod support;

use serde_json::{Value, json};
use support::assets::SMOL_Q4_1 as SMOL;
use support::server::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_client_against_the_supervisor() {
    let s = Server::start(&[SMOL], &[]).await;
    s.run_client_script("test_responses_client.py", &[&s.base]);

    let token = s.login().await;
    assert_eq!(
        s.put_settings(&token, json!({"require_api_key": true}))
            .await,
        200
    );
    let r = s
        .http
        .post(format!("{}/v1/responses", s.base))
        .json(&json!({"model": "SmolLM2-135M-Instruct.Q4_1", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "invalid_api_key", "{b}");
}
