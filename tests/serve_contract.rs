//! runner's own additions to Cog's HTTP contract, beyond what the conformance suite
//! compares with coglet: the queue, client disconnects, file-input limits, hostile
//! redirects, and shutdown with a time limit.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fixtures::Fixtures;
use support::{repo_root, Server};

fn health(server: &Server) -> Value {
    serde_json::from_str(&server.get("/health-check").1).unwrap()
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_disconnects_cancels_its_prediction() {
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    let body = json!({"id": "gone-1", "input": {"text": "x", "sleep": 60}}).to_string();
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    write!(
        stream,
        "POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until("the prediction runs", Duration::from_secs(5), || {
        health(&server)["status"] == "BUSY"
    });
    drop(stream);
    wait_until("the slot is free again", Duration::from_secs(5), || {
        health(&server)["status"] == "READY"
    });
    assert!(server
        .drain_stderr()
        .iter()
        .any(|l| l.contains("client went away")));
}

#[test]
fn a_queue_absorbs_a_burst_and_429_when_full() {
    let server = Server::start(
        &repo_root().join("models/conformance"),
        &["--max-queue", "1"],
    );
    let running =
        server.predict_in_background(&json!({"input": {"text": "a", "sleep": 1.0}}).to_string());
    std::thread::sleep(Duration::from_millis(200));
    let queued = server.predict_in_background(&json!({"input": {"text": "b"}}).to_string());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(health(&server)["runner"]["queued"], 1);
    let (status, body) =
        server.post_json("/predictions", &json!({"input": {"text": "c"}}).to_string());
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("queue is full"), "{body}");
    for (handle, text) in [(running, "aaa"), (queued, "bbb")] {
        let (status, body) = handle.join().unwrap();
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["output"]["text"], text, "{body}");
    }
}

#[test]
fn file_inputs_are_bounded_and_never_local() {
    let fixtures = Fixtures::start();
    fixtures
        .lock()
        .files
        .insert("big.txt".into(), vec![b'x'; 4096]);
    let server = Server::start(
        &repo_root().join("models/files"),
        &["--max-input-file-bytes", "1000"],
    );
    let (status, v) =
        server.predict(json!({"source": format!("{}/files/big.txt", fixtures.url())}));
    assert_eq!(status, 200);
    assert_eq!(v["status"], "failed");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("larger than the 1000 byte limit"),
        "{v}"
    );

    let big_data_uri = format!("data:text/plain;base64,{}", "eHh4".repeat(1000));
    let (_, v) = server.predict(json!({"source": big_data_uri}));
    assert_eq!(v["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("limit"), "{v}");

    // A redirect to a file:// URL is not followed.
    let (_, v) =
        server.predict(json!({"source": format!("{}/files/redirect-to-file", fixtures.url())}));
    assert_eq!(v["status"], "failed");
    assert!(
        v["error"].as_str().unwrap().contains("cannot download"),
        "{v}"
    );

    for url in ["/etc/passwd", "file:///etc/passwd", "ftp://example.com/x"] {
        let (status, v) = server.predict(json!({"source": url}));
        assert_eq!(status, 422, "{url}: {v}");
        assert_eq!(v["detail"][0]["loc"], json!(["body", "input", "source"]));
    }
}

#[test]
fn shutdown_cancels_what_outlives_the_time_limit() {
    let server = Server::start(
        &repo_root().join("models/conformance"),
        &["--shutdown-timeout", "0.5"],
    );
    let slow =
        server.predict_in_background(&json!({"input": {"text": "a", "sleep": 60}}).to_string());
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(server.post_json("/shutdown", "").0, 200);
    let (status, body) = slow.join().unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "canceled", "{body}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn sigterm_during_a_slow_setup_exits_promptly() {
    let mut child = std::process::Command::new(support::RUNNER)
        .arg("serve")
        .arg(repo_root().join("models/conformance"))
        .args(["--port", "0", "--device", "cpu"])
        .env("CONFORMANCE_SETUP_DELAY", "60")
        .env_remove("RUNNER_PORT")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("still running 30 s after SIGTERM, with setup 60 s from done");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_count_predictions_and_rejections_for_prometheus() {
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    assert_eq!(server.predict(json!({"text": "a"})).0, 200);
    assert_eq!(server.predict(json!({"text": "a", "fail": true})).0, 200);
    assert_eq!(server.predict(json!({"count": 99})).0, 422);
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("runner_predictions_total{status=\"succeeded\"}"), 1.0);
    assert_eq!(value("runner_predictions_total{status=\"failed\"}"), 1.0);
    assert_eq!(
        value("runner_rejections_total{reason=\"invalid_input\"}"),
        1.0
    );
    assert_eq!(value("runner_prediction_duration_seconds_count"), 2.0);
    assert_eq!(
        value("runner_prediction_duration_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
    assert_eq!(value("runner_predictions_in_flight"), 0.0);
    assert_eq!(value("runner_health{state=\"READY\"}"), 1.0);
    assert_eq!(
        value("runner_http_requests_total{route=\"/predictions\",method=\"POST\",status=\"200\"}"),
        2.0
    );
    assert_eq!(
        value("runner_http_requests_total{route=\"/predictions\",method=\"POST\",status=\"422\"}"),
        1.0
    );
    assert_eq!(
        value("runner_http_request_duration_seconds_count{route=\"/predictions\"}"),
        3.0
    );
    assert!(value("runner_setup_seconds{weights_source=\"none\"}") >= 0.0);
    assert!(text.contains("runner_build_info{version="), "{text}");
    // Ids never become labels: a PUT shows as its route pattern.
    let (status, _) = server.post_json("/predictions/some-id/cancel", "");
    assert_eq!(status, 404);
    let (_, text) = server.get("/metrics");
    assert!(
        text.contains("route=\"/predictions/{id}/cancel\""),
        "{text}"
    );
    assert!(!text.contains("some-id"));
    assert!(
        text.contains("runner_model_info{model=\"conformance\",architecture=\"candle:conformance\",device=\"cpu\",weights_source=\"none\"} 1"),
        "{text}"
    );
    // Every sample belongs to a declared family.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
    }
}
