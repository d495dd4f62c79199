//! Hugging Face base-model directories: config.json, safetensors weights (single file or index +
//! shards) and tokenizer files, checked against each other without reading tensor data.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::config::{self, Architecture, ModelConfig};
use super::safetensors::{self, Tensor};
use super::{
    fmt_shape, is_float_dtype, layer_index, list_names, push_limited, read_json, BaseSummary, ModelDims, ModelFormat,
    MAX_LAYERS,
};

const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
/// Largest tokenizer.json streamed through the JSON syntax check.
const MAX_TOKENIZER: u64 = 512 << 20;
/// Missing or unexpected tensor names reported before summarising.
const NAMES_REPORTED: usize = 10;

/// What config.json says: the hyperparameters, and the facts a summary reports.
#[derive(Debug, Clone)]
struct Config {
    model: ModelConfig,
    torch_dtype: Option<String>,
    name: Option<String>,
}

/// Inspects a Hugging Face directory whose file listing is `files`.
pub(crate) fn inspect(dir: &Path, files: &BTreeMap<String, u64>, problems: &mut Vec<String>) -> Option<BaseSummary> {
    let config = read_json(dir, "config.json", problems).and_then(|v| parse_config(v, problems));
    let weights = read_weights(dir, files, problems);
    let (has_chat_template, tokenizer) = check_tokenizer(dir, files, problems);

    let config = config?;
    let weights = weights?;
    check_tensors(&config.model, &weights, problems);

    let parameter_count = weights.tensors.values().fold(0u64, |acc, t| acc.saturating_add(t.elements));
    let dtype = dominant_dtype(&weights.tensors)
        .or_else(|| config.torch_dtype.as_deref().map(torch_dtype_name))
        .unwrap_or_else(|| "unknown".to_string());
    Some(BaseSummary {
        format: ModelFormat::HuggingFace,
        config: config.model,
        name: config.name,
        parameter_count,
        dtype,
        files: files.keys().cloned().collect(),
        has_chat_template,
        sampling_defaults: crate::sampling_defaults(dir),
        tokenizer,
    })
}

/// Reads an integer field; `Ok(None)` when absent or null.
fn get_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64().map(u32::try_from) {
            Some(Ok(0)) => Err(format!("config.json: {key} must be positive, found 0")),
            Some(Ok(v)) => Ok(Some(v)),
            _ => Err(format!("config.json: {key} must be a positive integer below 2^32, found {n}")),
        },
        Some(other) => Err(format!("config.json: {key} must be a positive integer, found {other}")),
    }
}

fn get_bool(obj: &Map<String, Value>, key: &str, problems: &mut Vec<String>) -> bool {
    match obj.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            problems.push(format!("config.json: {key} must be true or false, found {other}"));
            false
        }
    }
}

