//! The tokenizer against the real default model (SmolLM2-135M-Instruct, GGUF) and against the
//! reference outputs transformers produced for it (tests/fixtures/tokenizer_cases.json), plus
//! the GGUF and tokenizer.json loaders against each other on the tiny fixture model.

// The helpers below are test code too: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue, VersionedMagic};
use hearth_engine::tokenizer::Tokenizer;
use serde_json::Value;

fn load_gguf(path: &Path) -> Tokenizer {
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    Tokenizer::from_gguf(&content).unwrap()
}

/// The default model's tokenizer, loaded once; `None` (with a SKIPPED line) when absent.
fn smollm2() -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOKENIZER.get_or_init(|| common::smollm2().map(|path| load_gguf(&path))).as_ref()
}

fn fixture(name: &str) -> Value {
    common::fixture_json(name)
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| u32::try_from(v.as_u64().unwrap()).unwrap()).collect()
}

fn token_strs(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| tok.token_str(id).unwrap()).collect()
}

/// Streams `ids` through a DecodeStream; returns the pieces and how many steps held text back.
fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> (Vec<String>, usize) {
    let mut stream = tok.decode_stream(skip_special);
    let mut pieces = Vec::new();
    let mut held = 0;
    for &id in ids {
        match stream.step(tok, id).unwrap() {
            Some(piece) => pieces.push(piece),
            None => held += 1,
        }
    }
    pieces.extend(stream.flush(tok).unwrap());
    (pieces, held)
}

#[test]
fn smollm2_special_tokens_vocab_and_template() {
    let Some(tok) = smollm2() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.pad_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(
        tok.chat_template(),
        Some(
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        )
    );
}

#[test]
fn smollm2_round_trip_specials_and_digits() {
    let Some(tok) = smollm2() else { return };
    let ids = tok.encode("Hello, world!", true).unwrap();
    assert_eq!(token_strs(tok, &ids), ["Hello", ",", "Ġworld", "!"]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "Hello, world!");

    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>\n", false).unwrap();
    assert_eq!(chat.first(), Some(&1));
    assert!(chat.contains(&2));
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nHi\n");

    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(token_strs(tok, &digits), ["1", "2", "3", "4", "5"]);
    let spaced = tok.encode("x  12", false).unwrap();
    assert_eq!(token_strs(tok, &spaced), ["x", "ĠĠ", "1", "2"]);
}

#[test]
fn smollm2_decode_stream_never_splits_a_character() {
    let Some(tok) = smollm2() else { return };
    let text = "Emoji 🎉🔥👍🏽 and 👨\u{200d}👩\u{200d}👧, CJK 日本語のテキストと中文文本, 안녕하세요, naïve café.";
    let mut ids = tok.encode(text, false).unwrap();
    ids.push(2);
    for skip in [true, false] {
        let (pieces, held) = stream(tok, &ids, skip);
        assert!(held > 0, "a multi-byte character should have spanned tokens");
        for piece in &pieces {
            assert!(!piece.contains('\u{FFFD}'), "broken character emitted: {piece:?}");
        }
        assert_eq!(pieces.concat(), tok.decode(&ids, skip).unwrap());
    }
    assert_eq!(stream(tok, &ids, true).0.concat(), text);
}

