//! A `tokenizers` tokenizer built from a GGUF file's metadata: llama.cpp's GPT-2-style
//! byte-level BPE (`tokenizer.ggml.model = gpt2`), with its pre-tokenizer, decoder and
//! special tokens, so a GGUF needs no `tokenizer.json` beside it.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A GGUF's metadata, key by key.
pub type Metadata = HashMap<String, Value>;

/// The metadata keys the tokenizer is built from.
pub fn is_tokenizer_key(key: &str) -> bool {
    key.starts_with("tokenizer.ggml.")
}

fn strings<'a>(metadata: &'a Metadata, key: &str) -> Result<Vec<&'a str>, String> {
    let value = metadata
        .get(key)
        .ok_or_else(|| format!("the GGUF has no `{key}`; it does not carry a tokenizer"))?;
    value
        .to_vec()
        .map_err(|e| format!("`{key}`: {e}"))?
        .iter()
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|e| format!("`{key}`: {e}"))
        })
        .collect()
}

fn metadata_str<'a>(metadata: &'a Metadata, key: &str) -> Option<&'a str> {
    metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

/// Builds the tokenizer. Supports `tokenizer.ggml.model = gpt2` (byte-level BPE, as
/// SmolLM, Llama 3, Qwen and GPT-2 ship it); other models say so.
pub fn from_gguf(content: &Content) -> Result<Tokenizer, String> {
    from_metadata(&content.metadata)
}

/// [`from_gguf`] from the metadata alone: the keys [`is_tokenizer_key`] names are enough, so
/// a load can move them to another thread and build the tokenizer beside the weights.
pub fn from_metadata(metadata: &Metadata) -> Result<Tokenizer, String> {
    let model = metadata_str(metadata, "tokenizer.ggml.model").unwrap_or("(none)");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model is `{model}`; runner builds only byte-level BPE (`gpt2`) tokenizers from GGUF metadata; put a tokenizer.json beside the weights instead"
        ));
    }
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("tokenizer.ggml.merges: `{m}` is not two tokens"))
        })
        .collect::<Result<_, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("the GGUF's BPE vocabulary does not build: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);

    // llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`): SmolLM splits every digit on
    // its own before the GPT-2 byte-level split, as its tokenizer.json does.
    let pre = metadata_str(metadata, "tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        "smollm" => {
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])));
        }
        "gpt-2" | "gpt2" | "default" => {
            tokenizer.with_pre_tokenizer(Some(byte_level));
        }
        other => {
            return Err(format!(
                "tokenizer.ggml.pre is `{other}`; runner knows the `smollm` and `gpt-2` pre-tokenizers; put a tokenizer.json beside the weights instead"
            ))
        }
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // Control and user-defined tokens are matched whole, never split by the BPE.
    let types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(values)) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => Vec::new(),
    };
    let mut special = Vec::new();
    let mut added = Vec::new();
    for (id, kind) in types.iter().enumerate() {
        match *kind {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(tokens[id].to_string(), true)),
            TOKEN_TYPE_USER_DEFINED => added.push(AddedToken::from(tokens[id].to_string(), false)),
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| format!("the GGUF's special tokens: {e}"))?;
    tokenizer
        .add_tokens(added)
        .map_err(|e| format!("the GGUF's added tokens: {e}"))?;
    Ok(tokenizer)
}
