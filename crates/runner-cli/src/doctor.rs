//! `runner doctor`: checks, before a start, everything `runner serve` depends on, with the
//! same flags serve takes: the machine, the device, the model directory, the predictor or
//! weights, the snapshot a start would use (and exactly why it would be ignored), room for
//! a snapshot, and the port. Each finding says what to do. `--load` goes as far as loading
//! the model as serve would; `--measure` adds the bandwidths a restore is bound by.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use runner_engine::{Engine, EngineOptions, Mode, ProgressBars, SnapshotMode, SnapshotOptions};
use runner_models::DeviceSpec;
use runner_spec::{ModelDir, RunTarget};
use serde::Serialize;

/// What `runner doctor` was asked to look at.
pub struct Request {
    /// `None`: the current directory when it holds cog.yaml, else no model checks.
    pub dir: Option<PathBuf>,
    pub device: DeviceSpec,
    pub mode: Mode,
    pub snapshot: SnapshotOptions,
    pub host: String,
    pub port: u16,
    pub python: Option<PathBuf>,
    /// Load the model as serve would (reads every byte of the weights or snapshot).
    pub load: bool,
    /// Measure page-cache read and pinned host-to-device bandwidth.
    pub measure: bool,
    pub progress: Option<ProgressBars>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Serve will start, but not as well as it could (a cold load, say).
    Warn,
    /// Serve will not start (or not on these flags).
    Fail,
    /// Does not apply here.
    Skip,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub runner_version: &'static str,
    pub model_dir: Option<PathBuf>,
    pub device: String,
    pub findings: Vec<Finding>,
    pub warnings: usize,
    pub failures: usize,
}

impl Report {
    /// The findings as aligned lines, each fix under its finding, and a verdict.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let target = self
            .model_dir
            .as_ref()
            .map_or("no model directory".to_string(), |d| {
                d.display().to_string()
            });
        out.push_str(&format!(
            "runner doctor · {target} · --device {}\n\n",
            self.device
        ));
        let width = self
            .findings
            .iter()
            .map(|f| f.check.len())
            .max()
            .unwrap_or(0);
        for f in &self.findings {
            let mark = match f.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
                Status::Skip => "-",
            };
            out.push_str(&format!("{mark:<5} {:<width$}  {}\n", f.check, f.summary));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("{:<5} {:<width$}  → {fix}\n", "", ""));
            }
        }
        let plural = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
        out.push_str(&format!(
            "\n{}, {}: {}\n",
            plural(self.failures, "problem"),
            plural(self.warnings, "warning"),
            match (self.failures, &self.model_dir) {
                (0, Some(_)) => "`runner serve` with these flags should start",
                (0, None) => "this machine can run runner",
                _ => "fix the problems above before serving",
            }
        ));
        out
    }
}

struct Findings(Vec<Finding>);

impl Findings {
    fn add(&mut self, check: &'static str, status: Status, summary: impl Into<String>) {
        self.0.push(Finding {
            check,
            status,
            summary: summary.into(),
            fix: None,
        });
    }
    fn add_fix(
        &mut self,
        check: &'static str,
        status: Status,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(Finding {
            check,
            status,
            summary: summary.into(),
            fix: Some(fix.into()),
        });
    }
}

fn gb(bytes: u64) -> String {
    if bytes < 1_000_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.2} GB", bytes as f64 / 1e9)
    }
}

/// Runs every check; never fails itself (what goes wrong is a finding).
pub async fn run(request: Request) -> Report {
    let mut found = Findings(Vec::new());
    runner_build(&mut found);
    cpu(&mut found);
    memory(&mut found);
    let dir = match &request.dir {
        Some(dir) => Some(dir.clone()),
        None if Path::new("cog.yaml").exists() => Some(PathBuf::from(".")),
        None => {
            found.add_fix(
                "model",
                Status::Skip,
                "no model directory given, and none here (no ./cog.yaml)",
                "runner doctor DIR checks a model and what serving it needs",
            );
            None
        }
    };
    // runner opens no device for a Python predictor (it picks its own), so --device
    // cannot stop one from being served.
    let python = dir.as_ref().is_some_and(|d| {
        runner_spec::CogConfig::load(&d.join("cog.yaml")).is_ok_and(|c| {
            let target = match request.mode {
                Mode::Train => c.train,
                Mode::Predict => Some(c.run),
            };
            matches!(target, Some(RunTarget::Python { .. }))
        })
    });
    let device = if python {
        found.add(
            "device",
            Status::Skip,
            "a Python predictor picks its own device; runner opens none for it",
        );
        None
    } else {
        open_device(&request, &mut found)
    };
    if let Some(dir) = &dir {
        model_checks(&request, dir, device.as_ref(), &mut found).await;
    }
    port(&request, &mut found);
    let failures = found.0.iter().filter(|f| f.status == Status::Fail).count();
    let warnings = found.0.iter().filter(|f| f.status == Status::Warn).count();
    Report {
        runner_version: env!("CARGO_PKG_VERSION"),
        model_dir: dir,
        device: request.device.to_string(),
        findings: found.0,
        warnings,
        failures,
    }
}

