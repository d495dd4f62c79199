//! A replica's side of [`FileManifest`]: the model files named by a manifest URL, fetched into
//! a local cache and checked against their SHA-256 before anything reads them.
//!
//! A replica on another machine than its gateway (a pod) cannot read the artifact store, so
//! it is given a signed manifest URL where a local replica gets a directory. The cache is
//! keyed by the manifest's content (model name and every file's digest), so a model fetched
//! once serves every later start on the same cache volume, and a changed model never reuses
//! stale files. A directory is complete once its `.complete` marker exists; files are
//! written through temporary names and renamed only after their digest matched, so a fetch
//! cut short leaves nothing that looks usable.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use hearth_api::replica::FileManifest;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{ArtifactError, Result};
use crate::store::validate_file_name;

const COMPLETE: &str = ".complete";

/// Whether a model reference is a manifest URL rather than a local path.
pub fn is_manifest_url(reference: &str) -> bool {
    reference.starts_with("http://") || reference.starts_with("https://")
}

/// A model reference as a local directory: a path is returned as it is; a manifest URL is
/// fetched into `cache` (once) and its directory returned.
pub async fn local_files(client: &reqwest::Client, reference: &str, cache: &Path) -> Result<PathBuf> {
    if !is_manifest_url(reference) {
        return Ok(PathBuf::from(reference));
    }
    let manifest: FileManifest = get(client, reference)
        .await?
        .json()
        .await
        .map_err(|e| ArtifactError::Unavailable(format!("reading the file manifest: {e}")))?;
    fetch(client, &manifest, cache).await
}

async fn get(client: &reqwest::Client, url: &str) -> Result<reqwest::Response> {
    // The URL's query is its signature: never logged or echoed.
    let shown = url.split('?').next().unwrap_or_default();
    let resp =
        client.get(url).send().await.map_err(|e| ArtifactError::Unavailable(format!("fetching {shown}: {e}")))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(300).collect();
        return Err(ArtifactError::Unavailable(format!("fetching {shown}: HTTP {status}: {body}")));
    }
    Ok(resp)
}

/// Where a manifest's files go: one directory per model content.
fn cache_dir(manifest: &FileManifest, cache: &Path) -> PathBuf {
    let mut h = Sha256::new();
    h.update(manifest.model.as_bytes());
    for f in &manifest.files {
        h.update(format!("\n{} {} {}", f.name, f.size, f.sha256).as_bytes());
    }
    let key = hex::encode(&h.finalize()[..12]);
    let readable: String =
        manifest.model.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    cache.join(format!("{readable}-{key}"))
}

/// Fetches every file of `manifest` into the cache, checking each one's size and digest.
pub async fn fetch(client: &reqwest::Client, manifest: &FileManifest, cache: &Path) -> Result<PathBuf> {
    let dir = cache_dir(manifest, cache);
    if dir.join(COMPLETE).exists() {
        return Ok(dir);
    }
    if manifest.files.is_empty() {
        return Err(ArtifactError::FailedPrecondition(format!("{} has no files to fetch", manifest.model)));
    }
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ArtifactError::Internal(format!("creating {}: {e}", dir.display())))?;
    let started = std::time::Instant::now();
    let mut bytes = 0u64;
    for file in &manifest.files {
        validate_file_name(&file.name)?;
        let target = dir.join(&file.name);
        if let Ok(meta) = tokio::fs::metadata(&target).await {
            // Renamed into place only after its digest matched: already checked.
            if meta.len() == file.size {
                continue;
            }
        }
        let tmp = dir.join(format!(".{}.{:016x}.partial", file.name, rand::random::<u64>()));
        let written = download(client, file, &tmp).await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, &target).await.map_err(ArtifactError::internal)?;
        bytes += file.size;
    }
    tokio::fs::write(dir.join(COMPLETE), b"").await.map_err(ArtifactError::internal)?;
    tracing::info!(
        model = %manifest.model,
        files = manifest.files.len(),
        mb = bytes >> 20,
        ms = started.elapsed().as_millis() as u64,
        dir = %dir.display(),
        "model files fetched and verified"
    );
    Ok(dir)
}

async fn download(client: &reqwest::Client, file: &hearth_api::replica::ManifestFile, tmp: &Path) -> Result<()> {
    let resp = get(client, &file.url).await?;
    let mut out = tokio::io::BufWriter::with_capacity(
        1 << 20,
        tokio::fs::File::create(tmp).await.map_err(ArtifactError::internal)?,
    );
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| ArtifactError::Unavailable(format!("fetching {}: the download broke: {e}", file.name)))?;
        got += chunk.len() as u64;
        if got > file.size {
            break;
        }
        h.update(&chunk);
        out.write_all(&chunk).await.map_err(ArtifactError::internal)?;
    }
    if got != file.size {
        return Err(ArtifactError::Unavailable(format!(
            "fetching {}: {got} bytes arrived where the manifest says {}",
            file.name, file.size
        )));
    }
    let actual = hex::encode(h.finalize());
    if !actual.eq_ignore_ascii_case(&file.sha256) {
        return Err(ArtifactError::FailedPrecondition(format!(
            "{} arrived with SHA-256 {actual} where the manifest says {}: refused",
            file.name, file.sha256
        )));
    }
    out.flush().await.map_err(ArtifactError::internal)?;
    out.into_inner().sync_all().await.map_err(ArtifactError::internal)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::replica::ManifestFile;

    fn manifest(sha: &str) -> FileManifest {
        FileManifest {
            model: "accounts/a/models/m".into(),
            files: vec![ManifestFile { name: "model.gguf".into(), size: 3, sha256: sha.into(), url: String::new() }],
        }
    }

    #[test]
    fn the_cache_is_keyed_by_content() {
        let root = Path::new("/cache");
        let a = cache_dir(&manifest(&"a".repeat(64)), root);
        assert_eq!(a, cache_dir(&manifest(&"a".repeat(64)), root));
        assert_ne!(a, cache_dir(&manifest(&"b".repeat(64)), root));
        assert!(a.file_name().unwrap().to_string_lossy().starts_with("accounts_a_models_m-"));
    }

    /// An HTTP server that answers every request with `body`, for as long as the test runs.
    async fn serve(body: &'static [u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body).await;
            }
        });
        format!("http://{addr}/f")
    }

    #[tokio::test]
    async fn files_are_kept_only_when_their_digest_matches() {
        let url = serve(b"abc").await;
        let dir = tempfile::tempdir().unwrap();
        let client = reqwest::Client::new();
        let good = hex::encode(Sha256::digest(b"abc"));
        let mut m = manifest(&good);
        m.files[0].url = url.clone();
        let got = fetch(&client, &m, dir.path()).await.unwrap();
        assert_eq!(std::fs::read(got.join("model.gguf")).unwrap(), b"abc");
        assert!(got.join(COMPLETE).exists());

        // Another digest: refused, and nothing of it is left looking usable.
        let mut bad = manifest(&"0".repeat(64));
        bad.files[0].url = url;
        let e = fetch(&client, &bad, dir.path()).await.unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
        let bad_dir = cache_dir(&bad, dir.path());
        assert!(!bad_dir.join("model.gguf").exists() && !bad_dir.join(COMPLETE).exists());
        assert_eq!(std::fs::read_dir(&bad_dir).unwrap().count(), 0, "no partial file is left");
    }

    #[test]
    fn paths_are_not_urls() {
        assert!(is_manifest_url("http://10.0.0.3:8080/replica-files/a/m?expires=1&sig=00"));
        assert!(!is_manifest_url("/var/lib/hearth/artifacts/a/models/m"));
    }
}
