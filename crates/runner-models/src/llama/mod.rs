//! `candle:llama`: Llama-family text generation, streamed token by token.
//!
//! Two ways in, one generation loop:
//! - a GGUF file in the weights folder: candle's quantized Llama, with the tokenizer and the
//!   chat template read from the GGUF's metadata;
//! - safetensors with `config.json`, `tokenizer.json` and (for chat) `tokenizer_config.json`
//!   in Hugging Face's layout: candle's Llama in f32 (bf16 on CUDA). `runner convert`
//!   writes that layout from any Llama GGUF.
//!
//! Generation keeps a KV cache per prediction, samples with temperature/top-k/top-p and a
//! seed, stops at end-of-turn tokens or stop sequences, streams only whole UTF-8 text (never
//! a stop sequence's beginning), and notices cancellation between tokens.

pub mod convert;
pub mod isq;
mod native;
mod packed;
mod prompt_cache;
pub mod quantized;
pub mod tokenizer;
pub use packed::Kernel;

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::llama as full;
use runner_spec::{InputField, ModelDir, OutputType, Primitive, Signature};
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::structured::{Constraint, Grammar, Vocabulary};
use crate::{
    Architecture, ChatMessage, LoadContext, LoadError, MetricMode, Model, PredictContext,
    PredictError,
};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "llama",
    summary:
        "Llama-family text generation (GGUF quantized, or safetensors), streamed token by token",
    signature,
    load,
    dtype_policy: "gguf: as quantized; safetensors: f32 on cpu, bf16 on cuda",
    example_input: |_| json!({"prompt": "Hello", "max_new_tokens": 4, "temperature": 0.0}),
    batching: false,
    needs_weights: true,
    openai: crate::OpenAi::TextGeneration,
};

/// The most tokens one prediction may ask for.
pub const MAX_NEW_TOKENS: u64 = 4096;
/// The most alternatives `top_logprobs` may ask for at each step (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Recent tokens the repetition penalty looks at.
const REPEAT_WINDOW: usize = 64;
/// End-of-turn tokens of common chat formats, stopped at whenever the vocabulary has them.
const END_OF_TURN_TOKENS: &[&str] = &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"];

pub fn signature() -> Signature {
    Signature {
        inputs: vec![
            InputField::prim("prompt", Primitive::Str)
                .description("The user's message (with the chat template) or the text to continue (without)"),
            InputField::prim("system_prompt", Primitive::Str)
                .default(json!(""))
                .description("System message for the chat template; empty keeps the model's default"),
            InputField::prim("use_chat_template", Primitive::Bool)
                .default(json!(true))
                .description("Wrap the prompt in the model's chat template (ChatML for SmolLM2); false continues the raw text"),
            InputField::prim("max_new_tokens", Primitive::Int)
                .default(json!(256))
                .ge(1.0)
                .le(MAX_NEW_TOKENS as f64)
                .description("Most tokens to generate"),
            InputField::prim("temperature", Primitive::Float)
                .default(json!(0.7))
                .ge(0.0)
                .le(5.0)
                .description("Sampling temperature; 0 is greedy decoding"),
            InputField::prim("top_p", Primitive::Float)
                .default(json!(0.9))
                .ge(0.0)
                .le(1.0)
                .description("Sample from the smallest set of tokens whose probability reaches top_p (1 = off)"),
            InputField::prim("top_k", Primitive::Int)
                .default(json!(50))
                .ge(0.0)
                .description("Sample from the k most likely tokens (0 = off)"),
            InputField::prim("repetition_penalty", Primitive::Float)
                .default(json!(1.0))
                .ge(0.01)
                .le(10.0)
                .description("Penalty on tokens seen in the last 64 (1 = off)"),
            InputField::prim("seed", Primitive::Int)
                .optional()
                .default(Value::Null)
                .description("Random seed for reproducible sampling; empty picks one (logged)"),
            InputField::list("stop", Primitive::Str)
                .default(json!([]))
                .description("Stop when the output contains any of these; the stop text is not returned"),
            InputField::prim("presence_penalty", Primitive::Float)
                .default(json!(0.0))
                .ge(-2.0)
                .le(2.0)
                .description("Subtracted from the logit of every token the output already holds (OpenAI's)"),
            InputField::prim("frequency_penalty", Primitive::Float)
                .default(json!(0.0))
                .ge(-2.0)
                .le(2.0)
                .description("Subtracted from a token's logit once per time the output holds it (OpenAI's)"),
            InputField::prim("logit_bias", Primitive::Str)
                .default(json!(""))
                .description("A JSON object of token id to a bias from -100 to 100, added to that token's logit (-100 bans it); empty: none"),
            InputField::prim("logprobs", Primitive::Bool)
                .default(json!(false))
                .description("Record each generated token's log probability in the `logprobs` metric"),
            InputField::prim("top_logprobs", Primitive::Int)
                .default(json!(0))
                .ge(0.0)
                .le(MAX_TOP_LOGPROBS as f64)
                .description("With logprobs: also this many most likely tokens at each step"),
            InputField::prim("json_schema", Primitive::Str)
                .default(json!(""))
                .description("A JSON Schema the output must match (e.g. {\"type\": \"object\"} for any JSON object); empty: free text"),
        ],
        output: OutputType::ConcatenateIterator(Box::new(OutputType::Prim(Primitive::Str))),
        streaming: true,
    }
}

fn other(e: impl std::fmt::Display) -> LoadError {
    LoadError::Other(e.to_string())
}

