//! OpenAI's `tools` (function calling) for models without a tool format of their own, the
//! way llama.cpp's generic tool format does it: the tools are described in the system
//! message, and structured output holds the answer to one JSON object, either
//! `{"tool_call": {"name": …, "arguments": {…}}}` or `{"response": "…"}` (only the first
//! when a call is required); with `parallel_tool_calls: true`, `{"tool_calls": [{…}, …]}`
//! (one to [`MAX_PARALLEL_CALLS`] calls) in place of the first. The arguments match the
//! tool's own `parameters` schema, so they always parse and validate.

use serde_json::{json, Map, Value};

use super::ApiError;
use runner_models::ChatMessage;

/// Calls one answer may make with `parallel_tool_calls: true`.
pub(super) const MAX_PARALLEL_CALLS: u32 = 8;

/// The tools a request offers, and what the answer is held to.
pub(super) struct Tools {
    /// The JSON Schema of the answer.
    pub schema: Value,
    /// What the system message gains: the tools, and the answer's forms.
    instructions: String,
}

/// What the model answered.
pub(super) enum Answer {
    /// One call, or several (`parallel_tool_calls`): names and arguments (JSON text).
    Calls(Vec<(String, String)>),
    Response(String),
}

fn param_error(param: &str, message: String) -> ApiError {
    ApiError::invalid(Some(param), message)
}

/// Rewrites a tool's local references (`#/$defs/x`, `#`) to where its parameters sit in
/// the answer's schema (`#/$defs/tool{i}…`).
fn relocate(schema: &mut Value, to: &str) {
    match schema {
        Value::Object(object) => {
            for (key, value) in object.iter_mut() {
                match (key.as_str(), value) {
                    ("$ref", Value::String(reference)) if reference.starts_with('#') => {
                        *reference = format!("{to}{}", &reference[1..]);
                    }
                    (_, value) => relocate(value, to),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| relocate(v, to)),
        _ => {}
    }
}

/// The tools the request offers, or `None` when it offers none (or `tool_choice: none`).
pub(super) fn asked(request: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    if request.get("functions").is_some_and(|v| !v.is_null())
        || request.get("function_call").is_some_and(|v| !v.is_null())
    {
        return Err(ApiError::unsupported(
            "functions",
            "the deprecated `functions`/`function_call` (send `tools` and `tool_choice`)",
        ));
    }
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => {
            return Err(param_error(
                "tools",
                "`tools` must be a list of {\"type\": \"function\", \"function\": {…}}".into(),
            ))
        }
    };
    let mut described = Vec::new();
    let mut calls = Vec::new();
    let mut defs = Map::new();
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool["type"] != "function" {
            return Err(ApiError::unsupported(
                &format!("{param}.type"),
                "a tool that is not a function",
            ));
        }
        let function = tool["function"]
            .as_object()
            .ok_or_else(|| param_error(&param, format!("`{param}.function` is required")))?;
        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(param_error(
                &format!("{param}.function.name"),
                format!("`{param}.function.name` must be 1 to 64 letters, digits, `_` or `-`"),
            ));
        }
        if calls.iter().any(|c: &(String, Value)| c.0 == name) {
            return Err(param_error(
                &format!("{param}.function.name"),
                format!("two tools are named `{name}`"),
            ));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(param_error(
                    &format!("{param}.function.parameters"),
                    format!("`{param}.function.parameters` must be a JSON Schema (an object)"),
                ))
            }
        };
        runner_models::structured::Grammar::compile(&parameters).map_err(|e| {
            param_error(
                &format!("{param}.function.parameters"),
                format!("`{param}.function.parameters`: {e}"),
            )
        })?;
        let mut relocated = parameters.clone();
        relocate(&mut relocated, &format!("#/$defs/tool{i}"));
        defs.insert(format!("tool{i}"), relocated);
        described.push(json!({
            "name": name,
            "description": function.get("description").cloned().unwrap_or(Value::Null),
            "parameters": parameters,
        }));
        calls.push((
            name.to_string(),
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": {"$ref": format!("#/$defs/tool{i}")},
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }),
        ));
    }
    // `auto` (the default), `required`, `none`, or one function by name.
    let (required, only) = match request.get("tool_choice") {
        None | Some(Value::Null) => (false, None),
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => (false, None),
            "required" => (true, None),
            "none" => return Ok(None),
            _ => {
                return Err(param_error(
                    "tool_choice",
                    "`tool_choice` must be `auto`, `required`, `none` or {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
                ))
            }
        },
        Some(choice) => {
            let name = choice["function"]["name"].as_str().unwrap_or("");
            if choice["type"] != "function" || !calls.iter().any(|c| c.0 == name) {
                return Err(param_error(
                    "tool_choice",
                    format!("`tool_choice` names no tool of `tools` (`{name}`)"),
                ));
            }
            (true, Some(name.to_string()))
        }
    };
    // OpenAI's default is `true`; llama.cpp's, followed here, `false`: a small model
    // asked for a list of calls tends to repeat its one call.
    let parallel = match request.get("parallel_tool_calls") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(parallel)) => *parallel,
        Some(_) => {
            return Err(param_error(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be true or false".into(),
            ))
        }
    };
    let offered: Vec<Value> = calls
        .into_iter()
        .filter(|(name, _)| only.as_ref().is_none_or(|o| o == name))
        .map(|(_, call)| call)
        .collect();
    let call = if parallel {
        json!({
            "type": "object",
            "properties": {"tool_calls": {
                "type": "array",
                "items": {"anyOf": offered},
                "minItems": 1,
                "maxItems": MAX_PARALLEL_CALLS,
            }},
            "required": ["tool_calls"],
            "additionalProperties": false,
        })
    } else {
        json!({
            "type": "object",
            "properties": {"tool_call": {"anyOf": offered}},
            "required": ["tool_call"],
            "additionalProperties": false,
        })
    };
    let response = json!({
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": false,
    });
    let mut schema = if required {
        call
    } else {
        json!({"anyOf": [call, response]})
    };
    schema["$defs"] = Value::Object(defs);
    let call_form = "{\"name\": \"<the tool's name>\", \"arguments\": {...}}";
    let forms = match (&only, required) {
        (_, true) if parallel => format!(
            "Answer by calling one or more of them, with one JSON object: {{\"tool_calls\": [{call_form}, ...]}}."
        ),
        (_, false) if parallel => format!(
            "Answer with one JSON object: {{\"tool_calls\": [{call_form}, ...]}} to call one or more tools, or {{\"response\": \"<your answer>\"}} to answer directly."
        ),
        (Some(name), _) => format!(
            "Answer by calling `{name}`, with one JSON object: {{\"tool_call\": {{\"name\": \"{name}\", \"arguments\": {{...}}}}}}."
        ),
        (None, true) => "Answer by calling one of them, with one JSON object: {\"tool_call\": {\"name\": \"<the tool's name>\", \"arguments\": {...}}}.".to_string(),
        (None, false) => "Answer with one JSON object: {\"tool_call\": {\"name\": \"<the tool's name>\", \"arguments\": {...}}} to call a tool, or {\"response\": \"<your answer>\"} to answer directly.".to_string(),
    };
    Ok(Some(Tools {
        schema,
        instructions: format!(
            "You can call these tools:\n{}\n{forms}",
            Value::Array(described)
        ),
    }))
}

