//! Read-modify-write under contention: a writer that always loses the race gets ABORTED after
//! its retries, never overwrites the winner, and a writer that loses once succeeds on retry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use hearth_api::resources::CreateModelRequest;
use hearth_api::Code;
use hearth_control::{ArtifactStore, ControlConfig, ControlPlane, Principal};
use hearth_store::{Record, Result, Store};
use serde_json::json;

/// A real SQLite store with a rival writer: before each of the first `interfere` updates it
/// lets the rival write the same record, so the caller's version is stale.
struct Contended {
    inner: Arc<dyn Store>,
    interfere: AtomicUsize,
}

#[async_trait]
impl Store for Contended {
    async fn insert(&self, kind: &str, account: &str, id: &str, body: &str) -> Result<Record> {
        self.inner.insert(kind, account, id, body).await
    }
    async fn get(&self, kind: &str, account: &str, id: &str) -> Result<Option<Record>> {
        self.inner.get(kind, account, id).await
    }
    async fn list(&self, kind: &str, account: &str) -> Result<Vec<Record>> {
        self.inner.list(kind, account).await
    }
    async fn list_all(&self, kind: &str) -> Result<Vec<Record>> {
        self.inner.list_all(kind).await
    }
    async fn update(&self, kind: &str, account: &str, id: &str, expected: i64, body: &str) -> Result<Record> {
        if self.interfere.load(Ordering::SeqCst) > 0 {
            self.interfere.fetch_sub(1, Ordering::SeqCst);
            let current = self.inner.get(kind, account, id).await?.expect("record exists");
            self.inner.update(kind, account, id, current.version, &current.body).await?;
        }
        self.inner.update(kind, account, id, expected, body).await
    }
    async fn delete(&self, kind: &str, account: &str, id: &str, expected: Option<i64>) -> Result<bool> {
        self.inner.delete(kind, account, id, expected).await
    }
    async fn ensure_account(&self, account: &str) -> Result<bool> {
        self.inner.ensure_account(account).await
    }
    async fn account_exists(&self, account: &str) -> Result<bool> {
        self.inner.account_exists(account).await
    }
    async fn ensure_api_key(&self, key_hash: &str, account: &str) -> Result<String> {
        self.inner.ensure_api_key(key_hash, account).await
    }
    async fn api_key(&self, key_hash: &str) -> Result<Option<hearth_store::KeyRecord>> {
        self.inner.api_key(key_hash).await
    }
    async fn insert_api_key(&self, key: &hearth_store::KeyRecord) -> Result<hearth_store::KeyRecord> {
        self.inner.insert_api_key(key).await
    }
    async fn list_api_keys(&self, account: &str, user: &str) -> Result<Vec<hearth_store::KeyRecord>> {
        self.inner.list_api_keys(account, user).await
    }
    async fn delete_api_key(&self, account: &str, user: &str, key_id: &str) -> Result<bool> {
        self.inner.delete_api_key(account, user, key_id).await
    }
    async fn secret_or_init(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        self.inner.secret_or_init(name, candidate).await
    }
}

async fn setup(interfere: usize) -> (tempfile::TempDir, Arc<Contended>, ControlPlane) {
    let dir = tempfile::tempdir().expect("tempdir");
    let inner = hearth_store::open(dir.path().join("db").to_str().expect("utf-8")).await.expect("store");
    let store = Arc::new(Contended { inner, interfere: AtomicUsize::new(0) });
    let cp = ControlPlane::new(store.clone(), ArtifactStore::new(dir.path().join("a")), ControlConfig::default())
        .await
        .expect("control plane");
    let who = Principal::admin("acme");
    let req: CreateModelRequest = serde_json::from_value(
        json!({"modelId": "m", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}, "displayName": "before"}}),
    )
    .expect("request");
    cp.create_model(&who, "acme", req).await.expect("create");
    store.interfere.store(interfere, Ordering::SeqCst);
    (dir, store, cp)
}

#[tokio::test]
async fn a_writer_that_always_loses_is_aborted_and_overwrites_nothing() {
    let (_dir, _store, cp) = setup(usize::MAX).await;
    let who = Principal::admin("acme");
    let err = cp.update_model(&who, "acme", "m", &json!({"displayName": "after"}), None).await.expect_err("aborted");
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.to_string().contains("retry"), "{err}");
    let got = cp.get_model(&who, "acme", "m", None).await.expect("get");
    assert_eq!(got["displayName"], "before");
}

#[tokio::test]
async fn a_writer_that_loses_once_succeeds_on_fresh_state() {
    let (_dir, store, cp) = setup(1).await;
    let who = Principal::admin("acme");
    let got = cp.update_model(&who, "acme", "m", &json!({"displayName": "after"}), None).await.expect("update");
    assert_eq!(got["displayName"], "after");
    assert_eq!(store.interfere.load(Ordering::SeqCst), 0, "the rival did write in between");
}

/// Requests racing for the last units of a quota get exactly the units left, on one gateway:
/// the check and the write it guards hold the account's admission lock together.
#[tokio::test]
async fn racing_creates_never_exceed_a_quota() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = hearth_store::open(dir.path().join("db").to_str().expect("utf-8")).await.expect("store");
    let mut quotas = hearth_control::quotas::QuotaLimits::default();
    quotas.set("models=5").expect("quota");
    let config = ControlConfig { quotas, ..ControlConfig::default() };
    let cp = ControlPlane::new(store, ArtifactStore::new(dir.path().join("a")), config).await.expect("control plane");
    let who = Principal::admin("acme");
    let creates = (0..20).map(|i| {
        let (cp, who) = (cp.clone(), who.clone());
        tokio::spawn(async move {
            let req: CreateModelRequest = serde_json::from_value(
                json!({"modelId": format!("m{i}"), "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}}),
            )
            .expect("request");
            cp.create_model(&who, "acme", req).await
        })
    });
    let results = futures_util::future::join_all(creates).await;
    let ok = results.iter().filter(|r| r.as_ref().expect("joined").is_ok()).count();
    let exhausted = results
        .iter()
        .filter(|r| r.as_ref().expect("joined").as_ref().is_err_and(|e| e.code() == Code::ResourceExhausted))
        .count();
    assert_eq!((ok, exhausted), (5, 15));
}
