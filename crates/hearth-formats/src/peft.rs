//! PEFT LoRA addons: adapter_config.json and adapter_model.safetensors, checked against each other
//! and against what the serving engine supports (plain LoRA on decoder linear layers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Map, Value};

use super::safetensors::{self, Tensor};
use super::{fmt_shape, is_float_dtype, layer_index, list_dir, push_limited, read_json, AdapterSummary, LoraModule};

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";
/// Problems about individual tensors reported per kind before summarising.
const NAMES_REPORTED: usize = 10;
/// PEFT's default `lora_alpha` and `r` when the config omits them.
const PEFT_DEFAULT_R: u32 = 8;
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// The parts of adapter_config.json that matter once the refusals are checked.
#[derive(Debug)]
struct LoraConfig {
    r: u32,
    lora_alpha: f64,
    use_rslora: bool,
    target_modules: Vec<String>,
    /// In file order: PEFT uses the first key that matches.
    rank_pattern: Vec<(String, u32)>,
    /// In file order, like `rank_pattern`.
    alpha_pattern: Vec<(String, f64)>,
    layers_to_transform: Option<BTreeSet<u32>>,
    base_model_name_or_path: Option<String>,
}

pub(crate) fn inspect(dir: &Path) -> Result<AdapterSummary, Vec<String>> {
    let mut problems = Vec::new();
    let Some(files) = list_dir(dir, &mut problems) else {
        return Err(problems);
    };
    // An image-model LoRA (Stable Diffusion, Flux: what Civitai mostly hosts) is refused with
    // that one reason; the dozens of "unexpected tensor" problems it would raise explain nothing.
    for name in files.keys().filter(|n| n.ends_with(".safetensors")) {
        let mut ignored = Vec::new();
        if let Some(header) = safetensors::read_header(&dir.join(name), name, &mut ignored) {
            if let Some(reason) = image_lora_reason(header.tensors.keys().map(String::as_str)) {
                return Err(vec![format!("{name}: {reason}")]);
            }
        }
    }
    let config = if files.contains_key(CONFIG) {
        read_json(dir, CONFIG, &mut problems).and_then(|v| parse_config(v, &mut problems))
    } else {
        problems.push(format!("{CONFIG} missing: a LoRA addon is a PEFT directory with {CONFIG} and {WEIGHTS}"));
        None
    };
    let has_bin = files.contains_key("adapter_model.bin");
    if has_bin {
        problems.push(
            "adapter_model.bin: .bin weights are not supported; save with \
             safe_serialization=True"
                .to_string(),
        );
    }
    let header = if files.contains_key(WEIGHTS) {
        safetensors::read_header(&dir.join(WEIGHTS), WEIGHTS, &mut problems)
    } else {
        if !has_bin {
            problems.push(format!("{WEIGHTS} missing: a LoRA addon is a PEFT directory with {CONFIG} and {WEIGHTS}"));
        }
        None
    };
    let Some(header) = header else {
        return Err(problems);
    };
    let modules = collect_modules(&header.tensors, config.as_ref(), &mut problems);
    let Some(config) = config else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let target_modules: BTreeSet<String> = modules.iter().map(|m| m.module.clone()).collect();
    let ranks: BTreeSet<u32> = modules.iter().map(|m| m.rank).collect();
    Ok(AdapterSummary {
        r: config.r,
        lora_alpha: config.lora_alpha,
        use_rslora: config.use_rslora,
        target_modules: target_modules.into_iter().collect(),
        base_model_name_or_path: config.base_model_name_or_path,
        modules,
        parameter_count: header.parameter_count(),
        ranks: ranks.into_iter().collect(),
    })
}

