//! The adapter trained to answer like a pirate (fixture `lora/pirate`, made by
//! scripts/reference/make_lora_fixtures.py) changes SmolLM2's chat answers through the API,
//! while base-model requests running in the same batches answer exactly as they do alone.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hearth-engine/tests/fixtures")
}

async fn chat(app: &Router, model: &str, question: &str) -> String {
    let body = json!({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0});
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes()).expect("json");
    v["choices"][0]["message"]["content"].as_str().expect("content").to_string()
}

#[tokio::test]
async fn the_pirate_adapter_speaks_like_a_pirate_and_the_base_model_does_not_change() {
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!("SKIPPED: {} is absent; run scripts/fetch-model to include this test", gguf.display());
        return;
    }
    let loaded =
        hearth_engine::load(&gguf, hearth_engine::Precision::Native, &candle_core::Device::Cpu).expect("model");
    let engine = hearth_engine::Engine::start(loaded.model, loaded.tokenizer, hearth_engine::EngineConfig::default());
    engine.load_adapter("pirate", &fixtures().join("lora/pirate"), None).expect("adapter");
    let app = hearth_server::engine_router(engine, "smollm2".into(), Default::default());
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora/pirate/reference.json")).expect("fixture"))
            .expect("json");
    let questions: Vec<String> = reference["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p["messages"][0]["content"].as_str().expect("question").to_string())
        .collect();

    let mut alone = Vec::new();
    for q in &questions {
        alone.push(chat(&app, "smollm2", q).await);
    }
    // Base and pirate requests together, so they share steps.
    let tasks: Vec<_> = questions
        .iter()
        .flat_map(|q| [("smollm2", q.clone()), ("pirate", q.clone())])
        .map(|(model, q)| {
            let app = app.clone();
            tokio::spawn(async move { (model, chat(&app, model, &q).await) })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (model, answer) = t.await.expect("task");
        if model == "pirate" {
            assert!(answer.starts_with("Ahoy"), "the pirate adapter answered {answer:?}");
        } else {
            assert_eq!(answer, alone[i / 2], "a base answer changed when batched with the adapter");
            assert!(!answer.starts_with("Ahoy"), "the base model answered like a pirate: {answer:?}");
        }
    }
}
