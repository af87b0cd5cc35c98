//! OpenAI's Responses API (`POST /v1/responses`), the one OpenAI's newer SDK helpers and
//! agent frameworks speak. A request is translated into the chat completion it means, so it
//! gets the same checks, prompt, sampling, structured output (`text.format`) and tools, and
//! the answer comes back as a response object, or streamed as the Responses API's events.
//!
//! Responses are kept in memory (the latest [`MAX_STORED`], at most [`MAX_STORED_BYTES`]
//! in all; none with `store: false`), so `previous_response_id` continues a conversation
//! and `GET`/`DELETE /v1/responses/{id}` find one, `GET /v1/responses/{id}/input_items` its
//! input; a restart forgets them.

use super::*;

/// Keys that ask for state or features runner does not have: refused unless empty.
const REFUSED: &[(&str, &str)] = &[
    (
        "conversation",
        "a stored conversation (send the whole conversation as `input`)",
    ),
    ("prompt", "a stored prompt template"),
    ("background", "a background response"),
    ("reasoning", "reasoning settings"),
];

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`: the latest
/// ones, within a count and a size (their conversations, serialized).
const MAX_STORED: usize = 256;
const MAX_STORED_BYTES: usize = 64 << 20;

/// A kept response, and the conversation it ends (chat messages, without instructions:
/// those of one response do not carry over to the next, as in OpenAI's API).
#[derive(Clone)]
struct Stored {
    response: Value,
    conversation: Vec<Value>,
    /// The request's own `input`, as input items with ids (`input_items`).
    input_items: Vec<Value>,
    bytes: usize,
}

#[derive(Default)]
struct Store {
    order: std::collections::VecDeque<String>,
    responses: std::collections::HashMap<String, Stored>,
    bytes: usize,
}

fn store() -> &'static std::sync::Mutex<Store> {
    static STORE: std::sync::OnceLock<std::sync::Mutex<Store>> = std::sync::OnceLock::new();
    STORE.get_or_init(Default::default)
}

fn remember(id: &str, response: &Value, conversation: Vec<Value>, input_items: Vec<Value>) {
    let bytes = response.to_string().len()
        + Value::Array(conversation.clone()).to_string().len()
        + Value::Array(input_items.clone()).to_string().len();
    let mut store = store().lock().unwrap_or_else(|e| e.into_inner());
    store.order.push_back(id.to_string());
    store.bytes += bytes;
    store.responses.insert(
        id.to_string(),
        Stored {
            response: response.clone(),
            conversation,
            input_items,
            bytes,
        },
    );
    while store.order.len() > MAX_STORED || store.bytes > MAX_STORED_BYTES {
        let Some(oldest) = store.order.pop_front() else {
            break;
        };
        if let Some(gone) = store.responses.remove(&oldest) {
            store.bytes -= gone.bytes;
        }
    }
}

fn recall(id: &str) -> Option<Stored> {
    let store = store().lock().unwrap_or_else(|e| e.into_inner());
    store.responses.get(id).cloned()
}

fn not_found(id: &str, param: Option<&str>) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no response `{id}` is kept here (runner keeps the latest {MAX_STORED} in memory, none sent with `store: false`, and forgets them when it restarts)"),
        kind: "invalid_request_error",
        param: param.map(str::to_string),
        code: Some("not_found"),
    }
}

/// The chat turns a finished response's output adds to its conversation.
fn assistant_turns(items: &[Value]) -> Vec<Value> {
    let calls: Vec<Value> = items
        .iter()
        .filter(|i| i["type"] == "function_call")
        .map(|i| json!({"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}))
        .collect();
    let mut turns: Vec<Value> = items
        .iter()
        .filter(|i| i["type"] == "message")
        .map(|i| json!({"role": "assistant", "content": i["content"][0]["text"]}))
        .collect();
    if !calls.is_empty() {
        turns.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
    }
    turns
}

/// `GET /v1/responses/{id}`: a kept response.
pub(crate) async fn get_response(axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    match recall(&id) {
        Some(stored) => Json(stored.response).into_response(),
        None => not_found(&id, None).into_response(),
    }
}

/// `DELETE /v1/responses/{id}`: forgets a kept response.
pub(crate) async fn delete_response(
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let mut store = store().lock().unwrap_or_else(|e| e.into_inner());
    match store.responses.remove(&id) {
        Some(gone) => {
            store.bytes -= gone.bytes;
            store.order.retain(|kept| *kept != id);
            Json(json!({"id": id, "object": "response", "deleted": true})).into_response()
        }
        None => not_found(&id, None).into_response(),
    }
}

/// `GET /v1/responses/{id}/input_items`: a kept response's input, a page at a time, as
/// OpenAI lists it (`limit` 1–100, default 20; `order` `desc` by default; `after`/`before`
/// an item id).
pub(crate) async fn input_items(
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let Some(stored) = recall(&id) else {
        return not_found(&id, None).into_response();
    };
    match page_of(stored.input_items, &query) {
        Ok(page) => Json(page).into_response(),
        Err(e) => e.into_response(),
    }
}

fn page_of(
    mut items: Vec<Value>,
    query: &std::collections::HashMap<String, String>,
) -> Result<Value, ApiError> {
    let limit = match query.get("limit") {
        None => 20,
        Some(text) => match text.parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => {
                return Err(ApiError::invalid(
                    Some("limit"),
                    format!("`limit` must be an integer from 1 to 100, not {text:?}"),
                ))
            }
        },
    };
    match query.get("order").map(String::as_str) {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                Some("order"),
                format!("`order` must be asc or desc, not {other:?}"),
            ))
        }
    }
    for key in ["after", "before"] {
        let Some(cursor) = query.get(key) else {
            continue;
        };
        let Some(at) = items.iter().position(|item| item["id"] == cursor.as_str()) else {
            return Err(ApiError::invalid(
                Some(key),
                format!("`{key}`: this response has no input item {cursor:?}"),
            ));
        };
        if key == "after" {
            items.drain(..=at);
        } else {
            items.truncate(at);
        }
    }
    // `before` keeps the items nearest to it, as OpenAI's cursor pages do.
    let skip = if query.contains_key("before") && !query.contains_key("after") {
        items.len().saturating_sub(limit)
    } else {
        0
    };
    let has_more = items.len() > limit;
    let data: Vec<Value> = items.into_iter().skip(skip).take(limit).collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "first_id": data.first().map(|item| item["id"].clone()),
        "last_id": data.last().map(|item| item["id"].clone()),
        "has_more": has_more,
    }))
}

/// The request's `input` as the input items OpenAI lists for a response: each with an id
/// (its own, or one made from the response's), text content as parts, and a status.
fn input_items_of(request: &Map<String, Value>, response_id: &str) -> Vec<Value> {
    let suffix = response_id.strip_prefix("resp_").unwrap_or(response_id);
    let parts = |content: &Value, kind: &str| match content {
        Value::String(text) => json!([{"type": kind, "text": text}]),
        other => other.clone(),
    };
    let items = match request.get("input") {
        Some(Value::String(text)) => {
            vec![json!({"type": "message", "role": "user", "content": text})]
        }
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let kind = item["type"].as_str().unwrap_or("message").to_string();
            let prefix = match kind.as_str() {
                "function_call" => "fc",
                "function_call_output" => "fco",
                _ => "msg",
            };
            let mut listed = match kind.as_str() {
                "message" => {
                    let role = item["role"].as_str().unwrap_or("user");
                    let part = if role == "assistant" {
                        "output_text"
                    } else {
                        "input_text"
                    };
                    json!({"type": "message", "role": role, "content": parts(&item["content"], part)})
                }
                _ => item.clone(),
            };
            let id = match item["id"].as_str() {
                Some(id) => id.to_string(),
                None => format!("{prefix}_{suffix}_{i}"),
            };
            listed["id"] = json!(id);
            listed["status"] = json!("completed");
            listed
        })
        .collect()
}

/// The `include` value that asks for the output text's log probabilities.
const LOGPROBS: &str = "message.output_text.logprobs";

/// Whether a refused key was left at what asks nothing.
fn asks_nothing(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(Value::is_null),
        _ => false,
    }
}

/// The text of an input message's `content`: a string, or text parts.
fn content_text(content: &Value, param: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(
                |(j, part)| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(text)) => Ok(text),
                    (Some("refusal"), _) => Ok(part["refusal"].as_str().unwrap_or("")),
                    (Some(other), _) => Err(ApiError::unsupported(
                        &format!("{param}[{j}].type"),
                        &format!("the content part {other:?} (text only)"),
                    )),
                    (None, _) => Err(ApiError::invalid(
                        Some(&format!("{param}[{j}]")),
                        format!("`{param}[{j}]` needs a `type`"),
                    )),
                },
            )
            .collect(),
        _ => Err(ApiError::invalid(
            Some(param),
            format!("`{param}` must be a string or a list of content parts"),
        )),
    }
}

/// A Responses request as the chat completion it means.
struct Translated {
    chat: Map<String, Value>,
    /// Where each message came from (`instructions`, `previous_response_id`, `input[i]`),
    /// for errors.
    origins: Vec<String>,
    /// The first message past the instructions: the conversation a kept response continues.
    history_start: usize,
}

fn to_chat(request: &Map<String, Value>) -> Result<Translated, ApiError> {
    for &(key, what) in REFUSED {
        if request.get(key).is_some_and(|v| !asks_nothing(v)) {
            return Err(ApiError::unsupported(key, what));
        }
    }
    match request.get("truncation").and_then(Value::as_str) {
        None | Some("disabled") => {}
        Some(_) => {
            return Err(ApiError::unsupported(
                "truncation",
                "truncating the input to fit (a prompt too long is refused)",
            ))
        }
    }
    let mut messages: Vec<Value> = Vec::new();
    let mut origins: Vec<String> = Vec::new();
    match request.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => {
            messages.push(json!({"role": "system", "content": text}));
            origins.push("instructions".into());
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("instructions"),
                "`instructions` must be a string",
            ))
        }
    }
    let history_start = messages.len();
    match request.get("previous_response_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) => {
            let stored = recall(id).ok_or_else(|| not_found(id, Some("previous_response_id")))?;
            origins.extend(
                stored
                    .conversation
                    .iter()
                    .map(|_| "previous_response_id".to_string()),
            );
            messages.extend(stored.conversation);
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("previous_response_id"),
                "`previous_response_id` must be a string",
            ))
        }
    }
    match request.get("input") {
        Some(Value::String(text)) => {
            messages.push(json!({"role": "user", "content": text}));
            origins.push("input".into());
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                let param = format!("input[{i}]");
                match item["type"].as_str().unwrap_or("message") {
                    "message" => {
                        let role = match item["role"].as_str() {
                            Some(r @ ("user" | "system" | "developer" | "assistant")) => r,
                            _ => {
                                return Err(ApiError::invalid(
                                    Some(&format!("{param}.role")),
                                    format!("`{param}.role` must be user, system, developer or assistant"),
                                ))
                            }
                        };
                        let text = content_text(&item["content"], &format!("{param}.content"))?;
                        messages.push(json!({"role": role, "content": text}));
                        origins.push(param);
                    }
                    "function_call" => {
                        let (Some(call_id), Some(name)) =
                            (item["call_id"].as_str(), item["name"].as_str())
                        else {
                            return Err(ApiError::invalid(
                                Some(&param),
                                format!("`{param}`: a function call needs `call_id` and `name`"),
                            ));
                        };
                        let call = json!({"id": call_id, "type": "function", "function": {
                            "name": name,
                            "arguments": item["arguments"].as_str().unwrap_or("{}"),
                        }});
                        // Calls one after the other were one turn's.
                        match messages.last_mut() {
                            Some(last) if last["tool_calls"].is_array() => {
                                last["tool_calls"].as_array_mut().unwrap().push(call);
                            }
                            _ => {
                                messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
                                origins.push(param);
                            }
                        }
                    }
                    "function_call_output" => {
                        let output = match &item["output"] {
                            Value::String(s) => s.clone(),
                            other => content_text(other, &format!("{param}.output"))?,
                        };
                        messages.push(json!({
                            "role": "tool",
                            "tool_call_id": item["call_id"],
                            "content": output,
                        }));
                        origins.push(param);
                    }
                    other => {
                        return Err(ApiError::unsupported(
                            &format!("{param}.type"),
                            &format!("the input item {other:?} (messages, function calls and their outputs are)"),
                        ))
                    }
                }
            }
        }
        _ => {
            return Err(ApiError::invalid(
                Some("input"),
                "`input` is required: a string, or a list of messages",
            ))
        }
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    for (from, to) in [
        ("max_output_tokens", "max_completion_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        // Not OpenAI's, but llama.cpp's and vLLM's servers take it too.
        ("seed", "seed"),
    ] {
        if let Some(value) = request.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), value.clone());
        }
    }
    if let Some(format) = request.get("text").and_then(|t| t.get("format")) {
        let format = match format["type"].as_str() {
            Some("text") => None,
            Some("json_object") => Some(json!({"type": "json_object"})),
            Some("json_schema") => Some(json!({"type": "json_schema", "json_schema": {
                "name": format["name"],
                "schema": format["schema"],
                "strict": format["strict"],
            }})),
            _ => {
                return Err(ApiError::invalid(
                    Some("text.format"),
                    "`text.format.type` must be text, json_object or json_schema",
                ))
            }
        };
        if let Some(format) = format {
            chat.insert("response_format".into(), format);
        }
    }
    if let Some(tools) = request.get("tools").filter(|v| !v.is_null()) {
        let tools = tools.as_array().ok_or_else(|| {
            ApiError::invalid(Some("tools"), "`tools` must be a list of function tools")
        })?;
        let tools = tools
            .iter()
            .map(|tool| match tool["type"].as_str() {
                Some("function") => json!({"type": "function", "function": {
                    "name": tool["name"],
                    "description": tool["description"],
                    "parameters": tool["parameters"],
                }}),
                // Refused where chat tools are, naming the type.
                _ => tool.clone(),
            })
            .collect();
        chat.insert("tools".into(), Value::Array(tools));
    }
    // Log probabilities: asked for by `include`, with `top_logprobs` alternatives per token.
    let mut logprobs = false;
    match request.get("include") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(LOGPROBS) => logprobs = true,
                    other => {
                        return Err(ApiError::unsupported(
                            &format!("include[{i}]"),
                            &format!("the extra output {other:?} (only {LOGPROBS:?} is)"),
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("include"),
                "`include` must be a list",
            ))
        }
    }
    let top = request.get("top_logprobs").filter(|v| !v.is_null());
    if logprobs {
        chat.insert("logprobs".into(), json!(true));
        if let Some(top) = top {
            chat.insert("top_logprobs".into(), top.clone());
        }
    } else if top.is_some_and(|t| t.as_u64() != Some(0)) {
        return Err(ApiError::invalid(
            Some("top_logprobs"),
            format!("`top_logprobs` needs `include: [{LOGPROBS:?}]`"),
        ));
    }
    if let Some(choice) = request.get("tool_choice").filter(|v| !v.is_null()) {
        let choice = match (choice["type"].as_str(), choice["name"].as_str()) {
            (Some("function"), Some(name)) => {
                json!({"type": "function", "function": {"name": name}})
            }
            _ => choice.clone(),
        };
        chat.insert("tool_choice".into(), choice);
    }
    Ok(Translated {
        chat,
        origins,
        history_start,
    })
}

/// A chat completion's error as the Responses request's: its parameters' names, and for
/// `messages[k]` the item (or `instructions`) message `k` came from.
fn in_responses_terms(mut error: ApiError, origins: &[String]) -> ApiError {
    let rename = |text: &str| {
        let mut text = text
            .replace("max_completion_tokens", "max_output_tokens")
            .replace("response_format", "text.format")
            .replace("`logprobs`", "`include`");
        if text == "logprobs" {
            text = "include".into();
        }
        while let Some(start) = text.find("messages[") {
            let digits = &text[start + "messages[".len()..];
            let end = digits.find(']').unwrap_or(0);
            let origin = digits[..end]
                .parse::<usize>()
                .ok()
                .and_then(|k| origins.get(k))
                .map_or("input", String::as_str)
                .to_string();
            text.replace_range(start..start + "messages[".len() + end + 1, &origin);
        }
        let mut text = text.replace("messages", "input");
        // Chat tools nest under `function`; Responses tools do not.
        while let Some(start) = text.find("].function") {
            text.replace_range(start + 1..start + 1 + ".function".len(), "");
        }
        text
    };
    error.param = error.param.as_deref().map(rename);
    error.message = rename(&error.message);
    error
}

/// Ids of one response and its items.
struct Ids {
    response: String,
    message: String,
    call: String,
}

impl Ids {
    fn of(running: &Running) -> Self {
        Ids {
            response: format!("resp_{}", running.id()),
            message: format!("msg_{}", running.id()),
            call: format!("call_{}", running.id()),
        }
    }
}

fn message_item(ids: &Ids, text: &str, status: &str, logprobs: &Value) -> Value {
    json!({
        "type": "message",
        "id": ids.message,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}],
    })
}

/// The output items of a finished answer: a message (with its tokens' log probabilities,
/// if asked), or the function calls it made.
fn output_items(ids: &Ids, text: &str, tools: bool, logprobs: &Value) -> Vec<Value> {
    match tools.then(|| tools::answer(text)).flatten() {
        Some(tools::Answer::Calls(calls)) => calls
            .into_iter()
            .enumerate()
            .map(|(k, (name, arguments))| {
                let suffix = if k == 0 {
                    String::new()
                } else {
                    format!("_{k}")
                };
                json!({
                    "type": "function_call",
                    "id": format!("fc_{}{suffix}", &ids.call["call_".len()..]),
                    "call_id": format!("{}{suffix}", ids.call),
                    "name": name,
                    "arguments": arguments,
                    "status": "completed",
                })
            })
            .collect(),
        Some(tools::Answer::Response(response)) => {
            vec![message_item(ids, &response, "completed", &json!([]))]
        }
        None => vec![message_item(ids, text, "completed", logprobs)],
    }
}

/// What the response object repeats of its request.
fn echoed(request: &Map<String, Value>) -> Map<String, Value> {
    let get = |key: &str, default: Value| {
        request
            .get(key)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    let mut fields = Map::new();
    for (key, default) in [
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("metadata", json!({})),
        ("parallel_tool_calls", json!(false)),
        ("temperature", json!(1.0)),
        ("top_p", json!(1.0)),
        ("tools", json!([])),
        ("tool_choice", json!("auto")),
        ("text", json!({"format": {"type": "text"}})),
        ("truncation", json!("disabled")),
        ("user", Value::Null),
    ] {
        fields.insert(key.into(), get(key, default));
    }
    fields.insert(
        "previous_response_id".into(),
        get("previous_response_id", Value::Null),
    );
    fields.insert("reasoning".into(), Value::Null);
    fields.insert(
        "store".into(),
        json!(request.get("store") != Some(&Value::Bool(false))),
    );
    fields
}

struct Answer<'a> {
    ids: &'a Ids,
    reply: &'a Reply,
    request: &'a Map<String, Value>,
}

impl Answer<'_> {
    /// The response object: in progress (no body yet), or finished from `body`.
    fn response(&self, status: &str, output: Vec<Value>, body: Option<&Value>) -> Value {
        let mut response = json!({
            "id": self.ids.response,
            "object": "response",
            "created_at": self.reply.created,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "model": self.reply.model,
            "output": output,
            "usage": null,
        });
        let fields = response.as_object_mut().unwrap();
        fields.extend(echoed(self.request));
        if status == "incomplete" {
            fields.insert(
                "incomplete_details".into(),
                json!({"reason": "max_output_tokens"}),
            );
        }
        if let Some(body) = body {
            let usage = self.reply.usage(std::slice::from_ref(body));
            fields.insert(
                "usage".into(),
                json!({
                    "input_tokens": usage["prompt_tokens"],
                    "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)},
                    "output_tokens": usage["completion_tokens"],
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": usage["total_tokens"],
                }),
            );
        }
        response
    }

    /// A finished prediction's status and output items.
    fn finished(&self, body: &Value, tools: bool) -> (&'static str, Vec<Value>) {
        let text = output_text(&body["output"]);
        let cut_short = self.reply.finish(body) == "length";
        let logprobs = match &body["metrics"]["logprobs"] {
            Value::Array(entries) => Value::Array(entries.clone()),
            _ => json!([]),
        };
        let mut items = output_items(self.ids, &text, tools, &logprobs);
        // Cut short: the message is incomplete (a whole function call is not).
        if cut_short && items.iter().all(|i| i["type"] == "message") {
            for item in &mut items {
                item["status"] = json!("incomplete");
            }
            return ("incomplete", items);
        }
        ("completed", items)
    }
}

/// `POST /v1/responses`.
pub(crate) async fn responses(State(state): State<AppState>, body: Bytes) -> Response {
    respond(&state, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(state: &AppState, body: &Bytes) -> Result<Response, ApiError> {
    let engine = &state.engine;
    let request = request_for(engine, OpenAi::TextGeneration, "/v1/responses", body)?;
    let Translated {
        chat,
        origins,
        history_start,
    } = to_chat(&request)?;
    // What a kept response's conversation starts with: this one's, before its answer.
    let history = match request.get("store") {
        Some(Value::Bool(false)) => None,
        None | Some(Value::Null) | Some(Value::Bool(true)) => Some(
            chat["messages"]
                .as_array()
                .map(|m| m[history_start..].to_vec())
                .unwrap_or_default(),
        ),
        Some(_) => {
            return Err(ApiError::invalid(
                Some("store"),
                "`store` must be true or false",
            ))
        }
    };
    let generation = {
        let engine = Arc::clone(engine);
        tokio::task::spawn_blocking(move || generation(&engine, &chat, Kind::Chat))
            .await
            .map_err(|e| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("reading the request failed: {e}"),
                kind: "server_error",
                param: None,
                code: None,
            })?
            .map_err(|e| in_responses_terms(e, &origins))?
    };
    let param_of = generation_param("max_output_tokens", Kind::Chat);
    let (runnings, guards) = submit_all(engine, [generation.input_for_choice(0)], &|name| {
        rename_param(&param_of(name))
    })?;
    let running = Arc::clone(&runnings[0]);
    let ids = Ids::of(&running);
    let reply = Reply {
        id: ids.response.clone(),
        created: unix_now(),
        model: engine.model_name(),
        kind: Kind::Chat,
        prompt_tokens: generation.prompt_tokens,
        limit: generation.limit,
    };
    if generation.stream {
        let options = StreamOptions {
            tools: generation.tools,
            logprobs: generation.logprobs,
            history,
        };
        return Ok(stream(running, guards, reply, ids, request, options));
    }
    let bodies = wait_all(&runnings, guards).await?;
    let answer = Answer {
        ids: &ids,
        reply: &reply,
        request: &request,
    };
    let (status, output) = answer.finished(&bodies[0], generation.tools);
    let response = answer.response(status, output, Some(&bodies[0]));
    if let Some(mut conversation) = history {
        conversation.extend(assistant_turns(
            response["output"].as_array().map_or(&[][..], Vec::as_slice),
        ));
        let inputs = input_items_of(&request, &ids.response);
        remember(&ids.response, &response, conversation, inputs);
    }
    Ok(Json(response).into_response())
}

fn rename_param(name: &str) -> String {
    match name {
        "messages" => "input".into(),
        "response_format" => "text.format".into(),
        other => other.into(),
    }
}

/// What a streamed answer carries besides its text.
struct StreamOptions {
    /// The answer is a tool call or a response, as JSON.
    tools: bool,
    logprobs: bool,
    /// The conversation to keep with the response (`None`: not kept).
    history: Option<Vec<Value>>,
}

/// The answer as Responses events: `response.created`, `response.in_progress`, the message
/// item, its content part and its text deltas as they are generated (with tools, the
/// function calls or the message once the JSON answer is whole), then
/// `response.completed` (or `response.incomplete`, or `response.failed`).
fn stream(
    running: Arc<Running>,
    guards: Vec<CancelOnDrop>,
    reply: Reply,
    ids: Ids,
    request: Map<String, Value>,
    options: StreamOptions,
) -> Response {
    let StreamOptions {
        tools,
        logprobs,
        history,
    } = options;
    struct State {
        events: Events,
        guards: Vec<CancelOnDrop>,
        reply: Reply,
        ids: Ids,
        request: Map<String, Value>,
        tools: bool,
        pending: std::collections::VecDeque<(String, Value)>,
        sequence: u64,
        /// The text sent so far (without tools).
        text: String,
        /// With log probabilities: those of tokens whose text is not sent yet.
        logprobs: Option<Vec<Value>>,
        /// The conversation to keep with the response (`None`: not kept).
        history: Option<Vec<Value>>,
        done: bool,
    }
    impl State {
        fn answer(&self) -> Answer<'_> {
            Answer {
                ids: &self.ids,
                reply: &self.reply,
                request: &self.request,
            }
        }
        fn push(&mut self, kind: &str, mut data: Value) {
            data["type"] = json!(kind);
            self.pending.push_back((kind.to_string(), data));
        }
        /// The events that open the message item and its text part.
        fn open_message(&mut self, output_index: usize) {
            let mut item = message_item(&self.ids, "", "in_progress", &json!([]));
            item["content"] = json!([]);
            self.push(
                "response.output_item.added",
                json!({"output_index": output_index, "item": item}),
            );
            self.push(
                "response.content_part.added",
                json!({"item_id": self.ids.message, "output_index": output_index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            );
        }
        fn delta(&mut self, output_index: usize, delta: &str) {
            let logprobs = self
                .logprobs
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            self.push(
                "response.output_text.delta",
                json!({"item_id": self.ids.message, "output_index": output_index, "content_index": 0, "delta": delta, "logprobs": logprobs}),
            );
        }
        /// The events that close the message item, `item` being its final form.
        fn close_message(&mut self, output_index: usize, item: &Value) {
            let text = item["content"][0]["text"].clone();
            self.push(
                "response.output_text.done",
                json!({"item_id": self.ids.message, "output_index": output_index, "content_index": 0, "text": text, "logprobs": item["content"][0]["logprobs"]}),
            );
            self.push(
                "response.content_part.done",
                json!({"item_id": self.ids.message, "output_index": output_index, "content_index": 0, "part": item["content"][0]}),
            );
            self.push(
                "response.output_item.done",
                json!({"output_index": output_index, "item": item}),
            );
        }
        fn fail(&mut self, message: String) {
            let mut response = self.answer().response("failed", Vec::new(), None);
            response["error"] = json!({"code": "server_error", "message": message});
            self.push("response.failed", json!({ "response": response }));
            self.done = true;
        }
        fn finish(&mut self, body: &Value) {
            if body["status"] != "succeeded" {
                let error = failed(body).message;
                return self.fail(error);
            }
            let (status, items) = self.answer().finished(body, self.tools);
            if self.tools {
                for (k, item) in items.iter().enumerate() {
                    if item["type"] == "function_call" {
                        let mut added = item.clone();
                        added["arguments"] = json!("");
                        added["status"] = json!("in_progress");
                        self.push(
                            "response.output_item.added",
                            json!({"output_index": k, "item": added}),
                        );
                        self.push(
                            "response.function_call_arguments.delta",
                            json!({"item_id": item["id"], "output_index": k, "delta": item["arguments"]}),
                        );
                        self.push(
                            "response.function_call_arguments.done",
                            json!({"item_id": item["id"], "output_index": k, "name": item["name"], "arguments": item["arguments"]}),
                        );
                        self.push(
                            "response.output_item.done",
                            json!({"output_index": k, "item": item}),
                        );
                    } else {
                        self.open_message(k);
                        let text = item["content"][0]["text"]
                            .as_str()
                            .unwrap_or("")
                            .to_string();
                        if !text.is_empty() {
                            self.delta(k, &text);
                        }
                        self.close_message(k, item);
                    }
                }
            } else {
                // A model that returns its text whole sends it here, in one delta.
                let whole = items[0]["content"][0]["text"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if let Some(rest) = whole.strip_prefix(self.text.as_str()) {
                    if !rest.is_empty() {
                        self.delta(0, rest);
                    }
                }
                self.close_message(0, &items[0]);
            }
            let response = self.answer().response(status, items, Some(body));
            if let Some(mut conversation) = self.history.take() {
                conversation.extend(assistant_turns(
                    response["output"].as_array().map_or(&[][..], Vec::as_slice),
                ));
                let inputs = input_items_of(&self.request, &self.ids.response);
                remember(&self.ids.response, &response, conversation, inputs);
            }
            let kind = if status == "incomplete" {
                "response.incomplete"
            } else {
                "response.completed"
            };
            self.push(kind, json!({ "response": response }));
            self.guards.drain(..).for_each(CancelOnDrop::disarm);
            self.done = true;
        }
    }
    let mut state = State {
        events: events(0, running.subscribe()),
        guards,
        reply,
        ids,
        request,
        tools,
        pending: std::collections::VecDeque::new(),
        sequence: 0,
        text: String::new(),
        logprobs: logprobs.then(Vec::new),
        history,
        done: false,
    };
    let created = state.answer().response("in_progress", Vec::new(), None);
    state.push("response.created", json!({ "response": created.clone() }));
    state.push("response.in_progress", json!({ "response": created }));
    if !tools {
        state.open_message(0);
    }
    let events = futures_util::stream::unfold(state, |mut st| async move {
        use futures_util::StreamExt as _;
        loop {
            if let Some((kind, mut data)) = st.pending.pop_front() {
                data["sequence_number"] = json!(st.sequence);
                st.sequence += 1;
                let event = Event::default().event(kind).data(data.to_string());
                return Some((Ok::<_, Infallible>(event), st));
            }
            if st.done {
                return None;
            }
            let event = match st.events.next().await? {
                (_, Ok(event)) => event,
                (_, Err(_lost)) => {
                    st.fail("the stream fell behind and lost tokens".into());
                    continue;
                }
            };
            match &*event {
                StreamEvent::Metric { name, value, .. } if name == "logprobs" => {
                    if let Some(entries) = st.logprobs.as_mut() {
                        entries.push(value.clone());
                    }
                }
                StreamEvent::Output { chunk, .. } if !st.tools => {
                    if let Some(text) = chunk.as_str().filter(|t| !t.is_empty()) {
                        st.text.push_str(text);
                        st.delta(0, text);
                    }
                }
                StreamEvent::Completed(body) => st.finish(body),
                _ => {}
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_the_latest_responses_within_its_bounds() {
        for i in 0..MAX_STORED + 10 {
            remember(
                &format!("resp_test{i}"),
                &json!({"id": i}),
                vec![json!({"role": "user", "content": "hi"})],
                Vec::new(),
            );
        }
        assert!(recall("resp_test0").is_none() && recall("resp_test9").is_none());
        assert!(recall("resp_test10").is_some());
        let last = recall(&format!("resp_test{}", MAX_STORED + 9)).unwrap();
        assert_eq!(last.response["id"], MAX_STORED + 9);
        // A few large conversations push the others out by size.
        let big = vec![json!({"role": "user", "content": "x".repeat(MAX_STORED_BYTES / 3)})];
        for i in 0..4 {
            remember(&format!("resp_big{i}"), &json!({}), big.clone(), Vec::new());
        }
        let store = store().lock().unwrap();
        assert!(store.bytes <= MAX_STORED_BYTES);
        assert!(!store.responses.contains_key("resp_big0"));
        assert!(store.responses.contains_key("resp_big3"));
        assert_eq!(store.order.len(), store.responses.len());
    }

    #[test]
    fn input_items_list_a_page_at_a_time_in_either_order() {
        let request = json!({"input": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "message", "role": "assistant", "content": "It is sunny.", "id": "msg_mine"},
            {"role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
        ]});
        let items = input_items_of(request.as_object().unwrap(), "resp_abc");
        let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "msg_abc_0",
                "fc_abc_1",
                "fco_abc_2",
                "msg_mine",
                "msg_abc_4"
            ]
        );
        assert_eq!(
            items[0]["content"],
            json!([{"type": "input_text", "text": "What is the weather in Paris?"}])
        );
        assert_eq!(items[3]["content"][0]["type"], "output_text");
        assert!(items.iter().all(|i| i["status"] == "completed"));
        let query = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let page = |pairs: &[(&str, &str)]| page_of(items.clone(), &query(pairs));
        let ids_of = |page: &Value| -> Vec<String> {
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect()
        };
        // Newest first by default.
        let all = page(&[]).unwrap();
        assert_eq!(ids_of(&all)[0], "msg_abc_4");
        assert_eq!(
            (all["first_id"].as_str(), all["has_more"].as_bool()),
            (Some("msg_abc_4"), Some(false))
        );
        // Pages of two, oldest first, walked by `after`.
        let first = page(&[("order", "asc"), ("limit", "2")]).unwrap();
        assert_eq!(
            (ids_of(&first), first["has_more"].as_bool()),
            (
                vec!["msg_abc_0".to_string(), "fc_abc_1".to_string()],
                Some(true)
            )
        );
        let next = page(&[("order", "asc"), ("limit", "2"), ("after", "fc_abc_1")]).unwrap();
        assert_eq!(ids_of(&next), ["fco_abc_2", "msg_mine"]);
        let last = page(&[("order", "asc"), ("limit", "2"), ("after", "msg_mine")]).unwrap();
        assert_eq!(
            (ids_of(&last), last["has_more"].as_bool()),
            (vec!["msg_abc_4".to_string()], Some(false))
        );
        // `before` keeps the nearest items.
        let before = page(&[("order", "asc"), ("limit", "2"), ("before", "msg_mine")]).unwrap();
        assert_eq!(ids_of(&before), ["fc_abc_1", "fco_abc_2"]);
        // Bad queries name their parameter.
        for (bad, param) in [
            (("limit", "0"), "limit"),
            (("limit", "101"), "limit"),
            (("order", "up"), "order"),
            (("after", "msg_nope"), "after"),
        ] {
            assert_eq!(page(&[bad]).unwrap_err().param.as_deref(), Some(param));
        }
    }
}
