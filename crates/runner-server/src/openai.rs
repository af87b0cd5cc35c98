//! OpenAI-compatible routes, runner's addition to Cog's API: `/v1/models`,
//! `/v1/embeddings` for embedding models, and `/v1/chat/completions`, `/v1/completions` and
//! `/v1/responses` for text generators (runner's own, and Python Cog language models), so the OpenAI SDKs
//! and the tools built on them can use a model runner serves. Each request becomes an
//! ordinary prediction built from the model's own Cog inputs: it takes a slot, can wait in
//! the queue, is canceled when its client leaves, and shows in the logs and `/metrics`.
//! Answers and errors have OpenAI's shapes.
//!
//! For runner's own models, OpenAI's defaults replace the model's Cog defaults: temperature
//! 1, top_p 1, no top-k, no repetition penalty, and generation until the end of the turn
//! (chat) or 16 tokens (completions). A Python predictor keeps its own defaults for what a
//! request leaves out. What a model cannot do (log probabilities, tools or penalties for a
//! model without such inputs, `best_of`, image parts) is refused with a 400 naming the
//! parameter, never silently ignored.

mod responses;
mod tools;

pub(crate) use responses::{delete_response, get_response, input_items, responses};

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use runner_engine::{new_prediction_id, CancelOnDrop, Engine, Rejection, Running, StreamEvent};
use runner_models::{ChatMessage, OpenAi};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::AppState;

/// An OpenAI-shaped error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }
    fn unsupported(param: &str, what: &str) -> Self {
        Self::invalid(
            Some(param),
            format!("`{param}`: {what} is not supported by runner"),
        )
    }
    /// A parameter the model has no input for.
    fn not_taken(param: &str, inputs: &TextInputs) -> Self {
        let mut names: Vec<&str> = inputs.names.iter().map(String::as_str).collect();
        names.sort_unstable();
        Self::invalid(
            Some(param),
            format!(
                "`{param}`: this model has no input for it (its inputs: {})",
                names.join(", ")
            ),
        )
    }
    fn json(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.json())).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            // The SDKs honour it before their automatic retry.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// A request's JSON body, if this model serves `route` (it serves what `serves` names).
fn request_for(
    engine: &Engine,
    serves: OpenAi,
    route: &str,
    body: &Bytes,
) -> Result<Map<String, Value>, ApiError> {
    if engine.openai() != serves {
        return Err(wrong_model(engine, route));
    }
    parse_body(body)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body as a JSON object, or OpenAI's 400.
fn parse_body(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid(
            None,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// A route for another kind of model: 404, saying which routes this one answers.
fn wrong_model(engine: &Engine, route: &str) -> ApiError {
    let offered = match engine.openai() {
        OpenAi::Embeddings => "it answers /v1/embeddings",
        OpenAi::TextGeneration => {
            "it answers /v1/chat/completions, /v1/completions and /v1/responses"
        }
        OpenAi::None => "it has no OpenAI-compatible routes; use Cog's POST /predictions",
    };
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "{route}: the model `{}` ({}) does not serve this route; {offered}",
            engine.model_name(),
            engine.run_target()
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("unsupported_route"),
    }
}

fn not_loaded() -> ApiError {
    rejection(
        Rejection::NotReady {
            setup_failed: false,
        },
        &str::to_string,
    )
}

/// Maps an engine refusal to OpenAI's statuses; `param_of` names an input's parameter.
fn rejection(rejection: Rejection, param_of: &dyn Fn(&str) -> String) -> ApiError {
    match rejection {
        Rejection::InvalidInput(issues) => {
            let first_param = issues
                .first()
                .and_then(|i| i.loc.get(2))
                .and_then(Value::as_str)
                .map(param_of);
            let message = issues
                .iter()
                .map(|i| {
                    let name = i.loc.get(2).and_then(Value::as_str).map(param_of);
                    match name {
                        Some(name) => format!("`{name}`: {}", i.msg),
                        None => i.msg.clone(),
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            ApiError::invalid(first_param.as_deref(), message)
        }
        Rejection::AtCapacity | Rejection::QueueFull => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "every prediction slot is busy; retry shortly (runner serve --max-queue lets requests wait instead)".into(),
            kind: "server_error",
            param: None,
            code: Some("at_capacity"),
        },
        Rejection::DuplicateId(_) => ApiError::invalid(None, "duplicate request id"),
        Rejection::NotReady { setup_failed } => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: if setup_failed {
                "the model failed to load; GET /health-check for the setup logs".into()
            } else {
                "the model is not loaded yet (GET /health-check says when it is)".into()
            },
            kind: "server_error",
            param: None,
            code: Some("not_ready"),
        },
    }
}

/// Waits for submitted predictions: their finished bodies, in order, or the first failure
/// (the others are then canceled as `guards` drop).
async fn wait_all(
    runnings: &[Arc<Running>],
    guards: Vec<CancelOnDrop>,
) -> Result<Vec<Value>, ApiError> {
    let mut bodies = Vec::with_capacity(runnings.len());
    for running in runnings {
        running.wait().await;
        let body = running.body();
        if body["status"] != "succeeded" {
            return Err(failed(&body));
        }
        bodies.push(body);
    }
    guards.into_iter().for_each(CancelOnDrop::disarm);
    Ok(bodies)
}

/// Submits one prediction per input, each with a guard that cancels it when dropped (all
/// of them, if one cannot be queued).
fn submit_all(
    engine: &Arc<Engine>,
    inputs: impl IntoIterator<Item = Value>,
    param_of: &dyn Fn(&str) -> String,
) -> Result<(Vec<Arc<Running>>, Vec<CancelOnDrop>), ApiError> {
    let mut runnings = Vec::new();
    let mut guards = Vec::new();
    for input in inputs {
        let running = submit(engine, &input, param_of)?;
        guards.push(CancelOnDrop::new(Arc::clone(&running)));
        runnings.push(running);
    }
    Ok((runnings, guards))
}

/// A prediction that ended badly, as an OpenAI error.
fn failed(body: &Value) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!(
            "the prediction {}: {}",
            body["status"].as_str().unwrap_or("failed"),
            body["error"].as_str().unwrap_or("no error message")
        ),
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// 503 until the model is loaded: clients (and probes) that wait for `/v1/models` to
/// answer, as they do with other OpenAI-compatible servers, then find it ready.
fn unless_ready(engine: &Engine) -> Option<Response> {
    (!crate::is_ready(engine)).then(|| {
        let setup_failed = matches!(engine.health().0, runner_engine::Health::SetupFailed);
        rejection(Rejection::NotReady { setup_failed }, &str::to_string).into_response()
    })
}

/// `GET /v1/models`: the one model this server runs.
pub(crate) async fn models(State(state): State<AppState>) -> Response {
    if let Some(refusal) = unless_ready(&state.engine) {
        return refusal;
    }
    Json(json!({
        "object": "list",
        "data": [model_entry(&state.engine)],
    }))
    .into_response()
}

/// `GET /v1/models/{id}`: the model, when that is its name.
pub(crate) async fn model(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Some(refusal) = unless_ready(&state.engine) {
        return refusal;
    }
    if id == state.engine.model_name() {
        return Json(model_entry(&state.engine)).into_response();
    }
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "The model `{id}` does not exist: this server runs `{}`",
            state.engine.model_name()
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    }
    .into_response()
}

/// Any other `/v1/...` path: OpenAI's 404, listing what is served.
pub(crate) async fn unknown_route(uri: axum::http::Uri) -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "{}: runner answers /v1/models, /v1/chat/completions, /v1/completions, /v1/responses and /v1/embeddings (as the model allows), and Cog's API",
            uri.path()
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
    }
    .into_response()
}

