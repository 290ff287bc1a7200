//! Captions as SimpleTuner's strategies define them, stripped consistently
//! (a CRLF text file must not produce a different caption than an LF one).

use super::source::ImageSource;
use crate::config::dataset::{CaptionStrategy, ImageDatasetConfig};

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
    fn text_files_split_lines_and_strip_crlf() {
        assert_eq!(split_caption_text("one\r\n\r\n two \r\n", false), ["one", "two"]);
        assert_eq!(split_caption_text("one\r\ntwo\r\n", true), ["one\r\ntwo"]);
        assert_eq!(text_file_for("a/b.c.jpg"), "a/b.c.txt");
    }
}
