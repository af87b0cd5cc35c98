//! Native architectures, on candle, behind one trait.
//!
//! An architecture declares its Cog signature and loads itself from a model directory
//! onto a device; a loaded [`Model`] turns validated inputs into an output. The engine
//! only sees these two things, never a concrete architecture.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use runner_spec::{ModelDir, RunTarget, Signature};
use serde_json::{Map, Value};

pub mod bert;
mod bert_cpu;
pub mod conformance;
pub mod device;
pub mod files;
pub mod json;
pub mod llama;
pub mod load;
pub mod python;
pub mod stream;
pub mod structured;
pub mod tiny_mlp;
pub mod weights;

pub use device::{DeviceError, DeviceSpec};
pub use weights::WeightsError;

/// Why a model could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
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

/// How a recorded metric combines with an earlier value of the same name (Cog's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricMode {
    /// Overwrite; `null` deletes the metric.
    Replace,
    /// Add to the earlier number (0 when there was none).
    Increment,
    /// Push onto a list (an earlier scalar becomes the list's first item).
    Append,
}

/// Something a running prediction reported, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum PredictEvent {
    /// Log text, ending with a newline.
    Log(String),
    /// One item of an iterator output, and its index.
    Output { chunk: Value, index: u64 },
    Metric {
        name: String,
        value: Value,
        mode: MetricMode,
    },
}

/// Called for every event of a prediction, on the thread that runs it.
pub type EventSink = Arc<dyn Fn(&PredictEvent) + Send + Sync>;

/// What a prediction has reported so far.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    pub logs: String,
    /// Items of an iterator output, in order.
    pub outputs: Vec<Value>,
    /// Metrics recorded by the model, combined as their modes say.
    pub metrics: Map<String, Value>,
}

/// What a running prediction can see and report besides its input: logs, streamed output
/// items, metrics, where to write output files, and whether it was canceled.
#[derive(Clone, Default)]
pub struct PredictContext {
    recorded: Arc<Mutex<Recorded>>,
    canceled: Arc<AtomicBool>,
    sink: Option<EventSink>,
    output_dir: Option<Arc<std::path::Path>>,
    /// The prediction's tracing span (request and prediction ids), so its log lines carry
    /// them even when a batch runs on another thread.
    span: Option<tracing::Span>,
    /// The request's `context` (Cog hands it to Python predictors as
    /// `current_scope().context`).
    request_context: Arc<BTreeMap<String, String>>,
}

impl std::fmt::Debug for PredictContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PredictContext")
            .field("canceled", &self.is_canceled())
            .field("output_dir", &self.output_dir)
            .finish_non_exhaustive()
    }
}

impl PredictContext {
    pub fn new() -> Self {
        Self::default()
    }
    /// A context that also hands every event to `sink` as it happens.
    pub fn with_sink(sink: EventSink) -> Self {
        Self {
            sink: Some(sink),
            ..Self::default()
        }
    }
    /// Log lines are also written to the operator's log inside `span`.
    pub fn with_span(mut self, span: tracing::Span) -> Self {
        self.span = Some(span);
        self
    }
    /// The request's `context`: strings the caller passed beside the input.
    pub fn with_request_context(mut self, context: BTreeMap<String, String>) -> Self {
        self.request_context = Arc::new(context);
        self
    }
    pub fn request_context(&self) -> &BTreeMap<String, String> {
        &self.request_context
    }
    /// Output files are written under `dir` (the engine removes it after the prediction).
    pub fn with_output_dir(mut self, dir: &std::path::Path) -> Self {
        self.output_dir = Some(Arc::from(dir));
        self
    }
    /// Where the model writes output files (`Path` outputs are returned as paths in it).
    pub fn output_dir(&self) -> std::path::PathBuf {
        match &self.output_dir {
            Some(dir) => dir.to_path_buf(),
            None => std::env::temp_dir(),
        }
    }

    fn record(&self, event: PredictEvent) {
        {
            let mut r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
            match &event {
                PredictEvent::Log(text) => r.logs.push_str(text),
                PredictEvent::Output { chunk, .. } => r.outputs.push(chunk.clone()),
                PredictEvent::Metric { name, value, mode } => {
                    apply_metric(&mut r.metrics, name, value.clone(), *mode)
                }
            }
        }
        if let Some(sink) = &self.sink {
            sink(&event);
        }
    }

