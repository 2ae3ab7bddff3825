//! The demo's `tokenizer.json`: a word-level Hugging Face tokenizer for the
//! grammar's words, with Qwen3's special tokens so the engine's chat template
//! (`<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`) tokenises
//! as it does for the real model. Lower-cases the prompt; anything else maps
//! to `<unk>`.

use serde_json::{json, Value};

use super::world::{Colour, Shape, Size};

/// Qwen3's special tokens (ids 0–2 here), then `<unk>`.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const UNK: &str = "<unk>";

/// Every token, in id order.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    v.push(UNK.into());
    for w in ["\n", "user", "assistant", "a", "and", "on", "at", "in", "the", "background", "top", "bottom", "left", "right", "center", ",", "."] {
        v.push(w.into());
    }
    v.extend(Size::ALL.iter().map(|s| s.name().to_string()));
    v.extend(Colour::ALL.iter().map(|s| s.name().to_string()));
    v.extend(Shape::ALL.iter().map(|s| s.name().to_string()));
    v
}

/// A caption in the demo's grammar, to show what it understands.
pub const EXAMPLE_PROMPT: &str = "a large red circle in the center and a small yellow square at the top left on a blue background";

/// The words of `prompt` the demo's tokenizer does not know (they become
/// `<unk>`, which the demo was never trained on), each once, in order. Words
/// are split as the tokenizer splits them (runs of letters, digits and `_`),
/// lower-cased.
pub fn unknown_words(prompt: &str) -> Vec<String> {
    // Built once: the app asks on every frame while the demo is in use.
    static VOCAB: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    let vocab = VOCAB.get_or_init(|| vocabulary().into_iter().collect());
    let mut unknown: Vec<String> = Vec::new();
    for word in prompt.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()) {
        let word = word.to_lowercase();
        if !vocab.contains(&word) && !unknown.contains(&word) {
            unknown.push(word);
        }
    }
    unknown
}

/// [`unknown_words`] for a prompt being typed: a last word the cursor is
/// still in ("squ") is not named while it can still become a known word
/// ("square"), so the warning does not come and go with every keystroke.
pub fn unknown_words_while_typing(prompt: &str) -> Vec<String> {
    let mut unknown = unknown_words(prompt);
    let typing = prompt.chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_');
    let last = prompt.rsplit(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("").to_lowercase();
    // Only when the unfinished word is not also written earlier in the prompt.
    let earlier = prompt[..prompt.len() - last.len()].to_lowercase();
    let written_before = earlier.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|w| w == last);
    if typing && !written_before && vocabulary().iter().any(|w| w.starts_with(&last)) {
        unknown.retain(|w| *w != last);
    }
    unknown
}

/// The `tokenizer.json` document.
pub fn tokenizer_json() -> Value {
    let vocab = vocabulary();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .chain(std::iter::once(&UNK))
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let map: serde_json::Map<String, Value> = vocab.iter().enumerate().map(|(i, w)| (w.clone(), json!(i))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        // Keep newlines, words and punctuation runs; drop other whitespace.
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\n|\\w+|[^\\w\\s]+"}, "behavior": "Removed", "invert": true},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": UNK}
    })
}

/// `tokenizer_config.json` with Qwen3's chat template markers (informative:
/// the engine builds the template itself).
pub fn tokenizer_config_json() -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": UNK,
        "model_max_length": 512,
        "chat_template": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    })
}

#[cfg(test)]
mod tests {

    /// The words the demo cannot read are found as its tokenizer splits
    /// them; its own example reads entirely.
    #[test]
    fn unknown_words_are_the_ones_the_demo_reads_as_unk() {
        assert!(unknown_words(EXAMPLE_PROMPT).is_empty());
        assert!(unknown_words("A Large RED circle, at the top.").is_empty());
        assert_eq!(unknown_words("a cat on a sofa, a CAT!"), ["cat", "sofa"]);
        assert_eq!(unknown_words("一只猫 a red_circle"), ["一只猫", "red_circle"]);
        assert!(unknown_words("").is_empty());
    }

    /// While a word is being typed it is not named as long as it can still
    /// become a known one; a finished one, or one that cannot, is.
    #[test]
    fn a_word_being_typed_is_not_named_while_it_can_become_a_known_one() {
        assert!(unknown_words_while_typing("a small red squ").is_empty());
        assert!(unknown_words_while_typing("a Sma").is_empty());
        assert_eq!(unknown_words_while_typing("a small red squ "), ["squ"], "finished: named");
        assert_eq!(unknown_words_while_typing("a small red squ,"), ["squ"]);
        assert_eq!(unknown_words_while_typing("a small red cat"), ["cat"], "no known word starts so");
        assert_eq!(unknown_words_while_typing("a sofa and a cat on a sm"), ["sofa", "cat"]);
        assert_eq!(unknown_words_while_typing("a squ and a squ"), ["squ"], "written earlier, finished: named");
        assert_eq!(unknown_words_while_typing("a cat and a squ"), ["cat"]);
        assert!(unknown_words_while_typing("").is_empty());
    }

    use super::*;
    use crate::text::PromptTokenizer;

    #[test]
    fn tokenises_the_chat_template_word_by_word() {
        let bytes = serde_json::to_vec(&tokenizer_json()).unwrap();
        let tok = PromptTokenizer::from_bytes(&bytes).unwrap();
        let vocab = vocabulary();
        let id = |w: &str| vocab.iter().position(|v| v == w).unwrap() as u32;
        let ids = tok.encode("A small Red circle at the top left on a blue background").unwrap();
        let words = ["<|im_start|>", "user", "\n", "a", "small", "red", "circle", "at", "the", "top", "left", "on", "a", "blue", "background", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"];
        assert_eq!(ids, words.iter().map(|w| id(w)).collect::<Vec<_>>());
        let empty = tok.encode("").unwrap();
        assert_eq!(empty, ["<|im_start|>", "user", "\n", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"].iter().map(|w| id(w)).collect::<Vec<_>>());
        let odd = tok.encode("a zebra, please").unwrap();
        assert_eq!(&odd[3..7], &[id("a"), id(UNK), id(","), id(UNK)]);
    }
}
