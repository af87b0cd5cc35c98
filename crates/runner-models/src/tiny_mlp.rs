//! `candle:tiny-mlp`: a two-layer perceptron (`fc2(relu(fc1(x)))`) whose weights runner
//! generates deterministically, so the whole weight path (cog.yaml `weights:`, safetensors
//! checks, candle load, predict) is testable in milliseconds without downloads.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use runner_spec::{InputField, ModelDir, OutputType, Primitive, Signature};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::weights::{read_json_config, write_f32_safetensors, WeightsError};
use crate::{
    json as fjson, Architecture, LoadContext, LoadError, Model, PredictContext, PredictError,
};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "tiny-mlp",
    summary: "a generated two-layer perceptron for fast tests of the weight path",
    signature,
    load,
    dtype_policy: "config.json dtype (default f32)",
    example_input: |dir| {
        let config = read_json_config::<TinyMlpConfig>(&dir.weights, "config.json", "tiny-mlp")
            .map(|(_, c)| c)
            .unwrap_or_default();
        example_input(&config)
    },
    batching: false,
    needs_weights: true,
    openai: crate::OpenAi::None,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TinyMlpConfig {
    pub input_size: usize,
    pub hidden_size: usize,
    pub output_size: usize,
    /// Hidden-to-hidden layers between fc1 and fc2 (`hidden.N.weight`, `hidden.N.bias`):
    /// the knob that makes a large model for load benchmarks.
    #[serde(default)]
    pub layers: usize,
    /// The dtype the model computes in; f32 weights are converted to it at load (real
    /// load-time work that a snapshot saves).
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_dtype() -> String {
    "f32".into()
}

impl Default for TinyMlpConfig {
    /// About 2.3 MB of f32 weights.
    fn default() -> Self {
        TinyMlpConfig {
            input_size: 128,
            hidden_size: 4096,
            output_size: 16,
            layers: 0,
            dtype: default_dtype(),
        }
    }
}

impl TinyMlpConfig {
    pub fn compute_dtype(&self) -> Result<DType, String> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            other => Err(format!(
                "dtype {other:?} in config.json: use f32, bf16 or f16"
            )),
        }
    }
    /// Parameters, all layers together.
    pub fn parameters(&self) -> usize {
        let (i, h, o) = (self.input_size, self.hidden_size, self.output_size);
        h * i + h + self.layers * (h * h + h) + o * h + o
    }
}

pub fn signature() -> Signature {
    Signature {
        inputs: vec![InputField::list("vector", Primitive::Float)
            .description("Input vector; its length must be the model's input_size (config.json)")],
        output: OutputType::List(Box::new(OutputType::Prim(Primitive::Float))),
        streaming: false,
    }
}

/// The weights of a generated model, row-major: `fc1.weight` is `[hidden, input]`.
pub struct TinyMlpWeights {
    pub fc1_weight: Vec<f32>,
    pub fc1_bias: Vec<f32>,
    /// `(weight [hidden, hidden], bias [hidden])` of each hidden layer.
    pub hidden: Vec<(Vec<f32>, Vec<f32>)>,
    pub fc2_weight: Vec<f32>,
    pub fc2_bias: Vec<f32>,
}

/// Deterministic weights for `seed`: uniform in ±1/sqrt(fan_in), from SplitMix64.
pub fn generate_weights(config: &TinyMlpConfig, seed: u64) -> TinyMlpWeights {
    let mut state = seed;
    let mut uniform = move |scale: f32| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    };
    let s1 = 1.0 / (config.input_size as f32).sqrt();
    let s2 = 1.0 / (config.hidden_size as f32).sqrt();
    TinyMlpWeights {
        fc1_weight: (0..config.hidden_size * config.input_size)
            .map(|_| uniform(s1))
            .collect(),
        fc1_bias: (0..config.hidden_size).map(|_| uniform(s1)).collect(),
        hidden: (0..config.layers)
            .map(|_| {
                let w = (0..config.hidden_size * config.hidden_size)
                    .map(|_| uniform(s2))
                    .collect();
                let b = (0..config.hidden_size).map(|_| uniform(s2)).collect();
                (w, b)
            })
            .collect(),
        fc2_weight: (0..config.output_size * config.hidden_size)
            .map(|_| uniform(s2))
            .collect(),
        fc2_bias: (0..config.output_size).map(|_| uniform(s2)).collect(),
    }
}

