//! The expected-keys function against the real models' key lists
//! (fixtures/keys/, dumped by diffusers itself): SD 1.5 and SD 2.1, in
//! diffusers names and in single-file names. Nothing is allocated.

use std::collections::BTreeMap;

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
