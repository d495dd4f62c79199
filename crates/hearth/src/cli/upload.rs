//! `hearth model upload`: a model's files through the signed upload URLs, resumably.
//!
//! Each file goes up in parts (`Content-Range: bytes START-END/TOTAL`). The server answers a
//! part with the bytes it holds (308 and `Range`), so a part that failed is retried from what
//! actually arrived, and a later run picks up where an interrupted one stopped. The file's
//! SHA-256 travels with its last part and the server checks it. Files are read in pieces as
//! they are sent, and hashed as they are read: memory use does not depend on their size.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use hearth_api::Code;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::client::{is_code, transport_error, ApiError, Ref};
use super::models::{self, CreateArgs, Fields, Kind};
use super::output::{field, print_one};
use super::wait::WaitArgs;
use super::Ctx;

#[derive(clap::Args)]
pub struct UploadArgs {
    /// A model directory (its files, not subdirectories) or a single file such as a GGUF.
    path: PathBuf,
    /// The model's id; defaults to the directory's or file's name, made a valid id.
    #[arg(long)]
    model_id: Option<String>,
    /// base or addon. Defaults to addon when --base-model is given, else base.
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// The base model of an addon (id or name).
    #[arg(long, value_name = "MODEL")]
    base_model: Option<String>,
    #[command(flatten)]
    fields: Fields,
    /// Bytes per request, e.g. 64MiB, 512KiB or 1000000. A failed part is sent again from
    /// what the server received.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    part_size: u64,
    #[command(flatten)]
    wait: WaitArgs,
}

/// Attempts per part before the upload gives up; the pause doubles each time.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Read size for files: sent as body chunks, and for hashing.
const READ_CHUNK: usize = 256 << 10;

struct LocalFile {
    name: String,
    path: PathBuf,
    size: u64,
}

pub async fn run(ctx: &Ctx, args: UploadArgs) -> anyhow::Result<()> {
    let files = collect_files(&args.path)?;
    let model_id = match &args.model_id {
        Some(id) => id.clone(),
        None => derive_id(&args.path)?,
    };
    let is_adapter = files.iter().any(|f| f.name == "adapter_config.json");
    let kind = args.kind.unwrap_or(if args.base_model.is_some() || is_adapter { Kind::Addon } else { Kind::Base });
    if kind == Kind::Addon && args.base_model.is_none() {
        bail!("{} is a LoRA addon: pass --base-model with the base model it adapts", args.path.display());
    }
    let create = CreateArgs {
        model_id: model_id.clone(),
        kind: Some(kind),
        base_model: args.base_model.clone(),
        fields: Fields {
            display_name: args.fields.display_name.clone(),
            description: args.fields.description.clone(),
            context_length: args.fields.context_length,
        },
    };
    let model_ref = Ref { account: None, id: model_id.clone() };
    let model_path = model_ref.path(&ctx.api, "models", None).await?;
    let model = match models::create(ctx, &create, None).await {
        Ok(m) => m,
        Err(e) if is_code(&e, Code::AlreadyExists) => {
            // An upload that stopped part-way is continued, not refused.
            let m = ctx.api.get(&model_path, &[]).await?;
            let state = field(&m, "state");
            if state != "UPLOADING" {
                bail!("model {model_id} already exists and is {state}; pick another --model-id or delete it first");
            }
            if field(&m, "kind") != kind.wire() {
                bail!("model {model_id} already exists as {}, not {}", field(&m, "kind"), kind.wire());
            }
            eprintln!("model {} exists and is still UPLOADING: continuing its upload", field(&m, "name"));
            m
        }
        Err(e) => return Err(e),
    };
    let name = field(&model, "name");

    let sizes: Map<String, Value> = files.iter().map(|f| (f.name.clone(), json!(f.size.to_string()))).collect();
    let endpoint = model_ref.path(&ctx.api, "models", Some("getUploadEndpoint")).await?;
    let urls = ctx.api.post(&endpoint, &[], &json!({ "filenameToSize": sizes })).await?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    let progress = Progress::new(total, files.len());
    for f in &files {
        let url = urls["filenameToSignedUrls"][&f.name]
            .as_str()
            .ok_or_else(|| anyhow!("the server gave no upload URL for {}", f.name))?;
        upload_file(ctx, url, f, args.part_size, &progress).await.with_context(|| format!("uploading {}", f.name))?;
    }
    progress.finish();

    let validate = model_ref.path(&ctx.api, "models", Some("validateUpload")).await?;
    let answer = ctx.api.get(&validate, &[]).await?;
    for w in answer["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    let model = if args.wait.wait {
        models::wait_ready(ctx, &model_path, &name, args.wait.timeout).await?
    } else {
        ctx.api.get(&model_path, &[]).await?
    };
    print_one(ctx.out, &model);
    Ok(())
}

