//! Model files, apart from running them: finding the two GGUF files of a model (a local
//! file or folder, or a Hugging Face repo downloaded into a cache folder), and what the cache
//! holds (`kibitz models list/pull/rm`).
//!
//! A hub repo's file names are not known in advance, so they are chosen from the repo's file
//! listing: the LLM by its quantization (`Q4_K_M`), the projector by `mmproj` or `vision` in
//! its name. Downloads resume from a `.part` file and are checked against the listing's size
//! and SHA-256 before they are used. Every file is checked as GGUF before llama.cpp sees it,
//! because llama.cpp aborts the whole process on some malformed files.
//!
//! A download tells how it goes through [`ModelQuery::report`] (a server shows it on its page
//! and status) and, on a terminal, as a progress bar.

mod cache;
pub mod gguf;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};

pub use cache::{list, remove, CachedFile, CachedRepo};
pub use gguf::GgufInfo;

pub const DEFAULT_MODEL: &str = "openbmb/MiniCPM-o-4_5-gguf";
pub const DEFAULT_QUANT: &str = "Q4_K_M";

/// The pair llama.cpp loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub llm: PathBuf,
    pub mmproj: PathBuf,
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct ModelQuery {
    /// A `.gguf` file, a folder, or a hub repo `owner/name`.
    pub model: String,
    /// The projector, when it can't be found beside the model.
    pub mmproj: Option<PathBuf>,
    pub quant: String,
    pub cache: PathBuf,
    /// Hub address (`HF_ENDPOINT`), default `https://huggingface.co`.
    pub endpoint: String,
    /// Hub token (`HF_TOKEN`) for gated or private repos.
    pub token: Option<String>,
    /// Draw a progress bar on stderr while downloading.
    pub progress: bool,
    /// Told of every piece of a download as it arrives.
    pub report: Option<Report>,
}

/// How far the download of one file has come.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Transfer {
    /// The file's path in the repo.
    pub file: String,
    /// Which of the files to download this is (1-based), and how many there are.
    pub index: usize,
    pub files: usize,
    /// Bytes in the cache so far (a resumed file starts at what it had).
    pub bytes: u64,
    /// The file's size, 0 when the hub did not say.
    pub total: u64,
    /// Since this file's download began (a resumed part not counted).
    pub bytes_per_s: f64,
    /// Seconds left at that speed, when it is known.
    pub eta_s: Option<f64>,
}

/// A receiver of [`Transfer`]s: called often, from the downloading task, so it must be quick.
#[derive(Clone)]
pub struct Report(Arc<dyn Fn(&Transfer) + Send + Sync>);

impl Report {
    pub fn new(f: impl Fn(&Transfer) + Send + Sync + 'static) -> Report {
        Report(Arc::new(f))
    }
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Report")
    }
}

impl ModelQuery {
    pub fn new(model: impl Into<String>, cache: impl Into<PathBuf>) -> Self {
        ModelQuery {
            model: model.into(),
            mmproj: None,
            quant: DEFAULT_QUANT.into(),
            cache: cache.into(),
            endpoint: "https://huggingface.co".into(),
            token: None,
            progress: false,
            report: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("'{0}' is neither a file, a folder, nor a hub repo name like owner/name")]
    NotFound(String),
    #[error("no vision projector in {where_}: expected a .gguf file with 'mmproj' or 'vision' in its name{hint}")]
    NoProjector { where_: String, hint: String },
    #[error("no {quant} LLM file in {where_}{available}")]
    NoLlm {
        quant: String,
        where_: String,
        available: String,
    },
    #[error("{0}")]
    Invalid(String),
    /// One line: what is missing, where it goes, and the command that fetches it.
    #[error(
        "model {repo} ({quant}) is not in {dir} and {endpoint} cannot be reached ({reason}); \
         run `kibitz models pull {repo} --quant {quant}` where the hub is reachable, or put the LLM \
         (*{quant}*.gguf) and the vision projector (*mmproj*.gguf) from {endpoint}/{repo} into {dir}"
    )]
    Offline {
        endpoint: String,
        repo: String,
        reason: String,
        quant: String,
        dir: String,
    },
    #[error("download of {file} failed: {reason}")]
    Download { file: String, reason: String },
    #[error("{0}")]
    Io(String),
}

/// Finds (and if needed downloads) the model pair, then checks both files.
pub async fn resolve(query: &ModelQuery) -> Result<ModelFiles, ModelError> {
    let path = Path::new(&query.model);
    let files = if path.is_dir() {
        from_dir(path, query)?
    } else if path.is_file() {
        let mmproj = match &query.mmproj {
            Some(p) => p.clone(),
            None => {
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                find_projector(
                    &gguf_files(dir)?,
                    &dir.display().to_string(),
                    "; pass --mmproj FILE",
                )?
            }
        };
        ModelFiles {
            llm: path.to_path_buf(),
            mmproj,
        }
    } else if is_repo_name(&query.model) {
        from_hub(query).await?
    } else {
        return Err(ModelError::NotFound(query.model.clone()));
    };
    check_pair(&files)?;
    Ok(files)
}

