//! Test helpers: build tiny safetensors files, GGUF files, Hugging Face and PEFT directories by
//! hand (header plus zero bytes), so the inspectors are tested on real file layouts.

use std::path::Path;

use serde_json::{json, Value};

use super::gguf::{ggml_type, tensor_bytes};
use super::safetensors::dtype_size;
use super::ModelDims;

/// (name, safetensors dtype, shape).
pub type TensorSpec = (String, &'static str, Vec<u64>);

pub fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("write test file");
}

pub fn write_json(dir: &Path, name: &str, value: &Value) {
    write(dir, name, &serde_json::to_vec_pretty(value).expect("json"));
}

/// A safetensors file holding `header` followed by `data_len` zero bytes.
pub fn raw_safetensors(header: &Value, data_len: usize) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("json");
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.resize(out.len() + data_len, 0);
    out
}

/// A valid safetensors file: the tensors laid out back to back, data all zeros.
pub fn safetensors_bytes(tensors: &[TensorSpec]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let size = shape.iter().product::<u64>() * dtype_size(dtype).expect("known dtype");
        header.insert(name.clone(), json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}));
        offset += size;
    }
    raw_safetensors(&Value::Object(header), offset as usize)
}

pub fn tiny_dims() -> ModelDims {
    ModelDims {
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        intermediate_size: 128,
        vocab_size: 100,
    }
}

pub fn tiny_config(architecture: &str, model_type: &str) -> Value {
    json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "head_dim": null,
    })
}

/// The tensors of the tiny model in Hugging Face naming, BF16.
pub fn tiny_tensors(qkv_bias: bool, lm_head: bool) -> Vec<TensorSpec> {
    let mut t: Vec<TensorSpec> = vec![
        ("model.embed_tokens.weight".into(), "BF16", vec![100, 64]),
        ("model.norm.weight".into(), "BF16", vec![64]),
    ];
    if lm_head {
        t.push(("lm_head.weight".into(), "BF16", vec![100, 64]));
    }
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![64]),
            ("post_attention_layernorm.weight", vec![64]),
            ("self_attn.q_proj.weight", vec![64, 64]),
            ("self_attn.k_proj.weight", vec![32, 64]),
            ("self_attn.v_proj.weight", vec![32, 64]),
            ("self_attn.o_proj.weight", vec![64, 64]),
            ("mlp.gate_proj.weight", vec![128, 64]),
            ("mlp.up_proj.weight", vec![128, 64]),
            ("mlp.down_proj.weight", vec![64, 128]),
        ] {
            t.push((format!("{p}.{name}"), "BF16", shape));
        }
        if qkv_bias {
            t.push((format!("{p}.self_attn.q_proj.bias"), "BF16", vec![64]));
            t.push((format!("{p}.self_attn.k_proj.bias"), "BF16", vec![32]));
            t.push((format!("{p}.self_attn.v_proj.bias"), "BF16", vec![32]));
        }
    }
    t
}

/// Parameters of the tiny model with an untied lm_head.
pub fn tiny_parameter_count(qkv_bias: bool) -> u64 {
    let per_layer = 64 + 64 + 4096 + 2048 + 2048 + 4096 + 3 * 8192;
    let bias = if qkv_bias { 128 } else { 0 };
    6400 + 64 + 6400 + 2 * (per_layer + bias)
}

pub fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, Value> = (0..100).map(|i| (format!("t{i}"), json!(i))).collect();
    write_json(
        dir,
        "tokenizer.json",
        &json!({"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": vocab, "merges": []}}),
    );
}

/// A complete, valid tiny Llama directory.
pub fn write_llama_dir(dir: &Path) {
    write_json(dir, "config.json", &tiny_config("LlamaForCausalLM", "llama"));
    write(dir, "model.safetensors", &safetensors_bytes(&tiny_tensors(false, true)));
    write_tokenizer(dir);
    write_json(
        dir,
        "tokenizer_config.json",
        &json!({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}),
    );
}

pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// A GGUF file under construction: metadata bytes as written, tensors as (name, ne, type).
pub struct Gguf {
    pub version: u32,
    kv: Vec<u8>,
    kv_count: u64,
    pub tensors: Vec<(String, Vec<u64>, u32)>,
}

impl Gguf {
    pub fn new() -> Self {
        Gguf { version: 3, kv: Vec::new(), kv_count: 0, tensors: Vec::new() }
    }