/// The loaded network, shared by predictions; each prediction gets its own KV cache.
enum Network {
    /// A pristine copy (empty KV caches), cloned per prediction: clones share the weights.
    Quantized(quantized::ModelWeights),
    Full {
        model: Arc<full::Llama>,
        config: full::Config,
        dtype: DType,
    },
}

/// One prediction's view of the network: the weights and its own KV cache.
enum Session {
    Quantized(quantized::ModelWeights),
    Full {
        model: Arc<full::Llama>,
        cache: full::Cache,
    },
}

impl Session {
    /// Feeds `tokens` at `position` and returns the next token's logits (f32, on the CPU).
    fn step(
        &mut self,
        tokens: &[u32],
        position: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
        let logits = match self {
            Session::Quantized(m) => m.forward(&input, position)?,
            Session::Full { model, cache } => model.forward(&input, position, cache)?,
        };
        logits
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)
    }
}

/// A Llama model ready to generate.
pub struct Generator {
    network: Network,
    tokenizer: Tokenizer,
    /// Token ids that end generation.
    stop_tokens: Vec<u32>,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    /// Prompt plus output, in tokens.
    context: usize,
    device: Device,
    pub source: String,
    /// Recent generations' KV caches, for prompts that start the same way.
    prompt_cache: prompt_cache::PromptCache,
    /// The vocabulary as bytes, built the first time structured output is asked for.
    vocabulary: OnceLock<Result<Arc<Vocabulary>, String>>,
}

impl Generator {
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// The vocabulary as bytes, built the first time it is needed.
    fn vocabulary(&self) -> Result<Arc<Vocabulary>, PredictError> {
        self.vocabulary
            .get_or_init(|| Vocabulary::of(&self.tokenizer).map(Arc::new))
            .clone()
            .map_err(PredictError::Failed)
    }

    /// A constraint that holds the output to `schema` (a JSON Schema, as text).
    pub fn json_constraint(&self, schema: &str) -> Result<Constraint, PredictError> {
        let schema: Value = serde_json::from_str(schema).map_err(|e| {
            PredictError::Failed(format!("json_schema is not JSON ({e}); give a JSON Schema such as {{\"type\": \"object\"}}"))
        })?;
        let grammar = Grammar::compile(&schema)
            .map_err(|e| PredictError::Failed(format!("json_schema: {e}")))?;
        let vocabulary = self.vocabulary()?;
        Ok(Constraint::new(
            Arc::new(grammar),
            vocabulary,
            self.stop_tokens.clone(),
        ))
    }

    fn session(&self) -> Result<Session, PredictError> {
        Ok(match &self.network {
            Network::Quantized(m) => Session::Quantized(m.clone()),
            Network::Full {
                model,
                config,
                dtype,
            } => Session::Full {
                model: Arc::clone(model),
                cache: full::Cache::new(true, *dtype, config, &self.device)?,
            },
        })
    }

    /// Token ids of `text`, as the model was trained to see them (no BOS is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PredictError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PredictError::Failed(format!("tokenizing the prompt: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Greedy decoding of `n` tokens after `prompt_ids`, with the first step's logits:
    /// what the reference tests compare.
    pub fn greedy(
        &self,
        prompt_ids: &[u32],
        n: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), PredictError> {
        let mut session = self.session()?;
        let mut logits = session.step(prompt_ids, 0, &self.device)?;
        let first = logits.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            out.push(next);
            if i + 1 < n {
                logits = session.step(&[next], prompt_ids.len() + i, &self.device)?;
            }
        }
        Ok((out, first))
    }

    /// The prompt as text: through the chat template, or as given.
    pub fn render_prompt(
        &self,
        prompt: &str,
        system: &str,
        chat: bool,
    ) -> Result<String, PredictError> {
        if self.chat_template.is_none() || !chat {
            return Ok(prompt.to_string());
        }
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.into(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt.into(),
        });
        self.render_chat(&messages)
    }

    /// A conversation through the model's chat template, ready for the assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, PredictError> {
        let Some(template) = &self.chat_template else {
            return Err(PredictError::Failed(
                "the model has no chat template; send the text to continue instead (/v1/completions, or use_chat_template=false)".into(),
            ));
        };
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template).map_err(|e| {
            PredictError::Failed(format!("the model's chat template does not parse: {e}"))
        })?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.bos_token.as_str(),
                    eos_token => self.eos_token.as_str(),
                })
            })
            .map_err(|e| PredictError::Failed(format!("rendering the chat template: {e}")))
    }
}

fn load(dir: &ModelDir, device: &Device, ctx: &LoadContext) -> Result<Box<dyn Model>, LoadError> {
    Ok(Box::new(LlamaModel(Arc::new(load_generator(
        dir, device, ctx,
    )?))))
}

