//! Checkpoint formats and the rules of what hearth serves. Header-only inspection of Hugging
//! Face safetensors directories, single GGUF files and PEFT LoRA adapters: says precisely what
//! is wrong with one, or summarises it as the engine will serve it. `:validateUpload` and the
//! engine's loader both start here, so whatever validates is what serves, and a refusal reads
//! the same in both places.
//!
//! Everything here reads headers, never tensor data: a safetensors header is at most 100 MB, a
//! GGUF header is walked with a bounded reader that skips array contents instead of keeping
//! them, and every count and size taken from a file is bounded and combined with checked
//! arithmetic. A hostile file therefore yields problems, never a panic or a huge allocation.
//!
//! The entry points collect every problem they can find instead of stopping at the first one,
//! so that a user fixing an upload sees the whole list at once.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod config;
mod gguf;
mod hf;
mod peft;
mod safetensors;

pub use config::{Architecture, ModelConfig, RopeScaling};
#[cfg(test)]
mod testutil;

/// Most tensors (or metadata entries) one file may declare.
const MAX_TENSORS: u64 = 1_000_000;
/// Longest string a header may declare (GGUF strings, JSON side files are capped separately).
const MAX_STRING: u64 = 64 << 20;
/// Largest JSON side file (config.json, index, adapter_config.json, tokenizer_config.json)
/// read into memory.
const MAX_JSON_FILE: u64 = 64 << 20;
/// More layers than any real model has; bounds the list of expected tensor names.
const MAX_LAYERS: u32 = 10_000;
/// Most directory entries looked at; an upload is a handful of files.
const MAX_DIR_ENTRIES: usize = 10_000;
/// Most problems reported; past this the list says how many more there were.
const MAX_REPORTED: usize = 50;

/// The linear layers of a Llama-style decoder layer, the only modules a LoRA addon may patch.
pub const LINEAR_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Everything found wrong with an upload, each entry one self-contained sentence naming the file
/// or tensor concerned. Displayed joined with "; ".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// The problems, in the order they were found.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Caps the list so that a file with thousands of bad tensors still gives a readable error.
    fn capped(mut problems: Vec<String>) -> Self {
        if problems.len() > MAX_REPORTED {
            let more = problems.len() - MAX_REPORTED;
            problems.truncate(MAX_REPORTED);
            problems.push(format!("... and {more} more problems"));
        }
        Problems(problems)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for Problems {}

/// How a base model was uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelFormat {
    /// A Hugging Face directory: config.json, safetensors weights, tokenizer.json.
    HuggingFace,
    /// One GGUF file carrying weights, hyperparameters and tokenizer.
    Gguf,
}

/// The transformer dimensions every supported architecture shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub intermediate_size: u32,
    pub vocab_size: u32,
}

/// What a linear layer of the base model consumes and produces, with words for messages.
struct LinearShape {
    in_features: u64,
    out_features: u64,
    in_what: &'static str,
    out_what: &'static str,
}

const HIDDEN: &str = "hidden size";
const Q_WIDTH: &str = "attention width (num_heads × head_dim)";
const KV_WIDTH: &str = "key/value width (num_kv_heads × head_dim)";
const INTER: &str = "intermediate size";

impl ModelDims {
    /// Width of the query projection (and the input of o_proj).
    pub fn q_width(&self) -> u64 {
        u64::from(self.num_heads) * u64::from(self.head_dim)
    }

    /// Width of the key and value projections.
    pub fn kv_width(&self) -> u64 {
        u64::from(self.num_kv_heads) * u64::from(self.head_dim)
    }

    fn linear(&self, module: &str) -> Option<LinearShape> {
        let hidden = u64::from(self.hidden_size);
        let inter = u64::from(self.intermediate_size);
        let (in_features, in_what, out_features, out_what) = match module {
            "q_proj" => (hidden, HIDDEN, self.q_width(), Q_WIDTH),
            "k_proj" | "v_proj" => (hidden, HIDDEN, self.kv_width(), KV_WIDTH),
            "o_proj" => (self.q_width(), Q_WIDTH, hidden, HIDDEN),
            "gate_proj" | "up_proj" => (hidden, HIDDEN, inter, INTER),
            "down_proj" => (inter, INTER, hidden, HIDDEN),
            _ => return None,
        };
        Some(LinearShape { in_features, out_features, in_what, out_what })
    }
}