fn parse_config(value: Value, problems: &mut Vec<String>) -> Option<Config> {
    let Value::Object(obj) = value else {
        problems.push("config.json: not a JSON object".to_string());
        return None;
    };
    let arch = parse_arch(&obj, problems);

    if let Some(q) = obj.get("quantization_config").filter(|q| !q.is_null()) {
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unknown");
        problems.push(format!(
            "config.json: quantization_config (quant_method {method}) is not supported; upload \
             unquantized safetensors weights or a GGUF file"
        ));
    }
    if let Some(n) = obj.get("num_local_experts").and_then(Value::as_u64) {
        if n > 0 {
            problems.push(format!("config.json: num_local_experts {n}: mixture-of-experts models are not supported"));
        }
    }

    let mut field = |key: &str, required: bool| -> Option<u32> {
        match get_u32(&obj, key) {
            Ok(Some(v)) => Some(v),
            Ok(None) => {
                if required {
                    problems.push(format!("config.json: {key} is missing"));
                }
                None
            }
            Err(msg) => {
                problems.push(msg);
                None
            }
        }
    };
    let hidden = field("hidden_size", true);
    let layers = field("num_hidden_layers", true);
    let heads = field("num_attention_heads", true);
    let kv_heads = field("num_key_value_heads", false);
    let head_dim = field("head_dim", false);
    let inter = field("intermediate_size", true);
    let vocab = field("vocab_size", true);
    let max_pos = field("max_position_embeddings", false);

    let tie_word_embeddings = get_bool(&obj, "tie_word_embeddings", problems);
    let attention_bias = get_bool(&obj, "attention_bias", problems);
    let mlp_bias = get_bool(&obj, "mlp_bias", problems);
    // transformers ≥ 4.56 writes `dtype`; older versions `torch_dtype`.
    let torch_dtype =
        ["torch_dtype", "dtype"].iter().find_map(|k| obj.get(*k).and_then(Value::as_str)).map(str::to_string);
    let name = obj.get("_name_or_path").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);

    if let Some(layers) = layers.filter(|&l| l > MAX_LAYERS) {
        problems.push(format!("config.json: num_hidden_layers {layers} exceeds the limit of {MAX_LAYERS}"));
        return None;
    }
    let (arch, hidden, layers, heads, inter, vocab) = (arch?, hidden?, layers?, heads?, inter?, vocab?);
    if !problems.is_empty() {
        return None;
    }
    let kv_heads = kv_heads.unwrap_or(heads);
    if heads % kv_heads != 0 {
        problems.push(format!(
            "config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads \
             {kv_heads}"
        ));
    }
    let head_dim = match head_dim {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            problems.push(format!(
                "config.json: hidden_size {hidden} is not divisible by num_attention_heads \
                 {heads} and no head_dim is given"
            ));
            return None;
        }
    };
    let dims = ModelDims {
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        intermediate_size: inter,
        vocab_size: vocab,
    };
    if head_dim % 2 != 0 {
        problems.push(format!("config.json: head_dim {head_dim} must be even for rotary embeddings"));
    }
    if !problems.is_empty() {
        return None;
    }
    match config::hf_config(&obj, arch, dims, max_pos, attention_bias, mlp_bias, tie_word_embeddings) {
        Ok(model) => Some(Config { model, torch_dtype, name }),
        Err(p) => {
            problems.extend(p);
            None
        }
    }
}

/// The architecture from `architectures` (what transformers instantiates), cross-checked with
/// `model_type` (what selects the config class).
fn parse_arch(obj: &Map<String, Value>, problems: &mut Vec<String>) -> Option<Architecture> {
    let model_type = match obj.get("model_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            problems.push(format!("config.json: model_type must be a string, found {other}"));
            return None;
        }
    };
    let class = match obj.get("architectures") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => match list.first() {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => {
                problems.push(
                    "config.json: architectures must be a non-empty list of class names, e.g. \
                     [\"LlamaForCausalLM\"]"
                        .to_string(),
                );
                return None;
            }
        },
        Some(other) => {
            problems.push(format!("config.json: architectures must be a list of class names, found {other}"));
            return None;
        }
    };
    match (class, model_type) {
        (Some(class), model_type) => {
            let Some(arch) = Architecture::from_class(class) else {
                problems.push(format!("config.json: architecture {class} is not supported (supported: {SUPPORTED})"));
                return None;
            };
            if let Some(mt) = model_type.filter(|mt| *mt != arch.name()) {
                problems.push(format!(
                    "config.json: model_type {mt} does not match architecture {class} (expected \
                     model_type {})",
                    arch.name()
                ));
                return None;
            }
            Some(arch)
        }
        (None, Some(mt)) => {
            let arch = Architecture::from_name(mt);
            if arch.is_none() {
                problems.push(format!(
                    "config.json: model_type {mt} is not supported (supported: llama, mistral, \
                     qwen2)"
                ));
            }
            arch
        }
        (None, None) => {
            problems.push(format!(
                "config.json: neither architectures nor model_type is set (supported: \
                 {SUPPORTED})"
            ));
            None
        }
    }
}

/// All tensors of the checkpoint, with whether every weight file's header could be read (when
/// not, "missing tensor" would be noise).
struct Weights {
    tensors: BTreeMap<String, Tensor>,
    complete: bool,
    malformed: BTreeSet<String>,
}

