//! The engine server through its real router, serving the tiny fixture Llama: the OpenAI
//! request and response shapes, streaming, logprobs and echo, stop strings, seeds, batching
//! that leaks nothing between rows, disconnects that free their slot, and malformed requests.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const MODEL: &str = "tiny";

fn router() -> Router {
    router_with(hearth_engine::EngineConfig::default())
}

fn router_with(config: hearth_engine::EngineConfig) -> Router {
    router_with_token(config, None)
}

fn router_with_token(config: hearth_engine::EngineConfig, token: Option<&str>) -> Router {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hearth-engine/tests/fixtures/tiny_llama");
    let loaded =
        hearth_engine::load(&dir, hearth_engine::Precision::Native, &candle_core::Device::Cpu).expect("tiny model");
    let engine = hearth_engine::Engine::start(loaded.model, loaded.tokenizer, config);
    hearth_server::engine_router(
        engine,
        MODEL.to_string(),
        hearth_server::ServerOptions { token: token.map(str::to_string), ..Default::default() },
    )
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn get_text(app: &Router, path: &str) -> String {
    let resp = app.clone().oneshot(Request::get(path).body(Body::empty()).expect("request")).await.expect("infallible");
    String::from_utf8(resp.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf-8")
}

/// The `data:` payloads of an SSE response.
async fn sse(app: &Router, path: &str, body: Value) -> Vec<String> {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec())
        .expect("utf-8")
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).and_then(|v| v.parse().ok())).unwrap_or(0)
}

#[tokio::test]
async fn completions_and_chat_answer_in_openai_shape() {
    let app = router();
    let models: Value = serde_json::from_str(&get_text(&app, "/v1/models").await).expect("json");
    assert_eq!(models["data"][0]["id"], MODEL);

    let (s, c) = post(
        &app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hello world", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 5);
    assert_eq!(c["usage"]["total_tokens"], c["usage"]["prompt_tokens"].as_u64().unwrap() + 5);

    let (s, chat) = post(&app, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2})).await;
    assert_eq!(s, StatusCode::OK, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let lp = chat["choices"][0]["logprobs"]["content"].as_array().expect("logprobs").clone();
    assert!(!lp.is_empty() && lp.len() <= 4);
    assert_eq!(lp[0]["top_logprobs"].as_array().expect("top").len(), 2);
    assert!(lp.iter().all(|t| t["logprob"].as_f64().expect("f64") <= 0.0));

    // Both requests count under the base model's label, with latency histograms.
    let m = get_text(&app, "/metrics").await;
    assert_eq!(metric(&m, "hearth_adapter_requests_total{adapter=\"base\"}"), 2, "{m}");
    assert!(metric(&m, "hearth_adapter_time_to_first_token_seconds_count{adapter=\"base\"}") == 2, "{m}");
}

