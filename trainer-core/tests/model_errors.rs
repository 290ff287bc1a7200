//! Broken model files give errors that name the file and the tensor.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use trainer_core::models::safetensors_file::SafetensorsFile;
use trainer_core::models::{DiskFolder, StableDiffusion};

fn fixture_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1/diffusers")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burnbooth-models-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixture_folder(), &dir);
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn load_error(root: &Path) -> String {
    match StableDiffusion::from_folder(&DiskFolder { root: root.to_path_buf() }, &Device::flex()) {
        Ok(_) => panic!("expected {} to fail", root.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = scratch("truncated");
    let file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("diffusion_pytorch_model.safetensors") && message.contains("truncated"), "{message}");
    std::fs::write(&file, &bytes[..5]).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("not a valid .safetensors file"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_shapes_name_the_tensor_and_both_shapes() {
    let dir = scratch("shapes");
    let config_path = dir.join("unet/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"cross_attention_dim\": 8", "\"cross_attention_dim\": 12");
    std::fs::write(&config_path, config).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight") && message.contains("[8, 8]") && message.contains("[8, 12]"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_and_unexpected_tensors_are_listed() {
    let dir = scratch("missing");
    let config_path = dir.join("unet/config.json");
    // One more layer per block than the weights have: missing tensors;
    // one fewer: unexpected ones.
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, original.replace("\"layers_per_block\": 2", "\"layers_per_block\": 3")).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("missing tensor 'down_blocks.0.resnets.2.norm1.weight'"), "{message}");
    std::fs::write(&config_path, original.replace("\"layers_per_block\": 2", "\"layers_per_block\": 1")).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("unexpected tensor"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_sub_folder_is_named() {
    let dir = scratch("subfolder");
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("vae") && message.contains("missing sub-folder"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pickle_files_are_refused_with_advice() {
    let dir = scratch("pickle");
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("unet/diffusion_pytorch_model.bin"), b"\x80\x02pickle").unwrap();
    let message = load_error(&dir);
    assert!(message.contains("pickle") && message.contains("safetensors"), "{message}");

    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04zip").unwrap();
    let message = SafetensorsFile::open(ckpt.to_str().unwrap()).err().unwrap().to_string();
    assert!(message.contains("pickle") && message.contains("model.ckpt"), "{message}");
    let disguised = dir.join("disguised.safetensors");
    std::fs::write(&disguised, b"PK\x03\x04zip").unwrap();
    let message = SafetensorsFile::open(disguised.to_str().unwrap()).err().unwrap().to_string();
    assert!(message.contains("pickle"), "{message}");

    // A real safetensors file whose header length's first byte is 0x80
    // (pickle's first byte) loads: one in 256 files has such a header.
    let tensors =
        std::collections::BTreeMap::from([("w".to_string(), trainer_core::train::tensor_file::HostTensor { shape: vec![2], values: vec![1.0, 2.0] })]);
    let bytes = (0..64)
        .map(|pad| {
            let metadata = std::collections::BTreeMap::from([("note".to_string(), "x".repeat(pad * 8))]);
            trainer_core::train::tensor_file::write(&tensors, &metadata).unwrap()
        })
        .find(|bytes| bytes[0] == 0x80)
        .expect("some padding gives a header length whose low byte is 0x80");
    let file = SafetensorsFile::from_bytes("odd.safetensors", bytes).unwrap();
    assert_eq!(file.to_f32("w").unwrap(), [1.0, 2.0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_noise_schedule_is_refused_by_file_and_key() {
    let root = scratch("schedule");
    let path = root.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"scaled_linear\"", "\"sigmoid\"")).unwrap();
    let message = load_error(&root);
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("'beta_schedule' is 'sigmoid', which is not one of: linear, scaled_linear, squaredcos_cap_v2"), "{message}");
    let _ = std::fs::remove_dir_all(&root);
}
