//! The Cog HTTP contract as data: replays the cases in `cog-spec/conformance/*.json`
//! against `runner serve` and, when `RUNNER_COGLET_VENV` names a virtualenv with
//! `cog==0.23.1` installed, against Cog's own server (coglet) serving the Python twins of
//! runner's test architectures. Any drift from Cog fails one of the two runs; differences
//! kept on purpose are per-target expectations that must name an entry of
//! `cog-spec/deviations.md`.

mod support;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use support::fixtures::Fixtures;
use support::{repo_root, request, Response, RUNNER};

const WEBHOOK_TOKEN: &str = "conformance-token";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Runner,
    Coglet,
    /// runner serving the very Python predictor folders coglet serves (issue 7), with the
    /// coglet virtualenv's interpreter. runner's own expectations apply unless a case
    /// names `expect_runner-python`.
    RunnerPython,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Runner => "runner",
            Target::Coglet => "coglet",
            Target::RunnerPython => "runner-python",
        }
    }
    /// The expectation keys that apply, most specific first.
    fn expectation_names(self) -> &'static [&'static str] {
        match self {
            Target::RunnerPython => &["runner-python", "runner"],
            Target::Runner => &["runner"],
            Target::Coglet => &["coglet"],
        }
    }
}

// ---------------------------------------------------------------------------------------
// Servers under test.