/// Loads the model directory's GGUF, or else its safetensors.
pub fn load_generator(
    dir: &ModelDir,
    device: &Device,
    ctx: &LoadContext,
) -> Result<Generator, LoadError> {
    match dir.weights.gguf.as_slice() {
        [one] => load_gguf(dir, one, device, ctx),
        [] => load_safetensors(dir, device, ctx),
        many => Err(other(format!(
            "{} GGUF files in the weights ({}); keep one",
            many.len(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `general.alignment` as the GGUF's metadata declares it, read the way candle reads the
/// metadata, without reading anything else: candle divides by it without checking for zero
/// (found by the `gguf` fuzz target). `None` when absent, not an integer, or the metadata
/// does not parse (candle then reports that itself).
fn declared_alignment(file: &mut File, size: u64) -> Option<u64> {
    fn u32_of(r: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_of(r: &mut impl Read) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    /// A count or length: 64-bit from GGUF v2 on, 32-bit in v1.
    fn len_of(r: &mut impl Read, wide: bool) -> Option<u64> {
        if wide {
            u64_of(r)
        } else {
            u32_of(r).map(u64::from)
        }
    }
    /// Skips one value of GGUF type `kind`; arrays nest at most a few levels.
    fn width(kind: u32) -> Option<u64> {
        Some(match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return None,
        })
    }
    /// Skips one value of GGUF type `kind`; arrays nest at most a few levels, and no count
    /// may exceed the file's size (every element takes at least a byte).
    fn skip(
        r: &mut BufReader<&mut File>,
        kind: u32,
        wide: bool,
        depth: u32,
        size: u64,
    ) -> Option<()> {
        let bytes = match (width(kind), kind) {
            (Some(w), _) => w,
            (None, 8) => len_of(r, wide)?,
            (None, 9) if depth < 4 => {
                let inner = u32_of(r)?;
                let count = len_of(r, wide)?;
                if count > size {
                    return None;
                }
                match width(inner) {
                    Some(w) => count.checked_mul(w)?,
                    None => {
                        for _ in 0..count {
                            skip(r, inner, wide, depth + 1, size)?;
                        }
                        return Some(());
                    }
                }
            }
            _ => return None,
        };
        if bytes > size {
            return None;
        }
        // Within the buffer when it can: a plain seek would drop the buffer and cost two
        // system calls per string (100 ms of a 49,152-token vocabulary).
        r.seek_relative(i64::try_from(bytes).ok()?).ok()?;
        Some(())
    }
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).ok()?;
    let wide = u32_of(&mut r)? >= 2; // GGUF v1 has 32-bit counts and lengths
    let _tensors = len_of(&mut r, wide)?;
    let mut found = None;
    let entries = len_of(&mut r, wide)?;
    if entries > size {
        return None;
    }
    for _ in 0..entries {
        let key_len = len_of(&mut r, wide)?;
        if key_len > 1 << 16 {
            return None;
        }
        let mut key = vec![0u8; key_len as usize];
        r.read_exact(&mut key).ok()?;
        let kind = u32_of(&mut r)?;
        if key == b"general.alignment" && kind <= 5 {
            let mut b = [0u8; 4];
            let width = [1, 1, 2, 2, 4, 4][kind as usize];
            r.read_exact(&mut b[..width]).ok()?;
            // Unsigned and non-negative signed values count, as in candle.
            let negative = kind % 2 == 1 && b[width - 1] & 0x80 != 0;
            found = (!negative).then(|| u64::from(u32::from_le_bytes(b)));
        } else {
            skip(&mut r, kind, wide, 0, size)?;
        }
    }
    found
}

/// A buffered reader that knows its own position. candle's GGUF parser asks for the
/// position before every string, and `BufReader` answers that with a system call: 100,000
/// of them for a 49,152-token vocabulary (about 25 ms).
struct PositionedReader<R> {
    inner: BufReader<R>,
    position: u64,
}

impl<R: Read + Seek> PositionedReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner: BufReader::with_capacity(1 << 16, inner),
            position: 0,
        }
    }
}

impl<R: Read> Read for PositionedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for PositionedReader<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.position = match to {
            SeekFrom::Current(0) => return Ok(self.position),
            SeekFrom::Current(by) => {
                self.inner.seek_relative(by)?;
                self.position
                    .checked_add_signed(by)
                    .ok_or_else(|| std::io::Error::other("seek before the start of the file"))?
            }
            other => self.inner.seek(other)?,
        };
        Ok(self.position)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.position)
    }
}

/// Reads a GGUF's header and checks what runner's Llama needs before any tensor is read:
/// the architecture, and that every tensor lies inside the file (a truncated download).
pub fn open_gguf(path: &Path) -> Result<(gguf_file::Content, File), LoadError> {
    let fail = |what: String| other(format!("{}: {what}", path.display()));
    let mut file = File::open(path).map_err(|e| fail(format!("cannot open it ({e})")))?;
    let size = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    if declared_alignment(&mut file, size) == Some(0) {
        return Err(fail(
            "general.alignment is 0; a GGUF's tensor data must be aligned to at least 1 byte (the file is damaged)".into(),
        ));
    }
    file.rewind().map_err(|e| fail(e.to_string()))?;
    let content = gguf_file::Content::read(&mut PositionedReader::new(&mut file)).map_err(|e| {
        let e = e.to_string();
        if e.contains("unknown dtype") {
            fail(format!("{e}: a quantization type candle cannot read; requantize it (e.g. to Q4_K_M or Q8_0) with llama.cpp"))
        } else {
            fail(format!("not a readable GGUF file ({e}); it may be truncated or not a GGUF at all"))
        }
    })?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("(none)");
    if arch != "llama" {
        return Err(fail(format!(
            "general.architecture is `{arch}`; candle:llama serves Llama-architecture GGUFs (SmolLM, Llama, Mistral-style)"
        )));
    }
    for (name, info) in &content.tensor_infos {
        // Checked: a hostile header can declare dimensions and offsets whose products and
        // sums overflow (found by the `gguf` fuzz target).
        let bytes = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .map(|elements| elements / info.ggml_dtype.block_size())
            .and_then(|blocks| blocks.checked_mul(info.ggml_dtype.type_size()));
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b as u64)
        });
        let Some(end) = end else {
            return Err(fail(format!(
                "tensor `{name}` declares a size or offset past any file ({:?} at offset {}); the file is damaged",
                info.shape.dims(),
                info.offset
            )));
        };
        if end > size {
            return Err(fail(format!(
                "truncated: tensor `{name}` ends at byte {end}, the file has {size}; download it again"
            )));
        }
    }
    Ok((content, file))
}

