//! Cog's HTTP prediction API over a runner [`Engine`].
//!
//! Status codes and bodies follow Cog 0.23.1's server (coglet): 200 with the prediction
//! (also for failed predictions: failure is data), 202 for `Prefer: respond-async`, an
//! event stream for `Accept: text/event-stream` (406 when the model does not stream), 422
//! with `detail` for invalid input, 409 when every slot is busy, 503 before setup has
//! succeeded, and axum's plain-text 400/415/422 for bodies that are not a JSON prediction
//! request. Differences kept on purpose are listed in `cog-spec/deviations.md`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use runner_engine::{new_prediction_id, CancelOnDrop, Engine, Health, Rejection, Running};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

mod openai;
pub mod webhook;

pub use webhook::{TaskCounter, WebhookConfig, WebhookEvent};

/// Largest request body accepted: Cog's limit.
pub const MAX_BODY_BYTES: usize = 100 * 1024 * 1024;

pub const RUNNER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How the server behaves beyond the engine.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub webhooks: WebhookConfig,
    /// The model directory as the user named it, for the playground's `runner run` line.
    pub model_dir_hint: Option<String>,
    /// When set, every route but `/health-check` and the playground page asks for
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

/// Requests by route and status, and their latency, for `/metrics`. Labels stay bounded:
/// routes are the router's patterns (ids never appear), unmatched paths are one label.
#[derive(Default)]
struct HttpMetrics {
    /// (route, method, status) → count.
    requests: std::sync::Mutex<std::collections::BTreeMap<(String, String, u16), u64>>,
    /// route → cumulative bucket counts (then +Inf) and the sum of seconds.
    latency: std::sync::Mutex<std::collections::BTreeMap<String, (Vec<u64>, f64)>>,
}

const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0,
];

impl HttpMetrics {
    fn observe(&self, route: &str, method: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, sum) = latency
            .entry(route.to_string())
            .or_insert_with(|| (vec![0; LATENCY_BUCKETS.len() + 1], 0.0));
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                buckets[i] += 1;
            }
        }
        buckets[LATENCY_BUCKETS.len()] += 1;
        *sum += seconds;
    }
}

async fn count_requests(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().as_str().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    state.http_metrics.observe(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Routes open without the API key: the health check (for orchestrators) and the static
/// playground page (which asks for the key itself).
const OPEN_ROUTES: [&str; 2] = ["/health-check", "/playground"];

/// Refuses requests without the server's API key (when `--api-key` is set) with 401.
async fn require_api_key(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match api_key_refusal(state.api_key.as_deref(), &request) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

/// The 401 for a request that needs the API key and does not carry it, if it does not.
fn api_key_refusal(key: Option<&str>, request: &axum::extract::Request) -> Option<Response> {
    let key = key?;
    if request.method() == axum::http::Method::GET && OPEN_ROUTES.contains(&request.uri().path()) {
        return None;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"runner\"")],
            Json(json!({"detail": if given.is_some() {
                "wrong API key: send the key runner serve was given (--api-key, RUNNER_API_KEY) as Authorization: Bearer <key>"
            } else {
                "this server needs an API key: send Authorization: Bearer <key> (the key runner serve was given with --api-key or RUNNER_API_KEY)"
            }})),
        )
            .into_response(),
    )
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The header that carries a request's id, in both directions.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A caller's request id is kept when it is short and plain (so it cannot forge log
/// lines or headers); otherwise, or when absent, the server makes one.
fn caller_request_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let plain = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b));
    plain.then(|| value.to_string())
}

/// Gives every request an id: in the `x-request-id` response header and in every log line
/// written while serving it (the prediction it starts included).
async fn request_id(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let id = caller_request_id(request.headers()).unwrap_or_else(new_prediction_id);
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// The id of the request being served (an extension set by [`request_id`]).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The playground with the model directory filled in (HTML-escaped).
fn playground_page(model_dir: Option<&str>) -> String {
    let escaped = model_dir
        .unwrap_or("")
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    PLAYGROUND_HTML.replacen(
        r#"<meta name="runner-model-dir" content="">"#,
        &format!(r#"<meta name="runner-model-dir" content="{escaped}">"#),
        1,
    )
}

/// One self-contained page (HTML, CSS and JS inline): no CDN, works offline.
const PLAYGROUND_HTML: &str = include_str!("playground.html");

async fn playground(State(state): State<AppState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // The page only talks to this server; nothing else may run in it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob: https: http:; media-src 'self' data: blob: https: http:; connect-src 'self'",
            ),
        ],
        state.playground.to_string(),
    )
        .into_response()
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    webhooks: Arc<WebhookConfig>,
    http: reqwest::Client,
    tasks: Arc<TaskCounter>,
    shutdown: Arc<watch::Sender<bool>>,
    http_metrics: Arc<HttpMetrics>,
    /// The playground page, rendered once.
    playground: Arc<str>,
    api_key: Option<Arc<str>>,
}

