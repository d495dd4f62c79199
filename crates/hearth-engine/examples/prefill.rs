//! Prompt processing through the engine: tokens per second of prefill for prompts of several
//! lengths (one request, `max_tokens` 1, so the figure is the prompt's time to the first
//! token), and batch-1 decode at the longest context. For iterating on the engine; the
//! comparison with llama.cpp is `scripts/bench-engine`.
//!
//! `cargo run --release -p hearth-engine --example prefill [-- MODEL.gguf [LEN ...]]`
//! (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, 512 2048 4000). Threads:
//! RAYON_NUM_THREADS; the step budget: HEARTH_MAX_STEP_TOKENS, as for `hearth engine`.

use std::time::Instant;

use candle_core::Device;
use hearth_engine::{Engine, EngineConfig, Event, GenerateRequest, Precision, SamplingParams};

/// Runs one request; returns the time to its first token and the times between the rest.
async fn run(engine: &Engine, prompt: Vec<u32>, max_tokens: usize) -> (f64, Vec<f64>) {
    let t0 = Instant::now();
    let mut rx = engine
        .generate(GenerateRequest {
            prompt,
            max_tokens,
            params: SamplingParams { temperature: 0.0, ..Default::default() },
            stop: Vec::new(),
            ignore_eos: true,
            prompt_logprobs: false,
            adapter: None,
            grammar: None,
            cache_salt: None,
        })
        .expect("queued");
    let (mut first, mut last, mut gaps) = (None, t0, Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { .. } => {
                let now = Instant::now();
                if first.is_none() {
                    first = Some((now - t0).as_secs_f64());
                } else {
                    gaps.push((now - last).as_secs_f64());
                }
                last = now;
            }
            Event::Finished { .. } => break,
            Event::Error(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    (first.expect("a token"), gaps)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).cloned().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_string());
    let lens: Vec<usize> = if args.len() > 2 {
        args[2..].iter().map(|s| s.parse()).collect::<Result<_, _>>()?
    } else {
        vec![512, 2048, 4000]
    };
    let loaded = hearth_engine::load(std::path::Path::new(&model), Precision::Native, &Device::Cpu)?;
    let vocab = loaded.model.config.vocab_size as u32;
    let mut config = EngineConfig::default();
    if let Some(n) = std::env::var("HEARTH_MAX_STEP_TOKENS").ok().and_then(|s| s.parse().ok()) {
        config.max_step_tokens = n;
    }
    let engine = Engine::start(loaded.model, loaded.tokenizer, config);
    // Varied, deterministic token ids (no special tokens: ids from 100 up).
    let prompt = |n: usize| (0..n).map(|i| 100 + (i as u32 * 7919) % (vocab - 100)).collect::<Vec<u32>>();
    run(&engine, prompt(64), 1).await; // warm-up
    let mut alone = 0.0;
    for &n in &lens {
        let (ttft, _) = run(&engine, prompt(n), 1).await;
        println!("prefill {n:>5} tokens: {:8.1} tok/s ({ttft:.3} s)", n as f64 / ttft);
        alone = ttft;
    }
    let n = *lens.iter().max().unwrap_or(&512);
    // A short request sent while a long prompt is being prefilled, at 10%, 25% ... 70% of
    // the long prompt's time alone: its time to first token.
    let mut ttfts = Vec::new();
    for i in 0..5u32 {
        let long = run(&engine, prompt(n), 1);
        let short = async {
            tokio::time::sleep(std::time::Duration::from_secs_f64(alone * (0.1 + 0.15 * i as f64))).await;
            let p: Vec<u32> = (0..8).map(|t| 200 + i * 8 + t).collect();
            run(&engine, p, 1).await.0
        };
        let ((long_ttft, _), short_ttft) = tokio::join!(long, short);
        println!("  short request during the {n}-token prefill: {short_ttft:.3} s (the long prompt: {long_ttft:.3} s)");
        ttfts.push(short_ttft);
    }
    ttfts.sort_by(f64::total_cmp);
    println!("short request's first token during a {n}-token prefill, p50 of 5: {:.3} s", ttfts[2]);
    let (_, gaps) = run(&engine, prompt(n), 65).await;
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    println!("decode at {n} tokens of context: {:8.1} tok/s", 1.0 / mean);
    Ok(())
}
