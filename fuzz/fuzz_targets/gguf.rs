//! A GGUF base model upload: the input is the one `.gguf` file of the model's directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = hearth_fuzz::model_dir("gguf", &[("model.gguf", data)]);
    let _ = hearth_formats::inspect_base(&dir);
});