/// The HTTP server for one engine: its routes, its background webhook deliveries and its
/// shutdown trigger.
#[derive(Clone)]
pub struct Server {
    state: AppState,
}

/// How a shutdown drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Predictions still running when the time limit passed (they were canceled).
    pub canceled: usize,
    /// Webhook deliveries still pending when the server stopped.
    pub webhooks_pending: usize,
}

impl Server {
    pub fn new(engine: Arc<Engine>, options: ServerOptions) -> Self {
        let http = engine.http_client().clone();
        let (shutdown, _) = watch::channel(false);
        Self {
            state: AppState {
                engine,
                webhooks: Arc::new(options.webhooks),
                http,
                tasks: Arc::new(TaskCounter::default()),
                shutdown: Arc::new(shutdown),
                http_metrics: Arc::new(HttpMetrics::default()),
                // With a key, the open page does not show where the model lives.
                playground: playground_page(
                    options
                        .model_dir_hint
                        .as_deref()
                        .filter(|_| options.api_key.is_none()),
                )
                .into(),
                api_key: options.api_key.map(Arc::from),
            },
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(root))
            .route("/health-check", get(health_check))
            .route("/openapi.json", get(openapi))
            .route("/shutdown", post(shutdown))
            .route("/metrics", get(metrics))
            .route("/playground", get(playground))
            .route("/predictions", post(create_prediction))
            .route("/predictions/{id}", put(create_prediction_idempotent))
            .route("/predictions/{id}/cancel", post(cancel_prediction))
            .route("/trainings", post(create_training))
            .route("/trainings/{id}", put(create_training_idempotent))
            .route("/trainings/{id}/cancel", post(cancel_training))
            .route("/v1/models", get(openai::models))
            .route("/v1/models/{id}", get(openai::model))
            .route("/v1/{*rest}", axum::routing::any(openai::unknown_route))
            .route("/v1/embeddings", post(openai::embeddings))
            .route("/v1/chat/completions", post(openai::chat_completions))
            .route("/v1/completions", post(openai::completions))
            .route("/v1/responses", post(openai::responses))
            .route(
                "/v1/responses/{id}",
                get(openai::get_response).delete(openai::delete_response),
            )
            .route("/v1/responses/{id}/input_items", get(openai::input_items))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                require_api_key,
            ))
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                count_requests,
            ))
            .layer(axum::middleware::from_fn(request_id))
            .with_state(self.state.clone())
    }

    /// Asks the server to stop, as `POST /shutdown` does.
    pub fn request_shutdown(&self) {
        self.state.shutdown.send_replace(true);
    }

    /// Resolves once `POST /shutdown` (or [`Server::request_shutdown`]) was called.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.state.shutdown.subscribe();
        let _ = rx.wait_for(|requested| *requested).await;
    }

    /// Lets in-flight predictions finish within `timeout`, cancels the rest, then waits
    /// (within `webhook_timeout`) for their terminal webhooks to be delivered.
    pub async fn drain(&self, timeout: Duration, webhook_timeout: Duration) -> DrainReport {
        let engine = &self.state.engine;
        let mut canceled = 0;
        if !engine.wait_idle(timeout).await {
            canceled = engine.in_flight();
            tracing::warn!(
                canceled,
                "predictions still running at the end of the drain: canceling them"
            );
            engine.cancel_all();
            engine.wait_idle(Duration::from_secs(10)).await;
        }
        self.state.tasks.wait_idle(webhook_timeout).await;
        DrainReport {
            canceled,
            webhooks_pending: self.state.tasks.active(),
        }
    }
}

