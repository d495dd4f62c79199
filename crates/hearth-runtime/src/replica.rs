//! The gateway's side of the replica protocol (`hearth_api::replica`): typed calls with
//! bounded waits. The reconciler talks to replicas only through [`ReplicaApi`], so tests put
//! a fake in its place.

use std::time::Duration;

use async_trait::async_trait;
use hearth_api::openai::ErrorBody;
use hearth_api::replica::{
    paths, AdapterInfo, AdapterList, Health, LoadAdapterRequest, LoadFigures, LoadModelVersionRequest, ModelVersion,
    UnloadAdapterRequest, Unloaded, Unmerged,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::credentials::ReplicaCredentials;
use crate::error::{Result, RuntimeError};

#[async_trait]
pub trait ReplicaApi: Send + Sync + 'static {
    async fn health(&self, endpoint: &str) -> Result<Health>;
    async fn load_figures(&self, endpoint: &str) -> Result<LoadFigures>;
    async fn adapters(&self, endpoint: &str) -> Result<AdapterList>;
    async fn load_adapter(&self, endpoint: &str, req: &LoadAdapterRequest) -> Result<AdapterInfo>;
    async fn unload_adapter(&self, endpoint: &str, name: &str) -> Result<()>;
    async fn merge_adapter(&self, endpoint: &str, req: &LoadAdapterRequest) -> Result<AdapterInfo>;
    async fn unmerge_adapter(&self, endpoint: &str) -> Result<()>;
    /// Serves a new version of the weights in place; answers once it serves.
    async fn load_model_version(&self, endpoint: &str, req: &LoadModelVersionRequest) -> Result<()>;
}

/// How long a call may take: observations answer at once; loading or merging an adapter
/// reads its files and, for a merge, waits for running requests to finish.
const QUICK: Duration = Duration::from_secs(5);
const SLOW: Duration = Duration::from_secs(120);

/// The protocol over HTTP, each call carrying the replica's token.
#[derive(Clone)]
pub struct HttpReplicas {
    http: reqwest::Client,
    credentials: ReplicaCredentials,
}

impl HttpReplicas {
    pub fn new(credentials: ReplicaCredentials) -> HttpReplicas {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().unwrap_or_default();
        HttpReplicas { http, credentials }
    }
}

impl HttpReplicas {
    async fn call<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        endpoint: &str,
        path: &str,
        body: Option<&B>,
        wait: Duration,
    ) -> Result<T> {
        let url = format!("{endpoint}{path}");
        let request = match body {
            Some(b) => self.http.post(&url).json(b),
            None => self.http.get(&url),
        }
        .header(reqwest::header::AUTHORIZATION, self.credentials.bearer(endpoint));
        let unreachable = |e: &dyn std::fmt::Display| RuntimeError::Unreachable {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        };
        let exchange = async {
            let response = request.send().await.map_err(|e| unreachable(&e))?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| unreachable(&e))?;
            if !status.is_success() {
                let message = serde_json::from_slice::<ErrorBody>(&bytes)
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(500).collect());
                return Err(RuntimeError::Refused { endpoint: endpoint.to_string(), status: status.as_u16(), message });
            }
            serde_json::from_slice(&bytes).map_err(|e| unreachable(&format!("{path} answered off-protocol: {e}")))
        };
        tokio::time::timeout(wait, exchange)
            .await
            .map_err(|_| RuntimeError::Timeout { endpoint: endpoint.to_string(), seconds: wait.as_secs() })?
    }
}

#[async_trait]
impl ReplicaApi for HttpReplicas {
    async fn health(&self, endpoint: &str) -> Result<Health> {
        self.call::<(), _>(endpoint, paths::HEALTH, None, QUICK).await
    }

    async fn load_figures(&self, endpoint: &str) -> Result<LoadFigures> {
        self.call::<(), _>(endpoint, paths::LOAD_FIGURES, None, QUICK).await
    }

    async fn adapters(&self, endpoint: &str) -> Result<AdapterList> {
        self.call::<(), _>(endpoint, paths::ADAPTERS, None, QUICK).await
    }

    async fn load_adapter(&self, endpoint: &str, req: &LoadAdapterRequest) -> Result<AdapterInfo> {
        self.call(endpoint, paths::LOAD_ADAPTER, Some(req), SLOW).await
    }

    async fn unload_adapter(&self, endpoint: &str, name: &str) -> Result<()> {
        let req = UnloadAdapterRequest { lora_name: name.to_string() };
        self.call::<_, Unloaded>(endpoint, paths::UNLOAD_ADAPTER, Some(&req), QUICK).await.map(|_| ())
    }

    async fn merge_adapter(&self, endpoint: &str, req: &LoadAdapterRequest) -> Result<AdapterInfo> {
        self.call(endpoint, paths::MERGE_ADAPTER, Some(req), SLOW).await
    }

    async fn unmerge_adapter(&self, endpoint: &str) -> Result<()> {
        self.call::<_, Unmerged>(endpoint, paths::UNMERGE_ADAPTER, Some(&serde_json::json!({})), SLOW).await.map(|_| ())
    }

    async fn load_model_version(&self, endpoint: &str, req: &LoadModelVersionRequest) -> Result<()> {
        self.call::<_, ModelVersion>(endpoint, paths::LOAD_MODEL_VERSION, Some(req), SLOW).await.map(|_| ())
    }
}
