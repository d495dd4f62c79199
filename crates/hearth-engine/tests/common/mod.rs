//! Shared by the engine's integration tests: where the default model and the fixtures are.

#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The default model, fetched by `scripts/fetch-model`. Absent, a test that needs it is
/// skipped, said on the terminal (not in captured output), so a developer's run without it
/// still works; under CI (`CI` set), where the model is always fetched first, its absence
/// fails the test.
pub fn smollm2() -> Option<PathBuf> {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{} is absent under CI: scripts/fetch-model must run before the tests", p.display());
    }
    skipped(&format!("{} is absent; run scripts/fetch-model to include this test", p.display()));
    None
}

/// Says a test was skipped where the person running the suite sees it: straight to the
/// process's stderr, which the test harness does not capture.
pub fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED ({}): {why}", std::thread::current().name().unwrap_or("?"));
}

/// A committed fixture, as JSON; its absence is a broken checkout and fails the test.
pub fn fixture_json(name: &str) -> serde_json::Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
            grammar: None,
            cache_salt: None,
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
