//! Loading a model and its tokenizer from what a user points at: one GGUF file, or a Hugging
//! Face directory.

use std::path::Path;

use candle_core::Device;

use crate::error::{EngineError, Result};
use crate::model::weights::Checkpoint;
use crate::model::{LlamaModel, Precision};
use crate::tokenizer::Tokenizer;

/// The device a `--device` name picks: `cpu`; `cuda` or `cuda:N` (a GPU, in a build with the
/// `cuda` feature); `auto` (the first GPU when this build has CUDA and the machine has a GPU,
/// else the CPU). A GPU that was asked for by name and cannot be opened is an error, never a
/// quiet fall back to the CPU.
pub fn select_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let ordinal = match name.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "auto" => {
            if !candle_core::utils::cuda_is_available() {
                return Ok(Device::Cpu);
            }
            return Ok(Device::new_cuda(0).unwrap_or_else(|e| {
                tracing::info!(error = %e, "no usable CUDA device; computing on the CPU");
                Device::Cpu
            }));
        }
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(EngineError::InvalidRequest(format!(
                    "device {other:?} is not one hearth knows; use cpu, cuda, cuda:N or auto"
                )))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(EngineError::InvalidRequest(format!(
            "device {name:?} needs CUDA, and this hearth was built without it; build with \
             `cargo build --release --features cuda` where the CUDA toolkit is installed"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| EngineError::InvalidRequest(format!("CUDA device {ordinal}: {e}")))
}

/// A short name for logs and metrics: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

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
    // The header checks are hearth-formats', the same `:validateUpload` runs, and so are
    // their refusals.
    let refused = |p: hearth_formats::Problems| EngineError::InvalidModel(p.to_string());
    match gguf {
        Some(file) => {
            let summary = hearth_formats::inspect_gguf_file(&file).map_err(refused)?;
            let (model, ckpt) = LlamaModel::load_gguf(&file, &summary.config, precision, device)?;
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
            let summary = hearth_formats::inspect_hf_dir(path).map_err(refused)?;
            let model = LlamaModel::load_hf(path, &summary.config, precision, device)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_pick_a_device_or_say_what_is_missing() {
        assert!(select_device("cpu").expect("cpu").is_cpu());
        assert!(select_device(" CPU ").expect("cpu").is_cpu());
        let err = select_device("tpu").expect_err("unknown").to_string();
        assert!(err.contains("cpu, cuda, cuda:N or auto"), "{err}");
        let err = select_device("cuda:x").expect_err("bad ordinal").to_string();
        assert!(err.contains("cuda:N"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            assert!(select_device("auto").expect("auto").is_cpu());
            let err = select_device("cuda:1").expect_err("no CUDA in this build").to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }
}
