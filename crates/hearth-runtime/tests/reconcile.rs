//! The reconciler, one deployment at a time, over fakes of the runtime, the replicas and the
//! clock and a real control plane on SQLite: no processes, no HTTP, no sleeps. Each case is a
//! list of steps (what the user does through the API, what happens to replicas, time passing,
//! reconciles) and what must hold after them.

mod common;

use std::time::Duration;

use common::{World, ACCOUNT};
use hearth_runtime::reconcile::error_policy;
use hearth_runtime::{reconcile, Action};
use serde_json::{json, Value};

/// One thing that happens in a scenario. Deployments are named by id; `D` is the default.
#[derive(Debug, Clone)]
enum Step {
    /// Creates deployment `D` with these fields (the base model is filled in).
    Create(Value),
    /// PATCHes deployment `D`.
    Update(Value),
    Scale(i32),
    Delete,
    Undelete,
    /// Loads addon model `a` or `b` onto `D` (the id is remembered under the model's name).
    LoadAddon(&'static str),
    /// Replicas named by the runtime refuse adapter `model` with `message`.
    RefuseAdapter(&'static str, &'static str),
    /// One reconcile of `D`, which must succeed with this action.
    Reconcile(Action),
    /// One reconcile of `D` that must fail with a message containing this; the error policy
    /// then runs, as the controller would run it.
    ReconcileFails(&'static str),
    /// Starting replicas become healthy.
    Ready,
    /// Starting replicas exit before they are ready.
    FailStarting(&'static str),
    /// The first serving replica's process dies.
    Crash,
    /// A request arrives, and stays in flight on a replica while held.
    Hold,
    Release,
    /// A request arrives and finds no ready replica (it waits).
    Wait,
    Advance(Duration),
    /// Junk is written over `D`'s stored spec.
    Corrupt,
    /// The store refuses writes (true) or accepts them again (false).
    BreakStore(bool),
    /// The deployment as the API shows it has these fields (a subset of its JSON).
    Expect(Value),
    /// Replicas of `D` in the runtime: (ready, starting).
    Replicas(usize, usize),
    /// The addon of model `a`/`b` shows this state, and a status message containing the text.
    AddonIs(&'static str, &'static str, &'static str),
    /// Every serving replica holds exactly these adapters (model ids).
    ReplicasHold(&'static [&'static str]),
    /// Replicas refuse model version `version` with `message`.
    RefuseVersion(&'static str, &'static str),
    /// Every serving replica serves this model version.
    ReplicasServe(&'static str),
    /// The deployment's status message contains this.
    StatusSays(&'static str),
}

use Step::*;

const D: &str = "d";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

async fn run(steps: &[Step]) -> World {
    let w = World::new().await;
    let key = World::key(D);
    let mut addons = std::collections::HashMap::new();
    let mut held = Vec::new();
    let mut waiting = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let at = format!("step {i} ({step:?})");
        match step.clone() {
            Create(body) => {
                w.create(D, body).await;
            }
            Update(body) => {
                w.control.update_deployment(&w.who, ACCOUNT, D, &body, None).await.expect(&at);
            }
            Scale(n) => {
                let req = hearth_api::resources::ScaleDeploymentRequest { replica_count: Some(n) };
                w.control.scale_deployment(&w.who, ACCOUNT, D, req).await.expect(&at);
            }
            Delete => w.control.delete_deployment(&w.who, ACCOUNT, D, false, true).await.expect(&at),
            Undelete => {
                w.control.undelete_deployment(&w.who, ACCOUNT, D).await.expect(&at);
            }
            LoadAddon(model) => {
                addons.insert(model, w.load_addon(D, model).await);
            }
            RefuseAdapter(model, message) => {
                w.replicas
                    .refuse
                    .lock()
                    .expect("lock")
                    .insert(format!("accounts/{ACCOUNT}/models/{model}"), message.into());
            }
            Reconcile(want) => {
                let got = reconcile(&w.ctx, &key).await.unwrap_or_else(|e| panic!("{at}: {e}"));
                assert_eq!(got, want, "{at}");
            }
            ReconcileFails(text) => {
                let e = reconcile(&w.ctx, &key).await.expect_err(&at);
                assert!(e.to_string().contains(text), "{at}: {e}");
                error_policy(&w.ctx, &key, &e, 1).await;
            }
            Ready => w.runtime.ready(),
            FailStarting(why) => w.runtime.fail_starting(why),
            Crash => {
                let ep = w.endpoints(D).first().cloned().expect(&at);
                w.runtime.crash(&ep);
            }
            Hold => {
                let name = key.name();
                w.ctx.fleet.touch_at(&name, hearth_runtime::Clock::now(&*w.clock));
                held.push(w.ctx.fleet.acquire(&name, &[], None, None).expect(&at));
            }
            Release => held.clear(),
            Wait => {
                let name = key.name();
                w.ctx.fleet.touch_at(&name, hearth_runtime::Clock::now(&*w.clock));
                waiting.push(w.ctx.fleet.wait_for(&name));
            }
            Advance(d) => w.clock.advance(d),
            Corrupt => {
                let rec = w.store.inner.get("deployments", ACCOUNT, D).await.expect(&at).expect(&at);
                w.store.inner.update("deployments", ACCOUNT, D, rec.version, "{not json").await.expect(&at);
            }
            BreakStore(broken) => w.store.fail_writes.store(broken, std::sync::atomic::Ordering::SeqCst),
            Expect(want) => {
                let got = w.get(D).await;
                assert!(contains(&got, &want), "{at}: {got:#} does not have {want}");
            }
            Replicas(ready, starting) => {
                let rs = w.runtime.of(&key.name());
                let count = |p: hearth_runtime::Phase| rs.iter().filter(|r| r.phase == p).count();
                assert_eq!(
                    (count(hearth_runtime::Phase::Ready), count(hearth_runtime::Phase::Starting)),
                    (ready, starting),
                    "{at}: {rs:?}"
                );
            }
            AddonIs(model, state, text) => {
                let got = w.addon(&addons[model]).await;
                assert_eq!(got["state"], json!(state), "{at}: {got:#}");
                let message = got["status"]["message"].as_str().unwrap_or("");
                assert!(message.contains(text), "{at}: {got:#}");
            }
            RefuseVersion(version, message) => {
                w.replicas.refuse.lock().expect("lock").insert(version.to_string(), message.into());
            }
            ReplicasServe(version) => {
                for ep in w.endpoints(D) {
                    let got = w.replicas.versions.lock().expect("lock").get(&ep).cloned();
                    assert_eq!(got.as_deref(), Some(version), "{at}: replica {ep}");
                }
            }
            StatusSays(text) => {
                let got = w.get(D).await;
                let message = got["status"]["message"].as_str().unwrap_or("");
                assert!(message.contains(text), "{at}: {got:#}");
            }
            ReplicasHold(models) => {
                let want: Vec<String> = models.iter().map(|m| format!("accounts/{ACCOUNT}/models/{m}")).collect();
                for ep in w.endpoints(D) {
                    assert_eq!(w.replicas.loaded(&ep), want, "{at}: replica {ep}");
                }
            }
        }
    }
    w
}

/// Whether `got` has every field of `want`, recursively through objects.
fn contains(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => w.iter().all(|(k, v)| g.get(k).is_some_and(|gv| contains(gv, v))),
        _ => got == want,
    }
}

#[tokio::test]
async fn created_to_ready() {
    run(&[
        Create(json!({"minReplicaCount": 2, "maxReplicaCount": 2})),
        Expect(json!({"state": "CREATING", "replicaCount": 0, "desiredReplicaCount": 2})),
        Reconcile(Action::Soon),
        Replicas(0, 2),
        Expect(json!({"state": "CREATING", "replicaStats": {"initializingReplicaCount": 2, "readyReplicaCount": 0}})),
        Ready,
        Reconcile(Action::Idle),
        Expect(json!({"state": "READY", "replicaCount": 2})),
        Replicas(2, 0),
        // Nothing changed: nothing more happens.
        Reconcile(Action::Idle),
        Replicas(2, 0),
    ])
    .await;
}

#[tokio::test]
async fn a_crashed_replica_is_replaced() {
    let w = run(&[
        Create(json!({"minReplicaCount": 1})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        Crash,
        Reconcile(Action::Soon),
        Replicas(0, 1),
        Expect(json!({"state": "READY", "replicaCount": 0})),
        Ready,
        Reconcile(Action::Idle),
        Expect(json!({"state": "READY", "replicaCount": 1})),
    ])
    .await;
    assert_eq!(w.runtime.started.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_model_that_cannot_load_fails_the_deployment_until_its_spec_changes() {
    run(&[
        Create(json!({"minReplicaCount": 1})),
        Reconcile(Action::Soon),
        FailStarting("Error: loading model.gguf: not a GGUF file"),
        Reconcile(Action::Idle),
        Expect(json!({"state": "FAILED", "status": {"code": "FAILED_PRECONDITION",
            "message": "the model could not be served: Error: loading model.gguf: not a GGUF file"}})),
        Replicas(0, 0),
        // A failed deployment starts nothing more...
        Reconcile(Action::Idle),
        Replicas(0, 0),
        // ...until it is changed (or undeleted): a new generation tries again.
        Update(json!({"displayName": "again"})),
        Expect(json!({"state": "CREATING"})),
        Reconcile(Action::Soon),
        Replicas(0, 1),
    ])
    .await;
}

#[tokio::test]
async fn a_rolling_update_brings_the_new_replicas_up_before_the_old_go() {
    run(&[
        Create(json!({"minReplicaCount": 1})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        // A change to what replicas run: UPDATING at once, as the API answers.
        Update(json!({"precision": "FP32"})),
        Expect(json!({"state": "UPDATING"})),
        Reconcile(Action::Soon),
        // The old replica serves while the new one starts.
        Replicas(1, 1),
        Expect(json!({"state": "UPDATING", "replicaCount": 1})),
        Ready,
        Reconcile(Action::Soon),
        // The old one drains (no request in flight: it stops at the next look).
        Reconcile(Action::Idle),
        Replicas(1, 0),
        Expect(json!({"state": "READY", "replicaCount": 1})),
    ])
    .await;
}

#[tokio::test]
async fn a_replica_scaled_away_drains_its_requests_first() {
    run(&[
        Create(json!({"minReplicaCount": 2, "maxReplicaCount": 2})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        // Two requests in flight, one on each replica (least loaded first).
        Hold,
        Hold,
        Update(json!({"minReplicaCount": 1, "maxReplicaCount": 1})),
        Reconcile(Action::Soon),
        // Out of the ready set, but still running while it has a request.
        Expect(json!({"replicaCount": 1})),
        Replicas(2, 0),
        Reconcile(Action::Soon),
        Replicas(2, 0),
        Release,
        Reconcile(Action::Idle),
        Replicas(1, 0),
    ])
    .await;
}

#[tokio::test]
async fn a_drain_ends_after_its_timeout_even_with_requests_in_flight() {
    run(&[
        Create(json!({"minReplicaCount": 1, "maxReplicaCount": 2})),
        Scale(2),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        Hold,
        Hold,
        Scale(1),
        Reconcile(Action::Soon),
        Advance(secs(59)),
        Reconcile(Action::Soon),
        Replicas(2, 0),
        Advance(secs(1)),
        Reconcile(Action::Idle),
        Replicas(1, 0),
    ])
    .await;
}

#[tokio::test]
async fn scale_to_zero_after_its_window_and_back_on_a_request() {
    run(&[
        Create(json!({"minReplicaCount": 0, "maxReplicaCount": 2,
            "autoscalingPolicy": {"scaleToZeroWindow": "120s", "scaleUpWindow": "10s", "scaleDownWindow": "60s"}})),
        Scale(1),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        Expect(json!({"state": "READY", "replicaCount": 1, "desiredReplicaCount": 1})),
        Hold,
        Release,
        // Used within the window: it stays.
        Advance(secs(119)),
        Reconcile(Action::Idle),
        Replicas(1, 0),
        // Idle for the whole window: down to zero at once (the replica leaves the ready set,
        // then stops).
        Advance(secs(1)),
        Reconcile(Action::Soon),
        Expect(json!({"desiredReplicaCount": 0, "replicaCount": 0})),
        Reconcile(Action::Idle),
        Replicas(0, 0),
        // A request waiting for a replica wakes it without a window.
        Wait,
        Reconcile(Action::Soon),
        Replicas(0, 1),
        Expect(json!({"desiredReplicaCount": 1})),
    ])
    .await;
}

#[tokio::test]
async fn scaling_up_waits_for_its_window() {
    run(&[
        // A target of 1.5 requests per replica (of its 64-sequence batch).
        Create(json!({"minReplicaCount": 1, "maxReplicaCount": 3,
            "autoscalingPolicy": {"scaleUpWindow": "30s", "loadTargets": {"default": 0.0234375}}})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        // Two requests in flight ask for two replicas at this target, but only once that held
        // for 30s.
        Hold,
        Hold,
        Reconcile(Action::Idle),
        Advance(secs(29)),
        Reconcile(Action::Idle),
        Replicas(1, 0),
        Advance(secs(1)),
        Reconcile(Action::Soon),
        Replicas(1, 1),
        Expect(json!({"desiredReplicaCount": 2})),
    ])
    .await;
}

#[tokio::test]
async fn addons_reach_every_replica_and_replicas_started_later() {
    run(&[
        Create(json!({"minReplicaCount": 1, "maxReplicaCount": 2, "enableAddons": true})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        LoadAddon("a"),
        LoadAddon("b"),
        AddonIs("a", "DEPLOYING", ""),
        Reconcile(Action::Idle),
        AddonIs("a", "DEPLOYED", ""),
        AddonIs("b", "DEPLOYED", ""),
        ReplicasHold(&["a", "b"]),
        // A second replica gets both as soon as it is ready.
        Scale(2),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        Expect(json!({"replicaCount": 2})),
        ReplicasHold(&["a", "b"]),
        AddonIs("b", "DEPLOYED", ""),
    ])
    .await;
}

#[tokio::test]
async fn a_refused_adapter_says_why_and_holds_up_nothing_else() {
    run(&[
        Create(json!({"minReplicaCount": 1, "enableAddons": true})),
        Reconcile(Action::Soon),
        Ready,
        RefuseAdapter("a", "module(s) query_key_value are not projections of the llama architecture"),
        LoadAddon("a"),
        LoadAddon("b"),
        Reconcile(Action::Idle),
        AddonIs("a", "DEPLOYING", "query_key_value"),
        AddonIs("b", "DEPLOYED", ""),
        Expect(json!({"state": "READY"})),
        ReplicasHold(&["b"]),
    ])
    .await;
}

#[tokio::test]
async fn an_unreadable_record_leaves_its_replicas_running_and_says_why() {
    run(&[
        Create(json!({"minReplicaCount": 1})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        Corrupt,
        ReconcileFails("unreadable"),
        // Its replica was not touched, and the API shows why nothing else can be.
        Replicas(1, 0),
        Expect(json!({"state": "READY", "status": {"code": "DATA_LOSS"}})),
        ReconcileFails("unreadable"),
        Replicas(1, 0),
    ])
    .await;
}

#[tokio::test]
async fn a_failed_store_write_is_retried_and_then_clears() {
    let w = run(&[
        Create(json!({"minReplicaCount": 1})),
        Reconcile(Action::Soon),
        Ready,
        BreakStore(true),
        ReconcileFails("database is unavailable"),
        BreakStore(false),
        Reconcile(Action::Idle),
        Expect(json!({"state": "READY", "replicaCount": 1})),
    ])
    .await;
    let status = w.get(D).await["status"].clone();
    assert!(status.is_null(), "a success clears the error: {status}");
}

#[tokio::test]
async fn delete_stops_everything_and_undelete_starts_from_the_minimum() {
    run(&[
        Create(json!({"minReplicaCount": 1, "maxReplicaCount": 3})),
        Scale(3),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        Replicas(3, 0),
        Delete,
        Expect(json!({"state": "DELETED", "desiredReplicaCount": 0})),
        Reconcile(Action::Idle),
        Replicas(0, 0),
        Undelete,
        Expect(json!({"state": "CREATING", "desiredReplicaCount": 1})),
        Reconcile(Action::Soon),
        Replicas(0, 1),
        Ready,
        Reconcile(Action::Idle),
        Expect(json!({"state": "READY", "replicaCount": 1})),
    ])
    .await;
}

#[tokio::test]
async fn a_purged_deployment_has_its_replicas_stopped() {
    let w =
        run(&[Create(json!({"minReplicaCount": 1})), Reconcile(Action::Soon), Ready, Reconcile(Action::Idle)]).await;
    w.control.delete_deployment(&w.who, ACCOUNT, D, true, false).await.expect("hard delete");
    assert_eq!(reconcile(&w.ctx, &World::key(D)).await.expect("reconcile"), Action::Forget);
    assert!(w.runtime.all().is_empty());
    assert!(w.endpoints(D).is_empty());
}

#[tokio::test]
async fn merged_mode_merges_the_one_addon_into_each_replica() {
    let w = run(&[
        Create(json!({"minReplicaCount": 1, "enableHotReloadLatestAddon": true})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
    ])
    .await;
    let dm = hearth_api::resources::DeployedModel {
        model: Some(format!("accounts/{ACCOUNT}/models/a")),
        deployment: Some(format!("accounts/{ACCOUNT}/deployments/{D}")),
        ..Default::default()
    };
    w.control.create_deployed_model(&w.who, ACCOUNT, dm, true).await.expect("merge a");
    assert_eq!(reconcile(&w.ctx, &World::key(D)).await.expect("reconcile"), Action::Idle);
    let ep = w.endpoints(D)[0].clone();
    assert_eq!(w.replicas.merged(&ep).as_deref(), Some("accounts/acme/models/a"));
    assert!(w.replicas.loaded(&ep).is_empty());
}

#[tokio::test]
async fn a_scaling_schedule_raises_the_minimum_while_it_is_active() {
    // The fake calendar starts at 1970-01-01 00:00 UTC; the schedule keeps 2 replicas from
    // 01:00 for 10 minutes every day.
    run(&[
        Create(json!({"minReplicaCount": 0, "maxReplicaCount": 2,
            "autoscalingPolicy": {"scalingSchedules": {"nightly": {
                "schedule": "0 1 * * *", "duration": "600s", "timezone": "UTC", "minReplicaCount": 2}}}})),
        Reconcile(Action::Idle),
        Replicas(0, 0),
        Advance(secs(3599)),
        Reconcile(Action::Idle),
        Replicas(0, 0),
        // 01:00: raised at once, no window to wait for.
        Advance(secs(1)),
        Reconcile(Action::Soon),
        Replicas(0, 2),
        Ready,
        Reconcile(Action::Idle),
        Expect(json!({"desiredReplicaCount": 2, "replicaCount": 2,
            "autoscalingPolicy": {"scalingSchedules": {"nightly": {"schedule": "0 1 * * *", "duration": "600s"}}}})),
        Advance(secs(599)),
        Reconcile(Action::Idle),
        Replicas(2, 0),
        // 01:10: over; unused, the deployment falls back to its own minimum.
        Advance(secs(1)),
        Reconcile(Action::Soon),
        Expect(json!({"desiredReplicaCount": 0})),
    ])
    .await;
}

#[tokio::test]
async fn a_model_version_reaches_every_replica_in_place_and_one_that_cannot_serve_says_why() {
    // A bucket whose folders are small Hugging Face models from the engine's fixtures: the
    // reconciler checks a version's files as an upload is checked; the fake replicas take it.
    let bucket_dir = tempfile::tempdir().expect("a temp dir");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hearth-engine/tests/fixtures");
    for (version, from) in [("v1", "tiny_llama"), ("v2", "tiny_qwen2"), ("v3", "tiny_llama3")] {
        let dir = bucket_dir.path().join(version);
        std::fs::create_dir(&dir).expect("mkdir");
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixtures.join(from).join(f), dir.join(f)).expect("copy");
        }
    }
    let bucket = format!("file://{}", bucket_dir.path().display());
    run(&[
        Create(json!({"minReplicaCount": 2, "maxReplicaCount": 2, "enableHotLoad": true,
                      "hotLoadBucketUrl": bucket, "targetModelVersion": "v1"})),
        Reconcile(Action::Soon),
        Ready,
        Reconcile(Action::Idle),
        Expect(json!({"state": "READY", "activeModelVersion": "v1", "targetModelVersion": "v1"})),
        ReplicasServe("v1"),
        // Refused by the replicas: the old version serves on, no replica restarts, and the
        // status says why until the target changes.
        RefuseVersion("v2", "its tokenizer is not the one serving"),
        Update(json!({"targetModelVersion": "v2"})),
        Reconcile(Action::Idle),
        Expect(json!({"activeModelVersion": "v1", "status": {"code": "FAILED_PRECONDITION"}})),
        StatusSays("its tokenizer is not the one serving"),
        StatusSays("version v1 goes on serving"),
        ReplicasServe("v1"),
        Replicas(2, 0),
        Reconcile(Action::Idle),
        StatusSays("v2"),
        // Not in the bucket.
        Update(json!({"targetModelVersion": "missing"})),
        Reconcile(Action::Idle),
        StatusSays("missing"),
        Expect(json!({"activeModelVersion": "v1"})),
        // A good one clears the problem.
        Update(json!({"targetModelVersion": "v3"})),
        Reconcile(Action::Idle),
        Expect(json!({"activeModelVersion": "v3", "state": "READY"})),
        ReplicasServe("v3"),
        StatusSays(""),
        Replicas(2, 0),
    ])
    .await;
}
