//! GGUF base models: walks the header (metadata and tensor infos) with a bounded reader that skips
//! array contents, then checks tensor offsets, sizes and shapes against the file and the
//! hyperparameters the metadata declares.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::config::{Architecture, ModelConfig, RopeScaling};
use super::{
    element_count, fmt_shape, layer_index, push_limited, BaseSummary, ModelDims, ModelFormat, MAX_LAYERS, MAX_STRING,
    MAX_TENSORS,
};

const DEFAULT_ALIGNMENT: u64 = 32;
/// The GGUF specification caps keys at 65535 bytes.
const MAX_KEY_LEN: u64 = 65_535;
/// ggml's GGML_MAX_NAME is 64 bytes including the terminating NUL; llama.cpp refuses longer names.
const MAX_TENSOR_NAME: u64 = 63;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays whose items must be walked one by one (strings, nested arrays) are capped; the largest
/// real vocabularies and merge lists are a few hundred thousand entries.
const MAX_WALKED_ITEMS: u64 = 16 << 20;
const MAX_NESTING: u32 = 4;
/// Metadata strings longer than this are skipped, not kept (only short values are ever read).
const KEEP_STRING: u64 = 1 << 20;
/// Total bytes of keys, names and string values kept from one header; whatever the counts and
/// lengths claim, parsing never holds more than this.
const KEEP_TOTAL: u64 = 64 << 20;
/// Missing, mis-shaped or unexpected tensors reported per kind before summarising.
const NAMES_REPORTED: usize = 10;
const SUPPORTED_ARCHS: [&str; 3] = ["llama", "mistral", "qwen2"];
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, \
                               Q4_K, Q5_K, Q6_K, Q8_K";

// GGUF metadata value types.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// A metadata value as kept after parsing: scalars and short strings in full, arrays by element
/// type and length only.
#[derive(Debug, Clone, PartialEq)]
enum Meta {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// `None` when the string was too long to keep.
    Str(Option<String>),
    Array {
        elem: u32,
        len: u64,
    },
}

#[derive(Debug, Clone)]
struct TensorInfo {
    name: String,
    /// ggml `ne`: innermost dimension first, the reverse of PyTorch's order.
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

#[derive(Debug)]
struct Header {
    meta: BTreeMap<String, Meta>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
    size: u64,
}

/// A ggml tensor type this module can size: `bytes` per block of `block` elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GgmlType {
    pub name: &'static str,
    pub block: u64,
    pub bytes: u64,
}

/// The supported ggml types, or `Err(Some(name))` for a known type that is not supported and
/// `Err(None)` for an id ggml does not define.
pub(crate) fn ggml_type(id: u32) -> Result<GgmlType, Option<&'static str>> {
    let (name, block, bytes) = match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        30 => ("BF16", 1, 2),
        _ => {
            return Err(match id {
                4 => Some("Q4_2, removed from ggml"),
                5 => Some("Q4_3, removed from ggml"),
                16 => Some("IQ2_XXS"),
                17 => Some("IQ2_XS"),
                18 => Some("IQ3_XXS"),
                19 => Some("IQ1_S"),
                20 => Some("IQ4_NL"),
                21 => Some("IQ3_S"),
                22 => Some("IQ2_S"),
                23 => Some("IQ4_XS"),
                24 => Some("I8"),
                25 => Some("I16"),
                26 => Some("I32"),
                27 => Some("I64"),
                28 => Some("F64"),
                29 => Some("IQ1_M"),
                31..=33 => Some("Q4_0 repacked, removed from ggml"),
                34 => Some("TQ1_0"),
                35 => Some("TQ2_0"),
                36..=38 => Some("IQ4_NL repacked, removed from ggml"),
                39 => Some("MXFP4"),
                _ => None,
            })
        }
    };
    Ok(GgmlType { name, block, bytes })
}

/// Bytes of tensor data for `dims` of type `ty`; `None` when the first dimension is not a whole
/// number of blocks or the size overflows.
pub(crate) fn tensor_bytes(dims: &[u64], ty: GgmlType) -> Option<u64> {
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % ty.block != 0 {
        return None;
    }
    let row = (ne0 / ty.block).checked_mul(ty.bytes)?;
    dims.iter().skip(1).try_fold(row, |acc, &d| acc.checked_mul(d))
}

/// Why the header walk stopped.
#[derive(Debug)]
enum Stop {
    /// The file ended inside the header.
    Truncated,
    /// The header says something that makes the rest unreadable.
    Invalid(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Stop::Truncated
        } else {
            Stop::Io(e)
        }
    }
}

/// A buffered reader that knows its position and the file size, so every length read from the
/// file is checked against what is really there before anything is allocated or skipped.
struct Reader {
    inner: BufReader<File>,
    pos: u64,
    size: u64,
    /// Bytes of strings kept so far, against KEEP_TOTAL.
    kept: u64,
}

impl Reader {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        let mut buf = [0u8; N];
        if N as u64 > self.remaining() {
            return Err(Stop::Truncated);
        }
        self.inner.read_exact(&mut buf)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, Stop> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn skip(&mut self, n: u64) -> Result<(), Stop> {
        if n > self.remaining() {
            return Err(Stop::Truncated);
        }
        let offset = i64::try_from(n).map_err(|_| Stop::Truncated)?;
        self.inner.seek_relative(offset)?;
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string: its bytes when at most `keep` long, otherwise skipped.
    fn string(&mut self, keep: u64) -> Result<Option<Vec<u8>>, Stop> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(Stop::Invalid(format!("string length {len} exceeds the {} MiB limit", MAX_STRING >> 20)));
        }
        if len > self.remaining() {
            return Err(Stop::Truncated);
        }
        if len > keep {
            self.skip(len)?;
            return Ok(None);
        }
        self.kept = self.kept.saturating_add(len);
        if self.kept > KEEP_TOTAL {
            return Err(Stop::Invalid(format!("keys, names and strings exceed {} MiB in total", KEEP_TOTAL >> 20)));
        }
        let len_usize = usize::try_from(len).map_err(|_| Stop::Truncated)?;
        let mut buf = vec![0u8; len_usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += len;
        Ok(Some(buf))
    }
}

fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        T_U8 | T_I8 | T_BOOL => Some(1),
        T_U16 | T_I16 => Some(2),
        T_U32 | T_I32 | T_F32 => Some(4),
        T_U64 | T_I64 | T_F64 => Some(8),
        _ => None,
    }
}

fn read_value(r: &mut Reader, ty: u32) -> Result<Meta, Stop> {
    Ok(match ty {
        T_U8 => Meta::Uint(u64::from(r.u8()?)),
        T_I8 => Meta::Int(i64::from(i8::from_le_bytes(r.array()?))),
        T_U16 => Meta::Uint(u64::from(r.u16()?)),
        T_I16 => Meta::Int(i64::from(i16::from_le_bytes(r.array()?))),
        T_U32 => Meta::Uint(u64::from(r.u32()?)),
        T_I32 => Meta::Int(i64::from(i32::from_le_bytes(r.array()?))),
        T_F32 => Meta::Float(f64::from(f32::from_le_bytes(r.array()?))),
        T_BOOL => Meta::Bool(r.u8()? != 0),
        T_STRING => Meta::Str(r.string(KEEP_STRING)?.map(|b| String::from_utf8_lossy(&b).into_owned())),
        T_ARRAY => {
            let elem = r.u32()?;
            let len = r.u64()?;
            skip_array(r, elem, len, 1)?;
            Meta::Array { elem, len }
        }
        T_U64 => Meta::Uint(r.u64()?),
        T_I64 => Meta::Int(i64::from_le_bytes(r.array()?)),
        T_F64 => Meta::Float(f64::from_le_bytes(r.array()?)),
        other => return Err(Stop::Invalid(format!("unknown value type {other}"))),
    })
}

/// Skips an array's items without keeping them: fixed-size items in one seek, strings and nested
/// arrays one by one but only after bounding their count by the bytes left in the file.
fn skip_array(r: &mut Reader, elem: u32, len: u64, depth: u32) -> Result<(), Stop> {
    if depth > MAX_NESTING {
        return Err(Stop::Invalid(format!("arrays nested more than {MAX_NESTING} deep")));
    }
    if let Some(size) = scalar_size(elem) {
        let total = len.checked_mul(size).ok_or(Stop::Truncated)?;
        return r.skip(total);
    }
    // The smallest encoding of one item: a string's 8-byte length, or a nested array's type and
    // length.
    let min_item = match elem {
        T_STRING => 8,
        T_ARRAY => 12,
        other => return Err(Stop::Invalid(format!("unknown array element type {other}"))),
    };
    if len > MAX_WALKED_ITEMS {
        return Err(Stop::Invalid(format!("array of {len} items exceeds the limit of {MAX_WALKED_ITEMS}")));
    }
    if len > r.remaining() / min_item {
        return Err(Stop::Truncated);
    }
    for _ in 0..len {
        if elem == T_STRING {
            let n = r.u64()?;
            if n > MAX_STRING {
                return Err(Stop::Invalid(format!("string length {n} exceeds the {} MiB limit", MAX_STRING >> 20)));
            }
            r.skip(n)?;
        } else {
            let inner = r.u32()?;
            let inner_len = r.u64()?;
            skip_array(r, inner, inner_len, depth + 1)?;
        }
    }
    Ok(())
}

