//! Python Cog predictors behind runner's server (issue 7), beyond the conformance suite
//! (which replays every case against runner serving cog-spec's Python predictors): the
//! schema Cog's own generator wrote, a sync generator, output below Python's sys.stdout,
//! a worker killed mid-prediction (DEFUNCT), a prediction that ignores its cancellation
//! (the worker is stopped and replaced), an interpreter without the `cog` package, and a
//! training module that does not import. Needs RUNNER_COGLET_VENV (a virtualenv with
//! cog==0.23.1; scripts/test.sh sets it up).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{repo_root, runner, Server};

fn cog_python() -> Option<String> {
    match std::env::var("RUNNER_COGLET_VENV") {
        Ok(v) => Some(PathBuf::from(v).join("bin/python").display().to_string()),
        Err(_) => {
            eprintln!("SKIPPED: RUNNER_COGLET_VENV is not set (scripts/test.sh sets it up with scripts/setup-coglet.sh)");
            None
        }
    }
}

/// A copy of a predictor folder, so that nothing is written into the repository.
fn copy_of(rel: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo_root().join(rel)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), d.path().join(entry.file_name())).unwrap();
        }
    }
    d
}

/// [`copy_of`] a predictor folder whose predict.py sleeps `seconds` at import (standing in
/// for `import torch`).
fn slow_importing_copy_of(rel: &str, seconds: u32) -> tempfile::TempDir {
    let dir = copy_of(rel);
    let predict = dir.path().join("predict.py");
    let source = std::fs::read_to_string(&predict).unwrap();
    std::fs::write(
        &predict,
        format!("import time\ntime.sleep({seconds})\n{source}"),
    )
    .unwrap();
    dir
}

fn health(server: &Server) -> Value {
    serde_json::from_str(&server.get("/health-check").1).unwrap()
}

#[test]
fn schemas_equal_the_ones_cogs_generator_wrote() {
    let Some(python) = cog_python() else { return };
    for dir in [
        "cog-spec/predictors/conformance",
        "cog-spec/cog-0.23.1-schemas/stream",
        "cog-spec/cog-0.23.1-schemas/files",
        "cog-spec/cog-0.23.1-schemas/setup_fail",
        // predict + train, merged: written by `runner schema` (no Cog build of it exists
        // here), so this pins runner's combined document against drift.
        "cog-spec/predictors/trainer",
        // Written by `runner schema` too.
        "cog-spec/predictors/scope",
        "cog-spec/predictors/healthcheck",
    ] {
        let copy = copy_of(dir);
        let (code, stdout, stderr) =
            runner(&["--python", &python, "schema", copy.path().to_str().unwrap()]);
        assert_eq!(code, 0, "{dir}: {stderr}");
        let cogs =
            std::fs::read_to_string(repo_root().join(dir).join("openapi_schema.json")).unwrap();
        assert_eq!(
            stdout, cogs,
            "{dir}: runner's schema differs from the one Cog wrote"
        );
    }
    // A directory `cog build` prepared carries its schema: that one is served as it is.
    let copy = copy_of("cog-spec/cog-0.23.1-schemas/stream");
    std::fs::create_dir_all(copy.path().join(".cog")).unwrap();
    let marked = r#"{"openapi": "3.0.2", "info": {"title": "from .cog", "version": "0.1.0"}}"#;
    std::fs::write(copy.path().join(".cog/openapi_schema.json"), marked).unwrap();
    let (code, stdout, stderr) =
        runner(&["--python", &python, "schema", copy.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, marked);
}

#[test]
fn a_sync_generator_streams_and_prints_never_corrupt_the_channel() {
    let Some(python) = cog_python() else { return };
    let dir = copy_of("tests/data/python-predictors/edge");
    let server = Server::start(dir.path(), &["--python", &python]);
    assert!(
        server.status_line.contains("predict.py:Predictor"),
        "{}",
        server.status_line
    );
    let (status, p) = server.predict(json!({"words": "one two three"}));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["output"], json!(["one", "two", "three"]));
    // print() to stdout or stderr inside a prediction: that prediction's logs, in order.
    assert_eq!(
        p["logs"], "edge: to stderr\nedge: one\nedge: two\nedge: three\n",
        "{p}"
    );
    let h = health(&server);
    assert!(
        h["setup"]["logs"]
            .as_str()
            .unwrap()
            .contains("edge: setup done"),
        "{h}"
    );
    // Bytes written below Python (fd 1) went to runner's log, not into the channel.
    std::thread::sleep(Duration::from_millis(200));
    let logs = server.drain_stderr().join("\n");
    assert!(logs.contains("edge: raw bytes on fd 1"), "{logs}");
    // Concurrent sync predictions take turns in the one slot.
    let (status, p) = server.predict(json!({"words": "again"}));
    assert_eq!((status, p["output"].clone()), (200, json!(["again"])));
}

