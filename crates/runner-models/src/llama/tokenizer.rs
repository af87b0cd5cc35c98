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

/// Takes the array of strings under `key` out of the metadata, moving the strings.
fn take_strings(metadata: &mut Metadata, key: &str) -> Result<Vec<String>, String> {
    let value = metadata
        .remove(key)
        .ok_or_else(|| format!("the GGUF has no `{key}`; it does not carry a tokenizer"))?;
    let Value::Array(values) = value else {
        return Err(format!("`{key}` is not an array"));
    };
    values
        .into_iter()
        .map(|v| match v {
            Value::String(s) => Ok(s),
            other => Err(format!(
                "`{key}` holds a {:?}, not a string",
                other.value_type()
            )),
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
    from_metadata(
        content
            .metadata
            .iter()
            .filter(|(key, _)| is_tokenizer_key(key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
    )
}

/// [`from_gguf`] from the metadata alone: the keys [`is_tokenizer_key`] names are enough, so
/// a load can move them to another thread and build the tokenizer beside the weights. The
/// vocabulary's strings are moved into the tokenizer, not copied.
pub fn from_metadata(mut metadata: Metadata) -> Result<Tokenizer, String> {
    let model = metadata_str(&metadata, "tokenizer.ggml.model").unwrap_or("(none)");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model is `{model}`; runner builds only byte-level BPE (`gpt2`) tokenizers from GGUF metadata; put a tokenizer.json beside the weights instead"
        ));
    }
    // llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`): SmolLM splits every digit on
    // its own before the GPT-2 byte-level split, as its tokenizer.json does.
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer = match metadata_str(&metadata, "tokenizer.ggml.pre").unwrap_or("default") {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        "gpt-2" | "gpt2" | "default" => PreTokenizerWrapper::ByteLevel(byte_level),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre is `{other}`; runner knows the `smollm` and `gpt-2` pre-tokenizers; put a tokenizer.json beside the weights instead"
            ))
        }
    };
    let tokens = take_strings(&mut metadata, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = take_strings(&mut metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|mut first| {
            let Some(space) = first.find(' ') else {
                return Err(format!(
                    "tokenizer.ggml.merges: `{first}` is not two tokens"
                ));
            };
            let second = first[space + 1..].to_string();
            first.truncate(space);
            Ok((first, second))
        })
        .collect::<Result<_, _>>()?;

    // Control and user-defined tokens are matched whole, never split by the BPE.
    let mut special = Vec::new();
    let mut added = Vec::new();
    if let Some(Value::Array(types)) = metadata.get("tokenizer.ggml.token_type") {
        for (token, kind) in tokens.iter().zip(types) {
            match kind.to_i32().unwrap_or(1) {
                TOKEN_TYPE_CONTROL => special.push(AddedToken::from(token.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => added.push(AddedToken::from(token.clone(), false)),
                _ => {}
            }
        }
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("the GGUF's BPE vocabulary does not build: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| format!("the GGUF's special tokens: {e}"))?;
    tokenizer
        .add_tokens(added)
        .map_err(|e| format!("the GGUF's added tokens: {e}"))?;
    Ok(tokenizer)
}

/// A speed probe, not a check: `cargo test --release --workspace --lib
/// tokenizer_build_speed -- --ignored --nocapture` (needs the SmolLM2 GGUF fetched).
#[cfg(test)]
mod speed {
    #[test]
    #[ignore]
    fn tokenizer_build_speed() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/smollm2-135m-instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf");
        let (content, _) = crate::llama::open_gguf(&path).unwrap();
        let mut times = Vec::new();
        for _ in 0..21 {
            let md: super::Metadata = content
                .metadata
                .iter()
                .filter(|(k, _)| super::is_tokenizer_key(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let t = std::time::Instant::now();
            let tok = super::from_metadata(md).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            drop(tok);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "TOKENIZER ms: min {:.1} median {:.1}",
            times[0],
            times[times.len() / 2]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(tokens: Vec<Value>, merges: &[&str], types: Vec<i32>) -> Metadata {
        let strings =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        Metadata::from([
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.merges".into(), strings(merges)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
        ])
    }

    fn tokens(v: &[&str]) -> Vec<Value> {
        v.iter().map(|s| Value::String(s.to_string())).collect()
    }

    #[test]
    fn a_small_vocabulary_builds_and_encodes() {
        let tokenizer = from_metadata(metadata(
            tokens(&["a", "b", "ab", "<|end|>"]),
            &["a b"],
            vec![1, 1, 1, 3],
        ))
        .unwrap();
        let ids = tokenizer
            .encode("ab<|end|>", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, [2, 3]);
    }

    #[test]
    fn damaged_metadata_is_an_error_not_a_panic() {
        // More token types than tokens: the extra types are ignored.
        assert!(from_metadata(metadata(tokens(&["a", "b", "ab"]), &["a b"], vec![1; 9])).is_ok());
        let e = from_metadata(metadata(tokens(&["a", "b", "ab"]), &["ab"], vec![])).unwrap_err();
        assert!(e.contains("`ab` is not two tokens"), "{e}");
        let e = from_metadata(metadata(vec![Value::U32(7)], &[], vec![])).unwrap_err();
        assert!(
            e.contains("tokenizer.ggml.tokens") && e.contains("not a string"),
            "{e}"
        );
        let e = from_metadata(metadata(tokens(&["a"]), &["a b"], vec![])).unwrap_err();
        assert!(e.contains("does not build"), "{e}");
        let mut no_tokens = metadata(tokens(&["a"]), &[], vec![]);
        no_tokens.remove("tokenizer.ggml.tokens");
        let e = from_metadata(no_tokens).unwrap_err();
        assert!(e.contains("has no `tokenizer.ggml.tokens`"), "{e}");
    }
}
