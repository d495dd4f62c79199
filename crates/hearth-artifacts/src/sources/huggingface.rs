//! The `huggingface` source: a Hub repository at a revision, over the Hub's HTTP protocol.
//!
//! Two kinds of request, as `huggingface_hub` makes them: `GET
//! {endpoint}/api/models/{repo}/revision/{revision}?blobs=true` lists the repository's files
//! (with sizes, and SHA-256 for LFS files) and resolves the revision to a commit; `GET
//! {endpoint}/{repo}/resolve/{commit}/{file}` downloads one file. Files are fetched at the
//! resolved commit, so a branch that moves during the import cannot mix two versions. The
//! endpoint comes from `HF_ENDPOINT`, as with the Hugging Face tools, so a mirror works.

use std::collections::BTreeMap;
use std::path::Path;

use hearth_api::resources::HuggingFaceSource;
use serde::Deserialize;

use super::fetch::{save, status_error, transport_error, Expect};
use crate::error::{ArtifactError, Result};
use crate::store::validate_file_name;

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: Option<String>,
    size: Option<u64>,
}

/// A repository id: `name` or `owner/name`, of the characters the Hub allows.
pub(super) fn check_repo(repo: &str) -> Result<()> {
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with('.')
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(ArtifactError::InvalidArgument(format!(
            "huggingfaceSource.repo must be a Hub repository id such as \"HuggingFaceTB/SmolLM2-135M-Instruct\", \
             got {repo:?}"
        )))
    }
}

/// Percent-encodes one path segment (a revision may be `refs/pr/1`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Files a model directory needs, and nothing of a repository's other contents (READMEs,
/// pickled weights, ONNX exports, images).
fn wanted(name: &str) -> bool {
    let servable = [".json", ".safetensors", ".gguf", ".model", ".txt", ".jinja"];
    !name.contains('/') && servable.iter().any(|ext| name.ends_with(ext)) && validate_file_name(name).is_ok()
}

/// Chooses the files to fetch: the ones named, or every servable one. A repository of GGUF
/// files in several quantizations must name the one wanted.
fn choose(siblings: &[Sibling], named: Option<&[String]>, repo: &str) -> Result<Vec<usize>> {
    if let Some(named) = named {
        let mut picked = Vec::new();
        for want in named {
            validate_file_name(want)?;
            let i = siblings.iter().position(|s| &s.rfilename == want).ok_or_else(|| {
                ArtifactError::NotFound(format!("repository {repo} has no file {want} at this revision"))
            })?;
            picked.push(i);
        }
        return Ok(picked);
    }
    let mut picked: Vec<usize> = (0..siblings.len()).filter(|&i| wanted(&siblings[i].rfilename)).collect();
    let has_safetensors = picked.iter().any(|&i| siblings[i].rfilename.ends_with(".safetensors"));
    let ggufs: Vec<&str> =
        picked.iter().map(|&i| siblings[i].rfilename.as_str()).filter(|n| n.ends_with(".gguf")).collect();
    if has_safetensors {
        // A directory with safetensors is served from those; GGUF exports beside them are not needed.
        picked.retain(|&i| !siblings[i].rfilename.ends_with(".gguf"));
    } else if ggufs.len() > 1 {
        return Err(ArtifactError::FailedPrecondition(format!(
            "repository {repo} holds {} GGUF files ({}); name the one to import in huggingfaceSource.files",
            ggufs.len(),
            ggufs.join(", ")
        )));
    } else if ggufs.len() == 1 {
        picked.retain(|&i| siblings[i].rfilename.ends_with(".gguf"));
    }
    if picked.is_empty() {
        return Err(ArtifactError::FailedPrecondition(format!(
            "repository {repo} has no files hearth can serve (safetensors weights with their JSON configs, or a GGUF file)"
        )));
    }
    Ok(picked)
}

