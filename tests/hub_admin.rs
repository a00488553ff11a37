//! The admin API's model downloads end to end: the real `cyber-inference serve` binary (temporary
//! DATA_DIR, empty MODELS_DIR) with its hub endpoint on a local Hugging Face–compatible server that
//! serves the shared SmolLM2 files. An admin lists a repo, downloads a model (progress in
//! `/admin/api/downloads` and as `download` events on the `/admin/api/events` WebSocket) and chats with
//! it through `/v1/chat/completions`; a cancelled download leaves no file and no catalogue row; errors
//! (missing repo, gated repo, no GGUF, full disk, a second download of the same file) are answered in
//! the admin API's error shape; at most two downloads transfer at once, the rest wait queued.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::assets::MINILM;
use support::assets::SMOL_Q4_1 as Q41;
use support::assets::SMOL_Q4_K_M as Q4KM;
use support::files::{files_in, sha256, sha256_file};
use support::hub::{DOWNLOAD_ROUTE, HfServer, Served, asset, error_of, expect_error, split_asset};
use support::server::{Server, status_json};

const REPO: &str = "test/SmolLM2-135M-Instruct-GGUF";

/// MiniLM split in two by `gguf-split` (60 of its 101 tensors in part 1), as served in `split/`.
fn minilm_parts() -> Vec<(String, axum::body::Bytes)> {
    let parts = split_asset(MINILM, "minilm-F16", 60);
    assert_eq!(parts.len(), 2);
    parts
}

/// The fake hub with the SmolLM2 repo (two quantizations, a README, a split MiniLM in a sub-folder) and
/// a supervisor whose hub endpoint is that server.
async fn setup() -> (HfServer, Server, String) {
    let hf = HfServer::start().await;
    let mut files = vec![
        Served::new("README.md", "# SmolLM2\n".into()),
        Served::asset(Q41, Q41),
        Served::asset(Q4KM, Q4KM),
    ];
    // Listed in reverse part order: the API's order is no promise.
    for (name, data) in minilm_parts().into_iter().rev() {
        files.push(Served::new(&format!("split/{name}"), data));
    }
    hf.state.add_repo(REPO, files);
    hf.state
        .add_repo("test/docs-only", vec![Served::new("README.md", "x".into())]);
    let s = Server::start(&[], &[("HF_ENDPOINT", &hf.url)]).await;
    let token = s.login().await;
    (hf, s, token)
}