fn model_entry(engine: &Engine) -> Value {
    let mut entry = json!({
        "id": engine.model_name(),
        "object": "model",
        "created": 0,
        "owned_by": "runner",
    });
    if let Some(n) = engine.context_length() {
        entry["context_length"] = json!(n);
    }
    entry
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(State(state): State<AppState>, body: Bytes) -> Response {
    embed(&state, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embed(state: &AppState, body: &Bytes) -> Result<Response, ApiError> {
    let engine = &state.engine;
    let request = request_for(engine, OpenAi::Embeddings, "/v1/embeddings", body)?;
    let base64 = match request.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("`encoding_format` {other:?}: use \"float\" or \"base64\""),
            ))
        }
    };
    let texts: Vec<String> = match request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ApiError::unsupported("input", "token ids (send text)")),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(Some("input"), "`input` is an empty list"))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("input"),
                "`input` must be a string or a list of strings",
            ))
        }
        None => return Err(ApiError::invalid(Some("input"), "`input` is required")),
    };
    if let Some(i) = texts.iter().position(String::is_empty) {
        return Err(ApiError::invalid(
            Some("input"),
            format!("`input` {i} is an empty string"),
        ));
    }
    let Some(how) = runner_models::EmbeddingInput::of_declared(engine.signature()) else {
        return Err(wrong_model(engine, "/v1/embeddings"));
    };
    let param_of = |name: &str| {
        if name == how.name {
            "input".to_string()
        } else {
            name.to_string()
        }
    };
    // A model that takes a list embeds them all at once (and normalizes, where it can: OpenAI's
    // vectors are unit length); one that takes a string gets a prediction per text.
    let inputs: Vec<Value> = if how.list {
        let mut input = json!({ how.name.as_str(): texts });
        if how.normalize {
            input["normalize"] = json!(true);
        }
        vec![input]
    } else {
        texts
            .iter()
            .map(|t| json!({ how.name.as_str(): t }))
            .collect()
    };
    let (runnings, guards) = submit_all(engine, inputs, &param_of)?;
    let bodies = wait_all(&runnings, guards).await?;
    let mut vectors = Vec::with_capacity(texts.len());
    let mut prompt_tokens = 0;
    for body in &bodies {
        prompt_tokens += body["metrics"]["input_token_count"].as_u64().unwrap_or(0);
        match (&body["output"], how.list) {
            (Value::Array(many), true) => vectors.extend(many.iter().cloned()),
            (one @ Value::Array(_), false) => vectors.push(one.clone()),
            _ => vectors.push(Value::Null),
        }
    }
    let numbers = |v: &Value| {
        v.as_array()
            .is_some_and(|xs| xs.iter().all(Value::is_number))
    };
    if vectors.len() != texts.len() || !vectors.iter().all(numbers) {
        return Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!(
                "the model answered {} text(s) with {} output(s) that are not all lists of numbers",
                texts.len(),
                vectors.len()
            ),
            kind: "server_error",
            param: None,
            code: None,
        });
    }
    let dimensions = match request.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => Some(d.as_u64().ok_or_else(|| {
            ApiError::invalid(Some("dimensions"), "`dimensions` must be a whole number")
        })?),
    };
    if let Some(dimensions) = dimensions {
        let have = vectors
            .first()
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if dimensions as usize != have {
            return Err(ApiError::invalid(
                Some("dimensions"),
                format!(
                    "`dimensions` {dimensions}: this model's vectors have {have}, and it was not trained for shorter ones"
                ),
            ));
        }
    }
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let floats = vector.as_array().cloned().unwrap_or_default();
            let embedding = if base64 {
                let bytes: Vec<u8> = floats
                    .iter()
                    .flat_map(|f| (f.as_f64().unwrap_or(0.0) as f32).to_le_bytes())
                    .collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Value::Array(floats)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": engine.model_name(),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}

fn submit(
    engine: &Arc<Engine>,
    input: &Value,
    param_of: &dyn Fn(&str) -> String,
) -> Result<Arc<Running>, ApiError> {
    // OpenAI's clients expect a busy server to make them wait, not to refuse them.
    engine
        .submit_queued(new_prediction_id(), input)
        .map_err(|r| rejection(r, param_of))
}

/// Chat or legacy completions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Response {
    complete(&state, &body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(state): State<AppState>, body: Bytes) -> Response {
    complete(&state, &body, Kind::Text)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The text of a message's `content`: a string, or a list of text parts.
fn message_text(content: &Value, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |part| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text),
                    (Some("text"), None) => Err(ApiError::invalid(
                        Some(&param),
                        format!("`{param}`: a text part needs its `text`"),
                    )),
                    (Some(other), _) => Err(ApiError::unsupported(
                        &param,
                        &format!("a `{other}` content part (this model reads text)"),
                    )),
                    _ => Err(ApiError::invalid(
                        Some(&param),
                        format!("`{param}`: each part needs a `type` and, for text, a `text`"),
                    )),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(ApiError::invalid(
            Some(&param),
            format!("`{param}` must be a string or a list of content parts"),
        )),
    }
}

