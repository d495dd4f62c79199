//! Hot load of model versions: a deployment with `enableHotLoad` names a bucket
//! (`hotLoadBucketUrl`: `file:///a/dir` for local use, `s3://bucket/prefix` through the
//! object store) whose folders are versions of its weights, each a Hugging Face directory or
//! one GGUF file, and a `targetModelVersion` to serve. The runtime fetches the target (here),
//! checks it as an upload is checked, and has every ready replica swap it in without a restart
//! (`Engine::replace_model`); `activeModelVersion` is the version every ready replica serves.
//! A version that cannot be fetched or served is reported in `status` with the old one serving.

use std::path::{Path, PathBuf};

use hearth_api::resources::{AwsS3Source, Deployment, HotLoadBucketType, ModelSource};

use crate::error::{ControlError, Result};
use crate::records::deployment::HotLoadSpec;
use crate::ControlPlane;

/// Where a bucket URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bucket {
    /// A local directory (absolute).
    Dir(PathBuf),
    /// An S3 (or S3-compatible) bucket and a prefix, without slashes at either end.
    S3 { bucket: String, prefix: String },
}

impl Bucket {
    pub fn parse(url: &str) -> Result<Bucket> {
        let bad = |why: &str| {
            ControlError::InvalidArgument(format!(
                "hotLoadBucketUrl {url:?} {why}: use file:///an/absolute/dir or s3://bucket/prefix (no trailing slash)"
            ))
        };
        if url.ends_with('/') && url.len() > "file:///".len() {
            return Err(bad("ends with a slash"));
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("is not an absolute path"));
            }
            if path.split('/').any(|seg| seg == "..") {
                return Err(bad("climbs out with .."));
            }
            return Ok(Bucket::Dir(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("names no bucket"));
            }
            return Ok(Bucket::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(ControlError::Unimplemented(format!(
                "hotLoadBucketUrl scheme {scheme}:// is not supported: hearth reads versions from S3 (and \
                 S3-compatible stores: s3://) or a local directory (file://)"
            )));
        }
        Err(bad("has no scheme"))
    }
}

/// A version names one folder under the bucket.
fn check_version(field: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v != "."
        && v != ".."
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ControlError::InvalidArgument(format!(
            "{field} {v:?} must name one folder under hotLoadBucketUrl: 1 to 128 letters, digits, '.', '_' or '-'"
        )))
    }
}

/// Checks a deployment's hot-load fields as given (create, or the result of an update).
/// `activeModelVersion` is output only and never checked.
pub(crate) fn check(d: &Deployment) -> Result<()> {
    let set = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    if d.enable_hot_load != Some(true) {
        for (field, on) in [
            ("hotLoadBucketUrl", set(&d.hot_load_bucket_url)),
            ("targetModelVersion", set(&d.target_model_version)),
            ("hotLoadBucketType", d.hot_load_bucket_type.is_some_and(|t| t != HotLoadBucketType::Unspecified)),
        ] {
            if on {
                return Err(ControlError::InvalidArgument(format!(
                    "{field} is set but enableHotLoad is not: set enableHotLoad to true to serve versions from a bucket"
                )));
            }
        }
        return Ok(());
    }
    let url = d.hot_load_bucket_url.as_deref().filter(|u| !u.is_empty()).ok_or_else(|| {
        ControlError::InvalidArgument(
            "enableHotLoad needs hotLoadBucketUrl: the bucket whose folders are the model's versions".to_string(),
        )
    })?;
    let bucket = Bucket::parse(url)?;
    match (d.hot_load_bucket_type.unwrap_or(HotLoadBucketType::Unspecified), &bucket) {
        (HotLoadBucketType::FwHosted, _) => {
            return Err(ControlError::Unimplemented(
                "hotLoadBucketType FW_HOSTED is not supported: hearth hosts no buckets; use S3 (or MINIO, NEBIUS: \
                 S3-compatible) with an s3:// URL, or a local directory"
                    .to_string(),
            ))
        }
        (HotLoadBucketType::Unspecified, _) | (_, Bucket::S3 { .. }) => {}
        (t, Bucket::Dir(_)) => {
            return Err(ControlError::InvalidArgument(format!(
                "hotLoadBucketType {t} names an object store but hotLoadBucketUrl is a local directory; leave the \
                 type unset for file:// URLs"
            )))
        }
    }
    if let Some(v) = d.target_model_version.as_deref().filter(|v| !v.is_empty()) {
        check_version("targetModelVersion", v)?;
    }
    Ok(())
}