/// The files to upload: a directory's regular files (hidden ones and subdirectories left
/// out, with a note for the latter), or the one file named.
fn collect_files(path: &Path) -> anyhow::Result<Vec<LocalFile>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let file = |p: &Path, size: u64| -> anyhow::Result<LocalFile> {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{} has no file name hearth can use", p.display()))?
            .to_string();
        Ok(LocalFile { name, path: p.to_path_buf(), size })
    };
    if meta.is_file() {
        return Ok(vec![file(path, meta.len())?]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let entry = entry.with_context(|| format!("listing {}", path.display()))?;
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // metadata() follows links: a Hugging Face cache snapshot is made of them.
        let m = std::fs::metadata(&p).with_context(|| format!("reading {}", p.display()))?;
        if m.is_dir() {
            eprintln!("note: skipping the subdirectory {}: a model's files sit in one directory", p.display());
        } else if m.is_file() {
            files.push(file(&p, m.len())?);
        }
    }
    if files.is_empty() {
        bail!("{} has no files to upload", path.display());
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// A model id from a path's name: lower case, runs of other characters made one '-', a
/// GGUF's extension dropped.
fn derive_id(path: &Path) -> anyhow::Result<String> {
    let raw = if path.is_file() { path.file_stem() } else { path.file_name() };
    let raw = raw.and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    let mut id = String::new();
    for c in raw.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            id.push(c);
        } else if !id.is_empty() && !id.ends_with('-') {
            id.push('-');
        }
    }
    let mut id: String = id.trim_end_matches('-').chars().take(63).collect();
    while id.ends_with('-') {
        id.pop();
    }
    if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        bail!("cannot make a model id from {:?}: pass --model-id", path.display().to_string());
    }
    Ok(id)
}

/// Parses `64MiB`, `512KiB`, `1GiB`, `64M`, `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 64MiB or 1000000"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use KiB, MiB or GiB")),
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!("{s:?} is not a usable part size")),
        Some(v) => Ok(v),
    }
}

/// The bars: one for the file being sent, one for all bytes. Hidden when stderr is not a
/// terminal; a line per finished file is printed instead.
struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
    done: Mutex<u64>,
    terminal: bool,
    files: usize,
}

