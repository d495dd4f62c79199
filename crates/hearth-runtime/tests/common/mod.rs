//! Fakes of the reconciler's boundaries (the runtime, the replica API, the clock, a store
//! that can be made to fail) over a real control plane on a real SQLite file, and helpers to
//! drive the API as a user would.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_api::replica::{AdapterInfo, AdapterList, Health, LoadAdapterRequest, LoadFigures, LoadModelVersionRequest};
use hearth_control::deployments::CreateDeploymentOptions;
use hearth_control::observe::DeploymentKey;
use hearth_control::{ArtifactStore, ControlConfig, ControlPlane, Principal};
use hearth_runtime::{Clock, Context, Phase, Replica, ReplicaApi, ReplicaSpec, Result, Runtime, RuntimeError};
use hearth_store::{Record, Store};
use serde_json::{json, Value};

pub const ACCOUNT: &str = "acme";
pub const BASE: &str = "accounts/acme/models/base";

/// Replicas that exist only in memory: started `Starting`, moved by the test.
#[derive(Default)]
pub struct FakeRuntime {
    replicas: Mutex<Vec<Replica>>,
    next: AtomicUsize,
    pub started: AtomicUsize,
    pub stopped: AtomicUsize,
    /// Replicas start healthy (for runs of the whole controller).
    pub auto_ready: AtomicBool,
    /// Every gateway sees these replicas (as pods are).
    pub shared: AtomicBool,
}

impl FakeRuntime {
    pub fn all(&self) -> Vec<Replica> {
        self.replicas.lock().expect("lock").clone()
    }

    pub fn of(&self, deployment: &str) -> Vec<Replica> {
        self.all().into_iter().filter(|r| r.deployment == deployment).collect()
    }

    fn change(&self, f: impl Fn(&mut Replica)) {
        for r in self.replicas.lock().expect("lock").iter_mut() {
            f(r);
        }
    }

    /// Every replica still starting answers its health check now.
    pub fn ready(&self) {
        self.change(|r| {
            if r.phase == Phase::Starting {
                r.phase = Phase::Ready;
                r.was_ready = true;
            }
        });
    }

    /// Every replica still starting exits before it is ready, with `why`.
    pub fn fail_starting(&self, why: &str) {
        self.change(|r| {
            if r.phase == Phase::Starting {
                r.phase = Phase::Failed(why.to_string());
            }
        });
    }

    /// The replica `endpoint` exits after it was ready.
    pub fn crash(&self, endpoint: &str) {
        self.change(|r| {
            if r.endpoint == endpoint {
                r.phase = Phase::Failed("killed".to_string());
            }
        });
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    async fn start(&self, spec: &ReplicaSpec) -> Result<Replica> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let ready = self.auto_ready.load(Ordering::SeqCst);
        // The endpoint names the deployment, so a test can pick a deployment's replicas out.
        let id = spec.deployment.rsplit('/').next().unwrap_or_default();
        let r = Replica {
            id: format!("r{n}"),
            deployment: spec.deployment.clone(),
            fingerprint: spec.fingerprint(),
            endpoint: format!("fake://{id}/r{n}"),
            phase: if ready { Phase::Ready } else { Phase::Starting },
            was_ready: ready,
            load: None,
        };
        self.replicas.lock().expect("lock").push(r.clone());
        self.started.fetch_add(1, Ordering::SeqCst);
        Ok(r)
    }

