//! `runner package`: one model directory, deployable on Replicate (as a Cog image) and on
//! Modal (with GPU memory snapshots), served by the same runner binary.
//!
//! Packaging is two steps. [`plan`] decides every file's bytes (or the file to copy) from
//! the model directory, its signature and the runner binary, and never touches the disk
//! beyond reading. [`write`] puts the plan in a folder atomically (a temporary sibling,
//! renamed at the end) and writes `runner-package.json`, the sha256 of every file. The
//! output is deterministic: sorted keys, no timestamps, same bytes for the same inputs.

mod gpu;
mod predictor;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use runner_spec::{ModelDir, Signature};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

pub use gpu::{Gpu, Price, GPUS, HEADROOM_GB, PRICES, PRICES_RECORDED};
pub use runner_spec::cuda_arch::KernelTargets;
use runner_spec::cuda_arch::{too_old, Support, MIN_CAPABILITY};

/// The Cog CLI release whose `cog push` flags the Replicate package uses.
pub const COG_CLI_VERSION: &str = "0.23.1";
/// The modal client release whose API `modal_app.py` is written against.
pub const MODAL_CLIENT_VERSION: &str = "1.6.4";
/// CUDA runtime images matching the CUDA 13.0 toolkit runner's `cuda` feature builds with.
pub const CUDA_BASE_IMAGE: &str = "nvidia/cuda:13.0.2-runtime-ubuntu24.04";
/// CPU-only images: Python (for the launcher and `pip freeze`) on the glibc runner needs.
pub const CPU_BASE_IMAGE: &str = "python:3.12-slim-bookworm";
/// The Python version the packaged `cog.yaml` declares (Cog needs ≥ 3.11 for concurrency).
pub const PYTHON_VERSION: &str = "3.12";
/// The manifest's file name.
pub const MANIFEST: &str = "runner-package.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Replicate,
    Modal,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Replicate => "replicate",
            Target::Modal => "modal",
        })
    }
}

/// How a Replicate package is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicateMode {
    /// A Dockerfile whose image runs runner directly behind Cog's command line.
    Image,
    /// A standard Cog project whose predictor forwards to runner on localhost, for when a
    /// custom Dockerfile is not an option.
    Predictor,
}

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("--gpu {name}: {target} offers no GPU by that name; choose one of: {choices}")]
    UnknownGpu {
        name: String,
        target: Target,
        choices: String,
    },
    #[error("the weights ({weights_gb:.1} GB) need about {need_gb:.0} GB of GPU memory, more than any single GPU {target} offers (largest: {largest}); runner does not split a model across GPUs yet")]
    TooLarge {
        weights_gb: f64,
        need_gb: f64,
        target: Target,
        largest: String,
    },
    #[error("--name {0:?}: use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit")]
    BadName(String),
    #[error("{}: already exists; pass --force to replace it, or choose another --out", .0.display())]
    OutputExists(PathBuf),
    #[error("--out {}: it is inside the model directory {}; runner package never writes into the model directory, choose a folder outside it", out.display(), model.display())]
    OutputInsideModel { out: PathBuf, model: PathBuf },
    #[error("--out {}: it holds the model directory {}; choose a folder that does not contain it", out.display(), model.display())]
    OutputContainsModel { out: PathBuf, model: PathBuf },
    #[error("--runner-bin {}: {reason}", path.display())]
    RunnerBinary { path: PathBuf, reason: String },
    #[error("--gpu: {reason}; choose one of: --gpu {others}")]
    GpuTooOld { reason: String, others: String },
    #[error("--runner-bin {}: on the {gpu} it would fail at setup: {reason}{others}", path.display())]
    GpuCannotRunKernels {
        path: PathBuf,
        gpu: &'static str,
        reason: String,
        /// ", or choose a GPU it runs on: …" where the target offers one.
        others: String,
    },
    #[error("cannot package this model as a standard Cog project: {0}")]
    Unsupported(String),
    #[error("`run: {0}` is a Python Cog predictor, which is a Cog model already: push it to Replicate with `cog push`; `runner package --target modal` packages it for Modal")]
    PythonForReplicate(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What is known about the runner binary that goes into the package.
#[derive(Debug, Clone)]
pub struct RunnerBinary {
    pub path: PathBuf,
    /// `runner --version`'s line, when the binary could be run.
    pub version: Option<String>,
    /// Built with the `cuda` feature, when the version line says.
    pub cuda: Option<bool>,
    /// The GPU architecture its CUDA kernels were built for, when the version line says.
    pub kernels: Option<KernelTargets>,
}

impl RunnerBinary {
    /// Reads the ELF header: the clouds run Linux on x86-64.
    pub fn check_linux_x86_64(&self) -> Result<(), PackageError> {
        let fail = |reason: String| PackageError::RunnerBinary {
            path: self.path.clone(),
            reason,
        };
        let mut header = [0u8; 20];
        std::fs::File::open(&self.path)
            .and_then(|mut f| f.read_exact(&mut header))
            .map_err(|e| fail(format!("cannot read it ({e})")))?;
        if &header[..4] != b"\x7fELF" {
            return Err(fail(
                "not a Linux executable; Replicate and Modal run Linux x86-64 binaries".into(),
            ));
        }
        let machine = u16::from_le_bytes([header[18], header[19]]);
        if header[4] != 2 || header[5] != 1 || machine != 0x3e {
            return Err(fail(
                "not an x86-64 Linux executable; build runner for x86_64-unknown-linux-gnu".into(),
            ));
        }
        Ok(())
    }
}

/// Start times measured by `runner bench --cold-start`, to price a cold start.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSummary {
    pub cold_ready_seconds: f64,
    pub snapshot_ready_seconds: Option<f64>,
    pub machine: String,
    pub device: String,
}

