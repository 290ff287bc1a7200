//! Captions as SimpleTuner's strategies define them, stripped consistently
//! (a CRLF text file must not produce a different caption than an LF one).

use super::source::ImageSource;
use crate::config::dataset::{CaptionShuffle, CaptionStrategy, ImageDatasetConfig};
use crate::rng::SeededRng;

/// The caption variants of one image (one is chosen per sample when a text
/// file has several lines), or why the image has none.
pub fn captions_for(dataset: &ImageDatasetConfig, source: &dyn ImageSource, path: &str) -> Result<Vec<String>, String> {
    if dataset.only_instance_prompt || dataset.caption_strategy == CaptionStrategy::InstancePrompt {
        return Ok(dataset.instance_prompts.clone());
    }
    let captions = match dataset.caption_strategy {
        CaptionStrategy::Filename => vec![filename_caption(path)],
        CaptionStrategy::Textfile => {
            let caption_path = text_file_for(path);
            if !source.exists(&caption_path) {
                return Err(format!("caption file {caption_path} is missing (caption_strategy textfile)"));
            }
            let bytes = source.read(&caption_path).map_err(|e| e.to_string())?;
            let text = String::from_utf8(bytes).map_err(|_| format!("caption file {caption_path} is not UTF-8 text"))?;
            let captions = split_caption_text(&text, dataset.disable_multiline_split);
            if captions.is_empty() {
                return Err(format!("caption file {caption_path} is empty"));
            }
            captions
        }
        CaptionStrategy::InstancePrompt => unreachable!("handled above"),
    };
    // Shuffled before the instance prompt is put in front, which never moves (as SimpleTuner does).
    let captions = match &dataset.caption_shuffle {
        Some(shuffle) => captions.iter().flat_map(|caption| shuffled_variants(caption, shuffle)).collect(),
        None => captions,
    };
    if dataset.prepend_instance_prompt {
        let mut prefixed = Vec::new();
        for prompt in &dataset.instance_prompts {
            for caption in &captions {
                prefixed.push(format!("{prompt} {caption}"));
            }
        }
        return Ok(prefixed);
    }
    Ok(captions)
}

/// A caption and its shuffled-tag variants (SimpleTuner's
/// `caption_shuffle`): tags are split at the separator and trimmed (empty
/// ones dropped), the first `position_start` stay in place, the rest are
/// shuffled `count` times and joined with the separator's joiner. The
/// caption as written comes first (with `include_original`); a variant
/// equal to an earlier one is dropped, so there can be fewer; a caption
/// with at most one movable tag is left as it is. Each caption's orders
/// come from the seed and the caption text, so they are the same on every
/// run and host (not the same orders as SimpleTuner's Python generator).
pub fn shuffled_variants(caption: &str, shuffle: &CaptionShuffle) -> Vec<String> {
    let tags: Vec<&str> = caption.split(shuffle.split_on.split_on()).map(str::trim).filter(|t| !t.is_empty()).collect();
    let (fixed, movable) = tags.split_at(shuffle.position_start.min(tags.len()));
    if movable.len() <= 1 {
        return vec![caption.to_string()];
    }
    let mut variants = Vec::new();
    if shuffle.include_original {
        variants.push(caption.to_string());
    }
    for i in 0..shuffle.count {
        let mut order = movable.to_vec();
        SeededRng::derived(shuffle.seed, &format!("caption_shuffle/{i}/{caption}")).shuffle(&mut order);
        let variant = fixed.iter().chain(&order).copied().collect::<Vec<_>>().join(shuffle.split_on.joiner());
        if !variants.contains(&variant) {
            variants.push(variant);
        }
    }
    variants
}

/// SimpleTuner's filename caption: the stem with underscores as spaces.
pub fn filename_caption(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    let stem = name.rsplit_once('.').map(|(stem, _)| stem).unwrap_or(name);
    stem.replace('_', " ").trim().to_string()
}

/// `photos/a.jpg` -> `photos/a.txt`.
pub fn text_file_for(path: &str) -> String {
    let (dir, name) = path.rsplit_once('/').map(|(d, n)| (format!("{d}/"), n)).unwrap_or((String::new(), path));
    let stem = name.rsplit_once('.').map(|(stem, _)| stem).unwrap_or(name);
    format!("{dir}{stem}.txt")
}

/// One caption per non-empty line (or the whole text), each stripped.
pub fn split_caption_text(text: &str, disable_multiline_split: bool) -> Vec<String> {
    let text = text.trim_start_matches('\u{feff}');
    if disable_multiline_split {
        let caption = text.trim();
        return if caption.is_empty() { vec![] } else { vec![caption.to_string()] };
    }
    text.lines().map(str::trim).filter(|line| !line.is_empty()).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filename_captions() {
        assert_eq!(filename_caption("sub/a_photo_of_sks_dog.JPG"), "a photo of sks dog");
        assert_eq!(filename_caption("x.y.png"), "x.y");
    }

    #[test]
    fn shuffled_tags_keep_the_leading_ones_and_every_tag() {
        use crate::config::dataset::TagSeparator;
        let caption = "sks dog, red collar, grass ,, sunny, close-up";
        let shuffle = CaptionShuffle { count: 4, seed: 7, split_on: TagSeparator::Comma, position_start: 1, include_original: true };
        let variants = shuffled_variants(caption, &shuffle);
        assert_eq!(variants[0], caption, "the caption as written comes first");
        assert!(variants.len() >= 3, "{variants:?}");
        let sorted_tags = |v: &str| {
            let mut tags: Vec<String> = v.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            tags.sort();
            tags
        };
        let expected = sorted_tags(caption);
        for variant in &variants[1..] {
            assert!(variant.starts_with("sks dog, "), "the kept tag leads: {variant}");
            assert_eq!(sorted_tags(variant), expected, "a variant has every tag once: {variant}");
            assert!(!variant.contains(",,") && !variant.contains(" ,"), "tags are joined with ', ': {variant}");
        }
        let distinct: std::collections::BTreeSet<&String> = variants.iter().collect();
        assert_eq!(distinct.len(), variants.len(), "no variant twice");
        assert_eq!(shuffled_variants(caption, &shuffle), variants, "the same seed gives the same variants");
        let other_seed = CaptionShuffle { seed: 8, ..shuffle };
        assert_ne!(shuffled_variants(caption, &other_seed), variants);

        // Keeping two of three tags leaves one to move: nothing to shuffle.
        let kept = CaptionShuffle { position_start: 2, ..shuffle };
        assert_eq!(shuffled_variants("a, b, c", &kept), ["a, b, c"]);
        // Words, without the original.
        let words = CaptionShuffle { split_on: TagSeparator::Space, include_original: false, position_start: 0, count: 2, ..shuffle };
        let variants = shuffled_variants("one two three four", &words);
        assert!((1..=2).contains(&variants.len()), "{variants:?}");
        for variant in &variants {
            let mut words: Vec<&str> = variant.split(' ').collect();
            words.sort();
            assert_eq!(words, ["four", "one", "three", "two"], "{variant}");
        }
    }

    #[test]
    fn text_files_split_lines_and_strip_crlf() {
        assert_eq!(split_caption_text("one\r\n\r\n two \r\n", false), ["one", "two"]);
        assert_eq!(split_caption_text("one\r\ntwo\r\n", true), ["one\r\ntwo"]);
        assert_eq!(text_file_for("a/b.c.jpg"), "a/b.c.txt");
    }
}