fn runner_build(found: &mut Findings) {
    let targets = runner_models::device::kernel_targets()
        .map(|t| format!("{}, which run on {}", t.version_note(), t.runs_on_words()))
        .unwrap_or_else(|| "kernels for a GPU architecture the build did not record".into());
    let cuda = match runner_models::device::kernels_built_for() {
        Some(cc) => format!(
            "built with CUDA (candle's {targets}; as machine code for compute capability {cc}, and as PTX)"
        ),
        None if cfg!(feature = "cuda") => format!(
            "built with CUDA (candle's {targets}; its modules as PTX only: ptxas was missing at build time, or RUNNER_KERNELS_CUBIN=off)"
        ),
        None => "built without CUDA (CPU only)".to_string(),
    };
    found.add(
        "runner",
        Status::Ok,
        format!(
            "{} (candle {}), {cuda}",
            env!("CARGO_PKG_VERSION"),
            runner_engine::CANDLE_VERSION
        ),
    );
}

fn cpu(found: &mut Findings) {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| logical.to_string());
    let summary = format!(
        "{name}; {logical} logical CPUs, {} physical; {threads} compute threads",
        num_cpus::get_physical()
    );
    use runner_models::llama::Kernel;
    match Kernel::detect() {
        Some(kernel) => found.add(
            "cpu",
            Status::Ok,
            format!(
                "{summary}; quantized text generation uses the {} kernel",
                match kernel {
                    Kernel::Avx512Vnni => "AVX-512 VNNI",
                    Kernel::AvxVnni => "AVX-VNNI",
                    Kernel::Avx2 => "AVX2",
                }
            ),
        ),
        None if cfg!(target_arch = "x86_64") && Kernel::all_here().is_empty() => found.add_fix(
            "cpu",
            Status::Warn,
            format!("{summary}; no AVX2/FMA/F16C: quantized text generation falls back to candle's slower code"),
            "use a CPU with AVX2 (any x86-64 server of the last decade) for GGUF models",
        ),
        None => found.add(
            "cpu",
            Status::Ok,
            format!("{summary}; quantized text generation uses candle's own code (RUNNER_CPU_KERNEL or a non-x86 CPU)"),
        ),
    }
}

fn memory(found: &mut Findings) {
    match runner_models::device::available_memory(&Device::Cpu) {
        Some(bytes) => found.add(
            "memory",
            if bytes < 1 << 30 {
                Status::Warn
            } else {
                Status::Ok
            },
            format!(
                "{} available to runner (MemAvailable, within its memory cgroup's limit)",
                gb(bytes)
            ),
        ),
        None => found.add("memory", Status::Skip, "cannot tell (no /proc/meminfo)"),
    }
}

fn open_device(request: &Request, found: &mut Findings) -> Option<Device> {
    match request.device.open() {
        Ok(device) => {
            let name = runner_models::device::describe(&device);
            let summary = match (&device, request.device) {
                (Device::Cpu, DeviceSpec::Auto) if cfg!(feature = "cuda") => {
                    // Say why: a library missing, the toolkit's stub, no GPU, an old driver.
                    match runner_models::device::cuda_unavailable(0) {
                        Some(why) => format!("{name} (auto: {why})"),
                        None => format!("{name} (auto: the GPU did not open; see the log)"),
                    }
                }
                (Device::Cpu, DeviceSpec::Auto) => format!("{name} (auto: built without CUDA)"),
                (Device::Cpu, _) => name,
                _ => {
                    let gpu = runner_models::device::gpu_identity(&device);
                    let memory = runner_models::device::memory_in_use(&device)
                        .map(|(used, total)| {
                            format!(", {} of {} free", gb(total - used), gb(total))
                        })
                        .unwrap_or_default();
                    format!(
                        "{name}: {}, compute capability {}, driver {}{memory}",
                        gpu.name.as_deref().unwrap_or("unknown GPU"),
                        gpu.compute_capability.as_deref().unwrap_or("?"),
                        gpu.driver_version.as_deref().unwrap_or("?"),
                    )
                }
            };
            found.add("device", Status::Ok, summary);
            Some(device)
        }
        // The error says what to do (rebuild, or pick another device).
        Err(e) => {
            found.add("device", Status::Fail, e.to_string());
            None
        }
    }
}

