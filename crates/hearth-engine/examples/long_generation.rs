//! How the time per generated token changes over one long generation: one request, batch 1,
//! 2,000 tokens (end-of-sequence ignored, a stop string that never matches, so the text is
//! scanned for it every token), timed token by token and reported per window of 250 tokens.
//! Then the same tokens through the model's forward pass alone (a second copy of the model,
//! one decode step per token on a growing KV cache): what is left is the engine's own work per
//! token (sampling, detokenization, stop strings, events). Then the detokenization alone, both
//! ways the engine has done it: decoding the whole generation for every token, and streaming
//! (`DecodeStream`).
//!
//! `cargo run --release -p hearth-engine --example long_generation [-- MODEL.gguf [TOKENS]]`
//! (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, 2000). Threads: RAYON_NUM_THREADS.

use std::time::{Duration, Instant};

use candle_core::Device;
use hearth_engine::{Engine, EngineConfig, Event, GenerateRequest, Precision, SamplingParams};

const WINDOW: usize = 250;

fn per_window(times: &[Duration]) -> Vec<f64> {
    times.chunks(WINDOW).map(|w| w.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / w.len() as f64).collect()
}

fn print_row(label: &str, ms: &[f64]) {
    let cells: Vec<String> = ms.iter().map(|m| format!("{m:7.3}")).collect();
    println!("{label:<28} {}", cells.join(" "));
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).cloned().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_string());
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let loaded = hearth_engine::load(std::path::Path::new(&model), Precision::Native, &Device::Cpu)?;
    let tokenizer = loaded.tokenizer.clone();
    let prompt = tokenizer.encode("Write a long story about a lighthouse keeper and the sea.", false)?;
    let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default());
    let mut rx = engine.generate(GenerateRequest {
        prompt,
        max_tokens: n,
        // Sampled, so the text keeps changing; seeded, so two runs generate the same tokens.
        params: SamplingParams { temperature: 1.0, seed: Some(7), ..Default::default() },
        stop: vec!["\n\nUser: never".to_string()],
        ignore_eos: true,
        prompt_logprobs: false,
        adapter: None,
        grammar: None,
        cache_salt: None,
    })?;
    let mut last = Instant::now();
    let mut gaps = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { sampled, text: t } => {
                let now = Instant::now();
                gaps.push(now - last);
                last = now;
                ids.push(sampled.token);
                text.push_str(&t);
            }
            Event::Finished { text: t, .. } => {
                text.push_str(&t);
                break;
            }
            Event::Error(e) => return Err(e.into()),
            Event::PromptLogprobs(_) => {}
        }
    }
    // The first gap includes the prompt's prefill.
    gaps.remove(0);
    let header: Vec<String> = (0..gaps.len().div_ceil(WINDOW)).map(|i| format!("{:>7}", (i + 1) * WINDOW)).collect();
    println!("{} tokens generated, {} characters; ms per token, by window of {WINDOW} tokens:", ids.len(), text.len());
    println!("{:<28} {}", "tokens up to", header.join(" "));
    print_row("engine (end to end)", &per_window(&gaps));

    // The forward pass alone over the same tokens: prefill the prompt, then one step per
    // generated token, as the engine ran them.
    let again = hearth_engine::load(std::path::Path::new(&model), Precision::Native, &Device::Cpu)?;
    let model = again.model;
    let mut cache = model.new_cache(model.default_kv_dtype());
    let prompt = tokenizer.encode("Write a long story about a lighthouse keeper and the sea.", false)?;
    let step = |tokens: &[u32], cache: &mut hearth_engine::model::KvCache| {
        let mut input = [hearth_engine::model::SeqInput {
            tokens,
            cache,
            logits: hearth_engine::model::Logits::Last,
            adapter: None,
        }];
        model.forward(&mut input).map(|_| ())
    };
    step(&prompt, &mut cache)?;
    let mut forward = Vec::with_capacity(ids.len());
    for id in &ids[..ids.len() - 1] {
        let t = Instant::now();
        step(std::slice::from_ref(id), &mut cache)?;
        forward.push(t.elapsed());
    }
    let fw = per_window(&forward);
    print_row("model forward alone", &fw);
    let overhead: Vec<f64> = per_window(&gaps).iter().zip(&fw).map(|(e, f)| e - f).collect();
    print_row("engine's own work", &overhead);

    // Detokenization alone, over the same tokens.
    let mut whole = Vec::with_capacity(ids.len());
    for k in 1..=ids.len() {
        let t = Instant::now();
        std::hint::black_box(tokenizer.decode(&ids[..k], true)?);
        whole.push(t.elapsed());
    }
    let mut stream = tokenizer.decode_stream(true);
    let mut streamed = Vec::with_capacity(ids.len());
    for &id in &ids {
        let t = Instant::now();
        std::hint::black_box(stream.step(&tokenizer, id)?);
        streamed.push(t.elapsed());
    }
    let micros = |d: &[Duration]| per_window(d).into_iter().map(|ms| ms * 1e3).collect::<Vec<_>>();
    println!("detokenization alone, µs per token:");
    print_row("decode whole text each token", &micros(&whole));
    print_row("decode stream", &micros(&streamed));
    Ok(())
}
