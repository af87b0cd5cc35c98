//! The OpenAI-compatible routes, checked against the same model's Cog predictions (the
//! text and vectors must be identical: both are one prediction on one model), and driven
//! by OpenAI's own Python client (pinned in tests/data/openai-requirements.txt;
//! RUNNER_OPENAI_VENV) as the reference client: its parsers must accept every answer.

mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use support::{http, repo_root, Server};

fn smollm2() -> PathBuf {
    let dir = repo_root().join("models/smollm2-135m-instruct");
    assert!(
        dir.join("weights/SmolLM2-135M-Instruct.Q4_1.gguf")
            .is_file(),
        "SmolLM2 weights are missing: run scripts/fetch-smollm2.sh (or scripts/test.sh)"
    );
    dir
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(
        &server.addr,
        "POST",
        path,
        Some(&body.to_string()),
        &[("Content-Type", "application/json")],
    );
    let parsed =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
    (status, parsed)
}

/// The text a Cog prediction streamed, joined.
fn cog_text(server: &Server, input: Value) -> (String, Value) {
    let (status, p) = post(server, "/predictions", &json!({ "input": input }));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    let text = p["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    (text, p["metrics"].clone())
}

/// A streamed chat completion: its chunks (checked to end with `data: [DONE]`) and the raw
/// stream.
fn streamed_chat(server: &Server, body: &Value) -> (Vec<Value>, String) {
    let (status, text) = http(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
        &[],
    );
    assert_eq!(status, 200, "{text}");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    (chunks, text)
}

fn error_of(status: u16, body: &Value, want_status: u16, want_param: Option<&str>) -> String {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].is_string() && error["type"].is_string(),
        "OpenAI's error shape: {body}"
    );
    assert_eq!(error["param"].as_str(), want_param, "{body}");
    error["message"].as_str().unwrap().to_string()
}

#[test]
fn chat_and_completions_generate_what_the_cog_prediction_generates() {
    let server = Server::start(&smollm2(), &[]);
    let (status, models) = {
        let (s, t) = http(&server.addr, "GET", "/v1/models", None, &[]);
        (s, serde_json::from_str::<Value>(&t).unwrap())
    };
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "smollm2-135m-instruct");
    assert_eq!(models["data"][0]["context_length"], 8192);

    // One user message: the Cog input's chat form (the template's default system prompt).
    let question = "What is the capital of France?";
    let (status, chat) = post(
        &server,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 20}),
    );
    assert_eq!(status, 200, "{chat}");
    let (want, metrics) = cog_text(
        &server,
        json!({"prompt": question, "temperature": 0, "max_new_tokens": 20}),
    );
    assert_eq!(chat["object"], "chat.completion");
    assert!(chat["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(chat["choices"][0]["finish_reason"], "length");
    assert_eq!(chat["usage"]["prompt_tokens"], metrics["input_token_count"]);
    assert_eq!(chat["usage"]["completion_tokens"], 20);
    assert_eq!(
        chat["usage"]["total_tokens"],
        metrics["input_token_count"].as_u64().unwrap() + 20
    );
    // The same conversation again: its prompt comes from the prompt cache, as usage says.
    let (_, again) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 20}),
    );
    assert_eq!(again["choices"][0]["message"]["content"], want.as_str());
    let prompt_tokens = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt_tokens - 1,
        "{again}"
    );

    // A conversation: rendered through the model's ChatML template, turn by turn.
    let messages = json!([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "another."}]},
    ]);
    let chatml = "<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nName another.<|im_end|>\n<|im_start|>assistant\n";
    let (status, chat) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": messages, "temperature": 0, "max_completion_tokens": 12}),
    );
    assert_eq!(status, 200, "{chat}");
    let (want, _) = cog_text(
        &server,
        json!({"prompt": chatml, "use_chat_template": false, "temperature": 0, "max_new_tokens": 12}),
    );
    assert_eq!(chat["choices"][0]["message"]["content"], want.as_str());

    // Streamed: the same text in pieces, a finish reason, the usage, then [DONE].
    let body = json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 20, "stream": true, "stream_options": {"include_usage": true}});
    let (chunks, text) = streamed_chat(&server, &body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let (want, _) = cog_text(
        &server,
        json!({"prompt": question, "temperature": 0, "max_new_tokens": 20}),
    );
    assert_eq!(streamed, want);
    assert!(
        chunks.len() > 5,
        "tokens arrive one chunk at a time: {text}"
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 20);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));

    // Legacy completions: the raw text continued, 16 tokens by default, and echo.
    let (status, done) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "The sky is", "temperature": 0}),
    );
    assert_eq!(status, 200, "{done}");
    let (want, _) = cog_text(
        &server,
        json!({"prompt": "The sky is", "use_chat_template": false, "temperature": 0, "max_new_tokens": 16}),
    );
    assert_eq!(done["object"], "text_completion");
    assert_eq!(done["choices"][0]["text"], want.as_str());
    assert_eq!(done["usage"]["completion_tokens"], 16);
    let (_, echoed) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": ["The sky is"], "temperature": 0, "echo": true}),
    );
    assert_eq!(echoed["choices"][0]["text"], format!("The sky is{want}"));

    // A stop sequence ends the turn early: finish_reason "stop", the stop text left out.
    let cut = want.split_whitespace().nth(2).unwrap().to_string();
    let (_, stopped) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "The sky is", "temperature": 0, "stop": cut}),
    );
    let text = stopped["choices"][0]["text"].as_str().unwrap();
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
    assert!(
        !text.contains(&cut) && want.starts_with(text),
        "{text:?} of {want:?}"
    );

    // Seeded sampling at OpenAI's default temperature repeats itself.
    let seeded = json!({"prompt": "Once upon a time", "max_tokens": 12, "seed": 1234});
    let (_, a) = post(&server, "/v1/completions", &seeded);
    let (_, b) = post(&server, "/v1/completions", &seeded);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

/// A bounded schema (strings, arrays): a small model must finish it within the tokens given.
fn city_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "country": {"type": "string", "maxLength": 30},
            "population": {"type": "integer"},
            "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
            "size": {"enum": ["small", "medium", "large"]},
            "mayor": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
            "coastal": {"type": "boolean"}
        },
        "required": ["name", "country", "population", "landmarks", "size", "mayor", "coastal"],
        "additionalProperties": false
    })
}

#[test]
fn structured_output_is_json_that_the_schema_accepts() {
    let server = Server::start(&smollm2(), &[]);
    let schema = city_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let check = |text: &str| {
        let value: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert!(validator.is_valid(&value), "the schema refuses {text}");
    };
    let question = "Describe Paris.";
    let format = json!({"type": "json_schema", "json_schema": {"name": "city", "strict": true, "schema": schema}});

    // Greedy: the chat route's text is the Cog prediction's with `json_schema`, whole JSON
    // that the schema accepts, ended by the JSON itself (not the token limit).
    let (status, chat) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 400, "response_format": format}),
    );
    assert_eq!(status, 200, "{chat}");
    let content = chat["choices"][0]["message"]["content"].as_str().unwrap();
    check(content);
    assert_eq!(chat["choices"][0]["finish_reason"], "stop", "{chat}");
    let (want, metrics) = cog_text(
        &server,
        json!({"prompt": question, "temperature": 0, "max_new_tokens": 400, "json_schema": schema.to_string()}),
    );
    assert_eq!(content, want);
    assert_eq!(
        chat["usage"]["completion_tokens"],
        metrics["output_token_count"]
    );
    // Without the schema the same model answers in prose: the constraint made the JSON.
    let (free, _) = cog_text(
        &server,
        json!({"prompt": question, "temperature": 0, "max_new_tokens": 60}),
    );
    assert!(serde_json::from_str::<Value>(&free).is_err(), "{free}");

    // Sampled (the masks' second draw happens here): every seed gives valid JSON.
    for seed in 0..4 {
        let (status, chat) = post(
            &server,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Describe a city you like."}], "temperature": 1.0, "seed": seed, "max_tokens": 400, "response_format": format}),
        );
        assert_eq!(status, 200, "{chat}");
        assert_eq!(chat["choices"][0]["finish_reason"], "stop", "{chat}");
        check(chat["choices"][0]["message"]["content"].as_str().unwrap());
    }

    // Streamed: the pieces join into the same JSON.
    let (chunks, _) = streamed_chat(
        &server,
        &json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 400, "response_format": format, "stream": true}),
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, want);

    // `json_object`: an object, whatever its keys (each at most once).
    let (status, chat) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Describe Paris."}], "temperature": 0, "max_tokens": 30, "response_format": {"type": "json_object"}}),
    );
    assert_eq!(status, 200, "{chat}");
    let content = chat["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.trim_start().starts_with('{'), "{content}");

    // The Cog input: a schema that is not JSON, or that runner cannot enforce, fails the
    // prediction with the reason.
    for (bad, reason) in [
        ("{\"type\":", "json_schema is not JSON"),
        (
            "{\"type\": \"string\", \"format\": \"email\"}",
            "`format: \"email\"` is not supported",
        ),
    ] {
        let (_, p) = post(
            &server,
            "/predictions",
            &json!({"input": {"prompt": "Hi", "json_schema": bad}}),
        );
        assert_eq!(p["status"], "failed", "{p}");
        assert!(p["error"].as_str().unwrap().contains(reason), "{p}");
    }
}