/// The conversation; with `tools` offered, earlier tool calls and their results too.
fn chat_messages(
    request: &Map<String, Value>,
    tools_offered: bool,
) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` is required: a list of {\"role\", \"content\"}",
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "`messages` is empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m["role"].as_str() {
                // OpenAI's newer name for the system message.
                Some("developer") => "system",
                Some("tool") if tools_offered => {
                    return Ok(tools::tool_result(m, message_text(&m["content"], i)?))
                }
                Some(r @ ("system" | "user" | "assistant")) => r,
                Some(other) => {
                    return Err(ApiError::unsupported(
                        &format!("messages[{i}].role"),
                        &format!("the role {other:?}"),
                    ))
                }
                None => {
                    return Err(ApiError::invalid(
                        Some(&format!("messages[{i}].role")),
                        format!("`messages[{i}]` has no `role`"),
                    ))
                }
            };
            if let Some(calls) = m.get("tool_calls").filter(|t| !t.is_null()) {
                if !tools_offered || role != "assistant" {
                    return Err(ApiError::unsupported(
                        &format!("messages[{i}].tool_calls"),
                        "earlier tool calls without `tools` in this request",
                    ));
                }
                return Ok(ChatMessage {
                    role: role.into(),
                    content: tools::earlier_call(calls, i)?,
                });
            }
            Ok(ChatMessage {
                role: role.into(),
                content: message_text(&m["content"], i)?,
            })
        })
        .collect()
}

/// Refuses what this server would otherwise silently get wrong.
fn refuse_unsupported(request: &Map<String, Value>) -> Result<(), ApiError> {
    if request
        .get("best_of")
        .and_then(Value::as_u64)
        .is_some_and(|n| n != 1)
    {
        return Err(ApiError::unsupported("best_of", "more than one candidate"));
    }
    if request
        .get("suffix")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(ApiError::unsupported("suffix", "a suffix"));
    }
    Ok(())
}

/// Whether the request asks for log probabilities, and for how many alternatives per token:
/// chat's `logprobs: true` with `top_logprobs` (0 to 20), or the legacy endpoint's
/// `logprobs: N` (0 to 5).
fn logprobs_asked(request: &Map<String, Value>, kind: Kind) -> Result<(bool, u64), ApiError> {
    let logprobs = request.get("logprobs").filter(|v| !v.is_null());
    let top = request.get("top_logprobs").filter(|v| !v.is_null());
    match kind {
        Kind::Chat => {
            let on = match logprobs {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    ApiError::invalid(Some("logprobs"), "`logprobs` must be true or false")
                })?,
            };
            let top = match top {
                None => 0,
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n <= runner_models::llama::MAX_TOP_LOGPROBS)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            Some("top_logprobs"),
                            "`top_logprobs` must be a whole number from 0 to 20",
                        )
                    })?,
            };
            if top > 0 && !on {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            Ok((on, top))
        }
        Kind::Text => match logprobs {
            None | Some(Value::Bool(false)) => Ok((false, 0)),
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= 5)
                .map(|n| (true, n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some("logprobs"),
                        "`logprobs` must be a whole number from 0 to 5 (the alternatives listed per token)",
                    )
                }),
        },
    }
}

/// Tokens' `logprobs` metric entries (OpenAI's chat shape: token, logprob, bytes,
/// top_logprobs) in the legacy completions' shape; `offset` is where the first token
/// starts in the text, in characters, and moves past the last.
fn legacy_logprobs(entries: &[Value], offset: &mut usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    for entry in entries {
        let token = entry["token"].as_str().unwrap_or_default();
        tokens.push(json!(token));
        token_logprobs.push(entry["logprob"].clone());
        let alternatives: Map<String, Value> = entry["top_logprobs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["token"].as_str().unwrap_or_default().to_string(),
                    t["logprob"].clone(),
                )
            })
            .collect();
        top_logprobs.push(Value::Object(alternatives));
        text_offset.push(json!(*offset));
        *offset += token.chars().count();
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

/// The `logprobs` of a choice holding these entries, in the shape of `kind`'s API.
fn choice_logprobs(kind: Kind, entries: &[Value], offset: &mut usize) -> Value {
    match kind {
        Kind::Chat => json!({"content": entries, "refusal": null}),
        Kind::Text => legacy_logprobs(entries, offset),
    }
}

/// The JSON Schema `response_format` asks the output to match: `json_object` is any JSON
/// object, `json_schema` its `schema` (any JSON value when it has none); `text` and no
/// format ask for nothing.
fn response_schema(request: &Map<String, Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = request.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => match format.get("json_schema") {
            Some(Value::Object(spec)) => match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(json!({}))),
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(schema.clone())),
                Some(_) => Err(ApiError::invalid(
                    Some("response_format"),
                    "`response_format.json_schema.schema` must be a JSON Schema (an object)",
                )),
            },
            _ => Err(ApiError::invalid(
                Some("response_format"),
                "`response_format` of type `json_schema` needs `json_schema`: {\"name\": …, \"schema\": {…}}",
            )),
        },
        _ => Err(ApiError::invalid(
            Some("response_format"),
            "`response_format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

