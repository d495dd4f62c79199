//! Shared by the engine's integration tests: where the default model and the fixtures are.

#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The default model, fetched by `scripts/fetch-model`; `None` (with a visible message) when
/// it is absent, so the suite still runs on a machine without it.
pub fn smollm2() -> Option<PathBuf> {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent; run scripts/fetch-model to include this test", p.display());
        None
    }
}

/// Token ids of a fixture's JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The reference's greedy ids, without the end-of-sequence token the engine does not emit.
pub fn expected_greedy(prompt: &serde_json::Value, eos: &[u32]) -> Vec<u32> {
    let mut g = ids(&prompt["greedy"]["token_ids"]);
    if g.last().is_some_and(|t| eos.contains(t)) {
        g.pop();
    }
    g
}

/// Greedy token ids through the engine (scheduler, batching, sampling and all), with the
/// named adapter when given.
pub async fn greedy(
    engine: &hearth_engine::Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
    adapter: Option<&str>,
) -> Vec<u32> {
    use hearth_engine::{Event, GenerateRequest, SamplingParams};
    let adapter = adapter.map(|a| engine.adapter(a).expect("adapter loaded"));
    let mut rx = engine
        .generate(GenerateRequest {
            prompt,
            max_tokens,
            params: SamplingParams { temperature: 0.0, ..Default::default() },
            stop: vec![],
            ignore_eos: false,
            prompt_logprobs: false,
            adapter,
        })
        .expect("queued");
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { sampled, .. } => out.push(sampled.token),
            Event::Finished { .. } => break,
            Event::Error(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    out
}