/// DELETE an admin route with a token; returns (status, JSON).
async fn delete(s: &Server, token: &str, path: &str) -> (u16, Value) {
    let r = s
        .http
        .delete(format!("{}{path}", s.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    status_json(r).await
}

async fn catalogue(s: &Server, token: &str) -> Vec<Value> {
    let (st, j) = s.admin_get(token, "/admin/api/models").await;
    assert_eq!(st, 200, "{j}");
    j["models"].as_array().unwrap().clone()
}

/// Collects the `download` events of the admin WebSocket until one says `done`/`failed`/`cancelled`.
async fn download_events(s: &Server, token: &str) -> tokio::task::JoinHandle<Vec<Value>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{}/admin/api/events", s.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(Ok(msg)) = ws.next().await {
            let tokio_tungstenite::tungstenite::Message::Text(t) = msg else {
                continue;
            };
            let ev: Value = serde_json::from_str(&t).unwrap();
            if ev["type"] != "download" {
                continue;
            }
            let end = matches!(ev["state"].as_str(), Some("done" | "failed" | "cancelled"));
            out.push(ev);
            if end {
                break;
            }
        }
        let _ = ws.close(None).await;
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_through_the_admin_api_then_chat_with_the_model() {
    let (hf, s, token) = setup().await;
    let mdir = s.models_dir();
    assert!(
        catalogue(&s, &token).await.is_empty(),
        "MODELS_DIR starts empty"
    );

    // The routes need the admin JWT, and a foreign Origin is refused.
    let r = s
        .http
        .get(format!(
            "{}/admin/api/models/repo-files?repo_id={REPO}",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .post(format!("{}{DOWNLOAD_ROUTE}", s.base))
        .bearer_auth(&token)
        .header("origin", "http://evil.example")
        .json(&json!({"repo_id": REPO}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The repo's GGUF models: smallest first, the split as one entry, the README left out.
    let (st, j) = s
        .admin_get(
            &token,
            &format!("/admin/api/models/repo-files?repo_id={REPO}"),
        )
        .await;
    assert_eq!(st, 200, "{j}");
    let files = j["files"].as_array().unwrap();
    let names: Vec<&str> = files
        .iter()
        .map(|f| f["filename"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["split/minilm-F16-00001-of-00002.gguf", Q41, Q4KM],
        "{j}"
    );
    assert_eq!(j["recommended"], Q4KM);
    let q4km = &files[2];
    assert_eq!(q4km["quantization"], "Q4_K_M");
    assert_eq!(q4km["size"], asset(Q4KM).0.len() as u64);
    assert_eq!(
        (q4km["recommended"].clone(), q4km["present"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(files[1]["quantization"], "Q4_1");
    assert_eq!(files[1]["size"], asset(Q41).0.len() as u64);
    let split = &files[0];
    assert_eq!(split["parts"], 2);
    assert_eq!(split["quantization"], "F16");
    let parts = minilm_parts();
    assert_eq!(
        split["size"],
        parts.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    );
    assert_eq!(split["files"].as_array().unwrap().len(), 2);
    assert_eq!(split["complete"], true);

    // Download with the automatic choice (Q4_K_M), watching the event stream.
    let events = download_events(&s, &token).await;
    let (st, j) = s
        .admin_post(&token, DOWNLOAD_ROUTE, json!({"repo_id": REPO}))
        .await;
    assert_eq!(st, 202, "{j}");
    let id = j["id"].as_u64().unwrap();
    assert_eq!(j["download"]["filename"], Q4KM);
    assert_eq!(j["download"]["total"], asset(Q4KM).0.len() as u64);
    let (d, seen) = s
        .wait_download(&token, id, 180, |d| {
            d["state"] != "queued" && d["state"] != "downloading" && d["state"] != "verifying"
        })
        .await;
    assert_eq!(d["state"], "done", "{d}\n{}", s.log());
    assert_eq!(d["downloaded"], d["total"]);
    assert_eq!(d["error"], Value::Null);
    let name = d["model"]
        .as_str()
        .expect("registered model name")
        .to_string();
    assert_eq!(name, Q4KM.trim_end_matches(".gguf"));
    assert!(
        seen.iter()
            .all(|d| d["total"] == asset(Q4KM).0.len() as u64),
        "{seen:?}"
    );

    let events = tokio::time::timeout(Duration::from_secs(10), events)
        .await
        .expect("the event stream ends with the download")
        .unwrap();
    assert!(events.iter().all(|e| e["id"] == id), "{events:?}");
    assert_eq!(events.first().unwrap()["state"], "queued", "{events:?}");
    assert_eq!(events.last().unwrap()["state"], "done");
    assert_eq!(events.last().unwrap()["model"], name.as_str());
    assert!(
        events.iter().any(|e| e["state"] == "downloading"),
        "{events:?}"
    );
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["downloaded"].as_u64() <= w[1]["downloaded"].as_u64()),
        "bytes never go back: {events:?}"
    );

    // The file is in MODELS_DIR, whole, and in the catalogue with its origin.
    assert_eq!(files_in(&mdir), [Q4KM]);
    assert_eq!(sha256_file(&mdir.join(Q4KM)), asset(Q4KM).1);
    let models = catalogue(&s, &token).await;
    assert_eq!(models.len(), 1, "{models:?}");
    let row = &models[0]["model"];
    assert_eq!(row["name"], name.as_str());
    assert_eq!(row["hf_repo_id"], REPO);
    assert_eq!(row["sha256"], asset(Q4KM).1.as_str());
    assert_eq!(row["quantization"], "Q4_K_M");
    let (_, j) = s
        .admin_get(
            &token,
            &format!("/admin/api/models/repo-files?repo_id={REPO}"),
        )
        .await;
    assert_eq!(j["files"][2]["present"], true);

    // A chat completion through the supervisor, for the downloaded model, answers with real text.
    let (status, body) = s
        .post_json(
            "/v1/chat/completions",
            json!({
                "model": name,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16, "temperature": 0,
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", s.log());
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.chars().filter(|c| c.is_alphabetic()).count() >= 3,
        "real text: {text:?}"
    );
    assert_eq!(body["model"], name.as_str());
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    eprintln!("downloaded {name} answered: {text:?}");

    // Downloading the same model again finds it in place: done without a byte.
    let before = hf.state.file_requests().len();
    let again = s
        .start_download(
            &token,
            json!({"repo_id": REPO, "filename": Q4KM, "revision": "main"}),
        )
        .await;
    assert_ne!(again, id);
    let d = s.wait_download_ended(&token, again, 60).await;
    assert_eq!(d["state"], "done", "{d}");
    assert_eq!(hf.state.file_requests().len(), before);
    // A finished download is removed from the list by DELETE.
    let (st, j) = delete(&s, &token, &format!("/admin/api/downloads/{again}")).await;
    assert_eq!((st, j["cancelled"].clone()), (200, json!(false)), "{j}");
    let (_, j) = s.admin_get(&token, "/admin/api/downloads").await;
    assert!(
        j["downloads"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["id"] != again),
        "{j}"
    );

    // The admin delete removes the file and the catalogue row.
    let (st, j) = delete(&s, &token, &format!("/admin/api/models/{name}")).await;
    assert_eq!(st, 200, "{j}\n{}", s.log());
    assert_eq!(j["file_deleted"], true);
    assert!(files_in(&mdir).is_empty(), "{:?}", files_in(&mdir));
    assert!(catalogue(&s, &token).await.is_empty());
    let (st, _) = s
        .admin_get(&token, &format!("/admin/api/models/{name}"))
        .await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_download_leaves_no_file_and_no_row_and_errors_are_clear() {
    let (hf, s, token) = setup().await;
    let mdir = s.models_dir();

    // A slow transfer (≈ 6 MiB/s), cancelled once it is under way.
    *hf.state.faults.chunk_delay.lock().unwrap() = Some(Duration::from_millis(10));
    let id = s
        .start_download(&token, json!({"repo_id": REPO, "filename": Q41}))
        .await;
    let (d, _) = s
        .wait_download(&token, id, 60, |d| {
            d["state"] == "downloading" && d["downloaded"].as_u64().unwrap() > 1 << 20
        })
        .await;
    assert!(d["downloaded"].as_u64() < d["total"].as_u64());
    assert!(d["bytes_per_sec"].as_f64().unwrap() > 0.0, "{d}");
    assert!(
        files_in(&mdir).iter().any(|f| f.starts_with(".partial/")),
        "the transfer writes a partial file: {:?}",
        files_in(&mdir)
    );
    // The same file cannot be downloaded twice at once.
    let msg = expect_error(
        s.admin_post(
            &token,
            DOWNLOAD_ROUTE,
            json!({"repo_id": REPO, "filename": Q41}),
        )
        .await,
        409,
        "download_in_progress",
    );
    assert!(msg.contains(&format!("download {id}")), "{msg}");

    let (st, j) = delete(&s, &token, &format!("/admin/api/downloads/{id}")).await;
    assert_eq!(st, 200, "{j}");
    assert_eq!(j["cancelled"], true);
    assert_eq!(j["download"]["state"], "cancelled");
    assert!(files_in(&mdir).is_empty(), "{:?}", files_in(&mdir));
    assert!(catalogue(&s, &token).await.is_empty());
    let (st, j) = s
        .admin_post(&token, "/admin/api/models/scan", json!({}))
        .await;
    assert_eq!(st, 200, "{j}");
    assert!(
        catalogue(&s, &token).await.is_empty(),
        "a rescan finds nothing either"
    );
    assert_eq!(s.download(&token, id).await["state"], "cancelled");
    let (st, _) = delete(&s, &token, "/admin/api/downloads/999").await;
    assert_eq!(st, 404);
    let (st, _) = delete(&s, &token, "/admin/api/downloads/abc").await;
    assert_eq!(st, 400);

    // At most two transfer at once: a third waits queued, and can be cancelled there.
    let mut ids = Vec::new();
    for f in [Q41, Q4KM, "split/minilm-F16-00001-of-00002.gguf"] {
        ids.push(
            s.start_download(&token, json!({"repo_id": REPO, "filename": f}))
                .await,
        );
    }
    for &id in &ids[..2] {
        s.wait_download(&token, id, 60, |d| d["state"] == "downloading")
            .await;
    }
    // Count from now (the cancelled transfer above has ended on the server too), until both bodies
    // flow; then the third must still wait.
    hf.state.max_active_bodies.store(
        hf.state.active_bodies.load(Ordering::SeqCst),
        Ordering::SeqCst,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while hf.state.active_bodies.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "two transfers never ran at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = s.download(&token, ids[2]).await;
    assert_eq!(third["state"], "queued", "{third}");
    assert_eq!(third["file_count"], 2);
    assert_eq!(hf.state.max_active_bodies.load(Ordering::SeqCst), 2);
    let (st, j) = s.admin_get(&token, "/admin/api/downloads").await;
    assert_eq!((st, j["max_concurrent"].clone()), (200, json!(2)));
    for &id in ids.iter().rev() {
        let (st, j) = delete(&s, &token, &format!("/admin/api/downloads/{id}")).await;
        assert_eq!(
            (st, j["download"]["state"].clone()),
            (200, json!("cancelled")),
            "{j}"
        );
    }
    assert!(files_in(&mdir).is_empty(), "{:?}", files_in(&mdir));
    assert!(catalogue(&s, &token).await.is_empty());
    *hf.state.faults.chunk_delay.lock().unwrap() = None;

    // Errors in the admin API's shape, each saying what is wrong.
    let cases: [(Value, u16, &str, &[&str]); 6] = [
        (
            json!({"repo_id": "test/nope"}),
            404,
            "repo_not_found",
            &["test/nope", "not found"],
        ),
        (
            json!({"repo_id": "test/docs-only"}),
            422,
            "no_gguf",
            &["no GGUF", "README.md"],
        ),
        (
            json!({"repo_id": "not a repo"}),
            400,
            "invalid_repo_id",
            &["OWNER/NAME"],
        ),
        (
            json!({"repo_id": REPO, "filename": "nope.gguf"}),
            404,
            "file_not_in_repo",
            &["nope.gguf", Q4KM],
        ),
        (
            json!({"repo_id": REPO, "revision": "v9"}),
            404,
            "revision_not_found",
            &["v9"],
        ),
        (json!({"repo": REPO}), 400, "", &["repo_id"]),
    ];
    for (body, status, code, words) in cases {
        let (st, j) = s.admin_post(&token, DOWNLOAD_ROUTE, body.clone()).await;
        assert_eq!(st, status, "{body} → {j}");
        let (c, msg) = error_of(&j);
        if !code.is_empty() {
            assert_eq!(c, code, "{j}");
        }
        for w in words {
            assert!(msg.contains(w), "{body}: {msg:?} should contain {w:?}");
        }
    }
    expect_error(
        s.admin_get(&token, "/admin/api/models/repo-files?repo_id=test/nope")
            .await,
        404,
        "repo_not_found",
    );
    let (st, j) = s.admin_get(&token, "/admin/api/models/repo-files").await;
    assert_eq!(st, 400, "{j}");

    // A gated repo: the hub wants a token the supervisor does not have.
    *hf.state.faults.require_token.lock().unwrap() = Some("hf_secret".into());
    let msg = expect_error(
        s.admin_post(&token, DOWNLOAD_ROUTE, json!({"repo_id": REPO}))
            .await,
        403,
        "hf_token_required",
    );
    assert!(msg.contains("HF_TOKEN") && msg.contains(REPO), "{msg}");
    *hf.state.faults.require_token.lock().unwrap() = None;

    // A model larger than the free disk: refused before any byte, with the numbers.
    let mut huge = Served::asset(Q41, Q41);
    huge.rfilename = "huge.Q8_0.gguf".into();
    huge.advertised_size = Some(1 << 60);
    hf.state.add_repo("test/huge", vec![huge]);
    let before = hf.state.file_requests().len();
    let msg = expect_error(
        s.admin_post(&token, DOWNLOAD_ROUTE, json!({"repo_id": "test/huge"}))
            .await,
        507,
        "insufficient_disk",
    );
    assert!(
        msg.contains(&(1u64 << 60).to_string()) && msg.contains("free"),
        "{msg}"
    );
    assert_eq!(hf.state.file_requests().len(), before);

    // A transfer that fails the checksum ends `failed`, with no file and no row.
    hf.state.faults.corrupt.store(true, Ordering::SeqCst);
    let id = s
        .start_download(&token, json!({"repo_id": REPO, "filename": Q41}))
        .await;
    let d = s.wait_download_ended(&token, id, 120).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["error_code"], "checksum_mismatch");
    assert!(
        d["error"].as_str().unwrap().contains("checksum mismatch"),
        "{d}"
    );
    assert!(files_in(&mdir).is_empty(), "{:?}", files_in(&mdir));
    assert!(catalogue(&s, &token).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_gguf_downloads_whole_and_serves_as_one_model() {
    let (_hf, s, token) = setup().await;
    let mdir = s.models_dir();
    let parts = minilm_parts();

    // Naming part 2 downloads the whole split.
    let id = s
        .start_download(
            &token,
            json!({"repo_id": REPO, "filename": "split/minilm-F16-00002-of-00002.gguf"}),
        )
        .await;
    let d = s.wait_download_ended(&token, id, 120).await;
    assert_eq!(d["state"], "done", "{d}\n{}", s.log());
    assert_eq!(d["file_count"], 2);
    let name = d["model"].as_str().unwrap().to_string();
    assert_eq!(name, "minilm-F16", "the split suffix is not part of the id");

    // Both parts on disk, byte for byte; one catalogue row for them, sized as both.
    let mut want: Vec<String> = parts.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(files_in(&mdir), want);
    for (n, data) in &parts {
        assert_eq!(sha256_file(&mdir.join(n)), sha256(data), "{n}");
    }
    let models = catalogue(&s, &token).await;
    assert_eq!(models.len(), 1, "{models:?}");
    let row = &models[0]["model"];
    assert_eq!(row["name"], name.as_str());
    assert_eq!(
        row["size_bytes"],
        parts.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    );
    assert_eq!(row["embedding"], true);
    assert!(
        row["file_path"]
            .as_str()
            .unwrap()
            .ends_with("minilm-F16-00001-of-00002.gguf"),
        "{row}"
    );
    // A rescan keeps it one model.
    let (st, j) = s
        .admin_post(&token, "/admin/api/models/scan", json!({}))
        .await;
    assert_eq!(st, 200, "{j}");
    assert_eq!(catalogue(&s, &token).await.len(), 1);

    // The worker loads the parts as one model: embeddings through the supervisor.
    let (status, body) = s
        .post_json(
            "/v1/embeddings",
            json!({"model": name, "input": ["The cat sits on the mat.", "A feline rests on a rug."]}),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", s.log());
    let vecs: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vecs.len(), 2);
    assert!(vecs.iter().all(|v| v.len() == 384));
    let dot: f64 = vecs[0].iter().zip(&vecs[1]).map(|(a, b)| a * b).sum();
    assert!(dot > 0.5, "paraphrases are close: cosine {dot}");

    // Deleting the model deletes every part.
    let (st, j) = delete(&s, &token, &format!("/admin/api/models/{name}")).await;
    assert_eq!(st, 200, "{j}\n{}", s.log());
    assert_eq!(j["files_deleted"].as_array().unwrap().len(), 2, "{j}");
    assert!(files_in(&mdir).is_empty(), "{:?}", files_in(&mdir));
    assert!(catalogue(&s, &token).await.is_empty());
}
