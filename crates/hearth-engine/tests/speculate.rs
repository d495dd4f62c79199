//! Speculation on the default model, by prompt lookup and by a draft model (the Q4_1 file
//! drafting for the same model in FP32): with it on, every request gets the tokens it gets
//! with it off (greedy and seeded sampling alike, with adapters in the same batch, with stop
//! strings), logprobs stay within 1e-4, and drafts are accepted where they should be. A
//! seeded request samples each emitted token from the target's own distribution with its own
//! random stream, so equal tokens over many seeds is the distribution test, made exact.

mod common;

use std::sync::atomic::Ordering;

use candle_core::Device;
use hearth_engine::speculate::DraftModel;
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

/// SmolLM2 in FP32, with its own Q4_1 file as a draft model proposing `draft` tokens (none:
/// no draft model).
fn fp32_engine(draft: Option<usize>) -> Option<Engine> {
    let path = common::smollm2()?;
    let target = hearth_engine::load(&path, Precision::F32, &Device::Cpu).expect("smollm2 loads");
    let config = EngineConfig { draft_tokens: draft.unwrap_or(4), prefix_cache: false, ..EngineConfig::default() };
    let drafter = draft.map(|_| {
        let d = hearth_engine::load(&path, Precision::Native, &Device::Cpu).expect("the draft loads");
        DraftModel::new(d.model, &d.tokenizer, &target.tokenizer).expect("same tokenizer")
    });
    let engine = Engine::start_with_draft(target.model, target.tokenizer, config, drafter);
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

#[tokio::test]
async fn a_draft_model_changes_no_output_and_most_of_its_drafts_are_accepted() {
    let Some(plain) = fp32_engine(None) else { return };
    let fast = fp32_engine(Some(4)).expect("loads");
    let rewrite = chat(&plain, &format!("Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}"));
    let question = chat(&plain, "Write two sentences about the sea.");
    // Greedy and seeded, base and LoRA (the draft proposes without the adapter), a stop
    // string, in one batch.
    let batch = |e: &Engine| {
        let mut reqs = vec![
            request(e, question.clone(), 0.0, None, None, &[]),
            request(e, rewrite.clone(), 0.0, None, Some("pirate"), &[]),
            request(e, rewrite.clone(), 0.0, None, None, &["waves"]),
        ];
        for seed in 0..12 {
            let adapter = if seed % 3 == 2 { Some("pirate") } else { None };
            reqs.push(request(e, question.clone(), 1.0, Some(seed), adapter, &[]));
        }
        reqs
    };
    let want = run(&plain, batch(&plain)).await;
    let got = run(&fast, batch(&fast)).await;
    assert_same(&got, &want);
    let counts = |e: &Engine| {
        let s = e.stats();
        (s.drafted_tokens.load(Ordering::Relaxed), s.accepted_tokens.load(Ordering::Relaxed))
    };
    let (drafted, accepted) = counts(&fast);
    eprintln!("draft model, mixed batch: {accepted} of {drafted} drafted tokens accepted");
    assert!(drafted > 0 && accepted > 0, "nothing drafted or nothing accepted: {accepted} of {drafted}");
    assert!(!got[2].text.contains("waves"), "the stop string cut the text");
    for i in [3, 0] {
        let alone = run(&fast, vec![batch(&fast).remove(i)]).await;
        assert_same(&alone, &want[i..=i]);
    }
    // The greedy base request alone (run last): the draft is the same model quantized, so it
    // nearly always agrees with it.
    let before = counts(&fast);
    run(&fast, vec![batch(&fast).remove(0)]).await;
    let (drafted, accepted) = (counts(&fast).0 - before.0, counts(&fast).1 - before.1);
    let rate = accepted as f64 / drafted.max(1) as f64;
    eprintln!("draft model, greedy: {accepted} of {drafted} drafted tokens accepted ({:.0}%)", rate * 100.0);
    assert!(rate > 0.6, "a Q4_1 draft of the same model should mostly agree: {accepted} of {drafted}");
}

#[test]
fn a_draft_model_with_another_tokenizer_is_refused_saying_so() {
    let Some(path) = common::smollm2() else { return };
    let target = hearth_engine::load(&path, Precision::Native, &Device::Cpu).expect("smollm2 loads");
    let other = hearth_engine::load(&common::fixtures().join("tiny_llama"), Precision::Native, &Device::Cpu)
        .expect("the fixture loads");
    let err = DraftModel::new(other.model, &other.tokenizer, &target.tokenizer).err().expect("refused");
    assert!(err.to_string().contains("tokenizer is not the target's"), "{err}");
}