/// What listens while the engine is being made (a Python predictor's import, which reads
/// its signature, can take seconds): `/health-check` says STARTING and the rest answers
/// 503, as Cog's server does before its worker has loaded. Once `routes` is set, every
/// request goes to them.
pub fn until_ready(
    routes: Arc<std::sync::OnceLock<Router>>,
    mode: runner_engine::Mode,
    api_key: Option<String>,
) -> Router {
    let api_key: Option<Arc<str>> = api_key.filter(|k| !k.is_empty()).map(Arc::from);
    use tower::ServiceExt;
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    Router::new().fallback(move |request: axum::extract::Request| {
        let routes = Arc::clone(&routes);
        let started_at = started_at.clone();
        let api_key = api_key.clone();
        async move {
            if let Some(router) = routes.get() {
                return match router.clone().oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
            }
            if let Some(refusal) = api_key_refusal(api_key.as_deref(), &request) {
                return refusal;
            }
            match request.uri().path() {
                "/health-check" => {
                    return Json(json!({
                        "status": Health::Starting,
                        "setup": {"started_at": started_at, "status": "starting", "logs": ""},
                        "version": {"runner": RUNNER_VERSION, "cog": runner_spec::COG_VERSION},
                    }))
                    .into_response()
                }
                "/" => return Json(root_document(mode)).into_response(),
                // Cog's answer while its worker has not loaded the predictor.
                "/openapi.json" => {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"error": "OpenAPI schema not available"})),
                    )
                        .into_response()
                }
                _ => {}
            }
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "failed", "error": "Setup has not finished yet. Wait until it has finished, or GET /health-check for status."})),
            )
                .into_response()
        }
    })
}

/// The routes for an engine with default options.
pub fn router(engine: Arc<Engine>) -> Router {
    Server::new(engine, ServerOptions::default()).router()
}

async fn root(State(state): State<AppState>) -> Json<Value> {
    Json(root_document(state.engine.mode()))
}

/// The routes this server answers, as Cog's root document lists them.
fn root_document(mode: runner_engine::Mode) -> Value {
    let mut doc = json!({
        "cog_version": runner_spec::COG_VERSION,
        "runner_version": RUNNER_VERSION,
        "openapi_url": "/openapi.json",
        "shutdown_url": "/shutdown",
        "healthcheck_url": "/health-check",
        "predictions_url": "/predictions",
        "predictions_idempotent_url": "/predictions/{prediction_id}",
        "predictions_cancel_url": "/predictions/{prediction_id}/cancel",
        "metrics_url": "/metrics",
        "playground_url": "/playground",
    });
    if mode == runner_engine::Mode::Train {
        doc["trainings_url"] = json!("/trainings");
        doc["trainings_idempotent_url"] = json!("/trainings/{training_id}");
        doc["trainings_cancel_url"] = json!("/trainings/{training_id}/cancel");
    }
    doc
}

async fn health_check(State(state): State<AppState>) -> Json<Value> {
    let engine = &state.engine;
    let (mut health, setup) = engine.health();
    // A ready model's own check runs on every call, as in Cog; a busy one is not asked.
    let mut user_error = None;
    if health == Health::Ready {
        if let Err(why) = engine.user_healthcheck().await {
            health = Health::Unhealthy;
            user_error = Some(why);
        }
    }
    let mut body = json!({
        "status": health,
        "setup": setup,
        "version": {"runner": RUNNER_VERSION, "cog": runner_spec::COG_VERSION},
    });
    if let Some(why) = user_error {
        body["user_healthcheck_error"] = json!(why);
    }
    if let Some(loaded) = engine.loaded() {
        body["runner"] = json!({
            "model": engine.model_name(),
            "architecture": engine.run_target(),
            "device": loaded.device,
            "weights_source": loaded.weights_source,
            "setup_time": loaded.setup_time.as_secs_f64(),
            "setup_phases": loaded.phases.iter().map(|(name, t)| json!({"name": name, "seconds": t.as_secs_f64()})).collect::<Vec<_>>(),
            "snapshot": loaded.snapshot.as_ref().map(|s| json!({
                "path": s.path,
                "bytes": s.data_bytes,
                "restore_seconds": s.restore_seconds,
                "read": if s.direct_reads { "direct" } else { "page cache" },
                "page_cache_resident": s.page_cache_resident,
            })),
            "slots": engine.total_slots(),
            "in_flight": engine.in_flight(),
            "queued": engine.queued(),
            "max_queue": engine.max_queue(),
        });
        // With --save-snapshot, after a cold load: saving, saved or failed (and why).
        if let Some(save) = engine.snapshot_save() {
            body["runner"]["snapshot_save"] = json!(save);
        }
    }
    Json(body)
}