#[test]
fn log_probabilities_come_with_the_tokens_every_way() {
    let server = Server::start(&smollm2(), &[]);
    let messages = json!([{"role": "user", "content": "Name three colours."}]);
    let (status, chat) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": messages, "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 3}),
    );
    assert_eq!(status, 200, "{chat}");
    let text = chat["choices"][0]["message"]["content"].as_str().unwrap();
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 12);
    let mut bytes = Vec::new();
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{entry}");
        // Greedy: the token taken is the most likely; alternatives come most likely first,
        // and are probabilities (their sum at most 1).
        assert_eq!(top[0]["token"], entry["token"], "{entry}");
        assert_eq!(top[0]["logprob"], entry["logprob"], "{entry}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{entry}"
        );
        assert!(
            lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-9,
            "{entry}"
        );
        bytes.extend(
            entry["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    // The tokens' bytes are the text.
    assert_eq!(String::from_utf8(bytes).unwrap(), text);

    // The Cog prediction records the same entries in its `logprobs` metric.
    let (_, metrics) = cog_text(
        &server,
        json!({"prompt": "Name three colours.", "temperature": 0, "max_new_tokens": 12, "logprobs": true, "top_logprobs": 3}),
    );
    assert_eq!(
        &metrics["logprobs"],
        &chat["choices"][0]["logprobs"]["content"]
    );

    // Streamed: each chunk carries its tokens' entries; together they are the same list.
    let (chunks, _) = streamed_chat(
        &server,
        &json!({"messages": messages, "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 3, "stream": true}),
    );
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(&streamed, content);
    for c in &chunks {
        if let Some(piece) = c["choices"][0]["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            let tokens: String = c["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["token"].as_str().unwrap())
                .collect();
            assert_eq!(tokens, piece, "a chunk's tokens are its text");
        }
    }

    // The legacy endpoint's shape: tokens, their logprobs, alternatives by token, offsets.
    let (status, legacy) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 4, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{legacy}");
    let lp = &legacy["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens.concat(),
        legacy["choices"][0]["text"].as_str().unwrap()
    );
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[1], tokens[0].chars().count() as u64);
    // Without logprobs asked, none.
    let (_, plain) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 1}),
    );
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);

    // What cannot be answered, by name.
    let chat_with = |extra: Value| {
        let mut body = json!({"messages": messages, "max_tokens": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post(&server, "/v1/chat/completions", &body)
    };
    let (s, b) = chat_with(json!({"logprobs": true, "top_logprobs": 21}));
    error_of(s, &b, 400, Some("top_logprobs"));
    let (s, b) = chat_with(json!({"top_logprobs": 2}));
    assert!(error_of(s, &b, 400, Some("top_logprobs")).contains("logprobs: true"));
    let (s, b) = chat_with(json!({"logprobs": 1}));
    error_of(s, &b, 400, Some("logprobs"));
    let (s, b) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "Hi", "logprobs": 6}),
    );
    error_of(s, &b, 400, Some("logprobs"));
    let (s, b) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "Hi", "logprobs": 1, "echo": true}),
    );
    error_of(s, &b, 400, Some("echo"));
}

/// `n`: each choice a prediction of its own, its seed the request's plus its index; the
/// prompt counted once, the outputs summed; streamed, the choices' chunks interleave.
#[test]
fn several_choices_are_several_seeded_predictions() {
    let server = Server::start(&smollm2(), &["--concurrency", "2"]);
    let messages = json!([{"role": "user", "content": "Write a line about the sea."}]);
    let one = |seed: u64| {
        let (status, body) = post(
            &server,
            "/v1/chat/completions",
            &json!({"messages": messages, "temperature": 1, "seed": seed, "max_tokens": 12}),
        );
        assert_eq!(status, 200, "{body}");
        body
    };
    let (status, several) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": messages, "temperature": 1, "seed": 40, "max_tokens": 12, "n": 3}),
    );
    assert_eq!(status, 200, "{several}");
    let choices = several["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut completion = 0;
    let mut texts = Vec::new();
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        let alone = one(40 + i as u64);
        assert_eq!(
            choice["message"], alone["choices"][0]["message"],
            "choice {i}"
        );
        completion += alone["usage"]["completion_tokens"].as_u64().unwrap();
        texts.push(choice["message"]["content"].as_str().unwrap().to_string());
    }
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "sampled choices differ: {texts:?}"
    );
    assert_eq!(several["usage"]["completion_tokens"], completion);
    assert_eq!(
        several["usage"]["prompt_tokens"],
        one(40)["usage"]["prompt_tokens"],
        "the prompt once"
    );

    // Streamed: chunks of both choices, a finish reason each, one usage, then [DONE].
    let (chunks, _) = streamed_chat(
        &server,
        &json!({"messages": messages, "temperature": 1, "seed": 40, "max_tokens": 12, "n": 2, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let mut streamed = [String::new(), String::new()];
    let mut finishes = 0;
    for chunk in &chunks {
        if let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) {
            let i = choice["index"].as_u64().unwrap() as usize;
            streamed[i] += choice["delta"]["content"].as_str().unwrap_or("");
            finishes += usize::from(choice["finish_reason"].is_string());
        }
    }
    assert_eq!(streamed, [texts[0].clone(), texts[1].clone()]);
    assert_eq!(finishes, 2);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 24);

    // The legacy endpoint too.
    let (_, legacy) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "The sea is", "temperature": 1, "seed": 3, "max_tokens": 4, "n": 2}),
    );
    assert_eq!(legacy["choices"].as_array().unwrap().len(), 2, "{legacy}");
    for n in [json!(0), json!(9), json!("2")] {
        let (s, b) = post(
            &server,
            "/v1/chat/completions",
            &json!({"messages": messages, "n": n}),
        );
        error_of(s, &b, 400, Some("n"));
    }
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
            "parameters": {"$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"], "additionalProperties": false}},
                "type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"], "additionalProperties": false}}}
    ])
}