async fn model_checks(
    request: &Request,
    dir: &Path,
    device: Option<&Device>,
    found: &mut Findings,
) {
    let model_dir = match ModelDir::open(dir) {
        Ok(d) => d,
        Err(e) => {
            found.add("cog.yaml", Status::Fail, e.to_string());
            return;
        }
    };
    let train = model_dir
        .config
        .train
        .as_ref()
        .map(|t| format!(", train: {t}"))
        .unwrap_or_default();
    found.add(
        "cog.yaml",
        Status::Ok,
        format!("run: {}{train}", model_dir.config.run),
    );
    let python = matches!(
        if request.mode == Mode::Train {
            model_dir.config.train.as_ref()
        } else {
            Some(&model_dir.config.run)
        },
        Some(RunTarget::Python { .. })
    );
    let retake = match request.device {
        DeviceSpec::Auto => format!("runner snapshot {}", model_dir.root.display()),
        other => format!(
            "runner snapshot {} --device {other}",
            model_dir.root.display()
        ),
    };
    if python && !python_interpreter(request.python.as_deref(), found) {
        return;
    }
    // What serve builds before it loads anything: the signature (a Python predictor is
    // imported for it) and the OpenAPI document.
    let opened = {
        let (model_dir, device, mode, python, snapshot, progress) = (
            model_dir.clone(),
            request.device,
            request.mode,
            request.python.clone(),
            request.snapshot.clone(),
            request.progress.clone(),
        );
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            Engine::new(
                model_dir,
                device,
                EngineOptions {
                    mode,
                    python,
                    snapshot,
                    progress,
                    quantize: crate::QUANTIZE.get().cloned().flatten(),
                    ..Default::default()
                },
            )
            .map(|engine| (engine, started.elapsed()))
        })
        .await
    };
    let engine = match opened {
        Ok(Ok((engine, took))) => {
            let signature = engine.signature();
            let names: Vec<&str> = signature.inputs.iter().map(|i| i.name.as_str()).collect();
            let imported = if python {
                format!("; imported in {:.2}s", took.as_secs_f64())
            } else {
                String::new()
            };
            let openai = match engine.openai() {
                runner_models::OpenAi::None => "",
                runner_models::OpenAi::Embeddings => "; OpenAI-compatible: /v1/embeddings",
                runner_models::OpenAi::TextGeneration => {
                    "; OpenAI-compatible: /v1/chat/completions, /v1/completions, /v1/responses"
                }
            };
            found.add(
                "signature",
                Status::Ok,
                format!(
                    "{} input{} ({}){}{openai}{imported}",
                    names.len(),
                    if names.len() == 1 { "" } else { "s" },
                    names.join(", "),
                    if signature.streaming {
                        "; streams its output"
                    } else {
                        ""
                    },
                ),
            );
            engine
        }
        Ok(Err(e)) => {
            found.add("signature", Status::Fail, e.to_string());
            return;
        }
        Err(e) => {
            found.add(
                "signature",
                Status::Fail,
                format!("checking it panicked: {e}"),
            );
            return;
        }
    };
    if python {
        found.add(
            "weights",
            Status::Skip,
            "a Python predictor loads its own weights in setup()",
        );
    } else if !runner_models::architecture_for(&model_dir).is_ok_and(|a| a.needs_weights) {
        found.add(
            "weights",
            Status::Ok,
            format!(
                "none: {} computes without weights (nothing to snapshot)",
                model_dir.config.run
            ),
        );
    } else {
        weights(&engine, &model_dir, device, found);
        if let Some(device) = device {
            snapshot(request, &engine, device, &retake, found);
            if let Some(code) = runner_models::device::kernel_code(device) {
                kernel_cache(&model_dir, &code, found);
            }
        }
        snapshot_room(&engine, &model_dir, found);
    }
    if request.measure {
        measure(request, &engine, &model_dir, device, found);
    }
    if request.load {
        load(&engine, python, &retake, found).await;
    }
}

