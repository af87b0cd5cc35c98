//! Dynamic batching: predictions for a batchable architecture that arrive together are
//! gathered, for at most a short wait, and run as one [`Model::predict_batch`] call.
//!
//! One batch runs at a time; the next one gathers while it runs, so under load batches
//! fill up without any wait. The wait is only spent when more predictions are on their
//! way (more are in flight than gathered, or the last batch was bigger than this one): a
//! lone sequential client never waits.

use std::sync::{Arc, Weak};
use std::time::Duration;

use runner_models::{BatchItem, Model, PredictContext, PredictError};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::Engine;

/// How predictions are gathered into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Predictions per forward pass; 1 turns batching off.
    pub max_batch_size: usize,
    /// The longest a gathered prediction waits for others.
    pub max_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_batch_size: 1,
            max_wait: Duration::from_millis(2),
        }
    }
}

/// One prediction handed to the batcher.
pub(crate) struct BatchJob {
    pub input: Map<String, Value>,
    pub ctx: PredictContext,
    pub reply: oneshot::Sender<Result<Value, PredictError>>,
}

/// Where predictions are sent to be batched.
#[derive(Clone)]
pub(crate) struct Batcher {
    jobs: mpsc::UnboundedSender<BatchJob>,
}

impl Batcher {
    /// Starts the gathering loop. The engine is held weakly (it owns the batcher): its
    /// in-flight count says whether more predictions are coming, and its metrics count
    /// the batches.
    pub fn start(model: Arc<dyn Model>, options: BatchOptions, engine: Weak<Engine>) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        tokio::spawn(gather_and_run(model, options, engine, receiver));
        Self { jobs }
    }

    /// Runs one prediction as part of a batch and returns its own result.
    pub async fn run(
        &self,
        input: Map<String, Value>,
        ctx: PredictContext,
    ) -> Result<Value, PredictError> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(BatchJob { input, ctx, reply })
            .map_err(|_| PredictError::Failed("the batcher has stopped".into()))?;
        result
            .await
            .unwrap_or_else(|_| {
                Err(PredictError::Failed(
                    "the model failed while running this prediction's batch (it panicked; see the server log)".into(),
                ))
            })
    }
}

async fn gather_and_run(
    model: Arc<dyn Model>,
    options: BatchOptions,
    engine: Weak<Engine>,
    mut receiver: mpsc::UnboundedReceiver<BatchJob>,
) {
    let max = options.max_batch_size.max(1);
    let mut last_batch = 0usize;
    while let Some(first) = receiver.recv().await {
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + options.max_wait;
        while jobs.len() < max {
            match receiver.try_recv() {
                Ok(job) => {
                    jobs.push(job);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            let in_flight = engine.upgrade().map_or(0, |e| e.in_flight());
            let more_coming = in_flight > jobs.len() || last_batch > jobs.len();
            if !more_coming || options.max_wait.is_zero() {
                break;
            }
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(job)) => jobs.push(job),
                _ => break,
            }
        }
        // A prediction canceled while it gathered never enters the forward pass.
        let (jobs, canceled): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|j| !j.ctx.is_canceled());
        for job in canceled {
            let _ = job.reply.send(Err(PredictError::Canceled));
        }
        if jobs.is_empty() {
            continue;
        }
        last_batch = jobs.len();
        if let Some(engine) = engine.upgrade() {
            engine.metrics.batch_ran(jobs.len());
        }
        let batch_model = Arc::clone(&model);
        let finished = tokio::task::spawn_blocking(move || {
            let items: Vec<BatchItem<'_>> = jobs
                .iter()
                .map(|j| BatchItem {
                    input: &j.input,
                    ctx: &j.ctx,
                })
                .collect();
            let mut results = batch_model.predict_batch(&items);
            // A model that returns too few results fails the rest rather than hanging them.
            results.resize_with(jobs.len(), || {
                Err(PredictError::Failed(
                    "the model returned no result for this prediction".into(),
                ))
            });
            drop(items);
            for (job, result) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        })
        .await;
        if let Err(e) = finished {
            // The replies were dropped with the task: every caller sees "batch dropped".
            tracing::error!(error = %e, "a batch panicked");
        }
    }
}