impl ControlPlane {
    /// Refuses a `file://` bucket outside the directories the server allows for hot load
    /// (`ControlConfig::hot_load_dirs`), compared after symlinks are resolved. `version`, when
    /// given, is checked too (a folder may be a link out of the bucket).
    pub(crate) fn check_local_bucket(&self, hot_url: &str, version: Option<&str>) -> Result<()> {
        let Bucket::Dir(root) = Bucket::parse(hot_url)? else { return Ok(()) };
        let path = version.map_or(root.clone(), |v| root.join(v));
        let real = std::fs::canonicalize(&path).map_err(|e| {
            ControlError::FailedPrecondition(format!("hotLoadBucketUrl: {} cannot be read: {e}", path.display()))
        })?;
        let allowed = self.config.hot_load_dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok());
        if allowed.into_iter().any(|d| real.starts_with(&d)) {
            return Ok(());
        }
        Err(ControlError::PermissionDenied(format!(
            "hotLoadBucketUrl: this server does not let deployments read {}; its operator allows local version \
             directories with `hearth serve --hot-load-dir DIR` (allowed now: {}), or use an s3:// bucket",
            real.display(),
            if self.config.hot_load_dirs.is_empty() {
                "none".to_string()
            } else {
                self.config.hot_load_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            }
        )))
    }

    /// The local files of `version` of a deployment's hot load, checked as an upload is: a
    /// local bucket's folder as it is; an S3 version fetched once into the artifact store's
    /// `hot-load` directory (sizes and checksums as imports check them) and reused after.
    pub async fn model_version_files(&self, deployment: &str, hot: &HotLoadSpec, version: &str) -> Result<PathBuf> {
        check_version("targetModelVersion", version)?;
        let dir = match Bucket::parse(&hot.bucket_url)? {
            Bucket::Dir(root) => {
                let dir = root.join(version);
                if !dir.is_dir() {
                    return Err(ControlError::FailedPrecondition(format!(
                        "version {version}: {} is not a directory",
                        dir.display()
                    )));
                }
                self.check_local_bucket(&hot.bucket_url, Some(version))?;
                dir
            }
            Bucket::S3 { bucket, prefix } => {
                let dir = self.versions_dir(deployment).join(version);
                if !dir.join(COMPLETE).exists() {
                    self.fetch_s3_version(&bucket, &prefix, version, &dir).await?;
                }
                dir
            }
        };
        let checked = dir.clone();
        tokio::task::spawn_blocking(move || hearth_formats::inspect_base(&checked))
            .await
            .map_err(ControlError::internal)?
            .map_err(|p| ControlError::FailedPrecondition(format!("version {version} is not a servable model: {p}")))?;
        Ok(dir)
    }

    /// A signed URL of the file manifest of `version` of a deployment's hot load, valid for
    /// `ttl`: how a replica that cannot read this gateway's disk (a pod) gets a version.
    pub fn replica_version_url(&self, deployment: &str, version: &str, ttl: std::time::Duration) -> Option<String> {
        let key = crate::observe::DeploymentKey::from_name(deployment)?;
        let grant = version_grant("VLIST", &key.account, &key.id, version, "", ttl_expiry(ttl));
        Some(self.signer.url_for(&format!("replica-versions/{}/{}/{version}", key.account, key.id), &grant))
    }

    /// The manifest behind [`ControlPlane::replica_version_url`]: every file of the version
    /// (fetched and checked first, as for a local replica) with its size, SHA-256 and a signed
    /// download URL lasting as long.
    pub async fn replica_version_manifest(
        &self,
        account: &str,
        id: &str,
        version: &str,
        expires: i64,
        sig: &str,
    ) -> Result<hearth_api::replica::FileManifest> {
        let grant = version_grant("VLIST", account, id, version, "", expires);
        self.signer.verify(&grant, sig, chrono::Utc::now().timestamp())?;
        let dir = self.version_dir_of(account, id, version).await?;
        let listed = tokio::task::spawn_blocking(move || version_files(&dir))
            .await
            .map_err(ControlError::internal)?
            .map_err(ControlError::internal)?;
        let files = listed
            .into_iter()
            .map(|(name, size, sha256)| {
                let grant = version_grant("VGET", account, id, version, &name, expires);
                let url = self.signer.url_for(&format!("replica-versions/{account}/{id}/{version}/{name}"), &grant);
                hearth_api::replica::ManifestFile { name, size, sha256, url }
            })
            .collect();
        Ok(hearth_api::replica::FileManifest { model: format!("accounts/{account}/deployments/{id}@{version}"), files })
    }

    /// Opens one file of a version for a signed download URL of its manifest.
    pub async fn replica_version_file(
        &self,
        account: &str,
        id: &str,
        version: &str,
        file: &str,
        expires: i64,
        sig: &str,
    ) -> Result<(tokio::fs::File, u64)> {
        let grant = version_grant("VGET", account, id, version, file, expires);
        self.signer.verify(&grant, sig, chrono::Utc::now().timestamp())?;
        hearth_artifacts::store::validate_file_name(file)?;
        let path = self.version_dir_of(account, id, version).await?.join(file);
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|_| ControlError::NotFound(format!("version {version} has no file {file}")))?;
        let len = f.metadata().await.map_err(ControlError::internal)?.len();
        Ok((f, len))
    }

    /// The local files of a version of a deployment's hot load, as its spec says where.
    async fn version_dir_of(&self, account: &str, id: &str, version: &str) -> Result<PathBuf> {
        let key = crate::observe::DeploymentKey::new(account, id);
        let (spec, _) = self
            .deployment_for_runtime(&key)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("deployment {} does not exist", key.name())))?;
        let hot = spec
            .hot_load
            .ok_or_else(|| ControlError::FailedPrecondition(format!("deployment {} has no hot load", key.name())))?;
        self.model_version_files(&key.name(), &hot, version).await
    }

    /// Removes the versions fetched for `deployment` but those in `keep` (all of them when
    /// the deployment is purged): a fetched version is a whole model's files.
    pub async fn forget_model_versions(&self, deployment: &str, keep: &[&str]) {
        let dir = self.versions_dir(deployment);
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else { return };
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_suffix(".partial").unwrap_or(&name);
            if !keep.contains(&version) {
                if let Err(err) = tokio::fs::remove_dir_all(e.path()).await {
                    tracing::warn!(deployment, version, error = %err, "could not remove a fetched model version");
                }
            }
        }
        if keep.is_empty() {
            let _ = tokio::fs::remove_dir(&dir).await;
        }
    }

    /// Where the S3 versions of `deployment` are fetched to.
    fn versions_dir(&self, deployment: &str) -> PathBuf {
        self.artifacts.root().join("hot-load").join(deployment.replace('/', "_"))
    }

    async fn fetch_s3_version(&self, bucket: &str, prefix: &str, version: &str, dir: &Path) -> Result<()> {
        let path = if prefix.is_empty() { version.to_string() } else { format!("{prefix}/{version}") };
        let source = ModelSource {
            aws_s3_source: Some(AwsS3Source {
                s3_bucket: bucket.to_string(),
                s3_path: Some(path.clone()),
                ..AwsS3Source::default()
            }),
            ..ModelSource::default()
        };
        // Into a fresh folder beside it, renamed into place once whole: a fetch cut short
        // leaves nothing that looks complete.
        let partial = dir.with_extension("partial");
        let _ = tokio::fs::remove_dir_all(&partial).await;
        tokio::fs::create_dir_all(&partial).await.map_err(ControlError::internal)?;
        let files =
            hearth_artifacts::sources::fetch(&self.http, &self.config.hf_endpoint, &source, &partial).await.map_err(
                |e| ControlError::FailedPrecondition(format!("version {version} from s3://{bucket}/{path}: {e}")),
            )?;
        if files.0.is_empty() {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            return Err(ControlError::FailedPrecondition(format!(
                "version {version}: s3://{bucket}/{path}/ holds no files"
            )));
        }
        tokio::fs::write(partial.join(COMPLETE), b"").await.map_err(ControlError::internal)?;
        let _ = tokio::fs::remove_dir_all(dir).await;
        tokio::fs::rename(&partial, dir).await.map_err(ControlError::internal)?;
        tracing::info!(version, files = files.0.len(), "model version fetched from s3://{bucket}/{path}");
        Ok(())
    }
}

