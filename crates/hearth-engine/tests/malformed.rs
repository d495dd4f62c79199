//! Model files that are not what they claim are refused at load with a message that names the
//! problem, never a panic.

mod common;

use std::path::Path;

use candle_core::Device;
use hearth_engine::{EngineError, Precision};

fn load_err(path: &Path) -> String {
    match hearth_engine::load(path, Precision::Native, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should have been refused", path.display()),
        Err(EngineError::InvalidModel(m)) => m,
        Err(other) => panic!("{}: expected InvalidModel, got {other:?}", path.display()),
    }
}

fn copy_tiny(dir: &Path) {
    let src = common::fixtures().join("tiny_llama");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
}

#[test]
fn a_truncated_gguf_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(common::fixtures().join("tiny_llama/model.gguf")).expect("fixture");
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    let m = load_err(&path);
    assert!(m.contains("truncated") || m.contains("cut.gguf"), "{m}");
}

#[test]
fn a_file_with_the_wrong_magic_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fake.gguf");
    std::fs::write(&path, b"NOPE this is not a gguf file at all").expect("write");
    let m = load_err(&path);
    assert!(m.contains("fake.gguf") && m.contains("not a GGUF file"), "{m}");
}

#[test]
fn tensor_shapes_that_do_not_match_the_config_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_tiny(dir.path());
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    assert!(text.contains("96"), "the fixture config changed shape");
    std::fs::write(&cfg, text).expect("write");
    let m = load_err(dir.path());
    assert!(m.contains("mlp.gate_proj.weight") && m.contains("[96, 64]"), "{m}");
}

#[test]
fn an_unknown_architecture_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_tiny(dir.path());
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).expect("config").replace("LlamaForCausalLM", "BertModel");
    std::fs::write(&cfg, text).expect("write");
    let m = load_err(dir.path());
    assert!(m.contains("BertModel") && m.contains("not supported"), "{m}");
}

#[test]
fn a_missing_path_and_an_empty_directory_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(load_err(&dir.path().join("nothing-here")).contains("no such file"));
    assert!(load_err(dir.path()).contains("no config.json and no .gguf file"));
}
