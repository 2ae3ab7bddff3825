//! Prompt → conditioning: Qwen3's chat template, the model's own
//! `tokenizer.json`, 512-token truncation, and `hidden_states[-2]` of the
//! real tokens (spec §3.3).

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::error::{EngineError, Result};
use crate::qwen3::Qwen3Encoder;

/// The pipeline's `max_sequence_length`: template tokens included.
pub const MAX_TOKENS: usize = 512;

/// Longest prompt we accept before tokenising (characters); far beyond what
/// 512 tokens can hold, it only guards against pasting a whole file.
pub const MAX_PROMPT_CHARS: usize = 20_000;

/// The exact string `apply_chat_template(add_generation_prompt=True,
/// enable_thinking=True)` produces for one user message with Qwen3's template.
pub fn chat_template(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

/// Refuses absurdly long prompts before tokenising them.
fn check_length(prompt: &str) -> Result<()> {
    let chars = prompt.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(EngineError::invalid(format!(
            "prompt is {chars} characters long; the limit is {MAX_PROMPT_CHARS} (only the first {MAX_TOKENS} tokens are used anyway)"
        )));
    }
    Ok(())
}

/// The model's tokenizer (`tokenizer/tokenizer.json`).
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
}

impl PromptTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(EngineError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: cannot read ({e})", path.display())))?;
        for special in ["<|im_start|>", "<|im_end|>"] {
            if inner.token_to_id(special).is_none() {
                return Err(EngineError::Tokenizer(format!(
                    "{}: has no {special} token; this is not a Qwen3 tokenizer",
                    path.display()
                )));
            }
        }
        Ok(Self { inner })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of the templated prompt, truncated to [`MAX_TOKENS`] on the
    /// right (as the reference, which then loses the template's tail).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        check_length(prompt)?;
        let encoding =
            self.inner.encode(chat_template(prompt), true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        ids.truncate(MAX_TOKENS);
        Ok(ids)
    }

    /// Number of tokens the prompt costs (template included, before truncation).
    pub fn count(&self, prompt: &str) -> Result<usize> {
        check_length(prompt)?;
        Ok(self.inner.encode(chat_template(prompt), true).map_err(|e| EngineError::Tokenizer(e.to_string()))?.len())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Tokenizer plus encoder: turns prompts into DiT caption features.
pub struct TextEncoder<B: Backend> {
    pub tokenizer: PromptTokenizer,
    pub model: Qwen3Encoder<B>,
}

impl<B: Backend> TextEncoder<B> {
    /// `[L, hidden]` caption features of one prompt (L ≤ 512).
    pub fn encode(&self, prompt: &str) -> Result<Tensor<B, 2>> {
        let ids = self.tokenizer.encode(prompt)?;
        self.model.forward(&ids)
    }
}