/// Reads the header of the GGUF file at `path`; problems are reported under `name`.
fn parse(path: &Path, name: &str, problems: &mut Vec<String>) -> Option<Header> {
    let file = match File::open(path) {
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
    let mut reader = Reader { inner: BufReader::with_capacity(1 << 16, file), pos: 0, size, kept: 0 };
    // Names the part of the header being read, for the message if reading stops there.
    let mut what = String::from("the GGUF magic");
    match parse_inner(&mut reader, &mut what, name, problems) {
        Ok(header) => header,
        Err(stop) => {
            problems.push(match stop {
                Stop::Truncated => format!("{name}: file is truncated: it ends inside {what} (file size {size} bytes)"),
                Stop::Invalid(msg) => format!("{name}: {what}: {msg}"),
                Stop::Io(e) => format!("{name}: cannot read {what}: {e}"),
            });
            None
        }
    }
}

fn parse_inner(
    r: &mut Reader,
    what: &mut String,
    name: &str,
    problems: &mut Vec<String>,
) -> Result<Option<Header>, Stop> {
    let magic: [u8; 4] = r.array()?;
    if &magic != b"GGUF" {
        let hex: Vec<String> = magic.iter().map(|b| format!("{b:02x}")).collect();
        problems.push(format!(
            "{name}: starts with bytes {} instead of the GGUF magic 47 47 55 46 (\"GGUF\"): not a \
             GGUF file",
            hex.join(" ")
        ));
        return Ok(None);
    }
    *what = "the GGUF version".into();
    let version = r.u32()?;
    match version {
        2 | 3 => {}
        1 => {
            problems.push(format!(
                "{name}: GGUF version 1 is not supported (expected 2 or 3); convert the model \
                 again with a current llama.cpp"
            ));
            return Ok(None);
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            problems.push(format!("{name}: big-endian GGUF is not supported; use a little-endian conversion"));
            return Ok(None);
        }
        v => {
            problems.push(format!("{name}: GGUF version {v} is not supported (expected 2 or 3)"));
            return Ok(None);
        }
    }
    *what = "the tensor and metadata counts".into();
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    if n_tensors > MAX_TENSORS || n_kv > MAX_TENSORS {
        problems.push(format!(
            "{name}: header declares {n_tensors} tensors and {n_kv} metadata entries; the limit is \
             {MAX_TENSORS} of each"
        ));
        return Ok(None);
    }

    let mut meta = BTreeMap::new();
    for i in 0..n_kv {
        *what = format!("metadata entry {} of {n_kv}", i + 1);
        let Some(key) = r.string(MAX_KEY_LEN)? else {
            return Err(Stop::Invalid(format!("key longer than {MAX_KEY_LEN} bytes")));
        };
        let key = match String::from_utf8(key) {
            Ok(key) => key,
            Err(e) => {
                let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
                problems.push(format!("{name}: metadata key {lossy:?} is not valid UTF-8"));
                lossy
            }
        };
        *what = format!("metadata value {key}");
        let ty = r.u32()?;
        let value = read_value(r, ty)?;
        if meta.insert(key.clone(), value).is_some() {
            problems.push(format!("{name}: metadata key {key} appears twice"));
        }
    }

    let alignment = match meta.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Meta::Uint(a)) if a.is_power_of_two() && *a <= 1 << 30 => *a,
        Some(Meta::Int(a)) if a.unsigned_abs().is_power_of_two() && (1..=1 << 30).contains(a) => a.unsigned_abs(),
        Some(other) => {
            problems.push(format!(
                "{name}: general.alignment {} must be a power of two; assuming \
                 {DEFAULT_ALIGNMENT}",
                describe(other)
            ));
            DEFAULT_ALIGNMENT
        }
    };

    let mut tensors = Vec::new();
    let mut names = BTreeSet::new();
    for i in 0..n_tensors {
        *what = format!("tensor info {} of {n_tensors}", i + 1);
        let Some(tname) = r.string(MAX_TENSOR_NAME)? else {
            return Err(Stop::Invalid(format!("tensor name longer than {MAX_TENSOR_NAME} bytes (ggml's limit)")));
        };
        let tname = match String::from_utf8(tname) {
            Ok(t) => t,
            Err(e) => {
                let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
                problems.push(format!("{name}: tensor name {lossy:?} is not valid UTF-8"));
                lossy
            }
        };
        *what = format!("tensor info {tname}");
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            return Err(Stop::Invalid(format!("{n_dims} dimensions; ggml allows at most {MAX_DIMS}")));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let ggml_type = r.u32()?;
        let offset = r.u64()?;
        if !names.insert(tname.clone()) {
            problems.push(format!("{name}: tensor {tname} appears twice"));
        }
        tensors.push(TensorInfo { name: tname, dims, ggml_type, offset });
    }
    // The data section starts at the next multiple of the alignment after the header.
    let data_start = r.pos.checked_next_multiple_of(alignment).ok_or(Stop::Truncated)?;
    Ok(Some(Header { meta, tensors, alignment, data_start, size: r.size }))
}

fn describe(value: &Meta) -> String {
    match value {
        Meta::Uint(v) => v.to_string(),
        Meta::Int(v) => v.to_string(),
        Meta::Float(v) => v.to_string(),
        Meta::Bool(v) => v.to_string(),
        Meta::Str(Some(s)) => format!("{s:?}"),
        Meta::Str(None) => "(a long string)".to_string(),
        Meta::Array { len, .. } => format!("(an array of {len} items)"),
    }
}

/// Per-tensor facts the later checks need.
struct TensorFacts {
    dims: Vec<u64>,
    elements: u64,
    type_name: Option<&'static str>,
}

/// Checks each tensor's type, offset and size against the file; returns the tensors by name.
fn check_data(h: &Header, file: &str, problems: &mut Vec<String>) -> BTreeMap<String, TensorFacts> {
    let mut out = BTreeMap::new();
    let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
    for t in &h.tensors {
        let Some(elements) = element_count(&t.dims) else {
            problems.push(format!("{}: dims {} have more elements than fit in 64 bits", t.name, fmt_shape(&t.dims)));
            continue;
        };
        if t.dims.iter().any(|&d| d > i64::MAX as u64) {
            problems.push(format!("{}: dims {} exceed ggml's signed 64-bit limit", t.name, fmt_shape(&t.dims)));
            continue;
        }
        let type_name = match ggml_type(t.ggml_type) {
            Err(Some(known)) => {
                problems.push(format!(
                    "{}: ggml type {} ({known}) is not supported (supported: {SUPPORTED_TYPES})",
                    t.name, t.ggml_type
                ));
                None
            }
            Err(None) => {
                problems.push(format!("{}: unknown ggml type {}", t.name, t.ggml_type));
                None
            }
            Ok(ty) => {
                check_extent(h, t, ty, &mut ranges, problems);
                Some(ty.name)
            }
        };
        out.insert(t.name.clone(), TensorFacts { dims: t.dims.clone(), elements, type_name });
    }
    ranges.sort();
    let mut overlaps = Vec::new();
    let mut prev: Option<(u64, &str)> = None;
    for &(start, end, tensor) in &ranges {
        if let Some((prev_end, prev_name)) = prev {
            if start < prev_end {
                overlaps.push(format!("{file}: tensors {prev_name} and {tensor} overlap"));
            }
        }
        if prev.is_none_or(|(prev_end, _)| end >= prev_end) {
            prev = Some((end, tensor));
        }
    }
    push_limited(problems, overlaps, NAMES_REPORTED, "overlapping tensors");
    if let Some(&(_, end, tensor)) = ranges.iter().max_by_key(|(_, end, _)| *end) {
        if end > h.size {
            problems.push(format!(
                "{file}: file is truncated: tensor {tensor} ends at byte {end} but the file has {} \
                 bytes",
                h.size
            ));
        }
    }
    out
}

