#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| trainer_core::fuzz_targets::dataloader_config(data));
