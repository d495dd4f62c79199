//! Chat templates against transformers: the SmolLM2 template rendered by
//! `apply_chat_template` (tests/fixtures/chat_templates.json), text and token ids.

// The helpers below are test code too: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::quantized::gguf_file::Content;
use hearth_engine::chat::{ChatMessage, ChatTemplate};
use hearth_engine::tokenizer::Tokenizer;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    common::fixture_json(name)
}

#[test]
fn smollm2_chat_templates_match_transformers() {
    let fixture = fixture("chat_templates.json");
    // The model's own tokenizer when it is here (its template and special tokens); without
    // it, the fixture's copy of the template still checks the rendered text.
    let tokenizer = common::smollm2().map(|path| {
        let mut file = std::fs::File::open(path).unwrap();
        Tokenizer::from_gguf(&Content::read(&mut file).unwrap()).unwrap()
    });
    let source = fixture["chat_template"].as_str().unwrap();
    let template = match &tokenizer {
        Some(tok) => {
            assert_eq!(tok.chat_template(), Some(source));
            ChatTemplate::from_tokenizer(tok).unwrap()
        }
        None => ChatTemplate::new(source, Some("<|im_start|>"), Some("<|im_end|>")).unwrap(),
    };
    let conversations = fixture["conversations"].as_array().unwrap();
    assert!(!conversations.is_empty());
    for conversation in conversations {
        let name = conversation["name"].as_str().unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(conversation["messages"].clone()).unwrap();
        let add_generation_prompt = conversation["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages, add_generation_prompt).unwrap();
        assert_eq!(text, conversation["text"].as_str().unwrap(), "{name}: rendered text");
        if let Some(tok) = &tokenizer {
            let expected: Vec<u32> = conversation["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
                .collect();
            assert_eq!(tok.encode(&text, true).unwrap(), expected, "{name}: token ids");
        }
    }
}

#[test]
fn tiny_model_directory_template_renders() {
    let dir = common::fixtures().join("tiny_llama");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    let messages = vec![ChatMessage::new("user", "Hi"), ChatMessage::new("assistant", "Hello")];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
}
