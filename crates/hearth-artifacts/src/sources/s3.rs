//! The `awsS3Source`: every object directly under a prefix of a bucket, through the
//! `object_store` crate.
//!
//! The endpoint and region come from the server's environment as with the AWS tools
//! (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, `AWS_REGION`), so an S3-compatible store
//! works; credentials from the request, else from that environment. An object uploaded in one
//! part has its MD5 as ETag, which is checked; every object's size is.

use std::collections::BTreeMap;
use std::path::Path;

use futures_util::{StreamExt, TryStreamExt};
use hearth_api::resources::AwsS3Source;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

use super::fetch::{save, Expect};
use crate::error::{ArtifactError, Result};
use crate::store::validate_file_name;

fn env(keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

fn store_error(place: &str, e: object_store::Error) -> ArtifactError {
    match e {
        object_store::Error::NotFound { .. } => ArtifactError::NotFound(format!("{place} was not found")),
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            ArtifactError::PermissionDenied(format!("{place} refused access: check the credentials ({e})"))
        }
        other => ArtifactError::Unavailable(format!("{place}: {other}")),
    }
}

/// The MD5 an ETag carries, when it carries one (not for multipart uploads, `"…-N"`).
fn etag_md5(etag: Option<&str>) -> Option<String> {
    let t = etag?.trim_matches('"');
    (t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| t.to_ascii_lowercase())
}

pub(super) async fn fetch(src: &AwsS3Source, dir: &Path) -> Result<BTreeMap<String, u64>> {
    let prefix_text = src.s3_path.as_deref().unwrap_or("").trim_matches('/');
    let place = format!("s3://{}/{}", src.s3_bucket, prefix_text);
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&src.s3_bucket)
        .with_region(env(&["AWS_REGION", "AWS_DEFAULT_REGION"]).unwrap_or_else(|| "us-east-1".to_string()));
    if let Some(endpoint) = env(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]) {
        builder = builder.with_allow_http(endpoint.starts_with("http://")).with_endpoint(endpoint);
    }
    if let (Some(key), Some(secret)) = (&src.access_key_id, &src.access_secret) {
        builder = builder.with_access_key_id(key).with_secret_access_key(secret);
    }
    let store = builder.build().map_err(|e| ArtifactError::InvalidArgument(format!("awsS3Source: {e}")))?;
    let prefix = ObjectPath::from(prefix_text);
    let objects: Vec<object_store::ObjectMeta> =
        store.list(Some(&prefix)).try_collect().await.map_err(|e| store_error(&place, e))?;
    let mut files = BTreeMap::new();
    for meta in objects {
        // Only objects directly under the prefix: the artifact directory is flat.
        let Some(parts) = meta.location.prefix_match(&prefix) else { continue };
        let parts: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
        let [name] = parts.as_slice() else { continue };
        if validate_file_name(name).is_err() {
            tracing::debug!(object = %meta.location, "object skipped: its name cannot be a model file name");
            continue;
        }
        let expect = Expect { size: Some(meta.size), sha256: None, md5: etag_md5(meta.e_tag.as_deref()) };
        let got = store.get(&meta.location).await.map_err(|e| store_error(&format!("{place}/{name}"), e))?;
        let stream = got.into_stream().map(|r| r.map_err(|e| e.to_string()));
        let n = save(dir, name, &expect, stream).await?;
        files.insert(name.clone(), n);
    }
    if files.is_empty() {
        return Err(ArtifactError::NotFound(format!(
            "{place} holds no model files (objects directly under the prefix)"
        )));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_carry_md5_only_for_single_part_uploads() {
        assert_eq!(
            etag_md5(Some("\"9E107D9D372BB6826BD81D3542A419D6\"")).as_deref(),
            Some("9e107d9d372bb6826bd81d3542a419d6")
        );
        assert_eq!(etag_md5(Some("\"9e107d9d372bb6826bd81d3542a419d6-3\"")), None);
        assert_eq!(etag_md5(None), None);
    }
}
