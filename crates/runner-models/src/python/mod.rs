//! Python Cog predictors (`run: "predict.py:Predictor"`), served unchanged: one worker
//! process per model, in the interpreter the user points at (`--python`, else `python3`),
//! with the `cog` package importable there. The worker (`worker.py`, passed with `-c`)
//! imports the predictor, runs `setup()`, and exchanges JSON lines with runner: requests
//! on its stdin, events on a private copy of its stdout (its fd 1 is pointed at stderr, so
//! nothing the predictor prints can corrupt the channel). Prints inside a prediction
//! become that prediction's logs; other output goes to runner's log.
//!
//! The signature comes from the predictor itself, through the `cog` package's own
//! inspector, and runner's schema generator turns it into the document Cog would write.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runner_spec::{FieldType, InputField, ModelDir, OutputType, Primitive, RunTarget, Signature};
use serde_json::{json, Map, Value};

use crate::{LoadContext, LoadError, MetricMode, Model, PredictContext, PredictError};

/// The worker program, run with `python -c`.
const WORKER_PY: &str = include_str!("worker.py");

/// How long a canceled prediction may ignore the cancellation before the worker is stopped.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long a predictor's own `healthcheck()` may take, as in Cog (the worker enforces it).
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the predictor declares, read from its source by the `cog` package.
#[derive(Debug, Clone)]
pub struct Described {
    pub signature: Signature,
    /// `async def predict/run`: several predictions may share the worker.
    pub is_async: bool,
    /// `@cog.concurrent(max=N)`.
    pub concurrent_max: Option<u32>,
    /// The predictor defines its own `healthcheck()`.
    pub has_healthcheck: bool,
}

