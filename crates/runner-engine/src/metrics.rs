//! Counters an operator scrapes: predictions by outcome, their durations, rejections by
//! reason. Kept with atomics so the request path never waits on them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{PredictionStatus, Rejection};

/// Upper bounds (seconds) of the prediction-duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
pub struct EngineMetrics {
    succeeded: AtomicU64,
    failed: AtomicU64,
    canceled: AtomicU64,
    rejected_invalid: AtomicU64,
    rejected_not_ready: AtomicU64,
    rejected_at_capacity: AtomicU64,
    rejected_queue_full: AtomicU64,
    rejected_duplicate: AtomicU64,
    /// Cumulative counts per bucket, then +Inf.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    /// Sum of durations in microseconds.
    sum_micros: AtomicU64,
    /// Forward passes run by the batcher, and the predictions they carried.
    batches: AtomicU64,
    batched_predictions: AtomicU64,
    /// Tokens of finished predictions, from the metrics their models record, by
    /// [`TOKEN_KINDS`].
    tokens: [AtomicU64; TOKEN_KINDS.len()],
}

/// The token counts models record (Cog's language-model metric names), and the label each
/// is counted under.
pub const TOKEN_KINDS: [(&str, &str); 3] = [
    ("input_token_count", "input"),
    ("cached_input_token_count", "cached_input"),
    ("output_token_count", "output"),
];

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    pub succeeded: u64,
    pub failed: u64,
    pub canceled: u64,
    pub rejections: Vec<(&'static str, u64)>,
    /// Cumulative counts for each bucket bound, then for +Inf.
    pub duration_buckets: Vec<(f64, u64)>,
    pub duration_count: u64,
    pub duration_sum: f64,
    pub batches: u64,
    pub batched_predictions: u64,
    /// Tokens by kind label (`input`, `cached_input`, `output`).
    pub tokens: Vec<(&'static str, u64)>,
}

impl EngineMetrics {
    pub(crate) fn finished(&self, status: PredictionStatus, took: Option<Duration>) {
        let counter = match status {
            PredictionStatus::Succeeded => &self.succeeded,
            PredictionStatus::Failed => &self.failed,
            PredictionStatus::Canceled => &self.canceled,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = took {
            let secs = t.as_secs_f64();
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                if secs <= *bound {
                    self.buckets[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            self.buckets[DURATION_BUCKETS.len()].fetch_add(1, Ordering::Relaxed);
            self.sum_micros
                .fetch_add(t.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// Counts the tokens a finished prediction's model recorded.
    pub(crate) fn tokens(&self, recorded: impl Fn(&str) -> Option<u64>) {
        for ((name, _), counter) in TOKEN_KINDS.iter().zip(&self.tokens) {
            if let Some(n) = recorded(name) {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn batch_ran(&self, size: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batched_predictions
            .fetch_add(size as u64, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, r: &Rejection) {
        let counter = match r {
            Rejection::InvalidInput(_) => &self.rejected_invalid,
            Rejection::NotReady { .. } => &self.rejected_not_ready,
            Rejection::AtCapacity => &self.rejected_at_capacity,
            Rejection::QueueFull => &self.rejected_queue_full,
            Rejection::DuplicateId(_) => &self.rejected_duplicate,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut duration_buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| (*b, load(c)))
            .collect();
        let count = load(&self.buckets[DURATION_BUCKETS.len()]);
        duration_buckets.push((f64::INFINITY, count));
        MetricsSnapshot {
            succeeded: load(&self.succeeded),
            failed: load(&self.failed),
            canceled: load(&self.canceled),
            rejections: vec![
                ("invalid_input", load(&self.rejected_invalid)),
                ("not_ready", load(&self.rejected_not_ready)),
                ("at_capacity", load(&self.rejected_at_capacity)),
                ("queue_full", load(&self.rejected_queue_full)),
                ("duplicate_id", load(&self.rejected_duplicate)),
            ],
            duration_buckets,
            duration_count: count,
            duration_sum: load(&self.sum_micros) as f64 / 1e6,
            batches: load(&self.batches),
            batched_predictions: load(&self.batched_predictions),
            tokens: TOKEN_KINDS
                .iter()
                .zip(&self.tokens)
                .map(|((_, label), c)| (*label, load(c)))
                .collect(),
        }
    }
}
