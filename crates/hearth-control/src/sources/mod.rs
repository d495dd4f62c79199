//! Model import: a model's files fetched from where they already live (a Hugging Face Hub
//! repository, an http(s) URL, an S3 bucket, Civitai) instead of uploaded.
//!
//! An import runs in the background. The model is created UPLOADING with the source kept in
//! its record; the files stream into the model's artifact directory, each checked against the
//! size and checksum its source announces; then the same validation as an upload decides
//! READY. Anything that goes wrong (a missing repository, a 404, a cut connection, a file that
//! is not a model) removes every fetched file and leaves the model FAILED with `status` saying
//! why: never a partial READY. The record keeps the source until the import ends, so a gateway
//! that restarts mid-import starts it again ([`ControlPlane::resume_imports`]).

mod archive;
mod civitai;
mod fetch;
mod huggingface;
mod s3;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use hearth_api::resources::{ModelSource, ModelState};
use hearth_api::rpc::ResourceStatus;

use crate::error::{ControlError, Result};
use crate::models::ModelRecord;
use crate::records::{Doc, MODELS};
use crate::ControlPlane;

/// The imports running in this process, by (account, model), so one is never started twice.
#[derive(Default)]
pub(crate) struct Running(Mutex<HashSet<(String, String)>>);

/// Which of the sources a request names, checked before anything is created so a malformed
/// source is an INVALID_ARGUMENT on the create call rather than a FAILED model later.
pub(crate) fn check(source: &ModelSource) -> Result<()> {
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
        return Err(ControlError::InvalidArgument(format!(
            "a model source names exactly one of awsS3Source, huggingfaceSource, urlSource and civitaiSource; \
             this one names {set}"
        )));
    }
    if source.azure_blob_source.is_some() {
        return Err(ControlError::unimplemented_field("model source", "azureBlobSource"));
    }
    if let Some(s3) = &source.aws_s3_source {
        if s3.s3_bucket.is_empty() {
            return Err(ControlError::InvalidArgument("awsS3Source.s3Bucket is required".to_string()));
        }
        if s3.role_arn.as_deref().is_some_and(|r| !r.is_empty()) {
            return Err(ControlError::unimplemented_field("awsS3Source", "roleArn"));
        }
        if s3.access_key_id.is_some() != s3.access_secret.is_some() {
            return Err(ControlError::InvalidArgument(
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
                return Err(ControlError::InvalidArgument(format!("urlSource.headers: {name:?} is not a header name")));
            }
        }
    }
    if let Some(c) = &source.civitai_source {
        fetch::check_url("civitaiSource.civitUrl", &c.civit_url)?;
    }
    Ok(())
}

