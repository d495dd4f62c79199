//! Loading a model and its tokenizer from what a user points at: one GGUF file, or a Hugging
//! Face directory.

use std::path::Path;

use candle_core::Device;

use crate::error::{EngineError, Result};
use crate::model::weights::Checkpoint;
use crate::model::{LlamaModel, Precision};
use crate::tokenizer::Tokenizer;

/// A loaded model with its tokenizer, ready for `Engine::start`.
pub struct Loaded {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
}

/// Loads `path`: a `.gguf` file (weights, tokenizer and chat template from its metadata), or
/// a directory with `config.json`, safetensors and `tokenizer.json`. A directory holding one
/// GGUF file is accepted too (that is how the artifact store keeps an uploaded GGUF).
pub fn load(path: &Path, precision: Precision, device: &Device) -> Result<Loaded> {
    let gguf = if path.is_dir() && !path.join("config.json").exists() {
        let mut ggufs: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.len() {
            1 => ggufs.pop(),
            0 => {
                return Err(EngineError::InvalidModel(format!(
                    "{}: no config.json and no .gguf file; a model is a Hugging Face directory or a GGUF file",
                    path.display()
                )))
            }
            n => return Err(EngineError::InvalidModel(format!("{}: {n} GGUF files; expected one", path.display()))),
        }
    } else if path.is_file() {
        Some(path.to_path_buf())
    } else {
        None
    };
    match gguf {
        Some(file) => {
            let (model, ckpt) = LlamaModel::load_gguf(&file, precision, device)?;
            let Checkpoint::Gguf { content, .. } = &ckpt else {
                return Err(EngineError::Internal("a GGUF load returned another checkpoint kind".into()));
            };
            let tokenizer = Tokenizer::from_gguf(content)?;
            check_vocab(&model, &tokenizer)?;
            Ok(Loaded { model, tokenizer })
        }
        None => {
            if !path.exists() {
                return Err(EngineError::InvalidModel(format!("{}: no such file or directory", path.display())));
            }
            let model = LlamaModel::load_hf(path, precision, device)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            check_vocab(&model, &tokenizer)?;
            Ok(Loaded { model, tokenizer })
        }
    }
}

/// A tokenizer that can produce ids the model has no embedding for would fail mid-request;
/// refuse the pair at load instead.
fn check_vocab(model: &LlamaModel, tokenizer: &Tokenizer) -> Result<()> {
    if tokenizer.vocab_size() > model.config.vocab_size {
        return Err(EngineError::InvalidModel(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            tokenizer.vocab_size(),
            model.config.vocab_size
        )));
    }
    Ok(())
}
