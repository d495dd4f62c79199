//! The two SQL implementations of `Store`. The statements are identical for SQLite and
//! PostgreSQL (numbered `$n` parameters, `ON CONFLICT`), so one macro writes both impls.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Row;

use crate::{KeyRecord, Record, Result, Store, StoreError};

/// The embedded store: one SQLite file in WAL mode.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a write is on disk before it is acknowledged, so an acknowledged create
            // survives a crash of the process or of the machine.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(8).connect_with(options).await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

/// The store for more than one machine: PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<PgStore> {
        let pool =
            PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool })
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Unique-key violations surface as this SQLSTATE in both databases.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.is_unique_violation(),
        _ => false,
    }
}

macro_rules! impl_store {
    ($store:ty, $row:ty) => {
        impl $store {
            fn record(row: &$row) -> Result<Record> {
                Ok(Record {
                    kind: row.try_get("kind")?,
                    account: row.try_get("account")?,
                    id: row.try_get("id")?,
                    body: row.try_get("body")?,
                    version: row.try_get("version")?,
                    create_time: from_micros(row.try_get("create_us")?),
                    update_time: from_micros(row.try_get("update_us")?),
                })
            }

            fn key_record(row: &$row) -> Result<KeyRecord> {
                Ok(KeyRecord {
                    key_hash: row.try_get("key_hash")?,
                    account: row.try_get("account")?,
                    user: row.try_get("user_id")?,
                    key_id: row.try_get("key_id")?,
                    expire_time: row.try_get::<Option<i64>, _>("expire_us")?.map(from_micros),
                    body: row.try_get("body")?,
                    create_time: from_micros(row.try_get("create_us")?),
                })
            }
        }

        #[async_trait]
        impl Store for $store {
            async fn insert(&self, kind: &str, account: &str, id: &str, body: &str) -> Result<Record> {
                let now = micros(Utc::now());
                let res = sqlx::query(
                    "INSERT INTO objects (kind, account, id, body, version, create_us, update_us) \
                     VALUES ($1, $2, $3, $4, 1, $5, $5)",
                )
                .bind(kind)
                .bind(account)
                .bind(id)
                .bind(body)
                .bind(now)
                .execute(&self.pool)
                .await;
                match res {
                    Ok(_) => Ok(Record {
                        kind: kind.to_string(),
                        account: account.to_string(),
                        id: id.to_string(),
                        body: body.to_string(),
                        version: 1,
                        create_time: from_micros(now),
                        update_time: from_micros(now),
                    }),
                    Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists {
                        kind: kind.to_string(),
                        account: account.to_string(),
                        id: id.to_string(),
                    }),
                    Err(e) => Err(e.into()),
                }
            }

            async fn get(&self, kind: &str, account: &str, id: &str) -> Result<Option<Record>> {
                let row = sqlx::query("SELECT * FROM objects WHERE kind = $1 AND account = $2 AND id = $3")
                    .bind(kind)
                    .bind(account)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(Self::record).transpose()
            }

            async fn list(&self, kind: &str, account: &str) -> Result<Vec<Record>> {
                let rows = sqlx::query("SELECT * FROM objects WHERE kind = $1 AND account = $2 ORDER BY id")
                    .bind(kind)
                    .bind(account)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(Self::record).collect()
            }

            async fn list_all(&self, kind: &str) -> Result<Vec<Record>> {
                let rows = sqlx::query("SELECT * FROM objects WHERE kind = $1 ORDER BY account, id")
                    .bind(kind)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(Self::record).collect()
            }

            async fn update(
                &self,
                kind: &str,
                account: &str,
                id: &str,
                expected_version: i64,
                body: &str,
            ) -> Result<Record> {
                let now = micros(Utc::now());
                let row = sqlx::query(
                    "UPDATE objects SET body = $1, version = version + 1, update_us = $2 \
                     WHERE kind = $3 AND account = $4 AND id = $5 AND version = $6 RETURNING *",
                )
                .bind(body)
                .bind(now)
                .bind(kind)
                .bind(account)
                .bind(id)
                .bind(expected_version)
                .fetch_optional(&self.pool)
                .await?;
                match row {
                    Some(row) => Self::record(&row),
                    None => {
                        let key = (kind.to_string(), account.to_string(), id.to_string());
                        if self.get(kind, account, id).await?.is_some() {
                            Err(StoreError::Conflict { kind: key.0, account: key.1, id: key.2 })
                        } else {
                            Err(StoreError::NotFound { kind: key.0, account: key.1, id: key.2 })
                        }
                    }
                }
            }

            async fn delete(&self, kind: &str, account: &str, id: &str, expected_version: Option<i64>) -> Result<bool> {
                let res = match expected_version {
                    Some(v) => {
                        sqlx::query("DELETE FROM objects WHERE kind = $1 AND account = $2 AND id = $3 AND version = $4")
                            .bind(kind)
                            .bind(account)
                            .bind(id)
                            .bind(v)
                            .execute(&self.pool)
                            .await?
                    }
                    None => {
                        sqlx::query("DELETE FROM objects WHERE kind = $1 AND account = $2 AND id = $3")
                            .bind(kind)
                            .bind(account)
                            .bind(id)
                            .execute(&self.pool)
                            .await?
                    }
                };
                Ok(res.rows_affected() > 0)
            }

            async fn ensure_account(&self, account: &str) -> Result<bool> {
                let res = sqlx::query("INSERT INTO accounts (id, create_us) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(account)
                    .bind(micros(Utc::now()))
                    .execute(&self.pool)
                    .await?;
                Ok(res.rows_affected() > 0)
            }

            async fn account_exists(&self, account: &str) -> Result<bool> {
                let row = sqlx::query("SELECT id FROM accounts WHERE id = $1")
                    .bind(account)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.is_some())
            }

            async fn ensure_api_key(&self, key_hash: &str, account: &str) -> Result<String> {
                sqlx::query(
                    "INSERT INTO api_keys (key_hash, account, create_us) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(key_hash)
                .bind(account)
                .bind(micros(Utc::now()))
                .execute(&self.pool)
                .await?;
                let row = sqlx::query("SELECT account FROM api_keys WHERE key_hash = $1")
                    .bind(key_hash)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(row.try_get("account")?)
            }

            async fn api_key(&self, key_hash: &str) -> Result<Option<KeyRecord>> {
                let row = sqlx::query(
                    "SELECT key_hash, account, user_id, key_id, expire_us, body, create_us FROM api_keys \
                     WHERE key_hash = $1",
                )
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(Self::key_record).transpose()
            }

            async fn insert_api_key(&self, key: &KeyRecord) -> Result<KeyRecord> {
                let now = Utc::now();
                let res = sqlx::query(
                    "INSERT INTO api_keys (key_hash, account, user_id, key_id, expire_us, body, create_us) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&key.key_hash)
                .bind(&key.account)
                .bind(&key.user)
                .bind(&key.key_id)
                .bind(key.expire_time.map(micros))
                .bind(&key.body)
                .bind(micros(now))
                .execute(&self.pool)
                .await;
                match res {
                    Ok(_) => Ok(KeyRecord { create_time: from_micros(micros(now)), ..key.clone() }),
                    Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists {
                        kind: "apiKey".to_string(),
                        account: key.account.clone(),
                        id: key.key_id.clone().unwrap_or_default(),
                    }),
                    Err(e) => Err(e.into()),
                }
            }

            async fn list_api_keys(&self, account: &str, user: &str) -> Result<Vec<KeyRecord>> {
                let rows = sqlx::query(
                    "SELECT key_hash, account, user_id, key_id, expire_us, body, create_us FROM api_keys \
                     WHERE account = $1 AND user_id = $2 ORDER BY key_id",
                )
                .bind(account)
                .bind(user)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::key_record).collect()
            }

            async fn delete_api_key(&self, account: &str, user: &str, key_id: &str) -> Result<bool> {
                let res = sqlx::query("DELETE FROM api_keys WHERE account = $1 AND user_id = $2 AND key_id = $3")
                    .bind(account)
                    .bind(user)
                    .bind(key_id)
                    .execute(&self.pool)
                    .await?;
                Ok(res.rows_affected() > 0)
            }

            async fn secret_or_init(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
                sqlx::query("INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(name)
                    .bind(candidate)
                    .execute(&self.pool)
                    .await?;
                let row =
                    sqlx::query("SELECT value FROM secrets WHERE name = $1").bind(name).fetch_one(&self.pool).await?;
                Ok(row.try_get("value")?)
            }
        }
    };
}

impl_store!(SqliteStore, sqlx::sqlite::SqliteRow);
impl_store!(PgStore, sqlx::postgres::PgRow);
