//! The gateway through its real router over a real SQLite store: every google.rpc code the API
//! produces, with its HTTP status, and the stored state unchanged after each refusal.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use hearth_control::{ArtifactStore, ControlConfig, ControlPlane};

struct App {
    router: Router,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

const KEY: &str = "key-of-acme";
const OTHER_KEY: &str = "key-of-other";

impl App {
    async fn new() -> App {
        App::open(tempfile::tempdir().expect("tempdir")).await
    }

    /// A gateway over the store and artifacts in `dir`, as a restarted one finds them.
    async fn open(dir: tempfile::TempDir) -> App {
        let store: Arc<dyn hearth_store::Store> =
            hearth_store::open(dir.path().join("db").to_str().expect("utf-8")).await.expect("store");
        let control =
            ControlPlane::new(store, ArtifactStore::new(dir.path().join("artifacts")), ControlConfig::default())
                .await
                .expect("control plane");
        control.bootstrap_key("acme", KEY).await.expect("key");
        control.bootstrap_key("other", OTHER_KEY).await.expect("key");
        App { router: hearth_server::gateway_router(control), _dir: dir }
    }

    async fn call(&self, method: &str, uri: &str, key: Option<&str>, body: Option<Value>) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, headers, body }
    }

    async fn ok(&self, method: &str, uri: &str, body: Option<Value>) -> Value {
        let r = self.call(method, uri, Some(KEY), body).await;
        assert_eq!(r.status, StatusCode::OK, "{method} {uri}: {}", r.body);
        r.body
    }

    /// Everything stored for acme, as the API shows it.
    async fn snapshot(&self) -> Value {
        json!({
            "models": self.ok("GET", "/v1/accounts/acme/models?pageSize=200", None).await,
            "deployments": self.ok("GET", "/v1/accounts/acme/deployments?pageSize=200&showDeleted=true", None).await,
            "deployedModels": self.ok("GET", "/v1/accounts/acme/deployedModels?pageSize=200", None).await,
        })
    }

    /// Sends a request that must be refused with `code`, and checks nothing changed.
    async fn refused(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
        code: i64,
        http: u16,
    ) -> Reply {
        let before = self.snapshot().await;
        let r = self.call(method, uri, key, body).await;
        assert_eq!(r.status.as_u16(), http, "{method} {uri}: {}", r.body);
        assert_eq!(r.body["code"], json!(code), "{method} {uri}: {}", r.body);
        assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.body);
        assert_eq!(r.body["details"], json!([]));
        assert_eq!(self.snapshot().await, before, "{method} {uri} changed stored state");
        r
    }
}

/// A tiny but complete Llama checkpoint in Hugging Face layout.
fn tiny_base_files() -> Vec<(&'static str, Vec<u8>)> {
    let (hidden, inter, vocab, layers) = (8usize, 16usize, 32usize, 1usize);
    let config = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": inter,
        "vocab_size": vocab, "max_position_embeddings": 128, "tie_word_embeddings": true, "torch_dtype": "float32"});
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden]), ("model.norm.weight".into(), vec![hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![hidden, hidden]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![4, hidden]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![4, hidden]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, hidden]));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product::<usize>() * 4;
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}));
        offset += n;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut st = (h.len() as u64).to_le_bytes().to_vec();
    st.extend(h);
    st.extend(vec![0u8; offset]);
    vec![
        ("config.json", config.to_string().into_bytes()),
        ("model.safetensors", st),
        ("tokenizer.json", br#"{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}"#.to_vec()),
    ]
}

/// Creates, uploads and validates the tiny base model `base` in acme.
async fn ready_base(app: &App) {
    uploaded_base(app).await;
    app.ok("GET", "/v1/accounts/acme/models/base:validateUpload", None).await;
}