#[test]
fn a_worker_killed_mid_prediction_fails_it_and_the_server_keeps_answering() {
    let Some(python) = cog_python() else { return };
    let dir = copy_of("tests/data/python-predictors/edge");
    let server = Server::start(dir.path(), &["--python", &python]);
    let (status, p) = server.predict(json!({"mode": "crash"}));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["status"], "failed", "{p}");
    assert!(
        p["error"].as_str().unwrap().contains("Python worker"),
        "{p}"
    );
    assert!(
        p["logs"].as_str().unwrap().contains("edge: about to die"),
        "{p}"
    );
    let h = health(&server);
    assert_eq!(h["status"], "DEFUNCT", "{h}");
    // Still answering: later predictions fail at once with the reason.
    let started = Instant::now();
    let (status, p) = server.predict(json!({}));
    assert_eq!((status, p["status"].as_str()), (200, Some("failed")), "{p}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server.get("/metrics").0, 200);
}

#[test]
fn a_prediction_that_ignores_cancellation_is_stopped_after_the_grace_period() {
    let Some(python) = cog_python() else { return };
    let dir = copy_of("tests/data/python-predictors/edge");
    let server = Server::start(dir.path(), &["--python", &python]);
    let headers = [
        ("Content-Type".to_string(), "application/json".to_string()),
        ("Prefer".to_string(), "respond-async".to_string()),
    ];
    let r = support::request(
        &server.addr,
        "PUT",
        "/predictions/stubborn-1",
        &headers,
        Some(br#"{"input": {"mode": "stubborn"}}"#),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    assert_eq!(
        server.post_json("/predictions/stubborn-1/cancel", "").0,
        200
    );
    while health(&server)["runner"]["in_flight"] != 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "still running");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Stopped after the grace period (5 s), not before; the prediction ends canceled.
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // A new worker replaces the stopped one (setup runs again) and serves the next one.
    let (status, p) = server.predict(json!({"words": "after restart"}));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["output"], json!(["after", "restart"]), "{p}");
    assert_eq!(health(&server)["status"], "READY");
    std::thread::sleep(Duration::from_millis(200));
    let logs = server.drain_stderr().join("\n");
    assert!(logs.contains("restarting the Python worker"), "{logs}");
    assert!(logs.contains("edge: setup done"), "setup ran again: {logs}");
}

#[test]
fn an_interpreter_without_cog_or_a_missing_file_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("cog.yaml"),
        "build:\n  python_version: \"3.11\"\npredict: \"predict.py:Predictor\"\n",
    )
    .unwrap();
    let dir = d.path().to_str().unwrap();
    let (code, _, stderr) = runner(&["schema", dir]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("predict.py") && stderr.contains("not in the model directory"),
        "{stderr}"
    );
    std::fs::write(
        d.path().join("predict.py"),
        "from cog import BasePredictor\nclass Predictor(BasePredictor):\n    def predict(self, x: str) -> str:\n        return x\n",
    )
    .unwrap();
    let (code, _, stderr) = runner(&["--python", "/nonexistent/python3", "schema", dir]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot start the Python interpreter"),
        "{stderr}"
    );
    // An interpreter that has Python but not the cog package says how to install it.
    let bare = tempfile::tempdir().unwrap();
    let venv = bare.path().join("venv");
    let made = std::process::Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status();
    if made.is_ok_and(|s| s.success()) {
        let python = venv.join("bin/python");
        let (code, _, stderr) = runner(&["--python", python.to_str().unwrap(), "schema", dir]);
        assert_eq!(code, 1);
        assert!(
            stderr.contains("`cog` package is not importable")
                && stderr.contains("pip install cog==0.23.1"),
            "{stderr}"
        );
    }
}

