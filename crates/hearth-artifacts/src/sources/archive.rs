//! Unpacking a downloaded archive (.tar, .tar.gz) of a model directory into the model's flat
//! artifact directory.
//!
//! An archive is untrusted input: only regular files are taken, each under a name that
//! passes [`validate_file_name`] once a single leading directory (`my-adapter/…`, as `tar
//! czf x.tgz my-adapter` makes) is stripped. Links, devices and deeper paths are skipped and
//! can never write outside the directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use crate::error::{ArtifactError, Result};
use crate::store::{validate_file_name, MAX_FILES};

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Tar,
    TarGz,
    /// Recognised only to be refused by name.
    Zip,
}

/// What the file is, from its first bytes: gzip (assumed to wrap a tar), tar (`ustar` at 257),
/// zip, or none of them.
pub(super) fn sniff(path: &Path) -> std::io::Result<Option<Kind>> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 265];
    let n = read_up_to(&mut f, &mut head)?;
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Some(Kind::TarGz));
    }
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Some(Kind::Zip));
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Ok(Some(Kind::Tar));
    }
    Ok(None)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// The name an archive entry gets in the flat model directory, if it gets one.
fn flat_name(path: &Path, strip: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let parts = match (strip, parts.as_slice()) {
        (Some(top), [first, rest @ ..]) if *first == top => rest,
        (_, all) => all,
    };
    match parts {
        [name] if validate_file_name(name).is_ok() => Some((*name).to_string()),
        _ => None,
    }
}

/// Unpacks `archive` into `dir`, then removes it. Returns the files written with their sizes.
pub(super) fn unpack(archive: &Path, kind: Kind, dir: &Path) -> Result<BTreeMap<String, u64>> {
    let open = || -> Result<tar::Archive<Box<dyn Read>>> {
        let f = File::open(archive).map_err(ArtifactError::internal)?;
        let reader: Box<dyn Read> = match kind {
            Kind::Tar => Box::new(f),
            Kind::TarGz => Box::new(flate2::read::GzDecoder::new(f)),
            Kind::Zip => {
                return Err(ArtifactError::FailedPrecondition(
                    "zip archives are not supported; publish the model as a .tar or .tar.gz archive or as files"
                        .to_string(),
                ))
            }
        };
        Ok(tar::Archive::new(reader))
    };
    let bad = |e: std::io::Error| ArtifactError::FailedPrecondition(format!("the archive is damaged: {e}"));
    // First pass: the top-level directories, to know whether everything sits in one.
    let mut tops = std::collections::BTreeSet::new();
    let mut any_top_file = false;
    for entry in open()?.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let mut comps = path.components().filter(|c| !matches!(c, Component::CurDir));
        match (comps.next(), comps.next()) {
            (Some(Component::Normal(top)), Some(_)) => {
                tops.insert(top.to_string_lossy().into_owned());
            }
            (Some(_), None) if entry.header().entry_type().is_file() => any_top_file = true,
            _ => {}
        }
    }
    let strip = if tops.len() == 1 && !any_top_file { tops.into_iter().next() } else { None };
    let mut files = BTreeMap::new();
    for entry in open()?.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(bad)?.into_owned();
        let Some(name) = flat_name(&path, strip.as_deref()) else {
            tracing::debug!(entry = %path.display(), "archive entry skipped: not a top-level model file");
            continue;
        };
        if files.len() >= MAX_FILES {
            return Err(ArtifactError::FailedPrecondition(format!(
                "the archive holds more than {MAX_FILES} files; a model is a handful of files"
            )));
        }
        let target = dir.join(&name);
        let mut out = File::create(&target).map_err(ArtifactError::internal)?;
        let n = std::io::copy(&mut entry, &mut out).map_err(bad)?;
        out.sync_all().map_err(ArtifactError::internal)?;
        files.insert(name, n);
    }
    std::fs::remove_file(archive).map_err(ArtifactError::internal)?;
    if files.is_empty() {
        return Err(ArtifactError::FailedPrecondition(
            "the archive holds no model files (files at its top level, or inside one directory)".to_string(),
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn unpacks_one_directory_flat_and_skips_what_cannot_be_a_model_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = tar_of(&[
            ("adapter/adapter_config.json", b"{}"),
            ("adapter/adapter_model.safetensors", b"12345"),
            ("adapter/nested/README.md", b"skip"),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &bytes).expect("gzip");
        let path = dir.path().join("download.partial");
        std::fs::write(&path, gz.finish().expect("gzip")).expect("write");
        assert_eq!(sniff(&path).expect("sniff"), Some(Kind::TarGz));
        let files = unpack(&path, Kind::TarGz, dir.path()).expect("unpack");
        assert_eq!(
            files,
            BTreeMap::from([("adapter_config.json".to_string(), 2), ("adapter_model.safetensors".to_string(), 5)])
        );
        assert!(!path.exists(), "the archive itself is removed");
    }

    #[test]
    fn plain_files_are_not_archives_and_empty_archives_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("model.gguf");
        std::fs::write(&plain, b"GGUF\x03\0\0\0").expect("write");
        assert_eq!(sniff(&plain).expect("sniff"), None);
        let tar = dir.path().join("x.tar");
        std::fs::write(&tar, tar_of(&[("a/b/c/deep.json", b"{}")])).expect("write");
        assert_eq!(sniff(&tar).expect("sniff"), Some(Kind::Tar));
        let err = unpack(&tar, Kind::Tar, dir.path()).expect_err("nothing usable");
        assert!(err.to_string().contains("no model files"), "{err}");
    }

    #[test]
    fn names_never_escape() {
        assert_eq!(flat_name(Path::new("../x.json"), None), None);
        assert_eq!(flat_name(Path::new("/etc/passwd"), None), None);
        assert_eq!(flat_name(Path::new("./config.json"), None), Some("config.json".to_string()));
        assert_eq!(flat_name(Path::new("m/config.json"), Some("m")), Some("config.json".to_string()));
        assert_eq!(flat_name(Path::new("m/config.json"), None), None);
    }
}
