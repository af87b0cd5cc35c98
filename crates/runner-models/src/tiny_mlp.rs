//! `candle:tiny-mlp`: a two-layer perceptron (`fc2(relu(fc1(x)))`) whose weights runner
//! generates deterministically, so the whole weight path (cog.yaml `weights:`, safetensors
//! checks, candle load, predict) is testable in milliseconds without downloads.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use runner_spec::{InputField, ModelDir, OutputType, Primitive, Signature};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::weights::{read_json_config, write_f32_safetensors, CheckedWeights, WeightsError};
use crate::{
    json as fjson, Architecture, LoadError, Model, PredictContext, PredictError, SetupLog,
};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "tiny-mlp",
    summary: "a generated two-layer perceptron for fast tests of the weight path",
    signature,
    load,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TinyMlpConfig {
    pub input_size: usize,
    pub hidden_size: usize,
    pub output_size: usize,
}

impl Default for TinyMlpConfig {
    /// About 2.3 MB of f32 weights.
    fn default() -> Self {
        TinyMlpConfig {
            input_size: 128,
            hidden_size: 4096,
            output_size: 16,
        }
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
    write_f32_safetensors(
        &weights_dir.join("model.safetensors"),
        &[
            ("fc1.weight", vec![h, i], w.fc1_weight),
            ("fc1.bias", vec![h], w.fc1_bias),
            ("fc2.weight", vec![o, h], w.fc2_weight),
            ("fc2.bias", vec![o], w.fc2_bias),
        ],
    )
}

struct TinyMlp {
    config: TinyMlpConfig,
    fc1: Linear,
    fc2: Linear,
    device: Device,
}

fn load(dir: &ModelDir, device: &Device, log: SetupLog) -> Result<Box<dyn Model>, LoadError> {
    let (path, config): (_, TinyMlpConfig) =
        read_json_config(&dir.weights, "config.json", "tiny-mlp")?;
    log(&format!("config: {} ({config:?})", path.display()));
    let vb = CheckedWeights::open(&dir.weights)?.var_builder(DType::F32, device);
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
    let fc2 = linear("fc2", config.hidden_size, config.output_size)?;
    Ok(Box::new(TinyMlp {
        config,
        fc1,
        fc2,
        device: device.clone(),
    }))
}

impl Model for TinyMlp {
    fn warm_up(&self) -> Result<(), PredictError> {
        let x = Tensor::zeros((1, self.config.input_size), DType::F32, &self.device)?;
        self.fc2.forward(&self.fc1.forward(&x)?.relu()?)?;
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
        let y = self.fc2.forward(&self.fc1.forward(&x)?.relu()?)?;
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
