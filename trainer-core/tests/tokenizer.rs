//! The CLIP tokenizer against transformers' ids for the same prompts
//! (fixtures/models/tokenizer_reference.json, written by scripts/make_fixtures.py).

use trainer_core::models::tokenizer::ClipTokenizer;

fn reference() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/models/tokenizer_reference.json")).unwrap()
}

fn check(tokenizer: &ClipTokenizer, family: &str) {
    let reference = reference();
    let prompts = reference["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 7);
    for (index, prompt) in prompts.iter().enumerate() {
        let prompt = prompt.as_str().unwrap();
        let want: Vec<u32> = reference[family]["input_ids"][index].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tokenizer.encode(prompt).unwrap();
        assert_eq!(got, want, "{family} prompt {prompt:?}");
        let length = reference[family]["untruncated_lengths"][index].as_u64().unwrap() as usize;
        assert_eq!(tokenizer.length(prompt).unwrap(), length, "{family} prompt {prompt:?}");
    }
}

#[test]
fn bundled_vocabulary_matches_transformers_for_both_pad_tokens() {
    check(&ClipTokenizer::standard("<|endoftext|>").unwrap(), "sd1");
    check(&ClipTokenizer::standard("!").unwrap(), "sd2");
}

#[test]
fn long_prompts_are_cut_to_77_with_the_end_token_kept() {
    let tokenizer = ClipTokenizer::standard("<|endoftext|>").unwrap();
    let ids = tokenizer.encode(&"word ".repeat(200)).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], tokenizer.bos_id);
    assert_eq!(ids[76], tokenizer.eos_id);
    assert!(tokenizer.length(&"word ".repeat(200)).unwrap() > 77);
}

#[test]
fn pieces_show_how_a_word_splits() {
    let tokenizer = ClipTokenizer::standard("<|endoftext|>").unwrap();
    assert_eq!(tokenizer.pieces("sks").unwrap(), ["sks</w>"]);
    assert!(tokenizer.pieces("zwxrobot").unwrap().len() > 1);
}