/// Prometheus text exposition (version 0.0.4) of the engine's counters and state.
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render_metrics(&state),
    )
        .into_response()
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes a metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one histogram's samples; `labels` (e.g. `route="/x",`) precede `le`.
fn histogram(out: &mut String, name: &str, labels: &str, buckets: &[(f64, u64)], sum: f64) {
    use std::fmt::Write;
    for (bound, n) in buckets {
        let le = if bound.is_infinite() {
            "+Inf".to_string()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {n}");
    }
    let count = buckets.last().map_or(0, |(_, n)| *n);
    let labels = labels.trim_end_matches(',');
    let braces = |l: &str| {
        if l.is_empty() {
            String::new()
        } else {
            format!("{{{l}}}")
        }
    };
    let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
    let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
}

/// Writes a gauge family with one sample.
fn gauge(out: &mut String, name: &str, help: &str, labels: &str, value: impl std::fmt::Display) {
    use std::fmt::Write;
    family(out, name, "gauge", help);
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}{labels} {value}");
}

fn render_metrics(state: &AppState) -> String {
    use std::fmt::Write;
    let engine = &state.engine;
    let m = engine.metrics();
    let mut out = String::new();

    family(
        &mut out,
        "runner_predictions_total",
        "counter",
        "Predictions that reached a terminal status, by status.",
    );
    for (status, n) in [
        ("succeeded", m.succeeded),
        ("failed", m.failed),
        ("canceled", m.canceled),
    ] {
        let _ = writeln!(out, "runner_predictions_total{{status=\"{status}\"}} {n}");
    }
    family(
        &mut out,
        "runner_prediction_duration_seconds",
        "histogram",
        "Time predictions spent running (predict_time).",
    );
    histogram(
        &mut out,
        "runner_prediction_duration_seconds",
        "",
        &m.duration_buckets,
        m.duration_sum,
    );
    family(
        &mut out,
        "runner_rejections_total",
        "counter",
        "Prediction requests refused before running, by reason.",
    );
    for (reason, n) in &m.rejections {
        let _ = writeln!(out, "runner_rejections_total{{reason=\"{reason}\"}} {n}");
    }
    // Only for models that count tokens (language models, embedders).
    if m.tokens.iter().any(|(_, n)| *n > 0) {
        family(
            &mut out,
            "runner_tokens_total",
            "counter",
            "Tokens of finished predictions, as their models count them: prompt (input), prompt tokens reused from the prompt cache (cached_input), generated (output).",
        );
        for (kind, n) in &m.tokens {
            let _ = writeln!(out, "runner_tokens_total{{kind=\"{kind}\"}} {n}");
        }
    }
    if engine.batching().is_some() {
        family(
            &mut out,
            "runner_batches_total",
            "counter",
            "Forward passes run by dynamic batching.",
        );
        let _ = writeln!(out, "runner_batches_total {}", m.batches);
        family(
            &mut out,
            "runner_batched_predictions_total",
            "counter",
            "Predictions run by dynamic batching (divided by runner_batches_total: the mean batch size).",
        );
        let _ = writeln!(
            out,
            "runner_batched_predictions_total {}",
            m.batched_predictions
        );
    }
    for (name, help, value) in [
        (
            "runner_predictions_in_flight",
            "Predictions queued or running.",
            engine.in_flight(),
        ),
        (
            "runner_predictions_queued",
            "Predictions waiting for a slot.",
            engine.queued(),
        ),
        (
            "runner_predictions_running",
            "Predictions running now (holding a slot).",
            engine.in_flight().saturating_sub(engine.queued()),
        ),
        (
            "runner_slots",
            "Predictions that may run at once.",
            engine.total_slots(),
        ),
        (
            "runner_queue_capacity",
            "Predictions that may wait for a slot (--max-queue).",
            engine.max_queue(),
        ),
        (
            "runner_webhooks_pending",
            "Webhook deliveries in progress or being retried.",
            state.tasks.active(),
        ),
    ] {
        gauge(&mut out, name, help, "", value);
    }

    family(
        &mut out,
        "runner_http_requests_total",
        "counter",
        "HTTP requests answered, by route pattern, method and status.",
    );
    for ((route, method, status), n) in state
        .http_metrics
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "runner_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
            label(route)
        );
    }
    family(
        &mut out,
        "runner_http_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to its response's head, by route pattern.",
    );
    for (route, (counts, sum)) in state
        .http_metrics
        .latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts.iter().copied())
            .collect();
        let labels = format!("route=\"{}\",", label(route));
        histogram(
            &mut out,
            "runner_http_request_duration_seconds",
            &labels,
            &buckets,
            *sum,
        );
    }

    if let Some(rss) = runner_models::device::process_resident_bytes() {
        gauge(
            &mut out,
            "process_resident_memory_bytes",
            "Resident memory of the runner process (weights on the CPU live here).",
            "",
            rss,
        );
    }
    gauge(
        &mut out,
        "runner_build_info",
        "The runner build.",
        &format!(
            "version=\"{RUNNER_VERSION}\",cog_version=\"{}\",candle_version=\"{}\"",
            runner_spec::COG_VERSION,
            runner_engine::CANDLE_VERSION
        ),
        1,
    );
    let (mut health, _) = engine.health();
    // Scraping never runs the predictor's own check; it reports the last answer.
    if health == Health::Ready && engine.last_user_healthcheck_failed() {
        health = Health::Unhealthy;
    }
    let health = serde_json::to_value(health)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    gauge(
        &mut out,
        "runner_health",
        "Current health (1 for the current state).",
        &format!("state=\"{health}\""),
        1,
    );
    if let Some(loaded) = engine.loaded() {
        gauge(
            &mut out,
            "runner_model_info",
            "The served model.",
            &format!(
                "model=\"{}\",architecture=\"{}\",device=\"{}\",weights_source=\"{}\"",
                label(&engine.model_name()),
                label(&engine.run_target()),
                label(&loaded.device),
                loaded.weights_source
            ),
            1,
        );
        let source = format!("weights_source=\"{}\"", loaded.weights_source);
        gauge(
            &mut out,
            "runner_setup_seconds",
            "Time setup took, by where the weights came from.",
            &source,
            loaded.setup_time.as_secs_f64(),
        );
        let loaded_bytes = match &loaded.snapshot {
            Some(snap) => snap.data_bytes,
            None => engine.weights_file_bytes(),
        };
        gauge(
            &mut out,
            "runner_weights_loaded_bytes",
            "Bytes of weights read at setup (snapshot data or weight files).",
            &source,
            loaded_bytes,
        );
        family(
            &mut out,
            "runner_setup_phase_seconds",
            "gauge",
            "Time of each setup phase.",
        );
        for (phase, t) in &loaded.phases {
            let _ = writeln!(
                out,
                "runner_setup_phase_seconds{{phase=\"{}\"}} {}",
                label(phase),
                t.as_secs_f64()
            );
        }
        if let Some(save) = engine.snapshot_save() {
            gauge(
                &mut out,
                "runner_snapshot_save",
                "The snapshot saved after a cold load (--save-snapshot): 1 for its current state.",
                &format!("status=\"{}\"", save.status()),
                1,
            );
        }
        if let Some((used, total)) = engine.device_memory() {
            let device = format!("device=\"{}\"", label(&loaded.device));
            gauge(
                &mut out,
                "runner_device_memory_used_bytes",
                "Memory in use on the model's device (the whole GPU, as its driver reports it).",
                &device,
                used,
            );
            gauge(
                &mut out,
                "runner_device_memory_total_bytes",
                "Memory on the model's device.",
                &device,
                total,
            );
        }
        if let Some(snap) = &loaded.snapshot {
            gauge(
                &mut out,
                "runner_snapshot_restore_bytes",
                "Bytes restored from the snapshot.",
                "",
                snap.data_bytes,
            );
        }
    }
    out
}