/// Where a model came from, for `importedFrom`: the location without any credential.
pub(crate) fn describe(source: &ModelSource) -> String {
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

impl ControlPlane {
    /// Starts the import of a model whose record holds a source, unless one is already
    /// running for it in this process.
    pub(crate) fn spawn_import(&self, account: &str, id: &str, source: ModelSource) {
        let key = (account.to_string(), id.to_string());
        {
            let mut running = self.imports.0.lock().unwrap_or_else(|e| e.into_inner());
            if !running.insert(key.clone()) {
                return;
            }
        }
        let control = self.clone();
        tokio::spawn(async move {
            control.run_import(&key.0, &key.1, &source).await;
            control.imports.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        });
    }

    /// Starts again every import a previous process left unfinished. Called once at start.
    pub async fn resume_imports(&self) -> Result<usize> {
        let mut resumed = 0;
        for rec in self.store.list_all(MODELS).await? {
            let Ok(record) = crate::records::decode_body::<ModelRecord>(&rec.body) else { continue };
            if let (Some(source), Some(ModelState::Uploading)) = (record.import, record.model.state) {
                tracing::info!(account = %rec.account, model = %rec.id, "resuming an unfinished import");
                self.spawn_import(&rec.account, &rec.id, source);
                resumed += 1;
            }
        }
        Ok(resumed)
    }

    async fn run_import(&self, account: &str, id: &str, source: &ModelSource) {
        let from = describe(source);
        tracing::info!(account, model = %id, from = %from, "import started");
        let outcome = match self.fetch_source(account, id, source).await {
            Ok((files, version)) => self.finish_import(account, id, files, version).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => tracing::info!(account, model = %id, from = %from, "import finished; model READY"),
            Err(e) => {
                tracing::warn!(account, model = %id, from = %from, error = %e, "import failed");
                if let Err(e2) = self.fail_import(account, id, &from, &e).await {
                    tracing::warn!(account, model = %id, error = %e2, "could not record the failed import");
                }
            }
        }
    }

    /// Fetches the files; returns them with what the source calls their version, if anything.
    async fn fetch_source(
        &self,
        account: &str,
        id: &str,
        source: &ModelSource,
    ) -> Result<(BTreeMap<String, u64>, Option<String>)> {
        let dir = self.artifacts.model_dir(account, id);
        // A resumed import starts from nothing: what an earlier attempt left is not trusted.
        self.artifacts.remove_model(account, id).await?;
        tokio::fs::create_dir_all(&dir).await.map_err(ControlError::internal)?;
        if let Some(hf) = &source.huggingface_source {
            huggingface::fetch(&self.http, &self.config.hf_endpoint, hf, &dir).await.map(|(f, c)| (f, Some(c)))
        } else if let Some(u) = &source.url_source {
            fetch::fetch_url(&self.http, &u.url, &u.headers, &dir).await.map(|f| (f, None))
        } else if let Some(s3) = &source.aws_s3_source {
            s3::fetch(s3, &dir).await.map(|f| (f, None))
        } else if let Some(c) = &source.civitai_source {
            civitai::fetch(&self.http, c, &dir).await.map(|f| (f, None))
        } else {
            Err(ControlError::InvalidArgument("the model source names nothing to import".to_string()))
        }
    }

    /// Records what was fetched as the announced files and runs the upload validation; then
    /// loads an addon that was created to be deployed.
    pub(crate) async fn finish_import(
        &self,
        account: &str,
        id: &str,
        files: BTreeMap<String, u64>,
        version: Option<String>,
    ) -> Result<()> {
        self.modify(
            account,
            id,
            || deleted_meanwhile(account, id),
            |doc: &mut Doc<ModelRecord>| {
                doc.value.announced = files.clone();
                Ok(())
            },
        )
        .await?;
        self.validate_files(account, id).await?;
        let done = self
            .modify(
                account,
                id,
                || deleted_meanwhile(account, id),
                |doc: &mut Doc<ModelRecord>| {
                    doc.value.import = None;
                    doc.value.source_version = version.clone();
                    Ok(())
                },
            )
            .await?;
        if let Some(deployment) = done.value.deploy_onto {
            self.deploy_imported_addon(account, id, &deployment).await?;
        }
        Ok(())
    }

    /// Removes whatever was fetched and marks the model FAILED with the reason. A model
    /// deleted meanwhile only has its files removed.
    async fn fail_import(&self, account: &str, id: &str, from: &str, e: &ControlError) -> Result<()> {
        self.artifacts.remove_model(account, id).await?;
        let status = ResourceStatus::new(e.code(), format!("import from {from} failed: {}", e.public_message()));
        let result = self
            .modify(
                account,
                id,
                || deleted_meanwhile(account, id),
                |doc: &mut Doc<ModelRecord>| {
                    doc.value.import = None;
                    doc.value.deploy_onto = None;
                    doc.value.announced.clear();
                    doc.value.model.state = Some(ModelState::Failed);
                    doc.value.model.status = Some(status.clone());
                    Ok(())
                },
            )
            .await;
        match result {
            Ok(_) | Err(ControlError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn deleted_meanwhile(account: &str, id: &str) -> ControlError {
    ControlError::NotFound(format!("model accounts/{account}/models/{id} was deleted during its import"))
}

/// The import bookkeeping the control plane carries.
pub(crate) type Imports = Arc<Running>;