#[tokio::test]
async fn echo_returns_prompt_logprobs_with_the_first_null() {
    let app = router();
    let (s, c) = post(&app, "/v1/completions", json!({"model": MODEL, "prompt": [5, 17, 42, 99], "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 1})).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let lp = &c["choices"][0]["logprobs"];
    let tlp = lp["token_logprobs"].as_array().expect("token_logprobs");
    assert_eq!(tlp.len(), 4 + 2);
    assert!(tlp[0].is_null());
    assert!(tlp[1..].iter().all(|v| v.as_f64().expect("number") <= 0.0));
    assert_eq!(lp["tokens"].as_array().expect("tokens").len(), 6);
}

#[tokio::test]
async fn stop_strings_cut_the_text_and_finish_with_stop() {
    let app = router();
    let body = json!({"model": MODEL, "prompt": "The", "max_tokens": 12, "temperature": 0});
    let (_, full) = post(&app, "/v1/completions", body.clone()).await;
    let text = full["choices"][0]["text"].as_str().expect("text").to_string();
    // A stop string from the middle of what greedy decoding produces, spanning characters.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "greedy text too short to cut: {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let mut with_stop = body;
    with_stop["stop"] = json!([stop.clone()]);
    let (_, cut) = post(&app, "/v1/completions", with_stop).await;
    let cut_text = cut["choices"][0]["text"].as_str().expect("text");
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    assert_eq!(cut_text, &text[..text.find(&stop).expect("stop occurs")]);
}

#[tokio::test]
async fn the_same_seed_gives_the_same_sample_and_n_gives_n_choices() {
    let app = router();
    let body = json!({"model": MODEL, "prompt": "Once", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3});
    let (_, a) = post(&app, "/v1/completions", body.clone()).await;
    let (_, b) = post(&app, "/v1/completions", body).await;
    assert_eq!(a["choices"].as_array().expect("choices").len(), 3);
    let texts =
        |v: &Value| v["choices"].as_array().expect("choices").iter().map(|c| c["text"].clone()).collect::<Vec<_>>();
    assert_eq!(texts(&a), texts(&b));
}

#[tokio::test]
async fn streaming_sends_chunks_usage_and_done() {
    let app = router();
    let events = sse(
        &app,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("json chunk")).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"].as_array().expect("choices").len(), 0);
    assert!(usage["usage"]["completion_tokens"].as_u64().expect("count") >= 1);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    // The streamed text equals the non-streamed answer.
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string)).collect();
    let (_, whole) = post(
        &app,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(streamed, whole["choices"][0]["message"]["content"].as_str().expect("content"));
}

/// 32 requests of different lengths, decoded in the same batches, each return exactly what
/// they return alone.
#[tokio::test]
async fn batching_leaks_nothing_between_rows() {
    let app = router();
    let bodies: Vec<Value> = (0..32)
        .map(|i| {
            let prompt: Vec<u32> = (0..(3 + i * 5)).map(|j| ((i * 31 + j * 7) % 500 + 3) as u32).collect();
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 8 + i % 5, "temperature": 0, "ignore_eos": true})
        })
        .collect();
    let mut alone = Vec::new();
    for b in &bodies {
        alone.push(post(&app, "/v1/completions", b.clone()).await.1["choices"][0]["text"].clone());
    }
    let together =
        futures_util::future::join_all(bodies.iter().map(|b| post(&app, "/v1/completions", b.clone()))).await;
    for (i, (s, v)) in together.iter().enumerate() {
        assert_eq!(*s, StatusCode::OK);
        assert_eq!(v["choices"][0]["text"], alone[i], "request {i} changed when batched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_slot() {
    let app = router();
    // Other long requests keep the engine busy, so the stream below is still running when
    // its client goes away.
    let busy: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                post(
                    &app,
                    "/v1/completions",
                    json!({"model": MODEL, "prompt": "Busy", "max_tokens": 240, "ignore_eos": true}),
                )
                .await
            })
        })
        .collect();
    // Let the busy requests start decoding first.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"model": MODEL, "prompt": "Hello", "max_tokens": 240, "stream": true, "ignore_eos": true})
                .to_string(),
        ))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let mut stream = resp.into_body().into_data_stream();
    let first = stream.next().await.expect("a first chunk").expect("bytes");
    assert!(!first.is_empty());
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = get_text(&app, "/metrics").await;
        if metric(&m, "hearth_engine_cancelled_total") >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the slot was not freed: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for b in busy {
        assert_eq!(b.await.expect("task").0, StatusCode::OK);
    }
    // The gauge is published after the step that finished the last request, which may be a
    // moment after its client got the answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let m = get_text(&app, "/metrics").await;
        if metric(&m, "hearth_engine_running_sequences") == 0 {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "sequences still running: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    // 16 busy requests ran to the end; the abandoned one stopped early.
    assert!(metric(&m, "hearth_engine_generation_tokens_total") < 17 * 240, "{m}");
}

