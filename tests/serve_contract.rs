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

/// `POST /predictions` with `Prefer: respond-async`.
fn post_async(server: &Server, body: &str) -> support::Response {
    let headers = [
        ("Content-Type".to_string(), "application/json".to_string()),
        ("Prefer".to_string(), "respond-async".to_string()),
    ];
    support::request(
        &server.addr,
        "POST",
        "/predictions",
        &headers,
        Some(body.as_bytes()),
    )
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

#[test]
fn playground_page_is_self_contained_and_linked_from_the_root() {
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    let (_, root) = server.get("/");
    let root: Value = serde_json::from_str(&root).unwrap();
    assert_eq!(root["playground_url"], "/playground");
    let page = support::request(&server.addr, "GET", "/playground", &[], None);
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    // Only this server: no CDN, no remote script, style or font.
    assert!(
        page.headers["content-security-policy"].contains("connect-src 'self'"),
        "{:?}",
        page.headers
    );
    for remote in ["<script src", "<link ", "@import", "cdn.", "googleapis"] {
        assert!(!page.body.contains(remote), "the page loads {remote}");
    }
    assert!(page.body.contains("/openapi.json"));
    // The model directory, as given on the command line, for the `runner run` line.
    assert!(
        page.body
            .contains(r#"<meta name="runner-model-dir" content=""#)
            && page.body.contains("models/conformance\">"),
        "{}",
        &page.body[..600]
    );
}

#[test]
fn every_response_has_a_request_id_that_its_log_lines_carry() {
    let server = Server::start(
        &repo_root().join("models/conformance"),
        &["--log-format", "json"],
    );
    // Made by the server when absent: on success, on a 404 and on a 422.
    let mut seen = std::collections::HashSet::new();
    for (method, path, body) in [
        ("GET", "/health-check", None),
        ("GET", "/nowhere", None),
        ("POST", "/predictions", Some(r#"{"input": {"count": 99}}"#)),
    ] {
        let headers = [("Content-Type".to_string(), "application/json".to_string())];
        let r = support::request(
            &server.addr,
            method,
            path,
            &headers,
            body.map(str::as_bytes),
        );
        let id = r
            .headers
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{method} {path}: {:?}", r.headers))
            .clone();
        assert!(id.len() >= 16, "{id}");
        assert!(seen.insert(id), "request ids are unique");
    }
    // A caller's plain id is kept; a hostile one (a forged log line) is replaced.
    let ask = |id: &str| {
        let headers = [
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-Request-Id".to_string(), id.to_string()),
        ];
        support::request(
            &server.addr,
            "POST",
            "/predictions",
            &headers,
            Some(br#"{"id": "pred-with-logs", "input": {"text": "ab"}}"#),
        )
    };
    let kept = ask("trace-7f3a.1");
    assert_eq!(kept.status, 200, "{}", kept.body);
    assert_eq!(kept.headers["x-request-id"], "trace-7f3a.1");
    let replaced = ask("x\" level=error msg=forged");
    assert_ne!(
        replaced.headers["x-request-id"],
        "x\" level=error msg=forged"
    );
    // The predictor's own log line names the request and the prediction.
    std::thread::sleep(Duration::from_millis(200));
    let lines = server.drain_stderr();
    let predictor_line = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["target"] == "runner::predictor" && l["spans"].to_string().contains("trace-7f3a.1")
        })
        .unwrap_or_else(|| {
            panic!(
                "no predictor log line with the request id in:\n{}",
                lines.join("\n")
            )
        });
    let spans = predictor_line["spans"].to_string();
    assert!(spans.contains("pred-with-logs"), "{predictor_line}");
}

#[test]
fn metrics_parse_with_the_prometheus_client_and_follow_predictions() {
    let Some(venv) = std::env::var_os("RUNNER_PROMETHEUS_VENV").map(std::path::PathBuf::from)
    else {
        eprintln!("SKIPPED: RUNNER_PROMETHEUS_VENV is not set (scripts/test.sh sets it up with scripts/setup-prometheus.sh)");
        return;
    };
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    // The Prometheus project's own text-format parser; it raises on anything malformed.
    let parse = |text: &str| -> Value {
        let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
    out[f"type:{family.name}"] = family.type
print(json.dumps(out))
"#;
        let mut child = std::process::Command::new(venv.join("bin/python"))
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the prometheus venv's python runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prometheus_client cannot parse /metrics: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let before = parse(&server.get("/metrics").1);
    assert_eq!(
        before["type:runner_prediction_duration_seconds"],
        "histogram"
    );
    assert_eq!(before["type:runner_predictions"], "counter");
    assert!(before["process_resident_memory_bytes{}"].as_f64().unwrap() > 1e6);
    assert_eq!(before["runner_predictions_total{status=succeeded}"], 0.0);
    for _ in 0..3 {
        assert_eq!(server.predict(json!({"text": "a"})).0, 200);
    }
    let after = parse(&server.get("/metrics").1);
    assert_eq!(after["runner_predictions_total{status=succeeded}"], 3.0);
    assert_eq!(after["runner_prediction_duration_seconds_count{}"], 3.0);
    assert_eq!(
        after["runner_http_requests_total{method=POST,route=/predictions,status=200}"],
        3.0
    );
}

#[test]
fn an_api_key_guards_every_route_but_the_health_check_and_the_page() {
    const KEY: &str = "k3y-for-the-test-6d1f";
    let server = Server::start(&repo_root().join("models/conformance"), &["--api-key", KEY]);
    let call = |method: &str, path: &str, auth: Option<&str>| {
        let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        if let Some(a) = auth {
            headers.push(("Authorization".to_string(), a.to_string()));
        }
        let body = (method == "POST").then_some(&br#"{"input": {"text": "a"}}"#[..]);
        support::request(&server.addr, method, path, &headers, body)
    };
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/openapi.json"),
        ("GET", "/metrics"),
        ("POST", "/predictions"),
        ("POST", "/predictions/x/cancel"),
    ] {
        let r = call(method, path, None);
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"runner\"");
        assert!(
            r.body.contains("--api-key"),
            "says what to send: {}",
            r.body
        );
        let wrong = call(method, path, Some("Bearer not-the-key"));
        assert_eq!(wrong.status, 401, "{method} {path}");
        assert!(wrong.body.contains("wrong API key"), "{}", wrong.body);
    }
    assert_eq!(call("GET", "/health-check", None).status, 200);
    let page = call("GET", "/playground", None);
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(r#"<meta name="runner-model-dir" content="">"#),
        "the open page does not say where the model lives"
    );
    let bearer = format!("Bearer {KEY}");
    let ok = call("POST", "/predictions", Some(&bearer));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(call("GET", "/metrics", Some(&bearer)).status, 200);
    // Refusals are counted, and the key is never written anywhere.
    let metrics = call("GET", "/metrics", Some(&bearer)).body;
    assert!(
        metrics.contains(
            r#"runner_http_requests_total{route="/predictions",method="POST",status="401"} 2"#
        ),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let logs = server.drain_stderr().join("\n");
    assert!(!logs.contains(KEY) && !metrics.contains(KEY), "{logs}");
}

#[test]
fn secrets_never_reach_logs_metrics_or_answers() {
    const SECRET_INPUT: &str = "s3cret-input-value-91c2";
    const WEBHOOK_TOKEN: &str = "webhook-token-value-44ab";
    let fixtures = Fixtures::start();
    let server = Server::start(
        &repo_root().join("models/conformance"),
        &["-v", "--webhook-auth-token", WEBHOOK_TOKEN],
    );
    let (status, p) = server.predict(json!({"text": "a", "api_key": SECRET_INPUT}));
    assert_eq!(status, 200);
    assert_eq!(p["output"]["api_key_length"], SECRET_INPUT.len());
    let (status, _) = server.predict(json!({"text": "a", "api_key": SECRET_INPUT, "fail": true}));
    assert_eq!(status, 200);
    let invalid = server.predict(json!({"count": 99, "api_key": SECRET_INPUT}));
    assert_eq!(invalid.0, 422);
    let body = json!({
        "input": {"text": "a", "api_key": SECRET_INPUT},
        "webhook": format!("{}/hooks/secret", fixtures.url()),
    })
    .to_string();
    let accepted = post_async(&server, &body);
    assert_eq!(accepted.status, 202);
    wait_until("the terminal webhook", Duration::from_secs(10), || {
        fixtures
            .received("/hooks/secret")
            .iter()
            .any(|r| String::from_utf8_lossy(&r.body).contains("succeeded"))
    });
    // The receiver got the token; nothing else ever shows it or the secret input.
    let hooks = fixtures.received("/hooks/secret");
    assert_eq!(
        hooks[0].headers["authorization"],
        format!("Bearer {WEBHOOK_TOKEN}")
    );
    std::thread::sleep(Duration::from_millis(200));
    let logs = server.drain_stderr().join("\n");
    let metrics = server.get("/metrics").1;
    let health = server.get("/health-check").1;
    for (what, text) in [
        ("logs", &logs),
        ("metrics", &metrics),
        ("health-check", &health),
        ("a 422", &invalid.1.to_string()),
        ("a 202", &accepted.body),
    ] {
        assert!(
            !text.contains(SECRET_INPUT),
            "the secret input is in the {what}:\n{text}"
        );
        assert!(
            !text.contains(WEBHOOK_TOKEN),
            "the webhook token is in the {what}:\n{text}"
        );
    }
}

/// Fault run (issue 10): webhook receivers that refuse connections, hang, drop the
/// connection or answer 500 for a while. Every accepted async prediction still reaches its
/// terminal state, and its terminal webhook is delivered once the receiver recovers, exactly
/// once (never again after a 2xx), carrying the final state.
#[test]
fn terminal_webhooks_survive_refusing_hanging_and_failing_receivers() {
    use support::fixtures::{DROP, HANG};
    let fixtures = Fixtures::start();
    // A port nobody listens on yet: connections are refused until a receiver starts there.
    let refused_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let server = Server::start(
        &repo_root().join("models/conformance"),
        &["--webhook-timeout", "0.5", "--max-queue", "64"],
    );
    const PER_KIND: usize = 4;
    let kinds: [(&str, u16, u32); 3] = [("hang", HANG, 2), ("drop", DROP, 3), ("error", 500, 4)];
    let mut hooks = Vec::new(); // (base url, path, failures first)
    for (kind, status, times) in kinds {
        for i in 0..PER_KIND {
            let path = format!("/hooks/{kind}/{i}");
            fixtures
                .lock()
                .failures
                .insert(path.clone(), (times, status));
            hooks.push((fixtures.url(), path, times as usize));
        }
    }
    for i in 0..PER_KIND {
        hooks.push((
            format!("http://{refused_addr}"),
            format!("/hooks/refused/{i}"),
            0,
        ));
    }
    for (n, (base, path, _)) in hooks.iter().enumerate() {
        let body = json!({
            "id": format!("hook-{n}"),
            "input": {"text": format!("prediction {n}")},
            "webhook": format!("{base}{path}"),
            "webhook_events_filter": ["completed"],
        })
        .to_string();
        let accepted = post_async(&server, &body);
        assert_eq!(accepted.status, 202, "{}", accepted.body);
    }
    // The refusing receiver recovers after a while.
    std::thread::sleep(Duration::from_millis(1500));
    let late = Fixtures::start_on(&refused_addr);
    let delivered = |base: &str, path: &str| -> Vec<support::fixtures::Received> {
        let receiver = if base == fixtures.url() {
            &fixtures
        } else {
            &late
        };
        receiver.received(path)
    };
    wait_until("every terminal webhook", Duration::from_secs(60), || {
        hooks
            .iter()
            .all(|(base, path, _)| delivered(base, path).iter().any(|r| r.answered == 200))
    });
    // Long enough for any duplicate to arrive (the backoff is 0.1 s doubling).
    std::thread::sleep(Duration::from_secs(2));
    for (n, (base, path, failures)) in hooks.iter().enumerate() {
        let got = delivered(base, path);
        let ok: Vec<_> = got.iter().filter(|r| r.answered == 200).collect();
        assert_eq!(ok.len(), 1, "{path}: delivered {} times", ok.len());
        assert_eq!(
            got.len(),
            failures + 1,
            "{path}: {} attempts for {failures} failures",
            got.len()
        );
        assert!(
            std::ptr::eq(*ok.last().unwrap(), got.last().unwrap()),
            "{path}: attempts after a 2xx"
        );
        let body: Value = serde_json::from_slice(&ok[0].body).unwrap();
        assert_eq!(body["status"], "succeeded", "{path}: {body}");
        assert_eq!(body["id"], format!("hook-{n}"));
        let (status, state) = server.get(&format!("/predictions/hook-{n}"));
        if status == 200 {
            assert_eq!(
                serde_json::from_str::<Value>(&state).unwrap()["status"],
                "succeeded"
            );
        }
    }
}

/// The API under attack (issue 10): file servers that never stop sending or never send, and
/// data URIs that lie. Each prediction fails with a clear error within a bounded time, the
/// server's memory stays bounded, and it keeps answering.
#[test]
fn hostile_file_servers_and_lying_data_uris_are_cut_off() {
    let fixtures = Fixtures::start();
    let server = Server::start(
        &repo_root().join("models/files"),
        &[
            "--max-input-file-bytes",
            "1000000",
            "--input-download-timeout",
            "2",
        ],
    );
    let rss_before = server.rss_kib();
    let started = Instant::now();
    let (status, v) =
        server.predict(json!({"source": format!("{}/files/endless", fixtures.url())}));
    assert_eq!(status, 200);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("limit"), "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "an endless body took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let (_, v) = server.predict(json!({"source": format!("{}/files/stall", fixtures.url())}));
    assert_eq!(v["status"], "failed", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("2s") || error.contains("time"), "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a stalled server took {:?}",
        started.elapsed()
    );

    for (lie, why) in [
        ("data:text/plain;base64,!!!!", "not base64"),
        ("data:text/plain;base64,eHh4eA=x", "padding in the middle"),
        // (A `%` without two hex digits stays as it is, as the URL standard decodes it.)
        ("data:;base64", "no comma"),
    ] {
        let (status, v) = server.predict(json!({"source": lie}));
        assert!(
            (status == 200 && v["status"] == "failed") || status == 422,
            "{why}: {status} {v}"
        );
        assert!(!v.to_string().is_empty());
    }
    // Bounded memory: the endless body never accumulated (64 MiB is far above the limit).
    let growth = server.rss_kib().saturating_sub(rss_before);
    assert!(growth < 64 * 1024, "RSS grew by {growth} KiB");
    let (status, v) = server.predict(json!({"source": "data:text/plain,hello"}));
    assert_eq!(status, 200);
    assert_eq!(v["status"], "succeeded", "{v}");
}

/// The API under attack (issue 10): a body over the 100 MiB limit, JSON nested 100,000 deep,
/// and huge strings and arrays inside the Input's limits. Each gets a clear answer, the
/// server's memory stays bounded, and it keeps answering.
#[test]
fn oversized_deep_and_huge_bodies_get_clear_answers_in_bounded_memory() {
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    let rss_before = server.rss_kib();
    let post = |body: &[u8]| {
        support::request(
            &server.addr,
            "POST",
            "/predictions",
            &[("Content-Type".to_string(), "application/json".to_string())],
            Some(body),
        )
    };
    // Over the limit: 413, before the body is held in memory.
    let mut big = br#"{"input": {"text": ""#.to_vec();
    big.resize(101 << 20, b'a');
    big.extend_from_slice(br#""}}"#);
    let r = post(&big);
    assert_eq!(r.status, 413, "{}", r.body);
    drop(big);
    // Nested 100,000 deep: refused by the parser's depth limit, not a stack overflow.
    let deep = format!(
        r#"{{"input": {{"text": "x", "note": {}{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let r = post(deep.as_bytes());
    assert!(matches!(r.status, 400 | 422), "{} {}", r.status, r.body);
    // Huge but allowed: a 20 MB string where only 200 characters are allowed, a 1M-item list.
    let r = post(format!(r#"{{"input": {{"text": "{}"}}}}"#, "a".repeat(20_000_000)).as_bytes());
    assert_eq!(r.status, 422, "{}", &r.body[..r.body.len().min(300)]);
    assert!(
        r.body.len() < 10_000,
        "the error echoes the whole input: {} bytes",
        r.body.len()
    );
    let list = vec!["\"t\""; 1_000_000].join(",");
    let r = post(format!(r#"{{"input": {{"text": "x", "tags": [{list}]}}}}"#).as_bytes());
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    // Bounded: nothing above kept more than a few copies of the largest accepted body.
    let growth = server.rss_kib().saturating_sub(rss_before);
    assert!(growth < 512 * 1024, "RSS grew by {growth} KiB");
    let (status, v) = server.predict(json!({"text": "still here"}));
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("succeeded")),
        "{v}"
    );
}

/// Fault run (issue 10): a full disk under the file inputs' scratch folder (a 1 MiB tmpfs as
/// TMPDIR, mounted in a private mount namespace by `unshare`) and a 2 MiB download: the
/// prediction fails saying the disk is full, its scratch space is freed, and the next
/// prediction works.
#[test]
fn a_full_disk_under_file_inputs_fails_the_prediction_cleanly() {
    let fixtures = Fixtures::start();
    fixtures
        .lock()
        .files
        .insert("two-mib.bin".into(), vec![b'x'; 2 << 20]);
    // As root a mount namespace is enough; otherwise a user namespace maps us to root.
    let unshare_args: &[&str] = if unsafe { libc::geteuid() } == 0 {
        &["-m"]
    } else {
        &["-rm"]
    };
    let mut command = std::process::Command::new("unshare");
    command.args(unshare_args).args([
        "sh",
        "-c",
        r#"mnt=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs "$mnt" && TMPDIR="$mnt" exec "$@""#,
        "sh",
        support::RUNNER,
    ]);
    let server = Server::start_with(command, &repo_root().join("models/files"), &[]);
    assert!(
        server.status_line.contains("ready"),
        "{}",
        server.status_line
    );
    for _ in 0..2 {
        let (status, v) =
            server.predict(json!({"source": format!("{}/files/two-mib.bin", fixtures.url())}));
        assert_eq!(status, 200);
        assert_eq!(v["status"], "failed", "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("disk holding the scratch folder is full"),
            "{v}"
        );
    }
    let (status, v) = server.predict(json!({"source": "data:text/plain,hello"}));
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("succeeded")),
        "{v}"
    );
}

/// `--ready-file` (Cog's `/var/run/cog/ready` on Kubernetes, for a readiness probe): gone
/// while the model loads, even when an earlier run left one; there once it is ready; never
/// written when setup fails.
#[test]
fn the_ready_file_appears_only_once_the_model_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("run/cog/ready");
    std::fs::create_dir_all(ready.parent().unwrap()).unwrap();
    std::fs::write(&ready, b"left by an earlier run").unwrap();
    let mut command = std::process::Command::new(support::RUNNER);
    command
        .env("RUNNER_READY_FILE", &ready)
        .env("CONFORMANCE_SETUP_DELAY", "1.5");
    let starting = std::thread::spawn({
        let ready = ready.clone();
        move || {
            // While setup sleeps: the stale file is removed, and no new one is there yet.
            wait_until(
                "the stale ready file is removed",
                Duration::from_secs(20),
                || !ready.exists(),
            );
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !ready.exists(),
                "the ready file appeared before setup finished"
            );
        }
    });
    let server = Server::start_with(command, &repo_root().join("models/conformance"), &[]);
    assert!(
        server.status_line.contains("ready at"),
        "{}",
        server.status_line
    );
    starting.join().unwrap();
    assert!(ready.is_file(), "no ready file once ready");
    assert_eq!(std::fs::read(&ready).unwrap(), b"");
    drop(server);

    let failed = dir.path().join("failed/ready");
    let mut command = std::process::Command::new(support::RUNNER);
    command
        .env("RUNNER_READY_FILE", &failed)
        .env("CONFORMANCE_SETUP_FAIL", "1");
    let server = Server::start_with(command, &repo_root().join("models/conformance"), &[]);
    assert!(
        server.status_line.contains("setup failed"),
        "{}",
        server.status_line
    );
    assert!(
        !failed.exists(),
        "a server whose setup failed marked itself ready"
    );
}

/// `COG_THROTTLE_RESPONSE_INTERVAL` (`--webhook-throttle`): with 0, every log line of a
/// prediction gets its `logs` webhook; with the default half second, lines 100 ms apart are
/// gathered into fewer. Either way the terminal webhook carries every line.
#[test]
fn the_webhook_throttle_is_cogs_variable() {
    let fixtures = Fixtures::start();
    let logs_webhooks = |throttle: &str| -> usize {
        let mut command = std::process::Command::new(support::RUNNER);
        command.env("COG_THROTTLE_RESPONSE_INTERVAL", throttle);
        let server = Server::start_with(command, &repo_root().join("models/stream"), &[]);
        let path = format!("/hooks/throttle-{throttle}");
        let body = json!({
            "input": {"prompt": "a b c d e f", "delay": 0.1},
            "webhook": format!("{}{path}", fixtures.url()),
            "webhook_events_filter": ["logs", "completed"],
        })
        .to_string();
        assert_eq!(post_async(&server, &body).status, 202);
        wait_until("the terminal webhook", Duration::from_secs(20), || {
            fixtures.received(&path).iter().any(|r| {
                serde_json::from_slice::<Value>(&r.body).is_ok_and(|v| v["status"] == "succeeded")
            })
        });
        let received = fixtures.received(&path);
        let terminal: Value = serde_json::from_slice(&received.last().unwrap().body).unwrap();
        assert_eq!(
            terminal["logs"]
                .as_str()
                .unwrap()
                .matches("stream: token")
                .count(),
            6,
            "{terminal}"
        );
        received.len() - 1
    };
    let unthrottled = logs_webhooks("0");
    let throttled = logs_webhooks("0.5");
    assert!(
        unthrottled >= 6,
        "{unthrottled} logs webhooks without a throttle"
    );
    assert!(
        throttled < unthrottled,
        "{throttled} throttled against {unthrottled}"
    );
}
