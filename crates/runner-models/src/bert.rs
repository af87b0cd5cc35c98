//! `candle:bert`: sentence embeddings from a BERT encoder, the way sentence-transformers
//! computes them: tokenizer.json → BertModel → pooling over the attention mask (mean, or
//! CLS when `1_Pooling/config.json` says so) → optional L2 normalisation.
//!
//! Needs `config.json`, `tokenizer.json` and safetensors weights among the weight files;
//! reads `sentence_bert_config.json` (max sequence length) and `1_Pooling/config.json` when
//! present. Tested against sentence-transformers' vectors for all-MiniLM-L6-v2.

use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::bert::{BertModel, Config};
use runner_spec::{FieldType, InputField, ModelDir, OutputType, Primitive, Signature};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::weights::{read_json_config, CheckedWeights, WeightsError};
use crate::{
    json as fjson, Architecture, LoadContext, LoadError, Model, PredictContext, PredictError,
};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "bert",
    summary: "sentence embeddings from a BERT encoder (e.g. all-MiniLM-L6-v2), sentence-transformers style",
    signature,
    load,
    dtype_policy: "f32",
    example_input: |_| serde_json::json!({"text": "runner warms up"}),
};

/// Texts per forward pass: bounds memory for long lists.
const BATCH: usize = 32;
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

pub struct Bert {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    device: Device,
}

fn load(dir: &ModelDir, device: &Device, ctx: &LoadContext) -> Result<Box<dyn Model>, LoadError> {
    let layout = &dir.weights;
    let (config_path, config): (_, Config) = read_json_config(layout, "config.json", "bert")?;
    ctx.log(&format!(
        "config: {} ({} layers, hidden {})",
        config_path.display(),
        config.num_hidden_layers,
        config.hidden_size
    ));

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
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_id: config.pad_token_id as u32,
        ..Default::default()
    }));

    let pooling = pooling_of(dir)?;
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
    let model = BertModel::load(vb, &config)
        .map_err(|e| LoadError::Other(format!("loading BERT weights: {e}")))?;
    ctx.log(&format!(
        "max sequence length {max_len}, {pooling:?} pooling"
    ));
    Ok(Box::new(Bert {
        model,
        tokenizer,
        pooling,
        device: device.clone(),
    }))
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
    /// Embeds texts; one vector per text, in order.
    pub fn embed(&self, texts: &[String], normalize: bool) -> Result<Vec<Vec<f32>>, PredictError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(BATCH) {
            let encodings = self
                .tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| PredictError::Failed(format!("tokenizer: {e}")))?;
            let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
            let mask: Vec<Vec<u32>> = encodings
                .iter()
                .map(|e| e.get_attention_mask().to_vec())
                .collect();
            let input_ids = Tensor::new(ids, &self.device)?;
            let attention_mask = Tensor::new(mask, &self.device)?;
            let token_type_ids = input_ids.zeros_like()?;
            let hidden = self
                .model
                .forward(&input_ids, &token_type_ids, Some(&attention_mask))?;
            let pooled = match self.pooling {
                Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
                Pooling::Mean => {
                    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                    let counts = mask.sum(1)?.clamp(1e-9, f32::MAX as f64)?;
                    summed.broadcast_div(&counts)?
                }
            };
            let pooled = if normalize {
                let norms = pooled
                    .sqr()?
                    .sum_keepdim(D::Minus1)?
                    .sqrt()?
                    .clamp(1e-12, f32::MAX as f64)?;
                pooled.broadcast_div(&norms)?
            } else {
                pooled
            };
            out.extend(pooled.to_vec2::<f32>()?);
        }
        Ok(out)
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
        ctx.check_canceled()?;
        let vectors = self.embed(&texts, normalize)?;
        ctx.log(&format!(
            "embedded {} text(s) into {} dimensions",
            texts.len(),
            vectors.first().map_or(0, Vec::len)
        ));
        Ok(if single {
            fjson::f32_array(&vectors[0])
        } else {
            Value::Array(vectors.iter().map(|v| fjson::f32_array(v)).collect())
        })
    }
}