/// Summary of a base model that passed inspection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseSummary {
    pub format: ModelFormat,
    /// The hyperparameters, exactly as the engine serves them.
    pub config: ModelConfig,
    /// GGUF `general.name`; for Hugging Face, config.json's `_name_or_path` when set.
    #[serde(default)]
    pub name: Option<String>,
    /// Sum of the element counts of all tensors.
    pub parameter_count: u64,
    /// The tensor type holding most elements: "BF16", "F16", "F32", or a GGUF type like "Q4_K".
    pub dtype: String,
    /// The regular files of the upload, sorted.
    pub files: Vec<String>,
    /// A chat template ships with the model (chat_template.jinja, tokenizer_config.json's
    /// `chat_template`, or GGUF `tokenizer.chat_template`).
    pub has_chat_template: bool,
    /// The tokenizer kind: GGUF `tokenizer.ggml.model` (e.g. "gpt2", "llama"), or tokenizer.json's
    /// `model.type` (e.g. "BPE").
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// The sampling defaults the checkpoint ships (see [`sampling_defaults`]).
    #[serde(default)]
    pub sampling_defaults: BTreeMap<String, f64>,
}

/// The sampling parameters a Hugging Face checkpoint's `generation_config.json` sets, by their
/// OpenAI names: `temperature`, `top_p`, `top_k` and `repetition_penalty`, when the file asks
/// for sampling (`do_sample: true`; without it transformers decodes greedily and ignores
/// them) and each is in the range a request could give. Anything else, or no file, is none.
pub fn sampling_defaults(dir: &Path) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(text) = fs::read_to_string(dir.join("generation_config.json")) else { return out };
    let Ok(serde_json::Value::Object(cfg)) = serde_json::from_str::<serde_json::Value>(&text) else { return out };
    if cfg.get("do_sample").and_then(serde_json::Value::as_bool) != Some(true) {
        return out;
    }
    type InRange = fn(f64) -> bool;
    let in_range: [(&str, InRange); 4] = [
        ("temperature", |v| (0.0..=2.0).contains(&v)),
        ("top_p", |v| v > 0.0 && v <= 1.0),
        ("top_k", |v| v >= 0.0 && v.fract() == 0.0),
        ("repetition_penalty", |v| v > 0.0 && v.is_finite()),
    ];
    for (key, ok) in in_range {
        if let Some(v) = cfg.get(key).and_then(serde_json::Value::as_f64).filter(|v| ok(*v)) {
            out.insert(key.to_string(), v);
        }
    }
    out
}

/// One patched linear layer of a LoRA addon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraModule {
    pub layer: u32,
    /// The linear layer's own name, e.g. "q_proj".
    pub module: String,
    pub rank: u32,
    /// lora_A's second dimension: what the patched layer consumes.
    pub in_features: u64,
    /// lora_B's first dimension: what the patched layer produces.
    pub out_features: u64,
    /// What `B·A` is multiplied by: `alpha / rank`, or `alpha / √rank` with rsLoRA, with
    /// `rank_pattern` and `alpha_pattern` resolved as PEFT resolves them.
    #[serde(default)]
    pub scale: f64,
}

impl LoraModule {
    /// The module's full name in the base model, as PEFT and transformers name it.
    pub fn path(&self) -> String {
        let parent = match self.module.as_str() {
            "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
            _ => "mlp",
        };
        format!("model.layers.{}.{parent}.{}", self.layer, self.module)
    }
}

/// Summary of a LoRA addon that passed inspection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSummary {
    pub r: u32,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// The module names that carry LoRA weights, sorted.
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    /// Sorted by layer, then module name.
    pub modules: Vec<LoraModule>,
    pub parameter_count: u64,
    /// The distinct ranks of `modules`, sorted.
    pub ranks: Vec<u32>,
}

