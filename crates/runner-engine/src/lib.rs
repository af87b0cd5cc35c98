//! A loaded model's life, independent of HTTP: setup (with its logs and timing), the
//! health state machine Cog reports (STARTING → READY/BUSY, or SETUP_FAILED), input
//! validation, prediction slots (`concurrency.max`) with an optional queue, in-flight
//! predictions by id, their event streams, file inputs/outputs and cancellation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use runner_models::{
    architecture_for, Architecture, DeviceSpec, LoadContext, LoadError, Model, PredictError,
};
use runner_snapshot::{CompatKey, Snapshot, SnapshotSource};
use runner_spec::openapi;
pub use runner_spec::Mode;
use runner_spec::{InputValidator, ModelDir, OutputType, Signature, ValidationIssue};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

mod batcher;
pub mod cli_inputs;
pub mod files;
pub mod metrics;
pub mod prediction;
mod snapshot_save;
pub use snapshot_save::SnapshotSave;

pub use batcher::BatchOptions;
pub use files::FileConfig;
pub use prediction::{PredictionStatus, Running, StreamEvent, Subscription};

/// Cog's health states, as `/health-check` spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    Starting,
    Ready,
    Busy,
    SetupFailed,
    /// The model can no longer predict (its Python worker died).
    Defunct,
    /// Ready, but the predictor's own `healthcheck()` failed (Cog's state of that name).
    Unhealthy,
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
    #[error("{0}: no `train:` key, so there is no training to serve: add `train: \"train.py:train\"` (a Python training function), or serve predictions without --mode train")]
    NoTrainer(String),
    #[error("{0}")]
    Schema(String),
    #[error("--save-snapshot with --snapshot off: saving a snapshot needs somewhere to put it; drop --snapshot off (the model directory's .runner/ is used) or pass --snapshot PATH")]
    SaveWithoutSnapshot,
}

/// Why a prediction was not started.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Setup has not finished (or failed): Cog answers 503.
    NotReady { setup_failed: bool },
    /// Every slot is busy and there is no queue (or it is full): Cog answers 409.
    AtCapacity,
    /// Every slot is busy and the queue is full: 429.
    QueueFull,
    /// A prediction with this id is already in flight.
    DuplicateId(String),
    /// The input does not match the schema: 422 with these issues.
    InvalidInput(Vec<ValidationIssue>),
}

/// How an engine serves predictions.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Predictions at once; overrides cog.yaml's `concurrency.max` (default 1).
    pub concurrency: Option<u32>,
    /// Predictions that may wait for a slot; 0 answers "at capacity" at once, as Cog does.
    pub max_queue: usize,
    /// Dynamic batching, for architectures that allow it (ignored by the others).
    pub batching: BatchOptions,
    pub files: FileConfig,
    pub snapshot: SnapshotOptions,
    /// Keep the tensors the model takes at load, for [`Engine::write_snapshot`].
    pub record_for_snapshot: bool,
    /// Progress reports for weight loads and snapshot reads and writes.
    pub progress: Option<ProgressBars>,
    /// The interpreter for Python predictors (`--python`; default `python3`).
    pub python: Option<PathBuf>,
    /// Predictions (`run:`), or trainings (`train:`), as Cog's `--x-mode train` serves them.
    pub mode: Mode,
    /// Setup that takes longer fails (`SETUP_FAILED`), as with Cog's `COG_SETUP_TIMEOUT`.
    pub setup_timeout: Option<Duration>,
    /// Quantization at load (`--quantize`): overrides the model directory's
    /// `RUNNER_QUANTIZE`; `off` turns it off. candle:llama safetensors only.
    pub quantize: Option<String>,
}

/// Starts a progress report for a long step, given its label and total bytes; the
/// returned callback is told bytes as they move, and the report ends when it is dropped.
#[derive(Clone)]
pub struct ProgressBars(pub Arc<StartProgress>);

/// Starts one progress report: label, total bytes → the callback told bytes as they move.
pub type StartProgress = dyn Fn(&str, u64) -> ProgressFn + Send + Sync;

/// Told the number of bytes each time data moves; called from any thread.
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

impl std::fmt::Debug for ProgressBars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressBars")
    }
}

/// Which snapshot setup tries before loading the weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Never use a snapshot.
    #[default]
    Off,
    /// The model directory's own snapshot for this device, when there is one.
    Auto,
    Path(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    pub mode: SnapshotMode,
    /// Fail setup instead of loading cold when the snapshot is missing or unusable.
    pub require: bool,
    /// After a cold load, write the snapshot (to `mode`'s path) in the background, so the
    /// next start restores it (`--save-snapshot`). Needs a mode other than `Off`.
    pub save: bool,
}

/// The snapshot a model was restored from.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub data_bytes: u64,
    pub restore_seconds: f64,
    /// Read around the page cache (`O_DIRECT`) rather than through it.
    pub direct_reads: bool,
    /// The share of the snapshot's data in the page cache when the restore began, where the
    /// kernel said.
    pub page_cache_resident: Option<f64>,
}

/// candle's version, part of a snapshot's compatibility key.
pub const CANDLE_VERSION: &str = "0.11.1";

/// Whether a snapshot restore runs on its own thread while the model starts building:
/// on the CPU, yes; on CUDA only with `RUNNER_RESTORE_OVERLAP=on` until a GPU run has
/// checked it (the restore then allocates on its own thread's default stream).
/// `RUNNER_RESTORE_OVERLAP=off` restores first everywhere.
fn restore_beside_build(device: &candle_core::Device) -> bool {
    match std::env::var("RUNNER_RESTORE_OVERLAP").as_deref() {
        Ok("on") => true,
        Ok("off") => false,
        _ => device.is_cpu(),
    }
}

fn device_kind(device: &candle_core::Device) -> &'static str {
    match device {
        candle_core::Device::Cpu => "cpu",
        candle_core::Device::Cuda(_) => "cuda",
        candle_core::Device::Metal(_) => "metal",
    }
}

struct State {
    health_before_ready: Health,
    setup: SetupReport,
    setup_logs: String,
}

/// The engine for one model directory.
pub struct Engine {
    dir: ModelDir,
    /// Predictions or trainings; in train mode `dir.config.run` is the `train:` target.
    mode: Mode,
    architecture: &'static Architecture,
    signature: Signature,
    python: Option<PathBuf>,
    validator: InputValidator,
    openapi_json: String,
    device_spec: DeviceSpec,
    slots: Arc<Semaphore>,
    total_slots: usize,
    max_queue: usize,
    queued: AtomicUsize,
    /// In effect only when the architecture allows batching and the batch size is over 1.
    batching: Option<BatchOptions>,
    batcher: OnceLock<batcher::Batcher>,
    files: FileConfig,
    http: OnceLock<reqwest::Client>,
    state: Mutex<State>,
    model: OnceLock<Arc<dyn Model>>,
    loaded: OnceLock<Loaded>,
    in_flight: Mutex<HashMap<String, Arc<Running>>>,
    idle: tokio::sync::Notify,
    /// When the last user health check finished, and its answer.
    last_healthcheck: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    setup_timeout: Option<Duration>,
    /// The Python worker that described the predictor, until setup takes it.
    python_started: Mutex<Option<runner_models::python::Started>>,
    snapshot_options: SnapshotOptions,
    progress: Option<ProgressBars>,
    recorded: Option<runner_models::load::Recorded>,
    /// The background snapshot save after a cold load (`--save-snapshot`).
    save: snapshot_save::SaveState,
    /// The quantization at load in effect (`q8_0`, …), from `--quantize` or cog.yaml.
    quantize: Option<&'static str>,
    device: OnceLock<candle_core::Device>,
    metrics: metrics::EngineMetrics,
    /// Whether the signature has file inputs / file outputs (decided once, not per request).
    file_inputs: bool,
    file_outputs: bool,
}

