//! `candle:bert`: sentence embeddings from a BERT encoder, the way sentence-transformers
//! computes them: tokenizer.json → BertModel → pooling over the attention mask (mean, or
//! CLS when `1_Pooling/config.json` says so) → optional L2 normalisation.
//!
//! Needs `config.json`, `tokenizer.json` and safetensors weights among the weight files;
//! reads `sentence_bert_config.json` (max sequence length) and `1_Pooling/config.json` when
//! present. Tested against sentence-transformers' vectors for all-MiniLM-L6-v2.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use runner_spec::{FieldType, InputField, ModelDir, OutputType, Primitive, Signature};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use crate::bert_cpu::CpuBert;
use crate::weights::{read_json_config, CheckedWeights, WeightsError};
use crate::{
    json as fjson, Architecture, BatchItem, LoadContext, LoadError, Model, PredictContext,
    PredictError,
};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "bert",
    summary: "sentence embeddings from a BERT encoder (e.g. all-MiniLM-L6-v2), sentence-transformers style",
    signature,
    load,
    dtype_policy: "f32",
    example_input: |_| serde_json::json!({"text": "runner warms up"}),
    batching: true,
    needs_weights: true,
    openai: crate::OpenAi::Embeddings,
};

/// Texts per forward pass on accelerators (padded to the group's longest): bounds memory.
const BATCH: usize = 32;
/// Tokens per forward pass of the CPU encoder (unpadded): big enough for efficient matrix
/// products, small enough that activations stay a few tens of MB.
const TOKEN_BUDGET: usize = 4096;
/// Texts per request.
const MAX_TEXTS: usize = 1024;

pub fn signature() -> Signature {
    Signature {
        inputs: vec![
            InputField::new("text", FieldType::Union(vec![FieldType::Prim(Primitive::Str), FieldType::List(Primitive::Str)]))
                .description("Text to embed, or a list of texts (one embedding each, in order)"),
            InputField::prim("normalize", Primitive::Bool)
                .default(json!(true))
                .description("Scale each embedding to unit length (L2), as sentence-transformers' Normalize module does"),
        ],
        // One vector for a text, a list of vectors for a list: Cog types that as Any.
        output: OutputType::Prim(Primitive::Any),
        streaming: false,
    }
}

#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pooling {
    Mean,
    Cls,
}

/// The encoder: candle's BertModel on accelerators, runner's own loop on the CPU
/// ([`CpuBert`], several times faster there on short texts).
enum Encoder {
    Candle(BertModel),
    Cpu(CpuBert),
}

pub struct Bert {
    encoder: Encoder,
    tokenizer: Tokenizer,
    pooling: Pooling,
    pad_id: u32,
    device: Device,
}

fn load(dir: &ModelDir, device: &Device, ctx: &LoadContext) -> Result<Box<dyn Model>, LoadError> {
    let (config_path, config): (_, Config) = read_json_config(&dir.weights, "config.json", "bert")?;
    ctx.log(&format!(
        "config: {} ({} layers, hidden {})",
        config_path.display(),
        config.num_hidden_layers,
        config.hidden_size
    ));
    // tokenizer.json takes a good part of a restore to parse: on its own thread, while the
    // weights load.
    let (tokenizer, encoder) = std::thread::scope(|scope| {
        let tokenizer = scope.spawn(|| tokenizer_for(dir, &config));
        let encoder = load_encoder(dir, &config, device, ctx);
        let tokenizer = tokenizer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (tokenizer, encoder)
    });
    let (tokenizer, max_len) = tokenizer?;
    let encoder = encoder?;
    let pooling = pooling_of(dir)?;
    ctx.log(&format!(
        "max sequence length {max_len}, {pooling:?} pooling"
    ));
    Ok(Box::new(Bert {
        encoder,
        tokenizer,
        pooling,
        pad_id: config.pad_token_id as u32,
        device: device.clone(),
    }))
}