#[tokio::test]
async fn every_code_the_api_returns_comes_with_its_http_status_and_changes_nothing() {
    let app = App::new().await;
    ready_base(&app).await;
    app.ok(
        "POST",
        "/v1/accounts/acme/deployments?deploymentId=dep",
        Some(json!({"baseModel": "accounts/acme/models/base", "maxReplicaCount": 2})),
    )
    .await;

    // UNAUTHENTICATED 401: no key, an unknown key, a malformed header.
    app.refused("GET", "/v1/accounts/acme/models", None, None, 16, 401).await;
    app.refused("GET", "/v1/accounts/acme/models", Some("nope"), None, 16, 401).await;
    // PERMISSION_DENIED 403: another account's key; a forged upload signature.
    app.refused("GET", "/v1/accounts/acme/models/base", Some(OTHER_KEY), None, 7, 403).await;
    app.refused("PUT", "/upload/acme/base/x.bin?size=1&expires=99999999999&sig=00", None, None, 7, 403).await;
    // INVALID_ARGUMENT 400: bad id, unknown field, unknown enum value, malformed JSON,
    // unknown query parameter, negative page size, a bad filter.
    let bad = app
        .refused(
            "POST",
            "/v1/accounts/acme/models",
            Some(KEY),
            Some(json!({"modelId": "Bad_Id", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})),
            3,
            400,
        )
        .await;
    assert!(bad.body["message"].as_str().unwrap_or("").contains("RFC 1034"), "{}", bad.body);
    app.refused(
        "POST",
        "/v1/accounts/acme/models",
        Some(KEY),
        Some(json!({"modelId": "m", "model": {"kindd": 1}})),
        3,
        400,
    )
    .await;
    app.refused(
        "POST",
        "/v1/accounts/acme/models",
        Some(KEY),
        Some(json!({"modelId": "m", "model": {"kind": "HF_SOMETHING"}})),
        3,
        400,
    )
    .await;
    app.refused("PATCH", "/v1/accounts/acme/deployments/dep", Some(KEY), Some(json!("not an object")), 3, 400).await;
    app.refused("GET", "/v1/accounts/acme/models?pageSiz=3", Some(KEY), None, 3, 400).await;
    app.refused("GET", "/v1/accounts/acme/models?pageSize=-1", Some(KEY), None, 3, 400).await;
    let f = app.refused("GET", "/v1/accounts/acme/models?filter=nosuch%3D1", Some(KEY), None, 3, 400).await;
    assert!(f.body["message"].as_str().unwrap_or("").contains("nosuch"), "{}", f.body);
    // NOT_FOUND 404: an unknown model, an unknown route.
    let nf = app.refused("GET", "/v1/accounts/acme/models/ghost", Some(KEY), None, 5, 404).await;
    assert!(nf.body["message"].as_str().unwrap_or("").contains("ghost"));
    app.refused("GET", "/v2/nothing", Some(KEY), None, 5, 404).await;
    // ALREADY_EXISTS 409, not to be retried: a duplicate; undelete of a live deployment (AIP-164).
    let dup = app
        .refused(
            "POST",
            "/v1/accounts/acme/deployments?deploymentId=dep",
            Some(KEY),
            Some(json!({"baseModel": "accounts/acme/models/base"})),
            6,
            409,
        )
        .await;
    assert_eq!(dup.headers.get("x-should-retry").map(|v| v.to_str().unwrap_or("")), Some("false"));
    app.refused("POST", "/v1/accounts/acme/deployments/dep:undelete", Some(KEY), Some(json!({})), 6, 409).await;
    // FAILED_PRECONDITION 400: deploying a model that is not READY; deleting a deployed model.
    app.ok(
        "POST",
        "/v1/accounts/acme/models",
        Some(json!({"modelId": "empty", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})),
    )
    .await;
    app.refused(
        "POST",
        "/v1/accounts/acme/deployments",
        Some(KEY),
        Some(json!({"baseModel": "accounts/acme/models/empty"})),
        9,
        400,
    )
    .await;
    app.refused("GET", "/v1/accounts/acme/models/empty:validateUpload", Some(KEY), None, 9, 400).await;
    app.refused("DELETE", "/v1/accounts/acme/models/base", Some(KEY), None, 9, 400).await;
    // OUT_OF_RANGE 400: scaling beyond maxReplicaCount.
    app.refused(
        "PATCH",
        "/v1/accounts/acme/deployments/dep:scale",
        Some(KEY),
        Some(json!({"replicaCount": 3})),
        11,
        400,
    )
    .await;
    // UNIMPLEMENTED 501: a field hearth does not act on, named; a spec method hearth lacks.
    let un = app
        .refused(
            "POST",
            "/v1/accounts/acme/deployments",
            Some(KEY),
            Some(json!({"baseModel": "accounts/acme/models/base", "enableMtp": true})),
            12,
            501,
        )
        .await;
    assert!(un.body["message"].as_str().unwrap_or("").contains("enableMtp"), "{}", un.body);
    app.refused(
        "POST",
        "/v1/accounts/acme/deployments",
        Some(KEY),
        Some(json!({"baseModel": "accounts/acme/models/base", "precision": "FP8"})),
        12,
        501,
    )
    .await;
    app.refused("POST", "/v1/accounts/acme/models/base:prepare", Some(KEY), Some(json!({})), 12, 501).await;
}

