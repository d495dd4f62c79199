//! The purge job removes soft-deleted deployments once their purge time has passed, and only
//! those.

use hearth_control::{ArtifactStore, ControlConfig, ControlPlane};
use serde_json::json;

#[tokio::test]
async fn only_deleted_deployments_past_their_purge_time_are_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = hearth_store::open(dir.path().join("db").to_str().expect("utf-8")).await.expect("store");
    let cp = ControlPlane::new(store.clone(), ArtifactStore::new(dir.path().join("a")), ControlConfig::default())
        .await
        .expect("control plane");
    let past = "2020-01-01T00:00:00Z";
    let future = "2999-01-01T00:00:00Z";
    let docs = [
        ("due", json!({"baseModel": "accounts/a/models/m", "state": "DELETED", "deleteTime": past, "purgeTime": past})),
        (
            "later",
            json!({"baseModel": "accounts/a/models/m", "state": "DELETED", "deleteTime": past, "purgeTime": future}),
        ),
        ("live", json!({"baseModel": "accounts/a/models/m", "state": "CREATING", "purgeTime": past})),
    ];
    for (id, body) in &docs {
        store.insert("deployments", "a", id, &body.to_string()).await.expect("insert");
    }
    assert_eq!(cp.purge_expired_deployments().await.expect("purge"), 1);
    let left: Vec<String> = store.list("deployments", "a").await.expect("list").into_iter().map(|r| r.id).collect();
    assert_eq!(left, ["later", "live"]);
    assert_eq!(cp.purge_expired_deployments().await.expect("purge again"), 0);
}