/// Why tensors named like this belong to an image model's LoRA, if they do: kohya-ss names
/// (`lora_unet_…`, `lora_te1_…`) or diffusers names (`unet.…`, `transformer.…` with
/// `lora.down`/`lora_A`), none of which exist in a language model.
pub(crate) fn image_lora_reason<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    for name in names {
        let kohya = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_"]
            .iter()
            .any(|p| name.starts_with(p));
        let diffusers = ["unet.", "text_encoder.", "text_encoder_2.", "transformer.", "diffusion_model."]
            .iter()
            .any(|p| name.starts_with(p))
            && (name.contains("lora") || name.ends_with(".alpha"));
        if kohya || diffusers {
            let style = if kohya { "kohya-ss" } else { "diffusers" };
            return Some(format!(
                "this is an image-model LoRA ({style} tensor names such as {name}), not a PEFT adapter \
                 of a language model; hearth serves language models only"
            ));
        }
    }
    None
}

fn get_bool(obj: &Map<String, Value>, key: &str, problems: &mut Vec<String>) -> bool {
    match obj.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            problems.push(format!("{CONFIG}: {key} must be true or false, found {other}"));
            false
        }
    }
}

/// A positive rank below 2^32.
fn as_rank(value: &Value) -> Option<u32> {
    value.as_u64().and_then(|v| u32::try_from(v).ok()).filter(|&v| v > 0)
}

/// Characters that make a PEFT pattern key a regular expression rather than a module name ('.'
/// is allowed: module paths are dotted, and a literal dot matches itself).
fn is_regex(key: &str) -> bool {
    key.chars().any(|c| "*+?[](){}|^$\\".contains(c))
}

fn parse_config(value: Value, problems: &mut Vec<String>) -> Option<LoraConfig> {
    let Value::Object(obj) = value else {
        problems.push(format!("{CONFIG}: not a JSON object"));
        return None;
    };
    let mut ok = true;
    match obj.get("peft_type") {
        Some(Value::String(t)) if t == "LORA" => {}
        Some(Value::String(t)) => {
            problems.push(format!("{CONFIG}: peft_type {t} is not supported (expected LORA)"));
            ok = false;
        }
        _ => {
            problems.push(format!("{CONFIG}: peft_type missing (expected \"LORA\")"));
            ok = false;
        }
    }
    let r = match obj.get("r") {
        None | Some(Value::Null) => PEFT_DEFAULT_R,
        Some(v) => as_rank(v).unwrap_or_else(|| {
            problems.push(format!("{CONFIG}: r must be a positive integer, found {v}"));
            ok = false;
            PEFT_DEFAULT_R
        }),
    };
    let lora_alpha = match obj.get("lora_alpha") {
        None | Some(Value::Null) => PEFT_DEFAULT_ALPHA,
        Some(v) => match v.as_f64().filter(|a| a.is_finite() && *a > 0.0) {
            Some(a) => a,
            None => {
                problems.push(format!("{CONFIG}: lora_alpha must be a positive number, found {v}"));
                ok = false;
                PEFT_DEFAULT_ALPHA
            }
        },
    };
    let target_modules = match obj.get("target_modules") {
        Some(Value::Array(list)) => {
            let names: Vec<String> = list.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
            if names.len() != list.len() || names.is_empty() {
                problems.push(format!("{CONFIG}: target_modules must be a non-empty list of module names"));
                ok = false;
            }
            names
        }
        Some(Value::String(s)) => {
            problems.push(format!(
                "{CONFIG}: target_modules as a regex is not supported; list the module names \
                 (found {s:?})"
            ));
            ok = false;
            Vec::new()
        }
        _ => {
            problems.push(format!("{CONFIG}: target_modules is missing; list the module names"));
            ok = false;
            Vec::new()
        }
    };
    for t in &target_modules {
        if let Some(m) = ["embed_tokens", "lm_head"].iter().find(|m| t.ends_with(*m)) {
            problems.push(format!(
                "{CONFIG}: target_modules includes {t}: LoRA on {m} is not supported (only the \
                 decoder's linear layers)"
            ));
            ok = false;
        }
    }
    let use_rslora = get_bool(&obj, "use_rslora", problems);
    if get_bool(&obj, "use_dora", problems) {
        problems.push(format!("{CONFIG}: use_dora: true (DoRA) is not supported; train a plain LoRA"));
        ok = false;
    }
    if get_bool(&obj, "lora_bias", problems) {
        problems.push(format!("{CONFIG}: lora_bias: true (a bias on lora_B) is not supported"));
        ok = false;
    }
    if get_bool(&obj, "fan_in_fan_out", problems) {
        problems.push(format!(
            "{CONFIG}: fan_in_fan_out: true is for GPT-2 style Conv1D layers; the supported base \
             architectures use Linear layers"
        ));
        ok = false;
    }
    match obj.get("modules_to_save") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) if list.is_empty() => {}
        Some(v) => {
            problems.push(format!(
                "{CONFIG}: modules_to_save {v}: adapters that carry full copies of modules are \
                 not supported"
            ));
            ok = false;
        }
    }
    match obj.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(v) => {
            problems.push(format!("{CONFIG}: bias {v}: training bias terms is not supported; use bias=\"none\""));
            ok = false;
        }
    }
    match obj.get("layer_replication") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) if list.is_empty() => {}
        Some(_) => {
            problems.push(format!("{CONFIG}: layer_replication is not supported"));
            ok = false;
        }
    }
    let rank_pattern = parse_pattern(&obj, "rank_pattern", problems, |v| as_rank(v).ok_or("a positive integer"));
    let alpha_pattern = parse_pattern(&obj, "alpha_pattern", problems, |v| {
        v.as_f64().filter(|a| a.is_finite() && *a > 0.0).ok_or("a positive number")
    });
    let (Some(rank_pattern), Some(alpha_pattern)) = (rank_pattern, alpha_pattern) else {
        return None;
    };
    let layers_to_transform = match obj.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Number(_)) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Some(BTreeSet::from([n])),
            None => {
                problems.push(format!("{CONFIG}: layers_to_transform must be layer indices, found {v}"));
                ok = false;
                None
            }
        },
        Some(Value::Array(list)) => {
            let layers: BTreeSet<u32> =
                list.iter().filter_map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok())).collect();
            if layers.len() != list.len() {
                problems.push(format!("{CONFIG}: layers_to_transform must be a list of distinct layer indices"));
                ok = false;
            }
            Some(layers)
        }
        Some(v) => {
            problems.push(format!("{CONFIG}: layers_to_transform must be layer indices, found {v}"));
            ok = false;
            None
        }
    };
    let base_model_name_or_path = match obj.get("base_model_name_or_path") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    ok.then_some(LoraConfig {
        r,
        lora_alpha,
        use_rslora,
        target_modules,
        rank_pattern,
        alpha_pattern,
        layers_to_transform,
        base_model_name_or_path,
    })
}

