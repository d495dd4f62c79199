//! LoRA adapters against PEFT: each fixture adapter's prompt logprobs and greedy
//! continuations (made by scripts/reference/make_lora_fixtures.py), a mixed batch over several
//! adapters and the base in the same steps, every refusal by name, and reloads under traffic.

mod common;

use common::{expected_greedy, greedy, ids};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use hearth_engine::model::{Logits, SeqInput};
use hearth_engine::sampling::log_softmax;
use hearth_engine::{Engine, EngineConfig, EngineError, Event, GenerateRequest, Precision, SamplingParams};
use serde_json::Value;

fn lora_dir() -> PathBuf {
    common::fixtures().join("lora")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture exists")).expect("fixture is JSON")
}

fn tiny_engine() -> Engine {
    tiny_engine_with(EngineConfig::default())
}

fn tiny_engine_with(config: EngineConfig) -> Engine {
    let loaded =
        hearth_engine::load(&common::fixtures().join("tiny_llama"), Precision::Native, &Device::Cpu).expect("tiny");
    Engine::start(loaded.model, loaded.tokenizer, config)
}

/// Checks one adapter directory against its reference.json on a base model file.
async fn check_adapter(base: &Path, precision: Precision, adapter_dir: &Path, tolerance: f64) {
    let r = json(&adapter_dir.join("reference.json"));
    let loaded = hearth_engine::load(base, precision, &Device::Cpu).expect("base loads");
    let adapter = hearth_engine::lora::load_peft(
        "a",
        adapter_dir,
        &loaded.model.config,
        loaded.model.gguf_layout(),
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", adapter_dir.display()));
    assert!(adapter.patched() > 0);
    assert!(!adapter.is_hot(), "loading leaves an adapter cold until it is used");
    let weights = adapter.prepare(&candle_core::Device::Cpu).expect("prepare");
    for p in r["prompts"].as_array().expect("prompts") {
        let tokens = ids(&p["token_ids"]);
        let expected: Vec<f64> =
            p["logprobs"].as_array().expect("logprobs").iter().map(|x| x.as_f64().expect("f64")).collect();
        let mut cache = loaded.model.new_cache(hearth_engine::KvDtype::F32);
        let out = loaded
            .model
            .forward(&mut [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                logits: Logits::All,
                adapter: Some(&weights),
            }])
            .expect("forward");
        let rows: Vec<Vec<f32>> = out[0].as_ref().expect("logits").to_vec2().expect("rows");
        for (j, exp) in expected.iter().enumerate() {
            let got = log_softmax(&rows[j])[tokens[j + 1] as usize] as f64;
            assert!(
                (got - exp).abs() <= tolerance,
                "{}: prompt {} position {j}: {got} vs PEFT {exp}",
                adapter_dir.display(),
                p["name"]
            );
        }
    }
    let eos: Vec<u32> = r.get("eos_token_ids").map(ids).unwrap_or_else(|| vec![2]);
    let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default());
    engine.load_adapter("a", adapter_dir, None).expect("adapter loads in the engine");
    for p in r["prompts"].as_array().expect("prompts") {
        let want = expected_greedy(p, &eos);
        let got = greedy(&engine, ids(&p["token_ids"]), want.len().max(1), Some("a")).await;
        assert_eq!(got, want, "{}: greedy continuation of {}", adapter_dir.display(), p["name"]);
    }
}

#[tokio::test]
async fn every_tiny_fixture_adapter_matches_peft() {
    let base = common::fixtures().join("tiny_llama");
    let mut checked = 0;
    for entry in std::fs::read_dir(lora_dir()).expect("lora fixtures") {
        let dir = entry.expect("entry").path();
        let is_tiny = dir.join("reference.json").exists()
            && json(&dir.join("reference.json"))["adapter"]["base_model"]
                .as_str()
                .is_some_and(|b| b.contains("tiny_llama"));
        if dir.join("adapter_config.json").exists() && is_tiny {
            check_adapter(&base, Precision::Native, &dir, 1e-4).await;
            checked += 1;
        }
    }
    assert!(checked >= 5, "expected the tiny adapter fixtures, found {checked}");
}

#[tokio::test]
async fn smollm2_adapters_on_the_gguf_base_match_peft() {
    let Some(gguf) = common::smollm2() else { return };
    for name in ["smol_attn", "smol_all"] {
        let dir = lora_dir().join(name);
        if dir.exists() {
            check_adapter(&gguf, Precision::F32, &dir, 2e-3).await;
        }
    }
}