#[test]
fn cog_concurrent_sets_the_slots_of_an_async_predictor() {
    let Some(python) = cog_python() else { return };
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("cog.yaml"), "run: \"run.py:Runner\"\n").unwrap();
    std::fs::write(
        d.path().join("run.py"),
        "import asyncio\nfrom cog import BaseRunner, concurrent\n\n\nclass Runner(BaseRunner):\n    @concurrent(max=3)\n    async def run(self, seconds: float = 0.0) -> str:\n        await asyncio.sleep(seconds)\n        return \"done\"\n",
    )
    .unwrap();
    let server = Server::start(d.path(), &["--python", &python]);
    assert_eq!(health(&server)["runner"]["slots"], 3);
    // Three at once, in one worker: all three run, and a fourth finds no slot.
    let calls: Vec<_> = (0..3)
        .map(|_| server.predict_in_background(r#"{"input": {"seconds": 2.0}}"#))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(&server)["status"] != "BUSY" {
        assert!(Instant::now() < deadline, "never busy: {}", health(&server));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(health(&server)["runner"]["in_flight"], 3);
    assert_eq!(server.predict(json!({})).0, 409);
    for call in calls {
        let (status, body) = call.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"done\""), "{body}");
    }
}

/// Cog's own server (coglet) on a copy of `dir`, with the schema runner derived.
struct Coglet {
    child: std::process::Child,
    addr: String,
}

