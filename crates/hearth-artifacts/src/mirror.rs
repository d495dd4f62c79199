//! Model files in object storage (`--artifact-store s3://bucket/prefix`), for gateways that
//! share no disk.
//!
//! The object store holds the truth: every complete file, at
//! `{prefix}/{account}/models/{model}/{file}`, and a model's `.sealed` marker once it is
//! validated. Each gateway's artifact directory is a cache of it: a file is written there
//! first (uploads stream, resume and verify locally as without a mirror), then put in the
//! bucket before the upload is answered, so the next request may reach any gateway. A gateway
//! that needs a model it does not have (to validate it, serve its manifest or a download, or
//! start a local replica) pulls the files; once a sealed model is pulled whole it is sealed in
//! the cache too and never asked for again, since a sealed model's files never change.
//!
//! Partial files of resumable uploads stay on the gateway that received them: the parts of
//! one file must reach one gateway (session affinity), as with any upload that resumes.

use std::path::Path;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use tokio::io::AsyncWriteExt;

use crate::error::{ArtifactError, Result};
use crate::store::validate_file_name;

const SEAL: &str = ".sealed";

pub struct Mirror {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The URL it was made from, for messages.
    url: String,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("url", &self.url).finish()
    }
}

fn env(keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

impl Mirror {
    /// `s3://bucket/prefix`; the endpoint, region and credentials come from the environment as
    /// for the AWS tools (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for an S3-compatible
    /// store).
    pub fn parse(url: &str) -> Result<Mirror> {
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(ArtifactError::Unimplemented(format!(
                "--artifact-store {url:?}: a local directory or s3://BUCKET/PREFIX (S3 or S3-compatible) is \
                 supported; gs:// and az:// are not yet"
            )));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ArtifactError::InvalidArgument(format!("--artifact-store {url:?} names no bucket")));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(env(&["AWS_REGION", "AWS_DEFAULT_REGION"]).unwrap_or_else(|| "us-east-1".to_string()));
        if let Some(endpoint) = env(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]) {
            builder = builder.with_allow_http(endpoint.starts_with("http://")).with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|e| ArtifactError::InvalidArgument(format!("--artifact-store: {e}")))?;
        Ok(Mirror { store: Arc::new(store), prefix: ObjectPath::from(prefix.trim_matches('/')), url: url.to_string() })
    }

    fn model(&self, account: &str, model: &str) -> ObjectPath {
        let mut p = self.prefix.clone();
        for part in [account, "models", model] {
            p = p.child(part);
        }
        p
    }

    fn error(&self, what: &str, e: object_store::Error) -> ArtifactError {
        match e {
            object_store::Error::NotFound { .. } => ArtifactError::NotFound(format!("{what} is not in {}", self.url)),
            other => ArtifactError::Unavailable(format!("the artifact store {}: {what}: {other}", self.url)),
        }
    }

    /// Every object under a model's prefix, seal included.
    async fn objects(&self, account: &str, model: &str) -> Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(&self.model(account, model)))
            .try_collect()
            .await
            .map_err(|e| self.error(&format!("listing {account}/{model}"), e))
    }

    /// A model's complete files with their sizes, by name.
    pub async fn list(&self, account: &str, model: &str) -> Result<Vec<(String, u64)>> {
        let dir = self.model(account, model);
        let objects = self.objects(account, model).await?;
        let mut out: Vec<(String, u64)> = objects
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                (m.location.prefix_match(&dir)?.count() == 1 && validate_file_name(&name).is_ok())
                    .then_some((name, m.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Puts a complete local file, in parts for a large one.
    pub async fn put(&self, account: &str, model: &str, file: &str, local: &Path) -> Result<()> {
        let location = self.model(account, model).child(file);
        let mut from = tokio::fs::File::open(local).await.map_err(ArtifactError::internal)?;
        let mut to = object_store::buffered::BufWriter::new(self.store.clone(), location);
        let copied = tokio::io::copy(&mut from, &mut to).await;
        match copied {
            Ok(_) => to.shutdown().await.map_err(|e| {
                ArtifactError::Unavailable(format!("the artifact store {}: storing {file}: {e}", self.url))
            }),
            Err(e) => {
                let _ = to.abort().await;
                Err(ArtifactError::Unavailable(format!("the artifact store {}: storing {file}: {e}", self.url)))
            }
        }
    }

    /// Fetches a file to `local` through a temporary name beside it, checking its size.
    pub async fn get(&self, account: &str, model: &str, file: &str, size: u64, local: &Path) -> Result<()> {
        let location = self.model(account, model).child(file);
        let got = self.store.get(&location).await.map_err(|e| self.error(file, e))?;
        let tmp = local.with_file_name(format!(".{file}.{:016x}.partial", rand::random::<u64>()));
        let result = async {
            let mut out = tokio::io::BufWriter::with_capacity(
                1 << 20,
                tokio::fs::File::create(&tmp).await.map_err(ArtifactError::internal)?,
            );
            let mut body = got.into_stream();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| self.error(file, e))?;
                n += chunk.len() as u64;
                out.write_all(&chunk).await.map_err(ArtifactError::internal)?;
            }
            if n != size {
                return Err(ArtifactError::Unavailable(format!(
                    "the artifact store {}: {file} arrived with {n} bytes where it lists {size}",
                    self.url
                )));
            }
            out.flush().await.map_err(ArtifactError::internal)?;
            out.into_inner().sync_all().await.map_err(ArtifactError::internal)?;
            tokio::fs::rename(&tmp, local).await.map_err(ArtifactError::internal)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Whether the model was validated (its files can no longer change).
    pub async fn sealed(&self, account: &str, model: &str) -> Result<bool> {
        match self.store.head(&self.model(account, model).child(SEAL)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error("the seal", e)),
        }
    }

    pub async fn seal(&self, account: &str, model: &str) -> Result<()> {
        self.store
            .put(&self.model(account, model).child(SEAL), PutPayload::from_static(b""))
            .await
            .map(|_| ())
            .map_err(|e| self.error("the seal", e))
    }

    /// Removes every object of a model, its seal last.
    pub async fn remove(&self, account: &str, model: &str) -> Result<()> {
        let objects = self.objects(account, model).await?;
        let (seal, files): (Vec<_>, Vec<_>) = objects.into_iter().partition(|m| m.location.filename() == Some(SEAL));
        for m in files.into_iter().chain(seal) {
            match self.store.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(&format!("removing {}", m.location), e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s3_urls_with_a_bucket() {
        assert!(matches!(Mirror::parse("gs://b/p"), Err(ArtifactError::Unimplemented(_))));
        assert!(matches!(Mirror::parse("s3:///p"), Err(ArtifactError::InvalidArgument(_))));
        let m = Mirror::parse("s3://bucket/some/prefix/").expect("parsed");
        assert_eq!(m.model("a", "m").as_ref(), "some/prefix/a/models/m");
        let m = Mirror::parse("s3://bucket").expect("parsed");
        assert_eq!(m.model("a", "m").as_ref(), "a/models/m");
    }
}