#[test]
fn tools_are_called_with_arguments_their_schemas_accept() {
    let server = Server::start(&smollm2(), &[]);
    let tools = weather_tools();
    let validators: std::collections::HashMap<&str, jsonschema::Validator> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let f = &t["function"];
            (
                f["name"].as_str().unwrap(),
                jsonschema::validator_for(&f["parameters"]).unwrap(),
            )
        })
        .collect();
    let ask = |question: &str, extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 200, "tools": tools});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post(&server, "/v1/chat/completions", &body)
    };
    let called = |body: &Value| {
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
        assert_eq!(choice["message"]["content"], Value::Null, "{body}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        let name = call["function"]["name"].as_str().unwrap().to_string();
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(validators[name.as_str()].is_valid(&arguments), "{body}");
        (name, arguments)
    };
    let question = "What is the weather in Paris?";
    // Required, and by name: a call, with arguments its parameters' schema accepts (the
    // second tool's through a relocated `$ref`).
    let (status, body) = ask(question, json!({"tool_choice": "required"}));
    assert_eq!(status, 200, "{body}");
    let (name, arguments) = called(&body);
    assert_eq!(
        (name.as_str(), &arguments["city"]),
        ("get_weather", &json!("Paris"))
    );
    let (_, body) = ask(
        question,
        json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
    );
    assert_eq!(called(&body).0, "get_time");
    // Auto: the model chooses; the weather gets a call, a greeting words.
    let (_, body) = ask(question, json!({}));
    assert_eq!(called(&body).0, "get_weather");
    let (_, body) = ask("Hi! How are you?", json!({}));
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty() && !c.starts_with('{')),
        "{body}"
    );
    // `none`: an ordinary answer, the tools unused.
    let (_, body) = ask(question, json!({"tool_choice": "none", "max_tokens": 10}));
    assert!(
        body["choices"][0]["message"]["tool_calls"].is_null(),
        "{body}"
    );
    // Streamed: the same call, whole, in one delta.
    let (chunks, _) = streamed_chat(
        &server,
        &json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 200, "tools": tools, "tool_choice": "required", "stream": true}),
    );
    let delta = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned())
        .unwrap();
    assert_eq!(delta[0]["index"], 0);
    assert_eq!(delta[0]["function"]["name"], "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(delta[0]["function"]["arguments"].as_str().unwrap()).unwrap(),
        arguments
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    // A conversation that carries a call and its result goes on: a call or an answer.
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"celsius\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}
        ], "temperature": 0, "max_tokens": 200, "tools": tools}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        matches!(
            body["choices"][0]["finish_reason"].as_str(),
            Some("tool_calls" | "stop")
        ),
        "{body}"
    );

    // Several calls at once, when the client allows them: each valid, each with its own
    // id, and indexed in the streamed delta.
    let both = "What are the weather and the local time in Paris?";
    let parallel = json!({"tool_choice": "required", "parallel_tool_calls": true});
    let (status, body) = ask(both, parallel.clone());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    assert!((1..=8).contains(&calls.len()), "{body}");
    let mut ids = std::collections::HashSet::new();
    for call in calls {
        assert!(
            ids.insert(call["id"].as_str().unwrap().to_string()),
            "{body}"
        );
        let name = call["function"]["name"].as_str().unwrap();
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(validators[name].is_valid(&arguments), "{body}");
    }
    let mut streamed = parallel.clone();
    streamed["stream"] = json!(true);
    streamed["messages"] = json!([{"role": "user", "content": both}]);
    streamed["tools"] = tools.clone();
    streamed["temperature"] = json!(0);
    streamed["max_tokens"] = json!(200);
    let (chunks, _) = streamed_chat(&server, &streamed);
    let delta = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned())
        .unwrap();
    assert_eq!(delta.len(), calls.len());
    for (k, call) in delta.iter().enumerate() {
        assert_eq!(call["index"], k);
        assert_eq!(call["function"], calls[k]["function"]);
    }
    // A conversation with two calls in one turn and both results goes on.
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [
            {"role": "user", "content": both},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"celsius\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{\"place\":{\"city\":\"Paris\"}}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "14:05"}
        ], "temperature": 0, "max_tokens": 100, "tools": tools, "parallel_tool_calls": true}),
    );
    assert_eq!(status, 200, "{body}");

    // What cannot be offered, by name.
    let bad = |extra: Value, param: &str| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (s, b) = post(&server, "/v1/chat/completions", &body);
        error_of(s, &b, 400, Some(param))
    };
    bad(
        json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
        "tools[0].function.name",
    );
    bad(
        json!({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}),
        "tools[1].function.name",
    );
    bad(
        json!({"tools": [{"type": "code_interpreter"}]}),
        "tools[0].type",
    );
    assert!(bad(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string", "format": "email"}}}]}), "tools[0].function.parameters").contains("`format: \"email\"`"));
    bad(
        json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        "tool_choice",
    );
    bad(
        json!({"tools": tools, "tool_choice": "sometimes"}),
        "tool_choice",
    );
    bad(
        json!({"tools": tools, "response_format": {"type": "json_object"}}),
        "response_format",
    );
    bad(json!({"functions": [{"name": "f"}]}), "functions");
    bad(
        json!({"tools": tools, "parallel_tool_calls": "yes"}),
        "parallel_tool_calls",
    );
    bad(
        json!({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}),
        "messages[0].role",
    );
}

/// OpenAI's penalties, checked step by step: log probabilities are the model's own (before
/// penalties), so each greedy choice must be the best of the top 20 after subtracting
/// `presence` once and `frequency` per earlier occurrence of the token in the output.
#[test]
fn penalties_and_logit_bias_shape_the_choice_as_openai_defines_them() {
    let server = Server::start(&smollm2(), &[]);
    let prompt = "List the days of the week, then list them again:";
    for (presence, frequency) in [(0.0, 0.0), (1.5, 0.0), (0.0, 0.6), (0.5, 0.4)] {
        let (status, body) = post(
            &server,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 40, "temperature": 0, "logprobs": 5, "presence_penalty": presence, "frequency_penalty": frequency}),
        );
        assert_eq!(status, 200, "{body}");
        // The chat shape has the bytes; ask again for them (the same greedy text).
        let (_, metrics) = cog_text(
            &server,
            json!({"prompt": prompt, "use_chat_template": false, "max_new_tokens": 40, "temperature": 0, "top_k": 0, "top_p": 1.0, "logprobs": true, "top_logprobs": 20, "presence_penalty": presence, "frequency_penalty": frequency}),
        );
        let entries = metrics["logprobs"].as_array().unwrap();
        let text: String = entries
            .iter()
            .map(|e| e["token"].as_str().unwrap())
            .collect();
        assert_eq!(text, body["choices"][0]["text"].as_str().unwrap());
        let mut seen: std::collections::HashMap<Value, f64> = Default::default();
        for (i, entry) in entries.iter().enumerate() {
            let score = |t: &Value| {
                let count = seen.get(&t["bytes"]).copied().unwrap_or(0.0);
                t["logprob"].as_f64().unwrap()
                    - if count > 0.0 { presence } else { 0.0 }
                    - frequency * count
            };
            let top = entry["top_logprobs"].as_array().unwrap();
            let best = top.iter().map(score).fold(f64::MIN, f64::max);
            let chosen = top
                .iter()
                .find(|t| t["bytes"] == entry["bytes"])
                .unwrap_or_else(|| panic!("step {i}: the choice is not in the top 20: {entry}"));
            assert!(
                (score(chosen) - best).abs() < 1e-3,
                "presence {presence}, frequency {frequency}, step {i}: {entry}"
            );
            *seen.entry(entry["bytes"].clone()).or_default() += 1.0;
        }
        if presence + frequency > 0.0 {
            // Penalties at work: some step chose other than the model's own first choice.
            assert!(
                entries
                    .iter()
                    .any(|e| e["top_logprobs"][0]["bytes"] != e["bytes"]),
                "{text}"
            );
        }
    }

    // logit_bias: -100 bans the greedy first token (" Paris", 7042), +100 forces " the"
    // (260), as the Cog input does.
    let france = "The capital of France is";
    let first = |bias: Value| {
        let (status, body) = post(
            &server,
            "/v1/completions",
            &json!({"prompt": france, "max_tokens": 1, "temperature": 0, "logit_bias": bias}),
        );
        assert_eq!(status, 200, "{body}");
        body["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(first(json!({})), " Paris");
    assert_ne!(first(json!({"7042": -100})), " Paris");
    assert_eq!(first(json!({"260": 100})), " the");
    let (cog, _) = cog_text(
        &server,
        json!({"prompt": france, "use_chat_template": false, "max_new_tokens": 1, "temperature": 0, "logit_bias": "{\"260\": 100}"}),
    );
    assert_eq!(cog, " the");
    let (_, p) = post(
        &server,
        "/predictions",
        &json!({"input": {"prompt": "Hi", "logit_bias": "{\"999999\": 1}"}}),
    );
    assert!(
        p["error"].as_str().unwrap().contains("not a token id"),
        "{p}"
    );
}

#[test]
fn requests_it_cannot_honour_get_openai_errors_naming_the_parameter() {
    let server = Server::start(&smollm2(), &[]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post(&server, "/v1/chat/completions", &body)
    };
    let (s, b) = chat(json!({"n": 9}));
    error_of(s, &b, 400, Some("n"));
    let (s, b) = chat(json!({"presence_penalty": 2.5}));
    error_of(s, &b, 400, Some("presence_penalty"));
    for bias in [
        json!({"99999999": 1}),
        json!({"12": 101}),
        json!({"x": 1}),
        json!([1]),
    ] {
        let (s, b) = chat(json!({ "logit_bias": bias }));
        error_of(s, &b, 400, Some("logit_bias"));
    }
    // Zero penalties are what many clients send by default: accepted.
    let (s, b) = chat(json!({"presence_penalty": 0, "frequency_penalty": 0.0}));
    assert_eq!(s, 200, "{b}");
    // Structured output runner cannot enforce, or asked for wrongly.
    let (s, b) = chat(
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "not": {"const": 3}}}}}),
    );
    let message = error_of(s, &b, 400, Some("response_format"));
    assert!(message.contains("`not` is not supported"), "{message}");
    let (s, b) = chat(
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(a)\\1"}}}}),
    );
    let message = error_of(s, &b, 400, Some("response_format"));
    assert!(message.contains("backreference"), "{message}");
    for format in [
        json!({"type": "json_schema"}),
        json!({"type": "xml"}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": "string"}}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}),
    ] {
        let (s, b) = chat(json!({ "response_format": format }));
        error_of(s, &b, 400, Some("response_format"));
    }
    let (s, b) = chat(json!({"max_tokens": 0}));
    error_of(s, &b, 400, Some("max_tokens"));
    let (s, b) = chat(json!({"max_tokens": 100000}));
    assert!(error_of(s, &b, 400, Some("max_tokens")).contains("4096"));
    let (s, b) = chat(json!({"temperature": 9}));
    assert!(error_of(s, &b, 400, Some("temperature")).contains("temperature"));
    let (s, b) = chat(json!({"stop": ["a", "b", "c", "d", "e"]}));
    error_of(s, &b, 400, Some("stop"));
    let (s, b) = chat(json!({"messages": []}));
    error_of(s, &b, 400, Some("messages"));
    let (s, b) = chat(json!({"messages": [{"role": "tool", "content": "x"}]}));
    error_of(s, &b, 400, Some("messages[0].role"));
    let (s, b) = chat(
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
    );
    error_of(s, &b, 400, Some("messages[0].content"));
    let (s, b) = chat(json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}));
    assert!(error_of(s, &b, 400, Some("messages[0].content")).contains("needs its `text`"));
    let (s, b) = post(&server, "/v1/completions", &json!({"prompt": [1, 2, 3]}));
    error_of(s, &b, 400, Some("prompt"));
    let (s, b) = post(&server, "/v1/completions", &json!({}));
    error_of(s, &b, 400, Some("prompt"));

    // Longer than the context: said before anything runs, as OpenAI says it.
    let long = "word ".repeat(9000);
    let (s, b) = post(&server, "/v1/completions", &json!({"prompt": long}));
    let message = error_of(s, &b, 400, Some("prompt"));
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    assert!(message.contains("8192"), "{message}");

    // Not JSON, or not an object.
    let (s, text) = http(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        Some("{bad"),
        &[],
    );
    let b: Value = serde_json::from_str(&text).unwrap();
    error_of(s, &b, 400, None);
    let (s, b) = post(&server, "/v1/chat/completions", &json!([1]));
    error_of(s, &b, 400, None);

    // One model by name; other names and other /v1 paths get OpenAI's 404.
    let (s, t) = http(
        &server.addr,
        "GET",
        "/v1/models/smollm2-135m-instruct",
        None,
        &[],
    );
    assert_eq!(s, 200, "{t}");
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["id"],
        "smollm2-135m-instruct"
    );
    let (s, t) = http(&server.addr, "GET", "/v1/models/gpt-4o", None, &[]);
    let b: Value = serde_json::from_str(&t).unwrap();
    error_of(s, &b, 404, Some("model"));
    let (s, t) = http(&server.addr, "POST", "/v1/assistants", Some("{}"), &[]);
    let b: Value = serde_json::from_str(&t).unwrap();
    assert!(error_of(s, &b, 404, None).contains("/v1/responses"));
    // The Responses API: a request without `input` names it.
    let (s, t) = http(&server.addr, "POST", "/v1/responses", Some("{}"), &[]);
    let b: Value = serde_json::from_str(&t).unwrap();
    error_of(s, &b, 400, Some("input"));

    // A route for another kind of model.
    let (s, b) = post(&server, "/v1/embeddings", &json!({"input": "x"}));
    let message = error_of(s, &b, 404, None);
    assert!(message.contains("/v1/chat/completions"), "{message}");
}

