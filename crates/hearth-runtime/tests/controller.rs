//! The controller over many deployments, in real time, with fakes of the runtime and the
//! replicas: one deployment's trouble (a hung replica, an unreadable record) holds up no other,
//! and a user's changes and the reconciler's writes never overwrite each other.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{World, ACCOUNT};
use hearth_runtime::Controller;
use serde_json::{json, Value};

const LEASE: Duration = Duration::from_secs(30);

/// Starts the controller on `w` (replicas start healthy), holding the store's lease.
async fn start(w: &World, period: Duration) -> tokio::task::JoinHandle<()> {
    w.runtime.auto_ready.store(true, Ordering::SeqCst);
    w.control.hold_runtime_lease("test", LEASE).await.expect("lease");
    // The controller runs on real time; the fake clock only serves the scenario tests.
    let ctx = hearth_runtime::Context::new(
        w.control.clone(),
        w.runtime.clone(),
        w.replicas.clone(),
        w.ctx.fleet.clone(),
        Arc::new(hearth_runtime::SystemClock),
    );
    tokio::spawn(Controller::new(Arc::new(ctx), "test".to_string(), LEASE, period).run())
}

/// Polls `check` until it holds or `within` passes; returns how long it took.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if check().await {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_holds_up_only_its_own_deployment() {
    let w = World::new().await;
    const N: usize = 100;
    let mut dms = Vec::new();
    for i in 0..N {
        let id = format!("d{i:03}");
        w.create(&id, json!({"minReplicaCount": 1, "enableAddons": true})).await;
        dms.push((id.clone(), w.load_addon(&id, "a").await));
    }
    // Every call to d042's replica takes 30 s and then times out.
    w.replicas.hang.lock().expect("lock").insert("fake://d042/".to_string());
    *w.replicas.hang_for.lock().expect("lock") = Duration::from_secs(30);
    let controller = start(&w, Duration::from_secs(1)).await;

    let deployed = |id: &str| {
        let (control, who, id) = (w.control.clone(), w.who.clone(), id.to_string());
        async move {
            let d = control.get_deployed_model(&who, ACCOUNT, &id, None).await.expect("get");
            d["state"] == json!("DEPLOYED")
        }
    };
    let others: Vec<String> = dms.iter().filter(|(d, _)| d != "d042").map(|(_, dm)| dm.clone()).collect();
    let took = eventually(Duration::from_secs(10), || {
        let others = others.clone();
        let deployed = &deployed;
        async move {
            for dm in &others {
                if !deployed(dm).await {
                    return false;
                }
            }
            true
        }
    })
    .await
    .expect("the other 99 deployments got their addon");
    println!("99 deployments READY with their addon DEPLOYED in {:.2} s", took.as_secs_f64());
    assert!(took < Duration::from_secs(2), "took {took:?}: the hung replica held the others up");
    for (id, _) in dms.iter().filter(|(d, _)| d != "d042") {
        assert_eq!(w.get(id).await["state"], json!("READY"), "{id}");
    }
    let hung = &dms.iter().find(|(d, _)| d == "d042").expect("d042").1;
    assert!(!deployed(hung).await, "the hung replica's addon cannot be DEPLOYED");
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_record_stops_nothing_and_its_status_says_why() {
    let w = World::new().await;
    w.create("good", json!({"minReplicaCount": 1, "maxReplicaCount": 3})).await;
    w.create("bad", json!({"minReplicaCount": 1})).await;
    let controller = start(&w, Duration::from_millis(200)).await;
    let both_ready =
        || async { w.get("good").await["state"] == json!("READY") && w.get("bad").await["state"] == json!("READY") };
    eventually(Duration::from_secs(5), both_ready).await.expect("both READY");
    let bad_replicas = w.runtime.of("accounts/acme/deployments/bad");
    assert_eq!(bad_replicas.len(), 1);

    // Junk over the stored record, as a disk or a hand would leave it.
    let rec = w.store.inner.get("deployments", ACCOUNT, "bad").await.expect("get").expect("row");
    w.store.inner.update("deployments", ACCOUNT, "bad", rec.version, "\u{0}garbage").await.expect("corrupt");

    let says_why = || async {
        let d: Value = w.get("bad").await;
        d["status"]["code"] == json!("DATA_LOSS")
            && d["status"]["message"].as_str().is_some_and(|m| m.contains("unreadable"))
    };
    eventually(Duration::from_secs(5), says_why).await.expect("the status says why");
    // The other deployment still follows its spec...
    let scale = hearth_api::resources::ScaleDeploymentRequest { replica_count: Some(3) };
    w.control.scale_deployment(&w.who, ACCOUNT, "good", scale).await.expect("scale");
    eventually(Duration::from_secs(5), || async { w.get("good").await["replicaCount"] == json!(3) })
        .await
        .expect("the good deployment scaled");
    // ...and the corrupted one's replica was never stopped, several resyncs later.
    assert_eq!(w.runtime.of("accounts/acme/deployments/bad"), bad_replicas);
    assert!(!w.endpoints("bad").is_empty(), "still routed to");
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_changes_and_reconciler_writes_never_overwrite_each_other() {
    let w = World::new().await;
    w.create("d", json!({"minReplicaCount": 1, "maxReplicaCount": 4})).await;
    // A short period: the reconciler writes the status as often as it can meanwhile.
    let controller = start(&w, Duration::from_millis(10)).await;
    for i in 0..40 {
        let min = 1 + (i % 3);
        let body = json!({"displayName": format!("v{i}"), "minReplicaCount": min});
        w.control.update_deployment(&w.who, ACCOUNT, "d", &body, None).await.expect("update");
        let got = w.get("d").await;
        assert_eq!(got["displayName"], json!(format!("v{i}")), "update {i} was overwritten: {got:#}");
        assert_eq!(got["minReplicaCount"], json!(min), "update {i} was overwritten: {got:#}");
        if i % 5 == 0 {
            let req = hearth_api::resources::ScaleDeploymentRequest { replica_count: Some(4) };
            w.control.scale_deployment(&w.who, ACCOUNT, "d", req).await.expect("scale");
            assert_eq!(w.get("d").await["desiredReplicaCount"], json!(4), "scale {i} was overwritten");
        }
    }
    // The runtime catches up with the last one.
    let settled = || async {
        let d = w.get("d").await;
        d["state"] == json!("READY")
            && d["displayName"] == json!("v39")
            && d["replicaCount"] == d["desiredReplicaCount"]
    };
    eventually(Duration::from_secs(5), settled).await.expect("settled on the last update");
    controller.abort();
}

/// Two gateways on one store over shared replicas (pods): the lease holder reconciles, the
/// other follows, routing to what it sees and passing its waiting requests on; when the
/// holder dies the follower takes over and adopts the replicas, starting and stopping none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_routes_wakes_through_the_leader_and_takes_over_without_duplicates() {
    let w = World::new().await;
    w.runtime.auto_ready.store(true, Ordering::SeqCst);
    w.runtime.shared.store(true, Ordering::SeqCst);
    let lease = Duration::from_secs(1);
    let period = Duration::from_millis(100);
    let gateway = |holder: &str, fleet: Arc<hearth_runtime::Fleet>| {
        let ctx = hearth_runtime::Context::new(
            w.control.clone(),
            w.runtime.clone(),
            w.replicas.clone(),
            fleet,
            Arc::new(hearth_runtime::SystemClock),
        );
        tokio::spawn(Controller::new(Arc::new(ctx), holder.to_string(), lease, period).run())
    };
    let (fleet_a, fleet_b) = (w.ctx.fleet.clone(), Arc::new(hearth_runtime::Fleet::default()));
    w.control.hold_runtime_lease("a", lease).await.expect("a leads");
    let a = gateway("a", fleet_a.clone());
    let b = gateway("b", fleet_b.clone());

    w.create("one", json!({"minReplicaCount": 1})).await;
    let one = format!("accounts/{ACCOUNT}/deployments/one");
    eventually(Duration::from_secs(5), || async { fleet_b.ready_endpoints(&one).len() == 1 })
        .await
        .expect("the follower routes to the leader's replica");
    assert_eq!(fleet_a.ready_endpoints(&one), fleet_b.ready_endpoints(&one));

    // A request waits at the follower for a deployment at zero: the leader wakes it.
    w.create("zero", json!({"minReplicaCount": 0, "maxReplicaCount": 1})).await;
    let zero = format!("accounts/{ACCOUNT}/deployments/zero");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.runtime.of(&zero).is_empty(), "nothing asked for it yet");
    let waiting = fleet_b.wait_for(&zero);
    fleet_b.touch(&zero);
    fleet_b.kick();
    eventually(Duration::from_secs(5), || async { fleet_b.ready_endpoints(&zero).len() == 1 })
        .await
        .expect("woken by a request at the follower");
    drop(waiting);

    // The leader dies: the follower takes over within the lease and a period or two, and
    // starts or stops nothing that runs.
    let (started, stopped) = (w.runtime.started.load(Ordering::SeqCst), w.runtime.stopped.load(Ordering::SeqCst));
    a.abort();
    w.create("later", json!({"minReplicaCount": 1})).await;
    let later = format!("accounts/{ACCOUNT}/deployments/later");
    let took = eventually(Duration::from_secs(5), || async { w.runtime.of(&later).len() == 1 })
        .await
        .expect("the follower took over and acts");
    assert!(took < lease + period * 5, "{took:?}");
    tokio::time::sleep(period * 5).await;
    assert_eq!(w.runtime.started.load(Ordering::SeqCst), started + 1, "only the new deployment's replica");
    assert_eq!(w.runtime.stopped.load(Ordering::SeqCst), stopped, "nothing stopped");
    assert_eq!(w.runtime.of(&one).len(), 1);
    b.abort();
}
