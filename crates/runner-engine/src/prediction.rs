//! One prediction's state from submission to its terminal status, and the ordered event
//! stream (start, output, log, metric, completed) that SSE clients and webhooks follow.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runner_models::{MetricMode, PredictContext, PredictEvent};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch, Notify};

/// A prediction's status, as Cog spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictionStatus {
    Starting,
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl PredictionStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

/// What happened in a prediction, in order; the names are Cog's SSE event names.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The prediction started running (status `processing`).
    Start,
    Output {
        chunk: Value,
        index: u64,
    },
    Log {
        data: String,
    },
    Metric {
        name: String,
        value: Value,
        mode: MetricMode,
    },
    /// The terminal state, as a full prediction body.
    Completed(Value),
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Output { .. } => "output",
            Self::Log { .. } => "log",
            Self::Metric { .. } => "metric",
            Self::Completed(_) => "completed",
        }
    }
    /// The event's JSON data, as Cog's server sends it.
    pub fn data(&self, id: &str) -> Value {
        match self {
            Self::Start => json!({"id": id, "status": "processing"}),
            Self::Output { chunk, index } => json!({"chunk": chunk, "index": index}),
            Self::Log { data } => json!({"data": data, "source": "stdout"}),
            Self::Metric { name, value, mode } => {
                json!({"mode": mode, "name": name, "value": value})
            }
            Self::Completed(body) => body.clone(),
        }
    }
}

/// Events kept for subscribers that arrive late (a PUT re-attach, a slow SSE client).
const HISTORY_CAPACITY: usize = 1024;

struct Inner {
    status: PredictionStatus,
    started: Option<Instant>,
    predict_time: Option<Duration>,
    output: Option<Value>,
    error: Option<String>,
    history: VecDeque<Arc<StreamEvent>>,
    skipped: u64,
}

/// A prediction the engine has accepted: queued, running or just finished.
pub struct Running {
    id: String,
    input: Value,
    ctx: PredictContext,
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<StreamEvent>>,
    done: watch::Sender<bool>,
    canceled: Notify,
}