fn read_weights(dir: &Path, files: &BTreeMap<String, u64>, problems: &mut Vec<String>) -> Option<Weights> {
    let shards_present: Vec<&String> = files.keys().filter(|n| n.ends_with(".safetensors")).collect();
    let has_single = files.contains_key(SINGLE);
    let has_index = files.contains_key(INDEX);
    // Pickled weights are only a problem when they would be the weights: next to safetensors
    // weights every loader ignores them (full repository uploads often carry both).
    let pickles_matter = !has_single && !has_index;
    for name in files.keys().filter(|_| pickles_matter) {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".bin") {
            problems.push(format!("{name}: .bin weights are not supported; save with safe_serialization=True"));
        } else if [".pt", ".pth", ".ckpt", ".pkl"].iter().any(|ext| lower.ends_with(ext)) {
            problems.push(format!(
                "{name}: pickled PyTorch weights are not supported; save safetensors with \
                 safe_serialization=True"
            ));
        }
    }
    if has_single && has_index {
        problems.push(format!("both {SINGLE} and {INDEX}: upload either one {SINGLE} or the shards with their index"));
        return None;
    }
    if has_single {
        let others: Vec<&str> = shards_present.iter().filter(|n| n.as_str() != SINGLE).map(|n| n.as_str()).collect();
        if !others.is_empty() {
            problems.push(format!(
                "{} next to {SINGLE}: shards need {INDEX}, and a single-file checkpoint has no \
                 other .safetensors files",
                list_names(&others)
            ));
        }
        let header = safetensors::read_header(&dir.join(SINGLE), SINGLE, problems);
        let complete = header.is_some();
        let header = header.unwrap_or_default();
        return Some(Weights { tensors: header.tensors, complete, malformed: header.malformed });
    }
    if has_index {
        return read_sharded(dir, files, problems);
    }
    if shards_present.is_empty() {
        problems.push(format!("no weights: expected {SINGLE}, or *.safetensors shards with {INDEX}"));
    } else {
        let names: Vec<&str> = shards_present.iter().map(|n| n.as_str()).collect();
        problems
            .push(format!("found {} but no {SINGLE} or {INDEX}: sharded weights need their index", list_names(&names)));
    }
    None
}

/// A shard name from the index must be a plain file name in the upload: never a path.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// Shards come from the index; other .safetensors files (Mistral repositories also carry a
/// consolidated.safetensors) are ignored, as loaders that follow the index ignore them.
fn read_sharded(dir: &Path, files: &BTreeMap<String, u64>, problems: &mut Vec<String>) -> Option<Weights> {
    let index = read_json(dir, INDEX, problems)?;
    let Some(Value::Object(weight_map)) = index.get("weight_map") else {
        problems.push(format!("{INDEX}: weight_map is missing or not an object of tensor name to shard file"));
        return None;
    };
    // tensor -> shard, and shard -> tensors it should hold.
    let mut placement: BTreeMap<&str, &str> = BTreeMap::new();
    let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut bad_values = false;
    for (tensor, shard) in weight_map {
        match shard.as_str() {
            Some(shard) => {
                placement.insert(tensor, shard);
                shards.entry(shard).or_default().push(tensor);
            }
            None => bad_values = true,
        }
    }
    if bad_values {
        problems.push(format!("{INDEX}: every weight_map value must be a shard file name"));
    }
    if placement.is_empty() {
        problems.push(format!("{INDEX}: weight_map lists no tensors"));
    }

    let mut weights = Weights { tensors: BTreeMap::new(), complete: !bad_values, malformed: BTreeSet::new() };
    // Where each tensor was actually found, to catch tensors stored twice.
    let mut found_in: BTreeMap<String, &str> = BTreeMap::new();
    for (shard, listed) in &shards {
        if !plain_file_name(shard) || !shard.ends_with(".safetensors") {
            problems.push(format!("{INDEX}: shard {shard:?} is not a .safetensors file name in the upload directory"));
            weights.complete = false;
            continue;
        }
        if !files.contains_key(*shard) {
            problems.push(format!("{shard}: named in {INDEX} ({} tensors) but not uploaded", listed.len()));
            weights.complete = false;
            continue;
        }
        let Some(header) = safetensors::read_header(&dir.join(shard), shard, problems) else {
            weights.complete = false;
            continue;
        };
        let mut absent = Vec::new();
        for tensor in listed {
            if !header.tensors.contains_key(*tensor) && !header.malformed.contains(*tensor) {
                absent.push(format!("{tensor}: {INDEX} places it in {shard} but that file has no such tensor"));
            }
        }
        push_limited(problems, absent, NAMES_REPORTED, "tensors absent from their shard");
        let mut unlisted = Vec::new();
        for (tensor, info) in header.tensors {
            match placement.get(tensor.as_str()) {
                Some(expected) if expected == shard => {}
                Some(expected) => unlisted.push(format!("{shard}: holds {tensor}, which {INDEX} places in {expected}")),
                None => unlisted.push(format!("{shard}: holds {tensor}, which is not in {INDEX}'s weight_map")),
            }
            if let Some(first) = found_in.get(&tensor) {
                problems.push(format!("{tensor}: stored in both {first} and {shard}"));
                continue;
            }
            found_in.insert(tensor.clone(), shard);
            weights.tensors.insert(tensor, info);
        }
        push_limited(problems, unlisted, NAMES_REPORTED, "tensors outside the index");
        weights.malformed.extend(header.malformed);
    }
    Some(weights)
}

