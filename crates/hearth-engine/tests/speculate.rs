//! Prompt-lookup speculation on the default model: with it on, every request gets the tokens
//! it gets with it off (greedy and seeded sampling alike, with adapters in the same batch, with
//! stop strings), logprobs stay within 1e-4, and on a task whose answer repeats its prompt
//! most drafted tokens are accepted.

mod common;

use std::sync::atomic::Ordering;

use candle_core::Device;
use hearth_engine::{Engine, EngineConfig, Event, GenerateRequest, Precision, SamplingParams};

fn engine(ngram: usize) -> Option<Engine> {
    let path = common::smollm2()?;
    let loaded = hearth_engine::load(&path, Precision::Native, &Device::Cpu).expect("smollm2 loads");
    let config =
        EngineConfig { ngram_speculation: ngram, draft_tokens: 4, prefix_cache: false, ..EngineConfig::default() };
    let engine = Engine::start(loaded.model, loaded.tokenizer, config);
    engine.load_adapter("pirate", &common::fixtures().join("lora/pirate"), None).expect("adapter");
    Some(engine)
}

const PARAGRAPH: &str = "The lighthouse keeper climbed the stairs every evening at dusk, lit the great lamp, \
    and wrote the weather in a worn leather book: wind from the west, waves high, two ships passing north.";

fn chat(engine: &Engine, user: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
    engine.tokenizer().encode(&text, false).expect("encodes")
}

#[derive(Debug, PartialEq)]
struct Out {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
}

fn request(
    engine: &Engine,
    prompt: Vec<u32>,
    temperature: f32,
    seed: Option<u64>,
    adapter: Option<&str>,
    stop: &[&str],
) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens: 48,
        params: SamplingParams { temperature, seed, logprobs: Some(0), ..Default::default() },
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ignore_eos: false,
        prompt_logprobs: false,
        adapter: adapter.map(|a| engine.adapter(a).expect("loaded")),
        grammar: None,
        cache_salt: None,
    }
}

async fn run(engine: &Engine, reqs: Vec<GenerateRequest>) -> Vec<Out> {
    let rxs: Vec<_> = reqs.into_iter().map(|r| engine.generate(r).expect("queued")).collect();
    let mut outs = Vec::new();
    for mut rx in rxs {
        let mut out = Out { tokens: vec![], logprobs: vec![], text: String::new() };
        loop {
            match rx.recv().await.expect("an event") {
                Event::Token { sampled, text } => {
                    out.tokens.push(sampled.token);
                    out.logprobs.push(sampled.logprob.expect("asked for"));
                    out.text.push_str(&text);
                }
                Event::Finished { text, .. } => {
                    out.text.push_str(&text);
                    break;
                }
                Event::Error(e) => panic!("{e}"),
                Event::PromptLogprobs(_) => {}
            }
        }
        outs.push(out);
    }
    outs
}

fn assert_same(got: &[Out], want: &[Out]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.tokens, w.tokens, "request {i}: tokens");
        assert_eq!(g.text, w.text, "request {i}: text");
        let worst = g.logprobs.iter().zip(&w.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "request {i}: logprobs differ by {worst}");
    }
}

#[tokio::test]
async fn speculation_changes_no_output_and_drafts_are_accepted_on_repetition() {
    let Some(plain) = engine(0) else { return };
    let fast = engine(3).expect("loads");
    let rewrite = chat(&plain, &format!("Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}"));
    let question = chat(&plain, "What is the capital of France?");
    // A batch of greedy and seeded requests, base and LoRA, one with a stop string.
    let batch = |e: &Engine| {
        let mut reqs = vec![
            request(e, rewrite.clone(), 0.0, None, None, &[]),
            request(e, rewrite.clone(), 0.0, None, Some("pirate"), &[]),
            request(e, question.clone(), 0.0, None, None, &[]),
            request(e, rewrite.clone(), 0.0, None, None, &["waves"]),
        ];
        for seed in 0..8 {
            reqs.push(request(
                e,
                rewrite.clone(),
                0.8,
                Some(seed),
                if seed % 2 == 0 { None } else { Some("pirate") },
                &[],
            ));
        }
        reqs
    };
    let want = run(&plain, batch(&plain)).await;
    let got = run(&fast, batch(&fast)).await;
    assert_same(&got, &want);
    assert!(!got[3].text.contains("waves") && got[3].text.len() < got[0].text.len(), "the stop string cut the text");
    // One at a time as well: a lone sequence is where speculation matters most.
    for i in [0, 1, 4] {
        let alone = run(&fast, vec![batch(&fast).remove(i)]).await;
        assert_same(&alone, &want[i..=i]);
    }
    let stats = fast.stats();
    let (drafted, accepted) =
        (stats.drafted_tokens.load(Ordering::Relaxed), stats.accepted_tokens.load(Ordering::Relaxed));
    assert!(drafted > 0, "nothing was drafted");
    let rate = accepted as f64 / drafted as f64;
    eprintln!("speculation: {accepted} of {drafted} drafted tokens accepted ({:.0}%)", rate * 100.0);
    assert!(rate > 0.5, "on a rewrite most drafts should be accepted: {accepted} of {drafted}");
    assert_eq!(plain.stats().drafted_tokens.load(Ordering::Relaxed), 0);
}