/// `stop`: a string or up to four.
fn stop_sequences(request: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match request.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid(Some("stop"), "`stop` holds strings only"))
            })
            .collect(),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            Some("stop"),
            "`stop` holds at most 4 sequences",
        )),
        Some(_) => Err(ApiError::invalid(
            Some("stop"),
            "`stop` must be a string or a list of strings",
        )),
    }
}

/// A number parameter, if given; a non-number is a 400.
fn number(request: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(Some(key), format!("`{key}` must be a number"))),
    }
}

/// How a text generator's Cog inputs take OpenAI's parameters: found by name in its
/// signature (`prompt`, `system_prompt`, `max_new_tokens`/`max_tokens`/`max_length`,
/// `temperature`, `top_p`, `seed`, `stop` as a list or `stop_sequences` as one
/// comma-separated string, as Replicate's language models take them).
struct TextInputs {
    names: std::collections::HashSet<String>,
    /// The input that bounds the output's tokens, and its upper bound.
    max_field: Option<(String, Option<u64>)>,
    /// `true`: `stop` takes a list; `false`: `stop_sequences` takes a comma-separated string.
    stop_list: Option<bool>,
}

impl TextInputs {
    fn of(engine: &Engine) -> Self {
        let inputs = &engine.signature().inputs;
        let names = inputs.iter().map(|i| i.name.clone()).collect();
        let max_field = ["max_new_tokens", "max_tokens", "max_length"]
            .iter()
            .find_map(|n| inputs.iter().find(|i| i.name == *n))
            .map(|i| (i.name.clone(), i.le.map(|le| le as u64)));
        let stop_list = inputs.iter().find_map(|i| match (i.name.as_str(), &i.ty) {
            ("stop", runner_spec::FieldType::List(_)) => Some(true),
            ("stop_sequences", _) => Some(false),
            _ => None,
        });
        Self {
            names,
            max_field,
            stop_list,
        }
    }
    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// What a completion request asks of the model, checked, with the prompt rendered.
struct Generation {
    input: Value,
    prompt: String,
    /// Known where the model counts tokens (runner's own models).
    prompt_tokens: Option<usize>,
    /// The most tokens the model may generate, where known (asked, or what the context
    /// leaves): reaching it is `finish_reason: length`.
    limit: Option<u64>,
    /// Which request field bounded the output (for error messages).
    max_param: &'static str,
    stream: bool,
    include_usage: bool,
    echo: bool,
    /// Each token's log probability goes with the answer.
    logprobs: bool,
    /// The answer is a tool call or a response, as JSON (see [`tools`]).
    tools: bool,
    /// Choices: each its own prediction (a given seed moves on by one per choice).
    n: usize,
}

/// The most choices one request may ask for.
const MAX_CHOICES: u64 = 8;

impl Generation {
    /// The input of choice `index`: the request's, with its seed (if any) plus `index`, so
    /// that sampled choices differ and each is reproducible.
    fn input_for_choice(&self, index: usize) -> Value {
        let mut input = self.input.clone();
        if let Some(seed) = input.get_mut("seed") {
            *seed = match (seed.as_u64(), seed.as_i64()) {
                (Some(s), _) => json!(s.wrapping_add(index as u64)),
                (None, Some(s)) => json!(s.wrapping_add(index as i64)),
                _ => seed.clone(),
            };
        }
        input
    }
}

/// The prompt of a chat for a model without a chat template of its own (a Python
/// predictor taking `prompt` and maybe `system_prompt`): one user turn, after at most one
/// system message; anything longer needs a template runner does not have.
fn single_turn(
    messages: &[ChatMessage],
    inputs: &TextInputs,
) -> Result<(String, Option<String>), ApiError> {
    match messages {
        [user] if user.role == "user" => Ok((user.content.clone(), None)),
        [system, user] if system.role == "system" && user.role == "user" => {
            if !inputs.has("system_prompt") {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "`messages`: this model takes no system prompt (it has no `system_prompt` input); send the user message alone",
                ));
            }
            Ok((user.content.clone(), Some(system.content.clone())))
        }
        _ => Err(ApiError::invalid(
            Some("messages"),
            "`messages`: this model takes one `prompt` and has no chat template runner could render a conversation with; send one user message, after at most one system message",
        )),
    }
}