/// Checks one tensor's block divisibility and alignment, and records its byte range.
fn check_extent<'a>(
    h: &Header,
    t: &'a TensorInfo,
    ty: GgmlType,
    ranges: &mut Vec<(u64, u64, &'a str)>,
    problems: &mut Vec<String>,
) {
    let ne0 = t.dims.first().copied().unwrap_or(1);
    if ne0 % ty.block != 0 {
        problems.push(format!(
            "{}: first dimension {ne0} is not a multiple of the {} block size {}",
            t.name, ty.name, ty.block
        ));
        return;
    }
    // The alignment is a power of two (checked when parsing), so a mask tests divisibility.
    if t.offset & (h.alignment - 1) != 0 {
        problems.push(format!("{}: offset {} is not a multiple of the alignment {}", t.name, t.offset, h.alignment));
    }
    let range = tensor_bytes(&t.dims, ty).and_then(|bytes| {
        let start = h.data_start.checked_add(t.offset)?;
        Some((start, start.checked_add(bytes)?))
    });
    match range {
        Some((start, end)) => ranges.push((start, end, &t.name)),
        None => problems.push(format!(
            "{}: offset {} and size of dims {} as {} overflow 64 bits",
            t.name,
            t.offset,
            fmt_shape(&t.dims),
            ty.name
        )),
    }
}

/// Hyperparameters from the metadata.
struct Hparams {
    arch: String,
    architecture: Architecture,
    dims: ModelDims,
    context_length: u32,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_scaling: RopeScaling,
    name: Option<String>,
    tokenizer: Option<String>,
    has_chat_template: bool,
}

/// A positive integer metadata value that fits in u32.
fn meta_u32(meta: &BTreeMap<String, Meta>, key: &str) -> Result<Option<u32>, String> {
    let value = match meta.get(key) {
        None => return Ok(None),
        Some(Meta::Uint(v)) => *v,
        Some(Meta::Int(v)) if *v >= 0 => v.unsigned_abs(),
        Some(Meta::Array { .. }) => {
            return Err(format!("{key}: per-layer arrays are not supported; expected one integer"))
        }
        Some(other) => return Err(format!("{key} must be a positive integer, found {}", describe(other))),
    };
    match u32::try_from(value) {
        Ok(0) => Err(format!("{key} must be positive, found 0")),
        Ok(v) => Ok(Some(v)),
        Err(_) => Err(format!("{key} {value} does not fit in 32 bits")),
    }
}