#[test]
fn a_client_that_leaves_a_stream_cancels_the_generation() {
    // Two choices, one running and one queued behind it: both are canceled.
    let server = Server::start(&smollm2(), &[]);
    let body = json!({"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 4000, "stream": true, "temperature": 1, "seed": 3, "n": 2});
    let body = body.to_string();
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read until a few tokens have come, then go away.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(9).filter(|w| w == b"\"content\"").count() < 4 {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    wait_until_canceled(&server, 2, "the generation was not canceled");
}

/// Waits (20 s at most) until `/metrics` counts `n` canceled predictions.
fn wait_until_canceled(server: &Server, n: u32, failure: &str) {
    let want = format!("runner_predictions_total{{status=\"canceled\"}} {n}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = http(&server.addr, "GET", "/metrics", None, &[]);
        if metrics.contains(&want) {
            return;
        }
        assert!(Instant::now() < deadline, "{failure}:\n{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn embeddings_are_the_cog_predictions_vectors() {
    let server = Server::start(&support::minilm_dir(), &[]);
    let texts = ["The cat sits outside", "A man is playing guitar"];
    let (status, body) = post(
        &server,
        "/v1/embeddings",
        &json!({"model": "minilm", "input": texts, "encoding_format": "float"}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, cog) = post(
        &server,
        "/predictions",
        &json!({"input": {"text": texts, "normalize": true}}),
    );
    assert_eq!(body["object"], "list");
    for (i, item) in body["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"], cog["output"][i], "vector {i}");
    }
    assert_eq!(
        body["usage"]["prompt_tokens"],
        cog["metrics"]["input_token_count"]
    );
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() >= 10);

    // base64 (what OpenAI's SDK asks for by default): little-endian f32, the same numbers.
    let (_, packed) = post(
        &server,
        "/v1/embeddings",
        &json!({"input": texts[0], "encoding_format": "base64"}),
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(packed["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(floats.len(), 384);
    let want: Vec<f32> = cog["output"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(floats, want);

    let (s, b) = post(
        &server,
        "/v1/embeddings",
        &json!({"input": "x", "dimensions": 128}),
    );
    assert!(error_of(s, &b, 400, Some("dimensions")).contains("384"));
    let (s, b) = post(
        &server,
        "/v1/embeddings",
        &json!({"input": "x", "dimensions": 384}),
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = post(&server, "/v1/embeddings", &json!({"input": [[1, 2]]}));
    error_of(s, &b, 400, Some("input"));
    let (s, b) = post(&server, "/v1/embeddings", &json!({"input": ["a", ""]}));
    error_of(s, &b, 400, Some("input"));
    let (s, b) = post(
        &server,
        "/v1/embeddings",
        &json!({"input": "x", "encoding_format": "int8"}),
    );
    error_of(s, &b, 400, Some("encoding_format"));
    let (s, b) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert!(error_of(s, &b, 404, None).contains("/v1/embeddings"));
}

#[test]
fn the_api_key_guards_the_openai_routes_too() {
    let server = Server::start(&support::minilm_dir(), &["--api-key", "sesame"]);
    let (s, _) = http(&server.addr, "GET", "/v1/models", None, &[]);
    assert_eq!(s, 401);
    let (s, _) = http(
        &server.addr,
        "GET",
        "/v1/models",
        None,
        &[
            ("Authorization", "Bearer sesame"),
            ("Content-Type", "application/json"),
        ],
    );
    assert_eq!(s, 200);
}

/// Runs a Python script of the OpenAI venv with these arguments: the JSON it prints.
fn python_json(venv: &std::path::Path, script: &str, args: &[&str]) -> Value {
    let output = std::process::Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// OpenAI's own client against both kinds of model, through its parsers.
#[test]
fn openais_python_client_works_against_runner() {
    let Some(venv) = std::env::var_os("RUNNER_OPENAI_VENV").map(PathBuf::from) else {
        eprintln!("SKIPPED: RUNNER_OPENAI_VENV is not set (scripts/test.sh sets it up with scripts/setup-openai.sh)");
        return;
    };
    let llm = Server::start(&smollm2(), &["--api-key", "sesame"]);
    let embedder = Server::start(&support::minilm_dir(), &[]);
    const SCRIPT: &str = r#"
import json, sys, openai
llm = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="sesame", max_retries=0)
emb = openai.OpenAI(base_url=f"http://{sys.argv[2]}/v1", api_key="unused", max_retries=0)
out = {}
out["models"] = [m.id for m in llm.models.list()]
q = [{"role": "user", "content": "What is the capital of France?"}]
c = llm.chat.completions.create(model=out["models"][0], messages=q, temperature=0, max_tokens=20)
out["chat"] = c.choices[0].message.content
out["chat_finish"] = c.choices[0].finish_reason
out["chat_usage"] = c.usage.completion_tokens
pieces, usage = [], None
for chunk in llm.chat.completions.create(model="m", messages=q, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage.total_tokens
out["stream"] = "".join(pieces)
out["stream_usage"] = usage
t = llm.completions.create(model="m", prompt="The sky is", temperature=0)
out["completion"] = t.choices[0].text
several = llm.chat.completions.create(model="m", messages=q, n=3, temperature=1, seed=7, max_tokens=8)
out["choices"] = [[c.index, c.message.content] for c in several.choices]
try:
    llm.chat.completions.create(model="m", messages=q, n=9)
except openai.BadRequestError as e:
    out["bad_request"] = e.body["param"] if isinstance(e.body, dict) else str(e.body)
try:
    openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError:
    out["unauthorized"] = True
# Structured output the SDK's way: a Pydantic model in, a parsed instance out.
import datetime
from typing import Literal, Optional
from pydantic import BaseModel, Field
class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0)
    rating: float = Field(ge=0, le=5)
    postcode: str = Field(pattern=r"^\d{5}$")
    landmarks: list[str] = Field(max_length=3)
    size: Literal["small", "medium", "large"]
    mayor: Optional[str]
    founded: datetime.date
p = llm.chat.completions.parse(model="m", messages=[{"role": "user", "content": "Describe Paris."}], response_format=City, temperature=0, max_tokens=400)
out["parsed"] = p.choices[0].message.parsed.model_dump(mode="json")
out["founded_type"] = type(p.choices[0].message.parsed.founded).__name__
out["parsed_content"] = p.choices[0].message.content
# `dict[Literal[…], int]`: the keys come from the Literal (`propertyNames`).
class Census(BaseModel):
    counts: dict[Literal["north", "south"], int] = Field(min_length=1)
c = llm.chat.completions.parse(model="m", messages=[{"role": "user", "content": "How many people live in the north and the south of Paris?"}], response_format=Census, temperature=0, max_tokens=100)
out["census"] = c.choices[0].message.parsed.model_dump(mode="json")
# Tools the SDK's way: a Pydantic model as a strict function tool, its arguments parsed.
class GetWeather(BaseModel):
    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]
w = llm.chat.completions.parse(model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required", temperature=0, max_tokens=200)
call = w.choices[0].message.tool_calls[0]
out["tool_call"] = [call.function.name, call.function.parsed_arguments.model_dump(), w.choices[0].finish_reason]
lp = llm.chat.completions.create(model="m", messages=q, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2)
out["logprobs"] = [[t.token, t.logprob, [a.token for a in t.top_logprobs]] for t in lp.choices[0].logprobs.content]
out["logprobs_text"] = lp.choices[0].message.content
e = emb.embeddings.create(model="minilm", input=["The cat sits outside", "A man is playing guitar"])
out["embeddings"] = [d.embedding for d in e.data]
out["embedding_tokens"] = e.usage.prompt_tokens
print(json.dumps(out))
"#;
    let out = python_json(&venv, SCRIPT, &[&llm.addr, &embedder.addr]);
    assert_eq!(out["models"], json!(["smollm2-135m-instruct"]));
    let (want, _) = {
        let (s, p) = {
            let body = json!({"input": {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 20}});
            let (s, t) = http(
                &llm.addr,
                "POST",
                "/predictions",
                Some(&body.to_string()),
                &[
                    ("Authorization", "Bearer sesame"),
                    ("Content-Type", "application/json"),
                ],
            );
            (s, serde_json::from_str::<Value>(&t).unwrap())
        };
        assert_eq!(s, 200);
        let text: String = p["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        (text, p)
    };
    assert_eq!(out["chat"], want.as_str());
    assert_eq!(out["stream"], want.as_str());
    assert_eq!(out["chat_finish"], "length");
    assert_eq!(out["chat_usage"], 20);
    assert!(out["stream_usage"].as_u64().unwrap() > 20);
    assert!(out["completion"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(out["bad_request"], "n");
    assert_eq!(out["choices"].as_array().unwrap().len(), 3);
    for (i, choice) in out["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(choice[0], i, "{}", out["choices"]);
    }
    assert_eq!(out["unauthorized"], true);
    // The SDK parsed the JSON into its Pydantic model: the same values as the text.
    let mut parsed_text: Value =
        serde_json::from_str(out["parsed_content"].as_str().unwrap()).unwrap();
    // Pydantic reads a whole-number `rating` (`2`) as the float it declares (`2.0`).
    parsed_text["rating"] = json!(parsed_text["rating"].as_f64());
    assert_eq!(out["parsed"], parsed_text);
    assert!(out["parsed"]["landmarks"].as_array().unwrap().len() <= 3);
    // Bounds and a pattern held (Pydantic checked them too, or parse() would have raised).
    let rating = out["parsed"]["rating"].as_f64().unwrap();
    assert!((0.0..=5.0).contains(&rating), "{}", out["parsed"]);
    let postcode = out["parsed"]["postcode"].as_str().unwrap();
    assert!(
        postcode.len() == 5 && postcode.bytes().all(|b| b.is_ascii_digit()),
        "{postcode}"
    );
    // `format: date` held: Pydantic parsed a real date.
    assert_eq!(out["founded_type"], "date", "{}", out["parsed"]);
    let counts = out["census"]["counts"].as_object().unwrap();
    assert!(!counts.is_empty(), "{out}");
    assert!(counts.keys().all(|k| k == "north" || k == "south"), "{out}");
    // The SDK parsed the tool call's arguments into its Pydantic model.
    assert_eq!(out["tool_call"][0], "GetWeather");
    assert!(
        out["tool_call"][1]["city"].is_string(),
        "{}",
        out["tool_call"]
    );
    assert_eq!(out["tool_call"][2], "tool_calls");
    // Its logprobs types read ours: a token, its logprob and two alternatives each.
    let tokens: String = out["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t[2].as_array().unwrap().len(), 2, "{t}");
            assert_eq!(t[2][0], t[0], "greedy: the top alternative is the token");
            t[0].as_str().unwrap()
        })
        .collect();
    assert_eq!(tokens, out["logprobs_text"].as_str().unwrap());
    // The SDK asked for base64 and decoded it: the same floats as the Cog prediction.
    let (_, cog) = post(
        &embedder,
        "/predictions",
        &json!({"input": {"text": ["The cat sits outside", "A man is playing guitar"], "normalize": true}}),
    );
    for i in 0..2 {
        let theirs: Vec<f32> = out["embeddings"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ours: Vec<f32> = cog["output"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(theirs, ours, "vector {i}");
    }
    assert_eq!(out["embedding_tokens"], cog["metrics"]["input_token_count"]);
}

/// Values of every JSON type, and the shapes a list of messages might be confused with.
fn hostile_values() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(-1),
        json!(1e308),
        json!("x"),
        json!([]),
        json!({}),
        json!([null]),
        json!([{}]),
        json!([{"role": 1, "content": {}}]),
    ]
}

/// Every field of every route given every wrong type: a 4xx in OpenAI's shape or an
/// answer, never a server error or a dropped connection.
#[test]
fn hostile_bodies_never_get_a_server_error() {
    let llm = Server::start(&smollm2(), &[]);
    let embedder = Server::start(&support::minilm_dir(), &[]);
    let routes: [(&Server, &str, Value, &[&str]); 3] = [
        (
            &llm,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
            &[
                "messages",
                "max_tokens",
                "max_completion_tokens",
                "temperature",
                "top_p",
                "stop",
                "seed",
                "stream",
                "stream_options",
                "n",
                "logprobs",
                "top_logprobs",
                "tools",
                "response_format",
                "logit_bias",
                "presence_penalty",
            ],
        ),
        (
            &llm,
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 1}),
            &[
                "prompt",
                "max_tokens",
                "temperature",
                "stop",
                "seed",
                "echo",
                "suffix",
                "best_of",
                "logprobs",
            ],
        ),
        (
            &embedder,
            "/v1/embeddings",
            json!({"input": "Hi"}),
            &["input", "encoding_format", "dimensions", "model"],
        ),
    ];
    let tried: usize = routes
        .iter()
        .map(|(server, path, base, fields)| no_server_errors(server, path, base, fields))
        .sum();
    assert!(tried > 200);
}

/// Posts `base` with each of `fields` set to each hostile value: every answer is a 200, or
/// a 4xx in OpenAI's error shape. Returns how many requests it sent.
fn no_server_errors(server: &Server, path: &str, base: &Value, fields: &[&str]) -> usize {
    let mut tried = 0;
    for field in fields {
        for value in hostile_values() {
            // An unset limit means "until the end of the turn": slow, and not hostile.
            if field.starts_with("max_") && value.is_null() {
                continue;
            }
            let mut body = base.clone();
            body[*field] = value.clone();
            let (status, text) = http(&server.addr, "POST", path, Some(&body.to_string()), &[]);
            tried += 1;
            assert!(
                status == 200 || (400..500).contains(&status),
                "{path} {field}={value}: {status} {text}"
            );
            if status != 200 {
                let b: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{path} {field}={value}: not JSON: {text}"));
                assert!(
                    b["error"]["message"].is_string(),
                    "{path} {field}={value}: {text}"
                );
            }
        }
    }
    tried
}

/// The coglet venv's Python (RUNNER_COGLET_VENV), or `None` after saying the test skips.
fn coglet_python() -> Option<String> {
    match std::env::var("RUNNER_COGLET_VENV") {
        Ok(venv) => Some(format!("{venv}/bin/python")),
        Err(_) => {
            eprintln!("SKIPPED: RUNNER_COGLET_VENV is not set (scripts/test.sh sets it up)");
            None
        }
    }
}

/// A Python Cog language model (Replicate's inputs: `prompt`, `system_prompt`,
/// `max_new_tokens`, `temperature`, `top_p`, `seed`, comma-separated `stop_sequences`; a
/// ConcatenateIterator[str] out) gets the same routes, its inputs found by name.
#[test]
fn a_python_language_model_answers_chat_and_completions() {
    let Some(python) = coglet_python() else {
        return;
    };
    let dir = repo_root().join("tests/data/python-predictors/llm");
    let server = Server::start(&dir, &["--python", &python]);
    let (_, models) = http(&server.addr, "GET", "/v1/models", None, &[]);
    assert!(models.contains("\"id\":\"llm\""), "{models}");

    let chat = |body: Value| post(&server, "/v1/chat/completions", &body);
    let content = |b: &Value| {
        b["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The system message goes to `system_prompt`, the user's to `prompt`; what the request
    // leaves out keeps the predictor's own defaults (top_p 0.9).
    let (s, b) = chat(
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}], "temperature": 0.2, "seed": 5}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        content(&b),
        "[Be brief.] you said: hello there t=0.2 p=0.9 seed=5"
    );
    assert_eq!(b["choices"][0]["finish_reason"], "stop");
    assert_eq!(b["usage"]["prompt_tokens"], 2);
    assert_eq!(b["usage"]["completion_tokens"], 8);
    let (_, b) = chat(json!({"messages": [{"role": "user", "content": "hello there"}]}));
    assert_eq!(
        content(&b),
        "[You are helpful.] you said: hello there t=0.6 p=0.9 seed=None"
    );
    // max_tokens → max_new_tokens, and reaching it is `length`.
    let (_, b) =
        chat(json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}));
    assert_eq!(content(&b), "[You are helpful.] you said:");
    assert_eq!(b["choices"][0]["finish_reason"], "length");
    // stop → stop_sequences, comma-separated.
    let (_, b) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "a b c d", "stop": ["c", "zz"]}),
    );
    assert_eq!(b["choices"][0]["text"], "[You are helpful.] you said: a b");
    // Streamed as the predictor yields.
    let body = json!({"messages": [{"role": "user", "content": "hello there"}], "stream": true, "stream_options": {"include_usage": true}});
    let (chunks, text) = streamed_chat(&server, &body);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed,
        "[You are helpful.] you said: hello there t=0.6 p=0.9 seed=None"
    );
    assert!(chunks.len() >= 10, "one chunk per yielded piece: {text}");
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 10);

    // The Responses API: `instructions` to `system_prompt`, `input` to `prompt`.
    let respond = |body: Value| post(&server, "/v1/responses", &body);
    let (s, b) = respond(
        json!({"instructions": "Be brief.", "input": "hello there", "temperature": 0.2, "seed": 5}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["object"], "response");
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["output"][0]["content"][0]["text"],
        "[Be brief.] you said: hello there t=0.2 p=0.9 seed=5"
    );
    assert_eq!(
        (&b["usage"]["input_tokens"], &b["usage"]["output_tokens"]),
        (&json!(2), &json!(8))
    );
    let (_, b) = respond(json!({"input": "hello there", "max_output_tokens": 3}));
    assert_eq!(
        b["output"][0]["content"][0]["text"],
        "[You are helpful.] you said:"
    );
    assert_eq!(b["status"], "incomplete");
    assert_eq!(b["incomplete_details"]["reason"], "max_output_tokens");
    let (s, text) = http(
        &server.addr,
        "POST",
        "/v1/responses",
        Some(&json!({"input": "hello there", "stream": true}).to_string()),
        &[],
    );
    assert_eq!(s, 200, "{text}");
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert!(deltas.len() >= 8, "one delta per yielded piece: {text}");
    assert_eq!(
        deltas.concat(),
        "[You are helpful.] you said: hello there t=0.6 p=0.9 seed=None"
    );
    let sequence: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(sequence, (0..events.len() as u64).collect::<Vec<_>>());
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let (s, b) = respond(json!({"input": "a", "max_output_tokens": 1000}));
    assert!(error_of(s, &b, 400, Some("max_output_tokens")).contains("512"));
    let (s, b) = respond(json!({"input": "a", "tools": [{"type": "function", "name": "f"}]}));
    error_of(s, &b, 400, Some("tools"));

    // What this model cannot take, by name.
    let (s, b) = chat(
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}),
    );
    assert!(error_of(s, &b, 400, Some("messages")).contains("one user message"));
    let (s, b) = chat(json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 1000}));
    assert!(error_of(s, &b, 400, Some("max_tokens")).contains("512"));
    let (s, b) = chat(json!({"messages": [{"role": "user", "content": "a"}], "stop": ["x,y"]}));
    error_of(s, &b, 400, Some("stop"));
    let (s, b) = post(&server, "/v1/embeddings", &json!({"input": "x"}));
    error_of(s, &b, 404, None);
    let (s, b) =
        chat(json!({"messages": [{"role": "user", "content": "a"}], "tools": weather_tools()}));
    error_of(s, &b, 400, Some("tools"));
    let (s, b) =
        chat(json!({"messages": [{"role": "user", "content": "a"}], "presence_penalty": 0.5}));
    error_of(s, &b, 400, Some("presence_penalty"));
    let (s, b) = chat(json!({"messages": [{"role": "user", "content": "a"}], "logprobs": true}));
    assert!(error_of(s, &b, 400, Some("logprobs")).contains("no `logprobs` input"));
    // `response_format` goes to a `json_schema` input as text; the predictor enforces it.
    let (s, b) = chat(
        json!({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}}),
    );
    assert_eq!(s, 200, "{b}");
    assert!(content(&b).ends_with(r#"schema={"type":"object"}"#), "{b}");

    // Wrong types for every parameter it maps: a 4xx or an answer, never a server error.
    let base = json!({"messages": [{"role": "user", "content": "hi"}]});
    let fields = [
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "response_format",
    ];
    no_server_errors(&server, "/v1/chat/completions", &base, &fields);
}

/// Python Cog embedding models (a text in, `List[float]` out) get `/v1/embeddings` too: a
/// prediction per text, run side by side, in order.
#[test]
fn python_embedding_models_answer_the_embeddings_route() {
    let Some(python) = coglet_python() else {
        return;
    };
    // What the predictors compute, by hand.
    let vector = |t: &str| {
        let sum: u32 = t.chars().map(|c| c as u32).sum();
        json!([
            t.chars().count() as f64,
            t.matches(' ').count() as f64,
            (sum % 97) as f64 / 4.0
        ])
    };
    let texts = ["The cat sits outside", "A man is playing guitar", "x"];
    {
        let dir = "embedder";
        let server = Server::start(
            &repo_root().join("tests/data/python-predictors").join(dir),
            &["--python", &python, "--concurrency", "2"],
        );
        let (status, body) = post(&server, "/v1/embeddings", &json!({"input": texts}));
        assert_eq!(status, 200, "{dir}: {body}");
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 3, "{dir}: {body}");
        for (i, text) in texts.iter().enumerate() {
            assert_eq!(data[i]["index"], i);
            assert_eq!(data[i]["embedding"], vector(text), "{dir}: {text}");
        }
        // The predictions' own token counts, summed.
        assert_eq!(body["usage"]["prompt_tokens"], 4 + 5 + 1, "{dir}");
        // One string, and base64.
        let (_, one) = post(
            &server,
            "/v1/embeddings",
            &json!({"input": "x", "encoding_format": "base64"}),
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(one["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let floats: Vec<f64> = bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect();
        assert_eq!(json!(floats), vector("x"), "{dir}");
        // Not a text generator.
        let (s, b) = post(
            &server,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        );
        error_of(s, &b, 404, None);
        let (_, models) = http(&server.addr, "GET", "/v1/models", None, &[]);
        assert!(models.contains(dir), "{models}");
    }
}

/// `/v1/models` answers once the model is loaded (clients and probes wait on it), and says
/// so when it never will be.
#[test]
fn the_model_list_waits_for_the_model() {
    let model = support::generated_tiny_mlp(32, 1, "f32");
    support::cut_short(&model.path().join("weights/model.safetensors"), 8);
    let server = Server::start(model.path(), &[]);
    let (s, t) = http(&server.addr, "GET", "/v1/models", None, &[]);
    let b: Value = serde_json::from_str(&t).unwrap();
    assert!(error_of(s, &b, 503, None).contains("failed to load"), "{t}");
}

/// SIGTERM while a completion streams: the stream finishes (finish reason, `[DONE]`), then
/// the server stops.
#[test]
fn a_stream_in_flight_finishes_before_the_server_stops() {
    let mut server = Server::start(&smollm2(), &[]);
    let body = json!({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 200, "temperature": 0, "stream": true});
    let addr = server.addr.clone();
    let streaming = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/v1/chat/completions",
            Some(&body.to_string()),
            &[],
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    server.sigterm();
    let (status, text) = streaming.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains("\"finish_reason\":\"length\"") && text.trim_end().ends_with("data: [DONE]"),
        "the stream was cut: {}",
        &text[text.len().saturating_sub(400)..]
    );
    assert!(
        server.exits_within(Duration::from_secs(20)),
        "the server did not stop"
    );
}

/// `n` choices past what `--max-queue` admits: a 429, and none of them left running.
#[test]
fn choices_past_the_queue_are_refused_and_the_rest_canceled() {
    // One slot and one place in the queue: the third choice cannot wait, so the request is a
    // 429, and the two choices already running or queued are canceled with it.
    let server = Server::start(&smollm2(), &["--max-queue", "1"]);
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000, "n": 3}),
    );
    let message = error_of(status, &body, 429, None);
    assert!(!message.is_empty());
    wait_until_canceled(&server, 2, "the choices were not canceled");
}