/// A subscription to a prediction's events: what already happened, then what comes.
pub struct Subscription {
    pub replay: VecDeque<Arc<StreamEvent>>,
    /// Events that fell out of the history before this subscriber came.
    pub skipped: u64,
    pub receiver: broadcast::Receiver<Arc<StreamEvent>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("id", &self.id)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Running {
    pub(crate) fn new(
        id: String,
        input: Value,
        request_context: std::collections::BTreeMap<String, String>,
        span: tracing::Span,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(HISTORY_CAPACITY);
        let (done, _) = watch::channel(false);
        Arc::new_cyclic(|weak: &std::sync::Weak<Running>| {
            let weak = weak.clone();
            let sink = Arc::new(move |event: &PredictEvent| {
                if let Some(running) = weak.upgrade() {
                    running.emit(match event {
                        PredictEvent::Log(data) => StreamEvent::Log { data: data.clone() },
                        PredictEvent::Output { chunk, index } => StreamEvent::Output {
                            chunk: chunk.clone(),
                            index: *index,
                        },
                        PredictEvent::Metric { name, value, mode } => StreamEvent::Metric {
                            name: name.clone(),
                            value: value.clone(),
                            mode: *mode,
                        },
                    });
                }
            });
            Running {
                id,
                input,
                ctx: PredictContext::with_sink(sink)
                    .with_span(span)
                    .with_request_context(request_context),
                inner: Mutex::new(Inner {
                    status: PredictionStatus::Starting,
                    started: None,
                    predict_time: None,
                    output: None,
                    error: None,
                    history: VecDeque::new(),
                    skipped: 0,
                }),
                events,
                done,
                canceled: Notify::new(),
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records and broadcasts an event; under the lock, so a subscriber sees each event
    /// exactly once (in its replay or from its receiver).
    fn emit(&self, event: StreamEvent) {
        let event = Arc::new(event);
        let mut inner = self.lock();
        if inner.history.len() == HISTORY_CAPACITY {
            inner.history.pop_front();
            inner.skipped += 1;
        }
        inner.history.push_back(Arc::clone(&event));
        let _ = self.events.send(event);
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    /// The validated input, as the model received it.
    pub fn input(&self) -> &Value {
        &self.input
    }
    pub fn status(&self) -> PredictionStatus {
        self.lock().status
    }
    pub(crate) fn context(&self) -> &PredictContext {
        &self.ctx
    }

    /// Asks the prediction to stop; a queued one never starts. Returns false once it has
    /// finished.
    pub fn cancel(&self) -> bool {
        if self.status().is_terminal() {
            return false;
        }
        self.ctx.cancel();
        self.canceled.notify_one();
        true
    }
    pub fn is_canceled(&self) -> bool {
        self.ctx.is_canceled()
    }
    pub(crate) async fn canceled(&self) {
        if !self.is_canceled() {
            self.canceled.notified().await;
        }
    }

    pub fn subscribe(&self) -> Subscription {
        let inner = self.lock();
        Subscription {
            replay: inner.history.clone(),
            skipped: inner.skipped,
            receiver: self.events.subscribe(),
        }
    }

    /// Waits until the prediction has reached a terminal status.
    pub async fn wait(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    pub(crate) fn set_processing(&self) {
        {
            let mut inner = self.lock();
            inner.status = PredictionStatus::Processing;
            inner.started = Some(Instant::now());
        }
        self.emit(StreamEvent::Start);
    }

    pub(crate) fn finish(
        &self,
        status: PredictionStatus,
        output: Option<Value>,
        error: Option<String>,
    ) {
        {
            let mut inner = self.lock();
            if inner.status.is_terminal() {
                return;
            }
            inner.status = status;
            inner.predict_time = Some(inner.started.map(|s| s.elapsed()).unwrap_or_default());
            inner.output = output;
            inner.error = error;
        }
        let body = self.body();
        self.emit(StreamEvent::Completed(body));
        self.done.send_replace(true);
    }

    pub fn predict_time(&self) -> Option<Duration> {
        self.lock().predict_time
    }
    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }
    /// The final output of a succeeded prediction.
    pub fn output(&self) -> Option<Value> {
        self.lock().output.clone()
    }
    /// A metric the model recorded (e.g. `output_token_count`).
    pub fn metric(&self, name: &str) -> Option<Value> {
        self.ctx.metric(name)
    }
    pub fn logs(&self) -> String {
        self.ctx.logs()
    }

    /// The prediction as Cog's server reports it in webhooks and SSE `completed` events:
    /// `{error?, id, logs, metrics, output?, status}`. Streamed items so far are the output
    /// until the prediction succeeds; `predict_time` appears once it is terminal.
    pub fn body(&self) -> Value {
        let recorded = self.ctx.recorded();
        let inner = self.lock();
        let mut body = Map::new();
        if let Some(error) = &inner.error {
            body.insert("error".into(), json!(error));
        }
        body.insert("id".into(), json!(self.id));
        body.insert("logs".into(), json!(recorded.logs));
        let mut metrics = recorded.metrics;
        if let Some(t) = inner.predict_time {
            metrics.insert("predict_time".into(), json!(t.as_secs_f64()));
        }
        body.insert("metrics".into(), Value::Object(metrics));
        if let Some(output) = &inner.output {
            body.insert("output".into(), output.clone());
        } else if !recorded.outputs.is_empty() {
            body.insert("output".into(), Value::Array(recorded.outputs));
        }
        body.insert("status".into(), json!(inner.status));
        Value::Object(body)
    }

    /// The prediction as it was while running, for `start`, `output` and `logs` webhooks
    /// that are sent after the fact: status `processing`, the items streamed so far, and no
    /// terminal fields even if it has finished meanwhile.
    pub fn progress_body(&self) -> Value {
        let recorded = self.ctx.recorded();
        let mut body = Map::new();
        body.insert("id".into(), json!(self.id));
        body.insert("logs".into(), json!(recorded.logs));
        body.insert("metrics".into(), Value::Object(recorded.metrics));
        if !recorded.outputs.is_empty() {
            body.insert("output".into(), Value::Array(recorded.outputs));
        }
        body.insert("status".into(), json!("processing"));
        Value::Object(body)
    }

    /// The body of a synchronous response: as [`Running::body`], without a partial output
    /// for a failed or canceled prediction (Cog's sync answer carries none).
    pub fn sync_body(&self) -> Value {
        let mut body = self.body();
        if self.status() != PredictionStatus::Succeeded {
            if let Some(map) = body.as_object_mut() {
                map.shift_remove("output");
            }
        }
        body
    }

    /// The body of an in-flight prediction for `PUT` re-attachment: with its input.
    pub fn body_with_input(&self) -> Value {
        let mut body = self.body();
        if let Some(map) = body.as_object_mut() {
            let mut with_input = Map::new();
            for (k, v) in std::mem::take(map) {
                if k == "logs" {
                    with_input.insert("input".into(), self.input.clone());
                }
                with_input.insert(k, v);
            }
            *map = with_input;
        }
        body
    }
}
