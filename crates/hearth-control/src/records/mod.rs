//! What the store keeps, and typed access to it.
//!
//! Stored records are hearth's own types, not the API's: each kind has a record struct that
//! reads with serde defaults and ignores fields it does not know, carries a `schema` number,
//! and has an `upgrade` step for every older schema. So renaming or dropping an API field never
//! makes an old row unreadable, and conversion between a record and the wire type happens in
//! one place per resource (the `view` and `from_wire` functions beside each record).
//!
//! A deployment and a loaded addon are each two rows: the spec (what the user asked, written
//! only by API calls) and the status (what the runtime observed, written only by the
//! reconciler), so a PATCH and a reconciler write never touch the same row. Every write is a
//! compare-and-swap on the row's version; [`ControlPlane::modify`] retries on a concurrent
//! change.

pub(crate) mod deployed_model;
pub(crate) mod deployment;
pub(crate) mod model;
pub(crate) mod user;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{ControlError, Result};
use crate::ControlPlane;

pub(crate) const MODELS: &str = "models";
pub(crate) const DEPLOYMENTS: &str = "deployments";
pub(crate) const DEPLOYMENT_STATUS: &str = "deploymentStatus";
pub(crate) const DEPLOYED_MODELS: &str = "deployedModels";
pub(crate) const DEPLOYED_MODEL_STATUS: &str = "deployedModelStatus";
pub(crate) const USERS: &str = "users";

/// A stored record type: its kind in the store, the schema it writes, and how a row of an
/// older schema becomes one of this schema.
pub(crate) trait Record: Serialize + DeserializeOwned {
    const KIND: &'static str;
    /// The schema this version of hearth writes. Rows without a `schema` field are schema 0:
    /// written before records had their own types, in the API's JSON shape.
    const SCHEMA: u32;

    /// Turns a row of schema `from` (< `SCHEMA`) into the JSON of a current record.
    fn upgrade(row: Map<String, Value>, from: u32) -> std::result::Result<Map<String, Value>, String>;
}

/// A stored document with the store's bookkeeping.
#[derive(Debug, Clone)]
pub(crate) struct Doc<T> {
    pub id: String,
    pub value: T,
    pub version: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

/// Why a row could not be read, said so a person can act on it.
pub(crate) fn unreadable(kind: &str, account: &str, id: &str, why: impl std::fmt::Display) -> ControlError {
    ControlError::DataLoss(format!("the stored record accounts/{account}/{kind}/{id} is unreadable: {why}"))
}

/// Reads a row: its schema, upgraded step by step to the current one, then the record.
pub(crate) fn decode_body<T: Record>(body: &str) -> std::result::Result<T, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut row) = value else { return Err("not a JSON object".to_string()) };
    let schema = match row.remove("schema") {
        None => 0,
        Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("bad schema {v}"))?,
    };
    if schema > T::SCHEMA {
        // Read what this version knows; `encode` refuses to write it back (see `modify`).
        tracing::debug!(kind = T::KIND, schema, "row written by a newer hearth; reading the fields known here");
    } else if schema < T::SCHEMA {
        row = T::upgrade(row, schema)?;
    }
    // A field whose stored value this version cannot read (a type that changed without a
    // migration, a hand-edited row) is dropped rather than losing the whole record.
    serde_json::from_value::<T>(Value::Object(keep_readable::<T>(row))).map_err(|e| e.to_string())
}

/// The fields of `row` that `T` reads, each tried on its own when the whole does not read:
/// one unreadable field is dropped (and logged) instead of failing the rest.
fn keep_readable<T: DeserializeOwned>(row: Map<String, Value>) -> Map<String, Value> {
    if serde_json::from_value::<T>(Value::Object(row.clone())).is_ok() {
        return row;
    }
    let mut kept = Map::new();
    for (k, v) in row {
        let mut trial = kept.clone();
        trial.insert(k.clone(), v);
        if serde_json::from_value::<T>(Value::Object(trial.clone())).is_ok() {
            kept = trial;
        } else {
            tracing::warn!(field = %k, "a stored field this version cannot read was dropped");
        }
    }
    kept
}

/// A wire type from a stored (schema 0) row, leniently: unknown or unreadable fields dropped.
pub(crate) fn decode_lenient<T: DeserializeOwned + Default>(row: Value) -> T {
    match row {
        Value::Object(m) => serde_json::from_value(Value::Object(keep_readable::<T>(m))).unwrap_or_default(),
        _ => T::default(),
    }
}

fn decode<T: Record>(rec: hearth_store::Record) -> Result<Doc<T>> {
    let value = decode_body::<T>(&rec.body).map_err(|e| unreadable(&rec.kind, &rec.account, &rec.id, e))?;
    Ok(Doc { id: rec.id, value, version: rec.version, create_time: rec.create_time, update_time: rec.update_time })
}