fn stop_tokens(tokenizer: &Tokenizer, declared: &[u32]) -> Vec<u32> {
    let mut ids: Vec<u32> = declared.to_vec();
    ids.extend(
        END_OF_TURN_TOKENS
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t)),
    );
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Tells the load's progress report how many bytes the GGUF reader has read.
struct CountingReader<'a, 'b, R> {
    inner: R,
    ctx: &'a LoadContext<'b>,
}

impl<R: std::io::Read> std::io::Read for CountingReader<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.advance(n as u64);
        Ok(n)
    }
}

impl<R: std::io::Seek> std::io::Seek for CountingReader<'_, '_, R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

fn load_gguf(
    dir: &ModelDir,
    path: &Path,
    device: &Device,
    ctx: &LoadContext,
) -> Result<Generator, LoadError> {
    if let Some((name, _)) = isq::choice(dir, ctx.quantize())? {
        return Err(other(format!(
            "{}={name}: {} is a GGUF, already quantized; quantization at load applies to safetensors weights (unset it, or `runner convert` the GGUF to safetensors first)",
            isq::ENV,
            path.display()
        )));
    }
    let (mut content, mut file) = open_gguf(path)?;
    let meta_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let meta_str = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    let context = meta_u32("llama.context_length").unwrap_or(2048) as usize;
    let eos = meta_u32("tokenizer.ggml.eos_token_id");
    let bos = meta_u32("tokenizer.ggml.bos_token_id");
    let chat_template = meta_str("tokenizer.chat_template");
    let quant = content
        .tensor_infos
        .get("blk.0.attn_q.weight")
        .map(|i| format!("{:?}", i.ggml_dtype))
        .unwrap_or_else(|| "?".into());
    let started = Instant::now();
    // Runner's own forward pass maps the file to pack its matrices from.
    let file_for_mapping = file.try_clone().ok();
    let mut reader = CountingReader {
        inner: &mut file,
        ctx,
    };
    // The tokenizer (tens of milliseconds of string hashing for a 49,152-token vocabulary)
    // is built on its own thread while the weights load or restore: it needs only its keys.
    let tokenizer_metadata: tokenizer::Metadata = content
        .metadata
        .extract_if(|key, _| tokenizer::is_tokenizer_key(key))
        .collect();
    let (tokenizer, weights) = std::thread::scope(|scope| {
        let tokenizer = scope.spawn(move || tokenizer::from_metadata(tokenizer_metadata));
        let weights = quantized::ModelWeights::from_gguf(
            content,
            &mut reader,
            device,
            context,
            Some(ctx),
            file_for_mapping.as_ref(),
        );
        let tokenizer = tokenizer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (tokenizer, weights)
    });
    // A tokenizer the GGUF cannot give is reported first: it says what to put beside it.
    let tokenizer = tokenizer.map_err(|e| other(format!("{}: {e}", path.display())))?;
    let weights = weights.map_err(|e| other(format!("{}: {e}", path.display())))?;
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    ctx.log(&format!(
        "llama: {} ({quant}) {} in {:.2}s; context {context} tokens; {}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        if ctx.is_restore() {
            "restored from the snapshot (the GGUF's metadata and tokenizer read)"
        } else {
            "loaded"
        },
        started.elapsed().as_secs_f64(),
        match weights.native_kernel() {
            Some(kernel) => format!("runner's forward pass, {kernel:?} kernel"),
            None => "candle's forward pass".to_string(),
        }
    ));
    Ok(Generator {
        network: Network::Quantized(weights),
        stop_tokens: stop_tokens(&tokenizer, &eos.into_iter().collect::<Vec<_>>()),
        bos_token: token_text(bos),
        eos_token: token_text(eos),
        tokenizer,
        chat_template,
        context,
        device: device.clone(),
        source: format!("gguf {quant}"),
        prompt_cache: Default::default(),
        vocabulary: OnceLock::new(),
    })
}