fn generation(
    engine: &Engine,
    request: &Map<String, Value>,
    kind: Kind,
) -> Result<Generation, ApiError> {
    refuse_unsupported(request)?;
    let inputs = TextInputs::of(engine);
    // runner's own models render chats through their template and count tokens.
    let native = inputs.has("use_chat_template");
    let mut system = None;
    let tools = match kind {
        Kind::Chat => tools::asked(request)?,
        Kind::Text => None,
    };
    if tools.is_some() && !native {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling for this model (runner's own text generators have it)",
        ));
    }
    let prompt = match kind {
        Kind::Chat => {
            let mut messages = chat_messages(request, tools.is_some())?;
            if let Some(tools) = &tools {
                tools.instruct(&mut messages);
            }
            match engine.chat_prompt(&messages) {
                Some(Ok(p)) => p,
                Some(Err(e)) => return Err(ApiError::invalid(Some("messages"), e)),
                None if native => return Err(not_loaded()),
                None => {
                    let (prompt, sys) = single_turn(&messages, &inputs)?;
                    system = sys;
                    prompt
                }
            }
        }
        Kind::Text => match request.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                items[0].as_str().unwrap_or_default().to_string()
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                return Err(ApiError::unsupported("prompt", "more than one prompt"))
            }
            Some(Value::Array(_)) => {
                return Err(ApiError::unsupported("prompt", "token ids (send text)"))
            }
            _ => {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    "`prompt` is required: the text to continue",
                ))
            }
        },
    };
    let prompt_tokens = match engine.count_tokens(&prompt) {
        None if native => return Err(not_loaded()),
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => return Err(ApiError::invalid(None, e)),
    };
    let context = engine.context_length();
    if let (Some(tokens), Some(context)) = (prompt_tokens, context) {
        if tokens >= context {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    Some(if kind == Kind::Chat { "messages" } else { "prompt" }),
                    format!(
                        "This model's maximum context length is {context} tokens; the prompt is {tokens} tokens. Shorten it."
                    ),
                )
            });
        }
    }
    let (max_param, asked) = match (
        request
            .get("max_completion_tokens")
            .filter(|v| !v.is_null()),
        request.get("max_tokens").filter(|v| !v.is_null()),
    ) {
        (Some(v), _) => ("max_completion_tokens", Some(v)),
        (None, Some(v)) => ("max_tokens", Some(v)),
        (None, None) => ("max_tokens", None),
    };
    let bound = inputs
        .max_field
        .as_ref()
        .and_then(|(_, le)| *le)
        .unwrap_or(u64::MAX);
    let asked = match asked {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=bound).contains(&n) => Some(n),
            _ if bound == u64::MAX => {
                return Err(ApiError::invalid(
                    Some(max_param),
                    format!("`{max_param}` must be a whole number, 1 or more"),
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    Some(max_param),
                    format!("`{max_param}` must be a whole number from 1 to {bound}"),
                ))
            }
        },
    };
    let mut input = Map::new();
    input.insert("prompt".into(), json!(prompt));
    if let Some(system) = system {
        input.insert("system_prompt".into(), json!(system));
    }
    // runner's own models take OpenAI's defaults (chat runs to the end of the turn or the
    // context; the legacy endpoint stops after 16 tokens; temperature and top_p 1, no
    // top-k or repetition penalty); a Python predictor keeps its own defaults for what the
    // request leaves out.
    let max_new = if native {
        Some(asked.unwrap_or(match kind {
            Kind::Chat => bound,
            Kind::Text => 16,
        }))
    } else {
        asked
    };
    match (&inputs.max_field, max_new) {
        (Some((field, _)), Some(n)) => {
            input.insert(field.clone(), json!(n));
        }
        (None, Some(_)) if asked.is_some() => return Err(ApiError::not_taken(max_param, &inputs)),
        _ => {}
    }
    if native {
        input.insert("use_chat_template".into(), json!(false));
        input.insert("top_k".into(), json!(0));
        input.insert("repetition_penalty".into(), json!(1.0));
    }
    for (param, default) in [("temperature", 1.0), ("top_p", 1.0)] {
        let value = number(request, param)?.or(native.then_some(default));
        match value {
            Some(v) if inputs.has(param) => {
                input.insert(param.into(), json!(v));
            }
            // OpenAI's own default asks nothing of a model without the parameter.
            Some(v) if v != default => return Err(ApiError::not_taken(param, &inputs)),
            _ => {}
        }
    }
    for penalty in ["presence_penalty", "frequency_penalty"] {
        match number(request, penalty)? {
            None => {}
            Some(p) if !(-2.0..=2.0).contains(&p) => {
                return Err(ApiError::invalid(
                    Some(penalty),
                    format!("`{penalty}` must be from -2 to 2"),
                ))
            }
            Some(p) if inputs.has(penalty) => {
                input.insert(penalty.into(), json!(p));
            }
            // Zero is what many clients send by default: it asks nothing.
            Some(p) if p != 0.0 => return Err(ApiError::not_taken(penalty, &inputs)),
            Some(_) => {}
        }
    }
    match request.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(biases)) if biases.is_empty() => {}
        Some(Value::Object(biases)) => {
            if !inputs.has("logit_bias") {
                return Err(ApiError::not_taken("logit_bias", &inputs));
            }
            let text = Value::Object(biases.clone()).to_string();
            if let Some(size) = engine.vocabulary_size() {
                runner_models::llama::parse_logit_bias(&text, size)
                    .map_err(|e| ApiError::invalid(Some("logit_bias"), e))?;
            }
            input.insert("logit_bias".into(), json!(text));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("logit_bias"),
                "`logit_bias` must be an object of token ids to biases from -100 to 100",
            ))
        }
    }
    let (logprobs, top_logprobs) = logprobs_asked(request, kind)?;
    if logprobs {
        if !inputs.has("logprobs") {
            return Err(ApiError::unsupported(
                "logprobs",
                "log probabilities for this model (it has no `logprobs` input)",
            ));
        }
        if kind == Kind::Text && request.get("echo").and_then(Value::as_bool) == Some(true) {
            return Err(ApiError::unsupported(
                "echo",
                "`echo` with `logprobs` (the prompt's own log probabilities)",
            ));
        }
        input.insert("logprobs".into(), json!(true));
        input.insert("top_logprobs".into(), json!(top_logprobs));
    }
    let format = response_schema(request)?;
    if let Some(tools) = &tools {
        if format.is_some() {
            return Err(ApiError::unsupported(
                "response_format",
                "`response_format` together with `tools`",
            ));
        }
        if logprobs {
            return Err(ApiError::unsupported(
                "logprobs",
                "`logprobs` together with `tools`",
            ));
        }
        input.insert("json_schema".into(), json!(tools.schema.to_string()));
    }
    if let Some(schema) = format {
        if !inputs.has("json_schema") {
            return Err(ApiError::unsupported(
                "response_format",
                "structured output for this model (it has no `json_schema` input)",
            ));
        }
        if native {
            // Checked here, so a schema runner cannot enforce is a 400 naming the keyword,
            // not a failed prediction.
            runner_models::structured::Grammar::compile(&schema).map_err(|e| {
                ApiError::invalid(Some("response_format"), format!("`response_format`: {e}"))
            })?;
        }
        input.insert("json_schema".into(), json!(schema.to_string()));
    }
    let stops = stop_sequences(request)?;
    match (inputs.stop_list, stops.is_empty()) {
        (_, true) => {}
        (Some(true), false) => {
            input.insert("stop".into(), json!(stops));
        }
        (Some(false), false) => {
            if stops.iter().any(|s| s.contains(',')) {
                return Err(ApiError::unsupported(
                    "stop",
                    "a stop sequence with a comma for this model (it takes them comma-separated)",
                ));
            }
            input.insert("stop_sequences".into(), json!(stops.join(",")));
        }
        (None, false) => return Err(ApiError::not_taken("stop", &inputs)),
    }
    match request.get("seed") {
        None | Some(Value::Null) => {}
        Some(seed) => match seed.as_i64() {
            // Any 64-bit seed works; runner's models take its bits as unsigned.
            Some(seed) if inputs.has("seed") => {
                input.insert(
                    "seed".into(),
                    if native {
                        json!(seed as u64)
                    } else {
                        json!(seed)
                    },
                );
            }
            Some(_) => return Err(ApiError::not_taken("seed", &inputs)),
            None => return Err(ApiError::invalid(Some("seed"), "`seed` must be an integer")),
        },
    }
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let include_usage = request
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let room = match (context, prompt_tokens) {
        (Some(c), Some(t)) => Some((c - t) as u64),
        _ => None,
    };
    let limit = match (max_new, room) {
        (Some(m), Some(r)) => Some(m.min(r)),
        (Some(m), None) => Some(m),
        (None, r) => r,
    };
    Ok(Generation {
        input: Value::Object(input),
        prompt,
        prompt_tokens,
        limit,
        max_param,
        stream,
        include_usage,
        echo: kind == Kind::Text && request.get("echo").and_then(Value::as_bool) == Some(true),
        logprobs,
        tools: tools.is_some(),
        n: match request.get("n") {
            None | Some(Value::Null) => 1,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some("n"),
                        format!("`n` must be a whole number from 1 to {MAX_CHOICES}"),
                    )
                })? as usize,
        },
    })
}

