//! A new version of the model's weights, swapped in while requests run: a request in flight
//! finishes on the weights it started with, one sent after the swap runs on the new ones, none
//! fails, and a version that does not fit (another tokenizer) is refused with the old weights
//! still serving. The two versions are the default model's Q4_1 file as stored and the same
//! file served in FP32: the same tokens, but logprobs that differ, which tells them apart.

mod common;

use candle_core::Device;
use hearth_engine::{Engine, EngineConfig, Event, GenerateRequest, KvDtype, Precision, SamplingParams};

fn request(engine: &Engine, max_tokens: usize) -> GenerateRequest {
    let text = "<|im_start|>user\nWrite a short story about a lighthouse.<|im_end|>\n<|im_start|>assistant\n";
    GenerateRequest {
        prompt: engine.tokenizer().encode(text, false).expect("encodes"),
        max_tokens,
        params: SamplingParams { temperature: 0.0, logprobs: Some(0), ..Default::default() },
        stop: vec![],
        ignore_eos: true,
        prompt_logprobs: false,
        adapter: None,
        grammar: None,
        cache_salt: None,
    }
}

async fn logprobs(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<f32> {
    let mut out = Vec::new();
    loop {
        match rx.recv().await.expect("an event") {
            Event::Token { sampled, .. } => out.push(sampled.logprob.expect("asked for")),
            Event::Finished { .. } => return out,
            Event::Error(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
}

fn start(precision: Precision) -> Option<Engine> {
    let path = common::smollm2()?;
    let loaded = hearth_engine::load(&path, precision, &Device::Cpu).expect("smollm2 loads");
    // One KV dtype for both: the cache's type is the engine's, kept across versions.
    let config = EngineConfig { prefix_cache: false, kv_dtype: Some(KvDtype::F16), ..Default::default() };
    Some(Engine::start(loaded.model, loaded.tokenizer, config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_serves_new_requests_while_old_ones_finish_on_theirs() {
    let Some(engine) = start(Precision::Native) else { return };
    let path = common::smollm2().expect("present");
    // What each version answers alone.
    let old = logprobs(engine.generate(request(&engine, 64)).expect("queued")).await;
    let new = {
        let other = start(Precision::F32).expect("loads");
        logprobs(other.generate(request(&other, 64)).expect("queued")).await
    };
    assert_ne!(old, new, "the two versions must be told apart by their logprobs");

    // A long request in flight (about 1.5 s on this model), then the swap, sent while it runs;
    // then a request sent while the swap waits for the running one to finish.
    let old_long = logprobs(engine.generate(request(&engine, 512)).expect("queued")).await;
    let v2 = hearth_engine::load(&path, Precision::F32, &Device::Cpu).expect("loads");
    let mut in_flight = engine.generate(request(&engine, 512)).expect("queued");
    let mut first = Vec::new();
    while first.is_empty() {
        match in_flight.recv().await.expect("an event") {
            Event::Token { sampled, .. } => first.push(sampled.logprob.expect("asked for")),
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    let swapping = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.replace_model(v2.model, &v2.tokenizer, "v2"))
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(engine.model_version().is_none(), "the swap waits for the request in flight");
    let queued = engine.generate(request(&engine, 64)).expect("queued");
    first.extend(logprobs(in_flight).await);
    assert_eq!(first, old_long, "the request in flight finished on the weights it started with");
    swapping.await.expect("joins").expect("the new version is accepted");
    assert_eq!(engine.model_version().as_deref(), Some("v2"));
    assert_eq!(logprobs(queued).await, new, "a request that waited for the swap runs on the new weights");
    let after = logprobs(engine.generate(request(&engine, 64)).expect("queued")).await;
    assert_eq!(after, new, "so does one sent after it");

    // Another tokenizer is refused, and v2 goes on serving.
    let tiny = hearth_engine::load(&common::fixtures().join("tiny_llama"), Precision::Native, &Device::Cpu)
        .expect("the fixture loads");
    let err = engine.replace_model(tiny.model, &tiny.tokenizer, "v3").expect_err("refused");
    assert!(err.to_string().contains("tokenizer"), "{err}");
    assert_eq!(engine.model_version().as_deref(), Some("v2"));
    let still = logprobs(engine.generate(request(&engine, 16)).expect("queued")).await;
    assert_eq!(still[..], new[..16]);
}