/// The interpreter: `--python`, else `python3` on PATH.
pub fn interpreter(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn target(dir: &ModelDir) -> Result<(String, String), LoadError> {
    match &dir.config.run {
        RunTarget::Python { file, class } => Ok((file.clone(), class.clone())),
        other => Err(other_err(format!("{other} is not a Python predictor"))),
    }
}

fn other_err(message: String) -> LoadError {
    LoadError::Other(message)
}

fn worker_command(python: &Path, mode: &str, dir: &ModelDir) -> Result<Command, LoadError> {
    let (file, class) = target(dir)?;
    if !dir.root.join(&file).is_file() {
        return Err(other_err(format!(
            "{}: `run: {file}:{class}` names {file}, which is not in the model directory",
            dir.config.path.display()
        )));
    }
    let mut cmd = Command::new(python);
    cmd.arg("-c")
        .arg(WORKER_PY)
        .arg(mode)
        .arg(&dir.root)
        .arg(file)
        .arg(class)
        .current_dir(&dir.root)
        .env("PYTHONUNBUFFERED", "1")
        // The predictor's own deprecation warnings are Cog's to give, not runner's.
        .env("PYTHONWARNINGS", "ignore::DeprecationWarning");
    Ok(cmd)
}

fn spawn_error(python: &Path, e: std::io::Error) -> LoadError {
    other_err(format!(
        "cannot start the Python interpreter {} ({e}): install Python 3.10 or newer with the `cog` package, or point --python at one (e.g. --python .venv/bin/python)",
        python.display()
    ))
}

/// Reads the predictor's signature by importing it in a short-lived worker (for a target
/// that is not served: a server reads it from its own worker, see [`start`]).
pub fn describe(dir: &ModelDir, python: Option<&Path>) -> Result<Described, LoadError> {
    let python = interpreter(python);
    let out = worker_command(&python, "describe", dir)?
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(&python, e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let message: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            other_err(format!(
                "the Python worker ({}) said nothing readable: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
    described_from(dir, &message)
}

/// The worker's `describe` event, or its error, as runner's terms.
fn described_from(dir: &ModelDir, message: &Value) -> Result<Described, LoadError> {
    match message["event"].as_str() {
        Some("describe") => Ok(Described {
            signature: signature_from_json(&message["signature"])
                .map_err(|e| other_err(format!("the predictor's signature: {e}")))?,
            is_async: message["is_async"].as_bool().unwrap_or(false),
            concurrent_max: message["concurrent_max"].as_u64().map(|n| n as u32),
            has_healthcheck: message["has_healthcheck"].as_bool().unwrap_or(false),
        }),
        _ => Err(other_err(format!(
            "cannot read the predictor {}: {}",
            dir.config.run,
            message["message"]
                .as_str()
                .or(message["error"].as_str())
                .unwrap_or("unknown error")
                .trim()
        ))),
    }
}

fn primitive(name: &str) -> Result<Primitive, String> {
    Ok(match name {
        "bool" => Primitive::Bool,
        "float" => Primitive::Float,
        "int" => Primitive::Int,
        "str" => Primitive::Str,
        "path" => Primitive::Path,
        "file" => Primitive::File,
        "secret" => Primitive::Secret,
        "any" => Primitive::Any,
        other => return Err(format!("unknown type {other}")),
    })
}

fn field_type(v: &Value) -> Result<FieldType, String> {
    if let Some(p) = v["prim"].as_str() {
        return Ok(FieldType::Prim(primitive(p)?));
    }
    if let Some(p) = v["list"].as_str() {
        return Ok(FieldType::List(primitive(p)?));
    }
    if let Some(variants) = v["union"].as_array() {
        return Ok(FieldType::Union(
            variants.iter().map(field_type).collect::<Result<_, _>>()?,
        ));
    }
    Err(format!("unknown input type {v}"))
}

fn output_type(v: &Value) -> Result<OutputType, String> {
    if let Some(p) = v["prim"].as_str() {
        return Ok(OutputType::Prim(primitive(p)?));
    }
    if let Some(inner) = v.get("list") {
        return Ok(OutputType::List(Box::new(output_type(inner)?)));
    }
    if let Some(inner) = v.get("iterator") {
        return Ok(OutputType::Iterator(Box::new(output_type(inner)?)));
    }
    if let Some(inner) = v.get("concatenate_iterator") {
        return Ok(OutputType::ConcatenateIterator(Box::new(output_type(
            inner,
        )?)));
    }
    if let Some(fields) = v["object"].as_array() {
        return fields
            .iter()
            .map(|f| {
                Ok((
                    f[0].as_str().ok_or("field name")?.to_string(),
                    output_type(&f[1])?,
                    f[2].as_bool().unwrap_or(true),
                ))
            })
            .collect::<Result<_, String>>()
            .map(OutputType::Object);
    }
    Err(format!("unknown output type {v}"))
}

/// The worker's description of a signature, in runner's terms.
pub fn signature_from_json(v: &Value) -> Result<Signature, String> {
    let mut inputs = Vec::new();
    for f in v["inputs"].as_array().ok_or("no inputs")? {
        let name = f["name"].as_str().ok_or("an input without a name")?;
        let mut field = InputField::new(name, field_type(&f["type"])?);
        field.optional = f["optional"].as_bool().unwrap_or(false);
        field.default = f.get("default").cloned();
        field.description = f["description"].as_str().map(str::to_string);
        field.ge = f["ge"].as_f64();
        field.le = f["le"].as_f64();
        field.min_length = f["min_length"].as_u64();
        field.max_length = f["max_length"].as_u64();
        field.regex = f["regex"].as_str().map(str::to_string);
        field.choices = f["choices"].as_array().cloned().unwrap_or_default();
        field.deprecated = f["deprecated"].as_bool().unwrap_or(false);
        inputs.push(field);
    }
    Ok(Signature {
        inputs,
        output: output_type(&v["output"])?,
        streaming: v["streaming"].as_bool().unwrap_or(false),
    })
}

/// What the worker reports about one prediction.
enum Event {
    Log(String),
    Output(Value),
    Metric(String, Value, MetricMode),
    Done(Result<Value, PredictError>),
    /// The answer of the predictor's `healthcheck()`: why it is unhealthy, if it is.
    Healthcheck(Option<String>),
}

/// The worker process and the predictions waiting on it.
struct Worker {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    waiting: Arc<Mutex<HashMap<String, mpsc::Sender<Event>>>>,
    /// Why the worker is gone, once it is.
    gone: Arc<Mutex<Option<String>>>,
    next_id: AtomicU64,
}

impl Worker {
    fn send(&self, message: &Value) -> Result<(), String> {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(stdin, "{message}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("cannot reach the Python worker: {e}"))
    }

    fn gone(&self) -> Option<String> {
        self.gone.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn kill(&self, why: &str) {
        let mut gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if gone.is_none() {
            *gone = Some(why.to_string());
        }
        drop(gone);
        let _ = self.child.lock().unwrap_or_else(|e| e.into_inner()).kill();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.send(&json!({"op": "shutdown"}));
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A Python predictor behind its worker. A worker that runner stops (a prediction ignored
/// its cancellation past the grace period) is replaced by a fresh one, which runs
/// `setup()` again; a worker that dies on its own leaves the model DEFUNCT, as in Cog.
pub struct PythonModel {
    dir: ModelDir,
    python: PathBuf,
    worker: Arc<Mutex<Arc<Worker>>>,
    /// Set while a replacement worker runs its setup.
    restarting: Arc<std::sync::atomic::AtomicBool>,
    /// The predictor defines `healthcheck()`: only then is the worker asked.
    has_healthcheck: bool,
}

/// Runs the predictor's `setup()` in the worker that described it (else in a new one); its
/// prints become setup logs.
pub fn load(
    dir: &ModelDir,
    _device: &candle_core::Device,
    ctx: &LoadContext,
) -> Result<Box<dyn Model>, LoadError> {
    let python = interpreter(ctx.python());
    let log = |line: &str| ctx.log(line);
    let started = match ctx.take_python_started() {
        Some(started) => started,
        None => start(dir, Some(&python), None)?.1,
    };
    let has_healthcheck = started.has_healthcheck;
    let worker = started.set_up(&log)?;
    Ok(Box::new(PythonModel {
        dir: dir.clone(),
        python,
        worker: Arc::new(Mutex::new(Arc::new(worker))),
        restarting: Arc::default(),
        has_healthcheck,
    }))
}

/// A worker that imported the predictor and described it, waiting to be told to set up.
/// Dropped unused (`runner schema`), it is stopped.
pub struct Started {
    worker: Worker,
    setup: mpsc::Receiver<Result<(), String>>,
    logs: mpsc::Receiver<String>,
    has_healthcheck: bool,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started").finish_non_exhaustive()
    }
}

/// Starts the serving worker and reads the predictor's signature from it: one Python
/// process and one import of the predictor's module for both (a module that imports torch
/// takes seconds). Setup waits for [`Started::set_up`].
/// `limit` bounds the import (Cog's `COG_SETUP_TIMEOUT` covers it too).
pub fn start(
    dir: &ModelDir,
    python: Option<&Path>,
    limit: Option<Duration>,
) -> Result<(Described, Started), LoadError> {
    let python = interpreter(python);
    let mut cmd = worker_command(&python, "serve", dir)?;
    if let Some(weights) = dir.weights.safetensors.first().and_then(|p| p.parent()) {
        cmd.env("COG_WEIGHTS", weights);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(&python, e))?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    // Output the predictor writes outside the channel (C extensions, warnings).
    let (stderr_tx, stderr_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            tracing::info!(target: "runner::predictor", "{line}");
            let _ = stderr_tx.send(line);
        }
    });
    let waiting: Arc<Mutex<HashMap<String, mpsc::Sender<Event>>>> = Arc::default();
    let gone: Arc<Mutex<Option<String>>> = Arc::default();
    let (setup_tx, setup_rx) = mpsc::channel::<Result<(), String>>();
    let (log_tx, log_rx) = mpsc::channel::<String>();
    let (described_tx, described_rx) = mpsc::channel::<Value>();
    {
        let waiting = Arc::clone(&waiting);
        let gone = Arc::clone(&gone);
        std::thread::spawn(move || {
            read_events(stdout, &waiting, described_tx, setup_tx, log_tx);
            let mut why = gone.lock().unwrap_or_else(|e| e.into_inner());
            let reason = why
                .get_or_insert_with(|| "the Python worker exited".to_string())
                .clone();
            drop(why);
            for (_, tx) in waiting.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                let _ = tx.send(Event::Done(Err(PredictError::Failed(reason.clone()))));
            }
        });
    }
    let worker = Worker {
        child: Mutex::new(child),
        stdin: Mutex::new(stdin),
        waiting,
        gone,
        next_id: AtomicU64::new(0),
    };
    // The import's failure comes as `setup_failed` (or `error`, when `cog` is missing);
    // the channel closes when the worker exits first.
    let answer = match limit {
        Some(limit) => described_rx.recv_timeout(limit).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => Some(limit),
            mpsc::RecvTimeoutError::Disconnected => None,
        }),
        None => described_rx.recv().map_err(|_| None),
    };
    let message = match answer {
        Ok(message) => message,
        Err(Some(limit)) => {
            // Dropping the worker stops it.
            return Err(other_err(format!(
                "cannot read the predictor {}: importing it took longer than the setup limit of {} s (--setup-timeout, COG_SETUP_TIMEOUT)",
                dir.config.run,
                limit.as_secs_f64()
            )));
        }
        Err(None) => {
            let failure = match setup_rx.try_recv() {
                Ok(Err(e)) => e,
                _ => {
                    let printed: Vec<String> = stderr_rx.try_iter().collect();
                    format!(
                        "the Python worker ({}) exited before describing the predictor: {}",
                        python.display(),
                        printed.join("\n").trim()
                    )
                }
            };
            return Err(other_err(format!(
                "cannot read the predictor {}: {}",
                dir.config.run,
                failure.trim()
            )));
        }
    };
    let described = described_from(dir, &message)?;
    let has_healthcheck = described.has_healthcheck;
    Ok((
        described,
        Started {
            worker,
            setup: setup_rx,
            logs: log_rx,
            has_healthcheck,
        },
    ))
}

impl Started {
    /// Runs `setup()`; its prints (and the import's) become setup logs.
    fn set_up(self, log: &dyn Fn(&str)) -> Result<Worker, LoadError> {
        let Started {
            worker,
            setup,
            logs,
            ..
        } = self;
        let drain_logs = || {
            while let Ok(line) = logs.try_recv() {
                log(line.trim_end_matches('\n'));
            }
        };
        if let Err(e) = worker.send(&json!({"op": "setup"})) {
            drain_logs();
            return Err(other_err(format!(
                "cannot start the predictor's setup: {e}"
            )));
        }
        loop {
            drain_logs();
            match setup.recv_timeout(Duration::from_millis(20)) {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    drain_logs();
                    return Err(other_err(format!("the predictor's setup failed:\n{e}")));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    drain_logs();
                    let status = worker
                        .child
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    return Err(other_err(format!(
                        "the Python worker exited during setup ({status}); its output is in the setup logs"
                    )));
                }
            }
        }
        drain_logs();
        Ok(worker)
    }
}

fn start_worker(dir: &ModelDir, python: &Path, log: &dyn Fn(&str)) -> Result<Worker, LoadError> {
    let (_, started) = start(dir, Some(python), None)?;
    started.set_up(log)
}

impl PythonModel {
    /// The worker to use; waits while a replacement runs its setup.
    fn current(&self) -> Arc<Worker> {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.restarting.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Arc::clone(&self.worker.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops a worker that kept running a canceled prediction and starts another.
    fn replace(&self, stubborn: &Worker) {
        if self.restarting.swap(true, Ordering::SeqCst) {
            return;
        }
        stubborn.kill(&format!(
            "the Python worker was stopped: a prediction ignored its cancellation for {} s; a new worker is starting",
            CANCEL_GRACE.as_secs()
        ));
        let (dir, python) = (self.dir.clone(), self.python.clone());
        let (slot, restarting) = (Arc::clone(&self.worker), Arc::clone(&self.restarting));
        std::thread::spawn(move || {
            let log = |line: &str| tracing::info!(target: "runner::predictor", "{line}");
            tracing::warn!(target: "runner::setup", "restarting the Python worker: a prediction ignored its cancellation");
            match start_worker(&dir, &python, &log) {
                Ok(worker) => {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(worker);
                    tracing::info!(target: "runner::setup", "the new Python worker is ready");
                }
                Err(e) => {
                    tracing::error!(target: "runner::setup", "the Python worker could not be restarted: {e}")
                }
            }
            restarting.store(false, Ordering::SeqCst);
        });
    }
}

/// The worker's channel, line by line, until it closes.
fn read_events(
    stdout: std::process::ChildStdout,
    waiting: &Mutex<HashMap<String, mpsc::Sender<Event>>>,
    described: mpsc::Sender<Value>,
    setup: mpsc::Sender<Result<(), String>>,
    setup_logs: mpsc::Sender<String>,
) {
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(target: "runner::predictor", "unreadable line from the Python worker: {line}");
            continue;
        };
        let id = message["id"].as_str().unwrap_or_default();
        let event = match message["event"].as_str().unwrap_or_default() {
            "setup_log" => {
                // During setup the lines become setup logs (which are logged); after it, output
                // outside any prediction (say, from the predictor's own threads) is logged here.
                let data = message["data"].as_str().unwrap_or_default().to_string();
                if let Err(mpsc::SendError(data)) = setup_logs.send(data) {
                    tracing::info!(target: "runner::predictor", "{}", data.trim_end());
                }
                continue;
            }
            "describe" => {
                let _ = described.send(message);
                continue;
            }
            "ready" => {
                let _ = setup.send(Ok(()));
                continue;
            }
            "setup_failed" | "error" => {
                let why = message["error"]
                    .as_str()
                    .or(message["message"].as_str())
                    .unwrap_or("unknown error");
                let _ = setup.send(Err(why.to_string()));
                continue;
            }
            "log" => Event::Log(message["data"].as_str().unwrap_or_default().to_string()),
            "output" => Event::Output(message["chunk"].clone()),
            "metric" => Event::Metric(
                message["name"].as_str().unwrap_or_default().to_string(),
                message["value"].clone(),
                match message["mode"].as_str() {
                    Some("increment") | Some("incr") => MetricMode::Increment,
                    Some("append") => MetricMode::Append,
                    _ => MetricMode::Replace,
                },
            ),
            "healthcheck" => Event::Healthcheck(message["error"].as_str().map(str::to_string)),
            "done" => Event::Done(match message["status"].as_str() {
                Some("succeeded") => Ok(message["output"].clone()),
                Some("canceled") => Err(PredictError::Canceled),
                _ => Err(PredictError::Failed(
                    message["error"]
                        .as_str()
                        .unwrap_or("the prediction failed")
                        .to_string(),
                )),
            }),
            _ => continue,
        };
        let map = waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(id) {
            let _ = tx.send(event);
        }
    }
}

impl Model for PythonModel {
    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError> {
        let worker = self.current();
        if let Some(why) = worker.gone() {
            return Err(PredictError::Failed(why));
        }
        let id = format!("p{}", worker.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel();
        worker
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        let unregister = || {
            worker
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        };
        if let Err(e) = worker.send(
            &json!({"op": "predict", "id": id, "input": input, "context": ctx.request_context()}),
        ) {
            unregister();
            return Err(PredictError::Failed(e));
        }
        let mut cancel_deadline: Option<Instant> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(Event::Log(text)) => ctx.log(&text),
                Ok(Event::Output(chunk)) => ctx.emit_output(chunk),
                Ok(Event::Metric(name, value, mode)) => ctx.record_metric(&name, value, mode),
                // Never sent under a prediction's id.
                Ok(Event::Healthcheck(_)) => {}
                Ok(Event::Done(result)) => {
                    unregister();
                    return result;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    unregister();
                    return Err(PredictError::Failed(
                        worker
                            .gone()
                            .unwrap_or_else(|| "the Python worker exited".into()),
                    ));
                }
            }
            if ctx.is_canceled() {
                match cancel_deadline {
                    None => {
                        let _ = worker.send(&json!({"op": "cancel", "id": id}));
                        cancel_deadline = Some(Instant::now() + CANCEL_GRACE);
                    }
                    Some(deadline) if Instant::now() > deadline => {
                        unregister();
                        self.replace(&worker);
                        return Err(PredictError::Canceled);
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn has_healthcheck(&self) -> bool {
        self.has_healthcheck
    }

    fn healthcheck(&self) -> Result<(), String> {
        let worker = self.current();
        if worker.gone().is_some() {
            // DEFUNCT says it already.
            return Ok(());
        }
        let id = format!("h{}", worker.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel();
        let waiting = || worker.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting().insert(id.clone(), tx);
        let sent = worker.send(&json!({"op": "healthcheck", "id": id}));
        // The worker gives up on the check after HEALTHCHECK_TIMEOUT itself; the margin
        // covers a worker too busy to say so.
        let answer = sent.and_then(|()| {
            rx.recv_timeout(HEALTHCHECK_TIMEOUT + Duration::from_secs(1))
                .map_err(|_| {
                    format!(
                        "Healthcheck failed: user-defined healthcheck timed out after {:.1} seconds",
                        HEALTHCHECK_TIMEOUT.as_secs_f64()
                    )
                })
        });
        waiting().remove(&id);
        match answer {
            Ok(Event::Healthcheck(None)) => Ok(()),
            Ok(Event::Healthcheck(Some(why))) => Err(why),
            Ok(_) => Err("Healthcheck failed: the Python worker answered out of turn".into()),
            Err(why) => Err(why),
        }
    }

    fn defunct(&self) -> Option<String> {
        if self.restarting.load(Ordering::SeqCst) {
            return None;
        }
        self.worker.lock().unwrap_or_else(|e| e.into_inner()).gone()
    }
}
