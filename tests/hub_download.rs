//! The hub against a local Hugging Face–compatible server serving the shared model files: choice,
//! redirects, hashes, resume after a dropped connection and after a restart, checksum failure, auth and
//! not-found errors, cancellation, the disk check, split models and the concurrency limit.

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cyber_inference::supervisor::hub::{
    DownloadRequest, Downloaded, Hub, HubConfig, HubError, PARTIAL_DIR, Phase, Progress,
    RetryPolicy,
};
use support::assets::MINILM;
use support::assets::SMOL_Q4_1 as Q41;
use support::assets::SMOL_Q4_K_M as Q4KM;
use support::files::{files_in, sha256, sha256_file};
use support::hub::{HfServer, Served, asset};
use tokio_util::sync::CancellationToken;

fn hub(server: &HfServer, dir: &Path, token: Option<&str>) -> Hub {
    let mut c = HubConfig::new(&server.url, token.map(str::to_string), dir.to_path_buf());
    c.retry = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    };
    c.read_timeout = Duration::from_secs(20);
    Hub::new(c).unwrap()
}

fn req(repo: &str, filename: Option<&str>) -> DownloadRequest {
    DownloadRequest {
        repo_id: repo.into(),
        revision: None,
        filename: filename.map(str::to_string),
    }
}

/// Downloads `r` with `hub`, without progress reports or cancellation.
async fn fetch(hub: &Hub, r: &DownloadRequest) -> Result<Downloaded, HubError> {
    hub.download(r, |_| {}, CancellationToken::new()).await
}

async fn minilm_server() -> HfServer {
    let s = HfServer::start().await;
    s.state.add_repo(
        "test/minilm",
        vec![
            Served::new("README.md", "# MiniLM\n".into()),
            Served::asset(MINILM, MINILM),
        ],
    );
    s
}