fn load_safetensors(
    dir: &ModelDir,
    device: &Device,
    ctx: &LoadContext,
) -> Result<Generator, LoadError> {
    let layout = &dir.weights;
    let need = |name: &str| {
        layout.file_named(name).map(Path::to_path_buf).ok_or_else(|| {
            other(format!(
                "no {name} in the weights; candle:llama needs a GGUF file, or safetensors with config.json and tokenizer.json (`runner convert` writes them from a GGUF)"
            ))
        })
    };
    need("config.json")?;
    let tokenizer_path = need("tokenizer.json")?;
    let (_, config): (_, full::LlamaConfig) =
        crate::weights::read_json_config(layout, "config.json", "llama")?;
    let context = config.max_position_embeddings;
    let raw_config = config.clone();
    let config = config.into_config(false);
    // The tokenizer (~0.09 s of parsing for SmolLM2's) is read on a thread of its own while
    // the weights load, quantize or restore (from the start of setup, when the engine
    // prefetched it); its errors are still reported first.
    let tokenizer_thread = take_prefetched_tokenizer(tokenizer_path);
    let tokenizer = move || {
        tokenizer_thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    };
    let (chat_template, bos_token, eos_token) = match layout.file_named("tokenizer_config.json") {
        Some(_) => {
            let (_, v): (_, Value) =
                crate::weights::read_json_config(layout, "tokenizer_config.json", "llama")?;
            let text = |k: &str| match &v[k] {
                Value::String(s) => s.clone(),
                Value::Object(o) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            };
            (
                v["chat_template"].as_str().map(str::to_string),
                text("bos_token"),
                text("eos_token"),
            )
        }
        None => (None, String::new(), String::new()),
    };
    let declared: Vec<u32> = match config.eos_token_id.clone() {
        Some(full::LlamaEosToks::Single(id)) => vec![id],
        Some(full::LlamaEosToks::Multiple(ids)) => ids,
        None => Vec::new(),
    };
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    // candle's Llama unwraps missing tensors: check every name first, for a clear error.
    let checked = crate::weights::CheckedWeights::open(layout)?;
    let mut expected = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !config.tie_word_embeddings {
        expected.push("lm_head.weight".into());
    }
    for i in 0..config.num_hidden_layers {
        for part in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            expected.push(format!("model.layers.{i}.{part}.weight"));
        }
    }
    if let Some(missing) = expected.iter().find(|n| checked.info(n).is_none()) {
        return Err(other(format!(
            "the safetensors weights have no `{missing}`, which a Llama with {} layers needs",
            config.num_hidden_layers
        )));
    }
    let started = Instant::now();
    let (network, source, tokenizer) = match isq::choice(dir, ctx.quantize())? {
        Some(quantize) => {
            let gguf = isq::quantize(&checked, &raw_config, quantize, ctx)?;
            drop(checked);
            let quantized_in = started.elapsed();
            let weights = quantized::ModelWeights::from_gguf_data(
                gguf.content,
                &gguf.data,
                device,
                context,
                Some(ctx),
            );
            let tokenizer = tokenizer()?;
            let weights =
                weights.map_err(|e| other(format!("{}={}: {e}", isq::ENV, quantize.0)))?;
            ctx.log(&format!(
                "llama: safetensors {} in {:.2}s; context {context} tokens; {}",
                if ctx.is_restore() {
                    format!("quantized to {} restored from the snapshot", quantize.0)
                } else {
                    format!(
                        "quantized to {} at load ({:.1} MB → {:.1} MB in {:.2}s)",
                        quantize.0,
                        gguf.source_bytes as f64 / 1e6,
                        gguf.quantized_bytes as f64 / 1e6,
                        quantized_in.as_secs_f64()
                    )
                },
                started.elapsed().as_secs_f64(),
                match weights.native_kernel() {
                    Some(kernel) => format!("runner's forward pass, {kernel:?} kernel"),
                    None => "candle's forward pass".to_string(),
                }
            ));
            let source = format!("safetensors quantized to {} at load", quantize.0);
            (Network::Quantized(weights), source, tokenizer)
        }
        None => {
            drop(checked);
            let vb = ctx.var_builder(layout, dtype, device)?;
            let model = full::Llama::load(vb, &config);
            let tokenizer = tokenizer()?;
            let model = model.map_err(other)?;
            ctx.log(&format!(
                "llama: safetensors ({dtype:?}) loaded in {:.2}s; context {context} tokens",
                started.elapsed().as_secs_f64()
            ));
            let network = Network::Full {
                model: Arc::new(model),
                config,
                dtype,
            };
            (network, format!("safetensors {dtype:?}"), tokenizer)
        }
    };
    Ok(Generator {
        network,
        stop_tokens: stop_tokens(&tokenizer, &declared),
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        context,
        device: device.clone(),
        source,
        prompt_cache: Default::default(),
        vocabulary: OnceLock::new(),
    })
}

type TokenizerJob = std::thread::JoinHandle<Result<Tokenizer, LoadError>>;

/// Tokenizers being read ahead of their loads, by path ([`prefetch`]).
static PREFETCHED_TOKENIZERS: std::sync::Mutex<Vec<(std::path::PathBuf, TokenizerJob)>> =
    std::sync::Mutex::new(Vec::new());

fn read_tokenizer(path: std::path::PathBuf) -> TokenizerJob {
    std::thread::spawn(move || {
        Tokenizer::from_file(&path).map_err(|e| other(format!("{}: {e}", path.display())))
    })
}

/// Starts reading a safetensors model's `tokenizer.json` on a thread, so that it is ready
/// when the load needs it: the engine calls this before it opens the device, whose setup
/// (CUDA's takes ~0.15 s) it then overlaps. GGUF models build theirs from the GGUF.
pub fn prefetch(dir: &ModelDir) {
    if !dir.weights.gguf.is_empty() {
        return;
    }
    if let Some(path) = dir.weights.file_named("tokenizer.json") {
        let job = read_tokenizer(path.to_path_buf());
        PREFETCHED_TOKENIZERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path.to_path_buf(), job));
    }
}

/// The read of `path` that [`prefetch`] started, or a new one.
fn take_prefetched_tokenizer(path: std::path::PathBuf) -> TokenizerJob {
    let mut prefetched = PREFETCHED_TOKENIZERS
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match prefetched.iter().position(|(p, _)| *p == path) {
        Some(i) => prefetched.swap_remove(i).1,
        None => read_tokenizer(path),
    }
}

struct LlamaModel(Arc<Generator>);

/// Text that may be streamed now: whole characters only, and never the start of a stop
/// sequence (it may complete with the next token). Returns the end of the safe text.
fn streamable_end(text: &str, stops: &[String]) -> usize {
    // A trailing U+FFFD is an incomplete UTF-8 sequence the next token completes.
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    let held = stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(move |&k| s.is_char_boundary(k))
                .map(move |k| &s[..k])
        })
        .filter(|prefix| text[..end].ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0);
    end -= held;
    end
}

fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
    if temperature <= 0.0 {
        return Sampling::ArgMax;
    }
    match (top_k > 0, top_p < 1.0) {
        (true, true) => Sampling::TopKThenTopP {
            k: top_k,
            p: top_p,
            temperature,
        },
        (true, false) => Sampling::TopK {
            k: top_k,
            temperature,
        },
        (false, true) => Sampling::TopP {
            p: top_p,
            temperature,
        },
        (false, false) => Sampling::All { temperature },
    }
}

/// OpenAI's adjustments of the logits: penalties on the tokens the output already holds,
/// and fixed biases per token id.
#[derive(Debug, Default, PartialEq)]
struct LogitAdjustments {
    presence: f32,
    frequency: f32,
    bias: Vec<(u32, f32)>,
    /// How often each token occurs in the output so far.
    counts: std::collections::HashMap<u32, u32>,
}

impl LogitAdjustments {
    fn of(input: &Map<String, Value>, vocabulary: usize) -> Result<Self, PredictError> {
        let number = |k: &str| input.get(k).and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let bias = match input
            .get("logit_bias")
            .and_then(Value::as_str)
            .map(str::trim)
        {
            None | Some("") => Vec::new(),
            Some(text) => parse_logit_bias(text, vocabulary).map_err(PredictError::Failed)?,
        };
        Ok(Self {
            presence: number("presence_penalty"),
            frequency: number("frequency_penalty"),
            bias,
            counts: Default::default(),
        })
    }

    fn is_empty(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.bias.is_empty()
    }

    /// Counts a generated token for the penalties.
    fn generated(&mut self, token: u32) {
        if self.presence != 0.0 || self.frequency != 0.0 {
            *self.counts.entry(token).or_default() += 1;
        }
    }

    /// The logits less each penalty for the tokens the output holds, plus the biases.
    fn apply(&self, logits: &Tensor) -> Result<Tensor, PredictError> {
        let mut values = logits.to_vec1::<f32>()?;
        for (&token, &count) in &self.counts {
            if let Some(v) = values.get_mut(token as usize) {
                *v -= self.presence + self.frequency * count as f32;
            }
        }
        for &(token, bias) in &self.bias {
            if let Some(v) = values.get_mut(token as usize) {
                *v += bias;
            }
        }
        Ok(Tensor::new(values, &Device::Cpu)?)
    }
}

/// `logit_bias` as text: a JSON object of token ids (as strings, OpenAI's form) to biases
/// from -100 to 100; ids must be below `vocabulary`.
pub fn parse_logit_bias(text: &str, vocabulary: usize) -> Result<Vec<(u32, f32)>, String> {
    let map: Map<String, Value> = serde_json::from_str(text).map_err(|e| {
        format!("logit_bias is not a JSON object ({e}); give token ids and biases, e.g. {{\"1234\": -100}}")
    })?;
    map.iter()
        .map(|(key, bias)| {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocabulary)
                .ok_or_else(|| {
                    format!(
                        "logit_bias: `{key}` is not a token id of this model (0 to {})",
                        vocabulary.saturating_sub(1)
                    )
                })?;
            let bias = bias
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    format!("logit_bias: the bias of token {key} must be a number from -100 to 100")
                })?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// One generated token's entry in the `logprobs` metric, in OpenAI's shape: the token (its
/// text, lossy where it ends inside a character, and its exact bytes), its log
/// probability under `logits`, and the `top` most likely tokens with theirs.
fn token_logprobs(logits: &[f32], chosen: u32, top: usize, vocabulary: &Vocabulary) -> Value {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let entry = |id: u32| {
        let bytes = vocabulary.bytes(id).unwrap_or_default();
        json!({
            "token": String::from_utf8_lossy(bytes),
            "logprob": logits.get(id as usize).map_or(f64::NEG_INFINITY, |&l| l as f64 - log_sum),
            "bytes": bytes,
        })
    };
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let mut best: Vec<u32> = Vec::new();
    if top > 0 {
        best = (0..logits.len() as u32).collect();
        let top = top.min(best.len());
        if top < best.len() {
            best.select_nth_unstable_by(top - 1, by_logit);
        }
        best.truncate(top);
        best.sort_by(by_logit);
    }
    let mut chosen_entry = entry(chosen);
    chosen_entry["top_logprobs"] = best.into_iter().map(entry).collect();
    chosen_entry
}

/// Samples a token the constraint allows: the sampler's own choice when it is allowed (the
/// usual case, and exactly the masked choice for greedy decoding), else a second draw from
/// the logits with every disallowed token masked out.
/// `masked` counts the second draws and the seconds their masks took, for the log.
fn constrained_sample(
    sampler: &mut LogitsProcessor,
    logits: &Tensor,
    constraint: &Constraint,
    masked: &mut (u32, f64),
) -> Result<u32, PredictError> {
    let first = sampler.sample(logits)?;
    if constraint.allows(first) {
        return Ok(first);
    }
    let started = Instant::now();
    let mut values = logits.to_vec1::<f32>()?;
    let allowed = constraint.mask(values.len());
    let mut any = false;
    for (value, ok) in values.iter_mut().zip(&allowed) {
        if *ok {
            any = true;
        } else {
            *value = f32::NEG_INFINITY;
        }
    }
    if !any {
        return Err(PredictError::Failed(
            "structured output: no token of the vocabulary can continue the JSON here".into(),
        ));
    }
    masked.0 += 1;
    masked.1 += started.elapsed().as_secs_f64();
    Ok(sampler.sample(&Tensor::new(values, &Device::Cpu)?)?)
}

