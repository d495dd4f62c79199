//! One verdict per file: the engine's loader and `:validateUpload`'s inspection
//! (hearth-formats) accept and refuse the same checkpoints and adapters, with the same words.
//! The cases are the ones where they used to disagree, and their neighbours.

mod common;

use std::path::Path;

use candle_core::Device;
use hearth_engine::{EngineError, Precision};
use serde_json::{json, Value};

/// The engine's verdict on an adapter for the tiny Llama: `Ok` or its refusal.
fn engine_adapter(dir: &Path) -> Result<(), String> {
    let loaded = hearth_engine::load(&common::fixtures().join("tiny_llama"), Precision::Native, &Device::Cpu)
        .expect("the tiny base loads");
    match hearth_engine::lora::load_peft("x", dir, &loaded.model.config, false, &Device::Cpu) {
        Ok(_) => Ok(()),
        Err(EngineError::InvalidRequest(m)) => Err(m),
        Err(e) => panic!("{}: unexpected {e:?}", dir.display()),
    }
}

/// Validation's verdict on the same adapter against the tiny Llama's inspected config.
fn validation_adapter(dir: &Path) -> Result<(), String> {
    let base = hearth_formats::inspect_hf_dir(&common::fixtures().join("tiny_llama")).expect("the tiny base validates");
    let adapter = hearth_formats::inspect_adapter(dir).map_err(|p| p.to_string())?;
    let problems =
        hearth_formats::check_adapter_against_base(&adapter, &base.config.dims, base.config.architecture.name());
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// An adapter directory: a fixture's weights with `config` as its adapter_config.json.
fn adapter(weights_from: &str, config: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = common::fixtures().join("lora").join(weights_from);
    std::fs::copy(src.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors")).expect("copy");
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).expect("write");
    dir
}

/// `config` with `key` set to `value`.
fn with(config: &Value, key: &str, value: Value) -> Value {
    let mut c = config.clone();
    c[key] = value;
    c
}

fn fixture_config(name: &str) -> Value {
    let text = std::fs::read_to_string(common::fixtures().join("lora").join(name).join("adapter_config.json"));
    serde_json::from_str(&text.expect("config")).expect("json")
}

#[test]
fn adapters_get_one_verdict() {
    let attn = fixture_config("attn_only");
    let without = |keys: &[&str]| {
        let mut c = attn.clone();
        for k in keys {
            c.as_object_mut().expect("object").remove(*k);
        }
        c
    };
    let mut rank = fixture_config("rank_pattern");
    rank["rank_pattern"] =
        json!({"q_proj": 4, "model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 12});
    let mut rank_reversed = rank.clone();
    rank_reversed["rank_pattern"] =
        json!({"model.layers.0.self_attn.q_proj": 8, "q_proj": 4, "model.layers.1.mlp.down_proj": 12});
    let cases: Vec<(&str, tempfile::TempDir, bool)> = vec![
        ("PEFT's defaults for r and lora_alpha", adapter("attn_only", &without(&["r", "lora_alpha"])), true),
        ("rank_pattern in file order", adapter("rank_pattern", &rank), true),
        ("rank_pattern whose first match is wrong", adapter("rank_pattern", &rank_reversed), false),
        ("no peft_type", adapter("attn_only", &without(&["peft_type"])), false),
        ("a rank that is not the file's", adapter("attn_only", &with(&attn, "r", json!(16))), false),
    ];
    for (what, dir, accepted) in cases {
        let (engine, validation) = (engine_adapter(dir.path()), validation_adapter(dir.path()));
        assert_eq!(engine, validation, "{what}: the engine and validation disagree");
        assert_eq!(engine.is_ok(), accepted, "{what}: {engine:?}");
    }
    for bad in ["dora", "modules_to_save", "bias_all", "embed_target", "bin_weights", "hidden_mismatch", "no_match"] {
        let dir = common::fixtures().join("lora/bad").join(bad);
        let (engine, validation) = (engine_adapter(&dir), validation_adapter(&dir));
        assert!(engine.is_err(), "{bad} was accepted");
        assert_eq!(engine, validation, "{bad}: the engine and validation disagree");
    }
}

/// The engine's verdict on a base model directory or file, and validation's.
fn verdicts(path: &Path) -> (Result<(), String>, Result<(), String>) {
    let engine = match hearth_engine::load(path, Precision::Native, &Device::Cpu) {
        Ok(_) => Ok(()),
        Err(EngineError::InvalidModel(m)) => Err(m),
        Err(e) => panic!("{}: unexpected {e:?}", path.display()),
    };
    let validation = if path.is_file() {
        hearth_formats::inspect_gguf_file(path).map(|_| ()).map_err(|p| p.to_string())
    } else {
        hearth_formats::inspect_hf_dir(path).map(|_| ()).map_err(|p| p.to_string())
    };
    (engine, validation)
}

#[test]
fn base_models_get_one_verdict() {
    let llama3 = common::fixtures().join("tiny_llama3");
    for path in [llama3.clone(), llama3.join("model.gguf")] {
        let (engine, validation) = verdicts(&path);
        assert_eq!(engine, Ok(()), "{}", path.display());
        assert_eq!(validation, Ok(()), "{}", path.display());
    }
    // RoPE scaling hearth does not implement is refused by both, in the same words.
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(llama3.join(f), dir.path().join(f)).expect("copy");
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(llama3.join("config.json")).expect("config")).expect("json");
    config["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");
    let (engine, validation) = verdicts(dir.path());
    assert!(engine.as_ref().is_err_and(|m| m.contains("rope_scaling of type yarn is not supported")), "{engine:?}");
    assert_eq!(engine, validation);
}
