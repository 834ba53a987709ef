//! What the cache folder holds: one folder per hub repo (`owner--name`), the repo's GGUF
//! files inside as the hub names them, and `.part` files of downloads not finished.
//! `kibitz models list` and `rm` read and change it; [`crate::resolve`] fills it.

use std::path::{Path, PathBuf};

use crate::{has_quant, is_projector, is_repo_name, ModelError};

/// One repo in the cache.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CachedRepo {
    /// `owner/name`, as `--model` takes it.
    pub repo: String,
    pub path: PathBuf,
    /// Its GGUF files, finished or not, by path.
    pub files: Vec<CachedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CachedFile {
    /// Relative to the repo's folder, without `.part`.
    pub name: String,
    pub bytes: u64,
    /// A download that has not finished (it resumes on the next pull).
    pub partial: bool,
}

impl CachedRepo {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// The folder a hub repo is downloaded into.
pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(repo.replace('/', "--"))
}

/// Every repo in `cache`, by name; none when the folder does not exist yet.
pub fn list(cache: &Path) -> Result<Vec<CachedRepo>, ModelError> {
    let entries = match std::fs::read_dir(cache) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ModelError::Io(format!(
                "cannot read '{}': {e}",
                cache.display()
            )))
        }
    };
    let mut repos = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let repo = name.replacen("--", "/", 1);
        if !entry.path().is_dir() || !is_repo_name(&repo) {
            continue; // the state file, the history, anything else kept beside
        }
        let mut files = Vec::new();
        collect(&entry.path(), &entry.path(), &mut files);
        files.sort_by(|a, b| a.name.cmp(&b.name));
        repos.push(CachedRepo {
            repo,
            path: entry.path(),
            files,
        });
    }
    repos.sort_by(|a, b| a.repo.cmp(&b.repo));
    Ok(repos)
}

/// The GGUF files under `dir` (hub repos may keep the projector in a subfolder).
fn collect(root: &Path, dir: &Path, files: &mut Vec<CachedFile>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, files);
            continue;
        }
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let (name, partial) = match relative.strip_suffix(".part") {
            Some(name) => (name.to_string(), true),
            None => (relative, false),
        };
        if !name.to_ascii_lowercase().ends_with(".gguf") {
            continue;
        }
        let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
        files.push(CachedFile {
            name,
            bytes,
            partial,
        });
    }
}

/// Removes `repo` from the cache: all of it, or with `quant` only its LLM files of that
/// quantization (finished or not), keeping the projector for another. Returns what went.
pub fn remove(cache: &Path, repo: &str, quant: Option<&str>) -> Result<Vec<PathBuf>, ModelError> {
    if !is_repo_name(repo) {
        return Err(ModelError::NotFound(repo.to_string()));
    }
    let dir = repo_dir(cache, repo);
    if !dir.is_dir() {
        return Err(ModelError::Io(format!(
            "{repo} is not in the cache ({} does not exist); `kibitz models list` shows what is",
            dir.display()
        )));
    }
    let io = |path: &Path, e: std::io::Error| {
        ModelError::Io(format!("cannot remove '{}': {e}", path.display()))
    };
    let Some(quant) = quant else {
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        return Ok(vec![dir]);
    };
    let mut files = Vec::new();
    collect(&dir, &dir, &mut files);
    let chosen: Vec<&CachedFile> = files
        .iter()
        .filter(|f| !is_projector(&f.name) && has_quant(&f.name, quant))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        return Err(ModelError::Io(format!(
            "no {quant} LLM file of {repo} in {}; it holds: {}",
            dir.display(),
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    let mut removed = Vec::new();
    for file in chosen {
        let mut path = dir.join(&file.name);
        if file.partial {
            path.as_mut_os_string().push(".part");
        }
        std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, bytes: usize) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
    }

    #[test]
    fn lists_repos_with_their_files_and_removes_one_quant_or_all() {
        let cache = tempfile::tempdir().unwrap();
        assert_eq!(list(&cache.path().join("none")).unwrap(), []);
        let dir = repo_dir(cache.path(), "owner/model-gguf");
        touch(&dir.join("model-Q4_K_M.gguf"), 40);
        touch(&dir.join("model-Q8_0.gguf.part"), 8);
        touch(&dir.join("vision/mmproj-f16.gguf"), 20);
        touch(&cache.path().join("streams.json"), 2);
        touch(&cache.path().join("not-a-repo/x.gguf"), 2);

        let repos = list(cache.path()).unwrap();
        assert_eq!(repos.len(), 1, "{repos:?}");
        assert_eq!(repos[0].repo, "owner/model-gguf");
        assert_eq!(repos[0].bytes(), 68);
        let partial: Vec<(&str, bool)> = repos[0]
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.partial))
            .collect();
        assert_eq!(
            partial,
            [
                ("model-Q4_K_M.gguf", false),
                ("model-Q8_0.gguf", true),
                ("vision/mmproj-f16.gguf", false)
            ]
        );

        let err = remove(cache.path(), "owner/model-gguf", Some("Q2_K")).unwrap_err();
        assert!(err.to_string().contains("no Q2_K LLM file"), "{err}");
        let gone = remove(cache.path(), "owner/model-gguf", Some("q8_0")).unwrap();
        assert_eq!(gone, [dir.join("model-Q8_0.gguf.part")]);
        assert!(
            dir.join("vision/mmproj-f16.gguf").exists(),
            "projector kept"
        );
        remove(cache.path(), "owner/model-gguf", None).unwrap();
        assert!(!dir.exists());
        let err = remove(cache.path(), "owner/model-gguf", None).unwrap_err();
        assert!(err.to_string().contains("is not in the cache"), "{err}");
    }
}