async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.engine.openapi_json().to_string(),
    )
        .into_response()
}

async fn shutdown(State(state): State<AppState>) -> Json<Value> {
    tracing::info!("shutdown requested over HTTP");
    state.shutdown.send_replace(true);
    Json(json!({}))
}

#[derive(Debug, Deserialize)]
struct PredictionRequest {
    id: Option<String>,
    #[serde(default)]
    input: Value,
    webhook: Option<String>,
    webhook_events_filter: Option<Vec<WebhookEvent>>,
    /// Per-prediction context: strings Python predictors read as
    /// `current_scope().context`, as in Cog.
    #[serde(default)]
    context: std::collections::BTreeMap<String, String>,
}

impl PredictionRequest {
    fn empty() -> Self {
        Self {
            id: None,
            input: Value::Null,
            webhook: None,
            webhook_events_filter: None,
            context: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sync,
    Async,
    Sse,
}

fn response_mode(headers: &HeaderMap) -> Mode {
    let wants_sse = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| part.split(';').next().map(str::trim) == Some("text/event-stream"));
    let prefers_async = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "respond-async");
    if wants_sse {
        Mode::Sse
    } else if prefers_async {
        Mode::Async
    } else {
        Mode::Sync
    }
}

fn not_streaming() -> Response {
    (
        StatusCode::NOT_ACCEPTABLE,
        Json(json!({"error": "This model does not stream its output, so it cannot answer with an event stream: send the request without `Accept: text/event-stream`."})),
    )
        .into_response()
}

