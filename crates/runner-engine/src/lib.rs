//! A loaded model's life, independent of HTTP: setup (with its logs and timing), the
//! health state machine Cog reports (STARTING → READY/BUSY, or SETUP_FAILED), prediction
//! slots (`concurrency.max`), input validation and cancellation.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use runner_models::{
    architecture_for, Architecture, DeviceSpec, LoadError, Model, PredictContext, PredictError,
};
use runner_spec::openapi;
use runner_spec::{InputValidator, ModelDir, Signature, ValidationIssue};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Cog's health states, as `/health-check` spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    Starting,
    Ready,
    Busy,
    SetupFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupStatus {
    Starting,
    Succeeded,
    Failed,
}

/// Setup as `/health-check` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    pub status: SetupStatus,
    pub logs: String,
}

/// Why the engine could not be created at all (before any setup).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Schema(String),
}

/// Why a prediction was not started.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Setup has not finished (or failed): Cog answers 503.
    NotReady { setup_failed: bool },
    /// Every slot is busy: Cog answers 409.
    AtCapacity,
    /// The input does not match the schema: 422 with these issues.
    InvalidInput(Vec<ValidationIssue>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictionStatus {
    Succeeded,
    Failed,
    Canceled,
}

/// A finished prediction.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub id: String,
    pub status: PredictionStatus,
    pub output: Value,
    pub error: Option<String>,
    pub logs: String,
    pub predict_time: Duration,
}

struct State {
    health_before_ready: Health,
    setup: SetupReport,
    setup_logs: String,
}

/// The engine for one model directory.
pub struct Engine {
    dir: ModelDir,
    architecture: &'static Architecture,
    signature: Signature,
    validator: InputValidator,
    openapi_json: String,
    device_spec: DeviceSpec,
    slots: Arc<Semaphore>,
    total_slots: usize,
    state: Mutex<State>,
    model: OnceLock<Arc<dyn Model>>,
    loaded: OnceLock<Loaded>,
}