/// A busy server makes OpenAI clients wait their turn (they do not expect Cog's 409); Cog's
/// own route still answers 409 at once, as Cog does.
#[test]
fn openai_requests_wait_for_a_busy_model() {
    let server = Server::start(&smollm2(), &[]);
    let body = json!({"messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": 60, "temperature": 0}).to_string();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (addr, body) = (server.addr.clone(), body.clone());
            std::thread::spawn(move || {
                http(&addr, "POST", "/v1/chat/completions", Some(&body), &[])
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, busy) = server.post_json(
        "/predictions",
        &json!({"input": {"prompt": "hi"}}).to_string(),
    );
    assert_eq!(status, 409, "{busy}");
    let answers: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (status, text) in &answers {
        assert_eq!(*status, 200, "{text}");
    }
    let content = |t: &str| {
        serde_json::from_str::<Value>(t).unwrap()["choices"][0]["message"]["content"].clone()
    };
    assert!(answers
        .iter()
        .all(|(_, t)| content(t) == content(&answers[0].1)));
}

/// OpenAI's Responses API through OpenAI's own client: text (whole and streamed, the
/// same as the chat completion it means), structured output into a Pydantic model,
/// function calls and their outputs carried back, and what runner refuses.
#[test]
fn the_responses_api_answers_openais_client() {
    let Some(venv) = std::env::var_os("RUNNER_OPENAI_VENV").map(PathBuf::from) else {
        eprintln!("SKIPPED: RUNNER_OPENAI_VENV is not set (scripts/test.sh sets it up with scripts/setup-openai.sh)");
        return;
    };
    let server = Server::start(&smollm2(), &[]);
    const SCRIPT: &str = r#"
import json, sys, openai
from pydantic import BaseModel, ConfigDict, Field
llm = openai.OpenAI(base_url=f"http://{sys.argv[1]}/v1", api_key="unused", max_retries=0)
out = {}
q = "What is the capital of France?"
chat = llm.chat.completions.create(model="m", messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}], temperature=0, max_tokens=100)
out["chat"] = chat.choices[0].message.content
r = llm.responses.create(model="m", instructions="Answer briefly.", input=q, temperature=0, max_output_tokens=100)
out["text"] = r.output_text
out["status"] = r.status
out["incomplete"] = r.incomplete_details.reason if r.incomplete_details else None
out["usage"] = [r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens]
out["item"] = [r.output[0].type, r.output[0].role, r.output[0].content[0].type]
types, deltas = [], []
with llm.responses.stream(model="m", instructions="Answer briefly.", input=q, temperature=0, max_output_tokens=100) as stream:
    for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    final = stream.get_final_response()