/// The interpreter answers and has the `cog` package; false when a predictor cannot run.
fn python_interpreter(explicit: Option<&Path>, found: &mut Findings) -> bool {
    const PROBE: &str = "import sys\nprint(sys.version.split()[0])\ntry:\n    import cog\n    print(getattr(cog, '__version__', 'unknown'))\nexcept Exception as e:\n    print('!' + type(e).__name__ + ': ' + str(e))\n";
    let python = runner_models::python::interpreter(explicit);
    let shown = python.display().to_string();
    let child = Command::new(&python)
        .args(["-c", PROBE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            found.add_fix(
                "python",
                Status::Fail,
                format!("cannot run {shown}: {e}"),
                "install Python 3 or point --python (RUNNER_PYTHON) at the interpreter of the model's environment",
            );
            return false;
        }
    };
    // An interpreter that hangs (a broken sitecustomize, say) is a finding, not a hang.
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
        found.add(
            "python",
            Status::Fail,
            format!("{shown} did not answer within 30 s"),
        );
        return false;
    }
    let output = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => {
            found.add("python", Status::Fail, format!("{shown}: {e}"));
            return false;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    let (Some(version), Some(cog)) = (lines.next(), lines.next()) else {
        found.add_fix(
            "python",
            Status::Fail,
            format!(
                "{shown} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            "point --python (RUNNER_PYTHON) at a working Python 3",
        );
        return false;
    };
    if let Some(error) = cog.strip_prefix('!') {
        found.add_fix(
            "python",
            Status::Fail,
            format!("{shown} (Python {version}) cannot import cog: {error}"),
            format!(
                "{shown} -m pip install cog==0.23.1, or point --python at the model's environment"
            ),
        );
        return false;
    }
    if cog.starts_with("0.23.") {
        found.add(
            "python",
            Status::Ok,
            format!("{shown}: Python {version}, cog {cog}"),
        );
    } else {
        found.add_fix(
            "python",
            Status::Warn,
            format!("{shown}: Python {version}, cog {cog}; runner is tested with cog 0.23.1"),
            format!("{shown} -m pip install cog==0.23.1"),
        );
    }
    true
}

fn weights(engine: &Engine, model_dir: &ModelDir, device: Option<&Device>, found: &mut Findings) {
    let Ok(architecture) = runner_models::architecture_for(model_dir) else {
        return;
    };
    let layout = &model_dir.weights;
    let files: Vec<&PathBuf> = layout.safetensors.iter().chain(&layout.gguf).collect();
    if files.is_empty() {
        found.add_fix(
            "weights",
            Status::Fail,
            format!("candle:{} needs weights, and cog.yaml's `weights:` finds no .safetensors or .gguf file", architecture.name),
            "put the weights in the model directory (e.g. weights/model.safetensors) and list their folder under `weights:`",
        );
        return;
    }
    let bytes = engine.weights_file_bytes();
    let checked = if layout.safetensors.is_empty() {
        layout
            .gguf
            .iter()
            .try_for_each(|g| runner_models::llama::open_gguf(g).map(drop))
            .map_err(|e| e.to_string())
    } else {
        runner_models::weights::CheckedWeights::open(layout)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let kind = if layout.safetensors.is_empty() {
        "GGUF"
    } else {
        "safetensors"
    };
    match checked {
        Ok(()) => found.add(
            "weights",
            Status::Ok,
            format!(
                "{} {kind} file{}, {}; headers and sizes check out{}",
                files.len(),
                if files.len() == 1 { "" } else { "s" },
                gb(bytes),
                engine
                    .quantize()
                    .map(|q| {
                        let held = runner_models::llama::isq::device_bytes(layout, q, false)
                            .map(|b| format!(", {} once quantized", gb(b)))
                            .unwrap_or_default();
                        format!("; quantized to {q} at load{held}")
                    })
                    .unwrap_or_default()
            ),
        ),
        Err(e) => {
            found.add_fix(
                "weights",
                Status::Fail,
                e,
                "copy the weights again (a download that stopped early leaves a short file)",
            );
            return;
        }
    }
    if let Some(device) = device {
        match runner_models::device::check_fits(device, bytes, "the weights") {
            Ok(()) => {}
            Err(e) => found.add("memory fit", Status::Fail, e),
        }
    }
}

/// Where `--snapshot` points for this device, if anywhere.
fn snapshot_path(request: &Request, engine: &Engine, device_kind: &str) -> Option<PathBuf> {
    match &request.snapshot.mode {
        SnapshotMode::Off => None,
        SnapshotMode::Path(p) => Some(p.clone()),
        SnapshotMode::Auto => Some(engine.default_snapshot_path(device_kind)),
    }
}

fn snapshot(
    request: &Request,
    engine: &Engine,
    device: &Device,
    retake: &str,
    found: &mut Findings,
) {
    let key = match engine.compat_key(device) {
        Ok(k) => k,
        Err(e) => {
            found.add("snapshot", Status::Fail, e);
            return;
        }
    };
    let unusable = if request.snapshot.require {
        Status::Fail
    } else {
        Status::Warn
    };
    let Some(path) = snapshot_path(request, engine, &key.device_kind) else {
        found.add(
            "snapshot",
            Status::Skip,
            "--snapshot off: serve loads the weights",
        );
        return;
    };
    if !path.exists() {
        found.add_fix(
            "snapshot",
            unusable,
            format!("none at {}: serve loads the weights cold", path.display()),
            format!(
                "{retake}, or serve once with --save-snapshot (later starts restore it instead)"
            ),
        );
        return;
    }
    let opened = runner_snapshot::Snapshot::open(&path).and_then(|s| {
        s.check_compatible(&key)?;
        Ok(s)
    });
    match opened {
        Ok(s) => {
            let fits = runner_models::device::check_fits(
                device,
                s.header.data_bytes,
                "the snapshot's tensors",
            );
            match fits {
                Ok(()) => found.add(
                    "snapshot",
                    Status::Ok,
                    format!(
                        "{}: compatible, {} tensors, {}; serve restores it (header and manifest checked; --load checks the data too)",
                        path.display(),
                        s.header.tensor_count,
                        gb(s.header.data_bytes)
                    ),
                ),
                Err(e) => found.add("snapshot", Status::Fail, e),
            }
        }
        Err(e) => found.add_fix(
            "snapshot",
            unusable,
            format!("serve would not use it ({e}) and would load the weights cold"),
            format!("{retake}, or serve once with --save-snapshot"),
        ),
    }
}

/// candle's kernels are machine code for the GPU the build was made for; on any other,
/// the driver compiles their PTX on first use unless its kernel cache has them.
fn kernel_cache(
    model_dir: &ModelDir,
    code: &runner_models::device::KernelCode,
    found: &mut Findings,
) {
    if code.machine_code {
        found.add(
            "kernels",
            Status::Ok,
            format!("{code}: nothing to compile at start"),
        );
        return;
    }
    let cache = std::env::var_os("CUDA_CACHE_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| model_dir.root.join(".runner").join("cuda-kernel-cache"));
    let bytes = dir_bytes(&cache);
    if bytes == 0 {
        found.add_fix(
            "kernel cache",
            Status::Warn,
            format!(
                "{} is empty: the first start compiles candle's CUDA kernels (seconds); they reach this GPU as {code}",
                cache.display()
            ),
            format!("runner snapshot {} fills it", model_dir.root.display()),
        );
    } else {
        found.add(
            "kernel cache",
            Status::Ok,
            format!(
                "{}: {:.1} MB of compiled kernels",
                cache.display(),
                bytes as f64 / 1e6
            ),
        );
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// A snapshot is written beside the model: the folder must be writable and have room.
fn snapshot_room(engine: &Engine, model_dir: &ModelDir, found: &mut Findings) {
    let folder = model_dir.root.join(".runner");
    let probe_at = if folder.exists() {
        folder.clone()
    } else {
        model_dir.root.clone()
    };
    let writable = tempfile::tempfile_in(&probe_at).is_ok();
    let free = free_bytes(&probe_at);
    // A snapshot holds the tensors as loaded: about the weights' size (less when they are
    // converted to a smaller dtype).
    let needed = engine.weights_file_bytes();
    let free_text = free.map_or(String::new(), |f| format!("{} free", gb(f)));
    if !writable {
        found.add_fix(
            "snapshot room",
            Status::Warn,
            format!(
                "{} is not writable: `runner snapshot` cannot write beside the model",
                probe_at.display()
            ),
            "write it elsewhere with `runner snapshot -o PATH` and serve with `--snapshot PATH`",
        );
    } else if free.is_some_and(|f| f < needed) {
        found.add_fix(
            "snapshot room",
            Status::Warn,
            format!(
                "{}: {free_text}, a snapshot needs about {}",
                folder.display(),
                gb(needed)
            ),
            "free disk space, or write the snapshot elsewhere with `runner snapshot -o PATH`",
        );
    } else {
        found.add(
            "snapshot room",
            Status::Ok,
            format!("{}: writable, {free_text}", folder.display()),
        );
    }
}

fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct statvfs fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn measure(
    request: &Request,
    engine: &Engine,
    model_dir: &ModelDir,
    device: Option<&Device>,
    found: &mut Findings,
) {
    // The file a start reads: the snapshot when there is one, else the largest weights.
    let snapshot = device
        .and_then(|d| engine.compat_key(d).ok())
        .and_then(|k| snapshot_path(request, engine, &k.device_kind))
        .filter(|p| p.exists());
    let file = snapshot.or_else(|| {
        model_dir
            .weights
            .safetensors
            .iter()
            .chain(&model_dir.weights.gguf)
            .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .cloned()
    });
    match file {
        Some(file) => match crate::bench::page_cache_read_bandwidth(&file) {
            Ok(bps) => found.add(
                "read bandwidth",
                Status::Ok,
                format!(
                    "{:.2} GB/s from the page cache ({}): a CPU restore's ceiling",
                    bps / 1e9,
                    file.display()
                ),
            ),
            Err(e) => found.add(
                "read bandwidth",
                Status::Fail,
                format!("{}: {e}", file.display()),
            ),
        },
        None => found.add(
            "read bandwidth",
            Status::Skip,
            "no weights or snapshot to read",
        ),
    }
    if let Some(device) = device {
        match runner_snapshot::pinned_h2d_bandwidth(device) {
            Some(Ok(bps)) => found.add(
                "pinned h2d",
                Status::Ok,
                format!(
                    "{:.2} GB/s host to device: a GPU restore's ceiling",
                    bps / 1e9
                ),
            ),
            Some(Err(e)) => found.add("pinned h2d", Status::Fail, e.to_string()),
            None => {}
        }
    }
}

/// Sets the model up as serve would: from the snapshot serve would use, else the weights,
/// then the warm-up prediction.
async fn load(engine: &Arc<Engine>, python: bool, retake: &str, found: &mut Findings) {
    let loaded = match engine.setup().await {
        Ok(loaded) => loaded,
        Err(e) => {
            found.add("load", Status::Fail, e);
            return;
        }
    };
    // A snapshot whose metadata checked out may still fail on its data: serve then loads
    // the weights, and the snapshot finding must say so.
    let (_, setup) = engine.health();
    let skipped = setup
        .logs
        .lines()
        .find_map(|l| l.strip_prefix("snapshot not used, loading the weights instead: "));
    if let (Some(why), Some(finding)) =
        (skipped, found.0.iter_mut().find(|f| f.check == "snapshot"))
    {
        finding.status = Status::Warn;
        finding.summary = format!("serve would not use it ({why}) and would load the weights cold");
        finding.fix = Some(retake.to_string());
    }
    let phases: Vec<String> = loaded
        .phases
        .iter()
        .map(|(name, t)| format!("{name} {:.3}s", t.as_secs_f64()))
        .collect();
    found.add(
        "load",
        Status::Ok,
        format!(
            "{} in {:.3}s ({})",
            match (python, loaded.weights_source) {
                (true, _) => "the predictor's setup() ran".to_string(),
                (false, "none") => format!("set up on {}", loaded.device),
                (false, source) => format!("set up on {} from {source}", loaded.device),
            },
            loaded.setup_time.as_secs_f64(),
            phases.join(", ")
        ),
    );
}

fn port(request: &Request, found: &mut Findings) {
    if request.port == 0 {
        found.add("port", Status::Skip, "--port 0: serve picks a free one");
        return;
    }
    let address = format!("{}:{}", request.host, request.port);
    match TcpListener::bind(&address) {
        Ok(_) => found.add("port", Status::Ok, format!("{address} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => found.add_fix(
            "port",
            Status::Fail,
            format!("{address} is in use: another server listens there"),
            "stop it, or serve on another port with --port (RUNNER_PORT)",
        ),
        Err(e) => found.add_fix(
            "port",
            Status::Fail,
            format!("cannot listen on {address}: {e}"),
            "check --host (RUNNER_HOST): an address of this machine, 127.0.0.1 or 0.0.0.0",
        ),
    }
}
