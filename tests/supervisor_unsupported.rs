//! "Know before loading": a GGUF the engine cannot run is catalogued with the loader's own reason, shown
//! on the admin pages and by `inspect`, left out of `/v1/models`, and refused with a clear 400 without a
//! worker ever being started.

mod support;

use serde_json::{Value, json};
use support::assets;
use support::assets::SMOL_Q4_1 as SMOL;
use support::process::{bin, stdout_of};
use support::server::*;

const SMOL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";
/// The MiniLM file with `general.architecture` rewritten from `bert` to `rwkv` (same length, so every
/// offset stays valid): a well-formed GGUF of an architecture this engine does not run.
const RWKV_ID: &str = "minilm-as-rwkv";

fn write_rwkv_copy(dst: &std::path::Path) {
    let mut bytes = std::fs::read(assets::model(assets::MINILM)).unwrap();
    // key string, then value type STRING (8, u32) and the value's length (4, u64), then "bert".
    let key = b"general.architecture";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("general.architecture key in MiniLM");
    let v = at + key.len() + 4 + 8;
    assert_eq!(&bytes[v..v + 4], b"bert", "MiniLM's architecture value");
    bytes[v..v + 4].copy_from_slice(b"rwkv");
    std::fs::write(dst, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsupported_model_is_listed_with_its_reason_and_refused_without_a_worker() {
    let s = Server::start(&[SMOL], &[]).await;
    let file = s.models_dir().join(format!("{RWKV_ID}.gguf"));
    write_rwkv_copy(&file);
    let token = s.login().await;
    let r = s
        .http
        .post(format!("{}/admin/api/models/scan", s.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // The catalogue keeps the row, with the loader's reason; the runnable model has none.
    let (st, m) = s
        .admin_get(&token, &format!("/admin/api/models/{RWKV_ID}"))
        .await;
    assert_eq!(st, 200, "{m}");
    let row = if m["model"].is_object() {
        &m["model"]
    } else {
        &m
    };
    let reason = row["unsupported_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unsupported architecture \"rwkv\""),
        "reason: {m}"
    );
    assert_eq!(row["architecture"], "rwkv");
    let (_, ok) = s
        .admin_get(&token, &format!("/admin/api/models/{SMOL_ID}"))
        .await;
    let ok_row = if ok["model"].is_object() {
        &ok["model"]
    } else {
        &ok
    };
    assert_eq!(ok_row["unsupported_reason"], Value::Null, "{ok}");

    // Clients only see what can run.
    let list: Value = s.get_json("/v1/models").await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, [SMOL_ID], "{list}");

    // A request for it is a 400 naming the reason, and no worker is spawned.
    let r = s
        .http
        .post(format!("{}/v1/embeddings", s.base))
        .json(&json!({"model": RWKV_ID, "input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "model_not_supported", "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unsupported architecture \"rwkv\""),
        "{b}"
    );
    assert!(
        s.workers().is_empty(),
        "a worker was started: {:?}",
        s.workers()
    );

    // The admin pages say so, and offer no Load button that could work.
    let page = s.page(&token, "/models").await;
    assert!(
        page.contains(&format!("data-unsupported-of=\"{RWKV_ID}\"")),
        "models page lacks the unsupported badge:\n{page}"
    );
    let detail = s.page(&token, &format!("/models/{RWKV_ID}")).await;
    assert!(
        detail.contains("This engine cannot run this file: unsupported architecture"),
        "model page lacks the reason:\n{detail}"
    );

    // `inspect` says the same before anything is loaded.
    let out = stdout_of(bin().args(["inspect", "--json"]).arg(&file));
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["runnable"], false);
    assert!(
        j["unsupported_reason"]
            .as_str()
            .unwrap()
            .contains("unsupported architecture \"rwkv\""),
        "{j}"
    );
    let text = bin().arg("inspect").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("runnable:        no: unsupported architecture \"rwkv\""),
        "{text}"
    );
}
