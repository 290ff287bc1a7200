//! The expected-keys function against the real models' key lists
//! (fixtures/keys/, dumped by diffusers itself): SD 1.5 and SD 2.1, in
//! diffusers names and in single-file names. Nothing is allocated. And one
//! name for each weight: on the fixture models, a parameter's module path
//! gives the key it was loaded from, and LoRA layers are named alike.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Tensor};
use trainer_core::models::clip::transformers_key;
use trainer_core::models::loader::ParamNames;
use trainer_core::models::naming::{visit_keyed, KeyedVisitor};
use trainer_core::models::{DiskFolder, StableDiffusion};

use trainer_core::models::safetensors_file::SafetensorsFile;
use trainer_core::models::single_file::{
    clip_text_name, sd1_text_name, unet_name, vae_name, OpenClipView, OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX, SDXL_TEXT_PREFIX,
};
use trainer_core::models::{expected_keys, Family, ModelConfigs};

type Keys = BTreeMap<String, Vec<usize>>;

fn key_file(name: &str) -> Keys {
    let text = std::fs::read_to_string(format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (key, shape) = line.split_once('\t').unwrap();
            let shape: Vec<usize> =
                shape.trim_matches(|c| c == '[' || c == ']').split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
            (key.to_string(), shape)
        })
        .filter(|(key, _)| !key.ends_with("position_ids"))
        .collect()
}

fn component(keys: &[(String, Vec<usize>)], prefix: &str) -> Keys {
    keys.iter().filter_map(|(k, s)| k.strip_prefix(prefix).map(|k| (k.to_string(), s.clone()))).collect()
}

fn assert_same(what: &str, got: &Keys, want: &Keys) {
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} missing (e.g. {:?}), {} extra (e.g. {:?})",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    );
    for (key, shape) in want {
        assert_eq!(&got[key], shape, "{what}: shape of {key}");
    }
}