impl Tools {
    /// The conversation with the tools described in its system message (added first when
    /// it has none).
    pub(super) fn instruct(&self, messages: &mut Vec<ChatMessage>) {
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{}", first.content, self.instructions);
            }
            _ => messages.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: self.instructions.clone(),
                },
            ),
        }
    }
}

/// An assistant turn that called tools, as the model wrote it (the answer's own form).
pub(super) fn earlier_call(calls: &Value, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].tool_calls");
    let rendered: Vec<Value> = calls
        .as_array()
        .ok_or_else(|| param_error(&param, format!("`{param}` must be a list")))?
        .iter()
        .map(|call| {
            let function = &call["function"];
            let name = function["name"].as_str().ok_or_else(|| {
                param_error(
                    &param,
                    format!("`{param}`: each call needs `function.name`"),
                )
            })?;
            let arguments = match &function["arguments"] {
                Value::String(text) => serde_json::from_str(text).unwrap_or(json!(text)),
                other => other.clone(),
            };
            Ok(json!({"name": name, "arguments": arguments}))
        })
        .collect::<Result<_, ApiError>>()?;
    // In the answer's own form: one call, or several at once.
    Ok(match rendered.as_slice() {
        [one] => json!({ "tool_call": one }).to_string(),
        _ => json!({ "tool_calls": rendered }).to_string(),
    })
}

/// A `tool` message (a call's result), as the model sees it: a user turn.
pub(super) fn tool_result(message: &Value, content: String) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content:
            json!({"tool_response": {"tool_call_id": message["tool_call_id"], "content": content}})
                .to_string(),
    }
}

/// The answer the model gave, if it is whole JSON of one of the two forms.
pub(super) fn answer(text: &str) -> Option<Answer> {
    let value: Value = serde_json::from_str(text).ok()?;
    let call = |call: &Value| {
        Some((
            call["name"].as_str()?.to_string(),
            call.get("arguments")?.to_string(),
        ))
    };
    if let Some(one) = value.get("tool_call") {
        return Some(Answer::Calls(vec![call(one)?]));
    }
    if let Some(Value::Array(several)) = value.get("tool_calls") {
        return several
            .iter()
            .map(call)
            .collect::<Option<_>>()
            .map(Answer::Calls);
    }
    Some(Answer::Response(
        value.get("response")?.as_str()?.to_string(),
    ))
}
