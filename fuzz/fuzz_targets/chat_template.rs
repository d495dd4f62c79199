//! A model's chat template (Jinja source, as a tokenizer_config.json carries it), compiled and
//! rendered for a short conversation as a chat request would.
#![no_main]
use hearth_engine::chat::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else { return };
    let Ok(template) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) else { return };
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hello"),
        ChatMessage::new("assistant", "Hi."),
        ChatMessage::new("user", "Again"),
    ];
    let _ = template.render(&messages, true);
});
