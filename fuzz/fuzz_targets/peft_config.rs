//! A PEFT adapter's `adapter_config.json`, beside valid adapter weights.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let weights = hearth_fuzz::fixture("lora/attn_only/adapter_model.safetensors");
    let dir = hearth_fuzz::model_dir("peft", &[("adapter_config.json", data), ("adapter_model.safetensors", weights)]);
    let _ = hearth_formats::inspect_adapter(&dir);
});
