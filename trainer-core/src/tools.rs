//! The two tools the Dreambooth guide wishes it had: a rare-token finder
//! (an instance token the model knows little about) and a regularisation
//! set generator (class images made by the model being trained). Both
//! run natively and in the browser.

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::StableDiffusion;
use crate::pipeline::{a1111_parameters, png_with_parameters, to_rgb8, GenerateRequest};
use crate::train::storage::{join, Storage};
use crate::train::tensor_file::HostTensor;

/// The sentence a token's prior is measured in (without a class).
pub const TEMPLATE: &str = "a photo of";

/// Words with a meaning the model already knows, despite looking random.
const KNOWN_MEANINGS: [(&str, &str); 6] = [
    ("sks", "SKS is a rifle: the model tends to draw guns for it"),
    ("ohwx", "widely used in shared LoRAs, so merged models may know it"),
    ("zwx", "widely used in shared LoRAs, so merged models may know it"),
    ("xyz", "a common placeholder word"),
    ("abc", "a common word (the alphabet, a TV network)"),
    ("btw", "internet slang"),
];

/// Vocabulary ids below this are frequent words in CLIP's training text
/// (CLIP's BPE ids follow merge order, which follows frequency).
const FREQUENT_BELOW: u32 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenReport {
    pub text: String,
    /// Token ids without start and end.
    pub ids: Vec<u32>,
    /// How the tokenizer splits it.
    pub pieces: Vec<String>,
    /// How much the text moves the text encoder's pooled output away from
    /// the prompt without it: 1 - cosine similarity. Lower is a weaker prior.
    pub prior: f64,
    pub warning: Option<String>,
}

/// Letters-only single tokens of the vocabulary, `min..=max` characters long,
/// that the tokenizer encodes back to themselves as one id, by id.
pub fn single_token_words(model: &StableDiffusion, min_chars: usize, max_chars: usize) -> Result<Vec<(String, u32)>> {
    let mut words: Vec<(String, u32)> = model
        .tokenizer
        .vocabulary()
        .into_iter()
        .filter_map(|(token, id)| {
            let word = token.strip_suffix("</w>")?;
            let fits = (min_chars..=max_chars).contains(&word.len()) && word.bytes().all(|b| b.is_ascii_lowercase());
            fits.then(|| (word.to_string(), id))
        })
        .collect();
    words.sort_by_key(|(_, id)| *id);
    let mut single = Vec::with_capacity(words.len());
    for (word, id) in words {
        if model.tokenizer.content_ids(&word)? == [id] {
            single.push((word, id));
        }
    }
    Ok(single)
}

fn prompt_with(text: &str, class: Option<&str>) -> String {
    match class {
        Some(class) => format!("{TEMPLATE} {text} {class}"),
        None => format!("{TEMPLATE} {text}"),
    }
}

fn baseline(class: Option<&str>) -> String {
    match class {
        Some(class) => format!("{TEMPLATE} {class}"),
        None => TEMPLATE.to_string(),
    }
}

/// The text encoder's pooled output (final hidden state at the end token)
/// for each prompt, on the host.
async fn pooled(model: &StableDiffusion, prompts: &[String], device: &Device) -> Result<Vec<Vec<f32>>> {
    let mut ids = Vec::new();
    let mut ends = Vec::new();
    for prompt in prompts {
        let encoded = model.tokenizer.encode(prompt)?;
        ends.push(encoded.iter().position(|&i| i == model.tokenizer.eos_id).unwrap_or(encoded.len() - 1));
        ids.extend(encoded.into_iter().map(|i| i as i64));
    }
    let length = model.tokenizer.max_length;
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [prompts.len(), length]), device);
    let hidden = HostTensor::from_tensor(model.text_encoder.forward(ids).last_hidden_state).await?;
    let width = hidden.shape[2];
    Ok(ends.iter().enumerate().map(|(b, &end)| hidden.values[(b * length + end) * width..(b * length + end + 1) * width].to_vec()).collect())
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (norm(a) * norm(b)).max(1e-12)
}

fn warning(model: &StableDiffusion, text: &str, ids: &[u32]) -> Option<String> {
    if let Some((_, why)) = KNOWN_MEANINGS.iter().find(|(word, _)| text.eq_ignore_ascii_case(word)) {
        return Some(why.to_string());
    }
    if ids.len() > 1 {
        return Some(format!("{} tokens: right for a look-alike's name (whose prior you want), but a rare token should be one", ids.len()));
    }
    match ids.first() {
        Some(&id) if id < FREQUENT_BELOW && id != model.tokenizer.eos_id => Some(format!("a frequent word in CLIP's training text (vocabulary rank {id})")),
        _ => None,
    }
}