/// Marks a fetched version folder as whole.
const COMPLETE: &str = ".complete";

/// What a version URL allows: its method (`VLIST` the manifest, `VGET` a file) on a version of
/// a deployment. The deployment and version sit in the grant's model field, which no model
/// name can equal (`@` is not allowed in one).
fn version_grant(
    method: &'static str,
    account: &str,
    id: &str,
    version: &str,
    file: &str,
    expires: i64,
) -> hearth_artifacts::Grant {
    hearth_artifacts::Grant {
        method,
        account: account.to_string(),
        model: format!("{id}@{version}"),
        file: file.to_string(),
        size: 0,
        expires,
    }
}

fn ttl_expiry(ttl: std::time::Duration) -> i64 {
    chrono::Utc::now().timestamp() + ttl.as_secs() as i64
}

/// A version folder's files (following links; hidden names and subfolders left out), with
/// their sizes and SHA-256.
fn version_files(dir: &Path) -> std::io::Result<Vec<(String, u64, String)>> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if hearth_artifacts::store::validate_file_name(&name).is_err() {
            continue;
        }
        let meta = std::fs::metadata(entry.path())?;
        if !meta.is_file() {
            continue;
        }
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(entry.path())?;
        std::io::copy(&mut f, &mut h)?;
        out.push((name, meta.len(), hex::encode(h.finalize())));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_urls_parse_or_say_what_is_expected() {
        assert_eq!(Bucket::parse("file:///srv/versions").unwrap(), Bucket::Dir("/srv/versions".into()));
        assert_eq!(
            Bucket::parse("s3://b/models/smol").unwrap(),
            Bucket::S3 { bucket: "b".into(), prefix: "models/smol".into() }
        );
        assert_eq!(Bucket::parse("s3://b").unwrap(), Bucket::S3 { bucket: "b".into(), prefix: String::new() });
        for bad in ["file://relative", "s3:///x", "s3://b/p/", "/just/a/path", "file:///a/../b"] {
            assert!(matches!(Bucket::parse(bad), Err(ControlError::InvalidArgument(_))), "{bad}");
        }
        assert!(matches!(Bucket::parse("gs://b/p"), Err(ControlError::Unimplemented(_))));
        assert!(check_version("v", "v2.1_final-3").is_ok());
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_version("v", bad).is_err(), "{bad}");
        }
    }
}
