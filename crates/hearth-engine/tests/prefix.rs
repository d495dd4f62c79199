//! The prefix cache on the default model: a request that starts from cached blocks gets what
//! it gets computing everything (the same greedy tokens, logprobs within 1e-5), for the base
//! and for adapters; blocks are never shared across adapters or isolation keys; and under a
//! small memory bound idle blocks are evicted while answers stay the same.

mod common;

use candle_core::Device;
use hearth_engine::{Engine, EngineConfig, Event, GenerateRequest, Precision, SamplingParams};

fn engine(config: EngineConfig) -> Option<Engine> {
    let path = common::smollm2()?;
    let loaded = hearth_engine::load(&path, Precision::Native, &Device::Cpu).expect("smollm2 loads");
    let engine = Engine::start(loaded.model, loaded.tokenizer, config);
    for name in ["smol_attn", "smol_all"] {
        engine.load_adapter(name, &common::fixtures().join("lora").join(name), None).expect("adapter");
    }
    Some(engine)
}

/// A long shared beginning (a system prompt of about 400 tokens) and a question after it.
fn prompt(engine: &Engine, question: &str) -> Vec<u32> {
    let rules: String = (1..=40)
        .map(|i| format!("Rule {i}: answer politely, cite rule {i} when it applies, and keep answers short. "))
        .collect();
    let text = format!(
        "<|im_start|>system\n{rules}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    engine.tokenizer().encode(&text, false).expect("encodes")
}

struct Out {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    cached: usize,
}

async fn greedy(engine: &Engine, prompt: Vec<u32>, adapter: Option<&str>, salt: Option<&str>) -> Out {
    let mut rx = engine
        .generate(GenerateRequest {
            prompt,
            max_tokens: 24,
            params: SamplingParams { temperature: 0.0, logprobs: Some(0), ..Default::default() },
            stop: vec![],
            ignore_eos: true,
            prompt_logprobs: false,
            adapter: adapter.map(|a| engine.adapter(a).expect("loaded")),
            grammar: None,
            cache_salt: salt.map(str::to_string),
        })
        .expect("queued");
    let mut out = Out { tokens: vec![], logprobs: vec![], cached: 0 };
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { sampled, .. } => {
                out.tokens.push(sampled.token);
                out.logprobs.push(sampled.logprob.expect("asked for"));
            }
            Event::Finished { cached_tokens, .. } => {
                out.cached = cached_tokens;
                return out;
            }
            Event::Error(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    panic!("ended without finishing")
}

fn assert_same(got: &Out, want: &Out, what: &str) {
    assert_eq!(got.tokens, want.tokens, "{what}: greedy tokens");
    let worst = got.logprobs.iter().zip(&want.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{what}: logprobs differ by {worst}");
}

#[tokio::test]
async fn answers_from_cached_blocks_are_the_answers_computed_cold() {
    let Some(cold) = engine(EngineConfig { prefix_cache: false, ..EngineConfig::default() }) else { return };
    let warm = engine(EngineConfig::default()).expect("loads");
    for adapter in [None, Some("smol_attn"), Some("smol_all")] {
        let first = prompt(&warm, "What is rule 7?");
        let second = prompt(&warm, "Which rule is about politeness?");
        let want = greedy(&cold, second.clone(), adapter, None).await;
        assert_eq!(want.cached, 0);
        // The first request fills the cache; the second starts from its blocks.
        let filled = greedy(&warm, first.clone(), adapter, None).await;
        assert_same(&filled, &greedy(&cold, first, adapter, None).await, "the filling request");
        let got = greedy(&warm, second.clone(), adapter, None).await;
        assert!(
            got.cached >= 320,
            "{adapter:?}: only {} of {} prompt tokens came from the cache",
            got.cached,
            second.len()
        );
        assert_same(&got, &want, &format!("{adapter:?} from the cache"));
        // Its own answer is cached too: the same prompt again starts from nearly all of it.
        let again = greedy(&warm, second.clone(), adapter, None).await;
        assert!(again.cached + 128 > second.len(), "{} of {}", again.cached, second.len());
        assert_same(&again, &want, &format!("{adapter:?} again"));
    }
}

#[tokio::test]
async fn adapters_and_isolation_keys_never_share_blocks() {
    let Some(engine) = engine(EngineConfig::default()) else { return };
    let p = prompt(&engine, "What is rule 3?");
    greedy(&engine, p.clone(), None, None).await;
    assert_eq!(
        greedy(&engine, p.clone(), Some("smol_attn"), None).await.cached,
        0,
        "an adapter used the base's blocks"
    );
    assert_eq!(greedy(&engine, p.clone(), Some("smol_all"), None).await.cached, 0, "two adapters shared blocks");
    assert!(greedy(&engine, p.clone(), Some("smol_all"), None).await.cached > 0);
    greedy(&engine, p.clone(), None, Some("tenant-a")).await;
    assert_eq!(greedy(&engine, p.clone(), None, Some("tenant-b")).await.cached, 0, "tenants shared blocks");
    assert!(greedy(&engine, p.clone(), None, Some("tenant-a")).await.cached > 0);
    // Blocks follow an adapter's content, not its name: a name reloaded with other files
    // never meets its old version's blocks, and the same files under another name do.
    engine.load_adapter("smol_all", &common::fixtures().join("lora/pirate"), None).expect("reload");
    assert_eq!(greedy(&engine, p.clone(), Some("smol_all"), None).await.cached, 0, "a new version used old blocks");
    engine.load_adapter("smol_attn", &common::fixtures().join("lora/pirate"), None).expect("reload");
    assert!(greedy(&engine, p.clone(), Some("smol_attn"), None).await.cached > 0, "the same content found nothing");
}

#[tokio::test]
async fn under_a_small_memory_bound_idle_blocks_are_evicted_and_answers_hold() {
    // Room for about two sequences' worth of blocks: each new prompt evicts older ones.
    let bound = 2 * 600 * 30 * 3 * 64 * 2 * 2;
    let Some(small) = engine(EngineConfig { kv_cache_bytes: bound, ..EngineConfig::default() }) else { return };
    let cold = engine(EngineConfig { prefix_cache: false, ..EngineConfig::default() }).expect("loads");
    let questions: Vec<String> = (0..6).map(|i| format!("Variant {i}: what is rule {i}?")).collect();
    for q in &questions {
        // Different beginnings, so every prompt brings its own blocks.
        let p = prompt(&small, &format!("{q} {}", "Think. ".repeat(40)));
        let p = [p[p.len() / 2..].to_vec(), p[..p.len() / 2].to_vec()].concat();
        assert_same(&greedy(&small, p.clone(), None, None).await, &greedy(&cold, p, None, None).await, q);
    }
    let evicted = small.stats().prefix.lock().expect("stats").evictions;
    assert!(evicted > 0, "nothing was evicted under a bound of {bound} bytes");
    assert!(small.stats().prefix_bytes.load(std::sync::atomic::Ordering::Relaxed) <= bound);
}