/// Checks that `llm` is an LLM GGUF and `mmproj` a vision projector GGUF, both complete.
pub fn check_pair(files: &ModelFiles) -> Result<(), ModelError> {
    let llm = GgufInfo::read(&files.llm).map_err(ModelError::Invalid)?;
    if llm.architecture == "clip" {
        return Err(ModelError::Invalid(format!(
            "'{}' is a vision projector, not an LLM; pass the LLM file as --model and this one as --mmproj",
            files.llm.display()
        )));
    }
    let mmproj = GgufInfo::read(&files.mmproj).map_err(ModelError::Invalid)?;
    if mmproj.architecture != "clip" {
        return Err(ModelError::Invalid(format!(
            "'{}' is not a vision projector: its architecture is '{}', expected 'clip'",
            files.mmproj.display(),
            mmproj.architecture
        )));
    }
    if !mmproj.has_vision {
        return Err(ModelError::Invalid(format!(
            "'{}' has no vision encoder",
            files.mmproj.display()
        )));
    }
    Ok(())
}

fn is_repo_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn is_projector(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.contains("mmproj") || lower.contains("vision")
}

fn gguf_files(dir: &Path) -> Result<Vec<String>, ModelError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io(format!("cannot read '{}': {e}", dir.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    names.sort();
    Ok(names)
}

fn find_projector(names: &[String], where_: &str, hint: &str) -> Result<PathBuf, ModelError> {
    let candidates: Vec<&String> = names.iter().filter(|n| is_projector(n)).collect();
    // Several precisions may sit side by side; F16 is what the model card recommends.
    candidates
        .iter()
        .find(|n| n.to_ascii_lowercase().contains("f16"))
        .or(candidates.first())
        .map(|n| PathBuf::from(n.as_str()))
        .ok_or_else(|| ModelError::NoProjector {
            where_: where_.into(),
            hint: hint.into(),
        })
}

fn find_llm(names: &[String], quant: &str, where_: &str) -> Result<PathBuf, ModelError> {
    let llms: Vec<&String> = names.iter().filter(|n| !is_projector(n)).collect();
    let q = quant.to_ascii_lowercase();
    let matching: Vec<&&String> = llms.iter().filter(|n| has_quant(n, quant)).collect();
    if let Some(name) = matching.iter().min_by_key(|n| n.len()) {
        return Ok(PathBuf::from(name.as_str()));
    }
    if llms.len() == 1
        && names.iter().all(|n| !n.to_ascii_lowercase().contains(&q))
        && !where_.contains("://")
    {
        // A local folder with a single LLM: use it whatever its quantization.
        return Ok(PathBuf::from(llms[0].as_str()));
    }
    let available = if llms.is_empty() {
        String::new()
    } else {
        format!(
            "; found: {}; choose one with --quant",
            llms.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(ModelError::NoLlm {
        quant: quant.into(),
        where_: where_.into(),
        available,
    })
}

/// Whether a file name is of quantization `quant` (any case). `Q4_K` must not pick `Q4_K_M`:
/// the quant must end at a separator.
fn has_quant(name: &str, quant: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let q = quant.to_ascii_lowercase();
    lower.match_indices(&q).any(|(i, _)| {
        let after = lower[i + q.len()..].chars().next();
        matches!(after, None | Some('.') | Some('-'))
    })
}

fn from_dir(dir: &Path, query: &ModelQuery) -> Result<ModelFiles, ModelError> {
    let names = gguf_files(dir)?;
    let where_ = format!("'{}'", dir.display());
    let llm = dir.join(find_llm(&names, &query.quant, &where_)?);
    let mmproj = match &query.mmproj {
        Some(p) => p.clone(),
        None => dir.join(find_projector(&names, &where_, "; pass --mmproj FILE")?),
    };
    Ok(ModelFiles { llm, mmproj })
}

/// One file of a hub repo listing.
#[derive(Debug, Clone, serde::Deserialize)]
struct HubFile {
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    lfs: Option<HubLfs>,
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct HubLfs {
    #[serde(default)]
    oid: String,
    #[serde(default)]
    size: u64,
}

fn repo_dir(query: &ModelQuery) -> PathBuf {
    cache::repo_dir(&query.cache, &query.model)
}

async fn from_hub(query: &ModelQuery) -> Result<ModelFiles, ModelError> {
    let dir = repo_dir(query);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("kibitz/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ModelError::Io(e.to_string()))?;
    let listing = match list_repo(&client, query).await {
        Ok(listing) => listing,
        Err(reason) => {
            // Offline: files downloaded earlier are still good.
            if let Ok(files) = from_dir(&dir, query) {
                tracing::warn!(
                    "cannot reach {}: {reason}; using the cached files in {}",
                    query.endpoint,
                    dir.display()
                );
                return Ok(files);
            }
            return Err(ModelError::Offline {
                endpoint: query.endpoint.clone(),
                repo: query.model.clone(),
                reason,
                quant: query.quant.clone(),
                dir: dir.display().to_string(),
            });
        }
    };
    let names: Vec<String> = listing
        .iter()
        .filter(|f| f.kind != "directory" && f.path.to_ascii_lowercase().ends_with(".gguf"))
        .map(|f| f.path.clone())
        .collect();
    let where_ = format!("{}/{}", query.endpoint, query.model);
    let llm = find_llm(&names, &query.quant, &where_)?;
    let mmproj = match &query.mmproj {
        Some(p) => p.clone(),
        None => find_projector(&names, &where_, "")?,
    };
    let mut paths = Vec::new();
    for (i, name) in [&llm, &mmproj].into_iter().enumerate() {
        let name = name.to_string_lossy().into_owned();
        let entry = listing.iter().find(|f| f.path == name);
        match entry {
            Some(entry) => paths.push(fetch(&client, query, &dir, entry, (i + 1, 2)).await?),
            None => paths.push(PathBuf::from(&name)), // a local --mmproj
        }
    }
    Ok(ModelFiles {
        llm: paths.remove(0),
        mmproj: paths.remove(0),
    })
}

async fn list_repo(client: &reqwest::Client, query: &ModelQuery) -> Result<Vec<HubFile>, String> {
    let url = format!(
        "{}/api/models/{}/tree/main?recursive=true",
        query.endpoint, query.model
    );
    let mut req = client.get(&url).timeout(Duration::from_secs(30));
    if let Some(token) = &query.token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(|e| error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("{} answered {}", url, resp.status()));
    }
    resp.json()
        .await
        .map_err(|e| format!("unexpected listing from {url}: {e}"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Downloads one file into the cache unless a complete copy is there; resumes a `.part`.
/// `nth` is (this file, of how many), for the report.
async fn fetch(
    client: &reqwest::Client,
    query: &ModelQuery,
    dir: &Path,
    file: &HubFile,
    nth: (usize, usize),
) -> Result<PathBuf, ModelError> {
    let size = file
        .lfs
        .as_ref()
        .map(|l| l.size)
        .filter(|&s| s > 0)
        .unwrap_or(file.size);
    let sha = file
        .lfs
        .as_ref()
        .map(|l| l.oid.clone())
        .filter(|o| o.len() == 64);
    let target = dir.join(&file.path);
    if std::fs::metadata(&target)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return Ok(target);
    }
    let fail = |reason: String| ModelError::Download {
        file: file.path.clone(),
        reason,
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(format!("cannot create '{}': {e}", parent.display())))?;
    }
    let part = target.with_extension("gguf.part");
    let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if have > size {
        have = 0;
    }
    let url = format!(
        "{}/{}/resolve/main/{}",
        query.endpoint, query.model, file.path
    );
    let mut req = client.get(&url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    if let Some(token) = &query.token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(|e| fail(error_chain(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(fail(format!("{url} answered {status}")));
    }
    if have > 0 && status != reqwest::StatusCode::PARTIAL_CONTENT {
        have = 0; // the server ignored the range: start over
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(have > 0)
        .truncate(have == 0)
        .open(&part)
        .map_err(|e| fail(format!("cannot write '{}': {e}", part.display())))?;
    let bar = if query.progress {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(file.path.clone());
        bar.set_position(have);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut transfer = Transfer {
        file: file.path.clone(),
        index: nth.0,
        files: nth.1,
        bytes: have,
        total: size,
        bytes_per_s: 0.0,
        eta_s: None,
    };
    let started = Instant::now();
    let report = |transfer: &Transfer| {
        if let Some(report) = &query.report {
            (report.0)(transfer);
        }
    };
    report(&transfer);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| fail(format!("{} (run again to resume)", error_chain(&e))))?;
        out.write_all(&chunk)
            .map_err(|e| fail(format!("cannot write '{}': {e}", part.display())))?;
        bar.inc(chunk.len() as u64);
        transfer.advance(chunk.len() as u64, have, started.elapsed());
        report(&transfer);
    }
    out.flush().map_err(|e| fail(e.to_string()))?;
    drop(out);
    bar.finish_and_clear();
    let got = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if size > 0 && got != size {
        return Err(fail(format!(
            "got {got} bytes of {size} (run again to resume)"
        )));
    }
    if let Some(expected) = sha {
        let actual = sha256_file(&part).map_err(|e| fail(e.to_string()))?;
        if actual != expected {
            let _ = std::fs::remove_file(&part);
            return Err(fail(format!("SHA-256 {actual} does not match the hub's {expected}; the partial file was removed")));
        }
    }
    std::fs::rename(&part, &target).map_err(|e| fail(format!("cannot move into place: {e}")))?;
    Ok(target)
}

impl Transfer {
    /// `n` more bytes arrived, `elapsed` after the download began at `resumed_from` bytes.
    fn advance(&mut self, n: u64, resumed_from: u64, elapsed: Duration) {
        self.bytes += n;
        let seconds = elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.bytes_per_s = (self.bytes - resumed_from) as f64 / seconds;
        }
        self.eta_s = (self.total > 0 && self.bytes_per_s > 0.0)
            .then(|| self.total.saturating_sub(self.bytes) as f64 / self.bytes_per_s);
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_llm_by_quant_and_projector_by_name() {
        let listing = names(&[
            "MiniCPM-o-4_5-Q4_K_M.gguf",
            "MiniCPM-o-4_5-Q4_K.gguf",
            "MiniCPM-o-4_5-Q8_0.gguf",
            "vision/MiniCPM-o-4_5-vision-F16.gguf",
            "mmproj-model-q8_0.gguf",
        ]);
        assert_eq!(
            find_llm(&listing, "Q4_K_M", "x").unwrap(),
            PathBuf::from("MiniCPM-o-4_5-Q4_K_M.gguf")
        );
        assert_eq!(
            find_llm(&listing, "q4_k", "x").unwrap(),
            PathBuf::from("MiniCPM-o-4_5-Q4_K.gguf")
        );
        assert_eq!(
            find_llm(&listing, "Q8_0", "x").unwrap(),
            PathBuf::from("MiniCPM-o-4_5-Q8_0.gguf")
        );
        assert_eq!(
            find_projector(&listing, "x", "").unwrap(),
            PathBuf::from("vision/MiniCPM-o-4_5-vision-F16.gguf")
        );
        let err = find_llm(&listing, "Q2_K", "https://hub/x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no Q2_K LLM file") && err.contains("Q8_0.gguf"),
            "{err}"
        );
    }

    #[test]
    fn repo_names_are_told_from_paths() {
        assert!(is_repo_name("openbmb/MiniCPM-o-4_5-gguf"));
        assert!(!is_repo_name("./models/x"));
        assert!(!is_repo_name("model.gguf"));
        assert!(!is_repo_name("a/b/c"));
    }

    #[tokio::test]
    async fn offline_hub_gives_one_clear_error() {
        let cache = tempfile::tempdir().unwrap();
        let mut query = ModelQuery::new(DEFAULT_MODEL, cache.path());
        query.endpoint = "http://127.0.0.1:9".into(); // discard port: nothing listens
        let err = resolve(&query).await.unwrap_err().to_string();
        let dir = cache.path().join("openbmb--MiniCPM-o-4_5-gguf");
        assert!(
            err.contains(&format!(
                "model openbmb/MiniCPM-o-4_5-gguf (Q4_K_M) is not in {} and \
                 http://127.0.0.1:9 cannot be reached",
                dir.display()
            )),
            "{err}"
        );
        assert!(
            err.contains("`kibitz models pull openbmb/MiniCPM-o-4_5-gguf --quant Q4_K_M`")
                && err.contains("*Q4_K_M*.gguf"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn speed_and_eta_count_only_what_this_download_fetched() {
        let mut t = Transfer {
            file: "m.gguf".into(),
            index: 1,
            files: 2,
            bytes: 1000,
            total: 5000,
            bytes_per_s: 0.0,
            eta_s: None,
        };
        t.advance(2000, 1000, Duration::from_secs(2));
        assert_eq!(t.bytes, 3000);
        assert_eq!(t.bytes_per_s, 1000.0);
        assert_eq!(t.eta_s, Some(2.0));
        t.total = 0;
        t.advance(0, 1000, Duration::from_secs(2));
        assert_eq!(t.eta_s, None, "no size, no ETA");
    }

    #[tokio::test]
    async fn missing_path_is_reported() {
        let query = ModelQuery::new("/nonexistent/model.gguf", "/tmp");
        let err = resolve(&query).await.unwrap_err().to_string();
        assert!(
            err.contains("'/nonexistent/model.gguf' is neither a file"),
            "{err}"
        );
    }
}