fn check_family(family: Family, unet: &str, ldm_unet: &str, text: &str) {
    let configs = ModelConfigs::standard(family);
    let keys = expected_keys(&configs);
    let unet_keys = component(&keys, "unet.");
    let vae_keys = component(&keys, "vae.");
    let text_keys = component(&keys, "text_encoder.");
    assert_same(&format!("{family:?} unet"), &unet_keys, &key_file(unet));
    assert_same(&format!("{family:?} vae"), &vae_keys, &key_file("diffusers_vae.txt"));
    assert_same(&format!("{family:?} text encoder"), &text_keys, &key_file(text));

    // Single-file names.
    let ldm: Keys = unet_keys.iter().map(|(k, s)| (unet_name(k, &configs.unet), s.clone())).collect();
    assert_same(&format!("{family:?} single-file unet"), &ldm, &key_file(ldm_unet));
    let map = std::fs::read_to_string(format!("{}/tests/fixtures/keys/map_vae_diffusers_to_ldm.tsv", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut checked = 0;
    for line in map.lines() {
        let columns: Vec<&str> = line.split('\t').collect();
        assert_eq!(vae_name(columns[0], &configs.vae), columns[1], "VAE name of {}", columns[0]);
        checked += 1;
    }
    assert_eq!(checked, vae_keys.len());
}

#[test]
fn sd15_keys_match_diffusers_and_single_file_lists() {
    check_family(Family::Sd1, "diffusers_unet_sd15.txt", "ldm_unet_sd15.txt", "hf_clip_l_text_encoder.txt");
    let configs = ModelConfigs::standard(Family::Sd1);
    let text = component(&expected_keys(&configs), "text_encoder.");
    let ldm: Keys = text.iter().map(|(k, s)| (sd1_text_name(k, true), s.clone())).collect();
    assert_same("SD1 single-file CLIP", &ldm, &key_file("ldm_clip_l_sd1.txt"));
}

#[test]
fn sd21_keys_match_diffusers_and_single_file_lists() {
    check_family(Family::Sd2, "diffusers_unet_sd21.txt", "ldm_unet_sd21.txt", "hf_openclip_h_text_encoder_sd2.txt");
    // OpenCLIP packs q, k and v: compare which file tensors a 23-layer model reads.
    let configs = ModelConfigs::standard(Family::Sd2);
    let empty = SafetensorsFile::from_bytes("empty.safetensors", empty_safetensors()).unwrap();
    let view = OpenClipView::new(&empty, OPENCLIP_PREFIX, configs.text.num_hidden_layers, false);
    let read: std::collections::BTreeSet<String> = view.source_names().into_iter().collect();
    let want: std::collections::BTreeSet<String> = key_file("ldm_openclip_h_sd2.txt").into_keys().collect();
    assert_eq!(read, want);
}

fn empty_safetensors() -> Vec<u8> {
    let header = b"{}";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes
}

#[test]
fn tiny_fixture_configs_give_the_fixture_files_keys() {
    for (family, folder) in [(Family::Sd1, "sd1"), (Family::Sd2, "sd2")] {
        let root = format!("{}/tests/fixtures/models/{folder}/diffusers", env!("CARGO_MANIFEST_DIR"));
        let configs = trainer_core::models::read_folder_configs(&trainer_core::models::DiskFolder { root: root.clone().into() }).unwrap();
        let keys = expected_keys(&configs);
        let file = SafetensorsFile::open(&format!("{root}/unet/diffusion_pytorch_model.safetensors")).unwrap();
        let stored: Keys = file.names().map(|n| (n.to_string(), file.info(n).unwrap().shape.clone())).collect();
        assert_same(&format!("{family:?} tiny unet"), &component(&keys, "unet."), &stored);
    }
}

#[test]
fn sdxl_keys_match_diffusers_lists() {
    let configs = ModelConfigs::standard(Family::Sdxl);
    let keys = expected_keys(&configs);
    assert_same("SDXL unet", &component(&keys, "unet."), &key_file("diffusers_unet_sdxl.txt"));
    assert_same("SDXL vae", &component(&keys, "vae."), &key_file("diffusers_vae.txt"));
    assert_same("SDXL text encoder", &component(&keys, "text_encoder."), &key_file("hf_clip_l_text_encoder.txt"));
    assert_same("SDXL text encoder 2", &component(&keys, "text_encoder_2."), &key_file("hf_openclip_bigg_text_encoder_2_sdxl.txt"));
    let ldm: Keys = component(&keys, "unet.").iter().map(|(k, s)| (unet_name(k, &configs.unet), s.clone())).collect();
    assert_same("SDXL single-file unet", &ldm, &key_file("ldm_unet_sdxl.txt"));

    // SGM names of the two text encoders.
    let te1: Keys = component(&keys, "text_encoder.").iter().map(|(k, s)| (clip_text_name(SDXL_TEXT_PREFIX, k, true), s.clone())).collect();
    assert_same("SDXL single-file text encoder", &te1, &key_file("ldm_sdxl_te1_clip_l.txt"));
    let empty = SafetensorsFile::from_bytes("empty.safetensors", empty_safetensors()).unwrap();
    let view = OpenClipView::new(&empty, SDXL_OPENCLIP_PREFIX, configs.text_2.as_ref().unwrap().num_hidden_layers, true);
    let read: std::collections::BTreeSet<String> = view.source_names().into_iter().collect();
    let want: std::collections::BTreeSet<String> = key_file("ldm_sdxl_te2_bigg.txt").into_keys().collect();
    assert_eq!(read, want, "SDXL single-file text encoder 2: the OpenCLIP tensors read");
}

/// Each parameter's key as its module path names it.
#[derive(Default)]
struct PathKeys(HashMap<ParamId, String>);

impl KeyedVisitor for PathKeys {
    fn visit<const D: usize>(&mut self, key: &str, param: &Param<Tensor<D>>) {
        self.0.insert(param.id, key.to_string());
    }
}

fn path_keys<M: Module>(module: &M) -> HashMap<ParamId, String> {
    let mut keys = PathKeys::default();
    visit_keyed(module, "", &mut keys);
    keys.0
}

/// Every parameter's module path gives the key the loader read it under.
fn assert_one_name_per_weight(what: &str, model: &StableDiffusion) {
    let mut components: Vec<(&str, HashMap<ParamId, String>, &ParamNames)> = vec![
        ("unet", path_keys(&model.unet), &model.names.unet),
        ("vae", path_keys(&model.vae), &model.names.vae),
        ("text_encoder", path_keys(&model.text_encoder), &model.names.text_encoder),
    ];
    if let Some(encoder) = &model.text_encoder_2 {
        components.push(("text_encoder_2", path_keys(encoder), &model.names.text_encoder_2));
    }
    for (component, by_path, loaded) in components {
        assert_eq!(by_path.len(), loaded.len(), "{what} {component}: every parameter was loaded by name");
        for (id, key) in &by_path {
            let (loaded_as, _) = &loaded[id];
            assert_eq!(key, loaded_as, "{what} {component}: the module path and the loader disagree");
        }
    }
    // LoRA layers are named by the same keys (the text encoders' under transformers' `text_model.`).
    let mut unet = model.unet.clone();
    for layer in unet.lora_layers_mut() {
        let weight_key = &model.names.unet[&layer.base.weight.id].0;
        assert_eq!(format!("{}.weight", layer.path), *weight_key, "{what}: LoRA layer name");
    }
    let mut text = model.text_encoder.clone();
    for layer in text.lora_layers_mut() {
        let weight_key = &model.names.text_encoder[&layer.base.weight.id].0;
        assert_eq!(format!("{}.weight", layer.path), transformers_key(weight_key), "{what}: text LoRA layer name");
    }
}

#[test]
fn module_paths_checkpoint_keys_and_lora_names_are_one_naming() {
    let device = Device::flex();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    for family in ["sd1", "sd2", "sdxl"] {
        let folder = StableDiffusion::from_folder(&DiskFolder { root: root.join(family).join("diffusers") }, &device).unwrap();
        assert_one_name_per_weight(&format!("{family} folder"), &folder);
        let file = SafetensorsFile::open(root.join(family).join("single_file.safetensors").to_str().unwrap()).unwrap();
        let single = StableDiffusion::from_single_file(&file, Some(folder.configs.clone()), &device).unwrap();
        assert_one_name_per_weight(&format!("{family} single file"), &single);
    }
}