/// What a successful setup reports.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub device: String,
    /// Where the weights came from: `safetensors`, or `none` for weightless architectures.
    pub weights_source: &'static str,
    pub setup_time: Duration,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Engine {
    /// Prepares the engine: picks the architecture and compiles the schema. Loading the
    /// weights is [`Engine::setup`], so a server can answer STARTING meanwhile.
    pub fn new(
        dir: ModelDir,
        device_spec: DeviceSpec,
        concurrency: Option<u32>,
    ) -> Result<Arc<Self>, EngineError> {
        let architecture = architecture_for(&dir)?;
        let signature = (architecture.signature)();
        let validator = InputValidator::new(&signature).map_err(EngineError::Schema)?;
        let openapi_json = openapi::to_cog_json(&openapi::document(&signature));
        let total_slots = concurrency
            .or(dir.config.concurrency_max)
            .unwrap_or(1)
            .max(1) as usize;
        Ok(Arc::new(Engine {
            dir,
            architecture,
            signature,
            validator,
            openapi_json,
            device_spec,
            slots: Arc::new(Semaphore::new(total_slots)),
            total_slots,
            state: Mutex::new(State {
                health_before_ready: Health::Starting,
                setup: SetupReport {
                    started_at: now_rfc3339(),
                    completed_at: None,
                    status: SetupStatus::Starting,
                    logs: String::new(),
                },
                setup_logs: String::new(),
            }),
            model: OnceLock::new(),
            loaded: OnceLock::new(),
        }))
    }

    pub fn model_name(&self) -> String {
        self.dir.name()
    }
    pub fn architecture(&self) -> &'static str {
        self.architecture.name
    }
    pub fn signature(&self) -> &Signature {
        &self.signature
    }
    /// The OpenAPI document, serialized once, as Cog writes it.
    pub fn openapi_json(&self) -> &str {
        &self.openapi_json
    }
    pub fn total_slots(&self) -> usize {
        self.total_slots
    }
    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn setup_log(&self, line: &str) {
        tracing::info!(target: "runner::setup", "{line}");
        let mut s = self.lock();
        s.setup_logs.push_str(line);
        s.setup_logs.push('\n');
    }

    /// Loads the model onto its device. On failure the engine stays in SETUP_FAILED with
    /// the error in the setup logs, and the error is returned.
    pub async fn setup(self: &Arc<Self>) -> Result<Loaded, String> {
        let engine = Arc::clone(self);
        let started = Instant::now();
        engine.lock().setup.started_at = now_rfc3339();
        let result = tokio::task::spawn_blocking(move || {
            let device = engine.device_spec.open().map_err(|e| e.to_string())?;
            let device_name = runner_models::device::describe(&device);
            engine.setup_log(&format!(
                "loading {} (candle:{}) on {device_name}",
                engine.dir.root.display(),
                engine.architecture.name
            ));
            let log = |line: &str| engine.setup_log(line);
            let model = (engine.architecture.load)(&engine.dir, &device, &log)
                .map_err(|e| e.to_string())?;
            let warm = Instant::now();
            model
                .warm_up()
                .map_err(|e| format!("warm-up prediction failed: {e}"))?;
            engine.setup_log(&format!("warm-up in {:.3}s", warm.elapsed().as_secs_f64()));
            Ok::<_, String>((model, device_name))
        })
        .await
        .map_err(|e| format!("setup panicked: {e}"))
        .and_then(|r| r);
        let mut state = self.lock();
        state.setup.completed_at = Some(now_rfc3339());
        match result {
            Ok((model, device)) => {
                let weights_source = if self.dir.weights.safetensors.is_empty()
                    && self.dir.weights.safetensors_index.is_none()
                {
                    "none"
                } else {
                    "safetensors"
                };
                let loaded = Loaded {
                    device,
                    weights_source,
                    setup_time: started.elapsed(),
                };
                state.setup_logs.push_str(&format!(
                    "setup succeeded in {:.3}s\n",
                    loaded.setup_time.as_secs_f64()
                ));
                state.setup.status = SetupStatus::Succeeded;
                let _ = self.model.set(Arc::from(model));
                let _ = self.loaded.set(loaded.clone());
                state.health_before_ready = Health::Ready;
                Ok(loaded)
            }
            Err(e) => {
                tracing::error!(target: "runner::setup", "setup failed: {e}");
                state.setup_logs.push_str(&format!("setup failed: {e}\n"));
                state.setup.status = SetupStatus::Failed;
                state.health_before_ready = Health::SetupFailed;
                Err(e)
            }
        }
    }

    /// Current health, and the setup report.
    pub fn health(&self) -> (Health, SetupReport) {
        let state = self.lock();
        let mut setup = state.setup.clone();
        setup.logs = state.setup_logs.clone();
        let health = match state.health_before_ready {
            Health::Ready if self.slots.available_permits() == 0 => Health::Busy,
            h => h,
        };
        (health, setup)
    }

    /// Validates an input against the schema and completes it (defaults, unknown keys
    /// dropped). No slot is taken.
    pub fn validate(&self, input: &Value) -> Result<Map<String, Value>, Vec<ValidationIssue>> {
        let (input, dropped) = self.validator.prepare(input)?;
        if !dropped.is_empty() {
            tracing::warn!(fields = ?dropped, "dropped unknown input fields");
        }
        Ok(input)
    }

    /// Takes a prediction slot for a validated input, or says why not.
    pub fn reserve(self: &Arc<Self>) -> Result<Slot, Rejection> {
        let Some(model) = self.model.get().cloned() else {
            let setup_failed = self.lock().health_before_ready == Health::SetupFailed;
            return Err(Rejection::NotReady { setup_failed });
        };
        let permit = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Rejection::AtCapacity)?;
        Ok(Slot {
            model,
            _permit: permit,
        })
    }

    /// Validates, reserves and runs one prediction.
    pub async fn predict(
        self: &Arc<Self>,
        id: String,
        input: &Value,
    ) -> Result<Prediction, Rejection> {
        let input = self.validate(input).map_err(Rejection::InvalidInput)?;
        let slot = self.reserve()?;
        Ok(slot.run(id, input, PredictContext::new()).await)
    }
}

/// A reserved prediction slot; the slot frees when the prediction ends.
pub struct Slot {
    model: Arc<dyn Model>,
    _permit: OwnedSemaphorePermit,
}

/// Cancels the prediction if the waiting future is dropped (e.g. the client went away).
struct CancelOnDrop(Option<PredictContext>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(ctx) = self.0.take() {
            ctx.cancel();
        }
    }
}

impl Slot {
    /// Runs the prediction on a blocking thread. `ctx` lets the caller cancel it.
    pub async fn run(
        self,
        id: String,
        input: Map<String, Value>,
        ctx: PredictContext,
    ) -> Prediction {
        let mut guard = CancelOnDrop(Some(ctx.clone()));
        let started = Instant::now();
        let worker_ctx = ctx.clone();
        let model = Arc::clone(&self.model);
        // The permit moves into the task: the slot stays taken until the model returns,
        // even if the caller stops waiting.
        let result = tokio::task::spawn_blocking(move || {
            let _slot = self;
            model.predict(&input, &worker_ctx)
        })
        .await
        .unwrap_or_else(|e| Err(PredictError::Failed(format!("the model panicked: {e}"))));
        guard.0 = None;
        let predict_time = started.elapsed();
        let logs = ctx.logs();
        let (status, output, error) = match result {
            Ok(output) => (PredictionStatus::Succeeded, output, None),
            Err(PredictError::Canceled) => (PredictionStatus::Canceled, Value::Null, None),
            Err(PredictError::Failed(e)) => (PredictionStatus::Failed, Value::Null, Some(e)),
        };
        match status {
            PredictionStatus::Failed => {
                tracing::warn!(%id, error = error.as_deref().unwrap_or(""), "prediction failed")
            }
            _ => {
                tracing::debug!(%id, ?status, secs = predict_time.as_secs_f64(), "prediction finished")
            }
        }
        Prediction {
            id,
            status,
            output,
            error,
            logs,
            predict_time,
        }
    }
}