impl Drop for Coglet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_coglet(dir: &std::path::Path, python: &str, stub: &str) -> Coglet {
    let (code, schema, stderr) = runner(&["--python", python, "schema", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    std::fs::create_dir_all(dir.join(".cog")).unwrap();
    std::fs::write(dir.join(".cog/openapi_schema.json"), schema).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = PathBuf::from(python).parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = std::process::Command::new(python)
        .args(["-m", "cog.server.http", "--host", "127.0.0.1"])
        .current_dir(dir)
        .env("PATH", path)
        .env("PORT", port.to_string())
        .env("COG_PREDICT_TYPE_STUB", stub)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("coglet starts");
    let coglet = Coglet {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(&coglet.addr).is_ok() {
            let (_, body) = support::http(&coglet.addr, "GET", "/health-check", None, &[]);
            if body.contains("READY") {
                return coglet;
            }
        }
        assert!(Instant::now() < deadline, "coglet did not get ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_sync_generator_answers_as_cogs_own_server_does() {
    let Some(python) = cog_python() else { return };
    let runner_dir = copy_of("tests/data/python-predictors/edge");
    let coglet_dir = copy_of("tests/data/python-predictors/edge");
    let server = Server::start(runner_dir.path(), &["--python", &python]);
    let coglet = start_coglet(coglet_dir.path(), &python, "predict.py:Predictor");
    // coglet answers a sequential client 409 now and then while its slot frees: ask again.
    let ask = |addr: &str, input: &Value| -> (u16, Value) {
        for _ in 0..100 {
            let (status, body) = support::http(
                addr,
                "POST",
                "/predictions",
                Some(&json!({ "input": input }).to_string()),
                &[("Content-Type", "application/json")],
            );
            if status != 409 {
                return (status, serde_json::from_str(&body).unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{addr}: still 409 after 100 tries");
    };
    for input in [
        json!({"words": "one two three"}),
        json!({"words": ""}),
        json!({"mode": "nope"}),
    ] {
        let ((ours_status, ours), (cogs_status, cogs)) =
            (ask(&server.addr, &input), ask(&coglet.addr, &input));
        let both = format!("{input}: runner {ours_status} {ours} / coglet {cogs_status} {cogs}");
        assert_eq!(ours_status, cogs_status, "{both}");
        assert_eq!(ours["status"], cogs["status"], "{both}");
        assert_eq!(ours["output"], cogs["output"], "{both}");
        if ours_status == 200 {
            assert_eq!(ours["logs"], cogs["logs"], "{both}");
        }
        assert_eq!(
            ours.get("error").is_some(),
            cogs.get("error").is_some(),
            "{both}"
        );
    }
}

#[test]
fn packaging_a_python_predictor_points_at_cog_push() {
    let d = copy_of("cog-spec/cog-0.23.1-schemas/stream");
    let out = tempfile::tempdir().unwrap();
    let (code, _, stderr) = runner(&[
        "package",
        d.path().to_str().unwrap(),
        "--target",
        "replicate",
        "--out",
        out.path().join("pkg").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cog push"), "{stderr}");
    assert!(!out.path().join("pkg").exists());
}

#[test]
fn a_broken_training_module_leaves_predictions_served_and_fails_a_training_server() {
    let Some(python) = cog_python() else { return };
    let dir = copy_of("cog-spec/predictors/trainer");
    std::fs::write(
        dir.path().join("train.py"),
        "raise ImportError('no module named torchy')\n",
    )
    .unwrap();
    // Predictions do not need the trainer: served, with a warning and a document without
    // the trainings routes.
    let server = Server::start(dir.path(), &["--python", &python]);
    assert!(
        server.status_line.contains("ready at"),
        "{}",
        server.status_line
    );
    let (status, p) = server.predict(json!({"text": "hi"}));
    assert_eq!((status, p["output"].clone()), (200, json!("HI")), "{p}");
    let (_, doc) = server.get("/openapi.json");
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"].get("/predictions").is_some(), "{doc}");
    assert!(doc["paths"].get("/trainings").is_none(), "{doc}");
    drop(server);
    let (code, _, stderr) = runner(&["--python", &python, "schema", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("cannot read `train.py:train`") && stderr.contains("torchy"),
        "{stderr}"
    );
    // A training server cannot start without it, and says why.
    let (code, _, stderr) = runner(&[
        "--python",
        &python,
        "run",
        dir.path().to_str().unwrap(),
        "--mode",
        "train",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("no module named torchy"), "{stderr}");
}

#[test]
fn metrics_report_the_last_answer_of_the_predictors_own_healthcheck() {
    let Some(python) = cog_python() else { return };
    let dir = copy_of("cog-spec/predictors/healthcheck");
    let server = Server::start(dir.path(), &["--python", &python]);
    let state = |server: &Server| -> String {
        let (_, metrics) = server.get("/metrics");
        metrics
            .lines()
            .find(|l| l.starts_with("runner_health{"))
            .unwrap_or_default()
            .to_string()
    };
    let (status, p) = server.predict(json!({"health": "false"}));
    assert_eq!((status, p["output"].clone()), (200, json!("false")), "{p}");
    assert_eq!(health(&server)["status"], "UNHEALTHY");
    assert_eq!(state(&server), "runner_health{state=\"UNHEALTHY\"} 1");
    let (status, _) = server.predict(json!({"health": "ok"}));
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&server)["status"] != "READY" {
        assert!(Instant::now() < deadline, "never READY again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state(&server), "runner_health{state=\"READY\"} 1");
}

/// A Python predictor chooses its own device: runner opens none for it (a CUDA context in
/// runner's process would hold GPU memory the predictor needs), whatever `--device` says,
/// and a CPU build serves it even when asked for CUDA.
#[test]
fn runner_opens_no_device_for_a_python_predictor() {
    let Some(python) = cog_python() else { return };
    let dir = copy_of("cog-spec/predictors/scope");
    let (code, stdout, stderr) = runner(&[
        "--python",
        &python,
        "run",
        dir.path().to_str().unwrap(),
        "--device",
        "cuda",
        "-i",
        "n=1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "dict:-:");
    assert!(
        stderr.contains("a Python predictor chooses its own device"),
        "{stderr}"
    );
    assert!(
        !dir.path().join(".runner").exists(),
        "runner wrote into the model directory"
    );
}

/// An output file bigger than runner should ever hold (a training's weights): uploaded with
/// `--upload-url` straight from disk, so runner's peak memory stays far below its size.
#[test]
fn a_large_output_file_is_uploaded_from_disk_not_memory() {
    use std::io::{BufRead, BufReader, Read, Write};
    let Some(python) = cog_python() else { return };
    // An upload server that counts the bytes and keeps none.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upload = format!("http://{}/up/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0u64;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let got =
                std::io::copy(&mut reader.by_ref().take(length), &mut std::io::sink()).unwrap_or(0);
            let _ = write!(
                stream,
                "HTTP/1.1 201 Created\r\nLocation: /stored/{got}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    let dir = copy_of("tests/data/python-predictors/big-output");
    let server = Server::start(dir.path(), &["--python", &python, "--upload-url", &upload]);
    const MB: u64 = 256;
    let (status, p) = server.predict(json!({"mb": MB}));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    assert!(
        p["output"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/stored/{}", MB << 20)),
        "{p}"
    );
    let peak_kib = server.peak_rss_kib();
    assert!(
        peak_kib < (MB << 10) / 2,
        "runner peaked at {peak_kib} KiB uploading a {MB} MiB file"
    );
}

/// `COG_SETUP_TIMEOUT` covers the predictor's import too (runner imports it once, to read
/// its signature and then to serve it): an import past the limit stops runner with the
/// reason, and leaves no worker behind.
#[test]
fn an_import_past_the_setup_timeout_stops_runner_with_the_reason() {
    let Some(python) = cog_python() else { return };
    let dir = slow_importing_copy_of("cog-spec/predictors/scope", 30);
    let started = Instant::now();
    let out = std::process::Command::new(support::RUNNER)
        .args(["--python", &python, "serve", dir.path().to_str().unwrap()])
        .args(["--port", "0"])
        .env("COG_SETUP_TIMEOUT", "1")
        .env_remove("RUNNER_PORT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("importing it took longer than the setup limit of 1 s"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// runner listens before it imports the predictor (which reads its signature): while a slow
/// import runs, `/health-check` says STARTING and predictions get 503, as with Cog's server,
/// and the API key is asked for already.
#[test]
fn health_says_starting_while_the_predictor_imports() {
    let Some(python) = cog_python() else { return };
    let dir = slow_importing_copy_of("cog-spec/predictors/scope", 8);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(support::RUNNER)
        .args(["--python", &python, "serve", dir.path().to_str().unwrap()])
        .args(["--port", &port.to_string(), "--api-key", "starting-key"])
        .env_remove("RUNNER_PORT")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    // Well inside the import's 8 s, even on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "not listening 5 s after start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = support::http(&addr, "GET", "/health-check", None, &[]);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, health["status"].clone()),
        (200, json!("STARTING")),
        "{body}"
    );
    let key = [("Authorization", "Bearer starting-key")];
    let json_with_key = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer starting-key"),
    ];
    let body = Some(r#"{"input": {}}"#);
    // The API key is asked for already.
    let (status, _) = support::http(&addr, "POST", "/predictions", body, &json_with_key[..1]);
    assert_eq!(status, 401);
    let (status, _) = support::http(&addr, "GET", "/", None, &[]);
    assert_eq!(status, 401);
    let (status, answer) = support::http(&addr, "POST", "/predictions", body, &json_with_key);
    assert_eq!(status, 503, "{answer}");
    // Cog's answers before its worker has loaded the predictor.
    let (status, body) = support::http(&addr, "GET", "/openapi.json", None, &key);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("OpenAPI schema not available"), "{body}");
    let (status, body) = support::http(&addr, "GET", "/", None, &key);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"predictions_url\":\"/predictions\""),
        "{body}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = support::http(&addr, "GET", "/health-check", None, &[]);
        if serde_json::from_str::<Value>(&body).unwrap()["status"] == "READY" {
            break;
        }
        assert!(Instant::now() < deadline, "never READY: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
