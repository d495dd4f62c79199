//! The artifact store: model files on the local filesystem, under
//! `{root}/{account}/models/{model}/{file}`.
//!
//! Writes stream to a temporary file beside the target and are renamed into place only when
//! the expected number of bytes arrived, so a reader never sees half a file and a failed
//! upload leaves nothing behind.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::error::{ControlError, Result};

/// Longest file name accepted, and the most files one model may have.
pub const MAX_FILE_NAME: usize = 255;
pub const MAX_FILES: usize = 1000;

/// Checks a model file name: one path segment of safe characters, so it can never escape
/// the model's directory.
pub fn validate_file_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_FILE_NAME
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ControlError::InvalidArgument(format!(
            "invalid file name {name:?}: use 1 to {MAX_FILE_NAME} letters, digits, '.', '_' and '-', \
             not starting with '.' and without directories"
        )))
    }
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    pub fn new(root: impl Into<PathBuf>) -> ArtifactStore {
        ArtifactStore { root: root.into() }
    }

    /// The directory holding a model's files (it may not exist yet).
    pub fn model_dir(&self, account: &str, model: &str) -> PathBuf {
        self.root.join(account).join("models").join(model)
    }

    pub fn file_path(&self, account: &str, model: &str, file: &str) -> PathBuf {
        self.model_dir(account, model).join(file)
    }

    /// Streams `body` into the model's file, refusing it unless exactly `expected` bytes
    /// arrive. Memory use is one chunk, whatever the file size.
    pub async fn write<S, E>(&self, account: &str, model: &str, file: &str, expected: u64, mut body: S) -> Result<()>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        validate_file_name(file)?;
        let dir = self.model_dir(account, model);
        tokio::fs::create_dir_all(&dir).await.map_err(ControlError::internal)?;
        let tmp = dir.join(format!(".{file}.{:016x}.partial", rand::random::<u64>()));
        let result = async {
            let mut out = tokio::fs::File::create(&tmp).await.map_err(ControlError::internal)?;
            let mut written: u64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .map_err(|e| ControlError::InvalidArgument(format!("upload of {file} was interrupted: {e}")))?;
                written += chunk.len() as u64;
                if written > expected {
                    return Err(ControlError::InvalidArgument(format!(
                        "upload of {file} is larger than the {expected} bytes its URL was signed for"
                    )));
                }
                out.write_all(&chunk).await.map_err(ControlError::internal)?;
            }
            if written != expected {
                return Err(ControlError::InvalidArgument(format!(
                    "upload of {file} has {written} bytes but its URL was signed for {expected}"
                )));
            }
            out.sync_all().await.map_err(ControlError::internal)?;
            tokio::fs::rename(&tmp, dir.join(file)).await.map_err(ControlError::internal)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// The files a model has, with their sizes, by name.
    pub async fn list(&self, account: &str, model: &str) -> Result<Vec<(String, u64)>> {
        let dir = self.model_dir(account, model);
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(ControlError::internal(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(ControlError::internal)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let meta = entry.metadata().await.map_err(ControlError::internal)?;
            if meta.is_file() {
                out.push((name, meta.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn open(&self, account: &str, model: &str, file: &str) -> Result<(tokio::fs::File, u64)> {
        validate_file_name(file)?;
        let path = self.file_path(account, model, file);
        let f = tokio::fs::File::open(&path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ControlError::NotFound(format!("file {file} of accounts/{account}/models/{model} not found"))
            }
            _ => ControlError::internal(e),
        })?;
        let len = f.metadata().await.map_err(ControlError::internal)?.len();
        Ok((f, len))
    }

    /// Removes every file of a model. Missing is fine: deletion is idempotent.
    pub async fn remove_model(&self, account: &str, model: &str) -> Result<()> {
        match tokio::fs::remove_dir_all(self.model_dir(account, model)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ControlError::internal(e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = std::result::Result<Bytes, std::io::Error>> + Unpin {
        futures_util::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn writes_exact_sizes_and_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::new(dir.path());
        store.write("a", "m", "config.json", 6, chunks(&[b"abc", b"def"])).await.expect("write");
        assert_eq!(store.list("a", "m").await.expect("list"), vec![("config.json".to_string(), 6)]);

        let short = store.write("a", "m", "x.bin", 10, chunks(&[b"abc"])).await.expect_err("short");
        assert!(short.to_string().contains("3 bytes"), "{short}");
        let long = store.write("a", "m", "y.bin", 2, chunks(&[b"abc"])).await.expect_err("long");
        assert!(long.to_string().contains("larger"), "{long}");
        // Neither the failed files nor their temporaries remain.
        let names: Vec<String> = std::fs::read_dir(store.model_dir("a", "m"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["config.json".to_string()]);
    }

    #[test]
    fn file_names_cannot_escape() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b", "x\0"] {
            assert!(validate_file_name(bad).is_err(), "{bad:?}");
        }
        for good in ["config.json", "model-00001-of-00002.safetensors", "tokenizer_config.json"] {
            assert!(validate_file_name(good).is_ok(), "{good}");
        }
    }
}