/// Only the tokenizer model's type is kept; serde skips the rest of tokenizer.json while
/// streaming it, so even a large vocabulary is never held in memory.
#[derive(Deserialize)]
struct TokenizerJson {
    model: Option<TokenizerModel>,
}

#[derive(Deserialize)]
struct TokenizerModel {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Checks the tokenizer files; returns whether a chat template ships with the model and the
/// tokenizer type.
fn check_tokenizer(dir: &Path, files: &BTreeMap<String, u64>, problems: &mut Vec<String>) -> (bool, Option<String>) {
    let mut tokenizer = None;
    match files.get("tokenizer.json") {
        None => {
            let also = if files.contains_key("tokenizer.model") {
                " (found tokenizer.model, a slow sentencepiece tokenizer)"
            } else {
                ""
            };
            problems.push(format!(
                "tokenizer.json missing{also}: save the fast tokenizer with \
                 tokenizer.save_pretrained"
            ));
        }
        Some(&size) if size > MAX_TOKENIZER => {
            problems.push(format!("tokenizer.json: {size} bytes is larger than the {} MiB limit", MAX_TOKENIZER >> 20))
        }
        Some(_) => match File::open(dir.join("tokenizer.json")) {
            Err(e) => problems.push(format!("tokenizer.json: cannot open: {e}")),
            Ok(file) => match serde_json::from_reader::<_, TokenizerJson>(BufReader::new(file)) {
                Ok(parsed) => tokenizer = parsed.model.and_then(|m| m.kind),
                Err(e) => problems.push(format!("tokenizer.json: not a valid tokenizer: {e}")),
            },
        },
    }

    // transformers writes chat_template.jinja (≥ 4.54) or chat_template.json (processors), or
    // keeps the template in tokenizer_config.json.
    let mut has_chat_template = files.contains_key("chat_template.jinja") || files.contains_key("chat_template.json");
    if files.contains_key("tokenizer_config.json") {
        match read_json(dir, "tokenizer_config.json", problems) {
            Some(Value::Object(cfg)) => match cfg.get("chat_template") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => has_chat_template |= !s.trim().is_empty(),
                // Several named templates: [{"name": ..., "template": ...}].
                Some(Value::Array(list)) => has_chat_template |= !list.is_empty(),
                Some(_) => problems.push(
                    "tokenizer_config.json: chat_template must be a string or a list of named \
                     templates"
                        .to_string(),
                ),
            },
            Some(_) => problems.push("tokenizer_config.json: not a JSON object".to_string()),
            None => {}
        }
    }
    (has_chat_template, tokenizer)
}