/// Parses `rank_pattern` / `alpha_pattern`: an object of module name (or name suffix) to value.
/// `None` when it is malformed (already reported).
fn parse_pattern<T>(
    obj: &Map<String, Value>,
    key: &str,
    problems: &mut Vec<String>,
    value: impl Fn(&Value) -> Result<T, &'static str>,
) -> Option<Vec<(String, T)>> {
    let map = match obj.get(key) {
        None | Some(Value::Null) => return Some(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(other) => {
            problems.push(format!("{CONFIG}: {key} must be an object of module name to value, found {other}"));
            return None;
        }
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (k, v) in map {
        if is_regex(k) {
            problems.push(format!(
                "{CONFIG}: {key} key {k:?} is a regex, which is not supported; use module names \
                 such as \"q_proj\" or \"model.layers.3.self_attn.q_proj\""
            ));
            ok = false;
        }
        match value(v) {
            Ok(n) => out.push((k.clone(), n)),
            Err(what) => {
                problems.push(format!("{CONFIG}: {key}[{k:?}] must be {what}, found {v}"));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// Whether a PEFT module key (target or pattern key) names `path`, the module's full name: PEFT
/// matches a key when the full name is the key or ends with "." followed by the key.
fn key_matches(key: &str, path: &str) -> bool {
    path == key || path.strip_suffix(key).is_some_and(|head| head.ends_with('.'))
}

/// Where a linear layer lives inside a decoder layer.
fn parent_of(module: &str) -> Option<&'static str> {
    match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => Some("self_attn"),
        "gate_proj" | "up_proj" | "down_proj" => Some("mlp"),
        _ => None,
    }
}

/// One patched module's two matrices, keyed by its full name.
#[derive(Default)]
struct Pair<'a> {
    layer: u32,
    module: &'a str,
    a: Option<&'a [u64]>,
    b: Option<&'a [u64]>,
}

/// Sorts the safetensors tensors into lora_A/lora_B pairs, reporting every tensor that is not
/// plain LoRA on a decoder layer, and checks ranks against the config.
fn collect_modules(
    tensors: &BTreeMap<String, Tensor>,
    config: Option<&LoraConfig>,
    problems: &mut Vec<String>,
) -> Vec<LoraModule> {
    let mut bad = Vec::new();
    let mut pairs: BTreeMap<&str, Pair<'_>> = BTreeMap::new();
    for (name, t) in tensors {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            bad.push(format!(
                "{name}: not a PEFT LoRA tensor (expected names like \
                 base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
            ));
            continue;
        };
        let (path, is_a) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
            (p, true)
        } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
            (p, false)
        } else {
            bad.push(classify_other(name, rest));
            continue;
        };
        let module = path.rsplit('.').next().unwrap_or(path);
        if matches!(module, "embed_tokens" | "lm_head") {
            bad.push(format!("{name}: LoRA on {module} is not supported"));
            continue;
        }
        let Some((layer, within)) = layer_index(path).filter(|_| path.starts_with("model.layers.")) else {
            bad.push(format!(
                "{name}: not inside a decoder layer (expected \
                 base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_A.weight)"
            ));
            continue;
        };
        if let Some(parent) = parent_of(module) {
            if within != format!("{parent}.{module}") {
                bad.push(format!("{name}: {module} belongs at model.layers.{layer}.{parent}.{module}"));
                continue;
            }
        }
        if !is_float_dtype(&t.dtype) {
            bad.push(format!("{name}: dtype {} is not a floating-point type (F16, BF16 or F32)", t.dtype));
        }
        if t.shape.len() != 2 {
            bad.push(format!("{name}: shape {} is not a matrix", fmt_shape(&t.shape)));
            continue;
        }
        let pair = pairs.entry(path).or_insert_with(|| Pair { layer, module, ..Pair::default() });
        if is_a {
            pair.a = Some(&t.shape);
        } else {
            pair.b = Some(&t.shape);
        }
    }
    push_limited(problems, bad, NAMES_REPORTED, "unsupported tensors");

    let mut wrong = Vec::new();
    let mut modules = Vec::new();
    for (path, pair) in &pairs {
        let (a, b) = match (pair.a, pair.b) {
            (Some([ra, in_f]), Some([out_f, rb])) => ((*ra, *in_f), (*out_f, *rb)),
            (Some(_), None) => {
                wrong.push(format!("{path}: lora_A.weight has no lora_B.weight"));
                continue;
            }
            (None, Some(_)) => {
                wrong.push(format!("{path}: lora_B.weight has no lora_A.weight"));
                continue;
            }
            // Only matrices are ever recorded.
            _ => continue,
        };
        let ((rank, in_features), (out_features, rank_b)) = (a, b);
        if rank != rank_b {
            wrong.push(format!(
                "{path}: lora_A has rank {rank} (shape [{rank}, {in_features}]) but lora_B has \
                 rank {rank_b} (shape [{out_features}, {rank_b}])"
            ));
            continue;
        }
        let Some(rank) = u32::try_from(rank).ok().filter(|&r| r > 0) else {
            wrong.push(format!("{path}: rank {rank} must be positive and below 2^32"));
            continue;
        };
        let mut scale = 0.0;
        if let Some(config) = config {
            // PEFT's rule (`get_pattern_key`): the first key in file order that names the module.
            let (expected, source) = config.rank_pattern.iter().find(|(key, _)| key_matches(key, path)).map_or_else(
                || (config.r, format!("r = {}", config.r)),
                |(key, r)| (*r, format!("rank_pattern[{key:?}] = {r}")),
            );
            let alpha =
                config.alpha_pattern.iter().find(|(key, _)| key_matches(key, path)).map_or(config.lora_alpha, |p| p.1);
            scale = if config.use_rslora { alpha / f64::from(rank).sqrt() } else { alpha / f64::from(rank) };
            if rank != expected {
                wrong.push(format!("{path}: rank {rank} but {CONFIG} says {source}"));
            }
            if !config.target_modules.iter().any(|t| key_matches(t, path)) {
                wrong.push(format!("{path}: has LoRA weights but {CONFIG}'s target_modules does not name it"));
            }
            if let Some(layers) = &config.layers_to_transform {
                if !layers.contains(&pair.layer) {
                    wrong.push(format!("{path}: layer {} is not in {CONFIG}'s layers_to_transform", pair.layer));
                }
            }
        }
        modules.push(LoraModule {
            layer: pair.layer,
            module: pair.module.to_string(),
            rank,
            in_features,
            out_features,
            scale,
        });
    }
    push_limited(problems, wrong, NAMES_REPORTED * 2, "mismatched LoRA tensors");
    modules.sort_by(|x, y| (x.layer, &x.module).cmp(&(y.layer, &y.module)));
    modules
}

