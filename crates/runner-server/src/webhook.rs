//! Webhook delivery for async predictions, as Cog's server does it: events filtered by
//! `webhook_events_filter`; `start` and `logs` throttled, `output` not; the terminal
//! `completed` webhook retried with backoff until the receiver takes it or a deadline
//! passes; `WEBHOOK_AUTH_TOKEN` sent as a bearer token.
//!
//! Unlike Cog (which fires each webhook from its own task), one task per prediction sends
//! them in order, so a receiver never sees `processing` after `succeeded`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runner_engine::{Running, StreamEvent};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

/// The events a client may ask webhooks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    Start,
    Output,
    Logs,
    Completed,
}

impl WebhookEvent {
    pub fn all() -> Vec<WebhookEvent> {
        vec![Self::Start, Self::Output, Self::Logs, Self::Completed]
    }
}

/// How webhooks are sent.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Sent as `Authorization: Bearer <token>` (Cog's `WEBHOOK_AUTH_TOKEN`).
    pub auth_token: Option<String>,
    /// Least time between throttled (`start`, `logs`) webhooks of one prediction.
    pub throttle: Duration,
    /// Time limit of one webhook request.
    pub request_timeout: Duration,
    /// First retry delay of the terminal webhook; it doubles up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The terminal webhook is retried until this long after the prediction ended.
    pub retry_deadline: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            auth_token: None,
            throttle: Duration::from_millis(500),
            request_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            retry_deadline: Duration::from_secs(600),
        }
    }
}

/// Counts background tasks (webhook deliveries) so a shutdown can wait for them.
#[derive(Debug, Default)]
pub struct TaskCounter {
    count: AtomicUsize,
    done: tokio::sync::Notify,
}

pub struct TaskGuard(Arc<TaskCounter>);

impl TaskCounter {
    pub fn enter(self: &Arc<Self>) -> TaskGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        TaskGuard(Arc::clone(self))
    }
    pub fn active(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
    /// Waits until no task is active or the deadline passes; true when none is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.done.notified();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active() == 0;
            }
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.done.notify_waiters();
    }
}

/// Sends one prediction's webhooks, in order, in the background.
pub fn spawn_delivery(
    client: reqwest::Client,
    config: Arc<WebhookConfig>,
    tasks: &Arc<TaskCounter>,
    running: Arc<Running>,
    url: String,
    filter: HashSet<WebhookEvent>,
) {
    // Subscribe now, so no event is missed whatever the task's start-up delay.
    let subscription = running.subscribe();
    let guard = tasks.enter();
    tokio::spawn(async move {
        let _guard = guard;
        let sender = Sender {
            client,
            config,
            url,
        };
        let mut replay = subscription.replay;
        let mut receiver = subscription.receiver;
        let mut last_throttled: Option<Instant> = None;
        loop {
            let event = match replay.pop_front() {
                Some(e) => e,
                None => match receiver.recv().await {
                    Ok(e) => e,
                    // Missed progress events are harmless: each webhook carries the whole state.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                },
            };
            let kind = match &*event {
                StreamEvent::Start => WebhookEvent::Start,
                StreamEvent::Output { .. } => WebhookEvent::Output,
                StreamEvent::Log { .. } => WebhookEvent::Logs,
                StreamEvent::Metric { .. } => continue,
                StreamEvent::Completed(body) => {
                    if filter.contains(&WebhookEvent::Completed) {
                        sender.send_terminal(running.id(), body).await;
                    }
                    break;
                }
            };
            if !filter.contains(&kind) {
                continue;
            }
            let throttled = matches!(kind, WebhookEvent::Start | WebhookEvent::Logs);
            if throttled && last_throttled.is_some_and(|t| t.elapsed() < sender.config.throttle) {
                continue;
            }
            let body = if kind == WebhookEvent::Start {
                serde_json::json!({"id": running.id(), "logs": "", "metrics": {}, "status": "processing"})
            } else {
                running.progress_body()
            };
            sender.send_once(running.id(), &body).await;
            if throttled {
                last_throttled = Some(Instant::now());
            }
        }
    });
}

struct Sender {
    client: reqwest::Client,
    config: Arc<WebhookConfig>,
    url: String,
}

enum Attempt {
    Delivered,
    Retry(String),
    GiveUp(String),
}

impl Sender {
    async fn attempt(&self, body: &Value) -> Attempt {
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body).unwrap_or_default())
            .timeout(self.config.request_timeout);
        if let Some(token) = &self.config.auth_token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => Attempt::Delivered,
            Ok(r) if matches!(r.status().as_u16(), 408 | 425 | 429 | 500..=599) => {
                Attempt::Retry(format!("the receiver answered {}", r.status()))
            }
            Ok(r) => Attempt::GiveUp(format!("the receiver answered {}", r.status())),
            Err(e) => Attempt::Retry(e.without_url().to_string()),
        }
    }

    async fn send_once(&self, id: &str, body: &Value) {
        match self.attempt(body).await {
            Attempt::Delivered => {}
            Attempt::Retry(why) | Attempt::GiveUp(why) => {
                tracing::warn!(%id, "progress webhook not delivered: {why}")
            }
        }
    }

    async fn send_terminal(&self, id: &str, body: &Value) {
        let deadline = Instant::now() + self.config.retry_deadline;
        let mut delay = self.config.backoff_base;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.attempt(body).await {
                Attempt::Delivered => {
                    tracing::debug!(%id, attempts, "terminal webhook delivered");
                    return;
                }
                Attempt::GiveUp(why) => {
                    tracing::error!(%id, attempts, "terminal webhook refused, not retrying: {why}");
                    return;
                }
                Attempt::Retry(why) => {
                    if Instant::now() + delay > deadline {
                        tracing::error!(%id, attempts, "terminal webhook not delivered before the retry deadline: {why}");
                        return;
                    }
                    tracing::warn!(%id, attempts, retry_in_ms = delay.as_millis() as u64, "terminal webhook failed: {why}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.backoff_max);
                }
            }
        }
    }
}
