//! `runner serve` on the conformance model, over a real socket: Cog's synchronous contract.

mod support;

use serde_json::{json, Value};
use support::*;

#[test]
fn serves_cogs_synchronous_contract() {
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    assert!(
        server.status_line.contains("ready at http://127.0.0.1:"),
        "{}",
        server.status_line
    );
    assert!(
        server.status_line.contains("candle:conformance")
            && server.status_line.contains("device cpu"),
        "{}",
        server.status_line
    );

    let (status, body) = server.get("/health-check");
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "READY");
    assert_eq!(health["setup"]["status"], "succeeded");

    // Every input kind, defaults filled in, unknown keys dropped.
    let (status, p) =
        server.predict(json!({"text": "ab", "api_key": "s3cret", "tags": ["x"], "unknown": 1}));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["status"], "succeeded");
    assert_eq!(
        p["output"],
        json!({"text": "ababab", "count": 3, "ratio": 0.5, "flag": false, "color": "red", "size": 1,
               "code": "ab12", "api_key_length": 6, "note_given": false, "tags": ["x"]})
    );
    assert!(p["logs"]
        .as_str()
        .unwrap()
        .contains("conformance: text of 2 characters"));
    assert!(p["metrics"]["predict_time"].as_f64().is_some());
    assert_eq!(p["id"].as_str().unwrap().len(), 26);

    // An id given by the client is kept.
    let (_, body) = server.post_json("/predictions", r#"{"id": "my-id", "input": {"text": "x"}}"#);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["id"], "my-id");

    // Invalid inputs: 422 with one detail per problem, located.
    let (status, p) = server.predict(json!({"count": 11, "ratio": "high", "color": "pink", "size": 4, "code": "12ab", "tags": "x"}));
    assert_eq!(status, 422);
    let locs: Vec<String> = p["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["loc"][2].as_str().unwrap().to_string())
        .collect();
    for name in ["text", "count", "ratio", "color", "size", "code", "tags"] {
        assert!(locs.contains(&name.to_string()), "{name} not reported: {p}");
    }
    let (status, p) = server.predict(json!({"text": ""}));
    assert_eq!(status, 422);
    assert_eq!(p["detail"][0]["loc"], json!(["body", "input", "text"]));

    // A failing prediction is data: 200 with status failed and the error.
    let (status, p) = server.predict(json!({"text": "x", "fail": true}));
    assert_eq!(status, 200);
    assert_eq!(p["status"], "failed");
    assert!(p["error"].as_str().unwrap().contains("on purpose"));

    // Malformed bodies: plain-text 400 / 415 / 422 as Cog's server answers.
    let (status, _) = server.post_json("/predictions", "{\"input\": ");
    assert_eq!(status, 400);
    let (status, _) = http(
        &server.addr,
        "POST",
        "/predictions",
        Some("{}"),
        &[("Content-Type", "text/plain")],
    );
    assert_eq!(status, 415);
    let (status, _) = server.post_json("/predictions", r#"{"input": {"text": "x"}, "id": []}"#);
    assert_eq!(status, 422);

    // The schema served is the one `runner schema` prints.
    let (status, served) = server.get("/openapi.json");
    assert_eq!(status, 200);
    let (code, printed, _) = runner(&[
        "schema",
        repo_root().join("models/conformance").to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert_eq!(served, printed);
    let doc: Value = serde_json::from_str(&served).unwrap();
    let input = &doc["components"]["schemas"]["Input"]["properties"];
    assert_eq!(input["api_key"]["x-cog-secret"], true);
    assert_eq!(input["api_key"]["format"], "password");
    assert_eq!(input["note"]["nullable"], true);
    assert_eq!(input["legacy"]["deprecated"], true);
    assert_eq!(input["code"]["pattern"], "^[a-z]+[0-9]+$");
    assert_eq!(
        input["color"]["allOf"][0]["$ref"],
        "#/components/schemas/color"
    );
    assert_eq!(
        doc["components"]["schemas"]["size"]["enum"],
        json!([1, 2, 3])
    );
    assert_eq!(
        doc["components"]["schemas"]["Input"]["required"],
        json!(["text"])
    );
}

#[test]
fn busy_model_answers_409_and_health_says_busy() {
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    let slow = server.predict_in_background(r#"{"input": {"text": "x", "sleep": 1.0}}"#);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, body) = server.get("/health-check");
        if body.contains("\"BUSY\"") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never BUSY: {body}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, body) = server.post_json("/predictions", r#"{"input": {"text": "y"}}"#);
    assert_eq!(status, 409, "{body}");
    assert_eq!(slow.join().unwrap().0, 200);
    let (_, body) = server.get("/health-check");
    assert!(body.contains("\"READY\""), "{body}");
}

#[test]
fn concurrency_flag_adds_slots() {
    let server = Server::start(
        &repo_root().join("models/conformance"),
        &["--concurrency", "2"],
    );
    let slow = server.predict_in_background(r#"{"input": {"text": "x", "sleep": 0.5}}"#);
    std::thread::sleep(std::time::Duration::from_millis(150));
    let (status, body) = server.post_json("/predictions", r#"{"input": {"text": "y"}}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(slow.join().unwrap().0, 200);
}
