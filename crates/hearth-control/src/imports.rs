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

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use hearth_api::resources::{ModelSource, ModelState};
use hearth_api::rpc::ResourceStatus;

use hearth_artifacts::sources::{self, describe};

use crate::error::{ControlError, Result};
use crate::models::ModelRecord;
use crate::records::{Doc, MODELS};
use crate::ControlPlane;

/// The imports running in this process, by (account, model), so one is never started twice.
#[derive(Default)]
pub(crate) struct Running(Mutex<HashSet<(String, String)>>);

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
        let progress = self.spawn_import_progress(account, id, &from);
        let fetched = self.fetch_source(account, id, source).await;
        progress.abort();
        let _ = progress.await;
        let outcome = match fetched {
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

    /// While the files stream in, says every 2 s in the model's `status` how much has arrived,
    /// read from the model's directory so every kind of source reports the same way.
    fn spawn_import_progress(&self, account: &str, id: &str, from: &str) -> tokio::task::JoinHandle<()> {
        let (control, account, id, from) = (self.clone(), account.to_string(), id.to_string(), from.to_string());
        let dir = self.artifacts.model_dir(&account, &id);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                tokio::time::sleep(IMPORT_PROGRESS_EVERY).await;
                let scan = dir.clone();
                let Ok(bytes) = tokio::task::spawn_blocking(move || bytes_under(&scan)).await else { continue };
                if last == Some(bytes) {
                    continue;
                }
                last = Some(bytes);
                let message = format!("importing from {from}: {:.1} MB fetched so far", bytes as f64 / 1e6);
                let _ = control
                    .modify(
                        &account,
                        &id,
                        || deleted_meanwhile(&account, &id),
                        |doc: &mut Doc<ModelRecord>| {
                            doc.value.model.status = Some(ResourceStatus::new(hearth_api::Code::Ok, message.clone()));
                            Ok(())
                        },
                    )
                    .await;
            }
        })
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
        Ok(sources::fetch(&self.http, &self.config.hf_endpoint, source, &dir).await?)
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
                    // The import's progress no longer applies.
                    doc.value.model.status = None;
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

/// How often an import reports what it has fetched.
const IMPORT_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The bytes of every file under `dir` (0 when it cannot be read).
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

fn deleted_meanwhile(account: &str, id: &str) -> ControlError {
    ControlError::NotFound(format!("model accounts/{account}/models/{id} was deleted during its import"))
}

/// The import bookkeeping the control plane carries.
pub(crate) type Imports = Arc<Running>;
