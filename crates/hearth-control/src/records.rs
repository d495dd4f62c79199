//! Typed access to the store's JSON documents, and read-modify-write with retries on
//! concurrent change.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ControlError, Result};
use crate::ControlPlane;

pub(crate) const MODELS: &str = "models";
pub(crate) const DEPLOYMENTS: &str = "deployments";
pub(crate) const DEPLOYED_MODELS: &str = "deployedModels";

/// A stored document with the store's bookkeeping.
#[derive(Debug, Clone)]
pub(crate) struct Doc<T> {
    pub id: String,
    pub value: T,
    pub version: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

fn decode<T: DeserializeOwned>(rec: hearth_store::Record) -> Result<Doc<T>> {
    let value = serde_json::from_str(&rec.body).map_err(|e| {
        ControlError::Internal(format!("stored {} {}/{} is unreadable: {e}", rec.kind, rec.account, rec.id))
    })?;
    Ok(Doc { id: rec.id, value, version: rec.version, create_time: rec.create_time, update_time: rec.update_time })
}

fn encode<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(ControlError::internal)
}

/// How often a read-modify-write is retried when another request wrote in between.
const MAX_ATTEMPTS: usize = 5;

impl ControlPlane {
    pub(crate) async fn load<T: DeserializeOwned>(
        &self,
        kind: &str,
        account: &str,
        id: &str,
    ) -> Result<Option<Doc<T>>> {
        self.store.get(kind, account, id).await?.map(decode).transpose()
    }

    pub(crate) async fn load_all<T: DeserializeOwned>(&self, kind: &str, account: &str) -> Result<Vec<Doc<T>>> {
        self.store.list(kind, account).await?.into_iter().map(decode).collect()
    }

    pub(crate) async fn insert_doc<T: Serialize + DeserializeOwned>(
        &self,
        kind: &str,
        account: &str,
        id: &str,
        value: &T,
    ) -> Result<Doc<T>> {
        decode(self.store.insert(kind, account, id, &encode(value)?).await?)
    }

    /// Applies `change` to the current document and writes it back, re-reading and
    /// re-applying if another writer got there first. `change` sees the fresh document each
    /// time, so its checks always hold against what is stored.
    pub(crate) async fn modify<T, F>(
        &self,
        kind: &str,
        account: &str,
        id: &str,
        not_found: impl Fn() -> ControlError,
        mut change: F,
    ) -> Result<Doc<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut Doc<T>) -> Result<()>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let mut doc: Doc<T> = self.load(kind, account, id).await?.ok_or_else(&not_found)?;
            change(&mut doc)?;
            match self.store.update(kind, account, id, doc.version, &encode(&doc.value)?).await {
                Ok(rec) => return decode(rec),
                Err(hearth_store::StoreError::Conflict { .. }) => continue,
                Err(hearth_store::StoreError::NotFound { .. }) => return Err(not_found()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Aborted(format!(
            "accounts/{account}/{kind}/{id} is being changed by many requests at once; retry"
        )))
    }
}

/// A random id of `len` lower-case letters and digits starting with a letter: valid under
/// RFC 1034 and unlikely to collide.
pub(crate) fn random_id(len: usize) -> String {
    use rand::Rng;
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(len);
    id.push(LETTERS[rng.gen_range(0..LETTERS.len())] as char);
    for _ in 1..len {
        id.push(ALNUM[rng.gen_range(0..ALNUM.len())] as char);
    }
    id
}