impl BenchSummary {
    /// Reads the JSON report `runner bench --cold-start` writes.
    pub fn from_report(report: &Value) -> Option<Self> {
        let median = |mode: &str| {
            report["modes"]
                .as_array()?
                .iter()
                .find(|m| m["mode"].as_str().is_some_and(|s| s.starts_with(mode)))?["ready_seconds"]
                ["median"]
                .as_f64()
        };
        Some(BenchSummary {
            cold_ready_seconds: median("cold")?,
            snapshot_ready_seconds: median("snapshot"),
            machine: report["machine"].as_str().unwrap_or("unknown").to_string(),
            device: report["device"].as_str().unwrap_or("unknown").to_string(),
        })
    }
}

/// Everything `plan` needs.
pub struct Request<'a> {
    pub model: &'a ModelDir,
    pub signature: &'a Signature,
    /// The bytes runner serves at `/openapi.json`.
    pub openapi_json: &'a str,
    pub target: Target,
    pub replicate_mode: ReplicateMode,
    /// `--gpu`: a GPU name, or `cpu`.
    pub gpu: Option<&'a str>,
    pub name: Option<&'a str>,
    pub runner: &'a RunnerBinary,
    pub bench: Option<&'a BenchSummary>,
    pub base_image: Option<&'a str>,
    /// The OpenAI-compatible routes the model answers (empty: none).
    pub openai_routes: &'a [&'a str],
}

/// Where the package runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hardware {
    Cpu,
    Gpu(&'static Gpu),
}

impl Hardware {
    pub fn describe(&self, target: Target) -> String {
        match (self, target) {
            (Hardware::Cpu, Target::Replicate) => format!("CPU ({})", gpu::REPLICATE_CPU_SKU),
            (Hardware::Cpu, Target::Modal) => "CPU".into(),
            (Hardware::Gpu(g), Target::Replicate) => {
                format!("{} ({})", g.name, g.replicate_sku.unwrap_or("?"))
            }
            (Hardware::Gpu(g), Target::Modal) => g.name.to_string(),
        }
    }
}

/// One file of the package.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Bytes(Vec<u8>),
    /// Copied from this file as it is (weights, the runner binary).
    Copy(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedFile {
    pub content: Content,
    pub executable: bool,
}

/// A package, decided but not yet written.
#[derive(Debug)]
pub struct Plan {
    pub target: Target,
    pub name: String,
    pub hardware: Hardware,
    pub weights_bytes: u64,
    /// Relative path (with `/`) → content.
    pub files: BTreeMap<String, PlannedFile>,
    /// What the user should know (a CPU-only binary for a GPU, ...).
    pub warnings: Vec<String>,
    /// Next steps and the cost table, as printed and as written to README.md.
    pub guidance: String,
}

/// Fills `{{key}}` placeholders. Every placeholder must be given: a template that still
/// holds one is a bug, caught by the tests.
pub(crate) fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (key, value) in values {
        out = out.replace(&format!("{{{{{key}}}}}"), value);
    }
    debug_assert!(
        !out.contains("{{"),
        "a placeholder was left unfilled: {out}"
    );
    out
}