out["stream_types"] = types
out["stream_deltas"] = "".join(deltas)
out["stream_text"] = final.output_text
out["stream_status"] = final.status
short = llm.responses.create(model="m", input=q, temperature=0, max_output_tokens=3)
out["short"] = [short.status, short.incomplete_details.reason if short.incomplete_details else None, short.usage.output_tokens]
out["short_stream"] = [e.type for e in llm.responses.create(model="m", input=q, temperature=0, max_output_tokens=3, stream=True)][-1]
inc = ["message.output_text.logprobs"]
lp = llm.responses.create(model="m", input=q, temperature=0, max_output_tokens=5, include=inc, top_logprobs=2)
out["lp"] = [[t.token, t.logprob, [a.token for a in t.top_logprobs]] for t in lp.output[0].content[0].logprobs]
clp = llm.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=5, logprobs=True, top_logprobs=2)
out["chat_lp"] = [[t.token, t.logprob, [a.token for a in t.top_logprobs]] for t in clp.choices[0].logprobs.content]
out["stream_lp"] = [[t.token, t.logprob] for e in llm.responses.create(model="m", input=q, temperature=0, max_output_tokens=5, include=inc, top_logprobs=2, stream=True) if e.type == "response.output_text.delta" for t in e.logprobs]
class City(BaseModel):
    name: str = Field(max_length=30)
    population: int = Field(ge=0)
    code: str = Field(pattern=r"^[A-Z]{3}$")
    landmarks: set[str] = Field(min_length=2, max_length=3)
    # A lookahead (Pydantic checks it with Python's re): four capitals and digits, a digit among them.
    model_config = ConfigDict(regex_engine="python-re")
    ref: str = Field(pattern=r"^(?=.*\d)[A-Z0-9]{4}$")
    scores: dict[str, int] = Field(min_length=1, max_length=2)
    altitude: int = Field(ge=0, le=5000, multiple_of=10)
    years: set[int] = Field(min_length=2, max_length=3)
