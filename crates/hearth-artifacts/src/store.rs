//! The artifact store: model files on the local filesystem, under
//! `{root}/{account}/models/{model}/{file}`.
//!
//! Writes stream to a temporary file beside the target and are renamed into place only when
//! the expected number of bytes arrived, so a reader never sees half a file and a failed
//! upload leaves nothing behind.
//!
//! A file may also arrive in parts (resumable uploads): each part is appended to a partial
//! file with a stable name, `.{file}.partial`, whose length is the offset the next part must
//! start at. It survives a dropped connection and a restarted server, so a client resumes by
//! asking for that offset. The last part completes it: it is synced and renamed into place.
//!
//! Validation seals a model's directory (a hidden `.sealed` marker) before it looks at the
//! files, and a READY model's directory stays sealed. Every rename into place checks the seal
//! under the lock that sealing takes, so an upload that was already streaming when its model
//! was validated is refused at the end instead of replacing a byte of a READY model.
//!
//! With a mirror (`mirror.rs`) the complete files live in object storage and this directory
//! caches them.
//!
//! Names starting with '.' (partial files, the seal) are never part of a model: file names
//! cannot start with '.', listings skip them and model inspection ignores them.

use std::collections::HashSet;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use crate::error::{ArtifactError, Result};
use crate::mirror::Mirror;

/// The largest single file hearth accepts: far above any checkpoint shard in practice, and
/// low enough that a typo in a size is caught.
pub const MAX_FILE_SIZE: u64 = 1 << 40;

/// Writes go through a buffer of this size, so the file sees few large writes rather than one
/// per network chunk; it is also the read size when a completed file's digest is checked.
const IO_BUFFER: usize = 1 << 20;

/// A SHA-256 digest, as a client sends it to have an upload verified.
pub type Sha256Digest = [u8; 32];

/// Where a file upload stands after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadProgress {
    /// The file is complete and in place.
    Complete,
    /// The file is incomplete: this many bytes from its start are stored, and the next part
    /// must start there.
    Incomplete { offset: u64 },
}

/// What one request on an upload URL carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadPart {
    /// The whole file, in one body.
    Whole,
    /// Bytes `start..=end` of a file of `total` bytes.
    Range { start: u64, end: u64, total: u64 },
    /// No bytes: where does the upload of a file of `total` bytes stand?
    Status { total: u64 },
}

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
        Err(ArtifactError::InvalidArgument(format!(
            "invalid file name {name:?}: use 1 to {MAX_FILE_NAME} letters, digits, '.', '_' and '-', \
             not starting with '.' and without directories"
        )))
    }
}

/// The marker of a sealed model directory: its files can no longer change.
const SEAL: &str = ".sealed";

/// Whether a hidden file is a partial upload, and of which kind: the resumable one of a file
/// (`.{file}.partial`, kept across restarts so the client can resume) or the scratch file of
/// a one-request upload (`.{file}.{16 hex}.partial`, garbage once its request is gone).
fn partial_kind(name: &str) -> Option<PartialKind> {
    let stem = name.strip_prefix('.')?.strip_suffix(".partial")?;
    let scratch =
        stem.rsplit_once('.').is_some_and(|(_, tail)| tail.len() == 16 && tail.bytes().all(|b| b.is_ascii_hexdigit()));
    Some(if scratch { PartialKind::Scratch } else { PartialKind::Resumable })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartialKind {
    Resumable,
    Scratch,
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    /// Partial files a request is writing now. Two writers of one partial file would
    /// interleave their bytes, so a second one is refused while the first runs.
    writing: Arc<Mutex<HashSet<PathBuf>>>,
    /// Model directories a validation holds a `Seal` on now. The lock is also the one every
    /// rename into place takes to check the seal, which makes check and rename one step.
    sealing: Arc<Mutex<HashSet<PathBuf>>>,
    /// Where complete files live when gateways share no disk (`mirror.rs`); this directory
    /// then caches them.
    mirror: Option<Arc<Mirror>>,
}

/// A validation's hold on a model directory: while it lives, and after `keep`, no file of the
/// model can be written. Dropped without `keep` (validation failed), the directory opens again.
pub struct Seal {
    sealing: Arc<Mutex<HashSet<PathBuf>>>,
    dir: PathBuf,
    kept: bool,
}

impl Seal {
    /// The model is READY: its directory stays sealed for good.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Seal {
    fn drop(&mut self) {
        let Ok(mut sealing) = self.sealing.lock() else { return };
        sealing.remove(&self.dir);
        if !self.kept {
            if let Err(e) = std::fs::remove_file(self.dir.join(SEAL)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "could not unseal a model directory");
                }
            }
        }
    }
}