/// What a successful setup reports.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub device: String,
    /// Where the weights came from: `snapshot`, `safetensors`, or `none` for weightless
    /// architectures.
    pub weights_source: &'static str,
    pub setup_time: Duration,
    /// Setup's phases in order: device init, snapshot check/restore and model build, or
    /// weights load; warm-up.
    pub phases: Vec<(String, Duration)>,
    pub snapshot: Option<SnapshotInfo>,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The signature of the target a server does not run, for the combined document.
fn other_signature(dir: &ModelDir, python: Option<&Path>) -> Result<Signature, String> {
    match &dir.config.run {
        runner_spec::RunTarget::Python { .. } => runner_models::python::describe(dir, python)
            .map(|d| d.signature)
            .map_err(|e| e.to_string()),
        _ => architecture_for(dir)
            .map(|a| (a.signature)())
            .map_err(|e| e.to_string()),
    }
}

/// Hands the heap memory that loading used and freed (file buffers, JSON parsing,
/// conversions) back to the system, so resident memory after setup is the model's own.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of glibc's heap; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Frees a queue place when a queued prediction gets its slot or gives up.
struct QueuePlace<'a>(&'a AtomicUsize);
impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine {
    /// Prepares the engine: picks the architecture and compiles the schema. Loading the
    /// weights is [`Engine::setup`], so a server can answer STARTING meanwhile.
    pub fn new(
        dir: ModelDir,
        device_spec: DeviceSpec,
        options: EngineOptions,
    ) -> Result<Arc<Self>, EngineError> {
        if options.snapshot.save && options.snapshot.mode == SnapshotMode::Off {
            return Err(EngineError::SaveWithoutSnapshot);
        }
        // A training server is the same server around the `train:` function, as in Cog.
        let mut dir = dir;
        let mode = options.mode;
        let other_target = match mode {
            Mode::Train => {
                let train =
                    dir.config.train.clone().ok_or_else(|| {
                        EngineError::NoTrainer(dir.config.path.display().to_string())
                    })?;
                Some(std::mem::replace(&mut dir.config.run, train))
            }
            Mode::Predict => dir.config.train.clone(),
        };
        let architecture = architecture_for(&dir)?;
        let quantize = if architecture.name == runner_models::llama::ARCHITECTURE.name {
            runner_models::llama::isq::choice(&dir, options.quantize.as_deref())?.map(|q| q.0)
        } else {
            match options.quantize.as_deref().map(runner_models::llama::isq::parse) {
                Some(Ok(Some((name, _)))) => {
                    return Err(EngineError::Load(LoadError::Other(format!(
                        "--quantize {name}: quantization at load applies to candle:llama models in safetensors, and {} runs {}",
                        dir.root.display(),
                        dir.config.run
                    ))))
                }
                Some(Err(e)) => {
                    return Err(EngineError::Load(LoadError::Other(format!("--quantize: {e}"))))
                }
                _ => None,
            }
        };
        // A Python predictor built by Cog carries the schema Cog generated: serve that one.
        let cog_schema = std::fs::read_to_string(dir.root.join(".cog/openapi_schema.json"))
            .ok()
            .filter(|_| matches!(dir.config.run, runner_spec::RunTarget::Python { .. }))
            .filter(|text| serde_json::from_str::<Value>(text).is_ok());
        // A Python predictor declares its own signature; sync ones get one slot, as in Cog.
        // With both `run:` and `train:`, the other one is described alongside for the
        // document, which covers both as Cog's does (unless Cog's own document is there:
        // describing imports the module, which may take seconds).
        let (served, other) = std::thread::scope(|scope| {
            let other = other_target
                .as_ref()
                .filter(|_| cog_schema.is_none())
                .map(|target| {
                    let mut other_dir = dir.clone();
                    other_dir.config.run = target.clone();
                    let python = options.python.as_deref();
                    scope.spawn(move || other_signature(&other_dir, python))
                });
            // A Python predictor is described by the worker that will serve it.
            let served = match &dir.config.run {
                runner_spec::RunTarget::Python { .. } => runner_models::python::start(
                    &dir,
                    options.python.as_deref(),
                    options.setup_timeout,
                )
                .map(|(described, started)| {
                    (
                        described.signature,
                        !described.is_async,
                        described.concurrent_max,
                        Some(started),
                    )
                }),
                _ => Ok(((architecture.signature)(), false, None, None)),
            };
            (
                served,
                other.map(|h| h.join().unwrap_or_else(|_| Err("it panicked".into()))),
            )
        });
        let (signature, python_sync, declared_concurrency, python_started) = served?;
        let file_inputs = files::has_file_inputs(&signature);
        let file_outputs = files::has_file_outputs(&signature.output);
        let validator = InputValidator::new(&signature).map_err(EngineError::Schema)?;
        let served_doc = openapi::document_for(&signature, mode);
        let document = match (other, mode) {
            (None, _) => served_doc,
            (Some(Ok(other)), Mode::Predict) => {
                openapi::combined(&served_doc, &openapi::document_for(&other, Mode::Train))
            }
            (Some(Ok(other)), Mode::Train) => {
                openapi::combined(&openapi::document_for(&other, Mode::Predict), &served_doc)
            }
            (Some(Err(why)), _) => {
                let other = other_target
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                tracing::warn!(
                    "{}: cannot read `{other}` ({why}); /openapi.json describes only what this server runs",
                    dir.config.path.display()
                );
                served_doc
            }
        };
        let openapi_json = cog_schema.unwrap_or_else(|| openapi::to_cog_json(&document));
        let batching = (architecture.batching && options.batching.max_batch_size > 1)
            .then_some(options.batching);
        // The flag, then cog.yaml, then the predictor's own `@cog.concurrent(max=N)`.
        let mut concurrency = options
            .concurrency
            .or(dir.config.concurrency_max)
            .or(declared_concurrency)
            .unwrap_or(1)
            .max(1) as usize;
        if python_sync && concurrency > 1 {
            tracing::warn!(
                "{}: a sync predict()/run() runs one prediction at a time; make it `async def` for concurrency {concurrency}",
                dir.config.run
            );
            concurrency = 1;
        }
        // A batch can only gather predictions that hold a slot.
        let total_slots = concurrency.max(batching.map_or(1, |b| b.max_batch_size));
        // A snapshot is written from the tensors the cold load recorded.
        let record = options.record_for_snapshot || options.snapshot.save;
        Ok(Arc::new(Engine {
            dir,
            mode,
            architecture,
            signature,
            python: options.python,
            validator,
            openapi_json,
            device_spec,
            slots: Arc::new(Semaphore::new(total_slots)),
            total_slots,
            max_queue: options.max_queue,
            queued: AtomicUsize::new(0),
            batching,
            batcher: OnceLock::new(),
            files: options.files,
            http: OnceLock::new(),
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
            in_flight: Mutex::new(HashMap::new()),
            idle: tokio::sync::Notify::new(),
            last_healthcheck: tokio::sync::Mutex::new(None),
            python_started: Mutex::new(python_started),
            setup_timeout: options.setup_timeout,
            snapshot_options: options.snapshot,
            progress: options.progress,
            recorded: record.then(|| Arc::new(Mutex::new(Vec::new()))),
            save: Default::default(),
            quantize,
            device: OnceLock::new(),
            metrics: Default::default(),
            file_inputs,
            file_outputs,
        }))
    }

    pub fn model_name(&self) -> String {
        self.dir.name()
    }
    /// What this server runs: cog.yaml's `run` (`candle:<architecture>` or
    /// `file.py:Class`), or its `train` in train mode.
    pub fn run_target(&self) -> String {
        self.dir.config.run.to_string()
    }
    /// The quantization at load in effect (`q8_0`, …): `--quantize`, else cog.yaml's
    /// `RUNNER_QUANTIZE`.
    pub fn quantize(&self) -> Option<&'static str> {
        self.quantize
    }
    /// The quantization every load (cold or restored) is told: the one resolved at start,
    /// or `off`, so the loader does not read cog.yaml's `RUNNER_QUANTIZE` again.
    fn quantize_for_load(&self) -> Option<String> {
        Some(self.quantize.unwrap_or("off").to_string())
    }
    /// Predictions, or trainings (`--mode train`).
    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn architecture(&self) -> &'static str {
        self.architecture.name
    }
    pub fn signature(&self) -> &Signature {
        &self.signature
    }
    /// The OpenAI-compatible routes this model answers (none on a training server).
    pub fn openai(&self) -> runner_models::OpenAi {
        match (self.mode, &self.dir.config.run) {
            (Mode::Train, _) => runner_models::OpenAi::None,
            (Mode::Predict, runner_spec::RunTarget::Python { .. }) => {
                runner_models::OpenAi::of_signature(&self.signature)
            }
            (Mode::Predict, _) => self.architecture.openai,
        }
    }
    /// The prompt a conversation makes through the loaded model's chat template; `None`
    /// until the model is loaded, or when it has no chat form.
    pub fn chat_prompt(
        &self,
        messages: &[runner_models::ChatMessage],
    ) -> Option<Result<String, String>> {
        let model = self.model.get()?;
        model
            .chat_prompt(messages)
            .map(|r| r.map_err(|e| e.to_string()))
    }
    /// How many tokens `text` is as a prompt, for a loaded text generator.
    pub fn count_tokens(&self, text: &str) -> Option<Result<usize, String>> {
        let model = self.model.get()?;
        model
            .count_tokens(text)
            .map(|r| r.map_err(|e| e.to_string()))
    }
    /// Tokens of prompt and output together, for a loaded text generator.
    pub fn context_length(&self) -> Option<usize> {
        self.model.get()?.context_length()
    }
    /// How many token ids a loaded text generator's vocabulary has.
    pub fn vocabulary_size(&self) -> Option<usize> {
        self.model.get()?.vocabulary_size()
    }
    /// Whether the model streams its output (`@cog.streaming`): SSE is offered.
    pub fn supports_streaming(&self) -> bool {
        self.signature.streaming
    }
    /// The OpenAPI document, serialized once, as Cog writes it.
    pub fn openapi_json(&self) -> &str {
        &self.openapi_json
    }
    pub fn total_slots(&self) -> usize {
        self.total_slots
    }
    /// Dynamic batching, when in effect for this model.
    pub fn batching(&self) -> Option<BatchOptions> {
        self.batching
    }
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }
    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }
    /// The HTTP client for file inputs and uploads (shared, so connections are reused).
    pub fn http_client(&self) -> &reqwest::Client {
        self.http.get_or_init(files::http_client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn setup_log(&self, line: &str) {
        tracing::info!(target: "runner::setup", "{line}");
        let mut s = self.lock();
        s.setup_logs.push_str(line);
        s.setup_logs.push('\n');
    }

    /// Where `--snapshot auto` looks for (and `runner snapshot` writes) this model's
    /// snapshot for a kind of device.
    pub fn default_snapshot_path(&self, device_kind: &str) -> PathBuf {
        self.dir.root.join(".runner").join(format!(
            "snapshot-{}-{device_kind}.rsnap",
            self.architecture.name
        ))
    }

    /// What a snapshot must have been taken for to be used on this device.
    pub fn compat_key(&self, device: &candle_core::Device) -> Result<CompatKey, String> {
        let mut files = vec![self.dir.config.path.clone()];
        files.extend(self.dir.weights.files.iter().cloned());
        let model_digest = runner_snapshot::fingerprint(&files)
            .map_err(|e| format!("cannot read the model's files to fingerprint them: {e}"))?;
        let gpu = runner_models::device::gpu_identity(device);
        Ok(CompatKey {
            runner_version: env!("CARGO_PKG_VERSION").into(),
            candle_version: CANDLE_VERSION.into(),
            model_digest,
            architecture: self.architecture.name.into(),
            device_kind: device_kind(device).into(),
            gpu_name: gpu.name,
            compute_capability: gpu.compute_capability,
            driver_version: gpu.driver_version,
            // A snapshot holds the weights as quantized at load, so the type must match.
            dtype_policy: match self.quantize {
                Some(q) => format!(
                    "{}; quantized at load to {q}",
                    self.architecture.dtype_policy
                ),
                None => self.architecture.dtype_policy.into(),
            },
        })
    }

    /// Loads the model onto its device: from a compatible snapshot when one is chosen,
    /// else from the weights (recording the tensors when a snapshot is to be written).
    /// On failure the engine stays in SETUP_FAILED with the error in the setup logs, and
    /// the error is returned.
    pub async fn setup(self: &Arc<Self>) -> Result<Loaded, String> {
        let engine = Arc::clone(self);
        let started = Instant::now();
        engine.lock().setup.started_at = now_rfc3339();
        let loading = tokio::task::spawn_blocking(move || engine.load_blocking());
        let joined = match self.setup_timeout {
            // A load past its time is left to finish on its own; what it built is dropped
            // (a Python worker with it).
            Some(limit) => tokio::time::timeout(limit, loading).await.map_err(|_| {
                format!(
                    "setup timed out after {} s (--setup-timeout, COG_SETUP_TIMEOUT); raise the limit if loading this model takes longer",
                    limit.as_secs_f64()
                )
            }),
            None => Ok(loading.await),
        };
        let result = joined.and_then(|j| {
            j.map_err(|e| format!("setup panicked: {e}"))
                .and_then(|r| r)
        });
        let mut state = self.lock();
        state.setup.completed_at = Some(now_rfc3339());
        match result {
            Ok((model, mut loaded)) => {
                loaded.setup_time = started.elapsed();
                state.setup_logs.push_str(&format!(
                    "setup succeeded in {:.3}s\n",
                    loaded.setup_time.as_secs_f64()
                ));
                state.setup.status = SetupStatus::Succeeded;
                let model: Arc<dyn Model> = Arc::from(model);
                if let Some(options) = self.batching {
                    let _ = self.batcher.get_or_init(|| {
                        batcher::Batcher::start(Arc::clone(&model), options, Arc::downgrade(self))
                    });
                }
                let _ = self.model.set(model);
                let _ = self.loaded.set(loaded.clone());
                state.health_before_ready = Health::Ready;
                drop(state);
                self.start_snapshot_save();
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

    fn load_blocking(&self) -> Result<(Box<dyn Model>, Loaded), String> {
        let mut phases = Vec::new();
        let t = Instant::now();
        self.prefetch();
        // Files the load will parse anyway are read while the device initialises.
        if self.architecture.name == runner_models::llama::ARCHITECTURE.name {
            runner_models::llama::prefetch(&self.dir);
        }
        // A Python predictor picks its own device; runner only talks to it, so it opens no
        // GPU of its own (a CUDA context would hold GPU memory the predictor needs).
        let python = matches!(self.dir.config.run, runner_spec::RunTarget::Python { .. });
        let device = if python {
            if !matches!(self.device_spec, DeviceSpec::Cpu | DeviceSpec::Auto) {
                self.setup_log(&format!(
                    "--device {}: a Python predictor chooses its own device; runner itself stays on the CPU",
                    self.device_spec
                ));
            }
            candle_core::Device::Cpu
        } else {
            self.device_spec.open().map_err(|e| e.to_string())?
        };
        let device_name = runner_models::device::describe(&device);
        phases.push(("device init".to_string(), t.elapsed()));
        if let Some(line) = runner_models::device::open_times() {
            self.setup_log(&line);
        }
        // Kernels and cuBLAS start beside the weights (`RUNNER_CUDA_PREWARM=on`, CUDA only).
        let quantized = !self.dir.weights.gguf.is_empty() || self.quantize.is_some();
        let prewarm = runner_models::device::prewarm(&device, quantized);
        self.setup_log(&format!(
            "loading {} ({}) on {device_name}",
            self.dir.root.display(),
            self.run_target()
        ));
        let log = |line: &str| self.setup_log(line);
        let mut restored = None;
        if let Some(path) = self.chosen_snapshot(&device)? {
            match self.restore_from(&path, &device, &log, &mut phases) {
                Ok(done) => restored = Some(done),
                Err(e) if self.snapshot_options.require => {
                    return Err(format!("--require-snapshot: {e}"));
                }
                Err(e) => {
                    tracing::warn!(target: "runner::setup", "snapshot not used: {e}");
                    self.setup_log(&format!(
                        "snapshot not used, loading the weights instead: {e}"
                    ));
                }
            }
        }
        let (model, weights_source, snapshot) = match restored {
            Some((model, info)) => (model, "snapshot", Some(info)),
            None => {
                let t = Instant::now();
                let mut ctx = match &self.recorded {
                    Some(r) => LoadContext::recording(&log, Arc::clone(r)),
                    None => LoadContext::new(&log),
                }
                .with_python(self.python.clone())
                .with_quantize(self.quantize_for_load())
                .with_python_started(
                    self.python_started
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take(),
                );
                let weights_bytes = self.weights_file_bytes();
                // The bar moves as each tensor is read; quantizing at load, each is
                // quantized right after, so the bar tracks that work too.
                let label = match self.quantize {
                    Some(q) => format!("loading weights, quantizing to {q}"),
                    None => "loading weights".to_string(),
                };
                if let Some(bar) = self.progress_bar(&label, weights_bytes) {
                    ctx = ctx.with_progress(bar);
                }
                // Native models hold their weights in memory (a Python predictor loads what
                // it likes, so its files say little).
                if self.run_target().starts_with("candle:") {
                    // Quantized at load, the model takes what its quantized form takes.
                    let quantized = self.quantize.and_then(|q| {
                        runner_models::llama::isq::device_bytes(
                            &self.dir.weights,
                            q,
                            !device.is_cpu(),
                        )
                        .map(|bytes| (bytes, format!("the weights (quantized to {q})")))
                    });
                    let (needed, what) =
                        quantized.unwrap_or((weights_bytes, "the weights".to_string()));
                    runner_models::device::check_fits(&device, needed, &what)?;
                }
                let model = (self.architecture.load)(&self.dir, &device, &ctx)
                    .map_err(|e| e.to_string())?;
                phases.push(("weights load".to_string(), t.elapsed()));
                let source = if !self.dir.weights.gguf.is_empty() {
                    "gguf"
                } else if self.dir.weights.safetensors.is_empty()
                    && self.dir.weights.safetensors_index.is_none()
                {
                    "none"
                } else {
                    "safetensors"
                };
                (model, source, None)
            }
        };
        let warm = Instant::now();
        if let Some(prewarm) = prewarm {
            if let Ok(took) = prewarm.join() {
                self.setup_log(&format!(
                    "kernels pre-warmed in {:.3}s (beside the weights)",
                    took.as_secs_f64()
                ));
            }
        }
        model
            .warm_up()
            .map_err(|e| format!("warm-up prediction failed: {e}"))?;
        phases.push(("warm-up".to_string(), warm.elapsed()));
        self.setup_log(&format!("warm-up in {:.3}s", warm.elapsed().as_secs_f64()));
        if let Some(line) = runner_models::device::kernel_loads(&device) {
            self.setup_log(&line);
        }
        release_freed_heap();
        let _ = self.device.set(device);
        Ok((
            model,
            Loaded {
                device: device_name,
                weights_source,
                setup_time: Duration::ZERO,
                phases,
                snapshot,
            },
        ))
    }

    /// A progress report for a step moving `total` bytes, when the caller asked for them.
    fn progress_bar(&self, label: &str, total: u64) -> Option<ProgressFn> {
        let bars = self.progress.as_ref()?;
        (total > 0).then(|| (bars.0)(label, total))
    }

    /// Asks the kernel to start reading what this start will most likely load into the page
    /// cache (the snapshot it would restore, else the weights), so a disk read overlaps the
    /// device's initialisation (a CUDA context takes a few hundred milliseconds) and the
    /// setup before the load. Best effort: a wrong guess costs only readahead. Skipped
    /// where the restore will read around the page cache.
    fn prefetch(&self) {
        let kind = match self.device_spec {
            DeviceSpec::Cpu => "cpu",
            DeviceSpec::Cuda(_) => "cuda",
            // A guess: the driver's library is there (opening the device says more).
            DeviceSpec::Auto if runner_models::device::cuda_driver_present() => "cuda",
            DeviceSpec::Auto => "cpu",
        };
        let snapshot = self.snapshot_candidate(kind).filter(|p| p.is_file());
        // A Python predictor loads what it likes: its files say little.
        let weights: Vec<PathBuf> = if self.architecture.name == runner_models::PYTHON.name {
            Vec::new()
        } else {
            let w = &self.dir.weights;
            w.safetensors.iter().chain(&w.gguf).cloned().collect()
        };
        std::thread::spawn(move || {
            use runner_snapshot::direct;
            let Some(path) = snapshot else {
                for path in weights {
                    if let Ok(file) = std::fs::File::open(&path) {
                        direct::read_ahead(&file, 0, file.metadata().map_or(0, |m| m.len()));
                    }
                }
                return;
            };
            // A restore that will read around the page cache gains nothing from it, and
            // the readahead would compete with its reads for the disk.
            if direct::will_read_direct(&path, kind) {
                return;
            }
            if let Ok(file) = std::fs::File::open(&path) {
                let len = file.metadata().map_or(0, |m| m.len());
                // First what the compatibility check reads before the restore reads any
                // data: the snapshot's header and manifest (at its end) and the start of
                // each weights file (their fingerprint).
                let tail = len.min(1 << 20);
                direct::read_ahead(&file, len - tail, tail);
                for weights in weights {
                    if let Ok(w) = std::fs::File::open(&weights) {
                        let head = w.metadata().map_or(0, |m| m.len());
                        let head = if head <= 16 << 20 { head } else { 1 << 20 };
                        direct::read_ahead(&w, 0, head);
                    }
                }
                direct::read_ahead(&file, 0, len - tail);
            }
        });
    }

    /// The snapshot `--snapshot` points at for a device kind, whether or not it exists.
    fn snapshot_candidate(&self, device_kind: &str) -> Option<PathBuf> {
        match &self.snapshot_options.mode {
            SnapshotMode::Off => None,
            SnapshotMode::Path(p) => Some(p.clone()),
            SnapshotMode::Auto => Some(self.default_snapshot_path(device_kind)),
        }
    }

    fn chosen_snapshot(&self, device: &candle_core::Device) -> Result<Option<PathBuf>, String> {
        let Some(path) = self.snapshot_candidate(device_kind(device)) else {
            return Ok(None);
        };
        if path.exists() {
            return Ok(Some(path));
        }
        if self.snapshot_options.require {
            return Err(format!(
                "--require-snapshot: there is no snapshot at {}; take one with `runner snapshot {}`",
                path.display(),
                self.dir.root.display()
            ));
        }
        if matches!(self.snapshot_options.mode, SnapshotMode::Path(_)) {
            tracing::warn!(target: "runner::setup", "no snapshot at {}: loading the weights", path.display());
        }
        Ok(None)
    }

    fn restore_from(
        &self,
        path: &std::path::Path,
        device: &candle_core::Device,
        log: &(dyn Fn(&str) + Sync),
        phases: &mut Vec<(String, Duration)>,
    ) -> Result<(Box<dyn Model>, SnapshotInfo), String> {
        let t = Instant::now();
        let mut snapshot = Snapshot::open(path).map_err(|e| e.to_string())?;
        if let Some(bar) = self.progress_bar("restoring snapshot", snapshot.header.data_bytes) {
            snapshot = snapshot.with_progress(bar);
        }
        snapshot
            .check_compatible(&self.compat_key(device)?)
            .map_err(|e| e.to_string())?;
        phases.push(("snapshot check".to_string(), t.elapsed()));
        // On a GPU, quantized tensors are restored into one arena and then copied into
        // candle's own quantized storage, so for a moment they are held twice (unless the
        // storage borrows them where they lie: `RUNNER_CUDA_QUANTIZED_RESTORE=in-place`).
        let quantized_on_gpu = !device.is_cpu()
            && (!self.dir.weights.gguf.is_empty() || self.quantize.is_some())
            && !runner_models::llama::quantized::quantized_restore_in_place();
        let (needed, what) = if quantized_on_gpu {
            (
                snapshot.header.data_bytes.saturating_mul(2),
                "the snapshot's quantized tensors (held twice while they move into candle's quantized storage)",
            )
        } else {
            (snapshot.header.data_bytes, "the snapshot's tensors")
        };
        runner_models::device::check_fits(device, needed, what)?;
        // The restore runs on its own thread while the model starts building (reading its
        // configuration, parsing its tokenizer); the model waits for the tensors when it
        // first asks for one.
        let finished: Arc<Mutex<Option<(usize, runner_snapshot::RestoreStats, Instant)>>> =
            Arc::default();
        let restore = {
            let (device, finished) = (device.clone(), Arc::clone(&finished));
            move || -> Result<Vec<(String, candle_core::Tensor)>, String> {
                let (tensors, stats) = snapshot.restore(&device).map_err(|e| e.to_string())?;
                *finished.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((tensors.len(), stats, Instant::now()));
                Ok(tensors)
            }
        };
        let ctx = if restore_beside_build(device) {
            let job = std::thread::Builder::new()
                .name("snapshot-restore".into())
                .spawn(restore)
                .map_err(|e| format!("cannot start the snapshot restore: {e}"))?;
            LoadContext::restoring(log, job)
        } else {
            LoadContext::restored(log, restore()?)
        }
        .with_quantize(self.quantize_for_load());
        let built = (self.architecture.load)(&self.dir, device, &ctx);
        // A failed restore (a damaged chunk, say) is what to report, not what the model's
        // load made of the missing tensors.
        ctx.finish_restore()?;
        let model = built.map_err(|e| format!("the snapshot does not fit the model: {e}"))?;
        let built_at = Instant::now();
        let (count, stats, restored_at) = finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or("the snapshot restore did not report")?;
        phases.push(("snapshot restore".to_string(), stats.total));
        // What the build added after the restore finished (the rest overlapped it).
        phases.push((
            "model build".to_string(),
            built_at.saturating_duration_since(restored_at),
        ));
        self.setup_log(&format!(
            "restored {count} tensors ({:.1} MB) from {} in {:.3}s ({:.2} GB/s, read {}{})",
            stats.data_bytes as f64 / 1e6,
            path.display(),
            stats.total.as_secs_f64(),
            stats.gb_per_s(),
            if stats.direct {
                "around the page cache"
            } else {
                "through the page cache"
            },
            stats
                .resident
                .map(|r| format!("; {:.0}% of it was in the page cache", r * 100.0))
                .unwrap_or_default()
        ));
        Ok((
            model,
            SnapshotInfo {
                path: path.to_path_buf(),
                data_bytes: stats.data_bytes,
                restore_seconds: stats.total.as_secs_f64(),
                direct_reads: stats.direct,
                page_cache_resident: stats.resident,
            },
        ))
    }

    /// Writes a snapshot of the tensors the model took at load (setup must have run with
    /// [`EngineOptions::record_for_snapshot`]). `path` defaults to the auto path.
    pub fn write_snapshot(
        &self,
        path: Option<&std::path::Path>,
    ) -> Result<runner_snapshot::WriteReport, String> {
        let device = self
            .device
            .get()
            .ok_or("the model is not loaded: run setup first")?;
        if self.architecture.name == runner_models::PYTHON.name {
            return Err("a Python predictor's state lives in its worker process; snapshots hold native (candle) models only".into());
        }
        let recorded = self
            .recorded
            .as_ref()
            .ok_or("the engine was not set up to record a snapshot")?;
        if self
            .loaded()
            .is_some_and(|l| l.weights_source == "snapshot")
        {
            return Err("the model was restored from a snapshot; load it cold to take a new one (--snapshot off)".into());
        }
        let tensors = recorded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let key = self.compat_key(device)?;
        let path = path
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| self.default_snapshot_path(&key.device_kind));
        let bytes = tensors.iter().map(|(_, t)| t.byte_len()).sum();
        let bar = self.progress_bar("writing snapshot", bytes);
        runner_snapshot::write_with_progress(&path, &key, &tensors, bar).map_err(|e| e.to_string())
    }

    /// Lets go of the tensors the cold load recorded, once a snapshot no longer needs them.
    fn forget_recorded(&self) {
        if let Some(recorded) = &self.recorded {
            recorded.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Restores the snapshot at `path` onto the model's device and compares every tensor,
    /// bit for bit, with the one the cold load recorded (setup must have run with
    /// [`EngineOptions::record_for_snapshot`]).
    pub fn verify_snapshot(&self, path: &std::path::Path) -> Result<VerifyReport, String> {
        let device = self
            .device
            .get()
            .ok_or("the model is not loaded: run setup first")?;
        let recorded = self
            .recorded
            .as_ref()
            .ok_or("the engine was not set up to record a snapshot")?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let snapshot = Snapshot::open(path).map_err(|e| e.to_string())?;
        snapshot
            .check_compatible(&self.compat_key(device)?)
            .map_err(|e| e.to_string())?;
        let (restored, stats) = snapshot.restore(device).map_err(|e| e.to_string())?;
        let restored: std::collections::HashMap<_, _> = restored.into_iter().collect();
        for (name, cold) in &recorded {
            let back = restored
                .get(name)
                .ok_or_else(|| format!("tensor `{name}` is missing from the snapshot"))?;
            if back.dims() != cold.dims() || back.dtype() != cold.dtype() {
                return Err(format!(
                    "tensor `{name}`: restored as {:?} {:?}, loaded as {:?} {:?}",
                    back.dtype(),
                    back.dims(),
                    cold.dtype(),
                    cold.dims()
                ));
            }
            let restored_bytes = back.bytes(name).map_err(|e| e.to_string())?;
            if restored_bytes != cold.bytes(name).map_err(|e| e.to_string())? {
                return Err(format!(
                    "tensor `{name}`: restored bytes differ from the cold load"
                ));
            }
        }
        if restored.len() != recorded.len() {
            return Err(format!(
                "the snapshot holds {} tensors, the cold load {}",
                restored.len(),
                recorded.len()
            ));
        }
        Ok(VerifyReport {
            tensors: recorded.len(),
            data_bytes: stats.data_bytes,
            gb_per_s: stats.gb_per_s(),
        })
    }

    /// Current health, and the setup report.
    /// The predictor's own health check (a Python predictor's `healthcheck()`), for a
    /// server that is ready. Checks asked while one runs share its answer, so a check that
    /// hangs (up to its 5 s limit) does not pile up.
    pub async fn user_healthcheck(&self) -> Result<(), String> {
        let Some(model) = self.model.get().filter(|m| m.has_healthcheck()).cloned() else {
            return Ok(());
        };
        let asked = Instant::now();
        let mut last = self.last_healthcheck.lock().await;
        if let Some((finished, answer)) = &*last {
            if *finished >= asked {
                return answer.clone();
            }
        }
        let answer = tokio::task::spawn_blocking(move || model.healthcheck())
            .await
            .unwrap_or_else(|e| Err(format!("Healthcheck failed: {e}")));
        *last = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Whether the last user health check (see [`Engine::user_healthcheck`]) failed;
    /// false while one runs. Never waits.
    pub fn last_user_healthcheck_failed(&self) -> bool {
        self.last_healthcheck
            .try_lock()
            .is_ok_and(|last| matches!(&*last, Some((_, Err(_)))))
    }

    pub fn health(&self) -> (Health, SetupReport) {
        let state = self.lock();
        let mut setup = state.setup.clone();
        setup.logs = state.setup_logs.clone();
        let defunct = self.model.get().and_then(|m| m.defunct());
        let health = match state.health_before_ready {
            Health::Ready if defunct.is_some() => Health::Defunct,
            Health::Ready if self.slots.available_permits() == 0 => Health::Busy,
            h => h,
        };
        (health, setup)
    }

    /// Validates an input against the schema and completes it (defaults, unknown keys
    /// dropped, file inputs checked for an allowed scheme). No slot is taken.
    pub fn validate(&self, input: &Value) -> Result<Map<String, Value>, Vec<ValidationIssue>> {
        let (input, dropped) = self.validator.prepare(input)?;
        if !dropped.is_empty() {
            tracing::warn!(fields = ?dropped, "dropped unknown input fields");
        }
        let issues = files::check_file_inputs(&self.signature, &input);
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(input)
    }

    /// An in-flight prediction (queued or running) by id.
    pub fn prediction(&self, id: &str) -> Option<Arc<Running>> {
        self.registry().get(id).cloned()
    }
    /// Predictions queued or running.
    pub fn in_flight(&self) -> usize {
        self.registry().len()
    }
    /// Predictions waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
    /// Cancels an in-flight prediction; false when there is none with this id.
    pub fn cancel(&self, id: &str) -> bool {
        self.prediction(id).is_some_and(|p| p.cancel())
    }
    /// Cancels every in-flight prediction (at the end of a shutdown drain).
    pub fn cancel_all(&self) {
        let all: Vec<_> = self.registry().values().cloned().collect();
        for p in all {
            p.cancel();
        }
    }
    /// Waits until no prediction is in flight, or the timeout passes; true when idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }

    /// Validates the input, takes a slot (or a queue place) and starts the prediction in
    /// the background. Await [`Running::wait`] for its end, or follow its events.
    pub fn submit(self: &Arc<Self>, id: String, input: &Value) -> Result<Arc<Running>, Rejection> {
        self.submit_with_context(id, input, Default::default())
    }

    /// [`Engine::submit`] with the request's `context` (strings the caller passed beside
    /// the input; Python predictors read them as `current_scope().context`).
    pub fn submit_with_context(
        self: &Arc<Self>,
        id: String,
        input: &Value,
        context: std::collections::BTreeMap<String, String>,
    ) -> Result<Arc<Running>, Rejection> {
        self.submit_inner(id, input, context, false)
            .inspect_err(|r| self.metrics.rejected(r))
    }

    /// As [`Engine::submit`], but a busy model queues the prediction instead of refusing
    /// it when no `--max-queue` is set (with one, its limit holds): for clients that expect
    /// a server to wait, as OpenAI's do.
    pub fn submit_queued(
        self: &Arc<Self>,
        id: String,
        input: &Value,
    ) -> Result<Arc<Running>, Rejection> {
        self.submit_inner(id, input, Default::default(), true)
            .inspect_err(|r| self.metrics.rejected(r))
    }

    /// Total size of the model's safetensors files.
    pub fn weights_file_bytes(&self) -> u64 {
        self.dir
            .weights
            .safetensors
            .iter()
            .chain(&self.dir.weights.gguf)
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Device memory (in use, total) in bytes, where the device reports it (CUDA).
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        runner_models::device::memory_in_use(self.device.get()?)
    }

    /// Counters for operators (`/metrics`).
    pub fn metrics(&self) -> metrics::MetricsSnapshot {
        self.metrics.snapshot()
    }

    fn submit_inner(
        self: &Arc<Self>,
        id: String,
        input: &Value,
        context: std::collections::BTreeMap<String, String>,
        queue_when_unlimited: bool,
    ) -> Result<Arc<Running>, Rejection> {
        let input = self.validate(input).map_err(Rejection::InvalidInput)?;
        let Some(model) = self.model.get().cloned() else {
            let setup_failed = self.lock().health_before_ready == Health::SetupFailed;
            return Err(Rejection::NotReady { setup_failed });
        };
        let mut registry = self.registry();
        if registry.contains_key(&id) {
            return Err(Rejection::DuplicateId(id));
        }
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if self.max_queue == 0 && queue_when_unlimited => {
                self.queued.fetch_add(1, Ordering::SeqCst);
                None
            }
            Err(_) if self.max_queue == 0 => return Err(Rejection::AtCapacity),
            Err(_) => {
                let taken = self.queued.fetch_add(1, Ordering::SeqCst);
                if taken >= self.max_queue {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    return Err(Rejection::QueueFull);
                }
                None
            }
        };
        // A child of the caller's span (the HTTP request's, with its request id): every
        // line logged for this prediction, on any thread, names both.
        let span = tracing::info_span!("prediction", id = %id);
        let running = Running::new(
            id.clone(),
            Value::Object(input.clone()),
            context,
            span.clone(),
        );
        registry.insert(id, Arc::clone(&running));
        drop(registry);
        let engine = Arc::clone(self);
        let task_running = Arc::clone(&running);
        tokio::spawn(
            async move {
                engine.drive(model, task_running, permit, input).await;
            }
            .instrument(span),
        );
        Ok(running)
    }

    /// Validates, runs and waits for one prediction (for callers without HTTP).
    pub async fn predict(
        self: &Arc<Self>,
        id: String,
        input: &Value,
    ) -> Result<Arc<Running>, Rejection> {
        let running = self.submit(id, input)?;
        let guard = CancelOnDrop(Some(Arc::clone(&running)));
        running.wait().await;
        guard.disarm();
        Ok(running)
    }

    async fn drive(
        self: Arc<Self>,
        model: Arc<dyn Model>,
        running: Arc<Running>,
        permit: Option<OwnedSemaphorePermit>,
        mut input: Map<String, Value>,
    ) {
        let id = running.id().to_string();
        let permit = match permit {
            Some(p) => Some(p),
            None => {
                let _place = QueuePlace(&self.queued);
                tokio::select! {
                    p = Arc::clone(&self.slots).acquire_owned() => p.ok(),
                    _ = running.canceled() => None,
                }
            }
        };
        let outcome = match permit {
            None => Outcome::Canceled,
            Some(permit) if !running.is_canceled() => {
                running.set_processing();
                let outcome = self.run_with_files(model, &running, &mut input).await;
                drop(permit);
                outcome
            }
            Some(_) => Outcome::Canceled,
        };
        // Out of the registry before anyone can see the terminal state: a client that
        // reads it and at once PUTs the same id gets a new prediction, not this one.
        self.registry().remove(&id);
        match outcome {
            Outcome::Succeeded(output) => {
                tracing::debug!("prediction succeeded");
                running.finish(PredictionStatus::Succeeded, Some(output), None)
            }
            Outcome::Failed(error) => {
                tracing::warn!(%error, "prediction failed");
                running.finish(PredictionStatus::Failed, None, Some(error))
            }
            Outcome::Canceled => {
                tracing::info!("prediction canceled");
                running.finish(PredictionStatus::Canceled, None, None)
            }
        }
        self.metrics
            .finished(running.status(), running.predict_time());
        self.metrics
            .tokens(|name| running.metric(name).and_then(|v| v.as_u64()));
        self.idle.notify_waiters();
    }

    async fn run_with_files(
        &self,
        model: Arc<dyn Model>,
        running: &Arc<Running>,
        input: &mut Map<String, Value>,
    ) -> Outcome {
        let needs_dir = self.file_inputs || self.file_outputs;
        let scratch = if needs_dir {
            match tempfile::Builder::new()
                .prefix("runner-prediction-")
                .tempdir()
            {
                Ok(d) => Some(d),
                Err(e) => {
                    return Outcome::Failed(format!(
                        "cannot create a scratch folder for files: {e}"
                    ))
                }
            }
        } else {
            None
        };
        if let Some(dir) = &scratch {
            if self.file_inputs {
                let fetch = files::fetch_inputs(
                    &self.signature,
                    input,
                    dir.path(),
                    &self.files,
                    self.http_client(),
                );
                let result = tokio::select! {
                    r = fetch => r,
                    _ = running.canceled() => return Outcome::Canceled,
                };
                if let Err(e) = result {
                    return Outcome::Failed(e);
                }
            }
        }
        let mut ctx = running.context().clone();
        if let Some(dir) = &scratch {
            let out = dir.path().join("outputs");
            if let Err(e) = std::fs::create_dir_all(&out) {
                return Outcome::Failed(format!("cannot create {}: {e}", out.display()));
            }
            ctx = ctx.with_output_dir(&out);
        }
        let worker_ctx = ctx.clone();
        let model_input = std::mem::take(input);
        let result = match self.batcher.get() {
            // A canceled caller leaves at once; its place in a running batch is discarded.
            Some(batcher) => tokio::select! {
                r = batcher.run(model_input, worker_ctx) => r,
                _ = running.canceled() => Err(PredictError::Canceled),
            },
            None => {
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || {
                    span.in_scope(|| model.predict(&model_input, &worker_ctx))
                })
                .await
                .unwrap_or_else(|e| Err(PredictError::Failed(format!("the model panicked: {e}"))))
            }
        };
        let output = match result {
            Ok(v) => v,
            Err(PredictError::Canceled) => return Outcome::Canceled,
            Err(PredictError::Failed(e)) => return Outcome::Failed(e),
        };
        if ctx.is_canceled() {
            return Outcome::Canceled;
        }
        // An iterator's output is the list of items it streamed.
        let output = match &self.signature.output {
            OutputType::Iterator(_) | OutputType::ConcatenateIterator(_) if output.is_null() => {
                Value::Array(ctx.recorded().outputs)
            }
            _ => output,
        };
        if self.file_outputs {
            match files::encode_outputs(
                &self.signature.output,
                output,
                running.id(),
                &self.files,
                self.http_client(),
            )
            .await
            {
                Ok(v) => Outcome::Succeeded(v),
                Err(e) => Outcome::Failed(e),
            }
        } else {
            Outcome::Succeeded(output)
        }
    }
}

enum Outcome {
    Succeeded(Value),
    Failed(String),
    Canceled,
}

/// Cancels a prediction if the waiting future is dropped (e.g. the client went away).
pub struct CancelOnDrop(Option<Arc<Running>>);

impl CancelOnDrop {
    pub fn new(running: Arc<Running>) -> Self {
        Self(Some(running))
    }
    /// The wait ended normally: nothing to cancel.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(running) = self.0.take() {
            if running.cancel() {
                tracing::info!(
                    id = running.id(),
                    "the client went away: canceling its prediction"
                );
            }
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

/// What [`Engine::verify_snapshot`] checked.
#[derive(Debug, Clone, Copy)]
pub struct VerifyReport {
    pub tensors: usize,
    pub data_bytes: u64,
    pub gb_per_s: f64,
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
        let engine = Engine::new(dir, DeviceSpec::Cpu, EngineOptions::default()).unwrap();
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
        assert_eq!(p.status(), PredictionStatus::Succeeded);
        assert_eq!(p.output().unwrap()["text"], "abab");
        assert!(p.logs().contains("conformance"));

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
            busy.await.unwrap().unwrap().status(),
            PredictionStatus::Succeeded
        );

        let failed = engine
            .predict("e".into(), &json!({"text": "x", "fail": true}))
            .await
            .unwrap();
        assert_eq!(failed.status(), PredictionStatus::Failed);
        assert!(failed.error().unwrap().contains("on purpose"));

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
        let engine = Engine::new(dir, DeviceSpec::Cpu, EngineOptions::default()).unwrap();
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
    async fn queue_absorbs_bursts_and_cancel_frees_places() {
        let (_d, dir) = conformance_dir(1);
        let options = EngineOptions {
            max_queue: 1,
            ..Default::default()
        };
        let engine = Engine::new(dir, DeviceSpec::Cpu, options).unwrap();
        engine.setup().await.unwrap();
        let first = engine
            .submit("a".into(), &json!({"text": "x", "sleep": 0.3}))
            .unwrap();
        let queued = engine.submit("b".into(), &json!({"text": "y"})).unwrap();
        assert_eq!(queued.status(), PredictionStatus::Starting);
        assert_eq!(
            engine
                .submit("c".into(), &json!({"text": "z"}))
                .unwrap_err(),
            Rejection::QueueFull
        );
        assert_eq!(
            engine
                .submit("a".into(), &json!({"text": "z"}))
                .unwrap_err(),
            Rejection::DuplicateId("a".into())
        );
        queued.wait().await;
        assert_eq!(first.status(), PredictionStatus::Succeeded);
        assert_eq!(queued.status(), PredictionStatus::Succeeded);

        // A queued prediction canceled before it starts never runs.
        let _long = engine
            .submit("d".into(), &json!({"text": "x", "sleep": 0.3}))
            .unwrap();
        let waiting = engine.submit("e".into(), &json!({"text": "y"})).unwrap();
        assert!(engine.cancel("e"));
        waiting.wait().await;
        assert_eq!(waiting.status(), PredictionStatus::Canceled);
        assert_eq!(engine.queued(), 0);
        assert!(!engine.cancel("nope"));
        assert!(engine.wait_idle(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn events_arrive_in_order_with_replay() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cog.yaml"), "run: candle:stream\n").unwrap();
        let engine = Engine::new(
            ModelDir::open(d.path()).unwrap(),
            DeviceSpec::Cpu,
            EngineOptions::default(),
        )
        .unwrap();
        engine.setup().await.unwrap();
        let p = engine
            .submit("s".into(), &json!({"prompt": "a b", "delay": 0.05}))
            .unwrap();
        let mut sub = p.subscribe();
        let mut names: Vec<&str> = sub.replay.iter().map(|e| e.name()).collect();
        loop {
            let e = sub.receiver.recv().await.unwrap();
            names.push(e.name());
            if let StreamEvent::Completed(body) = &*e {
                assert_eq!(body["output"], json!(["a ", "b "]));
                assert_eq!(body["metrics"]["token_count"], json!(2));
                assert_eq!(body["status"], "succeeded");
                break;
            }
        }
        assert_eq!(
            names,
            [
                "start",
                "metric",
                "log",
                "output",
                "log",
                "output",
                "completed"
            ]
        );
        // A late subscriber gets everything from the history.
        let late = p.subscribe();
        assert_eq!(late.replay.len(), 7);
    }

    #[tokio::test]
    async fn restored_tensors_are_bit_identical_to_a_cold_load() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("cog.yaml"),
            "model: local/t\nrun: candle:tiny-mlp\nweights:\n  - name: w\n    target: /src/w\n    source: {uri: ./w}\n",
        )
        .unwrap();
        let config = runner_models::tiny_mlp::TinyMlpConfig {
            hidden_size: 256,
            layers: 2,
            dtype: "bf16".into(),
            ..Default::default()
        };
        runner_models::tiny_mlp::write_model(&d.path().join("w"), &config, 3).unwrap();
        let options = EngineOptions {
            record_for_snapshot: true,
            ..Default::default()
        };
        let cold =
            Engine::new(ModelDir::open(d.path()).unwrap(), DeviceSpec::Cpu, options).unwrap();
        cold.setup().await.unwrap();
        let report = cold.write_snapshot(None).unwrap();
        assert_eq!(report.tensors, 8);
        let recorded = cold.recorded.as_ref().unwrap().lock().unwrap().clone();
        assert!(
            recorded
                .iter()
                .all(|(_, t)| t.dtype() == candle_core::DType::BF16),
            "kept as the model holds them"
        );
        let snapshot = Snapshot::open(&report.path).unwrap();
        snapshot
            .check_compatible(&cold.compat_key(&candle_core::Device::Cpu).unwrap())
            .unwrap();
        let (restored, _) = snapshot.restore(&candle_core::Device::Cpu).unwrap();
        assert_eq!(restored.len(), recorded.len());
        for ((n1, a), (n2, b)) in recorded.iter().zip(&restored) {
            assert_eq!(n1, n2);
            let a = &a.tensor().unwrap();
            let bits = |t: &candle_core::Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(a.dims(), b.dims());
            assert_eq!(a.dtype(), b.dtype());
            assert!(
                bits(a)
                    .iter()
                    .zip(bits(b))
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{n1}"
            );
        }

        // --verify's check passes on the good file and refuses a damaged one.
        let checked = cold.verify_snapshot(&report.path).unwrap();
        assert_eq!(checked.tensors, 8);
        let mut bytes = std::fs::read(&report.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last - 4096] ^= 0x10;
        let damaged = d.path().join("damaged.rsnap");
        std::fs::write(&damaged, &bytes).unwrap();
        let e = cold.verify_snapshot(&damaged).unwrap_err();
        assert!(e.contains("checksum"), "{e}");

        // Served from the snapshot: same outputs, and the source says so.
        let options = EngineOptions {
            snapshot: SnapshotOptions {
                mode: SnapshotMode::Auto,
                require: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let warm =
            Engine::new(ModelDir::open(d.path()).unwrap(), DeviceSpec::Cpu, options).unwrap();
        let loaded = warm.setup().await.unwrap();
        assert_eq!(loaded.weights_source, "snapshot");
        let input = runner_models::tiny_mlp::example_input(&config);
        let a = cold.predict("a".into(), &input).await.unwrap().output();
        let b = warm.predict("b".into(), &input).await.unwrap().output();
        assert_eq!(a, b);
        // A cold engine refuses to re-snapshot a restored model.
        let restored_again = EngineOptions {
            snapshot: SnapshotOptions {
                mode: SnapshotMode::Auto,
                require: true,
                ..Default::default()
            },
            record_for_snapshot: true,
            ..Default::default()
        };
        let e = Engine::new(
            ModelDir::open(d.path()).unwrap(),
            DeviceSpec::Cpu,
            restored_again,
        )
        .unwrap();
        e.setup().await.unwrap();
        assert!(e
            .write_snapshot(None)
            .unwrap_err()
            .contains("restored from a snapshot"));
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
        let engine = Engine::new(
            ModelDir::open(d.path()).unwrap(),
            DeviceSpec::Cpu,
            EngineOptions::default(),
        )
        .unwrap();
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