fn schema_of(body: &str) -> u32 {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("schema").and_then(Value::as_u64))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

pub(crate) fn encode<T: Record>(value: &T) -> Result<String> {
    let mut v = serde_json::to_value(value).map_err(ControlError::internal)?;
    if let Value::Object(m) = &mut v {
        m.insert("schema".to_string(), Value::from(T::SCHEMA));
    }
    serde_json::to_string(&v).map_err(ControlError::internal)
}

/// How often a read-modify-write is retried when another request wrote in between.
const MAX_ATTEMPTS: usize = 5;

impl ControlPlane {
    pub(crate) async fn load<T: Record>(&self, account: &str, id: &str) -> Result<Option<Doc<T>>> {
        self.store.get(T::KIND, account, id).await?.map(decode).transpose()
    }

    /// Every readable record of an account; an unreadable row is logged and left out, so one
    /// bad row never fails a listing.
    pub(crate) async fn load_all<T: Record>(&self, account: &str) -> Result<Vec<Doc<T>>> {
        let mut out = Vec::new();
        for rec in self.store.list(T::KIND, account).await? {
            match decode(rec) {
                Ok(doc) => out.push(doc),
                Err(e) => tracing::warn!(error = %e, "skipped an unreadable row"),
            }
        }
        Ok(out)
    }

    pub(crate) async fn insert_doc<T: Record>(&self, account: &str, id: &str, value: &T) -> Result<Doc<T>> {
        decode(self.store.insert(T::KIND, account, id, &encode(value)?).await?)
    }

    /// Applies `change` to the current document and writes it back, re-reading and
    /// re-applying if another writer got there first. `change` sees the fresh document each
    /// time, so its checks always hold against what is stored.
    pub(crate) async fn modify<T, F>(
        &self,
        account: &str,
        id: &str,
        not_found: impl Fn() -> ControlError,
        mut change: F,
    ) -> Result<Doc<T>>
    where
        T: Record,
        F: FnMut(&mut Doc<T>) -> Result<()>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let rec = self.store.get(T::KIND, account, id).await?.ok_or_else(&not_found)?;
            if schema_of(&rec.body) > T::SCHEMA {
                return Err(ControlError::FailedPrecondition(format!(
                    "accounts/{account}/{}/{id} was written by a newer version of hearth; change it there",
                    T::KIND
                )));
            }
            let mut doc: Doc<T> = decode(rec)?;
            change(&mut doc)?;
            match self.store.update(T::KIND, account, id, doc.version, &encode(&doc.value)?).await {
                Ok(rec) => return decode(rec),
                Err(hearth_store::StoreError::Conflict { .. }) => continue,
                Err(hearth_store::StoreError::NotFound { .. }) => return Err(not_found()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Aborted(format!(
            "accounts/{account}/{}/{id} is being changed by many requests at once; retry",
            T::KIND
        )))
    }

    /// Like [`modify`](Self::modify) for a row that may not exist yet (`T::default()` then) or
    /// may be unreadable (replaced: used for status rows, which the next observation rebuilds).
    /// Writes only when `change` changed something.
    pub(crate) async fn upsert<T, F>(&self, account: &str, id: &str, mut change: F) -> Result<T>
    where
        T: Record + Default + PartialEq + Clone,
        F: FnMut(&mut T),
    {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.store.get(T::KIND, account, id).await?;
            let (version, old) = match &current {
                Some(rec) => (Some(rec.version), decode_body::<T>(&rec.body).unwrap_or_default()),
                None => (None, T::default()),
            };
            let mut new = old.clone();
            change(&mut new);
            if current.is_some() && new == old {
                return Ok(new);
            }
            let body = encode(&new)?;
            let written = match version {
                Some(v) => self.store.update(T::KIND, account, id, v, &body).await.map(|_| ()),
                None => self.store.insert(T::KIND, account, id, &body).await.map(|_| ()),
            };
            match written {
                Ok(()) => return Ok(new),
                Err(hearth_store::StoreError::Conflict { .. } | hearth_store::StoreError::AlreadyExists { .. }) => {
                    continue
                }
                Err(hearth_store::StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Aborted(format!("accounts/{account}/{}/{id} is changing too fast; retry", T::KIND)))
    }
}

impl ControlPlane {
    /// Rewrites every row of an older schema in the current one, splitting schema 0
    /// deployments and deployed models into their spec and status rows. Runs at start; it is
    /// idempotent, and a row another gateway rewrote meanwhile is left to it. Returns how many
    /// rows were rewritten.
    pub(crate) async fn migrate_records(&self) -> Result<usize> {
        use hearth_api::resources::{DeployedModel, Deployment};

        let mut rewritten = 0;
        for rec in self.store.list_all(DEPLOYMENTS).await? {
            if schema_of(&rec.body) >= deployment::DeploymentSpec::SCHEMA {
                continue;
            }
            let Ok(row) = serde_json::from_str::<Value>(&rec.body) else { continue };
            let status = deployment::DeploymentStatus::from_v0(&decode_lenient::<Deployment>(row));
            rewritten += self.split_row::<deployment::DeploymentSpec, _>(&rec, &status).await? as usize;
        }
        for rec in self.store.list_all(DEPLOYED_MODELS).await? {
            if schema_of(&rec.body) >= deployed_model::DeployedModelSpec::SCHEMA {
                continue;
            }
            let Ok(row) = serde_json::from_str::<Value>(&rec.body) else { continue };
            let status = deployed_model::DeployedModelStatus::from_v0(&decode_lenient::<DeployedModel>(row));
            rewritten += self.split_row::<deployed_model::DeployedModelSpec, _>(&rec, &status).await? as usize;
        }
        for rec in self.store.list_all(MODELS).await? {
            if schema_of(&rec.body) >= model::ModelRecord::SCHEMA {
                continue;
            }
            let Ok(record) = decode_body::<model::ModelRecord>(&rec.body) else { continue };
            rewritten += self.rewrite(&rec, &encode(&record)?).await? as usize;
        }
        if rewritten > 0 {
            tracing::info!(rows = rewritten, "stored records upgraded to the current schema");
        }
        Ok(rewritten)
    }