struct Proc {
    child: Child,
    addr: String,
    _dir: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where each model lives for each target: runner's directory, and the Python twin.
fn model_dirs(model: &str) -> (PathBuf, PathBuf) {
    let root = repo_root();
    let runner = root.join("models").join(model);
    let twin = root.join("cog-spec/predictors").join(model);
    let coglet = if twin.is_dir() {
        twin
    } else {
        root.join("cog-spec/cog-0.23.1-schemas").join(model)
    };
    (runner, coglet)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ServerKey {
    model: String,
    env: Vec<(String, String)>,
    upload: bool,
    await_explicit_shutdown: bool,
    /// `"train"` serves the model's `train:` function (`--mode train`, Cog's `--x-mode
    /// train`); anything else serves predictions.
    train: bool,
}

fn start_server(target: Target, key: &ServerKey, fixtures: &Fixtures) -> Proc {
    let port = free_port();
    let (runner_dir, coglet_dir) = model_dirs(&key.model);
    let logdir = tempfile::tempdir().unwrap().keep();
    let log = logdir.join("server.log");
    let logfile = std::fs::File::create(&log).unwrap();
    let upload_url = format!("{}/upload/", fixtures.url());
    let python_copy = (target == Target::RunnerPython).then(|| {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&coglet_dir, dir.path());
        dir
    });
    let (mut cmd, dir) = match target {
        Target::Runner | Target::RunnerPython => {
            let mut cmd = Command::new(RUNNER);
            let served = python_copy
                .as_ref()
                .map_or(runner_dir.clone(), |d| d.path().to_path_buf());
            if target == Target::RunnerPython {
                let venv = PathBuf::from(std::env::var("RUNNER_COGLET_VENV").unwrap());
                cmd.arg("--python").arg(venv.join("bin/python"));
            }
            cmd.arg("serve")
                .arg(&served)
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--device",
                    "cpu",
                ])
                .env_remove("RUNNER_PORT")
                .env_remove("COG_MAX_CONCURRENCY");
            if key.upload {
                cmd.args(["--upload-url", &upload_url]);
            }
            if key.await_explicit_shutdown {
                cmd.arg("--await-explicit-shutdown");
            }
            if key.train {
                cmd.args(["--mode", "train"]);
            }
            (cmd, python_copy)
        }
        Target::Coglet => {
            let venv = PathBuf::from(std::env::var("RUNNER_COGLET_VENV").unwrap());
            let dir = tempfile::tempdir().unwrap();
            copy_dir(&coglet_dir, dir.path());
            std::fs::create_dir_all(dir.path().join(".cog")).unwrap();
            std::fs::copy(
                coglet_dir.join("openapi_schema.json"),
                dir.path().join(".cog/openapi_schema.json"),
            )
            .unwrap();
            let cog_yaml = std::fs::read_to_string(coglet_dir.join("cog.yaml")).unwrap();
            let stub = |keys: &[&str]| {
                cog_yaml
                    .lines()
                    .find_map(|l| keys.iter().find_map(|k| l.strip_prefix(k)))
                    .map(|v| v.trim().trim_matches('"').to_string())
            };
            let predict_stub = stub(&["predict: ", "run: "]).unwrap();
            // Cog's image sets COG_MAX_CONCURRENCY from cog.yaml; do the same.
            let concurrency = cog_yaml
                .lines()
                .skip_while(|l| !l.starts_with("concurrency:"))
                .find_map(|l| l.trim().strip_prefix("max: "))
                .unwrap_or("1")
                .to_string();
            let path = format!(
                "{}:{}",
                venv.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let mut cmd = Command::new(venv.join("bin/python"));
            cmd.args(["-m", "cog.server.http", "--host", "127.0.0.1"])
                .current_dir(dir.path())
                .env("PATH", path)
                .env("PORT", port.to_string())
                .env("COG_PREDICT_TYPE_STUB", predict_stub)
                .env("COG_MAX_CONCURRENCY", concurrency);
            if key.train {
                // As Cog's image sets it from cog.yaml's `train:`.
                cmd.arg("--x-mode")
                    .arg("train")
                    .env("COG_TRAIN_TYPE_STUB", stub(&["train: "]).unwrap());
            }
            if key.upload {
                cmd.arg(format!("--upload-url={upload_url}"));
            }
            if key.await_explicit_shutdown {
                cmd.arg("--await-explicit-shutdown=true");
            }
            (cmd, Some(dir))
        }
    };
    cmd.env("WEBHOOK_AUTH_TOKEN", WEBHOOK_TOKEN)
        .env("RUNNER_WEBHOOK_RETRY_DEADLINE", "30")
        .stdin(Stdio::null())
        .stdout(logfile.try_clone().unwrap())
        .stderr(logfile);
    for (k, v) in &key.env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{} starts: {e}", target.name()));
    let proc = Proc {
        child,
        addr: format!("127.0.0.1:{port}"),
        _dir: dir,
        log,
    };
    // Listening is enough: cases that need READY wait for it themselves.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(&proc.addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} did not listen on {}; its log:\n{}",
            target.name(),
            proc.addr,
            proc.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

fn wait_for_health(addr: &str, wanted: &str, within: Duration) -> Value {
    try_wait_for_health(addr, wanted, within).unwrap_or_else(|e| panic!("{e}"))
}

fn try_wait_for_health(addr: &str, wanted: &str, within: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + within;
    loop {
        let r = request(addr, "GET", "/health-check", &[], None);
        let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        if body["status"] == wanted {
            return Ok(body);
        }
        if Instant::now() >= deadline {
            return Err(format!("health never became {wanted}; last: {}", r.body));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// A small HTTP/1.1 client that keeps headers and reads event streams to their end.

/// Server-sent events as `{event, data}` (keep-alive comments dropped).
fn parse_sse(body: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for block in body.replace("\r\n", "\n").split("\n\n") {
        let mut name = "message".to_string();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() {
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            events.push(json!({"event": name, "data": data}));
        }
    }
    events
}

// ---------------------------------------------------------------------------------------
// Matching expected JSON against what came back.

/// `expected` matches `actual` when every key of an expected object matches (extra keys
/// allowed unless `"$only": true`), arrays match item by item, and strings starting with
/// `$` are patterns: `$any`, `$absent`, `$string`, `$number`, `$nonempty`,
/// `$contains:TEXT`, `$prefix:TEXT`, `$oneof:A|B`.
fn matches(expected: &Value, actual: Option<&Value>, at: &str, errors: &mut Vec<String>) {
    match expected {
        Value::String(p) if p.starts_with('$') => {
            let ok = match (p.as_str(), actual) {
                ("$absent", a) => a.is_none(),
                ("$any", a) => a.is_some(),
                ("$string", Some(Value::String(_))) => true,
                ("$number", Some(Value::Number(_))) => true,
                ("$nonempty", Some(Value::String(s))) => !s.is_empty(),
                ("$nonempty", Some(Value::Array(a))) => !a.is_empty(),
                (p, Some(Value::String(s))) if p.starts_with("$contains:") => {
                    s.contains(&p["$contains:".len()..])
                }
                (p, Some(Value::String(s))) if p.starts_with("$prefix:") => {
                    s.starts_with(&p["$prefix:".len()..])
                }
                (p, Some(a)) if p.starts_with("$oneof:") => {
                    p["$oneof:".len()..].split('|').any(|o| {
                        a.as_str() == Some(o) || serde_json::to_string(a).ok().as_deref() == Some(o)
                    })
                }
                _ => false,
            };
            if !ok {
                errors.push(format!("{at}: expected {p}, got {}", show(actual)));
            }
        }
        Value::Object(exp) => {
            let Some(Value::Object(act)) = actual else {
                errors.push(format!("{at}: expected an object, got {}", show(actual)));
                return;
            };
            for (k, v) in exp {
                if k == "$only" {
                    continue;
                }
                matches(v, act.get(k), &format!("{at}.{k}"), errors);
            }
            if exp.get("$only") == Some(&Value::Bool(true)) {
                for k in act.keys() {
                    if !exp.contains_key(k) {
                        errors.push(format!("{at}: unexpected key {k:?}"));
                    }
                }
            }
        }
        Value::Array(exp) => {
            let Some(Value::Array(act)) = actual else {
                errors.push(format!("{at}: expected an array, got {}", show(actual)));
                return;
            };
            if exp.len() != act.len() {
                errors.push(format!(
                    "{at}: expected {} items, got {}: {}",
                    exp.len(),
                    act.len(),
                    show(actual)
                ));
                return;
            }
            for (i, (e, a)) in exp.iter().zip(act).enumerate() {
                matches(e, Some(a), &format!("{at}[{i}]"), errors);
            }
        }
        Value::Number(n) => {
            if actual.and_then(Value::as_f64) != n.as_f64() {
                errors.push(format!("{at}: expected {n}, got {}", show(actual)));
            }
        }
        other => {
            if actual != Some(other) {
                errors.push(format!("{at}: expected {other}, got {}", show(actual)));
            }
        }
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "nothing".into(),
        Some(v) => {
            let s = v.to_string();
            if s.len() > 300 {
                format!("{}…", &s[..300])
            } else {
                s
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The case runner.

struct Run<'a> {
    target: Target,
    fixtures: &'a Fixtures,
    servers: HashMap<ServerKey, Proc>,
}

/// Replaces `{{hook}}`, `{{files}}` and `{{upload}}` in every string.
fn substitute(v: &Value, vars: &[(String, String)]) -> Value {
    match v {
        Value::String(s) => {
            let mut s = s.clone();
            for (k, val) in vars {
                s = s.replace(&format!("{{{{{k}}}}}"), val);
            }
            Value::String(s)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, vars)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), substitute(x, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn send(addr: &str, req: &Value) -> Response {
    let method = req["method"].as_str().unwrap_or("POST");
    let path = req["path"].as_str().unwrap_or("/predictions");
    let mut headers: Vec<(String, String)> = req["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let body: Option<Vec<u8>> = if let Some(j) = req.get("json") {
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        Some(serde_json::to_vec(j).unwrap())
    } else {
        req.get("body")
            .and_then(Value::as_str)
            .map(|b| b.as_bytes().to_vec())
    };
    request(addr, method, path, &headers, body.as_deref())
}

/// Checks a response against an expectation: status, headers, JSON body, text, events.
fn check_response(resp: &Response, expect: &Value, errors: &mut Vec<String>) {
    if let Some(status) = expect.get("status") {
        if status.as_u64() != Some(resp.status as u64) {
            errors.push(format!(
                "status: expected {status}, got {} ({})",
                resp.status, resp.body
            ));
            return;
        }
    }
    if let Some(headers) = expect.get("headers").and_then(Value::as_object) {
        for (k, v) in headers {
            let actual = resp.headers.get(&k.to_ascii_lowercase()).map(|s| json!(s));
            matches(v, actual.as_ref(), &format!("header {k}"), errors);
        }
    }
    if let Some(text) = expect.get("text_contains").and_then(Value::as_str) {
        if !resp.body.contains(text) {
            errors.push(format!(
                "body: expected it to contain {text:?}, got {:?}",
                resp.body
            ));
        }
    }
    if let Some(exp) = expect.get("json") {
        match serde_json::from_str::<Value>(&resp.body) {
            Ok(actual) => matches(exp, Some(&actual), "body", errors),
            Err(_) => errors.push(format!("body: expected JSON, got {:?}", resp.body)),
        }
    }
    if let Some(exp) = expect.get("events") {
        let events = parse_sse(&resp.body);
        check_events(&events, exp, errors);
    }
}

fn check_events(events: &[Value], exp: &Value, errors: &mut Vec<String>) {
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    if let Some(order) = exp.get("in_order").and_then(Value::as_array) {
        let mut it = names.iter();
        for want in order.iter().filter_map(Value::as_str) {
            if !it.any(|n| *n == want) {
                errors.push(format!(
                    "events: expected {order:?} in this order, got {names:?}"
                ));
                break;
            }
        }
    }
    if let Some(counts) = exp.get("counts").and_then(Value::as_object) {
        for (name, n) in counts {
            let got = names.iter().filter(|x| **x == name).count() as u64;
            if Some(got) != n.as_u64() {
                errors.push(format!(
                    "events: expected {n} {name:?}, got {got} in {names:?}"
                ));
            }
        }
    }
    for (key, event) in [("first", events.first()), ("last", events.last())] {
        if let Some(m) = exp.get(key) {
            matches(m, event, &format!("{key} event"), errors);
        }
    }
    if let Some(m) = exp.get("each") {
        for (i, e) in events.iter().enumerate() {
            matches(m, Some(e), &format!("event {i}"), errors);
        }
    }
}

fn terminal(status: &Value) -> bool {
    matches!(status.as_str(), Some("succeeded" | "failed" | "canceled"))
}

fn check_webhooks(fixtures: &Fixtures, hook_path: &str, exp: &Value, errors: &mut Vec<String>) {
    let timeout = Duration::from_secs_f64(exp["timeout"].as_f64().unwrap_or(20.0));
    let settle = Duration::from_secs_f64(exp["settle"].as_f64().unwrap_or(0.5));
    let deadline = Instant::now() + timeout;
    let delivered = || -> Vec<Value> {
        fixtures
            .received(hook_path)
            .iter()
            .filter(|r| (200..300).contains(&r.answered))
            .map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null))
            .collect()
    };
    if exp.get("no_terminal").is_none() {
        while !delivered().iter().any(|b| terminal(&b["status"])) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(settle);
    let all = fixtures.received(hook_path);
    let got = delivered();
    let statuses: Vec<&str> = got.iter().filter_map(|b| b["status"].as_str()).collect();
    let terminals = got.iter().filter(|b| terminal(&b["status"])).count() as u64;
    let want_terminals = exp["terminal_count"].as_u64().unwrap_or(1);
    if terminals != want_terminals {
        errors.push(format!(
            "webhooks: expected {want_terminals} terminal deliveries, got {terminals} (statuses {statuses:?})"
        ));
    }
    if let Some(n) = exp["count"].as_u64() {
        if got.len() as u64 != n {
            errors.push(format!(
                "webhooks: expected {n} deliveries, got {} ({statuses:?})",
                got.len()
            ));
        }
    }
    if let Some(n) = exp["min_attempts"].as_u64() {
        if (all.len() as u64) < n {
            errors.push(format!(
                "webhooks: expected at least {n} attempts, got {}",
                all.len()
            ));
        }
    }
    // Terminal last: nothing after it, never a non-terminal after a terminal.
    if exp["terminal_last"].as_bool().unwrap_or(false) {
        if let Some(pos) = statuses.iter().position(|s| terminal(&json!(s))) {
            if pos + 1 != statuses.len() {
                errors.push(format!(
                    "webhooks: deliveries after the terminal one: {statuses:?}"
                ));
            }
        }
    }
    if let Some(m) = exp.get("terminal") {
        let body = got.iter().find(|b| terminal(&b["status"]));
        matches(m, body, "terminal webhook", errors);
    }
    for (key, body) in [("first", got.first()), ("last", got.last())] {
        if let Some(m) = exp.get(key) {
            matches(m, body, &format!("{key} webhook"), errors);
        }
    }
    if let Some(m) = exp.get("each") {
        for (i, b) in got.iter().enumerate() {
            matches(m, Some(b), &format!("webhook {i}"), errors);
        }
    }
    // At least one delivery matches, wherever it landed.
    if let Some(m) = exp.get("some") {
        let any = got.iter().any(|b| {
            let mut e = Vec::new();
            matches(m, Some(b), "", &mut e);
            e.is_empty()
        });
        if !any {
            errors.push(format!(
                "webhooks: none matches {m} (statuses {statuses:?})"
            ));
        }
    }
    if let Some(m) = exp.get("headers") {
        for (i, r) in all.iter().enumerate() {
            let h: Map<String, Value> = r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            matches(
                m,
                Some(&Value::Object(h)),
                &format!("webhook {i} headers"),
                errors,
            );
            if r.method != "POST" {
                errors.push(format!("webhook {i}: sent with {}", r.method));
            }
        }
    }
}

fn server_key(case: &Value) -> ServerKey {
    let mut env: Vec<(String, String)> = case["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    env.sort();
    ServerKey {
        model: case["model"].as_str().unwrap_or("conformance").to_string(),
        env,
        upload: case["upload"].as_bool().unwrap_or(false),
        await_explicit_shutdown: case["await_explicit_shutdown"].as_bool().unwrap_or(false),
        train: case["mode"].as_str() == Some("train"),
    }
}

impl Run<'_> {
    /// Runs one case; returns its failures.
    fn case(&mut self, file: &str, case: &Value, deviations: &str) -> Vec<String> {
        let name = case["name"].as_str().unwrap_or("?").to_string();
        let key = server_key(case);
        let fresh = case["fresh_server"].as_bool().unwrap_or(false);
        let mut own: Option<Proc> = None;
        if fresh {
            own = Some(start_server(self.target, &key, self.fixtures));
        } else if !self.servers.contains_key(&key) {
            let p = start_server(self.target, &key, self.fixtures);
            self.servers.insert(key.clone(), p);
        }
        let proc: &mut Proc = match own.as_mut() {
            Some(p) => p,
            None => self.servers.get_mut(&key).unwrap(),
        };
        let addr = proc.addr.clone();
        if case["wait_ready"].as_bool().unwrap_or(true) {
            let wanted = if key.env.iter().any(|(k, _)| k == "CONFORMANCE_SETUP_FAIL") {
                "SETUP_FAILED"
            } else {
                "READY"
            };
            wait_for_health(&addr, wanted, Duration::from_secs(60));
        }
        for (file_name, content) in case["fixtures"].as_object().into_iter().flatten() {
            self.fixtures.lock().files.insert(
                file_name.clone(),
                content.as_str().unwrap_or("").as_bytes().to_vec(),
            );
        }
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let hook_path = format!("/hook/{}/{file}/{slug}", self.target.name());
        if let Some(f) = case.get("receiver_fails") {
            self.fixtures.lock().failures.insert(
                hook_path.clone(),
                (
                    f["times"].as_u64().unwrap_or(0) as u32,
                    f["status"].as_u64().unwrap_or(500) as u16,
                ),
            );
        }
        let vars = vec![
            (
                "hook".to_string(),
                format!("{}{}", self.fixtures.url(), hook_path),
            ),
            (
                "files".to_string(),
                format!("{}/files", self.fixtures.url()),
            ),
        ];
        let mut errors = Vec::new();
        let mut background: HashMap<String, std::thread::JoinHandle<Response>> = HashMap::new();
        for (i, step) in case["steps"].as_array().into_iter().flatten().enumerate() {
            let step = substitute(step, &vars);
            let mut step_errors = Vec::new();
            // A step for one target only: a difference kept on purpose.
            if let Some(only) = step.get("only_for").and_then(Value::as_str) {
                let deviation = case["deviation"].as_str().unwrap_or("");
                assert!(
                    !deviation.is_empty() && deviations.contains(deviation),
                    "{file}/{name}: a step `only_for` one target needs a `deviation` that cog-spec/deviations.md names"
                );
                if !self.target.expectation_names().contains(&only) {
                    continue;
                }
            }
            let per_target = self
                .target
                .expectation_names()
                .iter()
                .find_map(|t| step.get(format!("expect_{t}")));
            let expect = match per_target {
                Some(e) => {
                    let deviation = case["deviation"].as_str().unwrap_or("");
                    assert!(
                        !deviation.is_empty() && deviations.contains(deviation),
                        "{file}/{name}: a per-target expectation needs a `deviation` that cog-spec/deviations.md names (got {deviation:?})"
                    );
                    e.clone()
                }
                None => step.get("expect").cloned().unwrap_or(Value::Null),
            };
            if let Some(req) = step.get("request") {
                if let Some(label) = step.get("background").and_then(Value::as_str) {
                    let (addr, req) = (addr.clone(), req.clone());
                    background.insert(
                        label.to_string(),
                        std::thread::spawn(move || send(&addr, &req)),
                    );
                    // Let it reach the server before the next step.
                    std::thread::sleep(Duration::from_millis(400));
                } else {
                    let mut resp = send(&addr, req);
                    // coglet holds its slot for a moment after running a user
                    // healthcheck(), answering 409 to a prediction sent right then.
                    if let Some(busy) = step.get("retry_while").and_then(Value::as_u64) {
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while u64::from(resp.status) == busy && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(50));
                            resp = send(&addr, req);
                        }
                    }
                    check_response(&resp, &expect, &mut step_errors);
                }
            } else if let Some(label) = step.get("await").and_then(Value::as_str) {
                let resp = background
                    .remove(label)
                    .expect("awaited a started request")
                    .join()
                    .unwrap();
                check_response(&resp, &expect, &mut step_errors);
            } else if let Some(secs) = step.get("sleep").and_then(Value::as_f64) {
                std::thread::sleep(Duration::from_secs_f64(secs));
            } else if let Some(wanted) = step.get("wait_for_health").and_then(Value::as_str) {
                // A failed wait ends the case, reported with the steps before it (whose
                // errors usually say why) rather than as a panic that hides them.
                if let Err(e) = try_wait_for_health(&addr, wanted, Duration::from_secs(60)) {
                    errors.push(format!("{file}/{name} step {i}: {e}"));
                    break;
                }
            } else if let Some(exp) = step.get("webhooks") {
                check_webhooks(self.fixtures, &hook_path, exp, &mut step_errors);
            } else if let Some(uploads) = step.get("uploads").and_then(Value::as_object) {
                for (file_name, content) in uploads {
                    let got = self
                        .fixtures
                        .lock()
                        .files
                        .get(&format!("uploaded/{file_name}"))
                        .cloned();
                    if got.as_deref() != Some(content.as_str().unwrap_or("").as_bytes()) {
                        step_errors.push(format!(
                            "upload {file_name}: got {:?}",
                            got.map(|b| String::from_utf8_lossy(&b).into_owned())
                        ));
                    }
                }
            } else if let Some(sig) = step.get("signal").and_then(Value::as_str) {
                let status = Command::new("kill")
                    .args([format!("-{sig}"), proc.child.id().to_string()])
                    .status()
                    .unwrap();
                assert!(status.success());
            } else if let Some(secs) = step.get("expect_exit_within").and_then(Value::as_f64) {
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                loop {
                    if let Some(code) = proc.child.try_wait().unwrap() {
                        if !code.success() && step.get("any_exit_code").is_none() {
                            step_errors.push(format!("exited with {code}"));
                        }
                        break;
                    }
                    if Instant::now() > deadline {
                        step_errors.push(format!("still running {secs}s later"));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            } else if let Some(secs) = step.get("expect_alive_for").and_then(Value::as_f64) {
                std::thread::sleep(Duration::from_secs_f64(secs));
                if proc.child.try_wait().unwrap().is_some() {
                    step_errors.push("exited, but should still be serving".into());
                }
            } else {
                panic!("{file}/{name}: step {i} is not understood: {step}");
            }
            for e in step_errors {
                errors.push(format!("{file}/{name} step {i}: {e}"));
            }
        }
        for (_, h) in background {
            let _ = h.join();
        }
        if !errors.is_empty() {
            if let Some(p) = own.as_ref().or_else(|| self.servers.get(&key)) {
                let logs = p.logs();
                let tail: String = logs
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                errors.push(format!("{file}/{name}: last server log lines:\n{tail}"));
            }
        }
        errors
    }
}

fn load_cases() -> Vec<(String, Value)> {
    let dir = repo_root().join("cog-spec/conformance");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let doc: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
        for case in doc["cases"].as_array().expect("a `cases` array") {
            let mut case = case.clone();
            if case.get("model").is_none() {
                case["model"] = doc.get("model").cloned().unwrap_or(json!("conformance"));
            }
            cases.push((stem.clone(), case));
        }
    }
    cases
}

fn run_all(target: Target) {
    let deviations = std::fs::read_to_string(repo_root().join("cog-spec/deviations.md")).unwrap();
    let fixtures = Fixtures::start();
    let mut run = Run {
        target,
        fixtures: &fixtures,
        servers: HashMap::new(),
    };
    let only = std::env::var("CONFORMANCE_ONLY").ok();
    let mut failures = Vec::new();
    let mut count = 0;
    let mut skipped = 0;
    for (file, case) in load_cases() {
        let name = case["name"].as_str().unwrap_or("?");
        if only
            .as_deref()
            .is_some_and(|o| !format!("{file}/{name}").contains(o))
        {
            continue;
        }
        let model = case["model"].as_str().unwrap_or("conformance");
        if target == Target::Runner && !repo_root().join("models").join(model).is_dir() {
            // A Python-only model (no native twin): the runner-python run covers it.
            eprintln!("[runner] skip {file}/{name} (no models/{model})");
            skipped += 1;
            continue;
        }
        count += 1;
        let started = Instant::now();
        let errors = run.case(&file, &case, &deviations);
        eprintln!(
            "[{}] {} {file}/{name} ({:.1}s)",
            target.name(),
            if errors.is_empty() { "ok  " } else { "FAIL" },
            started.elapsed().as_secs_f64()
        );
        // Said now, too: a later case's panic would otherwise hide them.
        for e in &errors {
            eprintln!("    {e}");
        }
        failures.extend(errors);
    }
    assert!(count + skipped > 0, "no conformance cases ran");
    assert!(
        failures.is_empty(),
        "{} conformance failures against {}:\n{}",
        failures.len(),
        target.name(),
        failures.join("\n")
    );
}

#[test]
fn conformance_against_runner() {
    run_all(Target::Runner);
}

#[test]
fn conformance_against_runner_serving_the_python_predictors() {
    match std::env::var("RUNNER_COGLET_VENV") {
        Ok(_) => run_all(Target::RunnerPython),
        Err(_) => eprintln!(
            "skipped: set RUNNER_COGLET_VENV to a virtualenv with cog==0.23.1 (its Python runs the predictors; CI does)"
        ),
    }
}

#[test]
fn conformance_against_coglet() {
    match std::env::var("RUNNER_COGLET_VENV") {
        Ok(v) => {
            assert!(
                Path::new(&v).join("bin/python").is_file(),
                "RUNNER_COGLET_VENV={v} has no bin/python: run scripts/setup-coglet.sh"
            );
            run_all(Target::Coglet)
        }
        Err(_) => eprintln!(
            "skipped: set RUNNER_COGLET_VENV to a virtualenv with cog==0.23.1 to replay the cases against Cog's server (CI does)"
        ),
    }
}