/// The model's tokenizer, truncating to its maximum sequence length (also returned).
fn tokenizer_for(dir: &ModelDir, config: &Config) -> Result<(Tokenizer, usize), LoadError> {
    let layout = &dir.weights;
    let tokenizer_path = layout.file_named("tokenizer.json").ok_or_else(|| {
        WeightsError::Missing("tokenizer.json not found among the weights files; candle:bert needs it beside config.json".into())
    })?;
    let mut tokenizer = Tokenizer::from_file(tokenizer_path).map_err(|e| WeightsError::File {
        file: tokenizer_path.to_path_buf(),
        message: format!("not a usable tokenizer.json: {e}"),
    })?;
    let max_len = match layout.file_named("sentence_bert_config.json") {
        Some(_) => {
            read_json_config::<SentenceBertConfig>(layout, "sentence_bert_config.json", "bert")?
                .1
                .max_seq_length
        }
        None => None,
    }
    .unwrap_or(config.max_position_embeddings)
    .min(config.max_position_embeddings);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| LoadError::Other(format!("tokenizer truncation: {e}")))?;
    // Padding is done per forward pass in `embed_pooled`, to that group's longest text.
    tokenizer.with_padding(None);
    Ok((tokenizer, max_len))
}

fn load_encoder(
    dir: &ModelDir,
    config: &Config,
    device: &Device,
    ctx: &LoadContext,
) -> Result<Encoder, LoadError> {
    let layout = &dir.weights;
    if !ctx.is_restore() {
        let weights = CheckedWeights::open(layout)?;
        ctx.log(&format!(
            "weights: {}",
            weights
                .files()
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let vb = ctx.var_builder(layout, DType::F32, device)?;
    Ok(if device.is_cpu() {
        Encoder::Cpu(
            CpuBert::load(vb, config, ctx)
                .map_err(|e| LoadError::Other(format!("loading BERT weights: {e}")))?,
        )
    } else {
        Encoder::Candle(
            BertModel::load(vb, config)
                .map_err(|e| LoadError::Other(format!("loading BERT weights: {e}")))?,
        )
    })
}

fn pooling_of(dir: &ModelDir) -> Result<Pooling, LoadError> {
    let Some(path) = dir
        .weights
        .files
        .iter()
        .find(|p| p.ends_with("1_Pooling/config.json"))
    else {
        return Ok(Pooling::Mean);
    };
    let text = std::fs::read_to_string(path).map_err(|e| WeightsError::File {
        file: path.clone(),
        message: e.to_string(),
    })?;
    let c: PoolingConfig = serde_json::from_str(&text).map_err(|e| WeightsError::File {
        file: path.clone(),
        message: format!("invalid pooling config: {e}"),
    })?;
    match (
        c.pooling_mode_mean_tokens,
        c.pooling_mode_cls_token,
        c.pooling_mode_max_tokens || c.pooling_mode_mean_sqrt_len_tokens,
    ) {
        (true, false, false) => Ok(Pooling::Mean),
        (false, true, false) => Ok(Pooling::Cls),
        _ => Err(LoadError::Other(format!(
            "{}: only mean or CLS pooling is supported by candle:bert",
            path.display()
        ))),
    }
}

impl Bert {
    /// Embeds texts; one vector per text, in order. Texts are tokenized one by one, sorted
    /// by length and run `BATCH` at a time, each group padded only to its own longest
    /// text: padding is masked out of attention and pooling, so a text's vector does not
    /// depend on the texts it shares a forward pass with (up to float rounding).
    pub fn embed(&self, texts: &[String], normalize: bool) -> Result<Vec<Vec<f32>>, PredictError> {
        let (mut vectors, _) = self.embed_pooled(texts)?;
        if normalize {
            vectors.iter_mut().for_each(|v| l2_normalize(v));
        }
        Ok(vectors)
    }

    /// Pooled, unnormalised vectors, in the order of `texts`, and each text's token count
    /// (special tokens included, after truncation).
    fn embed_pooled(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, Vec<usize>), PredictError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| PredictError::Failed(format!("tokenizer: {e}")))?;
        let tokens = encodings.iter().map(|e| e.get_ids().len()).collect();
        let vectors = match &self.encoder {
            Encoder::Cpu(cpu) => self.pooled_on_cpu(cpu, &encodings),
            Encoder::Candle(model) => self.pooled_with_candle(model, &encodings),
        }?;
        Ok((vectors, tokens))
    }

    /// No padding: texts go end to end, up to a token budget per forward pass.
    fn pooled_on_cpu(
        &self,
        cpu: &CpuBert,
        encodings: &[Encoding],
    ) -> Result<Vec<Vec<f32>>, PredictError> {
        let h = cpu.hidden_size();
        let mut out = Vec::with_capacity(encodings.len());
        let mut start = 0;
        while start < encodings.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < encodings.len()
                && (end == start || tokens + encodings[end].get_ids().len() <= TOKEN_BUDGET)
            {
                tokens += encodings[end].get_ids().len();
                end += 1;
            }
            let group = &encodings[start..end];
            let lengths: Vec<usize> = group.iter().map(|e| e.get_ids().len()).collect();
            let ids: Vec<u32> = group
                .iter()
                .flat_map(|e| e.get_ids().iter().copied())
                .collect();
            let hidden = cpu.forward(&ids, &lengths).map_err(PredictError::Failed)?;
            let mut first = 0;
            for len in lengths {
                out.push(pool_tokens(
                    &hidden[first * h..(first + len) * h],
                    h,
                    self.pooling,
                ));
                first += len;
            }
            start = end;
        }
        Ok(out)
    }

    /// Length-sorted groups of `BATCH`, each padded to its longest text and masked.
    fn pooled_with_candle(
        &self,
        model: &BertModel,
        encodings: &[Encoding],
    ) -> Result<Vec<Vec<f32>>, PredictError> {
        let mut out = vec![Vec::new(); encodings.len()];
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        for group in order.chunks(BATCH) {
            let longest = group
                .iter()
                .map(|&i| encodings[i].get_ids().len())
                .max()
                .unwrap_or(0);
            let mut ids = Vec::with_capacity(group.len() * longest);
            let mut mask = Vec::with_capacity(group.len() * longest);
            for &i in group {
                let own = encodings[i].get_ids();
                ids.extend_from_slice(own);
                ids.resize(ids.len() + longest - own.len(), self.pad_id);
                mask.extend(std::iter::repeat_n(1u32, own.len()));
                mask.resize(mask.len() + longest - own.len(), 0);
            }
            let input_ids = Tensor::from_vec(ids, (group.len(), longest), &self.device)?;
            let attention_mask = Tensor::from_vec(mask, (group.len(), longest), &self.device)?;
            let token_type_ids = input_ids.zeros_like()?;
            let hidden = model.forward(&input_ids, &token_type_ids, Some(&attention_mask))?;
            let pooled = match self.pooling {
                Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
                Pooling::Mean => {
                    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                    let counts = mask.sum(1)?.clamp(1e-9, f32::MAX as f64)?;
                    summed.broadcast_div(&counts)?
                }
            };
            for (&i, vector) in group.iter().zip(pooled.to_vec2::<f32>()?) {
                out[i] = vector;
            }
        }
        Ok(out)
    }
}