/// Inspects a base model upload: a Hugging Face directory (config.json, model.safetensors or
/// index + shards, tokenizer.json) or a directory holding exactly one `.gguf` file.
pub fn inspect_base(dir: &Path) -> Result<BaseSummary, Problems> {
    let mut problems = Vec::new();
    let Some(files) = list_dir(dir, &mut problems) else {
        return Err(Problems::capped(problems));
    };
    let ggufs: Vec<&String> = files.keys().filter(|name| name.to_ascii_lowercase().ends_with(".gguf")).collect();
    let has_config = files.contains_key("config.json");
    let summary = match (has_config, ggufs.as_slice()) {
        (true, []) => hf::inspect(dir, &files, &mut problems),
        (false, [gguf]) => {
            let others: Vec<&str> = files.keys().filter(|name| name != gguf).map(String::as_str).collect();
            if !others.is_empty() {
                problems.push(format!(
                    "{gguf}: a GGUF base model must be the only file, but the upload also has {}",
                    list_names(&others)
                ));
            }
            gguf::inspect(dir, gguf, &files, &mut problems)
        }
        (false, []) => {
            let names: Vec<&str> = files.keys().map(String::as_str).collect();
            let found = if names.is_empty() {
                "the upload is empty".to_string()
            } else {
                format!("found {}", list_names(&names))
            };
            problems.push(format!(
                "no config.json and no .gguf file ({found}): a base model is a Hugging Face \
                 directory or one GGUF file"
            ));
            None
        }
        (true, [gguf, ..]) => {
            problems.push(format!(
                "both config.json and {gguf}: a base model is either a Hugging Face directory or \
                 one GGUF file, not both"
            ));
            None
        }
        (false, many) => {
            let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
            problems.push(format!(
                "{} .gguf files ({}): a GGUF base model is one file (split GGUF is not supported)",
                many.len(),
                list_names(&names)
            ));
            None
        }
    };
    finish(summary, problems)
}

/// Inspects a Hugging Face directory as the engine serves it: `config.json` and what it
/// implies; other files beside them (a GGUF export, say) are not looked at.
pub fn inspect_hf_dir(dir: &Path) -> Result<BaseSummary, Problems> {
    let mut problems = Vec::new();
    let Some(files) = list_dir(dir, &mut problems) else {
        return Err(Problems::capped(problems));
    };
    finish(hf::inspect(dir, &files, &mut problems), problems)
}

/// Inspects one GGUF file, wherever it is.
pub fn inspect_gguf_file(path: &Path) -> Result<BaseSummary, Problems> {
    let mut problems = Vec::new();
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(Problems(vec![format!("{}: not a file name", path.display())]));
    };
    let size = match fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return Err(Problems(vec![format!("{name}: not a regular file")])),
        Err(e) => return Err(Problems(vec![format!("{name}: cannot read: {e}")])),
    };
    let files = BTreeMap::from([(name.to_string(), size)]);
    finish(gguf::inspect(dir, name, &files, &mut problems), problems)
}

/// A summary only when no problem was found.
fn finish(summary: Option<BaseSummary>, mut problems: Vec<String>) -> Result<BaseSummary, Problems> {
    match summary {
        Some(summary) if problems.is_empty() => Ok(summary),
        _ => {
            if problems.is_empty() {
                problems.push("the upload could not be inspected".to_string());
            }
            Err(Problems::capped(problems))
        }
    }
}

/// Inspects a LoRA addon: a PEFT directory with adapter_config.json and
/// adapter_model.safetensors.
pub fn inspect_adapter(dir: &Path) -> Result<AdapterSummary, Problems> {
    peft::inspect(dir).map_err(Problems::capped)
}

