//! hearth's inference engine as a library: loads a model (GGUF or a Hugging Face directory),
//! runs the Llama family's forward pass (on the CPU with its own kernels, on a GPU with candle
//! tensors), tokenizes and renders chat
//! templates, and serves many sequences at once through a continuous-batching scheduler.
//!
//! It knows nothing of HTTP, databases or deployments: its API boundary is the `Engine`
//! handle.

pub mod chat;
pub mod constraint;
pub mod engine;
pub mod error;
pub mod gbnf;
pub mod kernels;
pub mod load;
pub mod lora;
pub mod model;
pub mod plan;
pub mod prefix;
pub mod sampling;
pub mod speculate;
mod threads;
pub mod tokenizer;
pub mod tools;

pub use constraint::Grammar;
pub use engine::{AdapterInfo, Engine, EngineConfig, Event, FinishReason, GenerateRequest};
pub use error::EngineError;
pub use load::{device_name, load, select_device, Loaded};
pub use model::{KvDtype, Precision};
pub use sampling::SamplingParams;