/// Polls `/metrics` until every named metric reads its value.
async fn wait_for_metrics(app: &Router, want: &[(&str, u64)]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = get_text(app, "/metrics").await;
        if want.iter().all(|&(name, v)| metric(&m, name) == v) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "metrics never reached {want:?}: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_full_kv_cache_queues_requests_and_a_full_queue_refuses_with_429() {
    // The tiny model's KV cache takes 512 bytes a token: this budget holds one sequence of
    // the context's 256 tokens, and two more requests may wait.
    let app = router_with(hearth_engine::EngineConfig {
        kv_cache_bytes: 256 * 512,
        max_waiting: 2,
        ..hearth_engine::EngineConfig::default()
    });
    let body = |prompt: &str| json!({"model": MODEL, "prompt": prompt, "max_tokens": 200, "temperature": 0, "ignore_eos": true});
    let alone = post(&app, "/v1/completions", body("Second")).await.1["choices"][0]["text"].clone();
    let spawn = |prompt: &'static str| {
        let app = app.clone();
        tokio::spawn(async move { post(&app, "/v1/completions", body(prompt)).await })
    };
    // The gauges are published after each step: first see the request above gone.
    wait_for_metrics(&app, &[("hearth_engine_running_sequences", 0)]).await;
    // "First" decodes 200 tokens (about 200 ms in a debug build); the waits below take a few.
    let first = spawn("First");
    wait_for_metrics(&app, &[("hearth_engine_running_sequences", 1), ("hearth_engine_waiting_requests", 0)]).await;
    let queued = [spawn("Second"), spawn("Third")];
    wait_for_metrics(&app, &[("hearth_engine_running_sequences", 1), ("hearth_engine_waiting_requests", 2)]).await;
    let m = get_text(&app, "/metrics").await;
    assert!(metric(&m, "hearth_engine_kv_cache_reserved_bytes") <= 256 * 512, "{m}");
    // The cache is spoken for and the queue is full: refused at once, not left hanging.
    let (s, v) = post(&app, "/v1/completions", body("Fourth")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("waiting"), "the refusal should say the queue is full: {msg:?}");
    // The waiting ones were not failed: each runs once the cache has room, with the answer
    // it gets alone.
    assert_eq!(first.await.expect("task").0, StatusCode::OK);
    let [second, third] = queued;
    let (s, second) = second.await.expect("task");
    assert_eq!(s, StatusCode::OK, "{second}");
    assert_eq!(second["choices"][0]["text"], alone);
    assert_eq!(third.await.expect("task").0, StatusCode::OK);
}

/// Sends each body (to chat when it has messages) and checks the refusal's status and that its
/// OpenAI-shaped message mentions the needle.
async fn assert_refused<const N: usize>(app: &Router, cases: [(Value, StatusCode, &str); N]) {
    for (body, status, needle) in cases {
        let path = if body.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" };
        let (s, v) = post(app, path, body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: message {msg:?} should mention {needle:?}");
        assert!(v["error"]["type"].is_string());
    }
}

#[tokio::test]
async fn malformed_requests_get_openai_errors_with_fitting_statuses() {
    let app = router();
    let cases = [
        (json!({"model": MODEL, "prompt": "x", "temprature": 1}), StatusCode::BAD_REQUEST, "temprature"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            StatusCode::BAD_REQUEST,
            "tools[0]: missing field `function`",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}),
            StatusCode::NOT_IMPLEMENTED,
            "functions",
        ),
        (json!({"model": "other", "prompt": "x"}), StatusCode::NOT_FOUND, "other"),
        (json!({"model": MODEL, "prompt": "x", "temperature": 5}), StatusCode::BAD_REQUEST, "temperature"),
        (json!({"model": MODEL, "prompt": "x", "max_tokens": 0}), StatusCode::BAD_REQUEST, "max_tokens"),
        (json!({"model": MODEL, "prompt": [9999]}), StatusCode::BAD_REQUEST, "token id"),
        (json!({"model": MODEL, "prompt": "x", "n": 100}), StatusCode::BAD_REQUEST, "at most"),
        (json!({"model": MODEL, "messages": []}), StatusCode::BAD_REQUEST, "messages"),
        (json!(["not", "an", "object"]), StatusCode::BAD_REQUEST, "object"),
    ];
    assert_refused(&app, cases).await;
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