fn read_hparams(h: &Header, file: &str, problems: &mut Vec<String>) -> Option<Hparams> {
    let meta = &h.meta;
    let arch = match meta.get("general.architecture") {
        Some(Meta::Str(Some(a))) if SUPPORTED_ARCHS.contains(&a.as_str()) => Some(a.clone()),
        Some(Meta::Str(Some(a))) => {
            problems.push(format!(
                "{file}: general.architecture {a} is not supported (supported: {})",
                SUPPORTED_ARCHS.join(", ")
            ));
            None
        }
        _ => {
            problems.push(format!(
                "{file}: general.architecture is missing or not a string (supported: {})",
                SUPPORTED_ARCHS.join(", ")
            ));
            None
        }
    };

    let tokens = match meta.get("tokenizer.ggml.tokens") {
        Some(Meta::Array { elem: T_STRING, len }) => match u32::try_from(*len) {
            Ok(0) | Err(_) => {
                problems.push(format!("{file}: tokenizer.ggml.tokens has {len} entries"));
                None
            }
            Ok(n) => Some(n),
        },
        Some(_) => {
            problems.push(format!("{file}: tokenizer.ggml.tokens must be an array of strings"));
            None
        }
        None => {
            problems.push(format!(
                "{file}: tokenizer.ggml.tokens is missing: the GGUF carries no tokenizer \
                 vocabulary"
            ));
            None
        }
    };
    let tokenizer = match meta.get("tokenizer.ggml.model") {
        Some(Meta::Str(Some(m))) => Some(m.clone()),
        _ => {
            problems.push(format!(
                "{file}: tokenizer.ggml.model is missing: the GGUF does not say which tokenizer \
                 it uses"
            ));
            None
        }
    };
    let has_chat_template = matches!(meta.get("tokenizer.chat_template"), Some(Meta::Str(_)));
    if let Some(Meta::Uint(n)) = meta.get("split.count").filter(|v| **v != Meta::Uint(1)) {
        problems.push(format!(
            "{file}: this is one part of a split GGUF ({n} parts); merge it into one file with \
             llama-gguf-split --merge"
        ));
    }
    let name = match meta.get("general.name") {
        Some(Meta::Str(Some(n))) => Some(n.clone()),
        _ => None,
    };

    let arch = arch?;
    let mut field = |suffix: &str, required: bool| -> Option<u32> {
        let key = format!("{arch}.{suffix}");
        match meta_u32(meta, &key) {
            Ok(Some(v)) => Some(v),
            Ok(None) => {
                if required {
                    problems.push(format!("{file}: {key} is missing"));
                }
                None
            }
            Err(msg) => {
                problems.push(format!("{file}: {msg}"));
                None
            }
        }
    };
    let context = field("context_length", true);
    let hidden = field("embedding_length", true);
    let layers = field("block_count", true);
    let heads = field("attention.head_count", true);
    let kv_heads = field("attention.head_count_kv", false);
    let ff = field("feed_forward_length", true);
    let key_length = field("attention.key_length", false);
    let value_length = field("attention.value_length", false);
    let experts = field("expert_count", false);
    let rope_dims = field("rope.dimension_count", false);

    if let Some(n) = experts {
        problems.push(format!("{file}: {arch}.expert_count {n}: mixture-of-experts models are not supported"));
    }
    if let Some(layers) = layers.filter(|&l| l > MAX_LAYERS) {
        problems.push(format!("{file}: {arch}.block_count {layers} exceeds the limit of {MAX_LAYERS}"));
        return None;
    }
    let (context, hidden, layers, heads, ff, vocab) = (context?, hidden?, layers?, heads?, ff?, tokens?);
    let kv_heads = kv_heads.unwrap_or(heads);
    if heads % kv_heads != 0 {
        problems.push(format!(
            "{file}: {arch}.attention.head_count {heads} is not a multiple of \
             {arch}.attention.head_count_kv {kv_heads}"
        ));
    }
    let head_dim = match key_length {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            problems.push(format!(
                "{file}: {arch}.embedding_length {hidden} is not divisible by \
                 {arch}.attention.head_count {heads} and no {arch}.attention.key_length is given"
            ));
            return None;
        }
    };
    if let Some(v) = value_length.filter(|&v| v != head_dim) {
        problems.push(format!(
            "{file}: {arch}.attention.value_length {v} differs from the key length {head_dim}; \
             this is not supported"
        ));
    }
    if let Some(n) = rope_dims.filter(|&n| n != head_dim) {
        problems.push(format!(
            "{file}: {arch}.rope.dimension_count {n} differs from the head size {head_dim} (partial rotary \
             embeddings are not supported)"
        ));
    }
    if head_dim % 2 != 0 {
        problems.push(format!("{file}: the head size {head_dim} must be even for rotary embeddings"));
    }
    let float = |suffix: &str, default: f64, problems: &mut Vec<String>| -> f64 {
        let key = format!("{arch}.{suffix}");
        match meta.get(&key) {
            None => default,
            Some(Meta::Float(v)) if v.is_finite() && *v > 0.0 => *v,
            Some(other) => {
                problems.push(format!("{file}: {key} must be a positive number, found {}", describe(other)));
                default
            }
        }
    };
    let rms_norm_eps = float("attention.layer_norm_rms_epsilon", 1e-5, problems);
    let rope_theta = float("rope.freq_base", 10000.0, problems);
    let scaling_key = format!("{arch}.rope.scaling.type");
    let rope_scaling = match meta.get(&scaling_key) {
        None => RopeScaling::None,
        Some(Meta::Str(Some(t))) if t == "none" => RopeScaling::None,
        Some(Meta::Str(Some(t))) if t == "linear" => {
            RopeScaling::Linear { factor: float("rope.scaling.factor", 1.0, problems) }
        }
        Some(other) => {
            problems.push(format!(
                "{file}: {scaling_key} {} is not supported (supported: none, linear, or Llama 3 frequency \
                 factors in rope_freqs.weight)",
                describe(other)
            ));
            RopeScaling::None
        }
    };
    let architecture = Architecture::from_name(&arch)?;
    Some(Hparams {
        arch,
        architecture,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        dims: ModelDims {
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            intermediate_size: ff,
            vocab_size: vocab,
        },
        context_length: context,
        name,
        tokenizer,
        has_chat_template,
    })
}

/// One tensor the hyperparameters imply, in ggml order.
struct Expected {
    name: String,
    dims: Vec<u64>,
    required: bool,
}

fn expected_tensors(c: &ModelConfig) -> Vec<Expected> {
    let d = &c.dims;
    let hidden = u64::from(d.hidden_size);
    let ff = u64::from(d.intermediate_size);
    let vocab = u64::from(d.vocab_size);
    let (q, kv) = (d.q_width(), d.kv_width());
    let mut out = Vec::new();
    let mut push = |name: String, dims: Vec<u64>, required: bool| out.push(Expected { name, dims, required });
    push("token_embd.weight".into(), vec![hidden, vocab], true);
    push("output_norm.weight".into(), vec![hidden], true);
    // Absent when the output projection is tied to the embeddings.
    push("output.weight".into(), vec![hidden, vocab], !c.tie_word_embeddings);
    // Llama 3 style rope scaling stores its frequency factors.
    if c.rope_scaling == RopeScaling::FreqFactors {
        push("rope_freqs.weight".into(), vec![u64::from(d.head_dim / 2)], true);
    }
    for i in 0..d.num_layers {
        let p = format!("blk.{i}");
        push(format!("{p}.attn_norm.weight"), vec![hidden], true);
        push(format!("{p}.ffn_norm.weight"), vec![hidden], true);
        for (m, ne0, ne1) in [
            ("attn_q", hidden, q),
            ("attn_k", hidden, kv),
            ("attn_v", hidden, kv),
            ("attn_output", q, hidden),
            ("ffn_gate", hidden, ff),
            ("ffn_up", hidden, ff),
            ("ffn_down", ff, hidden),
        ] {
            push(format!("{p}.{m}.weight"), vec![ne0, ne1], true);
            // A bias is all or nothing per kind of projection: the config says which are served.
            let bias = match m {
                "attn_q" | "attn_k" | "attn_v" => c.qkv_bias,
                "attn_output" => c.o_bias,
                _ => c.mlp_bias,
            };
            if bias {
                push(format!("{p}.{m}.bias"), vec![ne1], true);
            }
        }
    }
    out
}