/// Models dir holds exactly `names` (and an empty or absent .partial).
fn assert_only(dir: &Path, names: &[&str]) {
    let files = files_in(dir);
    assert_eq!(files, names, "files in MODELS_DIR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chooses_q4_k_m_follows_the_redirect_and_the_file_hashes_right() {
    let server = HfServer::start().await;
    server.state.add_repo(
        "test/SmolLM2-135M-Instruct-GGUF",
        vec![
            Served::new("README.md", "hello".into()),
            Served::asset(Q41, Q41),
            Served::asset(Q4KM, Q4KM),
        ],
    );
    server.state.faults.redirect.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&server, dir.path(), None);

    let listed = hub
        .list_models("test/SmolLM2-135M-Instruct-GGUF", None)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2, "README is no model");
    assert_eq!(listed[0].filename, Q41, "smallest first");
    assert_eq!(listed[1].quantization.as_deref(), Some("Q4_K_M"));

    let reports: Arc<Mutex<Vec<Progress>>> = Default::default();
    let r = reports.clone();
    let done = hub
        .download(
            &req("test/SmolLM2-135M-Instruct-GGUF", None),
            move |p| r.lock().unwrap().push(p.clone()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    let (_, expected) = asset(Q4KM);
    assert_eq!(done.paths, vec![dir.path().join(Q4KM)]);
    assert_eq!(sha256_file(&done.paths[0]), expected);
    assert_eq!(done.bytes_transferred, asset(Q4KM).0.len() as u64);
    assert_only(dir.path(), &[Q4KM]);

    let seen = server.state.file_requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].path.ends_with(&format!("/resolve/main/{Q4KM}")));
    assert!(
        seen[1].path.starts_with("/cdn/"),
        "redirect followed: {seen:?}"
    );

    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.first().unwrap().phase, Phase::Queued);
    let last = reports.last().unwrap();
    assert_eq!(last.phase, Phase::Done);
    assert_eq!(last.downloaded, last.total);
    assert!(
        reports
            .windows(2)
            .all(|w| w[0].downloaded <= w[1].downloaded)
    );
    assert!(reports.iter().any(|p| p.phase == Phase::Verifying));
    assert!(
        reports.iter().any(|p| p.bytes_per_sec > 0.0),
        "a rate was reported"
    );

    // A second download of the same model finds it in place: nothing is fetched.
    let again = fetch(&hub, &req("test/SmolLM2-135M-Instruct-GGUF", Some(Q4KM)))
        .await
        .unwrap();
    assert_eq!(again.bytes_transferred, 0);
    assert_eq!(server.state.file_requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_at_40_percent_resumes_from_40_percent() {
    let server = minilm_server().await;
    let (data, expected) = asset(MINILM);
    let at = data.len() as u64 * 4 / 10;
    *server.state.faults.drop_at.lock().unwrap() = Some(at);
    let dir = tempfile::tempdir().unwrap();
    let done = fetch(&hub(&server, dir.path(), None), &req("test/minilm", None))
        .await
        .unwrap();
    assert_eq!(sha256_file(&done.paths[0]), expected);
    let seen = server.state.file_requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range, None);
    assert_eq!(
        seen[1].range.as_deref(),
        Some(format!("bytes={at}-").as_str())
    );
    assert_eq!(
        done.bytes_transferred,
        data.len() as u64,
        "no byte fetched twice"
    );
    assert_only(dir.path(), &[MINILM]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_partial_file_left_by_a_failed_run() {
    let server = minilm_server().await;
    let (data, expected) = asset(MINILM);
    let at = data.len() as u64 * 4 / 10;
    *server.state.faults.always_drop_at.lock().unwrap() = Some(at);
    let dir = tempfile::tempdir().unwrap();
    let e = fetch(&hub(&server, dir.path(), None), &req("test/minilm", None))
        .await
        .unwrap_err();
    assert!(matches!(e, HubError::Network { attempts: 4, .. }), "{e:?}");
    assert!(e.to_string().contains("resumes"), "{e}");
    let partial = files_in(dir.path());
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert!(partial[0].starts_with(PARTIAL_DIR) && partial[0].ends_with(".part"));
    assert_eq!(
        std::fs::metadata(dir.path().join(&partial[0]))
            .unwrap()
            .len(),
        at
    );

    // "Restart": a fresh hub on the same MODELS_DIR, the network healthy again.
    *server.state.faults.always_drop_at.lock().unwrap() = None;
    let before = server.state.file_requests().len();
    let done = fetch(&hub(&server, dir.path(), None), &req("test/minilm", None))
        .await
        .unwrap();
    assert_eq!(sha256_file(&done.paths[0]), expected);
    let seen = server.state.file_requests();
    assert_eq!(seen.len(), before + 1);
    assert_eq!(
        seen[before].range.as_deref(),
        Some(format!("bytes={at}-").as_str())
    );
    assert_eq!(done.bytes_transferred, data.len() as u64 - at);
    assert_only(dir.path(), &[MINILM]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_body_fails_the_checksum_and_leaves_no_file() {
    let server = minilm_server().await;
    server.state.faults.corrupt.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let e = fetch(&hub(&server, dir.path(), None), &req("test/minilm", None))
        .await
        .unwrap_err();
    match &e {
        HubError::ChecksumMismatch {
            expected, actual, ..
        } => {
            assert_eq!(*expected, asset(MINILM).1);
            assert_ne!(actual, expected);
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("deleted"), "{e}");
    assert_only(dir.path(), &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_repos_need_the_right_token() {
    let server = minilm_server().await;
    *server.state.faults.require_token.lock().unwrap() = Some("hf_good".into());
    let dir = tempfile::tempdir().unwrap();
    let r = req("test/minilm", None);

    let e = fetch(&hub(&server, dir.path(), None), &r)
        .await
        .unwrap_err();
    assert!(
        matches!(e, HubError::AuthRequired { status: 401, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("HF_TOKEN"), "{e}");
    // The admin API answers 403 (a 401 would mean its own session is invalid).
    assert_eq!((e.http_status(), e.code()), (403, "hf_token_required"));

    let e = fetch(&hub(&server, dir.path(), Some("hf_bad")), &r)
        .await
        .unwrap_err();
    assert!(
        matches!(e, HubError::AuthRejected { status: 403, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("refused"), "{e}");
    assert_only(dir.path(), &[]);

    let done = fetch(&hub(&server, dir.path(), Some("hf_good")), &r)
        .await
        .unwrap();
    assert_eq!(sha256_file(&done.paths[0]), asset(MINILM).1);
    let seen = server.state.file_requests();
    assert_eq!(seen.last().unwrap().auth.as_deref(), Some("Bearer hf_good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_repos_revisions_files_and_repos_without_gguf() {
    let server = minilm_server().await;
    server
        .state
        .add_repo("test/docs-only", vec![Served::new("README.md", "x".into())]);
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&server, dir.path(), None);
    let run = |r: DownloadRequest| {
        let hub = &hub;
        async move { fetch(hub, &r).await.unwrap_err() }
    };
    let e = run(req("test/nope", None)).await;
    assert!(matches!(e, HubError::RepoNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("test/nope") && e.to_string().contains("spelling"));
    assert_eq!(e.http_status(), 404);

    let mut r = req("test/minilm", None);
    r.revision = Some("v9".into());
    let e = run(r).await;
    assert!(matches!(e, HubError::RevisionNotFound { .. }), "{e:?}");

    let e = run(req("test/docs-only", None)).await;
    assert!(matches!(e, HubError::NoGguf { .. }), "{e:?}");
    assert!(e.to_string().contains("README.md"), "{e}");

    let e = run(req("test/minilm", Some("other.gguf"))).await;
    assert!(matches!(e, HubError::FileNotInRepo { .. }), "{e:?}");
    assert!(e.to_string().contains(MINILM), "{e}");

    let e = run(req("not a repo", None)).await;
    assert!(matches!(e, HubError::InvalidRepoId(_)), "{e:?}");
    assert_only(dir.path(), &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_a_network_error_after_retries() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut c = HubConfig::new(format!("http://127.0.0.1:{port}"), None, dir.path().into());
    c.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
    };
    let e = fetch(&Hub::new(c).unwrap(), &req("test/minilm", None))
        .await
        .unwrap_err();
    assert!(matches!(e, HubError::Network { attempts: 3, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&port.to_string()) && msg.contains("HF_ENDPOINT"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_download_leaves_nothing() {
    let server = minilm_server().await;
    *server.state.faults.chunk_delay.lock().unwrap() = Some(Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&server, dir.path(), None);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let e = hub
        .download(
            &req("test/minilm", None),
            move |p| {
                if p.phase == Phase::Downloading && p.downloaded > 1 << 20 {
                    c.cancel();
                }
            },
            cancel,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, HubError::Cancelled), "{e:?}");
    assert_only(dir.path(), &[]);
    // The server saw the transfer start, and stop long before the end.
    assert_eq!(server.state.file_requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_disk_space_stops_before_any_byte_with_the_numbers() {
    let server = HfServer::start().await;
    let mut huge = Served::asset(MINILM, MINILM);
    huge.advertised_size = Some(1 << 60);
    server.state.add_repo("test/huge", vec![huge]);
    let dir = tempfile::tempdir().unwrap();
    let e = fetch(&hub(&server, dir.path(), None), &req("test/huge", None))
        .await
        .unwrap_err();
    match &e {
        HubError::InsufficientDisk { needed, .. } => assert_eq!(*needed, 1 << 60),
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains(&(1u64 << 60).to_string()), "{e}");
    assert!(server.state.file_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_models_are_downloaded_whole() {
    let server = HfServer::start().await;
    let (data, _) = asset(MINILM);
    let third = data.len() / 3;
    let names = [
        "Q8_0/minilm-Q8_0-00001-of-00003.gguf",
        "Q8_0/minilm-Q8_0-00002-of-00003.gguf",
        "Q8_0/minilm-Q8_0-00003-of-00003.gguf",
    ];
    let parts = [
        data.slice(..third),
        data.slice(third..2 * third),
        data.slice(2 * third..),
    ];
    // Listed out of order, beside a single-file model that is smaller but not Q8_0.
    server.state.add_repo(
        "test/split",
        vec![
            Served::new(names[2], parts[2].clone()),
            Served::new("minilm-Q2_K.gguf", data.slice(..1000)),
            Served::new(names[0], parts[0].clone()),
            Served::new(names[1], parts[1].clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let done = fetch(&hub(&server, dir.path(), None), &req("test/split", None))
        .await
        .unwrap();
    assert_eq!(done.paths.len(), 3);
    for (i, p) in done.paths.iter().enumerate() {
        assert_eq!(p.file_name().unwrap(), names[i].split('/').nth(1).unwrap());
        assert_eq!(sha256_file(p), sha256(&parts[i]));
    }
    assert_eq!(done.model.total_size, data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_n_downloads_run_at_once() {
    let server = HfServer::start().await;
    let (data, _) = asset(MINILM);
    server.state.add_repo(
        "test/two",
        vec![
            Served::new("a.Q8_0.gguf", data.slice(..4 << 20)),
            Served::new("b.Q4_K_M.gguf", data.slice(4 << 20..8 << 20)),
        ],
    );
    *server.state.faults.chunk_delay.lock().unwrap() = Some(Duration::from_millis(2));
    for limit in [1usize, 2] {
        server.state.max_active_bodies.store(0, Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let mut c = HubConfig::new(&server.url, None, dir.path().into());
        c.max_concurrent = limit;
        let hub = Hub::new(c).unwrap();
        let queued = Arc::new(Mutex::new(0));
        let q = queued.clone();
        let on_progress = move |p: &Progress| {
            if p.phase == Phase::Queued {
                *q.lock().unwrap() += 1;
            }
        };
        let (ra, rb) = (
            req("test/two", Some("a.Q8_0.gguf")),
            req("test/two", Some("b.Q4_K_M.gguf")),
        );
        let (a, b) = tokio::join!(
            hub.download(&ra, &on_progress, CancellationToken::new()),
            hub.download(&rb, &on_progress, CancellationToken::new()),
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(*queued.lock().unwrap(), 2);
        assert_eq!(
            server.state.max_active_bodies.load(Ordering::SeqCst),
            limit,
            "transfers running at once with max_concurrent={limit}"
        );
        assert_only(dir.path(), &["a.Q8_0.gguf", "b.Q4_K_M.gguf"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_file_in_the_way_is_a_conflict_not_overwritten() {
    let server = minilm_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(MINILM), b"something else").unwrap();
    let e = fetch(&hub(&server, dir.path(), None), &req("test/minilm", None))
        .await
        .unwrap_err();
    assert!(matches!(e, HubError::Conflict { .. }), "{e:?}");
    assert_eq!(
        std::fs::read(dir.path().join(MINILM)).unwrap(),
        b"something else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_model_reaches_models_dir_only_whole_and_a_cancel_removes_its_parts() {
    let server = HfServer::start().await;
    let (data, _) = asset(MINILM);
    let half = data.len() / 2;
    let names = [
        "minilm-F16-00001-of-00002.gguf",
        "minilm-F16-00002-of-00002.gguf",
    ];
    server.state.add_repo(
        "test/split2",
        vec![
            Served::new(names[0], data.slice(..half)),
            Served::new(names[1], data.slice(half..)),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&server, dir.path(), None);
    let gguf_in_dir = |d: &Path| {
        files_in(d)
            .into_iter()
            .filter(|f| !f.starts_with(PARTIAL_DIR))
            .collect::<Vec<_>>()
    };

    // While part 2 transfers, part 1 (verified) waits in .partial; the cancel deletes both.
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let during: Arc<Mutex<Option<Vec<String>>>> = Default::default();
    let d = during.clone();
    let path = dir.path().to_path_buf();
    let e = hub
        .download(
            &req("test/split2", None),
            move |p| {
                if p.phase == Phase::Downloading && p.file_index == 2 {
                    d.lock().unwrap().get_or_insert_with(|| gguf_in_dir(&path));
                    c.cancel();
                }
            },
            cancel,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, HubError::Cancelled), "{e:?}");
    assert_eq!(during.lock().unwrap().as_deref(), Some(&[][..]));
    assert_only(dir.path(), &[]);

    // Uninterrupted: both parts arrive together, and `fetched` names them.
    let done = fetch(&hub, &req("test/split2", None)).await.unwrap();
    assert_eq!(done.fetched, done.paths);
    assert_only(dir.path(), &names);
}
