//! hearth's persistence: one `Store` trait, implemented over SQLite (the embedded default)
//! and PostgreSQL, both through sqlx.
//!
//! The store keeps resources as JSON documents keyed by `(kind, account, id)` with a version
//! number for optimistic concurrency; it knows nothing of what a Model or a Deployment is.
//! That keeps the schema stable while the API grows, and puts every rule about resources in
//! one place, the control plane.

mod sql;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use sql::{PgStore, SqliteStore};
/// Re-exported so callers can name the database errors `StoreError::Database` carries.
pub use sqlx;

/// A stored resource document.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub kind: String,
    pub account: String,
    pub id: String,
    /// The resource as JSON; its shape belongs to the control plane.
    pub body: String,
    /// Starts at 1 and grows by one on every update; the etag of optimistic concurrency.
    pub version: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

/// An API key as the store keeps it: the SHA-256 of the key, never the key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub key_hash: String,
    pub account: String,
    /// The user the key belongs to; `None` for a key bound by `ensure_api_key` (a key given
    /// at start), which the control plane reads as its account's first admin.
    pub user: Option<String>,
    /// The key's name in the API; `None` for keys bound by `ensure_api_key`.
    pub key_id: Option<String>,
    pub expire_time: Option<DateTime<Utc>>,
    /// The key's metadata as JSON; its shape belongs to the control plane.
    pub body: Option<String>,
    pub create_time: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {account}/{id} already exists")]
    AlreadyExists { kind: String, account: String, id: String },
    #[error("{kind} {account}/{id} not found")]
    NotFound { kind: String, account: String, id: String },
    /// The record changed since it was read; the caller re-reads and retries or gives up.
    #[error("{kind} {account}/{id} was changed concurrently")]
    Conflict { kind: String, account: String, id: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: use a path for SQLite or postgres://...")]
    BadUrl(String),
}

impl StoreError {
    /// Errors that say nothing about the request, only that the database could not be
    /// reached in time: the client may retry.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Everything the control plane persists. Implementations are cheap to clone handles over a
/// connection pool; every method is one short transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new record at version 1; `AlreadyExists` if the key is taken.
    async fn insert(&self, kind: &str, account: &str, id: &str, body: &str) -> Result<Record>;
    async fn get(&self, kind: &str, account: &str, id: &str) -> Result<Option<Record>>;
    /// Every record of `kind` in `account`, by id.
    async fn list(&self, kind: &str, account: &str) -> Result<Vec<Record>>;
    /// Every record of `kind` in every account (for background work such as purging).
    async fn list_all(&self, kind: &str) -> Result<Vec<Record>>;
    /// Replaces the body if the stored version is still `expected_version`; `Conflict` if it
    /// moved on, `NotFound` if the record is gone.
    async fn update(&self, kind: &str, account: &str, id: &str, expected_version: i64, body: &str) -> Result<Record>;
    /// Removes the record if the stored version is still `expected_version` (or in any
    /// version when `None`). Returns whether a record was removed.
    async fn delete(&self, kind: &str, account: &str, id: &str, expected_version: Option<i64>) -> Result<bool>;

    /// Creates the account if it does not exist; true if it was created.
    async fn ensure_account(&self, account: &str) -> Result<bool>;
    async fn account_exists(&self, account: &str) -> Result<bool>;
    /// Binds a key hash to an account if the hash is not bound yet. Returns the account the
    /// hash is bound to afterwards, which differs from `account` if it was bound before.
    async fn ensure_api_key(&self, key_hash: &str, account: &str) -> Result<String>;
    /// The key with this hash, whoever it belongs to.
    async fn api_key(&self, key_hash: &str) -> Result<Option<KeyRecord>>;
    /// Stores a new key (its `create_time` is the store's clock); `AlreadyExists` if its hash
    /// or its `(account, user, key_id)` is taken.
    async fn insert_api_key(&self, key: &KeyRecord) -> Result<KeyRecord>;
    /// The keys of one user, by key id.
    async fn list_api_keys(&self, account: &str, user: &str) -> Result<Vec<KeyRecord>>;
    /// Removes one user's key; whether there was one.
    async fn delete_api_key(&self, account: &str, user: &str, key_id: &str) -> Result<bool>;

    /// Returns the named secret, storing `candidate` first if there is none yet. Concurrent
    /// first callers all get the same value.
    async fn secret_or_init(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>>;
}

/// Opens the store a URL names: `postgres://...` or `postgresql://...` for PostgreSQL,
/// `sqlite://PATH` or a plain path for SQLite. Runs migrations.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(PgStore::connect(url).await?))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(std::sync::Arc::new(SqliteStore::open(std::path::Path::new(path)).await?))
    } else if url.contains("://") {
        Err(StoreError::BadUrl(url.to_string()))
    } else {
        Ok(std::sync::Arc::new(SqliteStore::open(std::path::Path::new(url)).await?))
    }
}