/// Holds a partial file for one writer; dropping it (the request ended, or was cancelled
/// because its client went away) lets the next one in.
struct WriteClaim {
    writing: Arc<Mutex<HashSet<PathBuf>>>,
    path: PathBuf,
}

impl Drop for WriteClaim {
    fn drop(&mut self) {
        if let Ok(mut w) = self.writing.lock() {
            w.remove(&self.path);
        }
    }
}

fn digest_mismatch(file: &str, actual: &[u8], expected: &Sha256Digest) -> ArtifactError {
    ArtifactError::InvalidArgument(format!(
        "upload of {file} was discarded: its SHA-256 is {} but the client sent {}; upload it again",
        hex::encode(actual),
        hex::encode(expected)
    ))
}

impl ArtifactStore {
    pub fn new(root: impl Into<PathBuf>) -> ArtifactStore {
        ArtifactStore { root: root.into(), writing: Arc::default(), sealing: Arc::default(), mirror: None }
    }

    /// Keeps complete files in object storage too, this directory caching them.
    pub fn with_mirror(mut self, mirror: Mirror) -> ArtifactStore {
        self.mirror = Some(Arc::new(mirror));
        self
    }

    /// Puts a file just committed here into the mirror before its upload is answered, so the
    /// next request may reach any gateway; unless the model was validated meanwhile (on
    /// another gateway), which refuses it as a local seal does. Without a mirror, nothing.
    async fn publish(&self, account: &str, model: &str, file: &str) -> Result<()> {
        let Some(m) = &self.mirror else { return Ok(()) };
        let path = self.file_path(account, model, file);
        let result = async {
            if m.sealed(account, model).await? {
                return Err(ArtifactError::FailedPrecondition(format!(
                    "{file} was not stored: its model was validated while this upload was in progress, and a \
                     validated model's files can no longer change"
                )));
            }
            m.put(account, model, file, &path).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        result
    }

    /// Makes this directory and the mirror hold the same complete files, before a validation
    /// looks at them: files that arrived here other than by upload (an import) are put in the
    /// mirror, files uploaded through other gateways are fetched. Without a mirror, nothing.
    pub async fn sync(&self, account: &str, model: &str) -> Result<()> {
        let Some(m) = &self.mirror else { return Ok(()) };
        let remote: std::collections::BTreeMap<String, u64> = m.list(account, model).await?.into_iter().collect();
        let local: std::collections::BTreeMap<String, u64> =
            self.list_local(account, model).await?.into_iter().collect();
        for (file, size) in &local {
            if remote.get(file) != Some(size) {
                m.put(account, model, file, &self.file_path(account, model, file)).await?;
            }
        }
        for (file, size) in &remote {
            if local.get(file) != Some(size) {
                m.get(account, model, file, *size, &self.file_path(account, model, file)).await?;
            }
        }
        Ok(())
    }

    /// Records a validated model's seal in the mirror, for the other gateways.
    pub async fn publish_seal(&self, account: &str, model: &str) -> Result<()> {
        match &self.mirror {
            Some(m) => m.seal(account, model).await,
            None => Ok(()),
        }
    }

    /// The model's directory with every file in it: a validated model that this gateway
    /// has not got whole yet is fetched from the mirror (once: it is sealed here then).
    pub async fn local_dir(&self, account: &str, model: &str) -> Result<PathBuf> {
        let dir = self.model_dir(account, model);
        let Some(m) = &self.mirror else { return Ok(dir) };
        if dir.join(SEAL).exists() {
            return Ok(dir);
        }
        if !m.sealed(account, model).await? {
            // Not validated yet: what is here is what this gateway has.
            return Ok(dir);
        }
        tokio::fs::create_dir_all(&dir).await.map_err(ArtifactError::internal)?;
        let local: std::collections::BTreeMap<String, u64> =
            self.list_local(account, model).await?.into_iter().collect();
        let mut fetched = 0u64;
        for (file, size) in m.list(account, model).await? {
            if local.get(&file) != Some(&size) {
                m.get(account, model, &file, size, &self.file_path(account, model, &file)).await?;
                fetched += size;
            }
        }
        tokio::fs::write(dir.join(SEAL), b"").await.map_err(ArtifactError::internal)?;
        tracing::info!(account, model, mb = fetched >> 20, "model files fetched from the artifact store");
        Ok(dir)
    }

    /// Seals a model's directory before its files are validated: from the moment this returns,
    /// an upload to the model can no longer rename a file into place (it is refused with
    /// FAILED_PRECONDITION). A second validation of the same model while one runs is ABORTED.
    pub fn seal(&self, account: &str, model: &str) -> Result<Seal> {
        let dir = self.model_dir(account, model);
        std::fs::create_dir_all(&dir).map_err(ArtifactError::internal)?;
        let mut sealing = self.sealing.lock().map_err(|_| ArtifactError::internal("seal registry poisoned"))?;
        if !sealing.insert(dir.clone()) {
            return Err(ArtifactError::Aborted(format!(
                "model {model} is being validated by another request; retry once it has ended"
            )));
        }
        let seal = Seal { sealing: self.sealing.clone(), dir: dir.clone(), kept: false };
        // Written under the lock: a rename into place either finished before it or sees it.
        std::fs::write(dir.join(SEAL), b"").map_err(ArtifactError::internal)?;
        Ok(seal)
    }

    /// Renames a finished file into its model's directory, unless the directory is sealed.
    /// The check and the rename happen under the lock `seal` takes (both are quick metadata
    /// operations), so no file lands in a directory once its seal is written.
    fn commit(&self, from: &Path, dir: &Path, file: &str) -> Result<()> {
        let _sealing = self.sealing.lock().map_err(|_| ArtifactError::internal("seal registry poisoned"))?;
        if dir.join(SEAL).exists() {
            return Err(ArtifactError::FailedPrecondition(format!(
                "{file} was not stored: its model was validated while this upload was in progress, and a \
                 validated model's files can no longer change"
            )));
        }
        std::fs::rename(from, dir.join(file)).map_err(ArtifactError::internal)
    }

    /// Tidies a model's directory at start. The scratch files of one-request uploads are
    /// garbage once their request is gone (a gateway was killed mid-upload); so is every
    /// partial file of a READY model, which can no longer complete. The resumable partial
    /// files of a model still uploading are kept: a client resumes from them. The seal of a
    /// model that is not READY was left by a validation cut short, and is lifted; a READY
    /// model's directory is sealed if it is not. Returns how many files were removed.
    pub async fn sweep(&self, account: &str, model: &str, ready: bool) -> Result<usize> {
        let dir = self.model_dir(account, model);
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ArtifactError::internal(e)),
        };
        if ready && !dir.join(SEAL).exists() {
            // READY before seals existed, or its seal was lost: seal it now.
            tokio::fs::write(dir.join(SEAL), b"").await.map_err(ArtifactError::internal)?;
        }
        let mut removed = 0;
        while let Some(entry) = entries.next_entry().await.map_err(ArtifactError::internal)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = match partial_kind(&name) {
                Some(PartialKind::Scratch) => true,
                Some(PartialKind::Resumable) => ready,
                None => name == SEAL && !ready,
            };
            if stale {
                tokio::fs::remove_file(entry.path()).await.map_err(ArtifactError::internal)?;
                removed += 1;
            }
        }
        Ok(removed)
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
    pub async fn write<S, E>(&self, account: &str, model: &str, file: &str, expected: u64, body: S) -> Result<()>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.write_verified(account, model, file, expected, None, body).await
    }

    /// `write`, and when `sha256` is given, the file is kept only if its bytes have that
    /// digest (computed as they stream, so memory use stays one chunk).
    pub async fn write_verified<S, E>(
        &self,
        account: &str,
        model: &str,
        file: &str,
        expected: u64,
        sha256: Option<Sha256Digest>,
        mut body: S,
    ) -> Result<()>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        validate_file_name(file)?;
        let dir = self.model_dir(account, model);
        tokio::fs::create_dir_all(&dir).await.map_err(ArtifactError::internal)?;
        let tmp = dir.join(format!(".{file}.{:016x}.partial", rand::random::<u64>()));
        let result = async {
            let out = tokio::fs::File::create(&tmp).await.map_err(ArtifactError::internal)?;
            let mut out = BufWriter::with_capacity(IO_BUFFER, out);
            let mut hasher = sha256.map(|_| Sha256::new());
            let mut written: u64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .map_err(|e| ArtifactError::InvalidArgument(format!("upload of {file} was interrupted: {e}")))?;
                written += chunk.len() as u64;
                if written > expected {
                    return Err(ArtifactError::InvalidArgument(format!(
                        "upload of {file} is larger than the {expected} bytes its URL was signed for"
                    )));
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&chunk);
                }
                out.write_all(&chunk).await.map_err(ArtifactError::internal)?;
            }
            if written != expected {
                return Err(ArtifactError::InvalidArgument(format!(
                    "upload of {file} has {written} bytes but its URL was signed for {expected}"
                )));
            }
            if let (Some(h), Some(want)) = (hasher, sha256.as_ref()) {
                let got = h.finalize();
                if got.as_slice() != want {
                    return Err(digest_mismatch(file, &got, want));
                }
            }
            out.flush().await.map_err(ArtifactError::internal)?;
            out.get_ref().sync_all().await.map_err(ArtifactError::internal)?;
            drop(out);
            self.commit(&tmp, &dir, file)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result?;
        self.publish(account, model, file).await
    }

    /// The partial file of a resumable upload: hidden (file names cannot start with '.'), so
    /// listings and validation never see it.
    fn partial_path(&self, account: &str, model: &str, file: &str) -> PathBuf {
        self.model_dir(account, model).join(format!(".{file}.partial"))
    }

    fn claim(&self, path: &Path, file: &str) -> Result<WriteClaim> {
        let mut w = self.writing.lock().map_err(|_| ArtifactError::internal("artifact write registry poisoned"))?;
        if !w.insert(path.to_path_buf()) {
            return Err(ArtifactError::Aborted(format!(
                "another request is uploading {file} right now; retry once it has ended"
            )));
        }
        Ok(WriteClaim { writing: self.writing.clone(), path: path.to_path_buf() })
    }

    /// Bytes stored so far for a resumable upload; None when it has not started.
    async fn partial_len(path: &Path) -> Result<Option<u64>> {
        match tokio::fs::metadata(path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ArtifactError::internal(e)),
        }
    }

    /// Writes bytes `start..=end` of a file of `total` bytes into its partial file, streamed
    /// from `body`. A part must start where the stored bytes end (the offset), or at 0, which
    /// starts the upload over; one that starts elsewhere writes nothing and is answered with
    /// the offset, so a client that resent a part it thought lost simply carries on from there.
    ///
    /// Bytes of a part that arrive before its connection breaks are kept: the offset then
    /// says where to resume. A body longer than its range is refused whole.
    ///
    /// The part that reaches `total` completes the file: when `sha256` is given the partial
    /// file is read back and checked against it (a mismatch discards it), then it is synced
    /// and renamed into place.
    #[allow(clippy::too_many_arguments)]
    pub async fn write_part<S, E>(
        &self,
        account: &str,
        model: &str,
        file: &str,
        start: u64,
        end: u64,
        total: u64,
        sha256: Option<Sha256Digest>,
        mut body: S,
    ) -> Result<UploadProgress>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        validate_file_name(file)?;
        if start > end || end >= total {
            return Err(ArtifactError::InvalidArgument(format!(
                "invalid part {start}-{end} of {file}: a part is START-END with START <= END < {total} (the file size)"
            )));
        }
        let dir = self.model_dir(account, model);
        tokio::fs::create_dir_all(&dir).await.map_err(ArtifactError::internal)?;
        let partial = self.partial_path(account, model, file);
        let _claim = self.claim(&partial, file)?;
        let stored = Self::partial_len(&partial).await?.unwrap_or(0);
        if start != 0 && start != stored {
            // A partial file as long as the file or longer has nothing left to resume (its
            // completion was cut short, or it was signed for another size): start over.
            let offset = if stored < total { stored } else { 0 };
            return Ok(UploadProgress::Incomplete { offset });
        }
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(start == 0)
            .open(&partial)
            .await
            .map_err(ArtifactError::internal)?;
        out.seek(SeekFrom::Start(start)).await.map_err(ArtifactError::internal)?;
        let mut out = BufWriter::with_capacity(IO_BUFFER, out);
        let expected = end - start + 1;
        let mut written: u64 = 0;
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(format!("upload of {file} was interrupted: {e}"));
                    break;
                }
            };
            if written + chunk.len() as u64 > expected {
                // Nothing of a part that does not match its range is kept. (set_len waits for
                // the file's write in flight, so nothing lands after the cut.)
                out.into_inner().set_len(start).await.map_err(ArtifactError::internal)?;
                return Err(ArtifactError::InvalidArgument(format!(
                    "part {start}-{end} of {file} has more than the {expected} bytes its Content-Range names"
                )));
            }
            written += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(ArtifactError::internal)?;
        }
        // What arrived is made durable before the offset is reported: a client resumes from
        // the offset it is told, so those bytes must survive a crash.
        out.flush().await.map_err(ArtifactError::internal)?;
        out.get_ref().sync_data().await.map_err(ArtifactError::internal)?;
        let offset = start + written;
        if let Some(why) = failure {
            return Err(ArtifactError::InvalidArgument(format!("{why}; {offset} bytes are stored, resume from there")));
        }
        if written < expected {
            return Err(ArtifactError::InvalidArgument(format!(
                "part {start}-{end} of {file} ended after {written} of its {expected} bytes; \
                 {offset} bytes are stored, resume from there"
            )));
        }
        if offset < total {
            return Ok(UploadProgress::Incomplete { offset });
        }
        drop(out);
        self.complete(&partial, &dir.join(file), file, sha256).await?;
        self.publish(account, model, file).await?;
        Ok(UploadProgress::Complete)
    }

    /// Where the resumable upload of a file of `total` bytes stands. A partial file that
    /// already holds every byte (its completion was cut short) is completed now, as is an
    /// empty file, which no part can carry. A complete file counts as complete only if it has
    /// the digest `sha256`, when one is given; otherwise its upload is at 0 (a new upload
    /// replaces it when it completes).
    pub async fn part_status(
        &self,
        account: &str,
        model: &str,
        file: &str,
        total: u64,
        sha256: Option<Sha256Digest>,
    ) -> Result<UploadProgress> {
        validate_file_name(file)?;
        let dir = self.model_dir(account, model);
        let partial = self.partial_path(account, model, file);
        match Self::partial_len(&partial).await? {
            Some(stored) if stored < total => return Ok(UploadProgress::Incomplete { offset: stored }),
            Some(stored) if stored == total => {
                let _claim = self.claim(&partial, file)?;
                self.complete(&partial, &dir.join(file), file, sha256).await?;
                self.publish(account, model, file).await?;
                return Ok(UploadProgress::Complete);
            }
            Some(_) => {
                // Longer than the file (left by a URL signed for another size): it cannot be
                // resumed, only started over.
                let _claim = self.claim(&partial, file)?;
                let _ = tokio::fs::remove_file(&partial).await;
                return Ok(UploadProgress::Incomplete { offset: 0 });
            }
            None => {}
        }
        let target = dir.join(file);
        match tokio::fs::metadata(&target).await {
            Ok(m) if m.is_file() && m.len() == total => {
                let Some(want) = sha256 else { return Ok(UploadProgress::Complete) };
                // With a digest the question is "is this file already there?": a client
                // resuming a whole model skips the files that are.
                let got = tokio::task::spawn_blocking(move || sha256_of(&target))
                    .await
                    .map_err(ArtifactError::internal)?
                    .map_err(ArtifactError::internal)?;
                return Ok(if got == want {
                    UploadProgress::Complete
                } else {
                    UploadProgress::Incomplete { offset: 0 }
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ArtifactError::internal(e)),
        }
        if total == 0 {
            let empty = futures_util::stream::empty::<std::result::Result<Bytes, std::io::Error>>();
            self.write_verified(account, model, file, 0, sha256, empty).await?;
            return Ok(UploadProgress::Complete);
        }
        Ok(UploadProgress::Incomplete { offset: 0 })
    }

    /// Checks a finished partial file's digest, syncs it and renames it into place. On a
    /// mismatch it is removed: resuming it could only reproduce the same bytes.
    async fn complete(&self, partial: &Path, target: &Path, file: &str, sha256: Option<Sha256Digest>) -> Result<()> {
        if let Some(want) = sha256 {
            let path = partial.to_path_buf();
            let got = tokio::task::spawn_blocking(move || sha256_of(&path))
                .await
                .map_err(ArtifactError::internal)?
                .map_err(ArtifactError::internal)?;
            if got != want {
                let _ = tokio::fs::remove_file(partial).await;
                return Err(digest_mismatch(file, &got, &want));
            }
        }
        let f = tokio::fs::OpenOptions::new().write(true).open(partial).await.map_err(ArtifactError::internal)?;
        f.sync_all().await.map_err(ArtifactError::internal)?;
        drop(f);
        let dir = target.parent().ok_or_else(|| ArtifactError::internal("a model file has no directory"))?;
        let result = self.commit(partial, dir, file);
        if matches!(result, Err(ArtifactError::FailedPrecondition(_))) {
            // A sealed model's partial file can never complete.
            let _ = tokio::fs::remove_file(partial).await;
        }
        result
    }

    /// The files a model has, with their sizes, by name: the mirror's when there is one.
    pub async fn list(&self, account: &str, model: &str) -> Result<Vec<(String, u64)>> {
        match &self.mirror {
            Some(m) => m.list(account, model).await,
            None => self.list_local(account, model).await,
        }
    }

    /// The complete files in this directory.
    async fn list_local(&self, account: &str, model: &str) -> Result<Vec<(String, u64)>> {
        let dir = self.model_dir(account, model);
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(ArtifactError::internal(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(ArtifactError::internal)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let meta = entry.metadata().await.map_err(ArtifactError::internal)?;
            if meta.is_file() {
                out.push((name, meta.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every file of a sealed model with its size and SHA-256 (hex). A digest is computed once
    /// and kept beside the file as `.{file}.sha256`: a sealed model's files never change, so it
    /// stays true, and a replica fetching the model does not make the gateway read it again.
    pub async fn digests(&self, account: &str, model: &str) -> Result<Vec<(String, u64, String)>> {
        let dir = self.local_dir(account, model).await?;
        if !dir.join(SEAL).exists() {
            return Err(ArtifactError::FailedPrecondition(format!(
                "the files of {account}/{model} are not sealed yet; they have digests once the model is READY"
            )));
        }
        let mut out = Vec::new();
        // Sealed here, the directory holds every file (`local_dir` saw to it): no need to ask
        // the mirror again.
        for (file, size) in self.list_local(account, model).await? {
            let kept = dir.join(format!(".{file}.sha256"));
            let known = tokio::fs::read_to_string(&kept).await.ok().and_then(|t| {
                let (hex, len) = t.trim().split_once(' ')?;
                (len.parse::<u64>().ok()? == size && hex.len() == 64).then(|| hex.to_string())
            });
            let hex = match known {
                Some(h) => h,
                None => {
                    let path = dir.join(&file);
                    let digest = tokio::task::spawn_blocking(move || sha256_of(&path))
                        .await
                        .map_err(ArtifactError::internal)?
                        .map_err(ArtifactError::internal)?;
                    let h = hex::encode(digest);
                    // Through a temporary name: a half-written digest must never be read.
                    let tmp = dir.join(format!(".{file}.sha256.{:016x}.tmp", rand::random::<u64>()));
                    tokio::fs::write(&tmp, format!("{h} {size}\n")).await.map_err(ArtifactError::internal)?;
                    tokio::fs::rename(&tmp, &kept).await.map_err(ArtifactError::internal)?;
                    h
                }
            };
            out.push((file, size, hex));
        }
        Ok(out)
    }

    pub async fn open(&self, account: &str, model: &str, file: &str) -> Result<(tokio::fs::File, u64)> {
        validate_file_name(file)?;
        self.local_dir(account, model).await?;
        let path = self.file_path(account, model, file);
        let f = tokio::fs::File::open(&path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ArtifactError::NotFound(format!("file {file} of accounts/{account}/models/{model} not found"))
            }
            _ => ArtifactError::internal(e),
        })?;
        let len = f.metadata().await.map_err(ArtifactError::internal)?.len();
        Ok((f, len))
    }

    /// Removes every file of a model. Missing is fine: deletion is idempotent.
    pub async fn remove_model(&self, account: &str, model: &str) -> Result<()> {
        if let Some(m) = &self.mirror {
            m.remove(account, model).await?;
        }
        match tokio::fs::remove_dir_all(self.model_dir(account, model)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ArtifactError::internal(e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The SHA-256 of a file, read in buffer-sized pieces.
fn sha256_of(path: &Path) -> std::io::Result<Sha256Digest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; IO_BUFFER];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
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

    fn sha(data: &[u8]) -> Sha256Digest {
        Sha256::digest(data).into()
    }

    fn hidden_names(store: &ArtifactStore) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(store.model_dir("a", "m"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn parts_resume_from_the_stored_offset_and_complete_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::new(dir.path());
        let data = b"0123456789";
        let status = store.part_status("a", "m", "w.bin", 10, None).await.expect("status");
        assert_eq!(status, UploadProgress::Incomplete { offset: 0 });

        let p = store.write_part("a", "m", "w.bin", 0, 3, 10, None, chunks(&[b"01", b"23"])).await.expect("part");
        assert_eq!(p, UploadProgress::Incomplete { offset: 4 });
        // A part resent (its answer was lost) writes nothing and says where to go on.
        let p = store.write_part("a", "m", "w.bin", 2, 5, 10, None, chunks(&[b"2345"])).await.expect("resent");
        assert_eq!(p, UploadProgress::Incomplete { offset: 4 });
        // A part cut short keeps what arrived.
        let broken = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"45")),
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset")),
        ]);
        let e = store.write_part("a", "m", "w.bin", 4, 7, 10, None, broken).await.expect_err("interrupted");
        assert!(e.to_string().contains("6 bytes are stored"), "{e}");
        assert_eq!(
            store.part_status("a", "m", "w.bin", 10, None).await.unwrap(),
            UploadProgress::Incomplete { offset: 6 }
        );
        // A body longer than its range is refused and leaves the offset where it was.
        let e = store.write_part("a", "m", "w.bin", 6, 7, 10, None, chunks(&[b"678"])).await.expect_err("long");
        assert!(e.to_string().contains("more than the 2 bytes"), "{e}");
        assert_eq!(
            store.part_status("a", "m", "w.bin", 10, None).await.unwrap(),
            UploadProgress::Incomplete { offset: 6 }
        );
        assert!(store.list("a", "m").await.unwrap().is_empty(), "an incomplete file is not listed");

        let last = store.write_part("a", "m", "w.bin", 6, 9, 10, Some(sha(data)), chunks(&[b"6789"])).await;
        assert_eq!(last.expect("last part"), UploadProgress::Complete);
        assert_eq!(std::fs::read(store.file_path("a", "m", "w.bin")).unwrap(), data);
        assert!(hidden_names(&store).is_empty(), "{:?}", hidden_names(&store));
        assert_eq!(store.part_status("a", "m", "w.bin", 10, None).await.unwrap(), UploadProgress::Complete);
        // Asked with a digest, a complete file is complete only if it is the same file.
        assert_eq!(store.part_status("a", "m", "w.bin", 10, Some(sha(data))).await.unwrap(), UploadProgress::Complete);
        let other = store.part_status("a", "m", "w.bin", 10, Some(sha(b"9876543210"))).await.unwrap();
        assert_eq!(other, UploadProgress::Incomplete { offset: 0 });

        // A part at 0 starts over, whatever was stored.
        store.write_part("a", "m", "v.bin", 0, 5, 10, None, chunks(&[b"xxxxxx"])).await.expect("part");
        let p = store.write_part("a", "m", "v.bin", 0, 1, 10, None, chunks(&[b"01"])).await.expect("restart");
        assert_eq!(p, UploadProgress::Incomplete { offset: 2 });
    }

    #[tokio::test]
    async fn a_digest_mismatch_discards_the_file_and_names_both_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::new(dir.path());
        let wrong = sha(b"something else");
        let e = store.write_part("a", "m", "p.bin", 0, 2, 3, Some(wrong), chunks(&[b"abc"])).await.expect_err("part");
        let msg = e.to_string();
        assert!(msg.contains(&hex::encode(sha(b"abc"))) && msg.contains(&hex::encode(wrong)), "{msg}");
        assert_eq!(
            store.part_status("a", "m", "p.bin", 3, None).await.unwrap(),
            UploadProgress::Incomplete { offset: 0 }
        );

        let e = store.write_verified("a", "m", "w.bin", 3, Some(wrong), chunks(&[b"abc"])).await.expect_err("whole");
        assert!(e.to_string().contains(&hex::encode(wrong)), "{e}");
        store.write_verified("a", "m", "w.bin", 3, Some(sha(b"abc")), chunks(&[b"a", b"bc"])).await.expect("right");
        assert_eq!(store.list("a", "m").await.unwrap(), vec![("w.bin".to_string(), 3)]);
        assert!(hidden_names(&store).is_empty(), "{:?}", hidden_names(&store));
    }

    #[tokio::test]
    async fn one_writer_per_partial_file_and_empty_files_complete_on_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ArtifactStore::new(dir.path());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::result::Result<Bytes, std::io::Error>>();
        let rx = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }));
        tx.send(Ok(Bytes::from_static(b"ab"))).unwrap();
        let first = {
            let store = store.clone();
            tokio::spawn(async move { store.write_part("a", "m", "c.bin", 0, 3, 4, None, rx).await })
        };
        while !store.writing.lock().unwrap().contains(&store.partial_path("a", "m", "c.bin")) {
            tokio::task::yield_now().await;
        }
        let e = store.write_part("a", "m", "c.bin", 0, 3, 4, None, chunks(&[b"abcd"])).await.expect_err("busy");
        assert!(matches!(e, ArtifactError::Aborted(_)), "{e}");
        tx.send(Ok(Bytes::from_static(b"cd"))).unwrap();
        drop(tx);
        assert_eq!(first.await.unwrap().unwrap(), UploadProgress::Complete);

        assert_eq!(store.part_status("a", "m", "empty.txt", 0, None).await.unwrap(), UploadProgress::Complete);
        assert!(store.list("a", "m").await.unwrap().contains(&("empty.txt".to_string(), 0)));
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