    async fn stop(&self, id: &str) -> Result<()> {
        let mut all = self.replicas.lock().expect("lock");
        let before = all.len();
        all.retain(|r| r.id != id);
        if all.len() < before {
            self.stopped.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<Replica>> {
        Ok(self.all())
    }

    fn shared(&self) -> bool {
        self.shared.load(Ordering::SeqCst)
    }
}

/// Replicas' adapter registries in memory. Adapters named in `refuse` are refused with the
/// message given; replicas whose endpoint starts with an entry of `hang` take `hang_for` to
/// answer anything, then time out.
#[derive(Default)]
pub struct FakeReplicas {
    adapters: Mutex<HashMap<String, AdapterList>>,
    pub refuse: Mutex<HashMap<String, String>>,
    pub hang: Mutex<HashSet<String>>,
    pub hang_for: Mutex<Duration>,
    /// The model version each endpoint serves.
    pub versions: Mutex<HashMap<String, String>>,
}

impl FakeReplicas {
    pub fn loaded(&self, endpoint: &str) -> Vec<String> {
        let all = self.adapters.lock().expect("lock");
        let mut names: Vec<String> =
            all.get(endpoint).map(|l| l.adapters.iter().map(|a| a.name.clone()).collect()).unwrap_or_default();
        names.sort();
        names
    }

    pub fn merged(&self, endpoint: &str) -> Option<String> {
        self.adapters.lock().expect("lock").get(endpoint).and_then(|l| l.merged.as_ref().map(|m| m.name.clone()))
    }

    async fn answer(&self, endpoint: &str) -> Result<()> {
        if self.hang.lock().expect("lock").iter().any(|h| endpoint.starts_with(h.as_str())) {
            let wait = *self.hang_for.lock().expect("lock");
            tokio::time::sleep(wait).await;
            return Err(RuntimeError::Timeout { endpoint: endpoint.to_string(), seconds: wait.as_secs() });
        }
        Ok(())
    }

    fn info(name: &str) -> AdapterInfo {
        AdapterInfo {
            name: name.to_string(),
            version: "v1".to_string(),
            hot: false,
            modules_patched: 1,
            ranks: vec![8],
            target_modules: vec!["q_proj".to_string()],
            bytes: 1,
            requests: 0,
            tokens: 0,
        }
    }

    fn refused(&self, endpoint: &str, name: &str) -> Result<()> {
        match self.refuse.lock().expect("lock").get(name) {
            Some(m) => Err(RuntimeError::Refused { endpoint: endpoint.to_string(), status: 400, message: m.clone() }),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ReplicaApi for FakeReplicas {
    async fn health(&self, endpoint: &str) -> Result<Health> {
        self.answer(endpoint).await?;
        Ok(Health { status: "ok".to_string() })
    }

    async fn load_figures(&self, endpoint: &str) -> Result<LoadFigures> {
        self.answer(endpoint).await?;
        Ok(LoadFigures::default())
    }

    async fn adapters(&self, endpoint: &str) -> Result<AdapterList> {
        self.answer(endpoint).await?;
        Ok(self.adapters.lock().expect("lock").get(endpoint).cloned().unwrap_or_default())
    }

    async fn load_adapter(&self, endpoint: &str, req: &LoadAdapterRequest) -> Result<AdapterInfo> {
        self.answer(endpoint).await?;
        self.refused(endpoint, &req.lora_name)?;
        let mut all = self.adapters.lock().expect("lock");
        let list = all.entry(endpoint.to_string()).or_default();
        list.adapters.retain(|a| a.name != req.lora_name);
        list.adapters.push(Self::info(&req.lora_name));
        Ok(Self::info(&req.lora_name))
    }

    async fn unload_adapter(&self, endpoint: &str, name: &str) -> Result<()> {
        self.answer(endpoint).await?;
        let mut all = self.adapters.lock().expect("lock");
        all.entry(endpoint.to_string()).or_default().adapters.retain(|a| a.name != name);
        Ok(())
    }

    async fn merge_adapter(&self, endpoint: &str, req: &LoadAdapterRequest) -> Result<AdapterInfo> {
        self.answer(endpoint).await?;
        self.refused(endpoint, &req.lora_name)?;
        let mut all = self.adapters.lock().expect("lock");
        all.entry(endpoint.to_string()).or_default().merged = Some(Self::info(&req.lora_name));
        Ok(Self::info(&req.lora_name))
    }

    async fn unmerge_adapter(&self, endpoint: &str) -> Result<()> {
        self.answer(endpoint).await?;
        self.adapters.lock().expect("lock").entry(endpoint.to_string()).or_default().merged = None;
        Ok(())
    }

    async fn load_model_version(&self, endpoint: &str, req: &LoadModelVersionRequest) -> Result<()> {
        self.answer(endpoint).await?;
        self.refused(endpoint, &req.version)?;
        self.versions.lock().expect("lock").insert(endpoint.to_string(), req.version.clone());
        Ok(())
    }
}

/// Time that moves only when the test says: the instant and the calendar time together.
pub struct FakeClock(Mutex<(Instant, chrono::DateTime<chrono::Utc>)>);

impl FakeClock {
    pub fn new() -> FakeClock {
        FakeClock::at(chrono::DateTime::UNIX_EPOCH)
    }

    /// A clock whose calendar time starts at `wall`.
    pub fn at(wall: chrono::DateTime<chrono::Utc>) -> FakeClock {
        FakeClock(Mutex::new((Instant::now(), wall)))
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().expect("lock");
        t.0 += by;
        t.1 += chrono::Duration::from_std(by).expect("a test's step fits");
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.0.lock().expect("lock").0
    }

    fn wall(&self) -> chrono::DateTime<chrono::Utc> {
        self.0.lock().expect("lock").1
    }
}

/// A real store whose writes can be made to fail, as a database that went away would.
pub struct BreakableStore {
    pub inner: Arc<dyn Store>,
    pub fail_writes: AtomicBool,
}

impl BreakableStore {
    fn check(&self) -> hearth_store::Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(hearth_store::StoreError::Database(hearth_store::sqlx::Error::PoolTimedOut));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for BreakableStore {
    async fn insert(&self, kind: &str, account: &str, id: &str, body: &str) -> hearth_store::Result<Record> {
        self.check()?;
        self.inner.insert(kind, account, id, body).await
    }
    async fn get(&self, kind: &str, account: &str, id: &str) -> hearth_store::Result<Option<Record>> {
        self.inner.get(kind, account, id).await
    }
    async fn list(&self, kind: &str, account: &str) -> hearth_store::Result<Vec<Record>> {
        self.inner.list(kind, account).await
    }
    async fn list_all(&self, kind: &str) -> hearth_store::Result<Vec<Record>> {
        self.inner.list_all(kind).await
    }
    async fn update(&self, kind: &str, account: &str, id: &str, v: i64, body: &str) -> hearth_store::Result<Record> {
        self.check()?;
        self.inner.update(kind, account, id, v, body).await
    }
    async fn delete(&self, kind: &str, account: &str, id: &str, v: Option<i64>) -> hearth_store::Result<bool> {
        self.check()?;
        self.inner.delete(kind, account, id, v).await
    }
    async fn ensure_account(&self, account: &str) -> hearth_store::Result<bool> {
        self.inner.ensure_account(account).await
    }
    async fn account_exists(&self, account: &str) -> hearth_store::Result<bool> {
        self.inner.account_exists(account).await
    }
    async fn ensure_api_key(&self, key_hash: &str, account: &str) -> hearth_store::Result<String> {
        self.inner.ensure_api_key(key_hash, account).await
    }
    async fn api_key(&self, key_hash: &str) -> hearth_store::Result<Option<hearth_store::KeyRecord>> {
        self.inner.api_key(key_hash).await
    }
    async fn insert_api_key(&self, key: &hearth_store::KeyRecord) -> hearth_store::Result<hearth_store::KeyRecord> {
        self.inner.insert_api_key(key).await
    }
    async fn list_api_keys(&self, account: &str, user: &str) -> hearth_store::Result<Vec<hearth_store::KeyRecord>> {
        self.inner.list_api_keys(account, user).await
    }
    async fn delete_api_key(&self, account: &str, user: &str, key_id: &str) -> hearth_store::Result<bool> {
        self.inner.delete_api_key(account, user, key_id).await
    }
    async fn secret_or_init(&self, name: &str, candidate: &[u8]) -> hearth_store::Result<Vec<u8>> {
        self.inner.secret_or_init(name, candidate).await
    }
}

/// A control plane on a fresh SQLite file with a READY base model and two READY addons of it
/// (`a` and `b`), and a reconciler context over fakes.
pub struct World {
    pub _dir: tempfile::TempDir,
    pub store: Arc<BreakableStore>,
    pub control: ControlPlane,
    pub runtime: Arc<FakeRuntime>,
    pub replicas: Arc<FakeReplicas>,
    pub clock: Arc<FakeClock>,
    pub ctx: Arc<Context>,
    pub who: Principal,
}

impl World {
    pub async fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = hearth_store::open(dir.path().join("db").to_str().expect("utf-8")).await.expect("store");
        // Models as an older hearth wrote them (the API's JSON): the control plane upgrades
        // them at start, as it would an existing database.
        inner
            .insert(
                "models",
                ACCOUNT,
                "base",
                &json!({"model": {"kind": "HF_BASE_MODEL", "state": "READY"}}).to_string(),
            )
            .await
            .expect("base");
        for addon in ["a", "b"] {
            let row = json!({"model": {"kind": "HF_PEFT_ADDON", "state": "READY", "peftDetails": {"baseModel": BASE}}});
            inner.insert("models", ACCOUNT, addon, &row.to_string()).await.expect("addon");
        }
        let store = Arc::new(BreakableStore { inner, fail_writes: AtomicBool::new(false) });
        // The reconciler's tests run more deployments than the default quotas allow one account.
        let mut quotas = hearth_control::quotas::QuotaLimits::default();
        for q in ["deployments=100000", "replicas=100000"] {
            quotas.set(q).expect("a quota setting");
        }
        let config = ControlConfig {
            min_scale_to_zero_window: Duration::from_secs(60),
            quotas,
            // The hot-load tests' buckets are temporary directories.
            hot_load_dirs: vec![std::env::temp_dir()],
            ..ControlConfig::default()
        };
        let control = ControlPlane::new(store.clone(), ArtifactStore::new(dir.path().join("artifacts")), config)
            .await
            .expect("control plane");
        let runtime = Arc::new(FakeRuntime::default());
        let replicas = Arc::new(FakeReplicas::default());
        let clock = Arc::new(FakeClock::new());
        let fleet = Arc::new(hearth_runtime::Fleet::default());
        let ctx = Arc::new(Context::new(control.clone(), runtime.clone(), replicas.clone(), fleet, clock.clone()));
        World { _dir: dir, store, control, runtime, replicas, clock, ctx, who: Principal::admin(ACCOUNT.to_string()) }
    }

    pub fn key(id: &str) -> DeploymentKey {
        DeploymentKey::new(ACCOUNT, id)
    }

    pub async fn create(&self, id: &str, body: Value) -> Value {
        let mut body = body;
        body["baseModel"] = json!(BASE);
        let d = serde_json::from_value(body).expect("a deployment body");
        let opts = CreateDeploymentOptions { deployment_id: Some(id.to_string()), ..Default::default() };
        let created = self.control.create_deployment(&self.who, ACCOUNT, opts, d).await.expect("create");
        serde_json::to_value(created).expect("json")
    }

    pub async fn get(&self, id: &str) -> Value {
        self.control.get_deployment(&self.who, ACCOUNT, id, None).await.expect("get")
    }

    pub async fn load_addon(&self, deployment: &str, addon: &str) -> String {
        let dm = hearth_api::resources::DeployedModel {
            model: Some(format!("accounts/{ACCOUNT}/models/{addon}")),
            deployment: Some(format!("accounts/{ACCOUNT}/deployments/{deployment}")),
            ..Default::default()
        };
        let created = self.control.create_deployed_model(&self.who, ACCOUNT, dm, false).await.expect("load addon");
        created.name.expect("a name").rsplit('/').next().expect("an id").to_string()
    }

    pub async fn addon(&self, id: &str) -> Value {
        self.control.get_deployed_model(&self.who, ACCOUNT, id, None).await.expect("get addon")
    }

    pub fn endpoints(&self, deployment: &str) -> Vec<String> {
        self.ctx.fleet.ready_endpoints(&format!("accounts/{ACCOUNT}/deployments/{deployment}"))
    }
}

/// Polls `check` until it holds or `within` passes; returns how long it took.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = std::time::Instant::now();
    while t0.elapsed() < within {
        if check().await {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
