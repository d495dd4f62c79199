//! Safetensors header parsing shared by base models and LoRA addons: reads the 8-byte length and
//! the JSON header only, and checks every tensor's offsets against the file's real size.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use super::{element_count, fmt_shape, push_limited, MAX_TENSORS};

/// Largest header accepted; the safetensors library itself refuses headers over 100 MB.
const MAX_HEADER: u64 = 100_000_000;
/// Overlaps, gaps and similar layout problems reported per file before summarising.
const LAYOUT_REPORTED: usize = 5;

/// One tensor as the header declares it. Offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tensor {
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Product of `shape`; entries whose product overflows are not kept.
    pub elements: u64,
}

/// What a safetensors header says, after validation. Tensors whose entries were malformed are
/// named in `malformed` (and already reported), so callers do not also call them missing.
#[derive(Debug, Default)]
pub(crate) struct Header {
    pub tensors: BTreeMap<String, Tensor>,
    pub malformed: BTreeSet<String>,
}

impl Header {
    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().fold(0u64, |acc, t| acc.saturating_add(t.elements))
    }
}

/// Bytes per element of a safetensors dtype; `None` for dtypes this parser does not know.
pub(crate) fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// A tensor entry exactly as serialized; anything else in it is an error, as in the reference
/// implementation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Reads and validates the header of the safetensors file at `path`, reporting problems under
/// `name`. Returns `None` when the header cannot be read at all; otherwise the tensors whose
/// entries made sense, even if other problems were found.
pub(crate) fn read_header(path: &Path, name: &str, problems: &mut Vec<String>) -> Option<Header> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) => {
            problems.push(format!("{name}: cannot open: {e}"));
            return None;
        }
    };
    let size = match file.metadata() {
        Ok(meta) => meta.len(),
        Err(e) => {
            problems.push(format!("{name}: cannot read: {e}"));
            return None;
        }
    };
    let mut len_bytes = [0u8; 8];
    if size < 8 || file.read_exact(&mut len_bytes).is_err() {
        problems.push(format!(
            "{name}: file is {size} bytes, too short for a safetensors header (8-byte length, \
             then JSON)"
        ));
        return None;
    }
    let header_len = u64::from_le_bytes(len_bytes);
    let available = size - 8;
    if header_len > available {
        problems.push(format!("{name}: header length {header_len} exceeds file size {size}"));
        return None;
    }
    if header_len > MAX_HEADER {
        problems.push(format!("{name}: header length {header_len} exceeds the {MAX_HEADER}-byte limit"));
        return None;
    }
    let mut bytes = Vec::new();
    // The length is bounded by MAX_HEADER and by the file, so this read is header-sized.
    if let Err(e) = (&mut file).take(header_len).read_to_end(&mut bytes) {
        problems.push(format!("{name}: cannot read header: {e}"));
        return None;
    }
    if bytes.len() as u64 != header_len {
        problems.push(format!("{name}: file is truncated inside its {header_len}-byte header"));
        return None;
    }
    let value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(e) => {
            problems.push(format!("{name}: header is not valid JSON: {e}"));
            return None;
        }
    };
    drop(bytes);
    let serde_json::Value::Object(entries) = value else {
        problems.push(format!("{name}: header is not a JSON object"));
        return None;
    };
    if entries.len() as u64 > MAX_TENSORS + 1 {
        problems
            .push(format!("{name}: header declares {} tensors, more than the limit of {MAX_TENSORS}", entries.len()));
        return None;
    }

    let data_len = available - header_len;
    let mut header = Header::default();
    // (begin, end, name) of every entry with a usable byte range, for the layout checks.
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    for (key, entry) in entries {
        if key == "__metadata__" {
            check_metadata(name, entry, problems);
            continue;
        }
        let raw: RawEntry = match serde_json::from_value(entry) {
            Ok(raw) => raw,
            Err(e) => {
                problems.push(format!("{name}: tensor {key}: malformed entry: {e}"));
                header.malformed.insert(key);
                continue;
            }
        };
        let Some(elements) = element_count(&raw.shape) else {
            problems.push(format!(
                "{name}: tensor {key}: shape {} has more elements than fit in 64 bits",
                fmt_shape(&raw.shape)
            ));
            header.malformed.insert(key);
            continue;
        };
        let (begin, end) = raw.data_offsets;
        match dtype_size(&raw.dtype) {
            None => problems.push(format!("{name}: tensor {key}: unknown dtype {}", raw.dtype)),
            Some(_) if begin > end => {
                problems.push(format!("{name}: tensor {key}: data_offsets [{begin}, {end}] end before they begin"))
            }
            Some(size) => {
                match elements.checked_mul(size) {
                    Some(needed) if needed == end - begin => {}
                    Some(needed) => problems.push(format!(
                        "{name}: tensor {key}: data_offsets span {} bytes but dtype {} with shape \
                         {} needs {needed}",
                        end - begin,
                        raw.dtype,
                        fmt_shape(&raw.shape)
                    )),
                    None => problems.push(format!(
                        "{name}: tensor {key}: shape {} is too large for dtype {}",
                        fmt_shape(&raw.shape),
                        raw.dtype
                    )),
                }
                ranges.push((begin, end, key.clone()));
            }
        }
        header.tensors.insert(key, Tensor { dtype: raw.dtype, shape: raw.shape, elements });
    }
    check_layout(name, size, header_len, data_len, ranges, problems);
    Some(header)
}