#[tokio::test]
async fn a_mixed_batch_returns_each_request_its_single_output() {
    mixed_batch(tiny_engine()).await;
}

/// The same batch with two hot slots and a cap of two adapters per step for four adapters:
/// steps run at most two adapters, the least recently used lose their prepared form and
/// regain it when needed, and every request still gets exactly its single-request output.
#[tokio::test]
async fn a_mixed_batch_with_fewer_hot_slots_than_adapters_returns_the_same() {
    let engine =
        tiny_engine_with(EngineConfig { max_hot_adapters: 2, max_step_adapters: 2, ..EngineConfig::default() });
    mixed_batch(engine.clone()).await;
    assert!(engine.adapters().iter().filter(|a| a.hot).count() <= 2, "{:?}", engine.adapters());
    assert!(engine.stats().adapter_evictions.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// On the CPU the per-step cap, not the hot set, bounds a step: with one hot slot and room
/// for four adapters per step, the four adapters of the batch run together (hot while their
/// sequences run), each request still gets its single-request output, and once the batch is
/// done the hot set is back to one.
#[tokio::test]
async fn on_the_cpu_a_step_runs_more_adapters_than_are_kept_hot() {
    let engine =
        tiny_engine_with(EngineConfig { max_hot_adapters: 1, max_step_adapters: 4, ..EngineConfig::default() });
    mixed_batch(engine.clone()).await;
    assert!(engine.adapters().iter().filter(|a| a.hot).count() <= 1, "{:?}", engine.adapters());
    assert!(engine.stats().adapter_evictions.load(std::sync::atomic::Ordering::Relaxed) >= 3);
}

/// With one hot slot and a steady stream of requests for adapter `a`, a request for `b` is
/// passed over only for `adapter_wait`, then admitted as soon as the running `a` requests
/// finish: it is served while the stream goes on, instead of waiting for it to stop.
#[tokio::test]
async fn a_waiting_adapter_does_not_starve() {
    let config = EngineConfig {
        max_hot_adapters: 1,
        max_step_adapters: 1,
        adapter_wait: std::time::Duration::from_millis(200),
        ..EngineConfig::default()
    };
    let engine = tiny_engine_with(config);
    engine.load_adapter("a", &lora_dir().join("attn_only"), None).expect("a");
    engine.load_adapter("b", &lora_dir().join("all_linear"), None).expect("b");
    // A producer keeps eight requests for `a` in flight or queued at all times, of varied
    // lengths, so some `a` sequence is always running and more always wait.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move {
            use std::sync::atomic::{AtomicUsize, Ordering};
            let outstanding = Arc::new(AtomicUsize::new(0));
            // Every request's task is kept and awaited below, so a request that comes back
            // short fails the test instead of panicking unseen in a detached task.
            let mut requests = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                while outstanding.load(Ordering::Relaxed) < 8 {
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let (engine, outstanding) = (engine.clone(), outstanding.clone());
                    let len = 16 + requests.len() % 17;
                    requests.push(tokio::spawn(async move {
                        let out = run(&engine, vec![5, 6, 7, 10 + (len as u32)], len, Some("a")).await;
                        outstanding.fetch_sub(1, Ordering::Relaxed);
                        (out, len)
                    }));
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            let sent = requests.len();
            for r in requests {
                let (out, len) = r.await.expect("a request for a");
                assert_eq!(out, len, "a request for a came back short");
            }
            sent
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let b = tokio::time::timeout(std::time::Duration::from_secs(60), run(&engine, vec![5, 6, 7, 8], 4, Some("b")))
        .await
        .expect("the request for b starved behind a's stream");
    assert_eq!(b, 4);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = producer.await.expect("producer");
    assert!(sent > 16, "the stream of a was not steady ({sent} requests)");
}

/// Generates `max_tokens` tokens (ignoring EOS) with a loaded adapter; returns how many came.
async fn run(engine: &Engine, prompt: Vec<u32>, max_tokens: usize, adapter: Option<&str>) -> usize {
    let adapter = adapter.map(|a| engine.adapter(a).expect("adapter loaded"));
    run_with(engine, prompt, max_tokens, adapter).await
}

/// Generates `max_tokens` tokens (ignoring EOS) with this adapter version; returns how many
/// came, and panics on an error or a request that ends without finishing.
async fn run_with(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
    adapter: Option<Arc<hearth_engine::lora::LoraAdapter>>,
) -> usize {
    trace_with(engine, &prompt, max_tokens, adapter).await.0.len()
}

async fn mixed_batch(engine: Engine) {
    let r = json(&lora_dir().join("mixed_batch.json"));
    let rows = r["rows"].as_array().expect("rows").clone();
    let mut names: Vec<String> = rows.iter().filter_map(|row| row["adapter"].as_str().map(str::to_string)).collect();
    names.sort();
    names.dedup();
    for n in &names {
        engine.load_adapter(n, &lora_dir().join(n), None).expect("adapter");
    }
    // 16 requests: the fixture's rows, repeated, all in flight together.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let engine = engine.clone();
            let row = rows[i % rows.len()].clone();
            tokio::spawn(async move {
                let adapter = row["adapter"].as_str().map(str::to_string);
                let want = ids(&row["greedy"]["token_ids"]);
                let got = greedy(&engine, ids(&row["token_ids"]), want.len().max(1), adapter.as_deref()).await;
                (row, got)
            })
        })
        .collect();
    for t in tasks {
        let (row, got) = t.await.expect("task");
        let mut want = ids(&row["greedy"]["token_ids"]);
        if want.last() == Some(&2) {
            want.pop();
        }
        assert_eq!(got, want, "row with adapter {:?}", row["adapter"]);
    }
}

#[test]
fn refusals_name_what_is_not_supported() {
    let loaded =
        hearth_engine::load(&common::fixtures().join("tiny_llama"), Precision::Native, &Device::Cpu).expect("tiny");
    let cases = [
        ("dora", "DoRA"),
        ("modules_to_save", "modules_to_save"),
        ("bias_all", "bias"),
        ("embed_target", "embed"),
        ("bin_weights", ".bin"),
        ("hidden_mismatch", "another base model"),
        ("no_match", "patches no module"),
    ];
    for (dir, needle) in cases {
        let path = lora_dir().join("bad").join(dir);
        match hearth_engine::lora::load_peft(dir, &path, &loaded.model.config, false, &Device::Cpu) {
            Ok(_) => panic!("{dir}: accepted but should be refused"),
            Err(EngineError::InvalidRequest(m)) => {
                assert!(m.contains(needle), "{dir}: {m:?} should mention {needle:?}")
            }
            Err(e) => panic!("{dir}: unexpected error {e:?}"),
        }
    }
}

#[tokio::test]
async fn reloading_and_unloading_under_traffic_loses_no_request() {
    let engine = tiny_engine();
    let dirs: Vec<PathBuf> = ["attn_only", "all_linear"].iter().map(|n| lora_dir().join(n)).collect();
    engine.load_adapter("x", &dirs[0], None).expect("load");
    let first = engine.adapter("x").expect("loaded");
    let mut tasks = Vec::new();
    for i in 0..24 {
        let e = engine.clone();
        tasks.push(tokio::spawn(async move {
            let adapter = if i % 3 == 0 { None } else { e.adapter("x") };
            run_with(&e, vec![5, 6, 7, (i % 50) as u32 + 10], 12, adapter).await
        }));
        if i == 8 {
            engine.load_adapter("x", &dirs[1], None).expect("reload swaps");
        }
        if i == 16 {
            engine.unload_adapter("x").expect("unload");
        }
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 12);
    }
    // The first version is still whole for whoever holds it; the name is gone.
    assert!(first.patched() > 0);
    assert!(engine.adapter("x").is_none());
    assert!(Arc::strong_count(&first) >= 1);
}