/// Which of Cog's route families a request came in on. A training server (`--mode
/// train`) runs its `train:` function on both, as Cog's does; a prediction server has no
/// trainings to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Predictions,
    Trainings,
}

impl Family {
    fn noun(self) -> &'static str {
        match self {
            Family::Predictions => "prediction",
            Family::Trainings => "training",
        }
    }
}

/// Why a trainings route cannot be served here, if it cannot.
fn refuse_training(state: &AppState, wants_stream: bool) -> Option<Response> {
    if state.engine.mode() != runner_engine::Mode::Train {
        return Some(
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "This server runs predictions. Trainings run on a server started with `--mode train` (Cog: `--x-mode train`), which needs `train:` in cog.yaml."})),
            )
                .into_response(),
        );
    }
    // Cog's words; a training's output is its result, not a stream.
    wants_stream.then(|| {
        (
            StatusCode::NOT_ACCEPTABLE,
            Json(json!({"error": "Training endpoints do not support streaming responses."})),
        )
            .into_response()
    })
}

async fn create_prediction(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Option<Json<PredictionRequest>>,
) -> Response {
    create(state, headers, body, Family::Predictions).await
}

async fn create_training(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Option<Json<PredictionRequest>>,
) -> Response {
    if let Some(refusal) = refuse_training(&state, response_mode(&headers) == Mode::Sse) {
        return refusal;
    }
    create(state, headers, body, Family::Trainings).await
}

async fn create(
    state: AppState,
    headers: HeaderMap,
    body: Option<Json<PredictionRequest>>,
    family: Family,
) -> Response {
    let request = body
        .map(|Json(r)| r)
        .unwrap_or_else(PredictionRequest::empty);
    if request.id.as_deref() == Some("") {
        // A prediction nobody could cancel or attach to (`/predictions//cancel` routes
        // nowhere); Cog would accept it. See cog-spec/deviations.md.
        return invalid_body_id(&format!(
            "the {} ID must not be empty (leave it out to get a generated one)",
            family.noun()
        ));
    }
    let id = request.id.clone().unwrap_or_else(new_prediction_id);
    start(state, id, request, response_mode(&headers)).await
}

/// A 422 for the `id` in a prediction request's body, shaped as Cog's validation errors.
fn invalid_body_id(msg: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"loc": ["body", "id"], "msg": msg, "type": "value_error"}]})),
    )
        .into_response()
}

async fn create_prediction_idempotent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Option<Json<PredictionRequest>>,
) -> Response {
    create_idempotent(state, id, headers, body, Family::Predictions).await
}

async fn create_training_idempotent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Option<Json<PredictionRequest>>,
) -> Response {
    if let Some(refusal) = refuse_training(&state, response_mode(&headers) == Mode::Sse) {
        return refusal;
    }
    create_idempotent(state, id, headers, body, Family::Trainings).await
}

async fn create_idempotent(
    state: AppState,
    id: String,
    headers: HeaderMap,
    body: Option<Json<PredictionRequest>>,
    family: Family,
) -> Response {
    let request = body
        .map(|Json(r)| r)
        .unwrap_or_else(PredictionRequest::empty);
    if request.id.as_ref().is_some_and(|body_id| *body_id != id) {
        return invalid_body_id(&format!(
            "{} ID must match the ID supplied in the URL",
            family.noun()
        ));
    }
    let mode = response_mode(&headers);
    // In flight already: attach to it instead of starting another.
    if let Some(running) = state.engine.prediction(&id) {
        return match mode {
            Mode::Sse if !state.engine.supports_streaming() => not_streaming(),
            Mode::Sse => event_stream(running, None),
            _ => (StatusCode::ACCEPTED, Json(running.body_with_input())).into_response(),
        };
    }
    start(state, id, request, mode).await
}