#[tokio::test]
async fn placement_fields_are_stored_and_echoed() {
    let app = App::new().await;
    ready_base(&app).await;
    let d = app
        .ok("POST", "/v1/accounts/acme/deployments?deploymentId=gpu", Some(json!({"baseModel": "accounts/acme/models/base",
            "acceleratorType": "NVIDIA_H100_80GB", "acceleratorCount": 2, "placement": {"region": "US_IOWA_1"}, "precision": "FP32"})))
        .await;
    assert_eq!(d["acceleratorType"], "NVIDIA_H100_80GB");
    let got = app.ok("GET", "/v1/accounts/acme/deployments/gpu", None).await;
    assert_eq!(got["acceleratorCount"], 2);
    assert_eq!(got["placement"]["region"], "US_IOWA_1");
    assert_eq!(got["precision"], "FP32");
    assert_eq!(got["autoscalingPolicy"]["scaleToZeroWindow"], "3600s");
    assert_eq!(got["autoscalingPolicy"]["loadTargets"]["default"], 0.8);
}

#[tokio::test]
async fn the_committed_openapi_document_matches_the_code_and_every_operation_is_routed() {
    let generated = hearth_server::openapi::document();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json exists"))
        .expect("docs/openapi.json is JSON");
    assert!(
        generated == committed,
        "docs/openapi.json is out of date: regenerate it with `cargo run --bin hearth -- openapi > docs/openapi.json`"
    );
    let app = App::new().await;
    for op in hearth_server::openapi::OPERATIONS {
        let uri = op
            .path
            .replace("{account}", "acme")
            .replace("{model}", "m")
            .replace("{deployment}", "d")
            .replace("{deployedModel}", "x")
            .replace("{quota}", "models")
            .replace("{file}", "f");
        let r = app.call(&op.method.to_uppercase(), &uri, Some(KEY), None).await;
        let message = r.body["message"].as_str().unwrap_or("");
        assert!(
            !message.contains("no such route") && !message.contains("not supported on this route"),
            "{} {uri} is not routed: {}",
            op.method,
            r.body
        );
    }
}