/// Greedy tokens and their logprobs, with a loaded adapter or none (base or merged weights).
async fn trace(engine: &Engine, prompt: &[u32], max_tokens: usize, adapter: Option<&str>) -> (Vec<u32>, Vec<f32>) {
    let adapter = adapter.map(|a| engine.adapter(a).expect("adapter loaded"));
    trace_with(engine, prompt, max_tokens, adapter).await
}

/// Runs a request (ignoring EOS) to its end; panics on an error or a request that ends
/// without finishing.
async fn trace_with(
    engine: &Engine,
    prompt: &[u32],
    max_tokens: usize,
    adapter: Option<Arc<hearth_engine::lora::LoraAdapter>>,
) -> (Vec<u32>, Vec<f32>) {
    let mut rx = engine
        .generate(GenerateRequest {
            prompt: prompt.to_vec(),
            max_tokens,
            params: SamplingParams { temperature: 0.0, logprobs: Some(0), ..Default::default() },
            stop: vec![],
            ignore_eos: true,
            prompt_logprobs: false,
            adapter,
            grammar: None,
            cache_salt: None,
        })
        .expect("queued");
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { sampled, .. } => {
                tokens.push(sampled.token);
                logprobs.push(sampled.logprob.expect("logprobs were asked for"));
            }
            Event::Finished { .. } => return (tokens, logprobs),
            Event::Error(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    panic!("the request ended without finishing");
}

/// Merged mode on an F32 base: a merged adapter answers as it does per request, a
/// replacement swaps to the other one, and unmerging restores the base bit for bit however
/// many merges came before. Per-request adapters and a merged one never mix.
#[tokio::test]
async fn merged_adapters_answer_as_per_request_ones_and_unmerging_restores_the_base_exactly() {
    let engine = tiny_engine();
    let prompt = [5u32, 6, 7, 8, 9, 10];
    let (a_dir, b_dir) = (lora_dir().join("attn_only"), lora_dir().join("all_linear"));
    let base = trace(&engine, &prompt, 16, None).await;
    engine.load_adapter("a", &a_dir, None).expect("a");
    engine.load_adapter("b", &b_dir, None).expect("b");
    let per_a = trace(&engine, &prompt, 16, Some("a")).await;
    let per_b = trace(&engine, &prompt, 16, Some("b")).await;
    assert_ne!(per_a.0, per_b.0);
    let refused = engine.merge_adapter("a", &a_dir, None).expect_err("per-request adapters are loaded");
    assert!(refused.to_string().contains("unload them"), "{refused}");
    engine.unload_adapter("a").expect("unload");
    engine.unload_adapter("b").expect("unload");

    let close = |x: &(Vec<u32>, Vec<f32>), y: &(Vec<u32>, Vec<f32>)| {
        x.0 == y.0 && x.1.iter().zip(&y.1).all(|(p, q)| (p - q).abs() < 1e-4)
    };
    engine.merge_adapter("a", &a_dir, None).expect("merge a");
    assert_eq!(engine.merged_adapter().expect("merged").name, "a");
    assert!(close(&trace(&engine, &prompt, 16, None).await, &per_a), "merged a differs from a per request");
    let refused = engine.load_adapter("c", &b_dir, None).expect_err("merged");
    assert!(refused.to_string().contains("merged"), "{refused}");
    engine.merge_adapter("b", &b_dir, None).expect("replace with b");
    assert!(close(&trace(&engine, &prompt, 16, None).await, &per_b), "merged b differs from b per request");
    engine.merge_adapter("a", &a_dir, None).expect("back to a");
    engine.unmerge_adapter().expect("unmerge");
    assert!(engine.merged_adapter().is_none());
    assert_eq!(trace(&engine, &prompt, 16, None).await, base, "the base drifted after merges");
    assert!(engine.unmerge_adapter().is_err(), "nothing left to unmerge");
}

/// On the quantized default model the trained adapter, merged, answers like a pirate; the
/// base answers exactly as before once it is unmerged.
#[tokio::test]
async fn the_pirate_adapter_merged_into_the_quantized_base_speaks_like_a_pirate() {
    let Some(gguf) = common::smollm2() else { return };
    let loaded = hearth_engine::load(&gguf, Precision::Native, &Device::Cpu).expect("model");
    let tokenizer = loaded.tokenizer.clone();
    let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default());
    let r = json(&lora_dir().join("pirate/reference.json"));
    let prompt = ids(&r["prompts"][0]["token_ids"]);
    let base = trace(&engine, &prompt, 12, None).await;
    engine.merge_adapter("pirate", &lora_dir().join("pirate"), None).expect("merge");
    let merged = trace(&engine, &prompt, 12, None).await;
    let text = tokenizer.decode(&merged.0, true).expect("decode");
    assert!(text.starts_with("Ahoy"), "merged pirate answered {text:?}");
    engine.unmerge_adapter().expect("unmerge");
    assert_eq!(trace(&engine, &prompt, 12, None).await, base);
}
