//! Streaming a download into the artifact directory, verified; and the `url` source, which
//! is one such download that may turn out to be an archive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::archive;
use crate::error::{ArtifactError, Result};
use crate::store::validate_file_name;
use crate::store::MAX_FILE_SIZE;

/// What a source says a file should be; each known fact is checked once the bytes are in.
#[derive(Debug, Default, Clone)]
pub(super) struct Expect {
    pub size: Option<u64>,
    /// Hex SHA-256 (Hugging Face LFS files).
    pub sha256: Option<String>,
    /// Hex MD5 (an S3 object's ETag when it was uploaded in one part).
    pub md5: Option<String>,
}

/// Checks a source URL: http or https, with a host.
pub(super) fn check_url(field: &str, url: &str) -> Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ArtifactError::InvalidArgument(format!("{field}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ArtifactError::InvalidArgument(format!("{field} must be an http or https URL, got {url:?}")));
    }
    Ok(parsed)
}

/// A URL as it may be shown: without user info or query (where tokens tend to travel).
pub(super) fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => String::new(),
    }
}

/// Turns a response that is not a success into the error a user can act on.
pub(super) fn status_error(what: &str, resp: &reqwest::Response) -> ArtifactError {
    let status = resp.status();
    match status.as_u16() {
        404 | 410 => ArtifactError::NotFound(format!("{what} was not found (HTTP {status})")),
        401 | 403 => ArtifactError::PermissionDenied(format!(
            "{what} refused access (HTTP {status}); it may be private or gated: pass a token"
        )),
        _ => ArtifactError::Unavailable(format!("{what} answered HTTP {status}")),
    }
}

pub(super) fn transport_error(what: &str, e: reqwest::Error) -> ArtifactError {
    ArtifactError::Unavailable(format!("could not reach {what}: {e}"))
}

/// Streams `body` into `dir/name` through a temporary beside it, renamed into place only when
/// every expectation holds. Memory use is one chunk whatever the size.
pub(super) async fn save<S, E>(dir: &Path, name: &str, expect: &Expect, mut body: S) -> Result<u64>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    validate_file_name(name)?;
    let tmp = dir.join(format!(".{name}.download"));
    let result = async {
        let mut out = tokio::fs::File::create(&tmp).await.map_err(ArtifactError::internal)?;
        let mut sha = Sha256::new();
        let mut md5 = expect.md5.as_ref().map(|_| md5::Md5::new());
        let mut written: u64 = 0;
        let limit = expect.size.unwrap_or(MAX_FILE_SIZE);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ArtifactError::Unavailable(format!(
                    "the download of {name} was interrupted after {written}{} bytes: {e}",
                    expect.size.map(|s| format!(" of {s}")).unwrap_or_default()
                ))
            })?;
            written += chunk.len() as u64;
            if written > limit {
                return Err(ArtifactError::FailedPrecondition(format!(
                    "{name} is larger than the {limit} bytes its source announced"
                )));
            }
            sha.update(&chunk);
            if let Some(m) = md5.as_mut() {
                md5::Digest::update(m, &chunk);
            }
            out.write_all(&chunk).await.map_err(ArtifactError::internal)?;
        }
        if let Some(size) = expect.size.filter(|s| *s != written) {
            return Err(ArtifactError::Unavailable(format!(
                "the download of {name} ended after {written} of {size} bytes"
            )));
        }
        let got = hex::encode(sha.finalize());
        if let Some(want) = expect.sha256.as_deref().filter(|w| !w.eq_ignore_ascii_case(&got)) {
            return Err(ArtifactError::FailedPrecondition(format!(
                "{name} has SHA-256 {got} but its source announced {want}"
            )));
        }
        if let (Some(m), Some(want)) = (md5, expect.md5.as_deref()) {
            let got = hex::encode(md5::Digest::finalize(m));
            if !want.eq_ignore_ascii_case(&got) {
                return Err(ArtifactError::FailedPrecondition(format!(
                    "{name} has MD5 {got} but its source announced {want}"
                )));
            }
        }
        out.sync_all().await.map_err(ArtifactError::internal)?;
        tokio::fs::rename(&tmp, dir.join(name)).await.map_err(ArtifactError::internal)?;
        Ok(written)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// The file name a response carries: `Content-Disposition`'s filename, else the URL's last
/// path segment.
pub(super) fn response_file_name(resp: &reqwest::Response) -> Option<String> {
    let from_header = resp
        .headers()
        .get(reqwest::header::CONTENT_DISPOSITION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').map(str::trim).find_map(|p| p.strip_prefix("filename=")))
        .map(|f| f.trim_matches('"').to_string());
    from_header
        .or_else(|| resp.url().path_segments().and_then(|mut s| s.next_back()).map(str::to_string))
        .filter(|n| !n.is_empty())
}

/// Downloads one URL. An archive (.tar, .tar.gz) is unpacked into `dir`; anything else is kept
/// as the one file of the model, under the name the response gives it.
pub(super) async fn fetch_url(
    http: &reqwest::Client,
    url: &str,
    headers: &BTreeMap<String, String>,
    dir: &Path,
) -> Result<BTreeMap<String, u64>> {
    let shown = redact(url);
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.send().await.map_err(|e| transport_error(&shown, e))?;
    download_and_unpack(resp, &shown, dir).await
}

/// Saves a successful response under a scratch name, then unpacks it if it is an archive or
/// renames it to its own name if not.
pub(super) async fn download_and_unpack(
    resp: reqwest::Response,
    shown: &str,
    dir: &Path,
) -> Result<BTreeMap<String, u64>> {
    if !resp.status().is_success() {
        return Err(status_error(shown, &resp));
    }
    let name = response_file_name(&resp);
    let expect = Expect { size: resp.content_length(), ..Expect::default() };
    const SCRATCH: &str = "download.partial";
    save(dir, SCRATCH, &expect, resp.bytes_stream()).await?;
    let scratch: PathBuf = dir.join(SCRATCH);
    let kind = archive::sniff(&scratch).map_err(ArtifactError::internal)?;
    if let Some(kind) = kind {
        let dir = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || archive::unpack(&scratch, kind, &dir))
            .await
            .map_err(ArtifactError::internal)??;
        return Ok(files);
    }
    let name = name.ok_or_else(|| {
        ArtifactError::FailedPrecondition(format!("{shown} names no file: give a URL that ends in the file's name"))
    })?;
    validate_file_name(&name).map_err(|_| {
        ArtifactError::FailedPrecondition(format!(
            "{shown} is a file named {name:?}, which cannot be a model file name"
        ))
    })?;
    tokio::fs::rename(dir.join(SCRATCH), dir.join(&name)).await.map_err(ArtifactError::internal)?;
    let size = tokio::fs::metadata(dir.join(&name)).await.map_err(ArtifactError::internal)?.len();
    Ok(BTreeMap::from([(name, size)]))
}
