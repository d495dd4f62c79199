//! Every GGUF weight type hearth serves natively (kept quantized, never expanded) computes what
//! the same file computes dequantized to FP32. The two differ only in how activations meet the
//! weights: a native product quantizes each activation row to 8 bits (Q8_0, Q8_1 or Q8_K,
//! whichever the weight type pairs with), so the logprobs must agree closely, not exactly.
//!
//! The files are made here: a Llama with rows 256 and 512 wide (the K-quants pack 256 values
//! per block, so the tiny fixture model's 64-wide rows cannot hold them), random weights and
//! the tiny fixture's tokenizer, written once per type. The reference suite already ties the
//! dequantized path to transformers; this ties each native kernel to the dequantized path.

mod common;

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hearth_engine::model::{LlamaModel, Logits, SeqInput};
use hearth_engine::sampling::log_softmax;
use hearth_engine::Precision;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 256;
const FFN: usize = 512;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;

/// A GGUF Llama with every matrix (the embedding and output too) in `dtype`; norms stay F32.
fn write_model(path: &Path, dtype: GgmlDType) {
    let tiny = common::fixtures().join("tiny_llama/model.gguf");
    let mut f = std::fs::File::open(&tiny).expect("tiny gguf");
    let content = gguf_file::Content::read(&mut f).expect("tiny gguf reads");
    let vocab = content.metadata["tokenizer.ggml.tokens"].to_vec().expect("tokens").len();

    // The tokenizer and everything else from the fixture; the shape keys are this model's.
    let shape = [
        ("llama.embedding_length", HIDDEN),
        ("llama.feed_forward_length", FFN),
        ("llama.attention.head_count", HEADS),
        ("llama.attention.head_count_kv", KV_HEADS),
        ("llama.block_count", LAYERS),
        ("llama.rope.dimension_count", HIDDEN / HEADS),
    ];
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !shape.iter().any(|(s, _)| s == k) && k.as_str() != "llama.attention.key_length")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.extend(shape.iter().map(|(k, v)| (k.to_string(), gguf_file::Value::U32(*v as u32))));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Uniform weights with variance 1/fan-in keep every layer's activations near unit scale.
    let mut matrix = |rows: usize, cols: usize| {
        let a = (3.0 / cols as f32).sqrt();
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-a..a)).collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor");
        QTensor::quantize(&t, dtype).expect("quantizes")
    };
    let ones = |n: usize| {
        let t = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).expect("tensor");
        QTensor::quantize(&t, GgmlDType::F32).expect("f32")
    };
    let head_dim = HIDDEN / HEADS;
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), matrix(vocab, HIDDEN)),
        ("output_norm.weight".into(), ones(HIDDEN)),
        ("output.weight".into(), matrix(vocab, HIDDEN)),
    ];
    for l in 0..LAYERS {
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        tensors.push((b("attn_norm"), ones(HIDDEN)));
        tensors.push((b("attn_q"), matrix(HEADS * head_dim, HIDDEN)));
        tensors.push((b("attn_k"), matrix(KV_HEADS * head_dim, HIDDEN)));
        tensors.push((b("attn_v"), matrix(KV_HEADS * head_dim, HIDDEN)));
        tensors.push((b("attn_output"), matrix(HIDDEN, HEADS * head_dim)));
        tensors.push((b("ffn_norm"), ones(HIDDEN)));
        tensors.push((b("ffn_gate"), matrix(FFN, HIDDEN)));
        tensors.push((b("ffn_up"), matrix(FFN, HIDDEN)));
        tensors.push((b("ffn_down"), matrix(HIDDEN, FFN)));
    }
    let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut out, &meta, &tens).expect("write gguf");
}

/// Log-softmax rows for every position of `tokens`.
fn logprobs(model: &LlamaModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(hearth_engine::KvDtype::F32);
    let out = model
        .forward(&mut [SeqInput { tokens, cache: &mut cache, logits: Logits::All, adapter: None }])
        .expect("forward");
    let rows: Vec<Vec<f32>> = out[0].as_ref().expect("logits").to_vec2().expect("rows");
    rows.iter().map(|r| log_softmax(r)).collect()
}

#[test]
fn every_quantized_type_served_natively_matches_its_dequantized_self() {
    // The error is the 8-bit activations' alone, so it does not grow with the weights'
    // coarseness: measured here, mean |Δ| 0.012 to 0.021 and max 0.07 to 0.14 over every
    // vocabulary entry at every position. A wrong kernel (a misread block, a bad scale) is off
    // by whole units. The bounds leave room for the AVX2 and AVX-512 paths to round apart.
    const MEAN_BOUND: f64 = 0.03;
    const MAX_BOUND: f32 = 0.25;
    let types = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let prompts: Vec<Vec<u32>> =
        [7usize, 23, 41].iter().map(|&n| (0..n).map(|_| rng.gen_range(3..512u32)).collect()).collect();
    let mut report = Vec::new();
    for dtype in types {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        write_model(&path, dtype);
        let native = hearth_engine::load(&path, Precision::Native, &Device::Cpu).expect("loads natively");
        let dense = hearth_engine::load(&path, Precision::F32, &Device::Cpu).expect("loads dequantized");
        // Served quantized: the weights take no more than a third of their FP32 size (8.5
        // bits per weight at most, against 32).
        let (nb, db) = (native.model.weight_bytes(), dense.model.weight_bytes());
        assert!(nb * 3 < db, "{dtype:?}: native weights take {nb} bytes against {db} dequantized");
        let mut max: f32 = 0.0;
        let (mut sum, mut n) = (0f64, 0usize);
        for p in &prompts {
            let (a, b) = (logprobs(&native.model, p), logprobs(&dense.model, p));
            for (ra, rb) in a.iter().zip(&b) {
                for (x, y) in ra.iter().zip(rb) {
                    max = max.max((x - y).abs());
                    sum += (x - y).abs() as f64;
                    n += 1;
                }
            }
        }
        let mean = sum / n as f64;
        report.push(format!("{dtype:?}: max {max:.4}, mean {mean:.4}, {nb} weight bytes"));
        assert!(
            mean <= MEAN_BOUND && max <= MAX_BOUND,
            "{dtype:?}: native against dequantized, mean |Δlogprob| {mean} (bound {MEAN_BOUND}), max {max} (bound {MAX_BOUND})"
        );
    }
    eprintln!("|Δlogprob|, native against dequantized:\n  {}", report.join("\n  "));
}
