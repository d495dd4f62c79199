//! The `civitai` source: a Civitai model page (`…/models/{id}`, optionally with
//! `?modelVersionId=`) or download link (`…/api/download/models/{version}`).
//!
//! A page is resolved through Civitai's public API on the same host (`/api/v1/models/{id}` or
//! `/api/v1/model-versions/{version}`), which also says what base model the file is for:
//! Civitai hosts mostly image-model LoRAs, and those are refused from that metadata before
//! anything is downloaded. A download link is fetched directly; its file then goes through
//! the same checks (archive unpacking, and the adapter inspection that names kohya and
//! diffusers tensor layouts).

use std::collections::BTreeMap;
use std::path::Path;

use hearth_api::resources::CivitaiSource;
use serde_json::Value;

use super::fetch::{check_url, download_and_unpack, redact, status_error, transport_error};
use crate::error::{ArtifactError, Result};

/// Base-model families of image and video generators, as Civitai's `baseModel` names them.
const IMAGE_FAMILIES: [&str; 16] = [
    "SD ",
    "SDXL",
    "SD3",
    "Pony",
    "Flux",
    "Illustrious",
    "NoobAI",
    "Stable Cascade",
    "Playground",
    "PixArt",
    "Hunyuan",
    "Kolors",
    "AuraFlow",
    "Wan Video",
    "LTXV",
    "CogVideoX",
];

fn image_family(base_model: &str) -> bool {
    IMAGE_FAMILIES.iter().any(|f| base_model.starts_with(f))
}

/// What the URL points at.
#[derive(Debug, PartialEq)]
enum Target {
    Download(String),
    Model(u64),
    Version(u64),
}

fn target(url: &reqwest::Url) -> Result<Target> {
    let segs: Vec<&str> = url.path_segments().map(|s| s.filter(|p| !p.is_empty()).collect()).unwrap_or_default();
    let version_param = url.query_pairs().find(|(k, _)| k == "modelVersionId").and_then(|(_, v)| v.parse::<u64>().ok());
    match segs.as_slice() {
        ["api", "download", "models", _v, ..] => Ok(Target::Download(url.to_string())),
        ["models", id, ..] => match version_param {
            Some(v) => Ok(Target::Version(v)),
            None => id.parse().map(Target::Model).map_err(|_| bad_url(url)),
        },
        _ => Err(bad_url(url)),
    }
}

fn bad_url(url: &reqwest::Url) -> ArtifactError {
    ArtifactError::InvalidArgument(format!(
        "civitaiSource.civitUrl {} is neither a model page (…/models/ID) nor a download link \
         (…/api/download/models/VERSION)",
        redact(url.as_str())
    ))
}

pub(super) async fn fetch(http: &reqwest::Client, src: &CivitaiSource, dir: &Path) -> Result<BTreeMap<String, u64>> {
    let url = check_url("civitaiSource.civitUrl", &src.civit_url)?;
    let shown = redact(url.as_str());
    let origin = url.origin().ascii_serialization();
    let auth = |req: reqwest::RequestBuilder| match src.token.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let download = match target(&url)? {
        Target::Download(u) => u,
        t => {
            let api = match t {
                Target::Model(id) => format!("{origin}/api/v1/models/{id}"),
                Target::Version(v) => format!("{origin}/api/v1/model-versions/{v}"),
                Target::Download(_) => unreachable!("handled above"),
            };
            let resp = auth(http.get(&api)).send().await.map_err(|e| transport_error(&shown, e))?;
            if !resp.status().is_success() {
                return Err(status_error(&format!("Civitai model {shown}"), &resp));
            }
            let meta: Value = resp
                .json()
                .await
                .map_err(|e| ArtifactError::Unavailable(format!("{shown}: Civitai's answer could not be read: {e}")))?;
            // A model lists its versions, newest first; a version stands alone.
            let version = meta.get("modelVersions").and_then(|v| v.get(0)).unwrap_or(&meta);
            if let Some(base) = version.get("baseModel").and_then(Value::as_str) {
                if image_family(base) {
                    return Err(ArtifactError::FailedPrecondition(format!(
                        "{shown} is a LoRA for the image model {base}, not for a language model; hearth serves \
                         language models only"
                    )));
                }
            }
            match version.get("downloadUrl").and_then(Value::as_str) {
                Some(u) => check_url("the version's downloadUrl", u)?.to_string(),
                None => {
                    let id = version.get("id").and_then(Value::as_u64).ok_or_else(|| {
                        ArtifactError::FailedPrecondition(format!("{shown}: Civitai lists no version to download"))
                    })?;
                    format!("{origin}/api/download/models/{id}")
                }
            }
        }
    };
    let resp = auth(http.get(&download)).send().await.map_err(|e| transport_error(&shown, e))?;
    download_and_unpack(resp, &shown, dir).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_resolve_to_targets() {
        let t = |u: &str| target(&reqwest::Url::parse(u).expect("url"));
        assert_eq!(t("https://civitai.com/models/123").expect("model"), Target::Model(123));
        assert_eq!(t("https://civitai.com/models/123/pirate-talk?modelVersionId=9").expect("v"), Target::Version(9));
        assert!(matches!(t("https://civitai.com/api/download/models/9?token=x"), Ok(Target::Download(_))));
        assert!(t("https://civitai.com/images/5").is_err());
        assert!(t("https://civitai.com/models/abc").is_err());
    }

    #[test]
    fn image_families() {
        for base in ["SD 1.5", "SDXL 1.0", "Pony", "Flux.1 D", "Illustrious"] {
            assert!(image_family(base), "{base}");
        }
        for base in ["Other", "Llama 3", "Qwen2"] {
            assert!(!image_family(base), "{base}");
        }
    }
}