/// Says what a tensor that is neither lora_A.weight nor lora_B.weight is.
fn classify_other(name: &str, rest: &str) -> String {
    if rest.contains("lora_embedding_") {
        format!("{name}: LoRA on embeddings is not supported")
    } else if rest.contains("lora_magnitude_vector") {
        format!("{name}: DoRA magnitude vectors are not supported")
    } else if rest.ends_with(".lora_B.bias") {
        format!("{name}: a bias on lora_B (lora_bias) is not supported")
    } else if rest.contains(".lora_A.") || rest.contains(".lora_B.") {
        format!(
            "{name}: expected <module>.lora_A.weight or <module>.lora_B.weight (without an \
             adapter name, as save_pretrained writes them)"
        )
    } else {
        format!(
            "{name}: not a LoRA matrix; adapters that carry full module weights \
             (modules_to_save, trained biases) are not supported"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::*;

    fn adapter_err(config: &serde_json::Value, tensors: &[TensorSpec]) -> Vec<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        write_adapter(dir.path(), config, tensors);
        inspect_adapter(dir.path()).expect_err("should fail").into_vec()
    }

    fn config_with(key: &str, value: serde_json::Value) -> serde_json::Value {
        let mut c = default_adapter_config();
        c[key] = value;
        c
    }

    #[test]
    fn valid_adapter_is_summarised() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_adapter(dir.path(), &default_adapter_config(), &tiny_adapter_tensors(8));
        let s = inspect_adapter(dir.path()).expect("valid");
        assert_eq!(s.r, 8);
        assert_eq!(s.lora_alpha, 16.0);
        assert!(!s.use_rslora);
        assert_eq!(s.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!(s.base_model_name_or_path.as_deref(), Some("tiny-llama"));
        assert_eq!(s.ranks, vec![8]);
        assert_eq!(s.modules.len(), 4);
        assert_eq!(
            s.modules.first(),
            Some(&LoraModule {
                layer: 0,
                module: "q_proj".into(),
                rank: 8,
                in_features: 64,
                out_features: 64,
                scale: 2.0
            })
        );
        assert_eq!(
            s.modules.get(1),
            Some(&LoraModule {
                layer: 0,
                module: "v_proj".into(),
                rank: 8,
                in_features: 64,
                out_features: 32,
                scale: 2.0
            })
        );
        // Per layer: q (8*64 + 64*8) + v (8*64 + 32*8).
        assert_eq!(s.parameter_count, 2 * (1024 + 768));
        // The list of linear modules stays in sync with where they live.
        assert!(LINEAR_MODULES.iter().all(|m| parent_of(m).is_some()));
    }

    #[test]
    fn image_model_loras_are_refused_with_one_reason() {
        for (file, tensor) in [
            ("pirate_style.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
            ("adapter_model.safetensors", "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"),
            ("flux.safetensors", "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight"),
            ("sd.safetensors", "unet.down_blocks.0.attentions.0.to_q.lora.down.weight"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            write(dir.path(), file, &safetensors_bytes(&[(tensor.to_string(), "F16", vec![4, 4])]));
            let problems = inspect_adapter(dir.path()).expect_err("image LoRA").into_vec();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].starts_with(file) && problems[0].contains("image-model LoRA"), "{problems:?}");
        }
        // A language model's PEFT names are not mistaken for one.
        let names = tiny_adapter_tensors(8);
        assert_eq!(image_lora_reason(names.iter().map(|(n, _, _)| n.as_str())), None);
    }

    #[test]
    fn rank_pattern_adapter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            config_with("rank_pattern", serde_json::json!({"model.layers.1.self_attn.v_proj": 4, "q_proj": 2}));
        let mut tensors = tiny_adapter_tensors(8);
        for (name, _, shape) in &mut tensors {
            let rank = if name.contains("q_proj") {
                2
            } else if name.contains("layers.1.self_attn.v_proj") {
                4
            } else {
                8
            };
            if name.ends_with("lora_A.weight") {
                shape[0] = rank;
            } else {
                shape[1] = rank;
            }
        }
        write_adapter(dir.path(), &config, &tensors);
        let s = inspect_adapter(dir.path()).expect("valid");
        assert_eq!(s.ranks, vec![2, 4, 8]);
        let ranks: Vec<(u32, &str, u32)> = s.modules.iter().map(|m| (m.layer, m.module.as_str(), m.rank)).collect();
        assert_eq!(ranks, vec![(0, "q_proj", 2), (0, "v_proj", 8), (1, "q_proj", 2), (1, "v_proj", 4)]);

        // The same pattern with the wrong rank in layer 1's v_proj.
        let mut bad = tensors.clone();
        for (name, _, shape) in &mut bad {
            if name.contains("layers.1.self_attn.v_proj") {
                if name.ends_with("lora_A.weight") {
                    shape[0] = 8;
                } else {
                    shape[1] = 8;
                }
            }
        }
        assert_eq!(
            adapter_err(&config, &bad),
            vec![
                "model.layers.1.self_attn.v_proj: rank 8 but adapter_config.json says \
                  rank_pattern[\"model.layers.1.self_attn.v_proj\"] = 4"
            ]
        );
    }

    #[test]
    fn refusals_are_named() {
        let t = tiny_adapter_tensors(8);
        let cases = [
            (
                config_with("use_dora", true.into()),
                "adapter_config.json: use_dora: true (DoRA) is not supported; train a plain LoRA",
            ),
            (
                config_with("modules_to_save", serde_json::json!(["lm_head"])),
                "adapter_config.json: modules_to_save [\"lm_head\"]: adapters that carry full \
                 copies of modules are not supported",
            ),
            (
                config_with("bias", "all".into()),
                "adapter_config.json: bias \"all\": training bias terms is not supported; use \
                 bias=\"none\"",
            ),
            (
                config_with("lora_bias", true.into()),
                "adapter_config.json: lora_bias: true (a bias on lora_B) is not supported",
            ),
            (
                config_with("target_modules", serde_json::json!(["q_proj", "v_proj", "lm_head"])),
                "adapter_config.json: target_modules includes lm_head: LoRA on lm_head is not \
                 supported (only the decoder's linear layers)",
            ),
            (
                config_with("target_modules", ".*(q|v)_proj".into()),
                "adapter_config.json: target_modules as a regex is not supported; list the \
                 module names (found \".*(q|v)_proj\")",
            ),
            (
                config_with("peft_type", "IA3".into()),
                "adapter_config.json: peft_type IA3 is not supported (expected LORA)",
            ),
            (
                config_with("fan_in_fan_out", true.into()),
                "adapter_config.json: fan_in_fan_out: true is for GPT-2 style Conv1D layers; \
                 the supported base architectures use Linear layers",
            ),
            (
                config_with("rank_pattern", serde_json::json!({"layers\\.[0-3]\\.q_proj": 4})),
                "adapter_config.json: rank_pattern key \"layers\\\\.[0-3]\\\\.q_proj\" is a \
                 regex, which is not supported; use module names such as \"q_proj\" or \
                 \"model.layers.3.self_attn.q_proj\"",
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(adapter_err(&config, &t), vec![expected.to_string()]);
        }
    }

    #[test]
    fn embedding_tensors_are_refused() {
        let mut t = tiny_adapter_tensors(8);
        t.push(("base_model.model.model.embed_tokens.lora_embedding_A".into(), "F32", vec![8, 100]));
        t.push(("base_model.model.lm_head.weight".into(), "F32", vec![100, 64]));
        t.push(("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(), "F32", vec![64]));
        assert_eq!(
            adapter_err(&default_adapter_config(), &t),
            vec![
                "base_model.model.lm_head.weight: not a LoRA matrix; adapters that carry full \
                 module weights (modules_to_save, trained biases) are not supported",
                "base_model.model.model.embed_tokens.lora_embedding_A: LoRA on embeddings is not \
                 supported",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector: DoRA \
                 magnitude vectors are not supported",
            ]
        );
    }

    #[test]
    fn bin_weights_and_missing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "adapter_model.bin", b"pickle");
        assert_eq!(
            inspect_adapter(dir.path()).expect_err("bin").into_vec(),
            vec![
                "adapter_config.json missing: a LoRA addon is a PEFT directory with \
                 adapter_config.json and adapter_model.safetensors",
                "adapter_model.bin: .bin weights are not supported; save with \
                 safe_serialization=True",
            ]
        );
        let dir = tempfile::tempdir().expect("tempdir");
        write_json(dir.path(), CONFIG, &default_adapter_config());
        assert_eq!(
            inspect_adapter(dir.path()).expect_err("no weights").into_vec(),
            vec![
                "adapter_model.safetensors missing: a LoRA addon is a PEFT directory with \
                  adapter_config.json and adapter_model.safetensors"
            ]
        );
    }

    #[test]
    fn unpaired_and_mismatched_tensors() {
        let mut t = tiny_adapter_tensors(8);
        t.retain(|(n, _, _)| n != "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
        for (name, _, shape) in &mut t {
            if name == "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight" {
                *shape = vec![32, 4];
            }
        }
        t.push(("base_model.model.model.layers.0.mlp.k_proj.lora_A.weight".into(), "F32", vec![8, 64]));
        t.push(("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight".into(), "F32", vec![8, 128]));
        t.push(("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight".into(), "F32", vec![64, 8]));
        let config = config_with("layers_to_transform", serde_json::json!([1]));
        assert_eq!(
            adapter_err(&config, &t),
            vec![
                "base_model.model.model.layers.0.mlp.k_proj.lora_A.weight: k_proj belongs at \
                 model.layers.0.self_attn.k_proj",
                "model.layers.0.mlp.down_proj: has LoRA weights but adapter_config.json's \
                 target_modules does not name it",
                "model.layers.0.mlp.down_proj: layer 0 is not in adapter_config.json's \
                 layers_to_transform",
                "model.layers.0.self_attn.q_proj: layer 0 is not in adapter_config.json's \
                 layers_to_transform",
                "model.layers.0.self_attn.v_proj: lora_A has rank 8 (shape [8, 64]) but lora_B \
                 has rank 4 (shape [32, 4])",
                "model.layers.1.self_attn.q_proj: lora_A.weight has no lora_B.weight",
            ]
        );
    }

    #[test]
    fn key_matching_follows_peft() {
        assert!(key_matches("q_proj", "model.layers.3.self_attn.q_proj"));
        assert!(key_matches("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.q_proj"));
        assert!(key_matches("layers.3.self_attn.q_proj", "model.layers.3.self_attn.q_proj"));
        assert!(!key_matches("3.self_attn.q_proj", "model.layers.13.self_attn.q_proj"));
        assert!(!key_matches("proj", "model.layers.3.self_attn.q_proj"));
    }
}