/// Writes `config.json` and `model.safetensors` for a generated model into `weights_dir`.
pub fn write_model(
    weights_dir: &std::path::Path,
    config: &TinyMlpConfig,
    seed: u64,
) -> Result<(), WeightsError> {
    std::fs::create_dir_all(weights_dir).map_err(|e| WeightsError::File {
        file: weights_dir.into(),
        message: e.to_string(),
    })?;
    let w = generate_weights(config, seed);
    let config_path = weights_dir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("config serializes");
    std::fs::write(&config_path, text + "\n").map_err(|e| WeightsError::File {
        file: config_path,
        message: e.to_string(),
    })?;
    let (i, h, o) = (config.input_size, config.hidden_size, config.output_size);
    let names: Vec<(String, String)> = (0..config.layers)
        .map(|n| (format!("hidden.{n}.weight"), format!("hidden.{n}.bias")))
        .collect();
    let mut tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("fc1.weight", vec![h, i], w.fc1_weight),
        ("fc1.bias", vec![h], w.fc1_bias),
    ];
    for ((wn, bn), (weight, bias)) in names.iter().zip(w.hidden) {
        tensors.push((wn, vec![h, h], weight));
        tensors.push((bn, vec![h], bias));
    }
    tensors.push(("fc2.weight", vec![o, h], w.fc2_weight));
    tensors.push(("fc2.bias", vec![o], w.fc2_bias));
    write_f32_safetensors(&weights_dir.join("model.safetensors"), &tensors)
}

struct TinyMlp {
    config: TinyMlpConfig,
    dtype: DType,
    fc1: Linear,
    hidden: Vec<Linear>,
    fc2: Linear,
    device: Device,
}

fn load(dir: &ModelDir, device: &Device, ctx: &LoadContext) -> Result<Box<dyn Model>, LoadError> {
    let (path, config): (_, TinyMlpConfig) =
        read_json_config(&dir.weights, "config.json", "tiny-mlp")?;
    ctx.log(&format!("config: {} ({config:?})", path.display()));
    let dtype = config.compute_dtype().map_err(LoadError::Other)?;
    let vb = ctx.var_builder(&dir.weights, dtype, device)?;
    let linear = |name: &str, inp: usize, out: usize| -> Result<Linear, LoadError> {
        let w = vb
            .get((out, inp), &format!("{name}.weight"))
            .map_err(|e| LoadError::Other(e.to_string()))?;
        let b = vb
            .get(out, &format!("{name}.bias"))
            .map_err(|e| LoadError::Other(e.to_string()))?;
        Ok(Linear::new(w, Some(b)))
    };
    let fc1 = linear("fc1", config.input_size, config.hidden_size)?;
    let hidden = (0..config.layers)
        .map(|n| {
            linear(
                &format!("hidden.{n}"),
                config.hidden_size,
                config.hidden_size,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fc2 = linear("fc2", config.hidden_size, config.output_size)?;
    Ok(Box::new(TinyMlp {
        config,
        dtype,
        fc1,
        hidden,
        fc2,
        device: device.clone(),
    }))
}

impl TinyMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.fc1.forward(&x.to_dtype(self.dtype)?)?.relu()?;
        for layer in &self.hidden {
            h = layer.forward(&h)?.relu()?;
        }
        self.fc2.forward(&h)?.to_dtype(DType::F32)
    }
}

impl Model for TinyMlp {
    fn warm_up(&self) -> Result<(), PredictError> {
        let x = Tensor::zeros((1, self.config.input_size), DType::F32, &self.device)?;
        self.forward(&x)?;
        Ok(())
    }

    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError> {
        let vector: Vec<f32> = input
            .get("vector")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
            .unwrap_or_default();
        if vector.len() != self.config.input_size {
            return Err(PredictError::Failed(format!(
                "`vector` has {} values; this model takes exactly {} (input_size in config.json)",
                vector.len(),
                self.config.input_size
            )));
        }
        let x = Tensor::from_vec(vector, (1, self.config.input_size), &self.device)?;
        let y = self.forward(&x)?;
        let y: Vec<f32> = y.squeeze(0)?.to_vec1()?;
        ctx.log(&format!(
            "tiny-mlp: {} → {}",
            self.config.input_size,
            y.len()
        ));
        Ok(fjson::f32_array(&y))
    }
}

/// The example input used in docs and tests: `sin(i)` for each position.
pub fn example_input(config: &TinyMlpConfig) -> Value {
    json!({"vector": (0..config.input_size).map(|i| (i as f64).sin()).collect::<Vec<_>>()})
}