p = llm.responses.parse(model="m", input=[{"role": "user", "content": "Describe Paris."}], text_format=City, temperature=0, max_output_tokens=200)
out["parsed"] = p.output_parsed.model_dump(mode="json")
out["landmarks_text"] = json.loads(p.output_text)["landmarks"]
out["years_text"] = json.loads(p.output_text)["years"]
out["ref"] = p.output_parsed.ref
weather = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"], "additionalProperties": False}}
t = llm.responses.create(model="m", input="What is the weather in Paris?", tools=[weather], tool_choice="required", temperature=0)
call = next(o for o in t.output if o.type == "function_call")
out["call"] = [call.name, json.loads(call.arguments), call.call_id.startswith("call_"), call.id.startswith("fc_")]
with llm.responses.stream(model="m", input="What is the weather in Paris?", tools=[weather], tool_choice="required", temperature=0) as stream:
    streamed_types = [e.type for e in stream]
    streamed_call = stream.get_final_response().output[0]
out["streamed_call"] = [streamed_call.type, streamed_call.name, streamed_call.arguments == call.arguments, streamed_call.call_id.startswith("call_")]
out["streamed_call_types"] = streamed_types
follow = llm.responses.create(model="m", input=[
    {"role": "user", "content": "What is the weather in Paris?"},
    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"},
], tools=[weather], temperature=0, max_output_tokens=30)
out["follow"] = [o.type for o in follow.output]
# Kept responses: a conversation continued by `previous_response_id` is the chat it means.
first = llm.responses.create(model="m", input="My name is Ada. Say hello to me.", temperature=0, max_output_tokens=30)
second = llm.responses.create(model="m", previous_response_id=first.id, input="What is my name?", temperature=0, max_output_tokens=30)
same = llm.chat.completions.create(model="m", messages=[{"role": "user", "content": "My name is Ada. Say hello to me."}, {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}], temperature=0, max_tokens=30)
out["continued"] = [second.output_text, same.choices[0].message.content, second.previous_response_id == first.id]
with llm.responses.stream(model="m", previous_response_id=second.id, input="Thanks!", temperature=0, max_output_tokens=100) as stream:
    third = stream.get_final_response()