/// Checks that an inspected LoRA addon fits an inspected base model; empty means it fits.
/// `architecture` names the base's architecture in messages.
pub fn check_adapter_against_base(adapter: &AdapterSummary, dims: &ModelDims, architecture: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if adapter.modules.is_empty() {
        problems
            .push("the adapter patches no modules: adapter_model.safetensors has no lora_A/lora_B pairs".to_string());
    }
    if !adapter.modules.is_empty() && adapter.modules.iter().all(|m| dims.linear(&m.module).is_none()) {
        let mut names: Vec<&str> = adapter.modules.iter().map(|m| m.module.as_str()).collect();
        names.dedup();
        return vec![format!(
            "the adapter patches no module of the base {architecture} model: {} {} not among its linear layers \
             ({}); the adapter was made for another architecture",
            list_names(&names),
            if names.len() == 1 { "is" } else { "are" },
            LINEAR_MODULES.join(", ")
        )];
    }
    for m in &adapter.modules {
        let (layer, module) = (m.layer, m.module.as_str());
        if m.layer >= dims.num_layers {
            problems.push(format!(
                "layer {layer} {module}: the base model has {} layers (0 to {})",
                dims.num_layers,
                dims.num_layers.saturating_sub(1)
            ));
        }
        let Some(shape) = dims.linear(module) else {
            problems.push(format!(
                "layer {layer} {module}: {module} is not a linear layer of the base {} \
                 architecture (expected one of {})",
                architecture,
                LINEAR_MODULES.join(", ")
            ));
            continue;
        };
        if m.in_features != shape.in_features {
            problems.push(format!(
                "layer {layer} {module}: lora_A expects {} input features but the base model's {} \
                 is {} (the adapter was trained for another base model)",
                m.in_features, shape.in_what, shape.in_features
            ));
        }
        if m.out_features != shape.out_features {
            problems.push(format!(
                "layer {layer} {module}: lora_B produces {} output features but the base model's \
                 {} is {} (the adapter was trained for another base model)",
                m.out_features, shape.out_what, shape.out_features
            ));
        }
    }
    if problems.len() > MAX_REPORTED {
        problems = Problems::capped(problems).into_vec();
    }
    problems
}

/// The regular files directly inside `dir`, name to size, hidden ones aside. Subdirectories are ignored (some
/// repositories carry e.g. an `original/` folder); anything else that is not a regular file is a
/// problem, because opening a FIFO or device would block or read without end.
fn list_dir(dir: &Path, problems: &mut Vec<String>) -> Option<BTreeMap<String, u64>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(format!("cannot read the upload directory: {e}"));
            return None;
        }
    };
    let mut files = BTreeMap::new();
    for (count, entry) in entries.enumerate() {
        if count >= MAX_DIR_ENTRIES {
            problems.push(format!("the upload has more than {MAX_DIR_ENTRIES} entries; a model is a handful of files"));
            return None;
        }
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(format!("cannot read the upload directory: {e}"));
                return None;
            }
        };
        let Ok(name) = entry.file_name().into_string() else {
            problems.push(format!("{}: file name is not valid UTF-8", entry.file_name().to_string_lossy()));
            continue;
        };
        // Hidden files are never part of a model: the artifact store keeps its partial uploads
        // and markers under such names, and a repository's `.gitattributes` is no weight.
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks on purpose: what matters is what opening the name would read.
        match fs::metadata(entry.path()) {
            Ok(meta) if meta.is_file() => {
                files.insert(name, meta.len());
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => problems.push(format!("{name}: not a regular file")),
            Err(e) => problems.push(format!("{name}: cannot read: {e}")),
        }
    }
    Some(files)
}

/// Reads a JSON side file of bounded size into memory.
fn read_json(dir: &Path, name: &str, problems: &mut Vec<String>) -> Option<serde_json::Value> {
    let file = match fs::File::open(dir.join(name)) {
        Ok(file) => file,
        Err(e) => {
            problems.push(format!("{name}: cannot open: {e}"));
            return None;
        }
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if size > MAX_JSON_FILE {
        problems
            .push(format!("{name}: {size} bytes is larger than the {} MiB limit for this file", MAX_JSON_FILE >> 20));
        return None;
    }
    let mut bytes = Vec::new();
    // `take` keeps the read bounded even if the file grows after the size check.
    if let Err(e) = file.take(MAX_JSON_FILE).read_to_end(&mut bytes) {
        problems.push(format!("{name}: cannot read: {e}"));
        return None;
    }
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(e) => {
            problems.push(format!("{name}: not valid JSON: {e}"));
            None
        }
    }
}