/// Maps a Cog input's name back to the OpenAI parameter it came from.
fn generation_param(max_param: &'static str, kind: Kind) -> impl Fn(&str) -> String {
    move |name| {
        match name {
            "max_new_tokens" | "max_tokens" | "max_length" => max_param,
            "prompt" | "system_prompt" if kind == Kind::Chat => "messages",
            "stop_sequences" => "stop",
            "json_schema" => "response_format",
            other => other,
        }
        .to_string()
    }
}

async fn complete(state: &AppState, body: &Bytes, kind: Kind) -> Result<Response, ApiError> {
    let engine = &state.engine;
    let route = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Text => "/v1/completions",
    };
    let request = request_for(engine, OpenAi::TextGeneration, route, body)?;
    // Rendering and counting a long prompt's tokens is CPU work: off the server's threads.
    let generation = {
        let engine = Arc::clone(engine);
        tokio::task::spawn_blocking(move || generation(&engine, &request, kind))
            .await
            .map_err(|e| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("reading the request failed: {e}"),
                kind: "server_error",
                param: None,
                code: None,
            })??
    };
    // Each choice is a prediction of its own. They are canceled together: when one cannot
    // be queued, and when the client goes away.
    let param_of = generation_param(generation.max_param, kind);
    let inputs = (0..generation.n).map(|index| generation.input_for_choice(index));
    let (runnings, guards) = submit_all(engine, inputs, &param_of)?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        runnings[0].id()
    );
    let reply = Reply {
        id,
        created: unix_now(),
        model: engine.model_name(),
        kind,
        prompt_tokens: generation.prompt_tokens,
        limit: generation.limit,
    };
    if generation.stream {
        return Ok(stream_reply(runnings, guards, reply, generation));
    }
    let bodies = wait_all(&runnings, guards).await?;
    let choices: Vec<Value> = bodies
        .iter()
        .zip(&runnings)
        .enumerate()
        .map(|(index, (body, running))| reply.choice(index, body, running, &generation))
        .collect();
    Ok(Json(json!({
        "id": reply.id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": reply.usage(&bodies),
        "system_fingerprint": format!("runner-{}", crate::RUNNER_VERSION),
    }))
    .into_response())
}