/// A PUT to an upload URL with extra headers, as a storage client sends it.
async fn put_file(app: &App, path: &str, headers: &[(&str, String)], body: Vec<u8>) -> Reply {
    let mut req = Request::builder().method("PUT").uri(path);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = app.router.clone().oneshot(req.body(Body::from(body)).expect("request")).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Reply { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
}

fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(data);
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[tokio::test]
async fn uploads_resume_part_by_part_and_are_verified() {
    let app = App::new().await;
    app.ok(
        "POST",
        "/v1/accounts/acme/models",
        Some(json!({"modelId": "big", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})),
    )
    .await;
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let urls = app
        .ok(
            "POST",
            "/v1/accounts/acme/models/big:getUploadEndpoint",
            Some(json!({"filenameToSize": {"weights.bin": "1000", "other.bin": "3"}})),
        )
        .await;
    let url =
        urls["filenameToSignedUrls"]["weights.bin"].as_str().expect("url").trim_start_matches("http://127.0.0.1:8080");
    let range = |r: &Reply| r.headers.get("range").map(|v| v.to_str().unwrap_or("").to_string());

    // Nothing stored yet: 308 without a Range.
    let r = put_file(&app, url, &[("content-range", "bytes */1000".into())], vec![]).await;
    assert_eq!((r.status.as_u16(), range(&r)), (308, None));
    let r = put_file(&app, url, &[("content-range", "bytes 0-399/1000".into())], data[..400].to_vec()).await;
    assert_eq!((r.status.as_u16(), range(&r)), (308, Some("bytes=0-399".into())));
    // A part resent after its answer was lost is answered with the offset, and writes nothing.
    let r = put_file(&app, url, &[("content-range", "bytes 200-599/1000".into())], data[200..600].to_vec()).await;
    assert_eq!((r.status.as_u16(), range(&r)), (308, Some("bytes=0-399".into())));
    let r = put_file(&app, url, &[("content-range", "bytes */1000".into())], vec![]).await;
    assert_eq!((r.status.as_u16(), range(&r)), (308, Some("bytes=0-399".into())));
    // A range that is not of this file, or a body that does not match its range, is refused.
    let r = put_file(&app, url, &[("content-range", "bytes 400-499/2000".into())], data[400..500].to_vec()).await;
    assert_eq!((r.status.as_u16(), r.body["code"].clone()), (400, json!(3)), "{}", r.body);
    let r = put_file(
        &app,
        url,
        &[("content-range", "bytes 400-499/1000".into()), ("content-length", "99".into())],
        data[400..499].to_vec(),
    )
    .await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.body);
    let r = put_file(&app, url, &[("content-range", "bytes 400-x/1000".into())], vec![]).await;
    assert!(r.body["message"].as_str().unwrap_or("").contains("Content-Range"), "{}", r.body);

    // The last part with a wrong digest: refused, naming both, and the upload starts over.
    let wrong = sha256_hex(b"not it");
    let r = put_file(
        &app,
        url,
        &[("content-range", "bytes 400-999/1000".into()), ("x-hearth-sha256", wrong.clone())],
        data[400..].to_vec(),
    )
    .await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.body);
    let msg = r.body["message"].as_str().unwrap_or("").to_string();
    assert!(msg.contains(&wrong) && msg.contains(&sha256_hex(&data)), "{msg}");
    let r = put_file(&app, url, &[("content-range", "bytes */1000".into())], vec![]).await;
    assert_eq!((r.status.as_u16(), range(&r)), (308, None));

    // Again, right this time.
    let r = put_file(&app, url, &[("content-range", "bytes 0-599/1000".into())], data[..600].to_vec()).await;
    assert_eq!((r.status.as_u16(), range(&r)), (308, Some("bytes=0-599".into())));
    let r = put_file(
        &app,
        url,
        &[("content-range", "bytes 600-999/1000".into()), ("x-hearth-sha256", sha256_hex(&data))],
        data[600..].to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = put_file(&app, url, &[("content-range", "bytes */1000".into())], vec![]).await;
    assert_eq!(r.status, StatusCode::OK);

    // The whole-file PUT the SDK sends still works, with or without a digest.
    let other =
        urls["filenameToSignedUrls"]["other.bin"].as_str().expect("url").trim_start_matches("http://127.0.0.1:8080");
    let r = put_file(&app, other, &[("x-hearth-sha256", wrong.clone())], b"abc".to_vec()).await;
    assert_eq!(r.status.as_u16(), 400, "{}", r.body);
    let r = put_file(&app, other, &[("x-hearth-sha256", "xyz".into())], b"abc".to_vec()).await;
    assert!(r.body["message"].as_str().unwrap_or("").contains("x-hearth-sha256"), "{}", r.body);
    let r = put_file(&app, other, &[("x-hearth-sha256", sha256_hex(b"abc"))], b"abc".to_vec()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Both files count for validation (which then looks inside them).
    let v = app.call("GET", "/v1/accounts/acme/models/big:validateUpload", Some(KEY), None).await;
    let msg = v.body["message"].as_str().unwrap_or("");
    assert!(!msg.contains("has not been uploaded"), "{msg}");
}

/// The inference routes answer errors in OpenAI's shape (what their clients parse), with the
/// same HTTP status the google.rpc code has everywhere else; and, like every route, refuse
/// query parameters they do not take.
#[tokio::test]
async fn inference_routes_answer_in_openai_shape_and_refuse_unknown_parameters() {
    let app = App::new().await;
    let chat = json!({"model": "accounts/acme/models/none", "messages": [{"role": "user", "content": "hi"}]});
    for path in ["/inference/v1/chat/completions", "/v1/chat/completions", "/v1/openai/chat/completions"] {
        let r = app.call("POST", path, Some(KEY), Some(chat.clone())).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "NOT_FOUND", "{path}: {}", r.body);
        assert_eq!(r.body["error"]["type"], "not_found_error", "{path}: {}", r.body);
        assert!(r.body["error"]["message"].as_str().is_some_and(|m| m.contains("none")), "{path}: {}", r.body);
        let r = app.call("POST", path, None, Some(chat.clone())).await;
        assert_eq!(
            (r.status, r.body["error"]["type"].clone()),
            (StatusCode::UNAUTHORIZED, json!("authentication_error"))
        );
    }
    let r = app.call("POST", "/inference/v1/completions?stream=true", Some(KEY), Some(chat.clone())).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body["error"]["message"].as_str().is_some_and(|m| m.contains("stream")), "{}", r.body);
    for path in ["/health?x=1", "/metrics?x=1", "/openapi.json?x=1", "/v1/models?x=1"] {
        let r = app.call("GET", path, Some(KEY), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
    }
}

