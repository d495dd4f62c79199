//! Where model files live and how they get there. The [`store`] keeps each model's files in a
//! directory of its own, writing them through temporary files so that a file appears only
//! complete and verified; [`signing`] makes and checks the signed URLs uploads and downloads go
//! through; [`replica_files`] fetches a model's files on a replica that cannot read the store;
//! [`sources`] fetches a model from the Hugging Face Hub, a URL, S3 or Civitai.
//!
//! It knows nothing of resources or their states: the control plane decides what a file means.

pub mod error;
pub mod mirror;
pub mod replica_files;
pub mod signing;
pub mod sources;
pub mod store;

pub use error::{ArtifactError, Result};
pub use signing::{Grant, UrlSigner};
pub use store::ArtifactStore;