/// `__metadata__` is a flat map of strings; the reference loader rejects anything else.
fn check_metadata(name: &str, entry: serde_json::Value, problems: &mut Vec<String>) {
    match entry {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                if !value.is_string() {
                    problems.push(format!("{name}: __metadata__ value for {key} is not a string"));
                }
            }
        }
        _ => problems.push(format!("{name}: __metadata__ is not an object of strings")),
    }
}

/// Tensors must tile the data section exactly: no overlaps, no holes (the reference loader
/// refuses both), and the file ends where the last tensor ends.
fn check_layout(
    name: &str,
    size: u64,
    header_len: u64,
    data_len: u64,
    mut ranges: Vec<(u64, u64, String)>,
    problems: &mut Vec<String>,
) {
    ranges.sort();
    let mut overlaps = Vec::new();
    let mut gaps = Vec::new();
    let mut prev: Option<(u64, &str)> = None;
    let mut max_end = 0u64;
    for (begin, end, tensor) in &ranges {
        match prev {
            Some((prev_end, prev_name)) if *begin < prev_end => overlaps.push(format!(
                "{name}: tensors {prev_name} and {tensor} overlap (bytes {begin} to {prev_end} of \
                 the data section)"
            )),
            Some((prev_end, prev_name)) if *begin > prev_end => {
                gaps.push(format!("{name}: {} unused bytes between tensors {prev_name} and {tensor}", begin - prev_end))
            }
            None if *begin > 0 => gaps.push(format!("{name}: {begin} unused bytes before the first tensor {tensor}")),
            _ => {}
        }
        if prev.is_none_or(|(prev_end, _)| *end >= prev_end) {
            prev = Some((*end, tensor));
        }
        max_end = max_end.max(*end);
    }
    push_limited(problems, overlaps, LAYOUT_REPORTED, "overlapping tensors");
    push_limited(problems, gaps, LAYOUT_REPORTED, "gaps between tensors");
    // When the file is truncated, max_end comes from the header unchecked, so the total it
    // implies may not fit in 64 bits.
    let expected = 8u64.checked_add(header_len).and_then(|n| n.checked_add(max_end));
    if max_end > data_len {
        let needed = expected.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
        problems.push(format!("{name}: file is truncated: the tensors need {needed} bytes but the file has {size}"));
    } else if max_end < data_len {
        problems.push(format!(
            "{name}: {} trailing bytes after the last tensor (file size {size}, header and \
             tensors account for {})",
            data_len - max_end,
            size - (data_len - max_end)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn problems_for(bytes: &[u8]) -> (Option<Header>, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "model.safetensors", bytes);
        let mut problems = Vec::new();
        let header = read_header(&dir.path().join("model.safetensors"), "model.safetensors", &mut problems);
        (header, problems)
    }

    #[test]
    fn valid_file_parses() {
        let bytes = safetensors_bytes(&[
            ("a".into(), "F32", vec![2, 3]),
            ("b".into(), "BF16", vec![4]),
            ("empty".into(), "F16", vec![0, 5]),
        ]);
        let (header, problems) = problems_for(&bytes);
        assert_eq!(problems, Vec::<String>::new());
        let header = header.expect("header");
        assert_eq!(header.parameter_count(), 10);
        assert_eq!(header.tensors.get("a"), Some(&Tensor { dtype: "F32".into(), shape: vec![2, 3], elements: 6 }));
    }

    #[test]
    fn huge_header_length() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.resize(1024, 0);
        let (header, problems) = problems_for(&bytes);
        assert!(header.is_none());
        assert_eq!(problems, vec!["model.safetensors: header length 18446744073709551615 exceeds file size 1024"]);
    }

    #[test]
    fn too_short_and_not_json() {
        let (_, problems) = problems_for(b"abc");
        assert_eq!(
            problems,
            vec![
                "model.safetensors: file is 3 bytes, too short for a safetensors header (8-byte \
                  length, then JSON)"
            ]
        );
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"nope");
        let (_, problems) = problems_for(&bytes);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("model.safetensors: header is not valid JSON"));
    }

    #[test]
    fn truncated_file() {
        let mut bytes = safetensors_bytes(&[("a".into(), "F32", vec![4, 4])]);
        let full = bytes.len();
        bytes.truncate(full - 10);
        let (header, problems) = problems_for(&bytes);
        assert!(header.is_some());
        assert_eq!(
            problems,
            vec![format!(
                "model.safetensors: file is truncated: the tensors need {full} bytes but the file \
                 has {}",
                full - 10
            )]
        );
    }

    #[test]
    fn bad_entries() {
        let header = serde_json::json!({
            "__metadata__": {"format": "pt", "n": 3},
            "wrong_size": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
            "unknown": {"dtype": "Q4", "shape": [2], "data_offsets": [4, 8]},
            "reversed": {"dtype": "U8", "shape": [0], "data_offsets": [8, 4]},
            "missing": {"dtype": "U8", "shape": [1]},
            "overflow": {"dtype": "U8", "shape": [4294967296u64, 4294967296u64], "data_offsets": [8, 9]},
            "overlap": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
        });
        let bytes = raw_safetensors(&header, 8);
        let (header, problems) = problems_for(&bytes);
        let header = header.expect("partial header");
        assert!(header.malformed.contains("missing"));
        assert!(header.malformed.contains("overflow"));
        let expected = [
            "model.safetensors: __metadata__ value for n is not a string",
            "model.safetensors: tensor wrong_size: data_offsets span 4 bytes but dtype F32 with \
             shape [2] needs 8",
            "model.safetensors: tensor unknown: unknown dtype Q4",
            "model.safetensors: tensor reversed: data_offsets [8, 4] end before they begin",
            "model.safetensors: tensors wrong_size and overlap overlap (bytes 2 to 4 of the data \
             section)",
        ];
        for e in expected {
            assert!(problems.iter().any(|p| p == e), "missing {e:?} in {problems:?}");
        }
        assert!(problems.iter().any(|p| p.starts_with("model.safetensors: tensor missing: malformed entry")));
        assert!(problems.iter().any(|p| p
            == "model.safetensors: tensor overflow: shape [4294967296, 4294967296] has more \
                elements than fit in 64 bits"));
        assert!(problems.iter().any(|p| p.contains("trailing bytes")), "{problems:?}");
    }

    #[test]
    fn gaps_and_trailing_bytes() {
        let header = serde_json::json!({
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
        });
        let bytes = raw_safetensors(&header, 12);
        let (_, problems) = problems_for(&bytes);
        assert_eq!(
            problems,
            vec![
                "model.safetensors: 4 unused bytes before the first tensor a".to_string(),
                format!(
                    "model.safetensors: 4 trailing bytes after the last tensor (file size {}, \
                     header and tensors account for {})",
                    bytes.len(),
                    bytes.len() - 4
                ),
            ]
        );
    }

    #[test]
    fn header_is_not_an_object() {
        let bytes = raw_safetensors(&serde_json::json!([1, 2]), 0);
        let (header, problems) = problems_for(&bytes);
        assert!(header.is_none());
        assert_eq!(problems, vec!["model.safetensors: header is not a JSON object"]);
    }
}