impl Progress {
    fn new(total: u64, files: usize) -> Progress {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let multi = MultiProgress::with_draw_target(if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let bar = multi.add(ProgressBar::new(total));
        bar.set_style(style("{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"));
        bar.set_prefix("total");
        Progress { multi, total: bar, done: Mutex::new(0), terminal, files }
    }

    fn file_bar(&self, name: &str, size: u64) -> ProgressBar {
        let bar = self.multi.insert_before(&self.total, ProgressBar::new(size));
        bar.set_style(style("{prefix:>12} [{bar:30}] {bytes}/{total_bytes}"));
        let short: String = name.chars().take(12).collect();
        bar.set_prefix(short);
        bar
    }

    /// Positions both bars for `offset` bytes of the current file stored.
    fn at(&self, bar: &ProgressBar, offset: u64) {
        bar.set_position(offset);
        self.total.set_position(self.done() + offset);
    }

    fn done(&self) -> u64 {
        self.done.lock().map(|d| *d).unwrap_or(0)
    }

    fn file_done(&self, bar: &ProgressBar, name: &str, size: u64, how: &str) {
        bar.finish_and_clear();
        if let Ok(mut d) = self.done.lock() {
            *d += size;
        }
        self.total.set_position(self.done());
        self.note(&format!("{how} {name} ({size} bytes)"));
    }

    fn note(&self, line: &str) {
        if self.terminal {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        self.total.finish_and_clear();
        if self.files > 1 {
            self.note(&format!("uploaded {} files, {} bytes", self.files, self.done()));
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

/// The SHA-256 of a file's first `upto` bytes, extended as they are read for sending.
struct RunningHash {
    sha: Sha256,
    upto: u64,
}

impl RunningHash {
    /// Takes the bytes at `pos..pos+len` that extend what was hashed; bytes hashed already
    /// (a part sent again) are skipped.
    fn feed(&mut self, pos: u64, bytes: &[u8]) {
        let end = pos + bytes.len() as u64;
        if pos <= self.upto && end > self.upto {
            self.sha.update(&bytes[(self.upto - pos) as usize..]);
            self.upto = end;
        }
    }
}

/// Hashes `path` from `hash.upto` to `to`, reading it (the bytes the upload skips over:
/// those the server had from an earlier run, and the last part, whose digest must be known
/// before it is sent).
async fn catch_up(hash: &Mutex<RunningHash>, path: &Path, to: u64) -> anyhow::Result<()> {
    let from = hash.lock().map_err(|_| anyhow!("hash state poisoned"))?.upto;
    if from >= to {
        return Ok(());
    }
    let mut f = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(from)).await?;
    let mut f = f.take(to - from);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos = from;
    loop {
        let n = f.read(&mut buf).await.with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hash.lock().map_err(|_| anyhow!("hash state poisoned"))?.feed(pos, &buf[..n]);
        pos += n as u64;
    }
    if pos != to {
        bail!("{} became shorter while it was being uploaded", path.display());
    }
    Ok(())
}

/// Where the server says a file's upload stands.
enum Stored {
    Complete,
    Bytes(u64),
}

/// Why one request of an upload failed: worth another try, or not.
enum PartError {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<PartError> for anyhow::Error {
    fn from(e: PartError) -> anyhow::Error {
        match e {
            PartError::Retry(e) | PartError::Fatal(e) => e,
        }
    }
}

/// Reads an upload request's answer: 200 complete, 308 with what is stored, else an error
/// that is retried when the server may do better next time.
async fn answer(ctx: &Ctx, resp: reqwest::Response) -> Result<Stored, PartError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(Stored::Complete);
    }
    if status == StatusCode::PERMANENT_REDIRECT {
        let stored = match resp.headers().get("range").and_then(|v| v.to_str().ok()) {
            None => 0,
            Some(r) => {
                parse_range(r).ok_or_else(|| PartError::Fatal(anyhow!("the server sent an invalid Range {r:?}")))?
            }
        };
        return Ok(Stored::Bytes(stored));
    }
    let bytes = resp.bytes().await.map_err(|e| PartError::Retry(transport_error(&ctx.api.base, &e)))?;
    let e = ApiError::from_body(status, &bytes);
    let transient = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || e.is(Code::Aborted)
        || e.is(Code::Unavailable);
    Err(if transient { PartError::Retry(e.into()) } else { PartError::Fatal(e.into()) })
}

/// `bytes=0-N` → N+1, the bytes stored.
fn parse_range(r: &str) -> Option<u64> {
    let end = r.trim().strip_prefix("bytes=0-")?;
    end.parse::<u64>().ok()?.checked_add(1)
}

/// Asks where the upload of a file stands (with a digest: whether the complete file there is
/// this one).
async fn stored(ctx: &Ctx, url: &str, size: u64, digest: Option<&[u8; 32]>) -> Result<Stored, PartError> {
    let mut req = ctx.api.http.put(url).header("content-range", format!("bytes */{size}")).header("content-length", 0);
    if let Some(d) = digest {
        req = req.header("x-hearth-sha256", hex::encode(d));
    }
    let resp = req.send().await.map_err(|e| PartError::Retry(transport_error(&ctx.api.base, &e)))?;
    answer(ctx, resp).await
}

/// Sends bytes `start..=end`, read from the file as they go (and hashed, when `hash` is
/// given).
#[allow(clippy::too_many_arguments)]
async fn send_part(
    ctx: &Ctx,
    url: &str,
    f: &LocalFile,
    start: u64,
    end: u64,
    digest: Option<&[u8; 32]>,
    hash: Option<Arc<Mutex<RunningHash>>>,
    bars: (ProgressBar, ProgressBar),
) -> Result<Stored, PartError> {
    let len = end - start + 1;
    let local = |e: std::io::Error| PartError::Fatal(anyhow!("reading {}: {e}", f.path.display()));
    let mut file = tokio::fs::File::open(&f.path).await.map_err(local)?;
    file.seek(SeekFrom::Start(start)).await.map_err(local)?;
    let mut pos = start;
    let body = tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_CHUNK).map(move |chunk| {
        if let Ok(bytes) = &chunk {
            if let Some(h) = &hash {
                if let Ok(mut h) = h.lock() {
                    h.feed(pos, bytes);
                }
            }
            pos += bytes.len() as u64;
            bars.0.inc(bytes.len() as u64);
            bars.1.inc(bytes.len() as u64);
        }
        chunk
    });
    let mut req = ctx
        .api
        .http
        .put(url)
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .header("content-range", format!("bytes {start}-{end}/{}", f.size))
        .body(reqwest::Body::wrap_stream(body));
    if let Some(d) = digest {
        req = req.header("x-hearth-sha256", hex::encode(d));
    }
    let resp = req.send().await.map_err(|e| PartError::Retry(transport_error(&ctx.api.base, &e)))?;
    answer(ctx, resp).await
}

/// Uploads one file, resuming from what the server holds and retrying failed parts.
async fn upload_file(ctx: &Ctx, url: &str, f: &LocalFile, part_size: u64, progress: &Progress) -> anyhow::Result<()> {
    let bar = progress.file_bar(&f.name, f.size);
    if f.size == 0 {
        // No part can carry zero bytes: the question "where does it stand" completes it.
        match stored(ctx, url, 0, Some(&Sha256::digest(b"").into())).await? {
            Stored::Complete => {}
            Stored::Bytes(_) => bail!("the server did not accept the empty file"),
        }
        progress.file_done(&bar, &f.name, 0, "uploaded");
        return Ok(());
    }
    let hash = Arc::new(Mutex::new(RunningHash { sha: Sha256::new(), upto: 0 }));
    let mut digest: Option<[u8; 32]> = None;

    let mut offset = match with_retries(progress, &f.name, || stored(ctx, url, f.size, None)).await? {
        Stored::Bytes(n) => n,
        Stored::Complete => {
            // A file of this size is there: if it is this file, there is nothing to send.
            catch_up(&hash, &f.path, f.size).await?;
            let d = finish(&hash)?;
            digest = Some(d);
            match with_retries(progress, &f.name, || stored(ctx, url, f.size, Some(&d))).await? {
                Stored::Complete => {
                    progress.file_done(&bar, &f.name, f.size, "already uploaded:");
                    return Ok(());
                }
                Stored::Bytes(n) => n,
            }
        }
    };
    if offset > 0 {
        progress.note(&format!("{}: the server has {offset} of {} bytes; resuming there", f.name, f.size));
    }
    let mut failures = 0u32;
    loop {
        progress.at(&bar, offset);
        let end = offset.saturating_add(part_size).min(f.size) - 1;
        let last = end + 1 == f.size;
        if digest.is_none() {
            catch_up(&hash, &f.path, offset).await?;
            if last {
                catch_up(&hash, &f.path, f.size).await?;
                digest = Some(finish(&hash)?);
            }
        }
        let feed = if digest.is_none() { Some(hash.clone()) } else { None };
        let sent_digest = if last { digest.as_ref() } else { None };
        let result =
            send_part(ctx, url, f, offset, end, sent_digest, feed, (bar.clone(), progress.total.clone())).await;
        let why = match result {
            Ok(Stored::Complete) => break,
            Ok(Stored::Bytes(n)) if n > offset => {
                offset = n;
                failures = 0;
                continue;
            }
            // The server holds less than this part's start (or just as much): it kept less
            // than it said before, or another client is at work. Go on from its offset.
            Ok(Stored::Bytes(n)) => anyhow!("the server holds {n} bytes, not {}", end + 1),
            Err(PartError::Fatal(e)) => return Err(e),
            Err(PartError::Retry(e)) => e,
        };
        failures += 1;
        if failures >= ATTEMPTS {
            return Err(why.context(format!("giving up after {ATTEMPTS} attempts")));
        }
        let pause = FIRST_BACKOFF * 2u32.pow(failures - 1);
        progress.note(&format!("{}: part at byte {offset} failed ({why:#}); retrying in {pause:?}", f.name));
        tokio::time::sleep(pause).await;
        offset = match with_retries(progress, &f.name, || stored(ctx, url, f.size, None)).await? {
            Stored::Complete => break,
            Stored::Bytes(n) => n,
        };
    }
    progress.file_done(&bar, &f.name, f.size, "uploaded");
    Ok(())
}

fn finish(hash: &Mutex<RunningHash>) -> anyhow::Result<[u8; 32]> {
    let h = hash.lock().map_err(|_| anyhow!("hash state poisoned"))?;
    Ok(h.sha.clone().finalize().into())
}

/// Runs a status question, retrying transient failures with the same back-off as parts.
async fn with_retries<F, Fut>(progress: &Progress, name: &str, mut f: F) -> anyhow::Result<Stored>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Stored, PartError>>,
{
    let mut failures = 0;
    loop {
        match f().await {
            Ok(s) => return Ok(s),
            Err(PartError::Fatal(e)) => return Err(e),
            Err(PartError::Retry(e)) => {
                failures += 1;
                if failures >= ATTEMPTS {
                    return Err(e.context(format!("giving up after {ATTEMPTS} attempts")));
                }
                let pause = FIRST_BACKOFF * 2u32.pow(failures - 1);
                progress.note(&format!("{name}: asking the server failed ({e:#}); retrying in {pause:?}"));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ids() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5TB").is_err());
        assert!(parse_size("MiB").is_err());
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        std::fs::write(&gguf, b"x").unwrap();
        assert_eq!(derive_id(&gguf).unwrap(), "smollm2-135m-instruct-q4-1");
        let d = dir.path().join("My_Adapter");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(derive_id(&d).unwrap(), "my-adapter");
        assert!(derive_id(&dir.path().join("123")).is_err());
    }

    #[test]
    fn a_running_hash_takes_each_byte_once_in_order() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut h = RunningHash { sha: Sha256::new(), upto: 0 };
        h.feed(0, &data[..40]);
        h.feed(20, &data[20..60]); // a part sent again, overlapping
        h.feed(80, &data[80..]); // ahead of what was hashed: ignored
        h.feed(60, &data[60..100]);
        assert_eq!(h.upto, 100);
        assert_eq!(<[u8; 32]>::from(h.sha.finalize()), <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(parse_range("bytes=0-99"), Some(100));
        assert_eq!(parse_range("bytes=5-99"), None);
    }

    #[tokio::test]
    async fn catching_up_reads_only_the_missing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let h = Mutex::new(RunningHash { sha: Sha256::new(), upto: 0 });
        h.lock().unwrap().feed(0, &data[..1234]);
        catch_up(&h, &p, 10_000).await.unwrap();
        assert_eq!(finish(&h).unwrap(), <[u8; 32]>::from(Sha256::digest(&data)));
        assert!(catch_up(&h, &p, 20_000).await.is_err(), "a file that shrank is an error");
    }
}
