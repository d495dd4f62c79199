//! Long prompts: a prompt prefilled in many chunks gives the logprobs of one pass, and a
//! short request sent while a long prompt is being prefilled is answered before it.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use candle_core::Device;
use hearth_engine::model::{LlamaModel, Logits, SeqInput};
use hearth_engine::sampling::log_softmax;
use hearth_engine::{Engine, EngineConfig, Event, GenerateRequest, KvDtype, Precision, SamplingParams};

/// Varied ids clear of the special tokens.
fn prompt(n: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + (i * 7919 + seed * 104_729) % (vocab as u32 - 100)).collect()
}

/// Each position's logprob of the next prompt token, the prompt run in pieces of `chunk`
/// tokens through one cache.
fn logprobs_in_chunks(model: &LlamaModel, tokens: &[u32], chunk: usize, dtype: KvDtype) -> Vec<f32> {
    let mut cache = model.new_cache(dtype);
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for piece in tokens.chunks(chunk) {
        let out = model
            .forward(&mut [SeqInput { tokens: piece, cache: &mut cache, logits: Logits::All, adapter: None }])
            .expect("forward");
        rows.extend(out[0].as_ref().expect("logits").to_vec2::<f32>().expect("rows"));
    }
    (0..tokens.len() - 1).map(|j| log_softmax(&rows[j])[tokens[j + 1] as usize]).collect()
}

/// SmolLM2 on a 700-token prompt, in one pass and in chunks of 1, 37 and 256 tokens (chunks
/// that end inside key blocks and across the attention kernel's key ranges, and single rows as
/// in decoding), with both cache types: every logprob equal to the one-pass figure, to the
/// bit. Attention is computed the same whatever the chunking (see `kernels::attention`), and
/// anything less would not do: the quantized activations downstream turn a last-bit
/// difference into 0.1 in a logprob 30 layers later.
#[test]
fn a_prompt_in_chunks_gives_the_logprobs_of_one_pass() {
    let Some(gguf) = common::smollm2() else { return };
    let loaded = hearth_engine::load(&gguf, Precision::Native, &Device::Cpu).expect("model loads");
    let model = &loaded.model;
    let tokens = prompt(700, model.config.vocab_size, 1);
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let whole = logprobs_in_chunks(model, &tokens, tokens.len(), dtype);
        // One token at a time is slow: the first 120 positions are enough for that path.
        for (chunk, upto) in [(37, tokens.len()), (256, tokens.len()), (1, 120)] {
            let pieces = logprobs_in_chunks(model, &tokens[..upto], chunk, dtype);
            let worst = pieces.iter().zip(&whole).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let first = pieces.iter().zip(&whole).position(|(a, b)| a != b);
            assert!(worst == 0.0, "{dtype:?} cache, chunks of {chunk}: max |Δlogprob| {worst}, first at {first:?}");
        }
    }
}

/// The same through the engine: prompt logprobs with a step budget of 48 token-equivalents
/// (the prompt goes in many steps) equal those with a budget that takes it whole.
#[tokio::test]
async fn the_scheduler_chunks_a_prompt_without_changing_its_logprobs() {
    let Some(gguf) = common::smollm2() else { return };
    let mut got = Vec::new();
    for max_step_tokens in [48, 8192] {
        let loaded = hearth_engine::load(&gguf, Precision::Native, &Device::Cpu).expect("model loads");
        let tokens = prompt(500, loaded.model.config.vocab_size, 2);
        let config = EngineConfig { max_step_tokens, ..EngineConfig::default() };
        let engine = Engine::start(loaded.model, loaded.tokenizer, config);
        let mut rx = engine.generate(request(tokens, true)).expect("queued");
        let mut logprobs = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::PromptLogprobs(l) => logprobs = Some(l),
                Event::Finished { .. } => break,
                Event::Error(e) => panic!("{e}"),
                Event::Token { .. } => {}
            }
        }
        let steps = engine.stats().steps.load(Ordering::Relaxed);
        got.push((logprobs.expect("prompt logprobs"), steps));
    }
    let ((chunked, many), (whole, few)) = (&got[0], &got[1]);
    assert!(*many >= 10 && *few <= 2, "steps: {many} with the small budget, {few} with the large one");
    assert_eq!(chunked.len(), whole.len());
    for (i, (a, b)) in chunked.iter().zip(whole).enumerate() {
        assert_eq!(a.token, b.token, "position {i}");
        let (a, b) = (a.logprob.unwrap_or(f32::NAN), b.logprob.unwrap_or(f32::NAN));
        assert!((a - b).abs() <= 1e-5 || (a.is_nan() && b.is_nan()), "position {i}: {a} vs {b}");
    }
}

fn request(prompt: Vec<u32>, prompt_logprobs: bool) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens: 1,
        params: SamplingParams { temperature: 0.0, ..Default::default() },
        stop: Vec::new(),
        ignore_eos: true,
        prompt_logprobs,
        adapter: None,
        grammar: None,
        cache_salt: None,
    }
}

/// The step bound: a 1,500-token prompt needs many steps of a 64-token-equivalent budget; an
/// 8-token request sent once the long prompt's first step has run gets its token while the
/// long prompt is still being prefilled (the long prompt has produced nothing yet).
#[tokio::test]
async fn a_short_request_is_answered_during_a_long_prefill() {
    let Some(gguf) = common::smollm2() else { return };
    let loaded = hearth_engine::load(&gguf, Precision::Native, &Device::Cpu).expect("model loads");
    let vocab = loaded.model.config.vocab_size;
    let config = EngineConfig { max_step_tokens: 64, ..EngineConfig::default() };
    let engine = Engine::start(loaded.model, loaded.tokenizer, config);
    let mut long = engine.generate(request(prompt(1500, vocab, 3), false)).expect("queued");
    let steps = &engine.stats().steps;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while steps.load(Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the long prompt never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut short = engine.generate(request(prompt(8, vocab, 4), false)).expect("queued");
    loop {
        match short.recv().await.expect("the short request ends") {
            Event::Token { .. } => break,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    let at_short = steps.load(Ordering::Relaxed);
    assert!(long.try_recv().is_err(), "the long prompt finished first");
    // Then the long prompt still completes.
    loop {
        match long.recv().await.expect("the long request ends") {
            Event::Finished { .. } => break,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    let total = steps.load(Ordering::Relaxed);
    assert!(total >= at_short + 5, "the short request waited for most of the long prefill: step {at_short} of {total}");
}