out["third"] = llm.responses.retrieve(third.id).output_text == third.output_text and third.output_text != ""
out["retrieved"] = llm.responses.retrieve(first.id).output_text == first.output_text
items = llm.responses.input_items.list(follow.id)
out["input_items"] = [[i.type, i.id.split("_")[0]] for i in items.data]
page = llm.responses.input_items.list(follow.id, order="asc", limit=2)
rest = llm.responses.input_items.list(follow.id, order="asc", limit=2, after=page.data[-1].id)
out["input_pages"] = [[i.type for i in page.data], page.has_more, [i.type for i in rest.data], rest.has_more]
out["input_text"] = page.data[0].content[0].text
llm.responses.delete(first.id)
unkept = llm.responses.create(model="m", input="Hi", max_output_tokens=2, store=False)
for name, call in [("deleted", lambda: llm.responses.retrieve(first.id)), ("unkept", lambda: llm.responses.retrieve(unkept.id)), ("unknown", lambda: llm.responses.create(model="m", input="Hi", previous_response_id="resp_nope"))]:
    try:
        call()
        out[name] = "found"
    except openai.NotFoundError as e:
        out[name] = e.body.get("param") if isinstance(e.body, dict) else "404"
for name, kwargs in [("include", {"include": ["reasoning.encrypted_content"]}), ("top", {"top_logprobs": 2}), ("tokens", {"max_output_tokens": 0}), ("image", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}), ("schema", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer", "not": {"const": 2}}}}})]:
    try:
        llm.responses.create(model="m", **{"input": "Hi", **kwargs})
        out[name] = "accepted"
    except openai.BadRequestError as e:
        out[name] = e.body.get("param") if isinstance(e.body, dict) else str(e.body)
print(json.dumps(out))
"#;
    let out = python_json(&venv, SCRIPT, &[&server.addr]);
    // The response is the chat completion it means: the same greedy text, whole and streamed.
    assert!(!out["chat"].as_str().unwrap().is_empty(), "{out}");
    assert_eq!(out["text"], out["chat"], "{out}");
    assert_eq!(out["stream_deltas"], out["chat"], "{out}");
    assert_eq!(out["stream_text"], out["chat"], "{out}");
    assert_eq!(out["item"], json!(["message", "assistant", "output_text"]));
    let usage = out["usage"].as_array().unwrap();
    assert!(usage[0].as_u64().unwrap() > 5 && usage[1].as_u64().unwrap() < 100);
    assert_eq!(
        usage[2].as_u64(),
        Some(usage[0].as_u64().unwrap() + usage[1].as_u64().unwrap())
    );
    assert_eq!(out["status"], "completed");
    assert_eq!(out["stream_status"], "completed");
    // Cut short at max_output_tokens: incomplete, saying why, whole and streamed.
    assert_eq!(out["short"], json!(["incomplete", "max_output_tokens", 3]));
    assert_eq!(out["short_stream"], "response.incomplete");
    let types: Vec<&str> = out["stream_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        &types[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert!(types.contains(&"response.output_text.delta"));
    assert_eq!(
        &types[types.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    // Structured output through `text.format`: Pydantic parsed (and validated) it.
    let code = out["parsed"]["code"].as_str().unwrap();
    assert!(
        code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()),
        "{out}"
    );
    assert!(out["parsed"]["population"].as_i64().unwrap() >= 0);
    // `set[str]` is `uniqueItems`: no landmark twice, so the set keeps every one.
    let written = out["landmarks_text"].as_array().unwrap();
    let kept = out["parsed"]["landmarks"].as_array().unwrap();
    assert!((2..=3).contains(&written.len()), "{out}");
    assert_eq!(written.len(), kept.len(), "{out}");
    // `dict[str, int]` with `min_length`/`max_length`: minProperties/maxProperties.
    let scores = out["parsed"]["scores"].as_object().unwrap();
    assert!((1..=2).contains(&scores.len()), "{out}");
    // `set[int]` is `uniqueItems` of integers: none twice, so the set keeps every one.
    let written = out["years_text"].as_array().unwrap();
    assert!((2..=3).contains(&written.len()), "{out}");
    assert_eq!(
        written.len(),
        out["parsed"]["years"].as_array().unwrap().len(),
        "{out}"
    );
    // `multiple_of` (`multipleOf`) within bounds.
    let altitude = out["parsed"]["altitude"].as_i64().unwrap();
    assert!(
        (0..=5000).contains(&altitude) && altitude % 10 == 0,
        "{out}"
    );
    // A pattern with a lookahead held (and Pydantic checked it again).
    let reference = out["ref"].as_str().unwrap();
    assert!(
        reference.len() == 4 && reference.bytes().any(|b| b.is_ascii_digit()),
        "{out}"
    );
    // A function call, and a conversation that carries it and its output goes on.
    assert_eq!(out["call"][0], "get_weather");
    assert!(out["call"][1]["city"].is_string(), "{out}");
    assert_eq!(out["call"][2], true);
    assert_eq!(out["call"][3], true);
    assert!(!out["follow"].as_array().unwrap().is_empty());
    // Streamed, the same call, its arguments in one delta once the JSON is whole.
    assert_eq!(
        out["streamed_call"],
        json!(["function_call", "get_weather", true, true])
    );
    let types: Vec<&str> = out["streamed_call_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    // Refused by name, in the Responses API's own terms.
    // Kept responses continue conversations, whole and streamed, and can be fetched and
    // deleted; those sent with `store: false` are not kept.
    assert_eq!(out["continued"][0], out["continued"][1], "{out}");
    assert_eq!(out["continued"][2], true);
    assert_eq!(out["third"], true);
    assert_eq!(out["retrieved"], true);
    // A kept response's input, newest first, and a page at a time oldest first.
    assert_eq!(
        out["input_items"],
        json!([
            ["function_call_output", "fco"],
            ["function_call", "fc"],
            ["message", "msg"]
        ])
    );
    assert_eq!(
        out["input_pages"],
        json!([
            ["message", "function_call"],
            true,
            ["function_call_output"],
            false
        ])
    );
    assert_eq!(out["input_text"], "What is the weather in Paris?");
    assert_eq!(out["deleted"], Value::Null, "{out}");
    assert_eq!(out["unkept"], Value::Null, "{out}");
    assert_eq!(out["unknown"], "previous_response_id", "{out}");
    assert_eq!(out["include"], "include[0]");
    assert_eq!(out["top"], "top_logprobs");
    // Log probabilities through `include`: the chat completion's, whole and streamed.
    assert_eq!(out["lp"].as_array().unwrap().len(), 5, "{out}");
    assert_eq!(out["lp"], out["chat_lp"]);
    let pairs: Vec<Value> = out["lp"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!([t[0], t[1]]))
        .collect();
    assert_eq!(out["stream_lp"], json!(pairs));
    assert_eq!(out["tokens"], "max_output_tokens");
    assert_eq!(out["image"], "input[0].content[0].type");
    assert_eq!(out["schema"], "text.format");
}