async fn start(state: AppState, id: String, request: PredictionRequest, mode: Mode) -> Response {
    if mode == Mode::Sse && !state.engine.supports_streaming() {
        return not_streaming();
    }
    // Cog treats a missing or null input as an empty one.
    let input = if request.input.is_null() {
        Value::Object(Map::new())
    } else {
        request.input
    };
    let running = match state
        .engine
        .submit_with_context(id, &input, request.context)
    {
        Ok(r) => r,
        Err(rejection) => return rejection_response(rejection),
    };
    if let Some(url) = request.webhook {
        let filter: HashSet<WebhookEvent> = request
            .webhook_events_filter
            .unwrap_or_else(WebhookEvent::all)
            .into_iter()
            .collect();
        webhook::spawn_delivery(
            state.http.clone(),
            Arc::clone(&state.webhooks),
            &state.tasks,
            Arc::clone(&running),
            url,
            filter,
        );
    }
    match mode {
        Mode::Async => (
            StatusCode::ACCEPTED,
            Json(json!({"id": running.id(), "status": "starting"})),
        )
            .into_response(),
        Mode::Sse => {
            let guard = CancelOnDrop::new(Arc::clone(&running));
            event_stream(running, Some(guard))
        }
        Mode::Sync => {
            // If the client goes away, axum drops this future and the guard cancels.
            let guard = CancelOnDrop::new(Arc::clone(&running));
            running.wait().await;
            guard.disarm();
            (StatusCode::OK, Json(running.sync_body())).into_response()
        }
    }
}

async fn cancel_training(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if let Some(refusal) = refuse_training(&state, false) {
        return refusal;
    }
    cancel_prediction(State(state), Path(id)).await
}

async fn cancel_prediction(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if state.engine.cancel(&id) {
        (StatusCode::OK, Json(json!({}))).into_response()
    } else {
        (StatusCode::NOT_FOUND, Json(json!({}))).into_response()
    }
}

/// A prediction's events as Server-Sent Events, ending after `completed`. `cancel_guard`
/// cancels the prediction if the client disconnects first.
fn event_stream(running: Arc<Running>, cancel_guard: Option<CancelOnDrop>) -> Response {
    struct StreamState {
        running: Arc<Running>,
        replay: std::collections::VecDeque<Arc<runner_engine::StreamEvent>>,
        skipped: u64,
        receiver: tokio::sync::broadcast::Receiver<Arc<runner_engine::StreamEvent>>,
        guard: Option<CancelOnDrop>,
        done: bool,
    }
    let subscription = running.subscribe();
    let state = StreamState {
        running,
        replay: subscription.replay,
        skipped: subscription.skipped,
        receiver: subscription.receiver,
        guard: cancel_guard,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let lost = |skipped: u64| {
            Event::default()
                .event("error")
                .json_data(json!({"error": "the event stream fell behind; events were dropped", "skipped": skipped}))
                .expect("JSON")
        };
        if st.skipped > 0 {
            st.done = true;
            return Some((Ok::<_, Infallible>(lost(st.skipped)), st));
        }
        let event = match st.replay.pop_front() {
            Some(e) => e,
            None => match st.receiver.recv().await {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => {
                    st.done = true;
                    return Some((Ok(lost(n)), st));
                }
                Err(RecvError::Closed) => return None,
            },
        };
        if matches!(*event, runner_engine::StreamEvent::Completed(_)) {
            st.done = true;
            if let Some(guard) = st.guard.take() {
                guard.disarm();
            }
        }
        let sse = Event::default()
            .event(event.name())
            .json_data(event.data(st.running.id()))
            .expect("event data is JSON");
        Some((Ok(sse), st))
    });
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

/// One place maps engine rejections to Cog's status codes.
pub fn rejection_response(rejection: Rejection) -> Response {
    match rejection {
        Rejection::InvalidInput(issues) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": issues.iter().map(|i| i.to_json()).collect::<Vec<_>>()})),
        )
            .into_response(),
        Rejection::AtCapacity => (
            StatusCode::CONFLICT,
            Json(json!({"error": "At capacity - all prediction slots busy", "status": "failed"})),
        )
            .into_response(),
        Rejection::QueueFull => (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"error": "At capacity - all prediction slots busy and the queue is full; retry later", "status": "failed"})),
        )
            .into_response(),
        Rejection::DuplicateId(id) => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("A prediction with id {id:?} is already running; PUT /predictions/{id} attaches to it"), "status": "failed"})),
        )
            .into_response(),
        Rejection::NotReady { setup_failed } => {
            let error = if setup_failed {
                "Setup failed: the model could not be loaded. GET /health-check for the setup logs."
            } else {
                "Setup has not finished yet. Wait until it has finished, or GET /health-check for status."
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": error, "status": "failed"})),
            )
                .into_response()
        }
    }
}