/// Product of a shape's dimensions; `None` on overflow.
fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// "[a, b]", the way shapes appear in messages.
fn fmt_shape(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// Names for a message, at most ten, then how many more.
fn list_names(names: &[&str]) -> String {
    const SHOWN: usize = 10;
    let shown: Vec<&str> = names.iter().take(SHOWN).copied().collect();
    let mut out = shown.join(", ");
    if names.len() > SHOWN {
        out.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    out
}

/// Pushes at most `limit` of `items`, then one line saying how many were left out, so one kind of
/// problem repeated over every layer does not crowd out the others.
fn push_limited(problems: &mut Vec<String>, items: Vec<String>, limit: usize, what: &str) {
    let total = items.len();
    problems.extend(items.into_iter().take(limit));
    if total > limit {
        problems.push(format!("... and {} more {what}", total - limit));
    }
}

/// The floating-point safetensors dtypes a checkpoint's weights may use.
fn is_float_dtype(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32")
}

/// Splits "model.layers.12.self_attn.q_proj..." style names into the layer index and the rest.
fn layer_index(name: &str) -> Option<(u32, &str)> {
    let (_, after) = name.split_once("layers.")?;
    let (index, rest) = after.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {

    #[test]
    fn sampling_defaults_come_from_a_generation_config_that_samples() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |v: serde_json::Value| fs::write(dir.path().join("generation_config.json"), v.to_string()).unwrap();
        assert!(sampling_defaults(dir.path()).is_empty(), "no file");
        write(serde_json::json!({"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_length": 9}));
        let got = sampling_defaults(dir.path());
        assert_eq!(
            got,
            [("temperature", 0.6), ("top_k", 50.0), ("top_p", 0.9)].map(|(k, v)| (k.to_string(), v)).into()
        );
        write(serde_json::json!({"temperature": 0.6}));
        assert!(sampling_defaults(dir.path()).is_empty(), "greedy unless do_sample");
        write(serde_json::json!({"do_sample": true, "temperature": 7.0, "top_p": 0.0, "top_k": 1.5}));
        assert!(sampling_defaults(dir.path()).is_empty(), "out of range values are dropped");
    }

    use super::testutil::*;
    use super::*;

    #[test]
    fn problems_display_joins_with_semicolons() {
        let p = Problems(vec!["a is wrong".into(), "b is missing".into()]);
        assert_eq!(p.to_string(), "a is wrong; b is missing");
    }

    #[test]
    fn problems_are_capped() {
        let p = Problems::capped((0..60).map(|i| i.to_string()).collect());
        assert_eq!(p.len(), MAX_REPORTED + 1);
        assert_eq!(p.as_slice().last().map(String::as_str), Some("... and 10 more problems"));
    }

    #[test]
    fn empty_directory_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = inspect_base(dir.path()).expect_err("empty upload");
        assert_eq!(
            err.0,
            vec!["no config.json and no .gguf file (the upload is empty): a base model is a \
                  Hugging Face directory or one GGUF file"
                .to_string()]
        );
    }

    #[test]
    fn unrecognised_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "weights.pt", b"junk");
        let err = inspect_base(dir.path()).expect_err("no model");
        assert!(err.to_string().starts_with(
            "no config.json and no .gguf file (found weights.pt): a base model is a Hugging Face \
             directory or one GGUF file"
        ));
    }

    #[test]
    fn config_and_gguf_together_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(dir.path());
        write(dir.path(), "model.gguf", &tiny_gguf().bytes());
        let err = inspect_base(dir.path()).expect_err("ambiguous");
        assert!(err.to_string().contains("both config.json and model.gguf"), "{err}");
    }

    #[test]
    fn two_ggufs_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.gguf", &tiny_gguf().bytes());
        write(dir.path(), "b.gguf", &tiny_gguf().bytes());
        let err = inspect_base(dir.path()).expect_err("two files");
        assert!(err.to_string().contains("2 .gguf files (a.gguf, b.gguf)"), "{err}");
    }

    #[test]
    fn gguf_must_be_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "model.gguf", &tiny_gguf().bytes());
        write(dir.path(), "README.md", b"hello");
        let err = inspect_base(dir.path()).expect_err("extra file");
        assert_eq!(
            err.0,
            vec!["model.gguf: a GGUF base model must be the only file, but the upload also has \
                 README.md"
                .to_string()]
        );
    }

    #[test]
    fn adapter_fits_tiny_base() {
        let base_dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(base_dir.path());
        let base = inspect_base(base_dir.path()).expect("base");
        let adapter_dir = tempfile::tempdir().expect("tempdir");
        write_adapter(adapter_dir.path(), &default_adapter_config(), &tiny_adapter_tensors(8));
        let adapter = inspect_adapter(adapter_dir.path()).expect("adapter");
        assert_eq!(check_adapter_against_base(&adapter, &base.config.dims, "llama"), Vec::<String>::new());

        // The same adapter fits the GGUF rendition of the same model.
        let gguf_dir = tempfile::tempdir().expect("tempdir");
        write(gguf_dir.path(), "model.gguf", &tiny_gguf().bytes());
        let gguf_base = inspect_base(gguf_dir.path()).expect("gguf base");
        assert_eq!(check_adapter_against_base(&adapter, &gguf_base.config.dims, "llama"), Vec::<String>::new());
    }

    #[test]
    fn adapter_for_another_model_is_rejected() {
        let base_dir = tempfile::tempdir().expect("tempdir");
        write_llama_dir(base_dir.path());
        let mut base = inspect_base(base_dir.path()).expect("base");
        base.config.dims.hidden_size = 576;
        base.config.dims.num_layers = 1;
        let adapter = AdapterSummary {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            target_modules: vec!["q_proj".into(), "qkv_proj".into()],
            base_model_name_or_path: None,
            modules: vec![
                LoraModule {
                    layer: 0,
                    module: "q_proj".into(),
                    rank: 8,
                    in_features: 64,
                    out_features: 64,
                    scale: 2.0,
                },
                LoraModule {
                    layer: 1,
                    module: "qkv_proj".into(),
                    rank: 8,
                    in_features: 64,
                    out_features: 128,
                    scale: 2.0,
                },
            ],
            parameter_count: 0,
            ranks: vec![8],
        };
        let problems = check_adapter_against_base(&adapter, &base.config.dims, "llama");
        assert_eq!(
            problems,
            vec![
                "layer 0 q_proj: lora_A expects 64 input features but the base model's hidden \
                 size is 576 (the adapter was trained for another base model)"
                    .to_string(),
                "layer 1 qkv_proj: the base model has 1 layers (0 to 0)".to_string(),
                "layer 1 qkv_proj: qkv_proj is not a linear layer of the base llama architecture \
                 (expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    .to_string(),
            ]
        );
        let empty = AdapterSummary { modules: vec![], ..adapter };
        assert_eq!(
            check_adapter_against_base(&empty, &base.config.dims, "llama"),
            vec!["the adapter patches no modules: adapter_model.safetensors has no \
                  lora_A/lora_B pairs"
                .to_string()]
        );
    }

    #[test]
    fn layer_index_parses_decoder_names() {
        assert_eq!(layer_index("model.layers.12.self_attn.q_proj.weight"), Some((12, "self_attn.q_proj.weight")));
        assert_eq!(layer_index("model.norm.weight"), None);
        assert_eq!(layer_index("model.layers.x.mlp"), None);
        assert_eq!(layer_index("model.layers.99999999999999.mlp"), None);
    }
}
