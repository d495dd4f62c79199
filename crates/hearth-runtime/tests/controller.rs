//! The controller over many deployments, in real time, with fakes of the runtime and the
//! replicas: one deployment's trouble (a hung replica, an unreadable record) holds up no other,
//! and a user's changes and the reconciler's writes never overwrite each other.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, World, ACCOUNT};
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
