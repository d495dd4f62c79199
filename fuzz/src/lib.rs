//! What the fuzz targets share: a scratch directory per process, where each input is written as
//! the file a reader opens (hearth's readers take a model's directory, as uploads land there).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The process's scratch directory, in memory-backed `/dev/shm` when there is one.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("hearth-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// A directory holding exactly `files` (name, bytes), emptied of anything else first.
pub fn model_dir(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("model directory");
    for (file, bytes) in files {
        std::fs::write(dir.join(file), bytes).expect("write input");
    }
    dir
}

/// A fixture of the engine's tests, read once.
pub fn fixture(path: &str) -> &'static [u8] {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static CACHE: OnceLock<Mutex<HashMap<String, &'static [u8]>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().expect("fixture cache");
    cache.entry(path.to_string()).or_insert_with(|| {
        let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/hearth-engine/tests/fixtures").join(path);
        Box::leak(std::fs::read(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display())).into_boxed_slice())
    })
}