/// Pools one sequence's hidden states (its tokens' rows, `h` wide): the mean over its
/// tokens, or its first ([CLS]) token.
fn pool_tokens(rows: &[f32], h: usize, pooling: Pooling) -> Vec<f32> {
    match pooling {
        Pooling::Cls => rows[..h].to_vec(),
        Pooling::Mean => {
            let n = (rows.len() / h).max(1);
            let mut sum = vec![0f32; h];
            for row in rows.chunks_exact(h) {
                sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sum.iter_mut().for_each(|s| *s /= n as f32);
            sum
        }
    }
}

/// Scales a vector to unit length, as sentence-transformers' Normalize module does
/// (torch.nn.functional.normalize: the norm is clamped at 1e-12).
fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// A request's texts and options, checked.
struct EmbedRequest {
    texts: Vec<String>,
    single: bool,
    normalize: bool,
}

fn parse_request(input: &Map<String, Value>) -> Result<EmbedRequest, PredictError> {
    let normalize = input
        .get("normalize")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let (texts, single) = match input.get("text") {
        Some(Value::String(s)) => (vec![s.clone()], true),
        Some(Value::Array(items)) => (
            items
                .iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>(),
            false,
        ),
        _ => {
            return Err(PredictError::Failed(
                "`text` must be a string or a list of strings".into(),
            ))
        }
    };
    if texts.len() > MAX_TEXTS {
        return Err(PredictError::Failed(format!(
            "{} texts in one request; the limit is {MAX_TEXTS}, send them in several requests",
            texts.len()
        )));
    }
    Ok(EmbedRequest {
        texts,
        single,
        normalize,
    })
}

fn output_of(request: &EmbedRequest, vectors: &[Vec<f32>]) -> Value {
    if request.single {
        fjson::f32_array(&vectors[0])
    } else {
        Value::Array(vectors.iter().map(|v| fjson::f32_array(v)).collect())
    }
}

impl Model for Bert {
    fn warm_up(&self) -> Result<(), PredictError> {
        self.embed(&["warm up".to_string()], true).map(|_| ())
    }

    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError> {
        let request = parse_request(input)?;
        ctx.check_canceled()?;
        let (mut vectors, tokens) = self.embed_pooled(&request.texts)?;
        if request.normalize {
            vectors.iter_mut().for_each(|v| l2_normalize(v));
        }
        ctx.record_metric(
            "input_token_count",
            Value::from(tokens.iter().sum::<usize>()),
            crate::MetricMode::Replace,
        );
        ctx.log(&format!(
            "embedded {} text(s) into {} dimensions",
            request.texts.len(),
            vectors.first().map_or(0, Vec::len)
        ));
        Ok(output_of(&request, &vectors))
    }

    /// All the batch's texts go through [`Bert::embed_pooled`] together; each prediction
    /// gets back exactly its own vectors, normalised as it asked.
    fn predict_batch(&self, batch: &[BatchItem<'_>]) -> Vec<Result<Value, PredictError>> {
        let requests: Vec<Result<EmbedRequest, PredictError>> = batch
            .iter()
            .map(|item| {
                let request = parse_request(item.input)?;
                item.ctx.check_canceled()?;
                Ok(request)
            })
            .collect();
        let all_texts: Vec<String> = requests
            .iter()
            .flatten()
            .flat_map(|r| r.texts.iter().cloned())
            .collect();
        let (pooled, tokens) = match self.embed_pooled(&all_texts) {
            Ok(p) => p,
            Err(e) => {
                let message = match e {
                    PredictError::Failed(m) => m,
                    PredictError::Canceled => "canceled".into(),
                };
                return requests
                    .into_iter()
                    .map(|r| r.and(Err(PredictError::Failed(message.clone()))))
                    .collect();
            }
        };
        let mut vectors = pooled.into_iter();
        let mut token_counts = tokens.into_iter();
        requests
            .into_iter()
            .zip(batch)
            .map(|(request, item)| {
                let request = request?;
                let mut own: Vec<Vec<f32>> = vectors.by_ref().take(request.texts.len()).collect();
                let own_tokens: usize = token_counts.by_ref().take(request.texts.len()).sum();
                item.ctx.record_metric(
                    "input_token_count",
                    Value::from(own_tokens),
                    crate::MetricMode::Replace,
                );
                if request.normalize {
                    own.iter_mut().for_each(|v| l2_normalize(v));
                }
                item.ctx.log(&format!(
                    "embedded {} text(s) into {} dimensions, in a batch of {} prediction(s) ({} texts)",
                    request.texts.len(),
                    own.first().map_or(0, Vec::len),
                    batch.len(),
                    all_texts.len()
                ));
                item.ctx.record_metric(
                    "batch_size",
                    Value::from(batch.len()),
                    crate::MetricMode::Replace,
                );
                Ok(output_of(&request, &own))
            })
            .collect()
    }
}