/// Creates the model `base` in acme and uploads the tiny checkpoint, without validating it.
/// Returns the files and their upload paths.
async fn uploaded_base(app: &App) -> Vec<(&'static str, Vec<u8>, String)> {
    app.ok(
        "POST",
        "/v1/accounts/acme/models",
        Some(json!({"modelId": "base", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})),
    )
    .await;
    let files = tiny_base_files();
    let sizes: serde_json::Map<String, Value> =
        files.iter().map(|(n, b)| (n.to_string(), json!(b.len().to_string()))).collect();
    let urls =
        app.ok("POST", "/v1/accounts/acme/models/base:getUploadEndpoint", Some(json!({"filenameToSize": sizes}))).await;
    let mut out = Vec::new();
    for (name, bytes) in files {
        let path =
            urls["filenameToSignedUrls"][name].as_str().expect("url").trim_start_matches("http://127.0.0.1:8080");
        let r = put_file(app, path, &[], bytes.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        out.push((name, bytes, path.to_string()));
    }
    out
}

fn model_dir(app: &App) -> std::path::PathBuf {
    app._dir.path().join("artifacts/acme/models/base")
}

/// An upload that was already streaming when its model was validated must not replace a byte
/// of the READY model: the check of the model's state and the file's rename into place are one
/// step against validation's seal.
#[tokio::test]
async fn an_upload_in_flight_cannot_change_a_model_validated_meanwhile() {
    let app = App::new().await;
    let files = uploaded_base(&app).await;
    let (_, original, path) = files.iter().find(|(n, _, _)| *n == "model.safetensors").expect("weights");

    // A slow PUT of the same file: its first bytes arrive before validation...
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let body = Body::from_stream(tokio_stream_from(rx));
    let req = Request::builder().method("PUT").uri(path.as_str()).body(body).expect("request");
    let slow = tokio::spawn(app.router.clone().oneshot(req));
    let half = original.len() / 2;
    tx.send(Ok(vec![0xFF; half].into())).await.expect("send");
    let dir = model_dir(&app);
    let scratch = || {
        std::fs::read_dir(&dir).expect("dir").filter_map(|e| e.ok()).any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(".model.safetensors.") && n.ends_with(".partial")
        })
    };
    for _ in 0..500 {
        if scratch() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(scratch(), "the slow upload is streaming into its scratch file");

    // ...the model is validated and READY...
    app.ok("GET", "/v1/accounts/acme/models/base:validateUpload", None).await;
    let model = app.ok("GET", "/v1/accounts/acme/models/base", None).await;
    assert_eq!(model["state"], json!("READY"));

    // ...and then the rest arrives. It is refused, and the READY model's file is unchanged.
    tx.send(Ok(vec![0xFF; original.len() - half].into())).await.expect("send");
    drop(tx);
    let resp = slow.await.expect("join").expect("infallible");
    let status = resp.status();
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes()).unwrap_or(Value::Null);
    assert_eq!((status.as_u16(), body["code"].clone()), (400, json!(9)), "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("validated"), "{body}");
    assert_eq!(&std::fs::read(dir.join("model.safetensors")).expect("file"), original, "a READY model's file changed");
    assert!(!scratch(), "the refused upload's scratch file is removed");
    let r = put_file(&app, path, &[], vec![0xFF; original.len()]).await;
    assert_eq!((r.status.as_u16(), r.body["code"].clone()), (400, json!(9)), "{}", r.body);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A gateway killed mid-upload leaves partial files behind. They are never part of the model
/// (validation succeeds beside them), and a restarted gateway removes those that can no
/// longer complete, keeping a resumable upload's file for its client.
#[tokio::test]
async fn partial_files_left_by_a_killed_gateway_never_block_a_model() {
    let app = App::new().await;
    uploaded_base(&app).await;
    let dir = model_dir(&app);
    // What a killed whole-file PUT and a killed resumable upload leave.
    std::fs::write(dir.join(".model.safetensors.0123456789abcdef.partial"), b"half").expect("write");
    std::fs::write(dir.join(".tokenizer.json.partial"), b"ha").expect("write");
    app.ok("GET", "/v1/accounts/acme/models/base:validateUpload", None).await;
    let model = app.ok("GET", "/v1/accounts/acme/models/base", None).await;
    assert_eq!(model["state"], json!("READY"), "{model}");

    // A second model, still uploading, with the same leftovers.
    app.ok(
        "POST",
        "/v1/accounts/acme/models",
        Some(json!({"modelId": "next", "model": {"kind": "HF_BASE_MODEL", "baseModelDetails": {}}})),
    )
    .await;
    let next = app._dir.path().join("artifacts/acme/models/next");
    std::fs::create_dir_all(&next).expect("dir");
    std::fs::write(next.join(".config.json.0123456789abcdef.partial"), b"{").expect("write");
    std::fs::write(next.join(".model.safetensors.partial"), b"abc").expect("write");

    // Restarted on the same store and artifacts.
    let App { router, _dir } = app;
    drop(router);
    let app = App::open(_dir).await;
    let names = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&model_dir(&app)), vec![".sealed", "config.json", "model.safetensors", "tokenizer.json"]);
    assert_eq!(names(&next), vec![".model.safetensors.partial"], "a resumable upload's file is kept");
    let model = app.ok("GET", "/v1/accounts/acme/models/base", None).await;
    assert_eq!(model["state"], json!("READY"));
}

/// A method a route does not declare is HTTP's 405 with the route's methods in `Allow` (and a
/// google.rpc body), as schema-driven clients expect; nothing changes.
#[tokio::test]
async fn an_undeclared_method_is_405_with_allow() {
    let app = App::new().await;
    for (method, uri, allowed) in [
        ("PUT", "/v1/accounts/acme/models", "GET,POST"),
        ("DELETE", "/v1/accounts/acme/quotas", "GET"),
        ("POST", "/v1/accounts/acme/quotas/models", "GET,PATCH"),
        ("GET", "/inference/v1/chat/completions", "POST"),
    ] {
        let r = app.refused(method, uri, Some(KEY), None, 12, 405).await;
        let allow = r.headers.get("allow").map(|v| v.to_str().unwrap_or("").replace(' ', "")).unwrap_or_default();
        let mut got: Vec<&str> = allow.split(',').filter(|m| *m != "HEAD").collect();
        got.sort_unstable();
        assert_eq!(got.join(","), allowed, "{method} {uri}: Allow {allow:?}");
    }
}