/// Whether the engine is serving (for a ready line or a wait loop).
pub fn is_ready(engine: &Engine) -> bool {
    matches!(engine.health().0, Health::Ready | Health::Busy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use runner_models::DeviceSpec;
    use runner_spec::ModelDir;
    use tower::ServiceExt;

    async fn engine(setup: bool) -> (tempfile::TempDir, Arc<Engine>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cog.yaml"), "run: candle:conformance\n").unwrap();
        let engine = Engine::new(
            ModelDir::open(d.path()).unwrap(),
            DeviceSpec::Cpu,
            Default::default(),
        )
        .unwrap();
        if setup {
            engine.setup().await.unwrap();
        }
        (d, engine)
    }

    async fn call(engine: &Arc<Engine>, req: Request<Body>) -> (StatusCode, String) {
        let res = router(Arc::clone(engine)).oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn post(body: &str) -> Request<Body> {
        Request::post("/predictions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    #[tokio::test]
    async fn a_prediction_server_refuses_trainings_and_does_not_list_them() {
        let (_d, engine) = engine(true).await;
        for req in [
            Request::post("/trainings")
                .header("content-type", "application/json")
                .body(Body::from(r#"{"input": {"text": "hi"}}"#))
                .unwrap(),
            Request::put("/trainings/t1")
                .header("content-type", "application/json")
                .body(Body::from(r#"{"input": {"text": "hi"}}"#))
                .unwrap(),
            Request::post("/trainings/t1/cancel")
                .body(Body::empty())
                .unwrap(),
        ] {
            let (status, body) = call(&engine, req).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
            assert!(body.contains("--mode train"), "{body}");
        }
        // Nothing ran: the refused request must not have become a prediction.
        assert_eq!(engine.in_flight(), 0);
        let (status, body) = call(&engine, Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!body.contains("trainings"), "{body}");
    }

    #[tokio::test]
    async fn train_mode_needs_a_train_key() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cog.yaml"), "run: candle:conformance\n").unwrap();
        let options = runner_engine::EngineOptions {
            mode: runner_engine::Mode::Train,
            ..Default::default()
        };
        let err = Engine::new(ModelDir::open(d.path()).unwrap(), DeviceSpec::Cpu, options)
            .err()
            .expect("no train: key");
        assert!(err.to_string().contains("no `train:` key"), "{err}");
    }

    #[tokio::test]
    async fn predictions_and_errors() {
        let (_d, engine) = engine(true).await;
        let (status, body) = call(
            &engine,
            post(r#"{"id": "p1", "input": {"text": "hi", "extra": 1}}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["id"], "p1");
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["output"]["text"], "hihihi");
        assert!(v["metrics"]["predict_time"].as_f64().unwrap() >= 0.0);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "logs", "metrics", "output", "status"]);

        let (status, body) =
            call(&engine, post(r#"{"input": {"text": "", "color": "pink"}}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["detail"].as_array().unwrap().len(), 2, "{body}");
        assert_eq!(v["detail"][0]["loc"][0], "body");

        let (status, body) = call(&engine, post(r#"{"input": {"text": "x", "fail": true}}"#)).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "failed");
        assert!(v["error"].as_str().unwrap().contains("on purpose"));

        let (status, _) = call(&engine, post("{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = call(
            &engine,
            Request::post("/predictions")
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let (status, body) = call(&engine, post(r#"{"id": "", "input": {"text": "hi"}}"#)).await;
        assert_eq!(status, 422, "{body}");
        let (status, _) = call(&engine, post(r#"{"id": 5}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        // No body at all: an empty input, so the required `text` is reported missing.
        let (status, body) = call(
            &engine,
            Request::post("/predictions").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body.contains("Field required"));
    }

    #[tokio::test]
    async fn not_ready_and_health() {
        let (_d, engine) = engine(false).await;
        let (status, body) = call(
            &engine,
            Request::get("/health-check").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"STARTING\""), "{body}");
        let (status, _) = call(&engine, post(r#"{"input": {"text": "x"}}"#)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, body) = call(
            &engine,
            Request::get("/openapi.json").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, engine.openapi_json());
        let (_, body) = call(&engine, Request::get("/").body(Body::empty()).unwrap()).await;
        assert!(body.contains("predictions_url"));
    }

    #[tokio::test]
    async fn busy_is_409() {
        let (_d, engine) = engine(true).await;
        let slow = {
            let e = Arc::clone(&engine);
            tokio::spawn(async move {
                call(&e, post(r#"{"input": {"text": "x", "sleep": 0.5}}"#)).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let (_, body) = call(
            &engine,
            Request::get("/health-check").body(Body::empty()).unwrap(),
        )
        .await;
        assert!(body.contains("\"BUSY\""), "{body}");
        let (status, body) = call(&engine, post(r#"{"input": {"text": "x"}}"#)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(slow.await.unwrap().0, StatusCode::OK);
    }
}
