//! The CLIP tokenizer, built with the `tokenizers` crate exactly as
//! transformers' `CLIPTokenizer` builds it: NFC, whitespace collapsed,
//! lowercase; CLIP's split regex then byte-level; BPE with `</w>` word ends.
//! Prompts become `<|startoftext|> ... <|endoftext|>` padded to 77 ids with
//! the model's pad token (SD 1.x pads with `<|endoftext|>`, SD 2.x with `!`).

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// The standard CLIP vocabulary (from OpenAI's BPE file, as open-clip ships
/// it), for single-file checkpoints, which carry no tokenizer.
pub const STANDARD_VOCAB: &str = include_str!("../../assets/clip-tokenizer/vocab.json");
pub const STANDARD_MERGES: &str = include_str!("../../assets/clip-tokenizer/merges.txt");

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Sequence length of every Stable Diffusion text encoder.
pub const MAX_LENGTH: usize = 77;

const SPLIT_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
}

fn tokenizer_error(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Io { path: what.to_string(), message: format!("cannot build the CLIP tokenizer: {error}") }
}

impl ClipTokenizer {
    /// The bundled standard vocabulary with the given pad token
    /// (`<|endoftext|>` for SD 1.x and SDXL's first encoder, `!` for SD 2.x
    /// and SDXL's second).
    pub fn standard(pad_token: &str) -> Result<Self> {
        Self::from_vocab_and_merges(STANDARD_VOCAB, STANDARD_MERGES, pad_token, "bundled CLIP vocabulary")
    }

    /// From a model folder's `vocab.json` and `merges.txt`.
    pub fn from_vocab_and_merges(vocab_json: &str, merges_txt: &str, pad_token: &str, source: &str) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab_json).map_err(|e| tokenizer_error(source, format!("vocab.json: {e}")))?;
        let merges: Vec<(String, String)> = merges_txt
            .lines()
            .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
            .map(|line| {
                let (a, b) = line.split_once(' ').ok_or_else(|| tokenizer_error(source, format!("bad merges line {line:?}")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(END_OF_TEXT.into())
            .fuse_unk(false)
            .build()
            .map_err(|e| tokenizer_error(source, e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| tokenizer_error(source, e))?;
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(whitespace),
            NormalizerWrapper::Lowercase(Lowercase),
        ])));
        let split = Split::new(SplitPattern::Regex(SPLIT_PATTERN.into()), SplitDelimiterBehavior::Removed, true).map_err(|e| tokenizer_error(source, e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        Self::finish(tokenizer, pad_token, source)
    }

    /// From a `tokenizer.json` (the tokenizers library's own format).
    pub fn from_tokenizer_json(text: &str, pad_token: &str, source: &str) -> Result<Self> {
        let tokenizer: Tokenizer = text.parse().map_err(|e| tokenizer_error(source, e))?;
        Self::finish(tokenizer, pad_token, source)
    }

    fn finish(mut tokenizer: Tokenizer, pad_token: &str, source: &str) -> Result<Self> {
        // transformers registers these as special tokens: they are matched
        // whole, before normalisation (so with SD 2.x's "!" pad, "!!!" is three
        // pad-token ids, not one merged token).
        let specials: Vec<AddedToken> = [END_OF_TEXT, START_OF_TEXT, pad_token].iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
        tokenizer.add_special_tokens(&specials);
        let id = |token: &str| tokenizer.token_to_id(token).ok_or_else(|| tokenizer_error(source, format!("the vocabulary has no {token:?}")));
        Ok(Self { bos_id: id(START_OF_TEXT)?, eos_id: id(END_OF_TEXT)?, pad_id: id(pad_token)?, tokenizer, max_length: MAX_LENGTH })
    }

    /// The prompt's token ids without start, end or padding.
    pub fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| tokenizer_error("prompt", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `<|startoftext|>` + the first 75 content ids + `<|endoftext|>`, padded to 77.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let content = self.content_ids(text)?;
        let keep = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// How many ids a prompt needs (with start and end), to warn when a
    /// prompt is cut at 77.
    pub fn length(&self, text: &str) -> Result<usize> {
        Ok(self.content_ids(text)?.len() + 2)
    }

    /// The text pieces of each content id (for showing how a word tokenizes).
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| tokenizer_error("prompt", e))?;
        Ok(encoding.get_tokens().to_vec())
    }

    /// Every (token, id) of the vocabulary, special tokens excluded.
    pub fn vocabulary(&self) -> Vec<(String, u32)> {
        self.tokenizer.get_vocab(false).into_iter().collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}
