//! A safetensors file, as the weights of a Hugging Face base model upload (beside a valid config
//! and tokenizer) and as the weights of a PEFT adapter (beside a valid adapter config).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = hearth_fuzz::fixture("tiny_llama/config.json");
    let tokenizer = hearth_fuzz::fixture("tiny_llama/tokenizer.json");
    let base = hearth_fuzz::model_dir(
        "base",
        &[("config.json", config), ("tokenizer.json", tokenizer), ("model.safetensors", data)],
    );
    let _ = hearth_formats::inspect_base(&base);
    let adapter_config = hearth_fuzz::fixture("lora/attn_only/adapter_config.json");
    let adapter = hearth_fuzz::model_dir(
        "adapter",
        &[("adapter_config.json", adapter_config), ("adapter_model.safetensors", data)],
    );
    let _ = hearth_formats::inspect_adapter(&adapter);
});