/// Drops trailing 1s: ggml treats missing dimensions as 1, so [64] and [64, 1] are the same.
fn squeeze(dims: &[u64]) -> &[u64] {
    let mut end = dims.len();
    while end > 1 && dims.get(end - 1) == Some(&1) {
        end -= 1;
    }
    dims.get(..end).unwrap_or(dims)
}

fn check_shapes(
    hp: &Hparams,
    config: &ModelConfig,
    tensors: &BTreeMap<String, TensorFacts>,
    all_listed: &BTreeSet<&str>,
    problems: &mut Vec<String>,
) {
    let expected = expected_tensors(config);
    let mut known = BTreeSet::new();
    let (mut missing, mut wrong, mut unexpected) = (Vec::new(), Vec::new(), Vec::new());
    for e in &expected {
        known.insert(e.name.as_str());
        match tensors.get(&e.name) {
            Some(t) if squeeze(&t.dims) != squeeze(&e.dims) => wrong.push(format!(
                "{}: dims {} but the metadata implies {}",
                e.name,
                fmt_shape(&t.dims),
                fmt_shape(&e.dims)
            )),
            Some(_) => {}
            // Tensors already reported as malformed are listed but not in `tensors`.
            None if e.required && !all_listed.contains(e.name.as_str()) => {
                missing.push(format!("missing tensor {} (metadata implies dims {})", e.name, fmt_shape(&e.dims)))
            }
            None => {}
        }
    }
    for name in all_listed {
        if known.contains(name) {
            continue;
        }
        let block = name.strip_prefix("blk.").and_then(|rest| layer_index(&format!("layers.{rest}")).map(|(i, _)| i));
        match block {
            Some(i) if i >= hp.dims.num_layers => {
                unexpected.push(format!("{name}: block {i} but {}.block_count is {}", hp.arch, hp.dims.num_layers))
            }
            _ => unexpected.push(format!("{name}: unexpected tensor for architecture {}", hp.arch)),
        }
    }
    push_limited(problems, wrong, NAMES_REPORTED * 2, "tensors with wrong dims");
    push_limited(problems, missing, NAMES_REPORTED, "missing tensors");
    push_limited(problems, unexpected, NAMES_REPORTED, "unexpected tensors");
}

/// The hyperparameters with what the tensor list adds: a tied output, which biases exist
/// (judged on the first block; `check_shapes` then requires them in every block) and Llama 3
/// frequency factors.
fn model_config(hp: &Hparams, listed: &BTreeSet<&str>, file: &str, problems: &mut Vec<String>) -> ModelConfig {
    let qwen2 = hp.architecture == Architecture::Qwen2;
    let mut rope_scaling = hp.rope_scaling.clone();
    if listed.contains("rope_freqs.weight") {
        if rope_scaling != RopeScaling::None {
            problems.push(format!(
                "{file}: both rope.scaling.type and rope_freqs.weight are set; a model scales RoPE one way"
            ));
        }
        rope_scaling = RopeScaling::FreqFactors;
    }
    ModelConfig {
        architecture: hp.architecture,
        dims: hp.dims,
        max_position_embeddings: hp.context_length,
        rms_norm_eps: hp.rms_norm_eps,
        rope_theta: hp.rope_theta,
        rope_scaling,
        tie_word_embeddings: !listed.contains("output.weight"),
        // llama.cpp loads q/k/v biases for qwen2 always, and optionally for llama-style models.
        qkv_bias: qwen2 || listed.contains("blk.0.attn_q.bias"),
        o_bias: !qwen2 && listed.contains("blk.0.attn_output.bias"),
        mlp_bias: !qwen2 && listed.contains("blk.0.ffn_up.bias"),
    }
}

