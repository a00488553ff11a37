//! Anthropic's Messages API end to end (issue 19): the real `cyber-inference serve` with a real worker
//! on the shared SmolLM2-135M, driven by the official `anthropic` Python client
//! (`tests/py/test_anthropic_client.py`): `messages.create` streamed and not, Anthropic's event
//! sequence, `stop_sequences`, `count_tokens` equal to the worker's prompt tokens (with and without
//! tools), a tool-use round trip (streamed tool input too), errors in Anthropic's envelope; then with
//! API keys required, the key as `x-api-key` and 401 `authentication_error` without one.

mod support;

use serde_json::json;
use support::assets::SMOL_Q4_1 as SMOL;
use support::server::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_python_client_against_the_supervisor() {
    let s = Server::start(&[SMOL], &[]).await;
    let script = "test_anthropic_client.py";
    s.run_client_script(script, &[&s.base]);

    let token = s.login().await;
    let key = s.create_key(&token, "anthropic").await;
    assert_eq!(
        s.put_settings(&token, json!({"require_api_key": true}))
            .await,
        200
    );
    s.run_client_script(script, &[&s.base, &key]);
}
