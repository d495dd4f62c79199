//! Rows written by an older hearth still read, and are upgraded in place at start: the API's
//! JSON (schema 0, spec and status in one row, fields since renamed or dropped) becomes a
//! spec row and a status row, and every resource reads as it did.

use hearth_control::{ArtifactStore, ControlConfig, ControlPlane, ListRequest, Principal};
use serde_json::{json, Value};

#[tokio::test]
async fn schema_0_rows_read_and_are_split_into_spec_and_status_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = hearth_store::open(dir.path().join("db").to_str().expect("utf-8")).await.expect("store");
    let rows = [
        (
            "models",
            "base",
            json!({"model": {"kind": "HF_BASE_MODEL", "state": "READY", "displayName": "Base",
            "contextLength": 8192, "baseModelDetails": {"parameterCount": "134515008", "checkpointFormat": "NATIVE"}},
            "announced": {"model.gguf": 1}, "base": null, "adapter": null}),
        ),
        (
            "models",
            "lora",
            json!({"model": {"kind": "HF_PEFT_ADDON", "state": "READY",
            "peftDetails": {"baseModel": "accounts/a/models/base", "r": 8, "targetModules": ["q_proj"]}}}),
        ),
        (
            "deployments",
            "up",
            json!({"baseModel": "accounts/a/models/base", "state": "READY", "minReplicaCount": 1,
            "maxReplicaCount": 2, "desiredReplicaCount": 2, "replicaCount": 2, "enableAddons": true,
            "replicaStats": {"readyReplicaCount": 2, "initializingReplicaCount": 0},
            "acceleratorType": "NVIDIA_H100_80GB", "forTraining": false,
            "autoscalingPolicy": {"scaleUpWindow": "30s", "scaleDownWindow": "600s", "scaleToZeroWindow": "3600s",
                                  "loadTargets": {"default": 0.8}}}),
        ),
        (
            "deployments",
            "broken",
            json!({"baseModel": "accounts/a/models/base", "state": "FAILED",
            "status": {"code": "FAILED_PRECONDITION", "message": "the model could not be served: out of memory"},
            "minReplicaCount": 1, "maxReplicaCount": 1}),
        ),
        (
            "deployedModels",
            "0000abcd",
            json!({"model": "accounts/a/models/lora", "deployment": "accounts/a/deployments/up",
            "default": true, "state": "DEPLOYED", "serverless": false}),
        ),
    ];
    for (kind, id, body) in &rows {
        store.insert(kind, "a", id, &body.to_string()).await.expect("insert");
    }
    let cp = ControlPlane::new(store.clone(), ArtifactStore::new(dir.path().join("a")), ControlConfig::default())
        .await
        .expect("control plane");
    let who = Principal::admin("a");

    let up: Value = cp.get_deployment(&who, "a", "up", None).await.expect("get up");
    assert_eq!(up["state"], "READY");
    assert_eq!((up["replicaCount"].clone(), up["desiredReplicaCount"].clone()), (json!(2), json!(2)));
    assert_eq!(up["acceleratorType"], "NVIDIA_H100_80GB");
    assert_eq!(up["autoscalingPolicy"]["scaleUpWindow"], "30s");
    let broken: Value = cp.get_deployment(&who, "a", "broken", None).await.expect("get broken");
    assert_eq!(broken["state"], "FAILED");
    assert_eq!(broken["status"]["message"], "the model could not be served: out of memory");
    let dm: Value = cp.get_deployed_model(&who, "a", "0000abcd", None).await.expect("get dm");
    assert_eq!((dm["state"].clone(), dm["default"].clone()), (json!("DEPLOYED"), json!(true)));
    let base: Value = cp.get_model(&who, "a", "base", None).await.expect("get model");
    assert_eq!(base["displayName"], "Base");
    assert_eq!(base["baseModelDetails"]["parameterCount"], "134515008");
    let listed = cp.list_deployments(&who, "a", &ListRequest::default()).await.expect("list");
    assert_eq!(listed.items.len(), 2);

    // The rows are upgraded: schema 1 specs beside status rows.
    for (kind, id) in
        [("deployments", "up"), ("deployments", "broken"), ("deployedModels", "0000abcd"), ("models", "base")]
    {
        let body: Value =
            serde_json::from_str(&store.get(kind, "a", id).await.expect("get").expect("row").body).expect("json");
        assert_eq!(body["schema"], 1, "{kind}/{id}: {body}");
    }
    assert!(store.get("deploymentStatus", "a", "broken").await.expect("get").is_some());
    assert!(store.get("deployedModelStatus", "a", "0000abcd").await.expect("get").is_some());

    // Starting again changes nothing more.
    let before = store.get("deployments", "a", "up").await.expect("get").expect("row").version;
    ControlPlane::new(store.clone(), ArtifactStore::new(dir.path().join("a")), ControlConfig::default())
        .await
        .expect("second start");
    assert_eq!(store.get("deployments", "a", "up").await.expect("get").expect("row").version, before);
}

#[tokio::test]
async fn one_unreadable_row_does_not_fail_a_listing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = hearth_store::open(dir.path().join("db").to_str().expect("utf-8")).await.expect("store");
    let cp = ControlPlane::new(store.clone(), ArtifactStore::new(dir.path().join("a")), ControlConfig::default())
        .await
        .expect("control plane");
    store
        .insert("deployments", "a", "fine", &json!({"schema": 1, "baseModel": "accounts/a/models/m"}).to_string())
        .await
        .expect("insert");
    store.insert("deployments", "a", "junk", "\u{0}not json").await.expect("insert");
    let who = Principal::admin("a");
    let listed = cp.list_deployments(&who, "a", &ListRequest::default()).await.expect("the listing works");
    assert_eq!(listed.items.len(), 2);
    let junk: Value = cp.get_deployment(&who, "a", "junk", None).await.expect("get works");
    assert_eq!(junk["status"]["code"], "DATA_LOSS");
    // A hard delete still removes it.
    cp.delete_deployment(&who, "a", "junk", true, false).await.expect("hard delete");
    assert!(store.get("deployments", "a", "junk").await.expect("get").is_none());
}