/// Bodies that parse but make no sense are refused up front with a 400 naming the problem:
/// unknown roles, a null content where one is needed, a conversation with nothing to answer, a
/// max_tokens larger than the whole context, and (when asked for) a prompt plus max_tokens that
/// overflows it. By default an overflow lowers max_tokens, as the inference spec has it.
#[tokio::test]
async fn chat_bodies_and_context_overflows_are_checked_before_anything_runs() {
    let app = router();
    let chat = |messages: Value| json!({"model": MODEL, "messages": messages, "max_tokens": 2});
    let cases = [
        (chat(json!([{"role": "wizard", "content": "x"}])), StatusCode::BAD_REQUEST, "wizard"),
        (chat(json!([{"role": "user", "content": null}])), StatusCode::BAD_REQUEST, "messages[0].content is null"),
        (chat(json!([{"role": "user"}])), StatusCode::BAD_REQUEST, "messages[0].content is null"),
        (chat(json!([{"role": "assistant", "content": "hi"}])), StatusCode::BAD_REQUEST, "only assistant"),
        (chat(json!([{"role": "tool", "content": "42"}])), StatusCode::BAD_REQUEST, "without its tool_call_id"),
        (chat(json!([{"role": "function", "content": "42"}])), StatusCode::NOT_IMPLEMENTED, "send role \"tool\""),
        (chat(json!([{"role": "user", "content": "x", "refusal": "no"}])), StatusCode::NOT_IMPLEMENTED, "refusal"),
        (chat(json!([{"role": "user", "content": "x", "colour": "red"}])), StatusCode::BAD_REQUEST, "colour"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000}),
            StatusCode::BAD_REQUEST,
            "max_tokens is 1000000",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                "max_completion_tokens": 2}),
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (json!({"model": MODEL, "prompt": "x", "max_tokens": 257}), StatusCode::BAD_REQUEST, "256 tokens"),
        (
            json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 255, "context_length_exceeded_behavior": "error"}),
            StatusCode::BAD_REQUEST,
            "lower max_tokens",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "context_length_exceeded_behavior": "wrap"}),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded_behavior",
        ),
    ];
    assert_refused(&app, cases).await;

    // Accepted: a null assistant turn, OpenAI's developer role, and an overflow lowered to fit.
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat(json!([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"},
            {"role": "assistant", "content": null}, {"role": "user", "content": "y"}])),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 256, "ignore_eos": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let usage = &v["usage"];
    assert_eq!(usage["total_tokens"], 256, "generation stops where the context ends: {usage}");
}

/// Errors name their google.rpc code in OpenAI's shape, and no route takes query parameters.
#[tokio::test]
async fn errors_carry_their_code_and_query_parameters_are_refused() {
    let app = router();
    let (status, body) = post(&app, "/v1/completions", json!({"model": "nope", "prompt": "hi"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!((body["error"]["code"].clone(), body["error"]["param"].clone()), (json!("NOT_FOUND"), json!("model")));
    let (status, body) = post(&app, "/v1/completions?n=2", json!({"model": MODEL, "prompt": "hi"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let resp = app.clone().oneshot(Request::get("/health?probe=1").body(Body::empty()).expect("request")).await;
    assert_eq!(resp.expect("infallible").status(), StatusCode::BAD_REQUEST);
}

/// An engine started with a token (as every replica a gateway starts is) serves only requests
/// that carry it: inference, the admin routes and the metrics answer 401 without it or with
/// another; the health check needs none.
#[tokio::test]
async fn an_engine_with_a_token_serves_only_who_presents_it() {
    let app = router_with_token(hearth_engine::EngineConfig::default(), Some("s3cret-token"));
    let send = |method: &str, path: &str, auth: Option<&str>, body: Option<Value>| {
        let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req.body(body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty)).expect("request");
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await.expect("infallible");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
        }
    };
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let load = json!({"lora_name": "x", "lora_path": "/nonexistent"});
    let routes = [
        ("POST", "/v1/chat/completions", Some(chat.clone())),
        ("POST", "/v1/completions", Some(json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}))),
        ("POST", "/v1/load_lora_adapter", Some(load.clone())),
        ("POST", "/v1/unload_lora_adapter", Some(json!({"lora_name": "x"}))),
        ("POST", "/v1/merge_lora_adapter", Some(load)),
        ("GET", "/v1/lora_adapters", None),
        ("GET", "/v1/load", None),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
    ];
    for (method, path, body) in routes {
        for auth in [None, Some("Bearer wrong-token!"), Some("s3cret-token"), Some("Bearer s3cret-token ")] {
            let (status, v) = send(method, path, auth, body.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {auth:?}: {v}");
            assert_eq!(v["error"]["type"], "authentication_error", "{v}");
        }
    }
    let (status, _) = send("GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = send("POST", "/v1/chat/completions", Some("Bearer s3cret-token"), Some(chat)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = send("GET", "/v1/lora_adapters", Some("Bearer s3cret-token"), None).await;
    assert_eq!(status, StatusCode::OK);
}
