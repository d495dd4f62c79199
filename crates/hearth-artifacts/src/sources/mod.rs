//! Fetchers for a model's files from where they already live: the Hugging Face Hub protocol
//! (`huggingface.rs`), an http(s) URL of a file or archive (`fetch.rs`, `archive.rs`), an S3
//! bucket (`s3.rs`) and Civitai (`civitai.rs`). Each streams into a directory, checking sizes
//! and checksums the source announces; what to do with the result (validation, the model's
//! state) is the control plane's.

mod archive;
mod civitai;
mod fetch;
mod huggingface;
mod s3;

use std::collections::BTreeMap;
use std::path::Path;

use hearth_api::resources::ModelSource;

use crate::error::{ArtifactError, Result};

/// Which of the sources a request names, checked before anything is created so a malformed
/// source is an INVALID_ARGUMENT on the create call rather than a FAILED model later.
pub fn check(source: &ModelSource) -> Result<()> {
    let set = [
        source.aws_s3_source.is_some(),
        source.azure_blob_source.is_some(),
        source.huggingface_source.is_some(),
        source.url_source.is_some(),
        source.civitai_source.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        return Err(ArtifactError::InvalidArgument(format!(
            "a model source names exactly one of awsS3Source, huggingfaceSource, urlSource and civitaiSource; \
             this one names {set}"
        )));
    }
    if source.azure_blob_source.is_some() {
        return Err(ArtifactError::unimplemented_field("model source", "azureBlobSource"));
    }
    if let Some(s3) = &source.aws_s3_source {
        if s3.s3_bucket.is_empty() {
            return Err(ArtifactError::InvalidArgument("awsS3Source.s3Bucket is required".to_string()));
        }
        if s3.role_arn.as_deref().is_some_and(|r| !r.is_empty()) {
            return Err(ArtifactError::unimplemented_field("awsS3Source", "roleArn"));
        }
        if s3.access_key_id.is_some() != s3.access_secret.is_some() {
            return Err(ArtifactError::InvalidArgument(
                "awsS3Source: give accessKeyId and accessSecret together, or neither".to_string(),
            ));
        }
    }
    if let Some(hf) = &source.huggingface_source {
        huggingface::check_repo(&hf.repo)?;
    }
    if let Some(u) = &source.url_source {
        fetch::check_url("urlSource.url", &u.url)?;
        for name in u.headers.keys() {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ArtifactError::InvalidArgument(format!(
                    "urlSource.headers: {name:?} is not a header name"
                )));
            }
        }
    }
    if let Some(c) = &source.civitai_source {
        fetch::check_url("civitaiSource.civitUrl", &c.civit_url)?;
    }
    Ok(())
}

/// Where a model came from, for `importedFrom`: the location without any credential.
pub fn describe(source: &ModelSource) -> String {
    if let Some(hf) = &source.huggingface_source {
        format!("hf://{}@{}", hf.repo, hf.revision.as_deref().unwrap_or("main"))
    } else if let Some(u) = &source.url_source {
        fetch::redact(&u.url)
    } else if let Some(s3) = &source.aws_s3_source {
        format!("s3://{}/{}", s3.s3_bucket, s3.s3_path.as_deref().unwrap_or(""))
    } else if let Some(c) = &source.civitai_source {
        fetch::redact(&c.civit_url)
    } else {
        String::new()
    }
}

/// Fetches a source's files into `dir`; returns them by name with their sizes, and what the
/// source calls their version (a Hub commit), if anything. `hf_endpoint` is the Hub (or a
/// mirror) that Hugging Face sources are read from.
pub async fn fetch(
    http: &reqwest::Client,
    hf_endpoint: &str,
    source: &ModelSource,
    dir: &Path,
) -> Result<(BTreeMap<String, u64>, Option<String>)> {
    if let Some(hf) = &source.huggingface_source {
        huggingface::fetch(http, hf_endpoint, hf, dir).await.map(|(f, c)| (f, Some(c)))
    } else if let Some(u) = &source.url_source {
        fetch::fetch_url(http, &u.url, &u.headers, dir).await.map(|f| (f, None))
    } else if let Some(s3) = &source.aws_s3_source {
        s3::fetch(s3, dir).await.map(|f| (f, None))
    } else if let Some(c) = &source.civitai_source {
        civitai::fetch(http, c, dir).await.map(|f| (f, None))
    } else {
        Err(ArtifactError::InvalidArgument("the model source names nothing to import".to_string()))
    }
}