/// Prior scores of texts, in batches (one text-encoder pass per batch).
pub async fn score(
    model: &StableDiffusion,
    texts: &[String],
    class: Option<&str>,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<TokenReport>> {
    const BATCH: usize = 64;
    let base = pooled(model, &[baseline(class)], device).await?.remove(0);
    let mut reports = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(BATCH) {
        let prompts: Vec<String> = chunk.iter().map(|t| prompt_with(t, class)).collect();
        for (text, output) in chunk.iter().zip(pooled(model, &prompts, device).await?) {
            let ids = model.tokenizer.content_ids(text)?;
            reports.push(TokenReport {
                text: text.clone(),
                pieces: model.tokenizer.pieces(text)?.into_iter().map(|p| p.replace("</w>", "")).collect(),
                prior: cosine_distance(&output, &base),
                warning: warning(model, text, &ids),
                ids,
            });
        }
        progress(reports.len(), texts.len());
    }
    Ok(reports)
}

/// The `count` candidates with the weakest prior among single-token words
/// of `min_chars..=max_chars` letters: warning-free first, then by prior,
/// then rarer (higher id) first. Deterministic for a model.
pub async fn find_tokens(
    model: &StableDiffusion,
    count: usize,
    min_chars: usize,
    max_chars: usize,
    class: Option<&str>,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<TokenReport>> {
    let words: Vec<String> = single_token_words(model, min_chars, max_chars)?.into_iter().map(|(w, _)| w).collect();
    if words.is_empty() {
        return Err(Error::Config {
            source_name: "find-token".into(),
            problems: vec![format!("no single-token words of {min_chars} to {max_chars} letters in this vocabulary")],
        });
    }
    let mut reports = score(model, &words, class, device, progress).await?;
    reports.sort_by(|a, b| {
        (a.warning.is_some(), a.prior, std::cmp::Reverse(a.ids[0]))
            .partial_cmp(&(b.warning.is_some(), b.prior, std::cmp::Reverse(b.ids[0])))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    reports.truncate(count);
    Ok(reports)
}

/// What to generate for a regularisation set.
#[derive(Debug, Clone)]
pub struct RegularisationSet {
    pub request: GenerateRequest,
    pub count: usize,
    /// The folder the images go to (also the dataset's `instance_data_dir`).
    pub folder: String,
}

impl RegularisationSet {
    pub fn image_name(index: usize) -> String {
        format!("reg-{index:05}.png")
    }

    /// (parent folder, folder name) of the set.
    fn split(&self) -> (&str, &str) {
        self.folder.rsplit_once('/').unwrap_or(("", &self.folder))
    }

    /// Where the entry is saved: beside the folder, not in it (the folder
    /// holds only images, so a plan reports no stray files).
    pub fn entry_path(&self) -> String {
        let (parent, name) = self.split();
        join(parent, &format!("{name}-dataloader-entry.json"))
    }

    /// A dataloader entry for the set, ready to add to the config.
    pub fn dataloader_entry(&self) -> serde_json::Value {
        let (parent, name) = self.split();
        let size = self.request.width.max(self.request.height);
        serde_json::json!({
            "id": "regularisation-data",
            "type": "local",
            "instance_data_dir": self.folder,
            "caption_strategy": "instanceprompt",
            "instance_prompt": self.request.prompt,
            "is_regularisation_data": true,
            "repeats": 1,
            "ignore_epochs": true,
            "cache_dir_vae": join(parent, &format!("cache/vae/{name}")),
            "resolution": size,
            "resolution_type": "pixel_area",
            "minimum_image_size": size,
        })
    }
}

/// Generates the set's images that are not there yet (image `i` uses seed
/// `seed + i`, so an interrupted run resumes with the same images), then
/// writes the dataloader entry beside the folder. Returns how many were made.
pub async fn make_regularisation_set(
    model: &StableDiffusion,
    set: &RegularisationSet,
    storage: &dyn Storage,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize, bool),
) -> Result<usize> {
    let mut made = 0;
    for index in 0..set.count {
        let path = join(&set.folder, &RegularisationSet::image_name(index));
        let existing = storage.read(&path)?.filter(|bytes| image::load_from_memory_with_format(bytes, image::ImageFormat::Png).is_ok());
        if existing.is_none() {
            let request = GenerateRequest { seed: set.request.seed + index as u64, ..set.request.clone() };
            let generated = model.generate(&request, None, device, &mut |_, _| {})?;
            let image = to_rgb8(generated.image).await?;
            let parameters = a1111_parameters(&request, "burnbooth regularisation set", &[]);
            storage.write(&path, &png_with_parameters(&image, &parameters)?)?;
            made += 1;
        }
        progress(index + 1, set.count, existing.is_none());
    }
    let entry = serde_json::to_string_pretty(&serde_json::json!([set.dataloader_entry()])).expect("serialises");
    storage.write(&set.entry_path(), entry.as_bytes())?;
    Ok(made)
}