/// What a tool-offering chat's answer says, as message fields (`tool_calls`, or `content`)
/// and the finish reason: `tool_calls` for a call; the reply's own otherwise. An answer cut
/// short before its JSON closed is passed on as it is.
fn tool_answer(
    text: &str,
    finish: &'static str,
    call_id: &str,
) -> (Map<String, Value>, &'static str) {
    let (fields, finish) = match tools::answer(text) {
        Some(tools::Answer::Calls(calls)) => {
            let calls: Vec<Value> = calls
                .into_iter()
                .enumerate()
                .map(|(k, (name, arguments))| {
                    // The first call keeps the reply's id; the others add their place.
                    let id = match k {
                        0 => call_id.to_string(),
                        k => format!("{call_id}_{k}"),
                    };
                    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
                })
                .collect();
            (json!({ "tool_calls": calls }), "tool_calls")
        }
        Some(tools::Answer::Response(response)) => (json!({ "content": response }), finish),
        None => (json!({ "content": text }), finish),
    };
    (fields.as_object().cloned().unwrap_or_default(), finish)
}

/// A text generator's output as one string: its pieces joined, or the string itself.
fn output_text(output: &Value) -> String {
    match output {
        Value::String(s) => s.clone(),
        Value::Array(pieces) => pieces.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

/// What every answer of one completion shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: Option<usize>,
    limit: Option<u64>,
}

impl Reply {
    /// `finish_reason` of a finished prediction: `length` when the output reached its
    /// limit, `stop` when the model ended its turn or met a stop sequence.
    fn finish(&self, body: &Value) -> &'static str {
        let completion = body["metrics"]["output_token_count"].as_u64().unwrap_or(0);
        match self.limit {
            Some(limit) if completion >= limit => "length",
            _ => "stop",
        }
    }

    /// `usage` of the choices' finished predictions: the prompt once, the outputs summed.
    fn usage(&self, bodies: &[Value]) -> Value {
        let Some(first) = bodies.first() else {
            return json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0});
        };
        let metrics = &first["metrics"];
        let completion: u64 = bodies
            .iter()
            .map(|b| b["metrics"]["output_token_count"].as_u64().unwrap_or(0))
            .sum();
        // A model that does not count its tokens reports zeros.
        let prompt = metrics["input_token_count"]
            .as_u64()
            .or(self.prompt_tokens.map(|n| n as u64))
            .unwrap_or(0);
        let mut usage = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        });
        // Prompt tokens whose processing a recent generation spared (OpenAI's field).
        if let Some(cached) = metrics["cached_input_token_count"].as_u64() {
            usage["prompt_tokens_details"] = json!({"cached_tokens": cached});
        }
        usage
    }

    /// Choice `index` of a whole (not streamed) answer, from its finished prediction.
    fn choice(
        &self,
        index: usize,
        body: &Value,
        running: &Running,
        generation: &Generation,
    ) -> Value {
        let mut text = output_text(&body["output"]);
        if generation.echo {
            text.insert_str(0, &generation.prompt);
        }
        let finish = self.finish(body);
        let logprobs = match generation.logprobs {
            true => {
                let entries = body["metrics"]["logprobs"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                choice_logprobs(self.kind, &entries, &mut 0)
            }
            false => Value::Null,
        };
        match self.kind {
            Kind::Chat if generation.tools => {
                let (fields, finish) =
                    tool_answer(&text, finish, &format!("call_{}", running.id()));
                let mut message = json!({"role": "assistant", "content": null, "refusal": null});
                message.as_object_mut().unwrap().extend(fields);
                json!({"index": index, "message": message, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Text => json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    /// One streamed chunk with this text (or role, or finish reason).
    fn chunk(&self, index: usize, delta: Value, finish: Option<&str>) -> Value {
        self.chunk_with_logprobs(index, delta, finish, Value::Null)
    }

    /// A streamed chunk of choice `index`, and the log probabilities of the tokens it holds.
    fn chunk_with_logprobs(
        &self,
        index: usize,
        delta: Value,
        finish: Option<&str>,
        logprobs: Value,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Text => json!({
                "index": index,
                "text": delta.get("content").cloned().unwrap_or(json!("")),
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": format!("runner-{}", crate::RUNNER_VERSION),
            "choices": [choice],
        })
    }
}

/// One prediction's events, tagged with an index.
type Events = futures_util::stream::BoxStream<'static, (usize, Result<Arc<StreamEvent>, u64>)>;

/// A choice's events: what already happened, then what comes; `Err(n)` when `n` fell
/// out of the history before they could be read.
fn events(index: usize, subscription: runner_engine::Subscription) -> Events {
    Box::pin(futures_util::stream::unfold(
        Some(subscription),
        move |subscription| async move {
            let mut sub = subscription?;
            if sub.skipped > 0 {
                let lost = sub.skipped;
                return Some(((index, Err(lost)), None));
            }
            let event = match sub.replay.pop_front() {
                Some(e) => e,
                None => match sub.receiver.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(n)) => return Some(((index, Err(n)), None)),
                    Err(RecvError::Closed) => return None,
                },
            };
            let last = matches!(&*event, StreamEvent::Completed(_));
            Some(((index, Ok(event)), (!last).then_some(sub)))
        },
    ))
}

/// The completion as OpenAI's event stream: chunks of each choice's pieces as they are
/// generated (choices interleaved, each chunk naming its `index`), a chunk with each
/// choice's finish reason, optionally one with the usage, then `[DONE]`. A client that goes
/// away cancels every choice's prediction.
fn stream_reply(
    runnings: Vec<Arc<Running>>,
    guards: Vec<CancelOnDrop>,
    reply: Reply,
    generation: Generation,
) -> Response {
    /// One choice's progress.
    struct Choice {
        /// Whether any text came as it was generated (a model returning one string sends
        /// it all at the end).
        streamed: bool,
        /// With `logprobs`: the entries of tokens not yet sent (a chunk carries those of
        /// the tokens it holds), and the legacy format's character offset.
        logprobs: Option<Vec<Value>>,
        text_offset: usize,
        /// With tools: the call's id; the JSON answer is sent whole once it is complete.
        tool_call_id: Option<String>,
    }
    struct StreamState {
        events: futures_util::stream::SelectAll<Events>,
        reply: Reply,
        include_usage: bool,
        /// Chunks ready to send, in order.
        pending: std::collections::VecDeque<String>,
        guards: Vec<CancelOnDrop>,
        choices: Vec<Choice>,
        /// The finished choices' predictions, by index.
        bodies: Vec<Option<Value>>,
        done: bool,
    }
    let data = |v: Value| v.to_string();
    let mut pending = std::collections::VecDeque::new();
    for index in 0..runnings.len() {
        if reply.kind == Kind::Chat {
            pending.push_back(data(reply.chunk(
                index,
                json!({"role": "assistant", "content": ""}),
                None,
            )));
        } else if generation.echo {
            pending.push_back(data(reply.chunk(
                index,
                json!({"content": generation.prompt}),
                None,
            )));
        }
    }
    let state = StreamState {
        events: futures_util::stream::select_all(
            runnings
                .iter()
                .enumerate()
                .map(|(index, running)| events(index, running.subscribe())),
        ),
        reply,
        include_usage: generation.include_usage,
        pending,
        guards,
        choices: runnings
            .iter()
            .map(|running| Choice {
                streamed: false,
                logprobs: generation.logprobs.then(Vec::new),
                text_offset: 0,
                tool_call_id: generation.tools.then(|| format!("call_{}", running.id())),
            })
            .collect(),
        bodies: vec![None; runnings.len()],
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        use futures_util::StreamExt as _;
        loop {
            if let Some(next) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(next)), st));
            }
            if st.done {
                return None;
            }
            let (index, event) = st.events.next().await?;
            let event = match event {
                Ok(event) => event,
                Err(_lost) => {
                    st.done = true;
                    st.pending.push_back(
                        json!({"error": {"message": "the stream fell behind and lost tokens", "type": "server_error", "param": null, "code": null}}).to_string(),
                    );
                    st.pending.push_back("[DONE]".into());
                    continue;
                }
            };
            let kind = st.reply.kind;
            let choice = &mut st.choices[index];
            match &*event {
                StreamEvent::Metric { name, value, .. } if name == "logprobs" => {
                    if let Some(entries) = choice.logprobs.as_mut() {
                        entries.push(value.clone());
                    }
                }
                StreamEvent::Output { .. } if choice.tool_call_id.is_some() => {}
                StreamEvent::Output { chunk, .. } => {
                    if let Some(text) = chunk.as_str().filter(|t| !t.is_empty()) {
                        choice.streamed = true;
                        let logprobs = match choice.logprobs.as_mut() {
                            Some(entries) => {
                                let held = std::mem::take(entries);
                                choice_logprobs(kind, &held, &mut choice.text_offset)
                            }
                            None => Value::Null,
                        };
                        st.pending.push_back(
                            st.reply
                                .chunk_with_logprobs(
                                    index,
                                    json!({"content": text}),
                                    None,
                                    logprobs,
                                )
                                .to_string(),
                        );
                    }
                }
                StreamEvent::Completed(body) => {
                    if body["status"] != "succeeded" {
                        // The other choices are cancelled as the guards drop with the stream.
                        st.done = true;
                        st.pending.push_back(failed(body).json().to_string());
                        st.pending.push_back("[DONE]".into());
                        continue;
                    }
                    let whole = output_text(&body["output"]);
                    let mut finish = st.reply.finish(body);
                    if let Some(call_id) = &choice.tool_call_id {
                        let (fields, reason) = tool_answer(&whole, finish, call_id);
                        finish = reason;
                        let mut delta = Value::Object(fields);
                        if let Some(calls) = delta["tool_calls"].as_array_mut() {
                            for (k, call) in calls.iter_mut().enumerate() {
                                call["index"] = json!(k);
                            }
                        }
                        st.pending
                            .push_back(st.reply.chunk(index, delta, None).to_string());
                    } else if !choice.streamed && !whole.is_empty() {
                        st.pending.push_back(
                            st.reply
                                .chunk(index, json!({"content": whole}), None)
                                .to_string(),
                        );
                    }
                    // Tokens whose text never came (a stop sequence's) end the list.
                    let logprobs = match choice.logprobs.as_mut() {
                        Some(entries) if !entries.is_empty() => {
                            let held = std::mem::take(entries);
                            choice_logprobs(kind, &held, &mut choice.text_offset)
                        }
                        _ => Value::Null,
                    };
                    st.pending.push_back(
                        st.reply
                            .chunk_with_logprobs(index, json!({}), Some(finish), logprobs)
                            .to_string(),
                    );
                    st.bodies[index] = Some(body.clone());
                    if st.bodies.iter().all(Option::is_some) {
                        st.done = true;
                        st.guards.drain(..).for_each(CancelOnDrop::disarm);
                        if st.include_usage {
                            let bodies: Vec<Value> = st.bodies.iter().flatten().cloned().collect();
                            let mut last = st.reply.chunk(0, json!({}), None);
                            last["choices"] = json!([]);
                            last["usage"] = st.reply.usage(&bodies);
                            st.pending.push_back(last.to_string());
                        }
                        st.pending.push_back("[DONE]".into());
                    }
                }
                _ => {}
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
