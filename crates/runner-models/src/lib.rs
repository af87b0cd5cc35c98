//! Native architectures, on candle, behind one trait.
//!
//! An architecture declares its Cog signature and loads itself from a model directory
//! onto a device; a loaded [`Model`] turns validated inputs into an output. The engine
//! only sees these two things, never a concrete architecture.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use runner_spec::{ModelDir, RunTarget, Signature};
use serde_json::{Map, Value};

pub mod bert;
pub mod conformance;
pub mod device;
pub mod json;
pub mod tiny_mlp;
pub mod weights;

pub use device::{DeviceError, DeviceSpec};
pub use weights::WeightsError;

/// Why a model could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`run: {target}` in {cog_yaml}: Python predictors are not supported yet; use a native architecture (`run: \"candle:<architecture>\"`, one of: {known})")]
    PythonNotSupported {
        target: String,
        cog_yaml: String,
        known: String,
    },
    #[error("`run: candle:{name}` in {cog_yaml}: unknown architecture; runner knows: {known}")]
    UnknownArchitecture {
        name: String,
        cog_yaml: String,
        known: String,
    },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{0}")]
    Other(String),
}

/// Why a prediction did not produce an output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictError {
    #[error("{0}")]
    Failed(String),
    #[error("prediction was canceled")]
    Canceled,
}

impl From<candle_core::Error> for PredictError {
    fn from(e: candle_core::Error) -> Self {
        PredictError::Failed(format!("model error: {e}"))
    }
}

/// What a running prediction can see and report besides its input: its logs and whether
/// it was canceled.
#[derive(Debug, Default, Clone)]
pub struct PredictContext {
    logs: Arc<Mutex<String>>,
    canceled: Arc<AtomicBool>,
}

impl PredictContext {
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends one line to the prediction's logs.
    pub fn log(&self, line: &str) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.push_str(line);
        logs.push('\n');
    }
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn cancel(&self) {
        self.canceled.store(true, Ordering::SeqCst);
    }
    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::SeqCst)
    }
    /// Returns `Err(Canceled)` once the prediction has been canceled: call between steps.
    pub fn check_canceled(&self) -> Result<(), PredictError> {
        if self.is_canceled() {
            Err(PredictError::Canceled)
        } else {
            Ok(())
        }
    }
}

/// A loaded model.
pub trait Model: Send + Sync {
    /// Runs one prediction on an input already validated against the signature
    /// (unknown keys dropped, defaults filled in).
    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError>;

    /// One small forward pass before the model is reported ready, so the first real
    /// request does not pay for lazy initialisation (kernels, allocator, caches).
    fn warm_up(&self) -> Result<(), PredictError> {
        Ok(())
    }
}

/// Where setup reports progress; lines end up in `/health-check`'s setup logs.
pub type SetupLog<'a> = &'a (dyn Fn(&str) + Sync);

/// Loads an architecture from a model directory onto a device.
pub type LoadFn =
    fn(&ModelDir, &candle_core::Device, SetupLog) -> Result<Box<dyn Model>, LoadError>;

/// A native architecture.
pub struct Architecture {
    pub name: &'static str,
    pub summary: &'static str,
    pub signature: fn() -> Signature,
    pub load: LoadFn,
}

/// Every native architecture runner knows.
pub const ARCHITECTURES: &[Architecture] = &[
    bert::ARCHITECTURE,
    conformance::ARCHITECTURE,
    tiny_mlp::ARCHITECTURE,
];

fn known_names() -> String {
    ARCHITECTURES
        .iter()
        .map(|a| format!("candle:{}", a.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The architecture a model directory's `run:` selects.
pub fn architecture_for(dir: &ModelDir) -> Result<&'static Architecture, LoadError> {
    let cog_yaml = format!("{}:{}", dir.config.path.display(), dir.config.run_line);
    match &dir.config.run {
        RunTarget::Python { .. } => Err(LoadError::PythonNotSupported {
            target: dir.config.run.to_string(),
            cog_yaml,
            known: known_names(),
        }),
        RunTarget::Native { architecture } => ARCHITECTURES
            .iter()
            .find(|a| a.name == architecture)
            .ok_or_else(|| LoadError::UnknownArchitecture {
                name: architecture.clone(),
                cog_yaml,
                known: known_names(),
            }),
    }
}