pub(super) async fn fetch(
    http: &reqwest::Client,
    endpoint: &str,
    src: &HuggingFaceSource,
    dir: &Path,
) -> Result<(BTreeMap<String, u64>, String)> {
    let endpoint = endpoint.trim_end_matches('/');
    let revision = src.revision.as_deref().filter(|r| !r.is_empty()).unwrap_or("main");
    let repo = &src.repo;
    let what = format!("Hugging Face repository {repo} at revision {revision}");
    let auth = |req: reqwest::RequestBuilder| match src.token.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let info_url = format!("{endpoint}/api/models/{repo}/revision/{}?blobs=true", segment(revision));
    let resp = auth(http.get(&info_url)).send().await.map_err(|e| transport_error(&what, e))?;
    if !resp.status().is_success() {
        // The Hub answers 401 rather than 404 for a repository that does not exist, so that
        // private names do not leak: say both.
        return Err(match resp.status().as_u16() {
            401 | 404 => ArtifactError::NotFound(format!(
                "{what} was not found (HTTP {}); check the repository id and revision, or pass a token if it is \
                 private or gated",
                resp.status()
            )),
            _ => status_error(&what, &resp),
        });
    }
    let info: RepoInfo = resp
        .json()
        .await
        .map_err(|e| ArtifactError::Unavailable(format!("{what}: the Hub's answer could not be read: {e}")))?;
    let commit = info.sha.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| revision.to_string());
    let picked = choose(&info.siblings, src.files.as_deref(), repo)?;
    let mut files = BTreeMap::new();
    for i in picked {
        let s = &info.siblings[i];
        let name = &s.rfilename;
        let url = format!("{endpoint}/{repo}/resolve/{}/{}", segment(&commit), segment(name));
        let resp = auth(http.get(&url)).send().await.map_err(|e| transport_error(&what, e))?;
        if !resp.status().is_success() {
            return Err(status_error(&format!("{name} of {what}"), &resp));
        }
        let expect = Expect {
            size: s.lfs.as_ref().and_then(|l| l.size).or(s.size).or(resp.content_length()),
            sha256: s.lfs.as_ref().and_then(|l| l.sha256.clone()),
            md5: None,
        };
        let n = save(dir, name, &expect, resp.bytes_stream()).await?;
        tracing::debug!(repo = %repo, file = %name, bytes = n, "fetched from the Hub");
        files.insert(name.clone(), n);
    }
    Ok((files, commit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sib(name: &str) -> Sibling {
        Sibling { rfilename: name.to_string(), size: None, lfs: None }
    }

    fn names(s: &[Sibling], picked: &[usize]) -> Vec<String> {
        picked.iter().map(|&i| s[i].rfilename.clone()).collect()
    }

    #[test]
    fn chooses_servable_files() {
        let s = [
            sib(".gitattributes"),
            sib("README.md"),
            sib("config.json"),
            sib("model.safetensors"),
            sib("pytorch_model.bin"),
            sib("onnx/model.onnx"),
            sib("tokenizer.json"),
            sib("model-q4.gguf"),
        ];
        let picked = choose(&s, None, "r").expect("choose");
        assert_eq!(names(&s, &picked), ["config.json", "model.safetensors", "tokenizer.json"]);

        let ggufs = [sib("README.md"), sib("m-q4_1.gguf"), sib("m-q8_0.gguf")];
        let err = choose(&ggufs, None, "r").expect_err("ambiguous");
        assert!(err.to_string().contains("m-q4_1.gguf, m-q8_0.gguf"), "{err}");
        let one = choose(&ggufs, Some(&["m-q8_0.gguf".to_string()]), "r").expect("named");
        assert_eq!(names(&ggufs, &one), ["m-q8_0.gguf"]);
        let missing = choose(&ggufs, Some(&["nope.gguf".to_string()]), "r").expect_err("missing");
        assert!(matches!(missing, ArtifactError::NotFound(_)), "{missing}");
        assert!(choose(&[sib("README.md")], None, "r").is_err());
    }

    #[test]
    fn repository_ids_and_segments() {
        for ok in ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b.c_d"] {
            assert!(check_repo(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/x", "a/b/c", "a/../b", "a b", "a/.git"] {
            assert!(check_repo(bad).is_err(), "{bad}");
        }
        assert_eq!(segment("refs/pr/1"), "refs%2Fpr%2F1");
    }
}