    /// Appends one line to the prediction's logs.
    pub fn log(&self, line: &str) {
        let mut text = line.to_string();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        if let Some(span) = &self.span {
            span.in_scope(|| tracing::info!(target: "runner::predictor", "{}", text.trim_end()));
        }
        self.record(PredictEvent::Log(text));
    }
    /// Streams one item of an iterator output.
    pub fn emit_output(&self, chunk: Value) {
        let index = self.recorded().outputs.len() as u64;
        self.record(PredictEvent::Output { chunk, index });
    }
    /// Records a metric that appears in the prediction's `metrics`. Keys may be dotted
    /// paths (`timing.encode`) that nest objects; an empty segment is ignored.
    pub fn record_metric(&self, name: &str, value: Value, mode: MetricMode) {
        if name.is_empty() || name.split('.').any(str::is_empty) {
            tracing::warn!(name, "ignoring a metric with an empty name or path segment");
            return;
        }
        self.record(PredictEvent::Metric {
            name: name.to_string(),
            value,
            mode,
        });
    }
    /// A copy of what has been reported so far.
    pub fn recorded(&self) -> Recorded {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// One recorded metric's value, without copying the rest.
    pub fn metric(&self, name: &str) -> Option<Value> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metrics
            .get(name)
            .cloned()
    }
    pub fn logs(&self) -> String {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .logs
            .clone()
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

/// Combines a metric into `metrics` the way Cog does: dotted names nest objects; replace
/// (null deletes), increment (integers stay integers), append (scalars become lists).
pub fn apply_metric(metrics: &mut Map<String, Value>, name: &str, value: Value, mode: MetricMode) {
    let mut parts: Vec<&str> = name.split('.').collect();
    let leaf = parts.pop().unwrap_or(name);
    let mut current = metrics;
    for part in parts {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        current = entry.as_object_mut().expect("made an object above");
    }
    match mode {
        MetricMode::Replace => {
            if value.is_null() {
                current.remove(leaf);
            } else {
                current.insert(leaf.to_string(), value);
            }
        }
        MetricMode::Increment => {
            let entry = current.entry(leaf.to_string()).or_insert(Value::from(0));
            if let (Some(a), Some(b)) = (entry.as_i64(), value.as_i64()) {
                *entry = Value::from(a.wrapping_add(b));
            } else if let (Some(a), Some(b)) = (entry.as_u64(), value.as_u64()) {
                *entry = Value::from(a.wrapping_add(b));
            } else if let (Some(a), Some(b)) = (entry.as_f64(), value.as_f64()) {
                if let Some(n) = serde_json::Number::from_f64(a + b) {
                    *entry = Value::Number(n);
                }
            }
        }
        MetricMode::Append => {
            let entry = current
                .entry(leaf.to_string())
                .or_insert(Value::Array(Vec::new()));
            match entry {
                Value::Array(items) => items.push(value),
                other => {
                    let earlier = other.take();
                    *other = Value::Array(vec![earlier, value]);
                }
            }
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

    /// Why the model can no longer predict (a Python worker that died), if it cannot:
    /// `/health-check` then reports `DEFUNCT`.
    fn defunct(&self) -> Option<String> {
        None
    }

    /// The model's own health check, asked on `GET /health-check` while the server is
    /// ready: a Python predictor's `healthcheck()`, as Cog runs it. `Err` says why the
    /// model is unhealthy (`/health-check` then reports `UNHEALTHY`); it may block for a
    /// few seconds.
    fn healthcheck(&self) -> Result<(), String> {
        Ok(())
    }

    /// Whether [`Model::healthcheck`] checks anything (a Python predictor that defines
    /// `healthcheck()`): when not, a health check asks the model nothing.
    fn has_healthcheck(&self) -> bool {
        false
    }

    /// For text generators: the prompt a conversation makes through the model's chat
    /// template (what OpenAI-style chat requests send). `None`: the model has no chat form.
    fn chat_prompt(&self, _messages: &[ChatMessage]) -> Option<Result<String, PredictError>> {
        None
    }

    /// For text generators: how many tokens `text` is as a prompt.
    fn count_tokens(&self, _text: &str) -> Option<Result<usize, PredictError>> {
        None
    }

    /// For text generators: how many tokens prompt and output may hold together.
    fn context_length(&self) -> Option<usize> {
        None
    }

    /// For text generators: how many token ids the vocabulary has (ids are below it).
    fn vocabulary_size(&self) -> Option<usize> {
        None
    }

    /// Runs several predictions together (dynamic batching); one result per item, in
    /// order. Each item keeps its own context, so logs, metrics and cancellation stay its
    /// own. Only called for architectures whose [`Architecture::batching`] is true; the
    /// default runs the items one by one.
    fn predict_batch(&self, batch: &[BatchItem<'_>]) -> Vec<Result<Value, PredictError>> {
        batch
            .iter()
            .map(|item| self.predict(item.input, item.ctx))
            .collect()
    }
}

/// One turn of a conversation, for [`Model::chat_prompt`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever else the template knows).
    pub role: String,
    pub content: String,
}

/// Which OpenAI-compatible routes an architecture answers (runner's addition to Cog's API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAi {
    None,
    /// `/v1/embeddings`: the input `text` takes a string or a list, and `normalize`.
    Embeddings,
    /// `/v1/chat/completions` and `/v1/completions`: the inputs `prompt`,
    /// `use_chat_template`, `max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`,
    /// `stop`, and the output a concatenate-iterator of strings.
    TextGeneration,
}

impl OpenAi {
    /// What a Python predictor's signature offers by its shape: a `prompt` string in and
    /// text out (a string, or an iterator of strings, as Replicate's language models
    /// return) is a text generator.
    pub fn of_signature(signature: &Signature) -> OpenAi {
        use runner_spec::{FieldType, OutputType, Primitive};
        let text = |t: &OutputType| matches!(t, OutputType::Prim(Primitive::Str));
        let text_out = match &signature.output {
            OutputType::Iterator(item) | OutputType::ConcatenateIterator(item) => text(item),
            other => text(other),
        };
        let prompt_in = signature
            .inputs
            .iter()
            .any(|i| i.name == "prompt" && i.ty == FieldType::Prim(Primitive::Str));
        if text_out && prompt_in {
            OpenAi::TextGeneration
        } else if EmbeddingInput::of(signature).is_some() {
            OpenAi::Embeddings
        } else {
            OpenAi::None
        }
    }
}

/// How a model takes the texts `/v1/embeddings` embeds, read from its signature: an input
/// of texts (`texts`, `text`, `input`, `inputs`, `sentences`, `sentence`, `documents`,
/// `query`, the first there is), and vectors of floats out. A `str` input with `List[float]`
/// out embeds one text per prediction (the shape Cog can type: it refuses
/// `List[List[float]]`); a `List[str]` input with `List[List[float]]` out, or `Any` out from
/// an architecture that declares itself an embedder ([`EmbeddingInput::of_declared`]), all
/// of them in one prediction. Every other input needs a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingInput {
    pub name: String,
    /// One prediction takes the whole list; otherwise one prediction per text.
    pub list: bool,
    /// The model has a boolean `normalize` input (set, for OpenAI's unit vectors).
    pub normalize: bool,
}

impl EmbeddingInput {
    /// From the signature's types alone.
    pub fn of(signature: &Signature) -> Option<Self> {
        Self::read(signature, false)
    }

    /// For a model known to embed (its architecture says so): an `Any` output is taken as
    /// the list of vectors.
    pub fn of_declared(signature: &Signature) -> Option<Self> {
        Self::read(signature, true)
    }

    fn read(signature: &Signature, declared: bool) -> Option<Self> {
        use runner_spec::{FieldType, OutputType, Primitive};
        const NAMES: &[&str] = &[
            "texts",
            "text",
            "input",
            "inputs",
            "sentences",
            "sentence",
            "documents",
            "query",
        ];
        let vector = |t: &OutputType| matches!(t, OutputType::List(item) if **item == OutputType::Prim(Primitive::Float));
        let list = match &signature.output {
            OutputType::List(item) if vector(item) => true,
            output if vector(output) => false,
            OutputType::Prim(Primitive::Any) if declared => true,
            _ => return None,
        };
        fn takes(ty: &FieldType, list: bool) -> bool {
            match ty {
                FieldType::List(Primitive::Str) => list,
                FieldType::Prim(Primitive::Str) => !list,
                FieldType::Union(types) => types.iter().any(|t| takes(t, list)),
                _ => false,
            }
        }
        let field = NAMES.iter().find_map(|name| {
            signature
                .inputs
                .iter()
                .find(|i| i.name == *name && takes(&i.ty, list))
        })?;
        let normalize = signature
            .inputs
            .iter()
            .any(|i| i.name == "normalize" && i.ty == FieldType::Prim(Primitive::Bool));
        let others_have_defaults = signature
            .inputs
            .iter()
            .filter(|i| i.name != field.name)
            .all(|i| i.default.is_some() || i.optional);
        others_have_defaults.then(|| EmbeddingInput {
            name: field.name.clone(),
            list,
            normalize,
        })
    }
}

/// One prediction of a batch: its validated input and its own context.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    pub input: &'a Map<String, Value>,
    pub ctx: &'a PredictContext,
}

/// Where setup reports progress; lines end up in `/health-check`'s setup logs.
pub type SetupLog<'a> = &'a (dyn Fn(&str) + Sync);

/// Loads an architecture from a model directory onto a device.
pub type LoadFn =
    fn(&ModelDir, &candle_core::Device, &LoadContext) -> Result<Box<dyn Model>, LoadError>;

pub use load::LoadContext;

/// A native architecture.
pub struct Architecture {
    pub name: &'static str,
    pub summary: &'static str,
    pub signature: fn() -> Signature,
    pub load: LoadFn,
    /// An input for a quick prediction (warm-up checks, benchmarks).
    pub example_input: fn(&ModelDir) -> Value,
    /// How load converts weights; part of a snapshot's compatibility key.
    pub dtype_policy: &'static str,
    /// Whether concurrent predictions may be gathered into one forward pass
    /// ([`Model::predict_batch`] computes each item as if it ran alone).
    pub batching: bool,
    /// Whether loading reads weight files (the test architectures compute without any).
    pub needs_weights: bool,
    /// The OpenAI-compatible routes it answers.
    pub openai: OpenAi,
}

/// A Python Cog predictor: its signature comes from the predictor
/// ([`python::describe`]), not from this entry.
pub const PYTHON: Architecture = Architecture {
    name: "python",
    summary: "a Python Cog predictor, run by a worker process in the user's Python",
    signature: || Signature {
        inputs: Vec::new(),
        output: runner_spec::OutputType::Prim(runner_spec::Primitive::Any),
        streaming: false,
    },
    load: python::load,
    example_input: |_| serde_json::json!({}),
    dtype_policy: "python",
    batching: false,
    needs_weights: false,
    openai: OpenAi::None,
};

/// Every native architecture runner knows.
pub const ARCHITECTURES: &[Architecture] = &[
    bert::ARCHITECTURE,
    conformance::ARCHITECTURE,
    files::ARCHITECTURE,
    llama::ARCHITECTURE,
    stream::ARCHITECTURE,
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
        RunTarget::Python { .. } => Ok(&PYTHON),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The architecture's OpenAPI document is byte-identical to the one Cog 0.23.1's
    /// generator wrote for its Python twin.
    pub fn assert_cog_schema(name: &str, signature: &Signature) {
        let path = format!(
            "{}/../../cog-spec/cog-0.23.1-schemas/{name}/openapi_schema.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let theirs = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let ours = runner_spec::openapi::to_cog_json(&runner_spec::openapi::document(signature));
        assert!(
            ours == theirs,
            "{name}: runner's schema differs from {path}"
        );
    }

    #[test]
    fn metrics_combine_as_cog_does() {
        let mut m = Map::new();
        apply_metric(&mut m, "count", json!(1), MetricMode::Increment);
        apply_metric(&mut m, "count", json!(3), MetricMode::Increment);
        apply_metric(&mut m, "temp", json!(0.5), MetricMode::Replace);
        apply_metric(&mut m, "temp", json!(0.25), MetricMode::Increment);
        apply_metric(&mut m, "steps", json!("a"), MetricMode::Append);
        apply_metric(&mut m, "steps", json!("b"), MetricMode::Append);
        apply_metric(&mut m, "timing.encode", json!(2), MetricMode::Replace);
        apply_metric(&mut m, "timing.decode", json!(1), MetricMode::Increment);
        apply_metric(&mut m, "gone", json!(1), MetricMode::Replace);
        apply_metric(&mut m, "gone", Value::Null, MetricMode::Replace);
        apply_metric(&mut m, "scalar", json!(1), MetricMode::Replace);
        apply_metric(&mut m, "scalar", json!(2), MetricMode::Append);
        assert_eq!(
            Value::Object(m),
            json!({"count": 4, "temp": 0.75, "steps": ["a", "b"],
                   "timing": {"encode": 2, "decode": 1}, "scalar": [1, 2]})
        );
    }

    #[test]
    fn context_reports_events_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = Arc::clone(&seen);
        let ctx = PredictContext::with_sink(Arc::new(move |e: &PredictEvent| {
            sink_seen.lock().unwrap().push(e.clone())
        }));
        ctx.log("a");
        ctx.emit_output(json!("x"));
        ctx.record_metric("", json!(1), MetricMode::Replace);
        ctx.record_metric("n", json!(1), MetricMode::Increment);
        ctx.emit_output(json!("y"));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0], PredictEvent::Log("a\n".into()));
        assert_eq!(
            seen[3],
            PredictEvent::Output {
                chunk: json!("y"),
                index: 1
            }
        );
        assert_eq!(ctx.recorded().metrics["n"], json!(1));
    }
}