/// A name as both clouds accept it.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// The default name: cog.yaml's `model:` (its last segment), else the directory's name,
/// lowercased with anything else turned into '-'.
fn default_name(model: &ModelDir) -> String {
    let raw = model
        .config
        .model
        .as_deref()
        .and_then(|m| m.rsplit('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| model.name());
    let cleaned: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "model".into()
    } else {
        trimmed.to_string()
    }
}

/// The GPU the package runs on (`--gpu`, or the smallest that holds the weights and that
/// runner can use with this binary), and a note where the binary's kernels ruled smaller
/// GPUs out. `runner_computes`: runner runs the model on the GPU itself (not a Python
/// predictor), so the GPU must support bf16; `kernels`, the binary's targets where known
/// and runner computes, must run on it.
fn choose_hardware(
    req: &Request,
    weights_bytes: u64,
    runner_computes: bool,
    kernels: Option<&KernelTargets>,
) -> Result<(Hardware, Option<String>), PackageError> {
    let target = req.target;
    let choices = || {
        let mut names: Vec<&str> = gpu::offered(target).map(|g| g.name).collect();
        names.push("cpu");
        names.join(", ")
    };
    let new_enough = |g: &Gpu| !runner_computes || g.compute_capability >= MIN_CAPABILITY;
    let kernels_run =
        |g: &Gpu| kernels.is_none_or(|k| k.support(g.compute_capability) != Support::None);
    let usable = |g: &Gpu| new_enough(g) && kernels_run(g);
    let usable_names = || -> String {
        let names: Vec<&str> = gpu::offered(target)
            .filter(|g| usable(g))
            .map(|g| g.name)
            .collect();
        names.join(" | ")
    };
    let kernels_refusal = |g: &Gpu| {
        kernels
            .and_then(|k| k.refusal(&format!("the {}", g.name), g.compute_capability))
            .unwrap_or_default()
    };
    match req.gpu {
        Some(name) if name.eq_ignore_ascii_case("cpu") => Ok((Hardware::Cpu, None)),
        Some(name) => {
            let gpu = gpu::find(target, name).ok_or_else(|| PackageError::UnknownGpu {
                name: name.to_string(),
                target,
                choices: choices(),
            })?;
            if !new_enough(gpu) {
                return Err(PackageError::GpuTooOld {
                    reason: too_old(&format!("the {}", gpu.name), gpu.compute_capability)
                        .unwrap_or_default(),
                    others: usable_names(),
                });
            }
            if !kernels_run(gpu) {
                let others = usable_names();
                return Err(PackageError::GpuCannotRunKernels {
                    path: req.runner.path.clone(),
                    gpu: gpu.name,
                    reason: kernels_refusal(gpu),
                    others: if others.is_empty() {
                        String::new()
                    } else {
                        format!(", or choose a GPU it runs on: --gpu {others}")
                    },
                });
            }
            Ok((Hardware::Gpu(gpu), None))
        }
        None if req.model.config.gpu => {
            let too_large = || PackageError::TooLarge {
                weights_gb: weights_bytes as f64 / 1e9,
                need_gb: gpu::required_gb(weights_bytes),
                target,
                largest: gpu::offered(target)
                    .last()
                    .map(|g| format!("{} with {} GB", g.name, g.memory_gb))
                    .unwrap_or_default(),
            };
            // The smallest GPU runner could use, and the smallest this binary runs on.
            let smallest =
                gpu::smallest_fitting(target, weights_bytes, new_enough).ok_or_else(too_large)?;
            let chosen = gpu::smallest_fitting(target, weights_bytes, usable).ok_or_else(|| {
                PackageError::GpuCannotRunKernels {
                    path: req.runner.path.clone(),
                    gpu: smallest.name,
                    reason: kernels_refusal(smallest),
                    others: String::new(),
                }
            })?;
            let note = (chosen != smallest).then(|| {
                let (major, minor) = smallest.compute_capability;
                format!(
                    "the {} is the smallest {target} GPU that holds the weights and that runner supports, but {}'s CUDA kernels do not run on it (compute capability {major}.{minor}); packaged for the {} instead (build runner with CUDA_COMPUTE_CAP={major}{minor} to run on the {})",
                    smallest.name,
                    req.runner.path.display(),
                    chosen.name,
                    smallest.name
                )
            });
            Ok((Hardware::Gpu(chosen), note))
        }
        None => Ok((Hardware::Cpu, None)),
    }
}

fn relative_to_root(model: &ModelDir, file: &Path) -> String {
    file.strip_prefix(&model.root)
        .unwrap_or(file)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Every file of a Python predictor's directory, sorted, but hidden entries (`.git`,
/// `.runner`, `.cog`), `__pycache__` and compiled Python.
fn source_files(root: &Path) -> Result<Vec<PathBuf>, PackageError> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "__pycache__" || name.ends_with(".pyc") {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err(&path))?;
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// A Python string literal (JSON's escapes are Python's for these strings).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// The image's environment: unbuffered Python, and cog.yaml's `environment:`.
fn image_env(req: &Request) -> String {
    let mut entries = vec![(py_str("PYTHONUNBUFFERED"), py_str("1"))];
    for (k, v) in &req.model.config.environment {
        entries.push((py_str(k), py_str(v)));
    }
    let body = entries
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{{{body}}}")
}

/// Modal's image steps for a Python predictor, from cog.yaml's `build:`.
fn python_image(req: &Request) -> Result<String, PackageError> {
    let build = &req.model.config.build;
    let version = build.python_version.as_deref().unwrap_or(PYTHON_VERSION);
    let mut steps = match req.base_image {
        Some(b) => format!(
            "modal.Image.from_registry({}, add_python={})",
            py_str(b),
            py_str(version)
        ),
        None => format!(
            "modal.Image.debian_slim(python_version={})",
            py_str(version)
        ),
    };
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| py_str(i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !build.system_packages.is_empty() {
        steps += &format!("\n    .apt_install({})", list(&build.system_packages));
    }
    let mut packages = vec![format!("cog=={}", runner_spec::COG_VERSION)];
    packages.extend(build.python_packages.iter().cloned());
    steps += &format!("\n    .pip_install({})", list(&packages));
    if let Some(requirements) = &build.python_requirements {
        let file = req.model.root.join(requirements);
        if !file.is_file() {
            return Err(PackageError::Unsupported(format!(
                "build.python_requirements names {requirements}, which is not in {}",
                req.model.root.display()
            )));
        }
        let rel = relative_to_root(req.model, &file);
        steps += &format!(
            "\n    .pip_install_from_requirements(str(HERE / \"model\" / {}))",
            py_str(&rel)
        );
    }
    if !build.run.is_empty() {
        steps += &format!("\n    .run_commands({})", list(&build.run));
    }
    Ok(steps)
}

/// Seconds runner may take to load the model before a platform gives up on it: generous,
/// scaled by the weights (a slow network disk reads ~100 MB/s).
fn startup_timeout_seconds(weights_bytes: u64) -> u64 {
    (300 + weights_bytes / 100_000_000).min(3600)
}

pub fn plan(req: &Request) -> Result<Plan, PackageError> {
    let name = match req.name {
        Some(n) if valid_name(n) => n.to_string(),
        Some(n) => return Err(PackageError::BadName(n.to_string())),
        None => default_name(req.model),
    };
    req.runner.check_linux_x86_64()?;

    let mut files = BTreeMap::new();
    let mut add = |path: &str, content: Content, executable: bool| {
        files.insert(
            path.to_string(),
            PlannedFile {
                content,
                executable,
            },
        );
    };

    // The model directory as runner reads it: cog.yaml and the files its weights name.
    add(
        "model/cog.yaml",
        Content::Copy(req.model.config.path.clone()),
        false,
    );
    let mut weights_bytes = 0;
    for file in &req.model.weights.files {
        let meta = std::fs::metadata(file).map_err(io_err(file))?;
        weights_bytes += meta.len();
        add(
            &format!("model/{}", relative_to_root(req.model, file)),
            Content::Copy(file.clone()),
            false,
        );
    }
    let python = matches!(req.model.config.run, runner_spec::RunTarget::Python { .. });
    if python {
        if req.target == Target::Replicate {
            return Err(PackageError::PythonForReplicate(
                req.model.config.run.to_string(),
            ));
        }
        // The predictor's source beside its weights, as Cog copies the directory into its
        // image (hidden entries and Python caches left out).
        for file in source_files(&req.model.root)? {
            let rel = relative_to_root(req.model, &file);
            add(&format!("model/{rel}"), Content::Copy(file), false);
        }
    }
    add("bin/runner", Content::Copy(req.runner.path.clone()), true);
    add(
        "openapi.json",
        Content::Bytes(req.openapi_json.as_bytes().to_vec()),
        false,
    );

    // A Python predictor uses the GPU itself; runner only serves it.
    let kernels = req.runner.kernels.as_ref().filter(|_| !python);
    let (hardware, hardware_note) = choose_hardware(req, weights_bytes, !python, kernels)?;
    let mut warnings: Vec<String> = hardware_note.into_iter().collect();
    if let Some(train) = &req.model.config.train {
        // The package carries runner, not a Python environment for the training function.
        warnings.push(format!(
            "cog.yaml's `train: {train}` is not packaged: the package serves predictions only (its `--x-mode train` is refused); run trainings with `runner serve --mode train`"
        ));
    }
    if let Hardware::Gpu(g) = hardware {
        let need = gpu::required_gb(weights_bytes);
        if g.memory_gb < need {
            warnings.push(format!(
                "{} has {} GB; the weights need about {need:.0} GB: choose a larger --gpu",
                g.name, g.memory_gb
            ));
        }
        match req.runner.cuda {
            // A Python predictor uses the GPU itself; runner only serves it.
            _ if python => {}
            Some(true) => match kernels {
                Some(k) => warnings.extend(k.refusal(&format!("the {}", g.name), g.compute_capability)),
                None => warnings.push(format!(
                    "could not tell which GPUs {}'s CUDA kernels were built for (`--version` did not say); if they were not built for the {} (compute capability {}.{}: CUDA_COMPUTE_CAP={}{}), the package fails at setup",
                    req.runner.path.display(),
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.compute_capability.0,
                    g.compute_capability.1
                )),
            },
            Some(false) => warnings.push(format!(
                "{} was built without CUDA, so on the {} it would run on the CPU. Build the CUDA binary (`cargo build --release --features cuda -p runner-cli`, with the CUDA 13 toolkit) and pass it with --runner-bin target/release/runner",
                req.runner.path.display(),
                g.name
            )),
            None => warnings.push(format!(
                "could not tell whether {} was built with CUDA (`--version` did not say); a GPU package needs a binary built with `--features cuda`",
                req.runner.path.display()
            )),
        }
    }
    let concurrency = req.model.config.concurrency_max.unwrap_or(1).max(1);
    let startup_timeout = startup_timeout_seconds(weights_bytes);
    match req.target {
        Target::Replicate => {
            let sku = match hardware {
                Hardware::Cpu => gpu::REPLICATE_CPU_SKU,
                Hardware::Gpu(g) => g.replicate_sku.expect("only offered GPUs are chosen"),
            };
            let is_gpu = matches!(hardware, Hardware::Gpu(_));
            let predictor_concurrency = match req.replicate_mode {
                ReplicateMode::Image => concurrency,
                ReplicateMode::Predictor => {
                    if concurrency > 1 {
                        warnings.push(format!(
                            "cog.yaml asks for concurrency.max {concurrency}; a standard Cog project with a synchronous predictor runs one prediction at a time, so the package declares 1 (use --replicate-mode image to keep {concurrency})"
                        ));
                    }
                    if is_gpu {
                        warnings.push("in a standard Cog project, Cog chooses the CUDA base image; runner's CUDA binary needs the CUDA 13 runtime libraries (libcublas, libcurand) in it".into());
                    }
                    1
                }
            };
            add(
                "cog.yaml",
                Content::Bytes(
                    replicate_cog_yaml(&name, is_gpu, predictor_concurrency).into_bytes(),
                ),
                false,
            );
            add(
                "predict.py",
                Content::Bytes(
                    predictor::predict_py(&name, req.signature, startup_timeout)?.into_bytes(),
                ),
                false,
            );
            let push_command = match req.replicate_mode {
                ReplicateMode::Image => "cog push --dockerfile Dockerfile --openapi-schema openapi.json \"r8.im/$OWNER/$NAME\"",
                ReplicateMode::Predictor => "cog push --openapi-schema openapi.json \"r8.im/$OWNER/$NAME\"",
            };
            add(
                "push.sh",
                Content::Bytes(
                    fill(
                        include_str!("../templates/push.sh.tmpl"),
                        &[
                            ("verify_manifest", &verify_manifest("push")),
                            ("name", &name),
                            ("cog_version", COG_CLI_VERSION),
                            ("hardware", sku),
                            ("push_command", push_command),
                        ],
                    )
                    .into_bytes(),
                ),
                true,
            );
            add(
                "replicate-model.json",
                Content::Bytes(json_file(&json!({
                    "description": format!("{name}, served by runner"),
                    "hardware": sku,
                    "name": "<name>",
                    "owner": "<owner>",
                    "visibility": "private",
                }))),
                false,
            );
            add(
                "replicate-deployment.json",
                Content::Bytes(json_file(&json!({
                    "hardware": sku,
                    "max_instances": 1,
                    "min_instances": 0,
                    "model": "<owner>/<name>",
                    "name": name,
                    "version": "<the version id `cog push` printed>",
                }))),
                false,
            );
            if req.replicate_mode == ReplicateMode::Image {
                let base = req.base_image.unwrap_or(if is_gpu {
                    CUDA_BASE_IMAGE
                } else {
                    CPU_BASE_IMAGE
                });
                // CUDA images come without Python; Cog's command line needs `python`.
                let install_python = if base.starts_with("python:") {
                    "# Python and pip come with the base image.".to_string()
                } else {
                    "RUN apt-get update \\\n && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 ca-certificates \\\n && rm -rf /var/lib/apt/lists/*".to_string()
                };
                add(
                    "Dockerfile",
                    Content::Bytes(
                        fill(
                            include_str!("../templates/Dockerfile.tmpl"),
                            &[
                                ("name", &name),
                                ("base_image", base),
                                ("install_python", &install_python),
                            ],
                        )
                        .into_bytes(),
                    ),
                    false,
                );
                add(
                    "cog/__init__.py",
                    Content::Bytes(
                        b"\"\"\"runner's stand-in for Cog's package: only `python -m cog.server.http`.\"\"\"\n"
                            .to_vec(),
                    ),
                    false,
                );
                add("cog/server/__init__.py", Content::Bytes(Vec::new()), false);
                add(
                    "cog/server/http.py",
                    Content::Bytes(include_bytes!("../templates/launcher.py.tmpl").to_vec()),
                    false,
                );
            }
        }
        Target::Modal => {
            let (gpu_literal, mut device, gpu_snapshot_option, snapshot_kind, mut image_base) =
                match hardware {
                    Hardware::Gpu(g) => (
                        format!("\"{}\"", g.name),
                        "cuda",
                        "    experimental_options={\"enable_gpu_snapshot\": True},\n",
                        "CPU and GPU memory",
                        format!(
                            "modal.Image.from_registry(\"{}\", add_python=\"{PYTHON_VERSION}\")",
                            req.base_image.unwrap_or(CUDA_BASE_IMAGE)
                        ),
                    ),
                    Hardware::Cpu => (
                        "None".to_string(),
                        "cpu",
                        "",
                        "CPU memory",
                        match req.base_image {
                            Some(b) => format!(
                                "modal.Image.from_registry(\"{b}\", add_python=\"{PYTHON_VERSION}\")"
                            ),
                            None => format!("modal.Image.debian_slim(python_version=\"{PYTHON_VERSION}\")"),
                        },
                    ),
                };
            let mut serve_args = String::new();
            if python {
                let build = &req.model.config.build;
                if !build.secret_mounts.is_empty() {
                    warnings.push(format!(
                        "cog.yaml's build.run mounts build secrets ({}); Modal's image build does not get them: pass them with modal.Secret in modal_app.py",
                        build.secret_mounts.join(", ")
                    ));
                }
                if req.gpu.is_none() && matches!(hardware, Hardware::Gpu(_)) {
                    warnings.push(
                        "a Python predictor's GPU memory is its own business: the smallest GPU was chosen; pass --gpu NAME for the one it needs".into(),
                    );
                }
                // The Python environment cog.yaml's `build:` describes, with Cog's package
                // for the predictor; runner itself stays on the CPU.
                image_base = python_image(req)?;
                device = "cpu";
                serve_args = ", \"--python\", \"python\"".into();
            }
            add(
                "modal_app.py",
                Content::Bytes(
                    fill(
                        include_str!("../templates/modal_app.py.tmpl"),
                        &[
                            ("serve_args", &serve_args),
                            ("env", &image_env(req)),
                            ("name", &name),
                            ("gpu_literal", &gpu_literal),
                            ("concurrency", &concurrency.to_string()),
                            ("startup_timeout", &startup_timeout.to_string()),
                            ("image_base", &image_base),
                            ("gpu_snapshot_option", gpu_snapshot_option),
                            ("snapshot_kind", snapshot_kind),
                            ("device", device),
                        ],
                    )
                    .into_bytes(),
                ),
                false,
            );
            add(
                "deploy.sh",
                Content::Bytes(
                    fill(
                        include_str!("../templates/deploy.sh.tmpl"),
                        &[
                            ("verify_manifest", &verify_manifest("deploy")),
                            ("name", &name),
                            ("modal_version", MODAL_CLIENT_VERSION),
                        ],
                    )
                    .into_bytes(),
                ),
                true,
            );
        }
    }

    let guidance = guidance(req, &name, hardware, weights_bytes);
    add(
        "README.md",
        Content::Bytes(guidance.clone().into_bytes()),
        false,
    );
    Ok(Plan {
        target: req.target,
        name,
        hardware,
        weights_bytes,
        files,
        warnings,
        guidance,
    })
}

fn verify_manifest(tool: &str) -> String {
    fill(
        include_str!("../templates/verify-manifest.sh.tmpl"),
        &[("tool", tool)],
    )
    .trim_end()
    .to_string()
}

/// JSON as the package writes it: sorted keys, two-space indent, trailing newline.
fn json_file(value: &Value) -> Vec<u8> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let ordered: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(
                    ordered
                        .into_iter()
                        .map(|(k, v)| (k.clone(), v))
                        .collect::<Map<_, _>>(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let mut out = serde_json::to_vec_pretty(&sorted(value)).expect("JSON");
    out.push(b'\n');
    out
}

/// Cog's view of the package: the keys Cog validates, with a predictor of the form Cog
/// requires. runner's own cog.yaml (with `run: candle:...`) is model/cog.yaml.
fn replicate_cog_yaml(name: &str, gpu: bool, concurrency: u32) -> String {
    let mut y = format!(
        "# {name} for Cog and Replicate, written by `runner package --target replicate`.\n# runner serves the model from model/ (its own cog.yaml is model/cog.yaml).\nbuild:\n  gpu: {gpu}\n  python_version: \"{PYTHON_VERSION}\"\npredict: \"predict.py:Predictor\"\n"
    );
    if concurrency > 1 {
        y.push_str(&format!("concurrency:\n  max: {concurrency}\n"));
    }
    y
}

fn guidance(req: &Request, name: &str, hardware: Hardware, weights_bytes: u64) -> String {
    let mut g = format!("# {name}: packaged by runner for {}\n\n", req.target);
    g.push_str(&format!(
        "Weights: {:.2} GB, needing about {:.1} GB of GPU memory (weights × 1.2 + {HEADROOM_GB} GB). Hardware: {}.\n\n",
        weights_bytes as f64 / 1e9,
        gpu::required_gb(weights_bytes),
        hardware.describe(req.target)
    ));
    g.push_str("## Next steps\n\n");
    match (req.target, req.replicate_mode) {
        (Target::Replicate, ReplicateMode::Image) => g.push_str(&format!(
            "1. Install Docker and the Cog CLI {COG_CLI_VERSION}.\n2. `./push.sh OWNER/NAME` builds the image from `Dockerfile` and pushes it to r8.im/OWNER/NAME (with `REPLICATE_API_TOKEN` set, it creates the model first from `replicate-model.json`).\n3. For dedicated hardware, put the pushed version's id into `replicate-deployment.json` and POST it to https://api.replicate.com/v1/deployments.\n\nTry the image locally first: `docker build -t {name} . && docker run --rm -p 5000:5000 {name}`, then `curl -s localhost:5000/openapi.json`.\n"
        )),
        (Target::Replicate, ReplicateMode::Predictor) => g.push_str(&format!(
            "1. Install Docker and the Cog CLI {COG_CLI_VERSION}.\n2. `cog predict -i name=value` tries it locally; `predict.py` starts runner from `bin/runner` and forwards each prediction to it.\n3. `./push.sh OWNER/NAME` pushes it to r8.im/OWNER/NAME; deployments as in `replicate-deployment.json`.\n"
        )),
        (Target::Modal, _) => g.push_str(&format!(
            "1. `python3 -m pip install modal=={MODAL_CLIENT_VERSION} && python3 -m modal setup` (once).\n2. `./deploy.sh` deploys `modal_app.py`; the URL it prints answers Cog's HTTP API.\n3. The first start loads the weights and Modal takes a memory snapshot; later cold starts restore it.\n"
        )),
    }
    if req.target == Target::Modal && !req.openai_routes.is_empty() {
        g.push_str(&format!(
            "\nThe same URL answers OpenAI's SDKs ({}): `OpenAI(base_url=URL + \"/v1\", api_key=...)`.\n",
            req.openai_routes.join(", ")
        ));
    }
    g.push_str(&format!(
        "\n## What a start costs\n\nPer-second prices as published in 2026 (recorded {PRICES_RECORDED} from the sources named; GPUs without a recorded price show `-`).\n"
    ));
    match req.bench {
        Some(b) => g.push_str(&format!(
            "Start times from `runner bench --cold-start` on {} ({}): cold {:.2} s, from a snapshot {}. On the cloud's GPU they differ; rerun the benchmark there.\n",
            b.machine,
            b.device,
            b.cold_ready_seconds,
            b.snapshot_ready_seconds
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "not measured".into())
        )),
        None => g.push_str(
            "No start times yet: run `runner bench MODEL_DIR --cold-start` before packaging to price a cold start with and without a snapshot.\n",
        ),
    }
    for target in [Target::Replicate, Target::Modal] {
        g.push_str(&format!(
            "\n{target}{}:\n\n| GPU | memory | fits | $/s | cold start | from snapshot | source |\n|---|---|---|---|---|---|---|\n",
            if target == req.target { " (this package)" } else { "" }
        ));
        let need = gpu::required_gb(weights_bytes);
        for gpu in gpu::offered(target) {
            let price = gpu::price(target, gpu.name);
            let cost = |seconds: Option<f64>| match (price, seconds) {
                (Some(p), Some(s)) => format!("${:.4}", p.usd_per_second * s),
                _ => "-".into(),
            };
            let chosen = target == req.target && hardware == Hardware::Gpu(gpu);
            g.push_str(&format!(
                "| {}{} | {} GB | {} | {} | {} | {} | {} |\n",
                gpu.name,
                if chosen { " ←" } else { "" },
                gpu.memory_gb,
                if gpu.memory_gb >= need { "yes" } else { "no" },
                price
                    .map(|p| format!("{:.6}", p.usd_per_second))
                    .unwrap_or_else(|| "-".into()),
                cost(req.bench.map(|b| b.cold_ready_seconds)),
                cost(req.bench.and_then(|b| b.snapshot_ready_seconds)),
                price.map(|p| p.source).unwrap_or("-"),
            ));
        }
    }
    g
}

/// One file as `runner-package.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    pub executable: bool,
}

/// Writes `plan` into `out`: built in a temporary sibling folder and renamed into place,
/// so a failure (disk full, a vanished weight file) leaves no half-written package and an
/// existing `out` (with `force`) is replaced only once the new one is complete.
pub fn write(
    plan: &Plan,
    model: &ModelDir,
    out: &Path,
    force: bool,
) -> Result<Vec<ManifestEntry>, PackageError> {
    let out_abs = absolute(out)?;
    if out_abs.starts_with(&model.root) {
        return Err(PackageError::OutputInsideModel {
            out: out.to_path_buf(),
            model: model.root.clone(),
        });
    }
    if model.root.starts_with(&out_abs) {
        return Err(PackageError::OutputContainsModel {
            out: out.to_path_buf(),
            model: model.root.clone(),
        });
    }
    if out_abs.exists() && !force {
        return Err(PackageError::OutputExists(out.to_path_buf()));
    }
    let parent = out_abs.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let file_name = out_abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "package".into());
    let staging = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = write_into(plan, &staging);
    let entries = match result {
        Ok(e) => e,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if out_abs.exists() {
        let old = parent.join(format!(".{file_name}.old-{}", std::process::id()));
        std::fs::rename(&out_abs, &old).map_err(io_err(&out_abs))?;
        std::fs::rename(&staging, &out_abs).map_err(io_err(&out_abs))?;
        let _ = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
    } else {
        std::fs::rename(&staging, &out_abs).map_err(io_err(&out_abs))?;
    }
    Ok(entries)
}

fn absolute(path: &Path) -> Result<PathBuf, PackageError> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(io_err(path))?.join(path)
    };
    // Resolve what exists of it, so symlinks cannot hide that it is inside the model.
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n.to_os_string());
                existing = p.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = existing.canonicalize().map_err(io_err(&existing))?;
    for part in rest.into_iter().rev() {
        resolved.push(part);
    }
    Ok(resolved)
}