/// One tensor the config implies.
struct Expected {
    name: String,
    shape: Vec<u64>,
    required: bool,
}

fn expected_tensors(c: &ModelConfig) -> Vec<Expected> {
    let d = &c.dims;
    let hidden = u64::from(d.hidden_size);
    let inter = u64::from(d.intermediate_size);
    let vocab = u64::from(d.vocab_size);
    let (q, kv) = (d.q_width(), d.kv_width());
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<u64>, required: bool| out.push(Expected { name, shape, required });
    push("model.embed_tokens.weight".into(), vec![vocab, hidden], true);
    push("model.norm.weight".into(), vec![hidden], true);
    // vLLM and transformers ignore a stored lm_head when the embeddings are tied.
    push("lm_head.weight".into(), vec![vocab, hidden], !c.tie_word_embeddings);
    for i in 0..d.num_layers {
        let p = format!("model.layers.{i}");
        push(format!("{p}.input_layernorm.weight"), vec![hidden], true);
        push(format!("{p}.post_attention_layernorm.weight"), vec![hidden], true);
        for (m, out_f, in_f) in
            [("q_proj", q, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, q)]
        {
            push(format!("{p}.self_attn.{m}.weight"), vec![out_f, in_f], true);
            let bias = if m == "o_proj" { c.o_bias } else { c.qkv_bias };
            if bias {
                push(format!("{p}.self_attn.{m}.bias"), vec![out_f], true);
            }
        }
        for (m, out_f, in_f) in [("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)]
        {
            push(format!("{p}.mlp.{m}.weight"), vec![out_f, in_f], true);
            if c.mlp_bias {
                push(format!("{p}.mlp.{m}.bias"), vec![out_f], true);
            }
        }
    }
    out
}

fn check_tensors(c: &ModelConfig, w: &Weights, problems: &mut Vec<String>) {
    let expected = expected_tensors(c);
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let mut known = BTreeSet::new();
    for e in &expected {
        known.insert(e.name.as_str());
        match w.tensors.get(&e.name) {
            None => {
                if e.required && w.complete && !w.malformed.contains(&e.name) {
                    missing.push(format!("missing tensor {} (config implies shape {})", e.name, fmt_shape(&e.shape)));
                }
            }
            Some(t) => {
                if t.shape != e.shape {
                    wrong.push(format!(
                        "{}: shape {} but config implies {}",
                        e.name,
                        fmt_shape(&t.shape),
                        fmt_shape(&e.shape)
                    ));
                }
                if !is_float_dtype(&t.dtype) {
                    wrong
                        .push(format!("{}: dtype {} is not a floating-point type (F16, BF16 or F32)", e.name, t.dtype));
                }
            }
        }
    }
    let mut unexpected = Vec::new();
    for name in w.tensors.keys() {
        // Old Llama checkpoints store the rotary frequencies; every loader skips them.
        if known.contains(name.as_str()) || name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        match layer_index(name) {
            Some((i, _)) if i >= c.dims.num_layers => unexpected
                .push(format!("{name}: layer {i} but config.json has num_hidden_layers {}", c.dims.num_layers)),
            _ => unexpected.push(format!("{name}: unexpected tensor for {}", c.architecture.class())),
        }
    }
    push_limited(problems, wrong, NAMES_REPORTED * 2, "tensors with wrong shapes");
    push_limited(problems, missing, NAMES_REPORTED, "missing tensors");
    push_limited(problems, unexpected, NAMES_REPORTED, "unexpected tensors");
}

/// The dtype holding most elements, e.g. "BF16".
fn dominant_dtype(tensors: &BTreeMap<String, Tensor>) -> Option<String> {
    let mut by_dtype: BTreeMap<&str, u64> = BTreeMap::new();
    for t in tensors.values() {
        let n = by_dtype.entry(t.dtype.as_str()).or_default();
        *n = n.saturating_add(t.elements);
    }
    by_dtype
        .into_iter()
        .fold(None, |best: Option<(&str, u64)>, (d, n)| match best {
            Some((_, m)) if m >= n => best,
            _ => Some((d, n)),
        })
        .map(|(d, _)| d.to_string())
}

fn torch_dtype_name(torch: &str) -> String {
    match torch {
        "bfloat16" => "BF16".to_string(),
        "float16" | "half" => "F16".to_string(),
        "float32" | "float" => "F32".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::{INDEX, SINGLE};

    fn err(dir: &Path) -> Vec<String> {
        inspect_base(dir).expect_err("should fail").into_vec()
    }

    #[test]
    fn tiny_llama_dir_is_summarised() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(dir.path());
        let s = inspect_base(dir.path()).expect("valid");
        assert_eq!(s.format, ModelFormat::HuggingFace);
        assert_eq!(s.config.architecture.name(), "llama");
        assert_eq!(s.config.dims, tiny_dims());
        assert_eq!(s.config.max_position_embeddings, 256);
        assert_eq!(s.dtype, "BF16");
        assert_eq!(s.parameter_count, tiny_parameter_count(false));
        assert_eq!(s.files, vec!["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
        assert!(s.has_chat_template);
        assert_eq!(s.tokenizer.as_deref(), Some("BPE"));
    }

    #[test]
    fn sharded_qwen2_with_biases_and_tied_embeddings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = tiny_config("Qwen2ForCausalLM", "qwen2");
        config["tie_word_embeddings"] = true.into();
        write_json(dir.path(), "config.json", &config);
        let tensors = tiny_tensors(true, false);
        let (first, second) = tensors.split_at(tensors.len() / 2);
        write(dir.path(), "model-00001-of-00002.safetensors", &safetensors_bytes(first));
        write(dir.path(), "model-00002-of-00002.safetensors", &safetensors_bytes(second));
        let mut map = serde_json::Map::new();
        for (name, _, _) in first {
            map.insert(name.clone(), "model-00001-of-00002.safetensors".into());
        }
        for (name, _, _) in second {
            map.insert(name.clone(), "model-00002-of-00002.safetensors".into());
        }
        write_json(dir.path(), INDEX, &serde_json::json!({"metadata": {}, "weight_map": map}));
        write_tokenizer(dir.path());
        write(dir.path(), "chat_template.jinja", b"{{ messages }}");
        // Loaders that follow the index ignore these; full repository uploads carry them.
        write(dir.path(), "pytorch_model.bin", b"pickle");
        write(dir.path(), "consolidated.safetensors", b"not even a header");
        let s = inspect_base(dir.path()).expect("valid");
        assert_eq!(s.config.architecture.name(), "qwen2");
        assert_eq!(s.parameter_count, tiny_parameter_count(true) - 64 * 100);
        assert!(s.has_chat_template);
    }

    #[test]
    fn missing_shard_and_misplaced_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_json(dir.path(), "config.json", &tiny_config("LlamaForCausalLM", "llama"));
        let tensors = tiny_tensors(false, true);
        write(dir.path(), "a.safetensors", &safetensors_bytes(&tensors));
        let mut map = serde_json::Map::new();
        for (name, _, _) in &tensors {
            map.insert(name.clone(), "a.safetensors".into());
        }
        map.insert("model.norm.weight".into(), "b.safetensors".into());
        map.insert("extra.weight".into(), "a.safetensors".into());
        map.insert("evil".into(), "../x.safetensors".into());
        write_json(dir.path(), INDEX, &serde_json::json!({"weight_map": map}));
        write(dir.path(), "stray.safetensors", &safetensors_bytes(&[]));
        write_tokenizer(dir.path());
        assert_eq!(
            err(dir.path()),
            vec![
                "model.safetensors.index.json: shard \"../x.safetensors\" is not a .safetensors \
                 file name in the upload directory",
                "extra.weight: model.safetensors.index.json places it in a.safetensors but that \
                 file has no such tensor",
                "a.safetensors: holds model.norm.weight, which model.safetensors.index.json \
                 places in b.safetensors",
                "b.safetensors: named in model.safetensors.index.json (1 tensors) but not \
                 uploaded",
            ]
        );
    }

    #[test]
    fn shape_mismatch_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(dir.path());
        let mut tensors = tiny_tensors(false, true);
        for (name, _, shape) in &mut tensors {
            if name == "model.layers.1.mlp.up_proj.weight" {
                *shape = vec![100, 64];
            }
        }
        tensors.retain(|(name, _, _)| name != "model.layers.0.self_attn.k_proj.weight");
        tensors.push(("model.layers.2.mlp.up_proj.weight".into(), "BF16", vec![128, 64]));
        tensors.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), "F32", vec![8]));
        tensors.push(("score.weight".into(), "I8", vec![2, 64]));
        write(dir.path(), SINGLE, &safetensors_bytes(&tensors));
        assert_eq!(
            err(dir.path()),
            vec![
                "model.layers.1.mlp.up_proj.weight: shape [100, 64] but config implies [128, 64]",
                "missing tensor model.layers.0.self_attn.k_proj.weight (config implies shape \
                 [32, 64])",
                "model.layers.2.mlp.up_proj.weight: layer 2 but config.json has \
                 num_hidden_layers 2",
                "score.weight: unexpected tensor for LlamaForCausalLM",
            ]
        );
    }

    #[test]
    fn unknown_architecture() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(dir.path());
        write_json(dir.path(), "config.json", &tiny_config("BertModel", "bert"));
        assert_eq!(
            err(dir.path()),
            vec![
                "config.json: architecture BertModel is not supported (supported: \
                  LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
            ]
        );
    }

    #[test]
    fn config_problems_are_all_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(dir.path());
        let mut config = tiny_config("MistralForCausalLM", "llama");
        config["hidden_size"] = (-1).into();
        config["vocab_size"] = serde_json::Value::Null;
        config["quantization_config"] = serde_json::json!({"quant_method": "awq"});
        write_json(dir.path(), "config.json", &config);
        assert_eq!(
            err(dir.path()),
            vec![
                "config.json: model_type llama does not match architecture MistralForCausalLM \
                 (expected model_type mistral)",
                "config.json: quantization_config (quant_method awq) is not supported; upload \
                 unquantized safetensors weights or a GGUF file",
                "config.json: hidden_size must be a positive integer below 2^32, found -1",
                "config.json: vocab_size is missing",
            ]
        );
    }

    #[test]
    fn bin_weights_and_missing_tokenizer() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_json(dir.path(), "config.json", &tiny_config("LlamaForCausalLM", "llama"));
        write(dir.path(), "pytorch_model.bin", b"pickle");
        write(dir.path(), "tokenizer.model", b"sp");
        assert_eq!(
            err(dir.path()),
            vec![
                "pytorch_model.bin: .bin weights are not supported; save with \
                 safe_serialization=True",
                "no weights: expected model.safetensors, or *.safetensors shards with \
                 model.safetensors.index.json",
                "tokenizer.json missing (found tokenizer.model, a slow sentencepiece tokenizer): \
                 save the fast tokenizer with tokenizer.save_pretrained",
            ]
        );
    }

    #[test]
    fn truncated_weights_skip_missing_noise() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(dir.path());
        write(dir.path(), SINGLE, &[1, 2, 3]);
        assert_eq!(
            err(dir.path()),
            vec![
                "model.safetensors: file is 3 bytes, too short for a safetensors header \
                  (8-byte length, then JSON)"
            ]
        );
    }

    #[test]
    fn config_without_architectures_uses_model_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(dir.path());
        let mut config = tiny_config("LlamaForCausalLM", "mistral");
        if let Some(obj) = config.as_object_mut() {
            obj.remove("architectures");
        }
        write_json(dir.path(), "config.json", &config);
        let s = inspect_base(dir.path()).expect("valid");
        assert_eq!(s.config.architecture.name(), "mistral");
    }
}