/// A new prediction id: 26 lowercase base32 characters, like Replicate's.
pub fn new_prediction_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..26)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conformance_dir(concurrency: u32) -> (tempfile::TempDir, ModelDir) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("cog.yaml"),
            format!("run: candle:conformance\nconcurrency:\n  max: {concurrency}\n"),
        )
        .unwrap();
        let dir = ModelDir::open(d.path()).unwrap();
        (d, dir)
    }

    #[tokio::test]
    async fn lifecycle_and_slots() {
        let (_d, dir) = conformance_dir(1);
        let engine = Engine::new(dir, DeviceSpec::Cpu, None).unwrap();
        assert_eq!(engine.health().0, Health::Starting);
        assert_eq!(
            engine
                .predict("a".into(), &json!({"text": "x"}))
                .await
                .unwrap_err(),
            Rejection::NotReady {
                setup_failed: false
            }
        );
        engine.setup().await.unwrap();
        assert_eq!(engine.health().0, Health::Ready);

        let p = engine
            .predict("b".into(), &json!({"text": "ab", "count": 2}))
            .await
            .unwrap();
        assert_eq!(p.status, PredictionStatus::Succeeded);
        assert_eq!(p.output["text"], "abab");
        assert!(p.logs.contains("conformance"));

        let busy = {
            let e = Arc::clone(&engine);
            tokio::spawn(async move {
                e.predict("c".into(), &json!({"text": "x", "sleep": 0.5}))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(engine.health().0, Health::Busy);
        assert_eq!(
            engine
                .predict("d".into(), &json!({"text": "x"}))
                .await
                .unwrap_err(),
            Rejection::AtCapacity
        );
        assert_eq!(
            busy.await.unwrap().unwrap().status,
            PredictionStatus::Succeeded
        );

        let failed = engine
            .predict("e".into(), &json!({"text": "x", "fail": true}))
            .await
            .unwrap();
        assert_eq!(failed.status, PredictionStatus::Failed);
        assert!(failed.error.unwrap().contains("on purpose"));

        let invalid = engine
            .predict("f".into(), &json!({"count": 99}))
            .await
            .unwrap_err();
        assert!(
            matches!(invalid, Rejection::InvalidInput(ref v) if v.len() == 2),
            "{invalid:?}"
        );
    }

    #[tokio::test]
    async fn dropped_waiter_cancels_and_frees_the_slot() {
        let (_d, dir) = conformance_dir(1);
        let engine = Engine::new(dir, DeviceSpec::Cpu, None).unwrap();
        engine.setup().await.unwrap();
        let waiter = {
            let e = Arc::clone(&engine);
            tokio::spawn(async move {
                e.predict("a".into(), &json!({"text": "x", "sleep": 30}))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        waiter.abort();
        for _ in 0..200 {
            if engine.health().0 == Health::Ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("slot not freed after the waiter went away");
    }

    #[tokio::test]
    async fn setup_failure_is_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("w")).unwrap();
        std::fs::write(d.path().join("w/model.safetensors"), b"short").unwrap();
        std::fs::write(
            d.path().join("cog.yaml"),
            "model: local/t\nrun: candle:tiny-mlp\nweights:\n  - name: w\n    target: /src/w\n    source: {uri: ./w}\n",
        )
        .unwrap();
        let engine = Engine::new(ModelDir::open(d.path()).unwrap(), DeviceSpec::Cpu, None).unwrap();
        let err = engine.setup().await.unwrap_err();
        assert!(err.contains("config.json"), "{err}");
        let (health, setup) = engine.health();
        assert_eq!(health, Health::SetupFailed);
        assert_eq!(setup.status, SetupStatus::Failed);
        assert!(
            setup.logs.contains("setup failed") && setup.logs.contains("config.json"),
            "{}",
            setup.logs
        );
        assert_eq!(
            engine
                .predict("a".into(), &json!({"vector": [1.0]}))
                .await
                .unwrap_err(),
            Rejection::NotReady { setup_failed: true }
        );
    }
}
