//! Shared by the engine's integration tests: where the default model and the fixtures are.

#![allow(dead_code)]

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The default model, fetched by `scripts/fetch-model`; `None` (with a visible message) when
/// it is absent, so the suite still runs on a machine without it.
pub fn smollm2() -> Option<PathBuf> {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent; run scripts/fetch-model to include this test", p.display());
        None
    }
}
