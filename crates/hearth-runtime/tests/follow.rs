//! Two gateways on one store over shared replicas (pods), each with its own controller and
//! fleet, over fakes of the runtime and the replicas. In a binary of its own: the timing
//! scenarios of `controller.rs` must not share the machine with it.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, World, ACCOUNT};
use hearth_runtime::Controller;
use serde_json::json;

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
