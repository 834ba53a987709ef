//! Model download from a hub, against a small stand-in for the Hugging Face API started in
//! the test: file choice from the listing, resume of a partial download, checksum.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use kibitz_models::{resolve, ModelQuery, Report, Transfer};
use sha2::{Digest, Sha256};

#[derive(Clone, Default)]
struct Hub {
    files: Arc<HashMap<String, Vec<u8>>>,
    /// Checksums the listing claims (a wrong one simulates corruption).
    claimed: Arc<HashMap<String, String>>,
    /// Range headers seen, for the resume check.
    ranges: Arc<Mutex<Vec<String>>>,
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn listing(State(hub): State<Hub>) -> Json<serde_json::Value> {
    let mut entries: Vec<serde_json::Value> = hub
        .files
        .iter()
        .map(|(path, bytes)| {
            serde_json::json!({
                "type": "file", "path": path, "size": bytes.len(),
                "lfs": { "oid": hub.claimed[path], "size": bytes.len() }
            })
        })
        .collect();
    entries.push(serde_json::json!({ "type": "file", "path": "README.md", "size": 10 }));
    Json(serde_json::Value::Array(entries))
}

async fn download(
    State(hub): State<Hub>,
    UrlPath(file): UrlPath<String>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let Some(bytes) = hub.files.get(&file) else {
        return (StatusCode::NOT_FOUND, HeaderMap::new(), Vec::new());
    };
    if let Some(range) = headers.get("range").and_then(|r| r.to_str().ok()) {
        hub.ranges.lock().unwrap().push(format!("{file} {range}"));
        let from: usize = range
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .unwrap();
        return (
            StatusCode::PARTIAL_CONTENT,
            HeaderMap::new(),
            bytes[from..].to_vec(),
        );
    }
    (StatusCode::OK, HeaderMap::new(), bytes.clone())
}

async fn start(hub: Hub) -> String {
    let app = Router::new()
        .route("/api/models/test/minicpm/tree/main", get(listing))
        .route("/test/minicpm/resolve/main/{file}", get(download))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn tiny_files(dir: &Path) -> HashMap<String, Vec<u8>> {
    let pair =
        kibitz_synthetic_model::write_pair(dir, &kibitz_synthetic_model::Spec::tiny()).unwrap();
    let mut files = HashMap::new();
    // Named as a hub repo might: two quantizations and a projector.
    files.insert(
        "model-Q4_K_M.gguf".to_string(),
        std::fs::read(&pair.llm).unwrap(),
    );
    files.insert(
        "model-Q8_0.gguf".to_string(),
        std::fs::read(&pair.llm).unwrap(),
    );
    files.insert(
        "mmproj-model-f16.gguf".to_string(),
        std::fs::read(&pair.mmproj).unwrap(),
    );
    files
}

#[tokio::test]
async fn downloads_the_chosen_pair_resuming_a_partial_file() {
    let source = tempfile::tempdir().unwrap();
    let files = tiny_files(source.path());
    let claimed = files.iter().map(|(k, v)| (k.clone(), sha256(v))).collect();
    let hub = Hub {
        files: Arc::new(files.clone()),
        claimed: Arc::new(claimed),
        ..Hub::default()
    };
    let endpoint = start(hub.clone()).await;

    let cache = tempfile::tempdir().unwrap();
    let repo_dir = cache.path().join("test--minicpm");
    std::fs::create_dir_all(&repo_dir).unwrap();
    // An interrupted earlier download of the projector.
    let projector = &files["mmproj-model-f16.gguf"];
    std::fs::write(
        repo_dir.join("mmproj-model-f16.gguf.part"),
        &projector[..projector.len() / 3],
    )
    .unwrap();

    let mut query = ModelQuery::new("test/minicpm", cache.path());
    query.endpoint = endpoint.clone();
    query.quant = "Q8_0".into();
    let reports: Arc<Mutex<Vec<Transfer>>> = Arc::default();
    let into = reports.clone();
    query.report = Some(Report::new(move |t| into.lock().unwrap().push(t.clone())));
    let got = resolve(&query).await.unwrap();
    // Each file is reported from where it starts (the resumed part counted) to its size.
    let reports = reports.lock().unwrap().clone();
    for (index, name, from) in [
        (1, "model-Q8_0.gguf", 0),
        (2, "mmproj-model-f16.gguf", projector.len() / 3),
    ] {
        let of_file: Vec<&Transfer> = reports.iter().filter(|t| t.file == name).collect();
        let size = files[name].len() as u64;
        assert_eq!(
            of_file.first().map(|t| t.bytes),
            Some(from as u64),
            "{of_file:?}"
        );
        let last = of_file.last().unwrap();
        assert_eq!(
            (last.bytes, last.total, last.index, last.files),
            (size, size, index, 2)
        );
        assert_eq!(last.eta_s.unwrap_or(0.0), 0.0, "{last:?}");
    }
    assert_eq!(got.llm, repo_dir.join("model-Q8_0.gguf"));
    assert_eq!(got.mmproj, repo_dir.join("mmproj-model-f16.gguf"));
    assert_eq!(std::fs::read(&got.llm).unwrap(), files["model-Q8_0.gguf"]);
    assert_eq!(std::fs::read(&got.mmproj).unwrap(), *projector);
    assert!(!repo_dir.join("mmproj-model-f16.gguf.part").exists());
    let ranges = hub.ranges.lock().unwrap().clone();
    assert_eq!(
        ranges,
        [format!(
            "mmproj-model-f16.gguf bytes={}-",
            projector.len() / 3
        )],
        "only the rest was asked for"
    );

    // Offline now: the cached pair is still found.
    query.endpoint = "http://127.0.0.1:9".into();
    assert_eq!(resolve(&query).await.unwrap(), got);
}

#[tokio::test]
async fn a_checksum_mismatch_is_an_error_and_leaves_nothing_behind() {
    let source = tempfile::tempdir().unwrap();
    let files = tiny_files(source.path());
    let mut claimed: HashMap<String, String> =
        files.iter().map(|(k, v)| (k.clone(), sha256(v))).collect();
    claimed.insert("model-Q4_K_M.gguf".into(), "0".repeat(64));
    let endpoint = start(Hub {
        files: Arc::new(files),
        claimed: Arc::new(claimed),
        ..Hub::default()
    })
    .await;

    let cache = tempfile::tempdir().unwrap();
    let mut query = ModelQuery::new("test/minicpm", cache.path());
    query.endpoint = endpoint;
    let err = resolve(&query).await.unwrap_err().to_string();
    assert!(
        err.contains("model-Q4_K_M.gguf") && err.contains("does not match"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(cache.path().join("test--minicpm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("Q4_K_M"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    query.quant = "Q2_K".into();
    let err = resolve(&query).await.unwrap_err().to_string();
    assert!(
        err.contains("no Q2_K LLM file") && err.contains("model-Q8_0.gguf"),
        "{err}"
    );
}