impl Model for LlamaModel {
    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError> {
        let g = &self.0;
        let text = |k: &str| input.get(k).and_then(Value::as_str).unwrap_or("");
        let number = |k: &str, d: f64| input.get(k).and_then(Value::as_f64).unwrap_or(d);
        let chat = input
            .get("use_chat_template")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        if chat && g.chat_template.is_none() {
            ctx.log("llama: the model has no chat template; using the prompt as it is");
        }
        let prompt = g.render_prompt(text("prompt"), text("system_prompt"), chat)?;
        let prompt_ids = g.encode(&prompt)?;
        if prompt_ids.is_empty() {
            return Err(PredictError::Failed(
                "the prompt is empty; give some text to continue".into(),
            ));
        }
        if prompt_ids.len() >= g.context {
            return Err(PredictError::Failed(format!(
                "the prompt is {} tokens; the model's context holds {} tokens for prompt and output together; shorten the prompt",
                prompt_ids.len(),
                g.context
            )));
        }
        let asked = number("max_new_tokens", 256.0).max(1.0) as usize;
        let max_new = asked.min(g.context - prompt_ids.len());
        if max_new < asked {
            ctx.log(&format!(
                "llama: max_new_tokens {asked} capped at {max_new}: the prompt's {} tokens leave that much of the {}-token context",
                prompt_ids.len(),
                g.context
            ));
        }
        let seed = match input.get("seed").and_then(Value::as_u64) {
            Some(s) => s,
            None => {
                let s = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                if number("temperature", 0.7) > 0.0 {
                    ctx.log(&format!("llama: using seed {s}"));
                }
                s
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(
            seed,
            sampling(
                number("temperature", 0.7),
                number("top_k", 50.0).max(0.0) as usize,
                number("top_p", 0.9),
            ),
        );
        let penalty = number("repetition_penalty", 1.0) as f32;
        let top_logprobs = number("top_logprobs", 0.0).max(0.0) as usize;
        let logprobs = match input.get("logprobs").and_then(Value::as_bool) == Some(true)
            || top_logprobs > 0
        {
            true => Some(g.vocabulary()?),
            false => None,
        };
        let mut adjust = LogitAdjustments::of(input, g.tokenizer.get_vocab_size(true))?;
        let mut masked = (0u32, 0f64);
        let mut constraint = match text("json_schema").trim() {
            "" => None,
            schema => Some(g.json_constraint(schema)?),
        };
        let stops: Vec<String> = input
            .get("stop")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();

        let started = Instant::now();
        // A session that already holds the start of this prompt, if a recent one does.
        let reused = match &g.network {
            Network::Quantized(quantized::ModelWeights::Native(_)) => {
                g.prompt_cache.take(&prompt_ids)
            }
            _ => None,
        };
        let (mut session, cached) = match reused {
            Some((m, n)) => (Session::Quantized(quantized::ModelWeights::Native(m)), n),
            None => (g.session()?, 0),
        };
        ctx.check_canceled()?;
        let mut logits = session.step(&prompt_ids[cached..], cached, &g.device)?;
        let prompt_seconds = started.elapsed().as_secs_f64();
        let mut all_tokens = prompt_ids.clone();
        // Tokens since the last point where all decoded text was streamed; only they are
        // decoded at each step (decoding everything each token is quadratic in the output).
        let mut pending: Vec<u32> = Vec::new();
        let mut generated = 0usize;
        let mut emitted = 0usize;
        let mut first_token_at = None;
        let mut finish = "length";
        for i in 0..max_new {
            ctx.check_canceled()?;
            // The model's own distribution, before penalties, temperature and masks.
            let raw = match logprobs {
                Some(_) => Some(logits.to_vec1::<f32>()?),
                None => None,
            };
            if penalty != 1.0 {
                let start = all_tokens.len().saturating_sub(REPEAT_WINDOW);
                logits = candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    penalty,
                    &all_tokens[start..],
                )?;
            }
            if !adjust.is_empty() {
                logits = adjust.apply(&logits)?;
            }
            let next = match &constraint {
                None => sampler.sample(&logits)?,
                Some(c) => constrained_sample(&mut sampler, &logits, c, &mut masked)?,
            };
            first_token_at.get_or_insert_with(|| started.elapsed().as_secs_f64());
            if g.stop_tokens.contains(&next) {
                finish = "stop token";
                break;
            }
            generated += 1;
            if let (Some(vocabulary), Some(raw)) = (&logprobs, &raw) {
                ctx.record_metric(
                    "logprobs",
                    token_logprobs(raw, next, top_logprobs, vocabulary),
                    MetricMode::Append,
                );
            }
            pending.push(next);
            all_tokens.push(next);
            adjust.generated(next);
            if let Some(c) = &mut constraint {
                c.advance(next);
            }
            let text = g
                .tokenizer
                .decode(&pending, true)
                .map_err(|e| PredictError::Failed(format!("decoding tokens: {e}")))?;
            if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                if at > emitted {
                    ctx.emit_output(Value::String(text[emitted..at].to_string()));
                }
                emitted = text.len();
                finish = "stop sequence";
                break;
            }
            let end = streamable_end(&text, &stops);
            if end > emitted {
                ctx.emit_output(Value::String(text[emitted..end].to_string()));
                emitted = end;
            }
            if constraint.as_ref().is_some_and(Constraint::is_done) {
                // The JSON is whole: nothing may follow it but the end.
                if text.len() > emitted {
                    ctx.emit_output(Value::String(text[emitted..].to_string()));
                }
                pending.clear();
                emitted = 0;
                finish = "complete JSON";
                break;
            }
            if emitted == text.len() {
                // Nothing held back: the next token starts on a character boundary and no
                // stop sequence can have begun.
                pending.clear();
                emitted = 0;
            }
            if i + 1 < max_new {
                logits = session.step(&[next], all_tokens.len() - 1, &g.device)?;
            }
        }
        if finish != "stop sequence" {
            // Whatever was held back (a partial stop sequence that never completed).
            let text = g
                .tokenizer
                .decode(&pending, true)
                .map_err(|e| PredictError::Failed(format!("decoding tokens: {e}")))?;
            if text.len() > emitted {
                ctx.emit_output(Value::String(text[emitted..].to_string()));
            }
        }
        let total = started.elapsed().as_secs_f64();
        let decode_seconds = (total - prompt_seconds).max(1e-9);
        ctx.record_metric(
            "input_token_count",
            json!(prompt_ids.len()),
            MetricMode::Replace,
        );
        ctx.record_metric("output_token_count", json!(generated), MetricMode::Replace);
        if let Some(t) = first_token_at {
            ctx.record_metric("time_to_first_token", json!(t), MetricMode::Replace);
        }
        ctx.record_metric(
            "tokens_per_second",
            json!(generated as f64 / decode_seconds),
            MetricMode::Replace,
        );
        if cached > 0 {
            ctx.record_metric(
                "cached_input_token_count",
                json!(cached),
                MetricMode::Replace,
            );
        }
        ctx.log(&format!(
            "llama: {} prompt tokens{} in {prompt_seconds:.3}s, {} new tokens in {decode_seconds:.3}s ({}{}); {}",
            prompt_ids.len(),
            if cached > 0 {
                format!(" ({cached} of them reused from the prompt cache)")
            } else {
                String::new()
            },
            generated,
            finish,
            match constraint {
                Some(_) => format!(
                    "; JSON Schema: {} tokens drawn again from the masked vocabulary, masks {:.3}s",
                    masked.0, masked.1
                ),
                None => String::new(),
            },
            g.source
        ));
        // What this session holds now serves later prompts that start the same way.
        if let Session::Quantized(quantized::ModelWeights::Native(m)) = session {
            let held = m.positions().min(all_tokens.len());
            g.prompt_cache.put(all_tokens[..held].to_vec(), m);
        }
        Ok(Value::Null)
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> Option<Result<String, PredictError>> {
        Some(self.0.render_chat(messages))
    }

    fn count_tokens(&self, text: &str) -> Option<Result<usize, PredictError>> {
        Some(self.0.encode(text).map(|ids| ids.len()))
    }

    fn context_length(&self) -> Option<usize> {
        Some(self.0.context)
    }

    fn vocabulary_size(&self) -> Option<usize> {
        Some(self.0.tokenizer.get_vocab_size(true))
    }

    fn warm_up(&self) -> Result<(), PredictError> {
        let ids = self.0.encode("Hello")?;
        // On the CPU one forward pass touches every weight and runs the same kernels a
        // generation step does; on a GPU a step with a filled KV cache loads kernels of its
        // own (concatenation into the cache), so it runs once too.
        let tokens = if self.0.device.is_cpu() { 1 } else { 2 };
        self.0.greedy(&ids, tokens).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_characters_and_no_stop_prefix_are_streamed() {
        let stops = vec!["###".to_string(), "END".to_string()];
        assert_eq!(streamable_end("hello", &stops), 5);
        assert_eq!(streamable_end("hello #", &stops), 6);
        assert_eq!(streamable_end("hello ##", &stops), 6);
        assert_eq!(streamable_end("hello EN", &stops), 6);
        assert_eq!(streamable_end("caf\u{FFFD}", &[]), 3);
        assert_eq!(streamable_end("caf\u{FFFD}\u{FFFD}", &stops), 3);
    }

    #[test]
    fn temperature_zero_is_greedy() {
        assert!(matches!(sampling(0.0, 50, 0.9), Sampling::ArgMax));
        assert!(matches!(
            sampling(0.7, 50, 0.9),
            Sampling::TopKThenTopP { k: 50, .. }
        ));
        assert!(matches!(sampling(0.7, 0, 1.0), Sampling::All { .. }));
    }

    #[test]
    fn the_positioned_reader_reads_and_seeks_as_the_file_does() {
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut expected = std::io::Cursor::new(bytes.clone());
        let mut reader = PositionedReader::new(std::io::Cursor::new(bytes));
        let steps = [
            SeekFrom::Current(0),
            SeekFrom::Current(3),
            SeekFrom::Current(-2),
            SeekFrom::Current(70_000), // past the buffer
            SeekFrom::Start(5),
            SeekFrom::End(-10),
            SeekFrom::Current(0),
        ];
        for step in steps {
            let mut want = [0u8; 7];
            let mut got = [0u8; 7];
            let n = expected.read(&mut want).unwrap();
            assert_eq!(reader.read(&mut got).unwrap(), n);
            assert_eq!(got[..n], want[..n]);
            assert_eq!(reader.stream_position().unwrap(), expected.position());
            assert_eq!(reader.seek(step).unwrap(), expected.seek(step).unwrap());
        }
        assert!(reader.seek(SeekFrom::Current(-1_000_000)).is_err());
    }
}