#[test]
fn smollm2_matches_transformers_tokenizer_cases() {
    let Some(tok) = smollm2() else { return };
    let fixture = fixture("tokenizer_cases.json");
    assert_eq!(fixture["vocab_size"].as_u64(), Some(tok.vocab_size() as u64));
    assert_eq!(fixture["add_bos_token"].as_bool(), Some(tok.add_bos()));
    let specials = &fixture["special_tokens"];
    assert_eq!(specials["bos"]["id"].as_u64(), tok.bos_id().map(u64::from));
    assert_eq!(specials["bos"]["token"].as_str(), tok.bos_token());
    assert_eq!(specials["eos"]["id"].as_u64(), tok.eos_ids().first().map(|&id| u64::from(id)));
    assert_eq!(specials["eos"]["token"].as_str(), tok.eos_token());
    assert_eq!(specials["pad"]["id"].as_u64(), tok.pad_id().map(u64::from));
    for added in specials["added_tokens"].as_array().unwrap() {
        let id = u32::try_from(added["id"].as_u64().unwrap()).unwrap();
        let token = added["token"].as_str().unwrap();
        assert_eq!(tok.token_id(token), Some(id), "{token}");
        assert!(tok.is_special(id), "{token} should be special");
        assert_eq!(tok.encode(token, false).unwrap(), vec![id], "{token} should encode to one id");
    }

    let cases = fixture["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut digit_split_cases = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        let got_special = tok.encode(text, true).unwrap();
        // hearth follows tokenizer.ggml.pre = "smollm" (SmolLM2's own tokenizer.json and
        // llama.cpp: digits split first); transformers' GGUF loader skips that split, which
        // changes the ids only where whitespace runs into a digit (digit_split_differs).
        assert_eq!(got, ids(&case["ids_digit_split_pretokenizer"]), "{name}: ids vs SmolLM2's tokenizer.json");
        if case["digit_split_differs"].as_bool() == Some(true) {
            digit_split_cases.push(name.to_string());
        } else {
            assert_eq!(got, ids(&case["ids"]), "{name}: ids vs transformers");
            assert_eq!(got_special, ids(&case["ids_with_special_tokens"]), "{name}: add_special");
            let tokens: Vec<String> =
                case["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
            assert_eq!(token_strs(tok, &got), tokens, "{name}: token strings");
        }
        let reference = ids(&case["ids"]);
        assert_eq!(tok.decode(&reference, false).unwrap(), case["decoded"].as_str().unwrap(), "{name}: decode");
        assert_eq!(
            tok.decode(&reference, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{name}: decode skipping specials"
        );
        if case["roundtrip_exact"].as_bool() == Some(true) {
            assert_eq!(tok.decode(&got, false).unwrap(), text, "{name}: round trip");
        }
        for skip in [false, true] {
            assert_eq!(stream(tok, &got, skip).0.concat(), tok.decode(&got, skip).unwrap(), "{name}: stream");
        }
    }
    assert_eq!(digit_split_cases, ["mixed_ws_before_digits"], "cases where the digit split matters");
}

/// The tiny fixture model ships both a GGUF and the tokenizer.json it was converted from:
/// the two loaders must tokenize alike.
#[test]
fn gguf_and_tokenizer_json_agree_on_the_tiny_model() {
    let dir = common::fixtures().join("tiny_llama");
    let from_gguf = load_gguf(&dir.join("model.gguf"));
    let from_json = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(from_gguf.vocab_size(), from_json.vocab_size());
    assert_eq!(from_gguf.bos_id(), from_json.bos_id());
    assert_eq!(from_gguf.eos_ids(), from_json.eos_ids());
    assert_eq!(from_gguf.add_bos(), from_json.add_bos());
    assert_eq!(from_gguf.chat_template(), from_json.chat_template());
    let mut texts: Vec<String> = vec![
        "Hello world".into(),
        "<|im_start|>user\nHi there, 12 + 345 = 357<|im_end|>\n".into(),
        "  tabs\tand\r\nnewlines\n\n  ".into(),
        "café 日本語 🎉".into(),
    ];
    let cases = fixture("tokenizer_cases.json");
    texts.extend(cases["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()));
    for text in &texts {
        let ids = from_gguf.encode(text, true).unwrap();
        assert_eq!(ids, from_json.encode(text, true).unwrap(), "{text:?}");
        for skip in [false, true] {
            assert_eq!(from_gguf.decode(&ids, skip).unwrap(), from_json.decode(&ids, skip).unwrap(), "{text:?}");
        }
    }
}

/// The GGUF metadata llama.cpp's converter writes for a byte-level tokenizer.json (vocab in id
/// order, "a b" merges, special added tokens as control tokens), with the given pre type.
fn gguf_from_tokenizer_json(json: &Value, pre: &str, eos: &str) -> Content {
    let model = &json["model"];
    let mut by_id: Vec<(u64, String, i32)> = model["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(token, id)| (id.as_u64().unwrap(), token.clone(), 1))
        .collect();
    for added in json["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap();
        let ty = if added["special"].as_bool().unwrap() { 3 } else { 4 };
        match by_id.iter_mut().find(|(i, _, _)| *i == id) {
            Some(entry) => entry.2 = ty,
            None => by_id.push((id, added["content"].as_str().unwrap().to_string(), ty)),
        }
    }
    by_id.sort();
    let merges: Vec<GgufValue> = model["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::Array(pair) => {
                GgufValue::String(format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()))
            }
            other => GgufValue::String(other.as_str().unwrap().to_string()),
        })
        .collect();
    let eos_id = by_id.iter().find(|(_, t, _)| t == eos).unwrap().0;
    let metadata: HashMap<String, GgufValue> = [
        ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", GgufValue::String(pre.into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(by_id.iter().map(|(_, t, _)| GgufValue::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type", GgufValue::Array(by_id.iter().map(|(_, _, ty)| GgufValue::I32(*ty)).collect())),
        ("tokenizer.ggml.merges", GgufValue::Array(merges)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(u32::try_from(eos_id).unwrap())),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
}

/// tiny_qwen2's tokenizer.json is Qwen2's real pipeline (NFC, the Qwen2 split regex, byte-level
/// without regex): hearth's "qwen2" pre type must tokenize exactly like it.
#[test]
fn qwen2_pre_type_matches_qwen2_tokenizer_json() {
    let dir = common::fixtures().join("tiny_qwen2");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(json["normalizer"]["type"], "NFC", "the fixture is expected to be Qwen2's pipeline");
    let from_json = Tokenizer::from_hf_dir(&dir).unwrap();
    let from_gguf = Tokenizer::from_gguf(&gguf_from_tokenizer_json(&json, "qwen2", "<|im_end|>")).unwrap();
    assert_eq!(from_gguf.vocab_size(), from_json.vocab_size());
    assert_eq!(from_gguf.eos_ids(), from_json.eos_ids());
    let mut texts: Vec<String> = vec![
        "I'M SURE you'LL see 12345 things\r\n\n  ok".into(),
        "decomposed e\u{301} vs é; tabs\t\tand   spaces   ".into(),
        "<|im_start|>user\nHi 2024!<|im_end|>\n".into(),
    ];
    let cases = fixture("tokenizer_cases.json");
    texts.extend(cases["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()));
    for text in &texts {
        let ids = from_json.encode(text, false).unwrap();
        assert_eq!(from_gguf.encode(text, false).unwrap(), ids, "{text:?}");
        assert_eq!(from_gguf.decode(&ids, false).unwrap(), from_json.decode(&ids, false).unwrap(), "{text:?}");
    }
}