fn write_into(plan: &Plan, dir: &Path) -> Result<Vec<ManifestEntry>, PackageError> {
    let mut entries = Vec::new();
    for (rel, file) in &plan.files {
        let dest = dir.join(rel);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(io_err(p))?;
        }
        let (bytes, sha256) = match &file.content {
            Content::Bytes(b) => {
                std::fs::write(&dest, b).map_err(io_err(&dest))?;
                (b.len() as u64, hex::encode(Sha256::digest(b)))
            }
            Content::Copy(src) => copy_hashing(src, &dest)?,
        };
        set_mode(&dest, file.executable)?;
        entries.push(ManifestEntry {
            path: rel.clone(),
            bytes,
            sha256,
            executable: file.executable,
        });
    }
    let manifest = json!({
        "files": entries.iter().map(|e| json!({
            "bytes": e.bytes,
            "executable": e.executable,
            "path": e.path,
            "sha256": e.sha256,
        })).collect::<Vec<_>>(),
        "format": 1,
        "hardware": plan.hardware.describe(plan.target),
        "name": plan.name,
        "target": plan.target.to_string(),
        "weights_bytes": plan.weights_bytes,
    });
    let path = dir.join(MANIFEST);
    std::fs::write(&path, json_file(&manifest)).map_err(io_err(&path))?;
    Ok(entries)
}