    /// Appends one metadata entry already encoded (key, type and value).
    pub fn raw_kv(&mut self, bytes: &[u8]) {
        self.kv.extend_from_slice(bytes);
        self.kv_count += 1;
    }

    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) {
        let mut bytes = gguf_string(key);
        bytes.extend_from_slice(&ty.to_le_bytes());
        bytes.extend_from_slice(value);
        self.raw_kv(&bytes);
    }

    pub fn kv_str(&mut self, key: &str, value: &str) {
        self.kv(key, 8, &gguf_string(value));
    }

    pub fn kv_u32(&mut self, key: &str, value: u32) {
        self.kv(key, 4, &value.to_le_bytes());
    }

    pub fn kv_u32_array(&mut self, key: &str, values: &[u32]) {
        let mut bytes = 4u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.kv(key, 9, &bytes);
    }

    pub fn kv_str_array(&mut self, key: &str, values: &[String]) {
        let mut bytes = 8u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for v in values {
            bytes.extend_from_slice(&gguf_string(v));
        }
        self.kv(key, 9, &bytes);
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes_with_offsets(|_, off| off)
    }

    /// Serializes with each tensor's offset replaced by `offset(index, natural offset)`; the data
    /// section keeps its natural length.
    pub fn bytes_with_offsets(&self, offset: impl Fn(usize, u64) -> u64) -> Vec<u8> {
        const ALIGN: u64 = 32;
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.kv_count.to_le_bytes());
        out.extend_from_slice(&self.kv);
        let mut cursor = 0u64;
        for (i, (name, dims, ty)) in self.tensors.iter().enumerate() {
            let size = ggml_type(*ty).ok().and_then(|t| tensor_bytes(dims, t)).unwrap_or(0);
            let natural = cursor.next_multiple_of(ALIGN);
            cursor = natural + size;
            out.extend_from_slice(&gguf_string(name));
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset(i, natural).to_le_bytes());
        }
        let data_start = (out.len() as u64).next_multiple_of(ALIGN);
        out.resize((data_start + cursor) as usize, 0);
        out
    }
}

/// The tiny model as a GGUF: F32 tensors, token_embd as Q8_0 and blk.0.attn_q as Q4_1, plus
/// metadata of every value type (arrays of strings, numbers and arrays included).
pub fn tiny_gguf() -> Gguf {
    let mut g = Gguf::new();
    g.kv_str("general.architecture", "llama");
    g.kv_str("general.name", "tiny");
    g.kv_u32("llama.context_length", 256);
    g.kv_u32("llama.embedding_length", 64);
    g.kv_u32("llama.block_count", 2);
    g.kv_u32("llama.attention.head_count", 4);
    g.kv_u32("llama.attention.head_count_kv", 2);
    g.kv_u32("llama.feed_forward_length", 128);
    g.kv("llama.attention.layer_norm_rms_epsilon", 6, &1e-5f32.to_le_bytes());
    g.kv("llama.rope.freq_base", 12, &10000f64.to_le_bytes());
    g.kv("general.quantization_version", 10, &2u64.to_le_bytes());
    g.kv("test.i64", 11, &(-1i64).to_le_bytes());
    g.kv("test.i8", 1, &[0xff]);
    g.kv("test.u16", 2, &7u16.to_le_bytes());
    g.kv("test.i16", 3, &(-7i16).to_le_bytes());
    g.kv("test.i32", 5, &(-7i32).to_le_bytes());
    g.kv("test.u8", 0, &[7]);
    g.kv("tokenizer.ggml.add_bos_token", 7, &[1]);
    g.kv_str("tokenizer.ggml.model", "gpt2");
    g.kv_str_array("tokenizer.ggml.tokens", &(0..100).map(|i| format!("t{i}")).collect::<Vec<_>>());
    g.kv_u32_array("tokenizer.ggml.token_type", &[1; 100]);
    g.kv_str_array("tokenizer.ggml.merges", &vec!["t t".to_string(); 3]);
    // [[1, 2], [3]] as u8 arrays inside an array.
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend_from_slice(&2u64.to_le_bytes());
    for items in [&[1u8, 2][..], &[3u8][..]] {
        nested.extend_from_slice(&0u32.to_le_bytes());
        nested.extend_from_slice(&(items.len() as u64).to_le_bytes());
        nested.extend_from_slice(items);
    }
    g.kv("test.nested", 9, &nested);
    g.kv_str("tokenizer.chat_template", "{{ messages }}");

    g.tensors.push(("token_embd.weight".into(), vec![64, 100], 8));
    for i in 0..2 {
        for (name, dims) in [
            ("attn_norm.weight", vec![64]),
            ("ffn_norm.weight", vec![64]),
            ("attn_q.weight", vec![64, 64]),
            ("attn_k.weight", vec![64, 32]),
            ("attn_v.weight", vec![64, 32]),
            ("attn_output.weight", vec![64, 64]),
            ("ffn_gate.weight", vec![64, 128]),
            ("ffn_up.weight", vec![64, 128]),
            ("ffn_down.weight", vec![128, 64]),
        ] {
            let ty = if i == 0 && name == "attn_q.weight" { 3 } else { 0 };
            g.tensors.push((format!("blk.{i}.{name}"), dims, ty));
        }
    }
    g.tensors.push(("output_norm.weight".into(), vec![64], 0));
    g.tensors.push(("output.weight".into(), vec![64, 100], 0));
    g
}

pub fn default_adapter_config() -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["v_proj", "q_proj"],
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "fan_in_fan_out": false,
    })
}

/// LoRA matrices of rank `r` on q_proj and v_proj of both layers of the tiny model, F32.
pub fn tiny_adapter_tensors(r: u64) -> Vec<TensorSpec> {
    let mut t = Vec::new();
    for i in 0..2 {
        for (module, out) in [("q_proj", 64), ("v_proj", 32)] {
            let p = format!("base_model.model.model.layers.{i}.self_attn.{module}");
            t.push((format!("{p}.lora_A.weight"), "F32", vec![r, 64]));
            t.push((format!("{p}.lora_B.weight"), "F32", vec![out, r]));
        }
    }
    t
}

pub fn write_adapter(dir: &Path, config: &Value, tensors: &[TensorSpec]) {
    write_json(dir, "adapter_config.json", config);
    write(dir, "adapter_model.safetensors", &safetensors_bytes(tensors));
}