/// Inspects the single GGUF file `file` of the upload in `dir`.
pub(crate) fn inspect(
    dir: &Path,
    file: &str,
    files: &BTreeMap<String, u64>,
    problems: &mut Vec<String>,
) -> Option<BaseSummary> {
    let header = parse(&dir.join(file), file, problems)?;
    let tensors = check_data(&header, file, problems);
    let hp = read_hparams(&header, file, problems)?;
    let all_listed: BTreeSet<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    let config = model_config(&hp, &all_listed, file, problems);
    check_shapes(&hp, &config, &tensors, &all_listed, problems);

    let parameter_count = tensors.values().fold(0u64, |acc, t| acc.saturating_add(t.elements));
    let mut by_type: BTreeMap<&str, u64> = BTreeMap::new();
    for t in tensors.values() {
        if let Some(ty) = t.type_name {
            let n = by_type.entry(ty).or_default();
            *n = n.saturating_add(t.elements);
        }
    }
    let dtype = by_type
        .into_iter()
        .fold(None, |best: Option<(&str, u64)>, (ty, n)| match best {
            Some((_, m)) if m >= n => best,
            _ => Some((ty, n)),
        })
        .map_or_else(|| "unknown".to_string(), |(ty, _)| ty.to_string());
    Some(BaseSummary {
        format: ModelFormat::Gguf,
        config,
        name: hp.name,
        parameter_count,
        dtype,
        files: files.keys().cloned().collect(),
        has_chat_template: hp.has_chat_template,
        sampling_defaults: BTreeMap::new(),
        tokenizer: hp.tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::*;

    fn inspect_bytes(bytes: &[u8]) -> Result<BaseSummary, Vec<String>> {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "model.gguf", bytes);
        inspect_base(dir.path()).map_err(Problems::into_vec)
    }

    #[test]
    fn tiny_gguf_is_summarised() {
        let s = inspect_bytes(&tiny_gguf().bytes()).expect("valid");
        assert_eq!(s.format, ModelFormat::Gguf);
        assert_eq!(s.config.architecture.name(), "llama");
        assert_eq!(s.name.as_deref(), Some("tiny"));
        assert_eq!(s.config.dims, tiny_dims());
        assert_eq!(s.config.max_position_embeddings, 256);
        assert_eq!(s.parameter_count, tiny_parameter_count(false));
        // token_embd (6400 elements, Q8_0) and one attn_q (4096, Q4_1) leave F32 dominant.
        assert_eq!(s.dtype, "F32");
        assert_eq!(s.files, vec!["model.gguf"]);
        assert!(s.has_chat_template);
        assert_eq!(s.tokenizer.as_deref(), Some("gpt2"));
    }

    #[test]
    fn dominant_quantized_type() {
        let mut g = tiny_gguf();
        for t in &mut g.tensors {
            if t.0.ends_with(".weight") && t.1.len() == 2 {
                t.2 = 3; // Q4_1
            }
        }
        let s = inspect_bytes(&g.bytes()).expect("valid");
        assert_eq!(s.dtype, "Q4_1");
    }

    #[test]
    fn version_two_and_tied_output() {
        let mut g = tiny_gguf();
        g.version = 2;
        g.tensors.retain(|t| t.0 != "output.weight");
        let s = inspect_bytes(&g.bytes()).expect("valid");
        assert_eq!(s.parameter_count, tiny_parameter_count(false) - 6400);
    }

    #[test]
    fn wrong_magic() {
        let mut bytes = tiny_gguf().bytes();
        bytes[..4].copy_from_slice(b"GGML");
        assert_eq!(
            inspect_bytes(&bytes).expect_err("bad magic"),
            vec![
                "model.gguf: starts with bytes 47 47 4d 4c instead of the GGUF magic 47 47 55 46 \
                  (\"GGUF\"): not a GGUF file"
            ]
        );
    }

    #[test]
    fn unsupported_versions() {
        let mut bytes = tiny_gguf().bytes();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            inspect_bytes(&bytes).expect_err("v1"),
            vec![
                "model.gguf: GGUF version 1 is not supported (expected 2 or 3); convert the \
                  model again with a current llama.cpp"
            ]
        );
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            inspect_bytes(&bytes).expect_err("big endian"),
            vec!["model.gguf: big-endian GGUF is not supported; use a little-endian conversion"]
        );
    }

    #[test]
    fn truncated_data_and_header() {
        let bytes = tiny_gguf().bytes();
        let problems = inspect_bytes(&bytes[..bytes.len() - 100]).expect_err("truncated");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("model.gguf: file is truncated: tensor "), "{problems:?}");
        let problems = inspect_bytes(&bytes[..200]).expect_err("truncated header");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("model.gguf: file is truncated: it ends inside metadata"), "{problems:?}");
    }

    #[test]
    fn hostile_counts_and_lengths() {
        // Tensor count over the limit.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let problems = inspect_bytes(&bytes).expect_err("count");
        assert!(problems[0].contains("header declares 18446744073709551615 tensors"));

        // A huge key length.
        let mut g = Gguf::new();
        g.raw_kv(&u64::MAX.to_le_bytes());
        let problems = inspect_bytes(&g.bytes()).expect_err("key length");
        assert_eq!(
            problems,
            vec![
                "model.gguf: metadata entry 1 of 1: string length 18446744073709551615 exceeds \
                  the 64 MiB limit"
            ]
        );

        // An array claiming 2^40 strings in a tiny file.
        let mut g = Gguf::new();
        let mut kv = gguf_string("tokenizer.ggml.tokens");
        kv.extend_from_slice(&9u32.to_le_bytes());
        kv.extend_from_slice(&8u32.to_le_bytes());
        kv.extend_from_slice(&(1u64 << 40).to_le_bytes());
        g.raw_kv(&kv);
        let problems = inspect_bytes(&g.bytes()).expect_err("array length");
        assert_eq!(
            problems,
            vec![
                "model.gguf: metadata value tokenizer.ggml.tokens: array of 1099511627776 items \
                  exceeds the limit of 16777216"
            ]
        );

        // A huge array of u64 is skipped by seeking, then found to overrun the file.
        let mut g = Gguf::new();
        let mut kv = gguf_string("x");
        kv.extend_from_slice(&9u32.to_le_bytes());
        kv.extend_from_slice(&10u32.to_le_bytes());
        kv.extend_from_slice(&(u64::MAX / 4).to_le_bytes());
        g.raw_kv(&kv);
        let problems = inspect_bytes(&g.bytes()).expect_err("array bytes");
        assert_eq!(
            problems,
            vec![format!(
                "model.gguf: file is truncated: it ends inside metadata value x (file size {} \
                 bytes)",
                g.bytes().len()
            )]
        );

        // Deeply nested arrays.
        let mut g = Gguf::new();
        let mut kv = gguf_string("nested");
        kv.extend_from_slice(&9u32.to_le_bytes());
        for _ in 0..6 {
            kv.extend_from_slice(&9u32.to_le_bytes());
            kv.extend_from_slice(&1u64.to_le_bytes());
        }
        kv.extend_from_slice(&[0; 64]);
        g.raw_kv(&kv);
        let problems = inspect_bytes(&g.bytes()).expect_err("nesting");
        assert_eq!(problems, vec!["model.gguf: metadata value nested: arrays nested more than 4 deep"]);
    }

    #[test]
    fn unknown_and_unsupported_types() {
        let mut g = tiny_gguf();
        for t in &mut g.tensors {
            match t.0.as_str() {
                "blk.0.ffn_up.weight" => t.2 = 99,
                "blk.1.ffn_up.weight" => t.2 = 16,
                _ => {}
            }
        }
        let problems = inspect_bytes(&g.bytes()).expect_err("types");
        assert_eq!(
            problems,
            vec![
                "blk.0.ffn_up.weight: unknown ggml type 99".to_string(),
                format!(
                    "blk.1.ffn_up.weight: ggml type 16 (IQ2_XXS) is not supported (supported: \
                     {SUPPORTED_TYPES})"
                ),
            ]
        );
    }

    #[test]
    fn block_size_and_duplicate_key() {
        let mut g = tiny_gguf();
        g.tensors.push(("blk.0.attn_q.weight.extra".into(), vec![33], 8));
        g.kv_str("general.name", "again");
        assert_eq!(
            inspect_bytes(&g.bytes()).expect_err("block size"),
            vec![
                "model.gguf: metadata key general.name appears twice",
                "blk.0.attn_q.weight.extra: first dimension 33 is not a multiple of the Q8_0 \
                 block size 32",
                "blk.0.attn_q.weight.extra: unexpected tensor for architecture llama",
            ]
        );
    }

    #[test]
    fn split_gguf_and_long_names() {
        let mut g = tiny_gguf();
        g.kv_u32("split.count", 3);
        let problems = inspect_bytes(&g.bytes()).expect_err("split");
        assert_eq!(
            problems,
            vec![
                "model.gguf: this is one part of a split GGUF (3 parts); merge it into one file \
                  with llama-gguf-split --merge"
            ]
        );
        let mut g = tiny_gguf();
        g.tensors.push(("x".repeat(64), vec![4], 0));
        let problems = inspect_bytes(&g.bytes()).expect_err("long name");
        assert_eq!(
            problems,
            vec![
                "model.gguf: tensor info 22 of 22: tensor name longer than 63 bytes (ggml's \
                  limit)"
            ]
        );
    }

    #[test]
    fn shape_problems() {
        let mut g = tiny_gguf();
        for t in &mut g.tensors {
            match t.0.as_str() {
                "blk.1.ffn_up.weight" => t.1 = vec![64, 100],
                "blk.0.attn_k.weight" => t.0 = "blk.2.attn_k.weight".into(),
                "output_norm.weight" => t.1 = vec![64, 1],
                _ => {}
            }
        }
        g.tensors.push(("mystery.weight".into(), vec![4], 0));
        assert_eq!(
            inspect_bytes(&g.bytes()).expect_err("shapes"),
            vec![
                "blk.1.ffn_up.weight: dims [64, 100] but the metadata implies [64, 128]",
                "missing tensor blk.0.attn_k.weight (metadata implies dims [64, 32])",
                "blk.2.attn_k.weight: block 2 but llama.block_count is 2",
                "mystery.weight: unexpected tensor for architecture llama",
            ]
        );
    }

    #[test]
    fn misaligned_and_overlapping_offsets() {
        let g = tiny_gguf();
        let bytes = g.bytes_with_offsets(|i, off| match i {
            0 => off + 4,
            2 => 0,
            _ => off,
        });
        let problems = inspect_bytes(&bytes).expect_err("layout");
        assert!(problems.iter().any(|p| p.ends_with("offset 4 is not a multiple of the alignment 32")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("overlap")), "{problems:?}");
    }

    #[test]
    fn metadata_problems() {
        let mut g = Gguf::new();
        g.kv_str("general.architecture", "gpt2");
        g.kv_u32("general.alignment", 3);
        let problems = inspect_bytes(&g.bytes()).expect_err("metadata");
        assert_eq!(
            problems,
            vec![
                "model.gguf: general.alignment 3 must be a power of two; assuming 32",
                "model.gguf: general.architecture gpt2 is not supported (supported: llama, \
                 mistral, qwen2)",
                "model.gguf: tokenizer.ggml.tokens is missing: the GGUF carries no tokenizer \
                 vocabulary",
                "model.gguf: tokenizer.ggml.model is missing: the GGUF does not say which \
                 tokenizer it uses",
            ]
        );
        let mut g = tiny_gguf();
        g.kv_u32("llama.expert_count", 8);
        g.kv_u32_array("llama.feed_forward_length", &[128, 128]);
        let problems = inspect_bytes(&g.bytes()).expect_err("moe");
        assert!(problems.iter().any(|p| p
            == "model.gguf: llama.feed_forward_length: per-layer arrays are not supported; \
                expected one integer"));
        assert!(problems
            .iter()
            .any(|p| p == "model.gguf: llama.expert_count 8: mixture-of-experts models are not supported"));
    }

    #[test]
    fn type_sizes() {
        let q4_1 = ggml_type(3).expect("Q4_1");
        assert_eq!(tensor_bytes(&[64, 10], q4_1), Some(2 * 20 * 10));
        assert_eq!(tensor_bytes(&[33], q4_1), None);
        let q6_k = ggml_type(14).expect("Q6_K");
        assert_eq!(tensor_bytes(&[512, 2], q6_k), Some(2 * 210 * 2));
        assert_eq!(tensor_bytes(&[u64::MAX - 31, u64::MAX], ggml_type(8).expect("Q8_0")), None);
    }
}
