//! Model architectures and their weights. One file per architecture family; the Llama file
//! serves Llama, Mistral and Qwen2.

pub mod config;
pub mod kv;
pub mod llama;
pub mod weights;

pub use config::{Architecture, LlamaConfig};
pub use kv::{KvCache, KvDtype, SharedBlock};
pub use llama::{LlamaModel, Logits, SeqInput, Unmerge};
pub use weights::Precision;