    /// Writes the status part of an old row (unless a status row exists), then its spec part.
    async fn split_row<S: Record, T: Record>(&self, rec: &hearth_store::Record, status: &T) -> Result<bool> {
        let Ok(spec) = decode_body::<S>(&rec.body) else { return Ok(false) };
        if self.store.get(T::KIND, &rec.account, &rec.id).await?.is_none() {
            match self.store.insert(T::KIND, &rec.account, &rec.id, &encode(status)?).await {
                Ok(_) | Err(hearth_store::StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.rewrite(rec, &encode(&spec)?).await
    }

    async fn rewrite(&self, rec: &hearth_store::Record, body: &str) -> Result<bool> {
        match self.store.update(&rec.kind, &rec.account, &rec.id, rec.version, body).await {
            Ok(_) => Ok(true),
            Err(hearth_store::StoreError::Conflict { .. } | hearth_store::StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Merges wire fields kept for echo only into a serialized wire object. A field the current
/// API no longer has (or whose type changed) would fail the whole conversion, so each is tried
/// on its own and dropped, with a log line, when the wire type refuses it.
pub(crate) fn with_echo<T: Serialize + DeserializeOwned>(base: T, echo: &Map<String, Value>) -> T {
    if echo.is_empty() {
        return base;
    }
    let Ok(Value::Object(mut obj)) = serde_json::to_value(&base) else { return base };
    obj.extend(echo.clone());
    serde_json::from_value(Value::Object(keep_readable::<T>(obj))).unwrap_or(base)
}

/// The fields named in `keys` of a wire value, for storing as echo.
pub(crate) fn echo_of<T: Serialize>(wire: &T, keys: &[&str]) -> Map<String, Value> {
    let Ok(Value::Object(obj)) = serde_json::to_value(wire) else { return Map::new() };
    obj.into_iter().filter(|(k, v)| keys.contains(&k.as_str()) && !v.is_null()).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    struct Thing {
        name: String,
        count: i32,
    }

    impl Record for Thing {
        const KIND: &'static str = "things";
        const SCHEMA: u32 = 2;
        fn upgrade(mut row: Map<String, Value>, from: u32) -> std::result::Result<Map<String, Value>, String> {
            if from < 1 {
                // Schema 0 called it `title`.
                if let Some(t) = row.remove("title") {
                    row.insert("name".to_string(), t);
                }
            }
            if from < 2 {
                row.remove("legacyFlag");
            }
            Ok(row)
        }
    }

    #[test]
    fn old_rows_upgrade_and_unknown_or_unreadable_fields_do_not_fail_the_row() {
        let t: Thing = decode_body(r#"{"title": "a", "count": 3, "legacyFlag": true}"#).expect("schema 0");
        assert_eq!(t, Thing { name: "a".into(), count: 3 });
        let t: Thing = decode_body(r#"{"schema": 2, "name": "b", "droppedLater": {"x": 1}}"#).expect("unknown field");
        assert_eq!(t, Thing { name: "b".into(), count: 0 });
        let t: Thing = decode_body(r#"{"schema": 2, "name": "c", "count": "not a number"}"#).expect("bad field");
        assert_eq!(t, Thing { name: "c".into(), count: 0 });
        assert!(decode_body::<Thing>("junk").is_err());
        let written = encode(&Thing { name: "d".into(), count: 1 }).expect("encode");
        assert_eq!(schema_of(&written), 2);
    }
}