/// Copies a file and hashes it in the same pass (weights can be many GB).
fn copy_hashing(src: &Path, dest: &Path) -> Result<(u64, String), PackageError> {
    use std::io::Write;
    let mut input = std::fs::File::open(src).map_err(io_err(src))?;
    let mut output = std::fs::File::create(dest).map_err(io_err(dest))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buffer).map_err(io_err(src))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        output.write_all(&buffer[..n]).map_err(io_err(dest))?;
        total += n as u64;
    }
    output.sync_all().map_err(io_err(dest))?;
    Ok((total, hex::encode(hasher.finalize())))
}

#[cfg(unix)]
fn set_mode(path: &Path, executable: bool) -> Result<(), PackageError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _executable: bool) -> Result<(), PackageError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_both_clouds_rules() {
        assert!(valid_name("all-minilm-l6-v2"));
        assert!(valid_name("m.v1_x"));
        assert!(!valid_name("Upper"));
        assert!(!valid_name("-lead"));
        assert!(!valid_name("has space"));
        assert!(!valid_name(""));
    }

    #[test]
    fn json_files_have_sorted_keys_and_a_final_newline() {
        let out = String::from_utf8(json_file(&json!({"b": 1, "a": {"d": 2, "c": 3}}))).unwrap();
        assert_eq!(
            out,
            "{\n  \"a\": {\n    \"c\": 3,\n    \"d\": 2\n  },\n  \"b\": 1\n}\n"
        );
    }

    #[test]
    fn fill_replaces_every_placeholder() {
        assert_eq!(
            fill("a {{x}} b {{y}} {{x}}", &[("x", "1"), ("y", "2")]),
            "a 1 b 2 1"
        );
    }

    #[test]
    fn bench_reports_give_the_median_start_times() {
        let report = json!({
            "machine": "2 cores", "device": "cpu",
            "modes": [
                {"mode": "cold (safetensors)", "ready_seconds": {"median": 3.5}},
                {"mode": "snapshot", "ready_seconds": {"median": 1.25}},
            ]
        });
        let b = BenchSummary::from_report(&report).unwrap();
        assert_eq!(b.cold_ready_seconds, 3.5);
        assert_eq!(b.snapshot_ready_seconds, Some(1.25));
        assert!(BenchSummary::from_report(&json!({})).is_none());
    }
}
