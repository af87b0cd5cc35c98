//! `runner`: serve Cog-style model directories over Cog's HTTP API, run one prediction, or
//! print a model's OpenAPI schema.

mod bench;
mod doctor;
#[cfg(test)]
mod reference;

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use runner_engine::{
    new_prediction_id, BatchOptions, Engine, EngineOptions, FileConfig, Mode, PredictionStatus,
    ProgressBars, Rejection, SnapshotMode, SnapshotOptions, StreamEvent,
};
use runner_models::DeviceSpec;
use runner_server::{Server, ServerOptions, WebhookConfig};
use runner_spec::ModelDir;
use serde_json::{Map, Value};

/// The system allocator, plus restored CPU tensors that live in a snapshot's copy-on-write
/// mapping of the page cache instead of a copy (see `runner_snapshot::SnapshotAllocator`).
#[global_allocator]
static ALLOCATOR: runner_snapshot::SnapshotAllocator = runner_snapshot::SnapshotAllocator;

/// `runner --version`: says whether CUDA is compiled in and which GPUs its kernels run on
/// (`runner package` reads both: `runner_spec::cuda_arch::KernelTargets::from_version_line`).
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let build = match runner_models::device::kernel_targets() {
            Some(t) => format!("cuda: {}; runs on {}", t.version_note(), t.runs_on_words()),
            None if cfg!(feature = "cuda") => "cuda".to_string(),
            None => "cpu only: built without the cuda feature".to_string(),
        };
        format!("{} ({build})", env!("CARGO_PKG_VERSION"))
    })
}

#[derive(Parser)]
#[command(
    name = "runner",
    version = version(),
    about = "Serve Cog-style model directories with candle, over Cog's HTTP API"
)]
struct Cli {
    #[command(flatten)]
    logging: Logging,
    /// The Python interpreter for Python Cog predictors (`run: "predict.py:Predictor"`);
    /// the `cog` package must be importable there. Default: python3 on PATH.
    #[arg(long, global = true, env = "RUNNER_PYTHON", value_name = "PATH")]
    python: Option<PathBuf>,
    /// Quantize a candle:llama model's safetensors weights at load: q4_0, q4_1, q5_0,
    /// q5_1, q8_0, q2_k … q6_k, or off. Overrides cog.yaml's `environment`
    /// RUNNER_QUANTIZE; a snapshot keeps the quantized weights.
    #[arg(long, global = true, env = "RUNNER_QUANTIZE", value_name = "TYPE")]
    quantize: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Logging {
    /// More logs on stderr (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, env = "RUNNER_VERBOSE")]
    verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(short, long, global = true, env = "RUNNER_QUIET")]
    quiet: bool,
    /// Log line format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "RUNNER_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// Where the model runs: auto (CUDA when built with it and present, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "RUNNER_DEVICE")]
    device: DeviceSpec,
}

#[derive(Args, Clone)]
struct ListenArgs {
    /// Address to listen on (0.0.0.0 to expose it beyond this machine).
    #[arg(long, default_value = "127.0.0.1", env = "RUNNER_HOST")]
    host: String,
    /// Port to listen on (Cog's is 5000; 0 picks a free one).
    #[arg(long, default_value_t = 5000, env = "RUNNER_PORT")]
    port: u16,
}

#[derive(Args, Clone)]
struct ModeArgs {
    /// What to serve: predictions (cog.yaml's `run`), or trainings (its `train`, a Python
    /// function), as Cog's `--x-mode train` does. A training server answers on
    /// /trainings and /predictions alike.
    #[arg(long, value_enum, default_value = "predict", env = "RUNNER_MODE")]
    mode: ModeArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Predict,
    Train,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Predict => Mode::Predict,
            ModeArg::Train => Mode::Train,
        }
    }
}

#[derive(Args, Clone)]
struct ServingArgs {
    /// Predictions that may run at once (default: cog.yaml's concurrency.max, else 1).
    #[arg(long, env = "COG_MAX_CONCURRENCY")]
    concurrency: Option<u32>,
    /// Predictions that may wait for a busy slot; when full the server answers 429. 0 answers
    /// 409 at once, as Cog does.
    #[arg(long, default_value_t = 0, env = "RUNNER_MAX_QUEUE")]
    max_queue: usize,
    /// Dynamic batching: concurrent predictions run together as one forward pass, up to this
    /// many, for architectures that allow it (candle:bert). 1 turns it off. Prediction slots
    /// grow to at least this many so that a batch can fill.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024), env = "RUNNER_MAX_BATCH_SIZE")]
    max_batch_size: u32,
    /// Dynamic batching: the longest a prediction waits for others to join its batch, in
    /// milliseconds. Only spent while more predictions are on their way; a lone client
    /// never waits.
    #[arg(long, default_value_t = 2.0, env = "RUNNER_MAX_BATCH_WAIT_MS")]
    max_batch_wait_ms: f64,
    /// Upload file outputs with PUT to this URL prefix instead of returning data URIs.
    #[arg(long, env = "RUNNER_UPLOAD_URL")]
    upload_url: Option<String>,
    /// Ignore SIGTERM; stop only on POST /shutdown or SIGINT (as Cog on Kubernetes).
    #[arg(long, env = "RUNNER_AWAIT_EXPLICIT_SHUTDOWN", num_args = 0..=1, default_missing_value = "true")]
    await_explicit_shutdown: Option<bool>,
    /// Seconds setup (loading the model) may take before it fails with SETUP_FAILED; no
    /// limit when unset or 0. Cog's variable.
    #[arg(long, env = "COG_SETUP_TIMEOUT", value_name = "SECONDS")]
    setup_timeout: Option<f64>,
    /// Seconds a shutdown waits for running predictions before canceling them.
    #[arg(long, default_value_t = 60.0, env = "RUNNER_SHUTDOWN_TIMEOUT")]
    shutdown_timeout: f64,
    /// Sent as a bearer token with every webhook.
    #[arg(long, env = "WEBHOOK_AUTH_TOKEN", hide_env_values = true)]
    webhook_auth_token: Option<String>,
    /// Seconds the terminal webhook of a prediction is retried before giving up.
    #[arg(long, default_value_t = 600.0, env = "RUNNER_WEBHOOK_RETRY_DEADLINE")]
    webhook_retry_deadline: f64,
    /// Least seconds between a prediction's `start`/`logs` webhooks (output and terminal
    /// webhooks are never held back). Cog's variable.
    #[arg(long, default_value_t = 0.5, env = "COG_THROTTLE_RESPONSE_INTERVAL")]
    webhook_throttle: f64,
    /// Seconds one webhook request may take (a receiver that hangs is retried after it).
    #[arg(long, default_value_t = 30.0, env = "RUNNER_WEBHOOK_TIMEOUT")]
    webhook_timeout: f64,
    /// Largest file input, downloaded or decoded, in bytes.
    #[arg(long, default_value_t = 512 * 1024 * 1024, env = "RUNNER_MAX_INPUT_FILE_BYTES")]
    max_input_file_bytes: u64,
    /// Seconds a file input's download may take, slow or endless servers included.
    #[arg(long, default_value_t = 120.0, env = "RUNNER_INPUT_DOWNLOAD_TIMEOUT")]
    input_download_timeout: f64,
    /// Require `Authorization: Bearer <KEY>` on every route but /health-check and the
    /// playground page (which asks for it). Never logged.
    #[arg(long, env = "RUNNER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Exit when the process that started runner goes away (for runner as the child of a
    /// wrapper, such as a packaged Cog predictor, that may be killed without warning).
    #[arg(long, env = "RUNNER_EXIT_WITH_PARENT")]
    exit_with_parent: bool,
    /// Create this file once the model is ready (a readiness probe's `test -f`). Default on
    /// Kubernetes (KUBERNETES_SERVICE_HOST set): /var/run/cog/ready, as Cog's server does.
    #[arg(long, env = "RUNNER_READY_FILE")]
    ready_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct SnapshotArgs {
    /// Which snapshot to restore: auto (the model directory's own, if present), off, or a
    /// path. A missing, corrupt or incompatible snapshot means a cold load, with a warning.
    #[arg(long, default_value = "auto", env = "RUNNER_SNAPSHOT")]
    snapshot: String,
    /// Fail instead of loading cold when the snapshot is missing or unusable.
    #[arg(long, env = "RUNNER_REQUIRE_SNAPSHOT")]
    require_snapshot: bool,
}

impl SnapshotArgs {
    fn options(&self) -> SnapshotOptions {
        let mode = match self.snapshot.as_str() {
            "auto" => SnapshotMode::Auto,
            "off" | "none" => SnapshotMode::Off,
            path => SnapshotMode::Path(PathBuf::from(path)),
        };
        SnapshotOptions {
            mode,
            require: self.require_snapshot,
            save: false,
        }
    }
}

#[derive(Args)]
struct PackageArgs {
    /// The model directory (holding cog.yaml); it is only read.
    #[arg(env = "RUNNER_MODEL_DIR")]
    dir: PathBuf,
    /// Where it will run.
    #[arg(long, value_enum, env = "RUNNER_PACKAGE_TARGET")]
    target: PackageTarget,
    /// The folder to write (default: ./NAME-TARGET); never inside the model directory.
    #[arg(long, env = "RUNNER_PACKAGE_OUT")]
    out: Option<PathBuf>,
    /// GPU to run on (T4, L4, A10G, A100-40GB, L40S, A100-80GB, H100, H200, B200, as the
    /// target offers them) or cpu. Default: the smallest that holds the weights when
    /// cog.yaml says `build.gpu: true`, else cpu.
    #[arg(long, env = "RUNNER_PACKAGE_GPU")]
    gpu: Option<String>,
    /// The model's name on the platform (default: cog.yaml's `model:`, else the folder's).
    #[arg(long, env = "RUNNER_PACKAGE_NAME")]
    name: Option<String>,
    /// The runner binary to ship (default: this one). GPU packages need one built with
    /// `--features cuda`.
    #[arg(long, env = "RUNNER_PACKAGE_RUNNER_BIN")]
    runner_bin: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long, env = "RUNNER_PACKAGE_FORCE")]
    force: bool,
    /// Replicate: `image` builds a Dockerfile whose image runs runner directly; `predictor`
    /// writes a standard Cog project whose predict.py forwards to runner on localhost.
    #[arg(
        long,
        value_enum,
        default_value = "image",
        env = "RUNNER_PACKAGE_REPLICATE_MODE"
    )]
    replicate_mode: ReplicateModeArg,
    /// Base image instead of the pinned default (CUDA 13.0 runtime, or python slim for CPU).
    #[arg(long, env = "RUNNER_PACKAGE_BASE_IMAGE")]
    base_image: Option<String>,
    /// A `runner bench --cold-start` JSON report to price cold starts with (default:
    /// DIR/.runner/bench-cold-start.json, which `runner bench` writes, when present).
    #[arg(long, env = "RUNNER_PACKAGE_BENCH")]
    bench: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PackageTarget {
    Replicate,
    Modal,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReplicateModeArg {
    Image,
    Predictor,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model directory over Cog's HTTP prediction API.
    Serve {
        /// The model directory (holding cog.yaml).
        #[arg(default_value = ".", env = "RUNNER_MODEL_DIR")]
        dir: PathBuf,
        #[command(flatten)]
        listen: ListenArgs,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        mode: ModeArgs,
        #[command(flatten)]
        serving: ServingArgs,
        #[command(flatten)]
        snapshot: SnapshotArgs,
        /// After a cold load (no usable snapshot), write the snapshot in the background once
        /// the server is ready, so the next start restores it: to --snapshot PATH, else
        /// where `--snapshot auto` looks (DIR/.runner/).
        #[arg(long, env = "RUNNER_SAVE_SNAPSHOT")]
        save_snapshot: bool,
    },
    /// Load a model cold, warm it up, and save its device-resident state as a snapshot
    /// that `runner serve` restores instead of loading the weights.
    Snapshot {
        /// The model directory (holding cog.yaml).
        #[arg(default_value = ".", env = "RUNNER_MODEL_DIR")]
        dir: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
        /// Where to write it (default: DIR/.runner/snapshot-<architecture>-<device>.rsnap,
        /// where `--snapshot auto` looks).
        #[arg(short, long, env = "RUNNER_SNAPSHOT_OUTPUT")]
        output: Option<PathBuf>,
        /// After writing, restore the snapshot onto the same device and check every tensor
        /// bit for bit against the cold load.
        #[arg(long, env = "RUNNER_SNAPSHOT_VERIFY")]
        verify: bool,
    },
    /// Run one prediction and print its output on stdout.
    #[command(visible_alias = "predict")]
    Run {
        /// The model directory (holding cog.yaml).
        #[arg(env = "RUNNER_MODEL_DIR")]
        dir: PathBuf,
        /// An input as name=value; name=@path reads a file. Repeat a name to build a list.
        #[arg(short = 'i', long = "input", value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        /// All inputs as a JSON object; @path reads it from a file, @- from stdin.
        #[arg(long, value_name = "JSON", env = "RUNNER_INPUT_JSON")]
        json: Option<String>,
        /// Write the output here instead of stdout.
        #[arg(short, long, env = "RUNNER_OUTPUT")]
        output: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        mode: ModeArgs,
        #[command(flatten)]
        snapshot: SnapshotArgs,
    },
    /// Chat with a text-generation model in the terminal: each line you type is a user turn,
    /// the answer streams back, and the conversation goes on (through the model's chat
    /// template; earlier turns come from the prompt cache). `/reset` starts over; an empty
    /// line or end of input ends it.
    Chat {
        /// The model directory (holding cog.yaml).
        #[arg(env = "RUNNER_MODEL_DIR")]
        dir: PathBuf,
        /// A system message to begin the conversation with.
        #[arg(long, env = "RUNNER_CHAT_SYSTEM")]
        system: Option<String>,
        /// Sampling temperature; 0 is greedy decoding.
        #[arg(long, default_value_t = 0.7, env = "RUNNER_CHAT_TEMPERATURE")]
        temperature: f64,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 512, env = "RUNNER_CHAT_MAX_TOKENS")]
        max_tokens: u64,
        /// Random seed, for answers that repeat.
        #[arg(long, env = "RUNNER_SEED")]
        seed: Option<u64>,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        snapshot: SnapshotArgs,
    },
    /// Measure start-up: `runner serve` started fresh again and again, cold from the
    /// weights and restored from a snapshot; time to ready and to the first prediction,
    /// phase by phase, beside the machine's read bandwidth.
    Bench {
        /// The model directory (holding cog.yaml).
        #[arg(env = "RUNNER_MODEL_DIR")]
        dir: PathBuf,
        /// Compare cold starts with snapshot restores (the only benchmark so far).
        #[arg(long, required = true)]
        cold_start: bool,
        /// Starts per mode.
        #[arg(long, default_value_t = 5, env = "RUNNER_BENCH_RUNS")]
        runs: usize,
        #[command(flatten)]
        device: DeviceArgs,
        /// Use this snapshot instead of taking a fresh one first.
        #[arg(long, env = "RUNNER_BENCH_SNAPSHOT")]
        snapshot: Option<PathBuf>,
        /// Drop the page cache before every start (needs root): cold-disk numbers, beside
        /// the snapshot file's cold read bandwidth as the ceiling. RUNNER_RESTORE_READ=direct
        /// (or cache) picks how the restores read it.
        #[arg(long, env = "RUNNER_BENCH_DROP_CACHES")]
        drop_caches: bool,
        /// On CUDA, leave out the cold start on an empty kernel cache (a fresh machine's),
        /// which compiles candle's kernels every time: for comparing restore settings.
        #[arg(long, env = "RUNNER_BENCH_NO_FRESH_MACHINE")]
        no_fresh_machine: bool,
        /// Result format on stdout.
        #[arg(long, value_enum, default_value = "table", env = "RUNNER_BENCH_FORMAT")]
        format: BenchFormat,
        /// Also write an SVG chart of the median phases here.
        #[arg(long, env = "RUNNER_BENCH_CHART")]
        chart: Option<PathBuf>,
        /// Also write the JSON report here (whatever --format says).
        #[arg(long, env = "RUNNER_BENCH_JSON_OUT")]
        json_out: Option<PathBuf>,
    },
    /// Write generated weights for a test architecture (config.json + model.safetensors).
    Generate {
        /// Which architecture's weights to generate.
        #[arg(value_parser = ["tiny-mlp"])]
        architecture: String,
        /// Folder to write them into (e.g. models/tiny-mlp/weights).
        dir: PathBuf,
        /// Seed of the deterministic generator.
        #[arg(long, default_value_t = 0, env = "RUNNER_SEED")]
        seed: u64,
        /// Width of the hidden layers.
        #[arg(long, default_value_t = 4096, env = "RUNNER_GENERATE_HIDDEN_SIZE")]
        hidden_size: usize,
        /// Hidden-to-hidden layers (16 at width 4096 make about 1.1 GB of f32 weights).
        #[arg(long, default_value_t = 0, env = "RUNNER_GENERATE_LAYERS")]
        layers: usize,
        /// The dtype the model computes in; the f32 weights are converted to it at load.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"], env = "RUNNER_GENERATE_DTYPE")]
        dtype: String,
    },
    /// Write a self-contained folder that deploys the model on Replicate (a Cog image)
    /// or Modal (with GPU memory snapshots), served by this runner binary.
    Package(PackageArgs),
    /// Convert a Llama GGUF into a safetensors model directory (dequantized, Hugging Face
    /// layout and names, config.json, tokenizer.json, cog.yaml) for `candle:llama`.
    Convert {
        /// The .gguf file.
        #[arg(env = "RUNNER_CONVERT_INPUT")]
        gguf: PathBuf,
        /// The model directory to write (cog.yaml + weights/).
        #[arg(long, env = "RUNNER_CONVERT_OUT")]
        out: PathBuf,
        /// The dtype of the written weights.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"], env = "RUNNER_CONVERT_DTYPE")]
        dtype: String,
        /// Replace --out if it exists.
        #[arg(long, env = "RUNNER_CONVERT_FORCE")]
        force: bool,
    },
    /// Check, before serving, everything `runner serve` depends on, with the flags serve
    /// takes: the machine, the device, cog.yaml, the predictor or weights, the snapshot a
    /// start would use (or exactly why it would not), room for a snapshot, the port. Each
    /// problem says what to do; exit 1 when serve would not start.
    Doctor {
        /// The model directory (default: the current one, when it holds cog.yaml).
        #[arg(env = "RUNNER_MODEL_DIR")]
        dir: Option<PathBuf>,
        /// Where serve would listen (the port is checked to be free).
        #[command(flatten)]
        listen: ListenArgs,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        mode: ModeArgs,
        #[command(flatten)]
        snapshot: SnapshotArgs,
        /// Also load the model as serve would (from the snapshot it would use, else the
        /// weights) and run the warm-up prediction: reads every byte.
        #[arg(long, env = "RUNNER_DOCTOR_LOAD")]
        load: bool,
        /// Also measure the page-cache read bandwidth and, on a GPU, the pinned
        /// host-to-device bandwidth: the ceilings a restore is held to.
        #[arg(long, env = "RUNNER_DOCTOR_MEASURE")]
        measure: bool,
        /// Result format on stdout.
        #[arg(
            long,
            value_enum,
            default_value = "table",
            env = "RUNNER_DOCTOR_FORMAT"
        )]
        format: BenchFormat,
    },
    /// Print the model's OpenAPI schema, as Cog's generator writes it.
    Schema {
        /// The model directory (holding cog.yaml).
        #[arg(default_value = ".", env = "RUNNER_MODEL_DIR")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `runner run` prints the prediction's logs itself, as they come.
    // A chat shows only the conversation unless asked for more (-v).
    let chat = matches!(cli.command, Command::Chat { .. });
    let mut logging = cli.logging.clone();
    logging.quiet |= chat && logging.verbose == 0;
    init_logging(&logging, matches!(cli.command, Command::Run { .. }) || chat);
    let _ = PYTHON.set(cli.python.clone());
    let _ = QUANTIZE.set(cli.quantize.clone());
    if let Some(q) = &cli.quantize {
        if matches!(
            cli.command,
            Command::Convert { .. } | Command::Generate { .. } | Command::Package(_)
        ) {
            tracing::warn!(
                "--quantize {q} (RUNNER_QUANTIZE) applies when a model loads (serve, run, chat, snapshot, bench, doctor); this command ignores it (to package a quantized model, put RUNNER_QUANTIZE in cog.yaml's `environment`)"
            );
        }
    }
    SHOW_PROGRESS.store(
        !cli.logging.quiet && std::io::stderr().is_terminal(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let cuda_start = cuda_model_dir(&cli.command);
    if let Some((dir, _)) = cuda_start {
        keep_cuda_kernels_beside_the_model(dir);
    }
    fix_the_cpu_thread_count();
    // After the environment is set: this starts a thread.
    if let Some((_, gpu)) = cuda_start {
        runner_models::device::preload_cuda_libraries(gpu);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    // A model still loading when a shutdown came must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// candle asks for its thread count on every float matrix product and, unless
/// `RAYON_NUM_THREADS` is set, counts physical cores by reading `/proc/cpuinfo` each time
/// (about 1 % of a generation's CPU time). Count once, here, and give rayon's pool (runner's
/// own kernels) the same number: compute-bound kernels gain nothing from SMT siblings.
/// Set before any thread starts.
fn fix_the_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = num_cpus::get_physical().clamp(1, logical);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

/// The model directory and GPU (`--device auto`: GPU 0) of a command that opens a GPU:
/// serve, snapshot, run, chat or doctor on a model, built with CUDA, not `--device cpu`, and
/// not a Python predictor (runner opens no GPU for one). Read before any thread starts.
fn cuda_model_dir(command: &Command) -> Option<(&Path, usize)> {
    let (dir, device) = match command {
        Command::Serve { dir, device, .. }
        | Command::Snapshot { dir, device, .. }
        | Command::Run { dir, device, .. }
        | Command::Chat { dir, device, .. } => (dir, device),
        Command::Doctor {
            dir: Some(dir),
            device,
            ..
        } => (dir, device),
        _ => return None,
    };
    if !cfg!(feature = "cuda") || matches!(device.device, DeviceSpec::Cpu) {
        return None;
    }
    // Read only here: a CPU start does not parse cog.yaml twice.
    let python = runner_spec::CogConfig::load(&dir.join("cog.yaml"))
        .is_ok_and(|c| matches!(c.run, runner_spec::RunTarget::Python { .. }));
    let gpu = match device.device {
        DeviceSpec::Cuda(n) => n,
        _ => 0,
    };
    (!python).then_some((dir.as_path(), gpu))
}

/// candle's kernels are PTX that the CUDA driver compiles on first use; its JIT cache
/// (read when CUDA initialises) is kept in the model directory beside the snapshot, so a
/// restored server does not compile them again. Set before any thread starts.
fn keep_cuda_kernels_beside_the_model(dir: &Path) {
    if std::env::var_os("CUDA_CACHE_PATH").is_some() {
        return;
    }
    let cache = dir.join(".runner").join("cuda-kernel-cache");
    if std::fs::create_dir_all(&cache).is_ok() {
        std::env::set_var("CUDA_CACHE_PATH", &cache);
        if std::env::var_os("CUDA_CACHE_MAXSIZE").is_none() {
            // The default (1 GiB) can evict kernels of large models.
            std::env::set_var("CUDA_CACHE_MAXSIZE", "4294967296");
        }
    }
}

/// Progress bars only on a terminal, and not with `-q`; logs carry the same facts as
/// plain lines (bytes, seconds, GB/s) when a step ends.
static SHOW_PROGRESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Byte progress bars (indicatif) on stderr for weight loads and snapshot reads and writes.
fn progress_bars() -> Option<ProgressBars> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if !SHOW_PROGRESS.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    Some(ProgressBars(Arc::new(|label: &str, total: u64| {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>18} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_string());
        /// Clears the bar when the engine drops its progress callback.
        struct ClearOnDrop(ProgressBar);
        impl Drop for ClearOnDrop {
            fn drop(&mut self) {
                self.0.finish_and_clear();
            }
        }
        let bar = ClearOnDrop(bar);
        Arc::new(move |bytes| bar.0.inc(bytes))
    })))
}

fn init_logging(l: &Logging, prints_prediction_logs: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if l.quiet {
        "warn"
    } else {
        match l.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    // RUNNER_LOG, else RUST_LOG, else the level -v/-q chose.
    let filter = EnvFilter::try_from_env("RUNNER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            if prints_prediction_logs {
                EnvFilter::new(format!("{default},runner::predictor=off"))
            } else {
                EnvFilter::new(default)
            }
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match l.log_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Serve {
            dir,
            listen: ListenArgs { host, port },
            device,
            mode,
            serving,
            snapshot,
            save_snapshot,
        } => {
            if serving.exit_with_parent {
                exit_with_parent();
            }
            let snapshot = SnapshotOptions {
                save: save_snapshot,
                ..snapshot.options()
            };
            serve(
                &dir,
                &host,
                port,
                device.device,
                mode.mode.into(),
                serving,
                snapshot,
            )
            .await
        }
        Command::Snapshot {
            dir,
            device,
            output,
            verify,
        } => take_snapshot(&dir, device.device, output.as_deref(), verify).await,
        Command::Run {
            dir,
            inputs,
            json,
            output,
            device,
            mode,
            snapshot,
        } => {
            run(
                &dir,
                &inputs,
                json.as_deref(),
                output.as_deref(),
                device.device,
                mode.mode.into(),
                snapshot.options(),
            )
            .await
        }
        Command::Chat {
            dir,
            system,
            temperature,
            max_tokens,
            seed,
            device,
            snapshot,
        } => {
            let settings = ChatSettings {
                system,
                temperature,
                max_tokens,
                seed,
            };
            chat(&dir, device.device, snapshot.options(), settings).await
        }
        Command::Bench {
            dir,
            cold_start: _,
            runs,
            device,
            snapshot,
            drop_caches,
            no_fresh_machine,
            format,
            chart,
            json_out,
        } => {
            tokio::task::spawn_blocking(move || {
                let outputs = BenchOutputs {
                    format,
                    chart,
                    json_out,
                };
                bench_cold_start(
                    &dir,
                    runs,
                    device.device,
                    snapshot,
                    drop_caches,
                    !no_fresh_machine,
                    outputs,
                )
            })
            .await?
        }
        Command::Generate {
            architecture: _,
            dir,
            seed,
            hidden_size,
            layers,
            dtype,
        } => {
            let config = runner_models::tiny_mlp::TinyMlpConfig {
                hidden_size,
                layers,
                dtype,
                ..Default::default()
            };
            let bytes = config.parameters() * 4;
            tracing::info!("generating {:.1} MB of f32 weights", bytes as f64 / 1e6);
            runner_models::tiny_mlp::write_model(&dir, &config, seed)?;
            eprintln!(
                "runner: wrote tiny-mlp weights ({:.1} MB, seed {seed}) to {}",
                bytes as f64 / 1e6,
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Package(args) => package(args),
        Command::Convert {
            gguf,
            out,
            dtype,
            force,
        } => {
            if out.exists() && !force {
                bail!(
                    "{}: already exists; pass --force to replace it",
                    out.display()
                );
            }
            let started = Instant::now();
            let converted =
                runner_models::llama::convert::gguf_to_safetensors(&gguf, &out, &dtype)?;
            eprintln!(
                "runner: converted {} tensors ({:.1} MB of {dtype}) in {:.1}s",
                converted.tensors,
                converted.bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
            println!("{}", converted.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor {
            dir,
            listen: ListenArgs { host, port },
            device,
            mode,
            snapshot,
            load,
            measure,
            format,
        } => {
            let report = doctor::run(doctor::Request {
                dir,
                device: device.device,
                mode: mode.mode.into(),
                snapshot: snapshot.options(),
                host,
                port,
                python: PYTHON.get().cloned().flatten(),
                load,
                measure,
                progress: progress_bars(),
            })
            .await;
            match format {
                BenchFormat::Table => print!("{}", report.to_text()),
                BenchFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(if report.failures == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Schema { dir } => {
            let engine = open_engine(&dir, DeviceSpec::Cpu, Default::default())?;
            std::io::stdout().write_all(engine.openapi_json().as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn package(args: PackageArgs) -> Result<ExitCode> {
    let model_dir = ModelDir::open(&args.dir)?;
    let python = matches!(model_dir.config.run, runner_spec::RunTarget::Python { .. });
    if python && matches!(args.target, PackageTarget::Replicate) {
        // Said before the predictor is imported to read its signature.
        bail!(
            "{}: {}",
            model_dir.config.path.display(),
            runner_package::PackageError::PythonForReplicate(model_dir.config.run.to_string())
        );
    }
    let engine = Engine::new(
        model_dir.clone(),
        DeviceSpec::Cpu,
        EngineOptions {
            python: PYTHON.get().cloned().flatten(),
            quantize: QUANTIZE.get().cloned().flatten(),
            ..Default::default()
        },
    )?;
    // A package must not carry weights that would fail to load: check them now.
    if !model_dir.weights.safetensors.is_empty() {
        runner_models::weights::CheckedWeights::open(&model_dir.weights)
            .with_context(|| format!("{}: the weights do not validate", args.dir.display()))?;
    }
    for gguf in &model_dir.weights.gguf {
        runner_models::llama::open_gguf(gguf)
            .with_context(|| format!("{}: the weights do not validate", args.dir.display()))?;
    }
    let runner_path = match args.runner_bin {
        Some(p) => p,
        None => {
            std::env::current_exe().context("cannot find this runner binary; pass --runner-bin")?
        }
    };
    let runner = probe_runner_binary(&runner_path);
    let bench_path = args
        .bench
        .clone()
        .unwrap_or_else(|| model_dir.root.join(".runner").join(BENCH_REPORT));
    let bench = match std::fs::read(&bench_path) {
        Ok(bytes) => {
            let report: Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a runner bench report", bench_path.display()))?;
            Some(
                runner_package::BenchSummary::from_report(&report).with_context(|| {
                    format!(
                        "{}: no cold-start times in it; rerun `runner bench --cold-start`",
                        bench_path.display()
                    )
                })?,
            )
        }
        Err(e) if args.bench.is_some() => {
            return Err(e).with_context(|| format!("--bench {}", bench_path.display()))
        }
        Err(_) => None,
    };
    let target = match args.target {
        PackageTarget::Replicate => runner_package::Target::Replicate,
        PackageTarget::Modal => runner_package::Target::Modal,
    };
    let openai_routes: &[&str] = match engine.openai() {
        runner_models::OpenAi::None => &[],
        runner_models::OpenAi::Embeddings => &["/v1/embeddings"],
        runner_models::OpenAi::TextGeneration => {
            &["/v1/chat/completions", "/v1/completions", "/v1/responses"]
        }
    };
    let request = runner_package::Request {
        model: &model_dir,
        signature: engine.signature(),
        openapi_json: engine.openapi_json(),
        target,
        replicate_mode: match args.replicate_mode {
            ReplicateModeArg::Image => runner_package::ReplicateMode::Image,
            ReplicateModeArg::Predictor => runner_package::ReplicateMode::Predictor,
        },
        gpu: args.gpu.as_deref(),
        name: args.name.as_deref(),
        runner: &runner,
        bench: bench.as_ref(),
        base_image: args.base_image.as_deref(),
        openai_routes,
    };
    let plan = runner_package::plan(&request)?;
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}-{target}", plan.name)));
    let entries = runner_package::write(&plan, &model_dir, &out, args.force)?;
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    print!("{}", plan.guidance);
    println!(
        "\nWrote {} files ({:.1} MB) to {}; {} lists their sha256.",
        entries.len() + 1,
        total as f64 / 1e6,
        out.display(),
        runner_package::MANIFEST
    );
    Ok(ExitCode::SUCCESS)
}

/// One line on stderr in a single write, so a parent that reads the pipe in chunks (Cog's
/// server does, line by line as they arrive) sees it whole; a closed pipe is ignored.
fn stderr_line(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// Watches the parent process and exits once runner has been orphaned (re-parented).
fn exit_with_parent() {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                // stderr may be a pipe that died with the parent: never panic on it.
                stderr_line(&format!(
                    "runner: the process that started it (pid {parent}) is gone; exiting"
                ));
                std::process::exit(1);
            }
        });
    }
}

/// Where `runner bench --cold-start` keeps its last report, for `runner package`.
const BENCH_REPORT: &str = "bench-cold-start.json";

/// Runs `BIN --version` to learn whether it was built with CUDA, and for which GPUs.
fn probe_runner_binary(path: &Path) -> runner_package::RunnerBinary {
    let version = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let cuda = version.as_deref().and_then(|v| {
        if v.contains("(cuda") {
            Some(true)
        } else if v.contains("cpu only") {
            Some(false)
        } else {
            None
        }
    });
    let kernels = version
        .as_deref()
        .and_then(runner_package::KernelTargets::from_version_line);
    runner_package::RunnerBinary {
        path: path.to_path_buf(),
        version,
        cuda,
        kernels,
    }
}

/// `--python`, for every command that opens an engine.
static PYTHON: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
/// `--quantize`, for every engine this process opens.
pub(crate) static QUANTIZE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

fn open_engine(dir: &Path, device: DeviceSpec, mut options: EngineOptions) -> Result<Arc<Engine>> {
    let model_dir = ModelDir::open(dir)?;
    if options.python.is_none() {
        options.python = PYTHON.get().cloned().flatten();
    }
    if options.quantize.is_none() {
        options.quantize = QUANTIZE.get().cloned().flatten();
    }
    Ok(Engine::new(model_dir, device, options)?)
}

/// Where to mark readiness: `--ready-file`, else Cog's file on Kubernetes.
fn ready_file(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| {
        std::env::var_os("KUBERNETES_SERVICE_HOST").map(|_| PathBuf::from("/var/run/cog/ready"))
    })
}

/// Creates the readiness file (and its folder). A failure is logged, not fatal: the server
/// itself is ready.
fn mark_ready(path: &Path) {
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, b""));
    match written {
        Ok(()) => tracing::debug!("readiness marked at {}", path.display()),
        Err(e) => tracing::warn!(
            "cannot write the readiness file {} ({e}); a probe that tests for it will not see this server ready",
            path.display()
        ),
    }
}

fn seconds(flag: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("--{flag} {value}: expected a number of seconds, 0 or more"))
}

async fn serve(
    dir: &Path,
    host: &str,
    port: u16,
    device: DeviceSpec,
    mode: Mode,
    serving: ServingArgs,
    snapshot: SnapshotOptions,
) -> Result<ExitCode> {
    let started = Instant::now();
    let shutdown_timeout = seconds("shutdown-timeout", serving.shutdown_timeout)?;
    let retry_deadline = seconds("webhook-retry-deadline", serving.webhook_retry_deadline)?;
    let webhook_timeout = seconds("webhook-timeout", serving.webhook_timeout)?;
    if let Some(url) = &serving.upload_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--upload-url {url}: expected an http:// or https:// URL prefix");
        }
    }
    let max_batch_wait =
        Duration::try_from_secs_f64(serving.max_batch_wait_ms / 1000.0).map_err(|_| {
            anyhow::anyhow!(
                "--max-batch-wait-ms {}: expected a number of milliseconds, 0 or more",
                serving.max_batch_wait_ms
            )
        })?;
    let options = EngineOptions {
        concurrency: serving.concurrency,
        max_queue: serving.max_queue,
        batching: BatchOptions {
            max_batch_size: serving.max_batch_size as usize,
            max_wait: max_batch_wait,
        },
        files: FileConfig {
            upload_url: serving.upload_url.clone(),
            max_input_bytes: serving.max_input_file_bytes,
            download_timeout: seconds("input-download-timeout", serving.input_download_timeout)?,
            ..Default::default()
        },
        snapshot,
        record_for_snapshot: false,
        progress: progress_bars(),
        python: None,
        quantize: None, // open_engine fills it in
        mode,
        // 0, like unset, is no limit.
        setup_timeout: serving
            .setup_timeout
            .filter(|s| *s != 0.0)
            .map(|s| seconds("setup-timeout", s))
            .transpose()?,
    };
    // A file left by an earlier run must not say ready before this one is.
    if let Some(path) = ready_file(serving.ready_file.clone()) {
        let _ = std::fs::remove_file(path);
    }
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (host, port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| {
            anyhow::anyhow!("--host {host}: not an address to listen on (try 127.0.0.1 or 0.0.0.0)")
        })?;
    // Bind before anything loads, as Cog does: /health-check answers STARTING meanwhile,
    // while a Python predictor is imported too.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}; is another server using port {port}? (choose another with --port)"))?;
    let url = format!("http://{}", listener.local_addr()?);
    tracing::info!("listening on {url}; loading the model");
    let routes = Arc::new(std::sync::OnceLock::new());
    let app = runner_server::until_ready(Arc::clone(&routes), mode, serving.api_key.clone());
    let await_explicit = serving.await_explicit_shutdown.unwrap_or(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let making = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || open_engine(&dir, device, options))
    };
    let made = tokio::select! {
        made = making => made.context("making the engine panicked"),
        _ = shutdown_signal(None, await_explicit) => {
            let _ = stop_tx.send(true);
            let _ = http.await;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let engine = match made.and_then(|m| m) {
        Ok(engine) => engine,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = http.await;
            return Err(e);
        }
    };
    if serving.max_batch_size > 1 && engine.batching().is_none() {
        tracing::warn!(
            "--max-batch-size {}: candle:{} does not batch predictions; serving them one by one",
            serving.max_batch_size,
            engine.architecture()
        );
    }

    let server = Server::new(
        Arc::clone(&engine),
        ServerOptions {
            webhooks: WebhookConfig {
                auth_token: serving.webhook_auth_token.clone(),
                retry_deadline,
                request_timeout: webhook_timeout,
                throttle: seconds("webhook-throttle", serving.webhook_throttle)?,
                ..Default::default()
            },
            model_dir_hint: Some(dir.display().to_string()),
            api_key: serving.api_key.clone().filter(|k| !k.is_empty()),
        },
    );
    let _ = routes.set(server.router());
    let signal_server = server.clone();
    tokio::spawn(async move {
        shutdown_signal(Some(&signal_server), await_explicit).await;
        let _ = stop_tx.send(true);
    });

    let setup = engine.setup();
    let mut setup_stop = stop_rx.clone();
    tokio::select! {
        result = setup => match result {
            Ok(loaded) => {
                let restored = loaded
                    .snapshot
                    .as_ref()
                    .map(|s| format!(" ({:.1} MB at {:.2} GB/s)", s.data_bytes as f64 / 1e6, s.data_bytes as f64 / s.restore_seconds.max(1e-9) / 1e9))
                    .unwrap_or_default();
                let batching = engine
                    .batching()
                    .map(|b| format!(" · batches of up to {} ({} ms wait)", b.max_batch_size, b.max_wait.as_secs_f64() * 1000.0))
                    .unwrap_or_default();
                let quantized = engine
                    .quantize()
                    .map(|q| format!(", quantized to {q} at load"))
                    .unwrap_or_default();
                let trainings = if engine.mode() == Mode::Train {
                    " · trainings at /trainings"
                } else {
                    ""
                };
                if let Some(path) = ready_file(serving.ready_file.clone()) {
                    mark_ready(&path);
                }
                stderr_line(&format!(
                    "runner: ready at {url}{trainings} · model {} ({}) · device {} · weights {}{restored}{quantized}{batching} · ready in {:.2}s",
                    engine.model_name(),
                    engine.run_target(),
                    loaded.device,
                    loaded.weights_source,
                    started.elapsed().as_secs_f64()
                ))
            }
            Err(e) => stderr_line(&format!("runner: setup failed, serving SETUP_FAILED at {url}/health-check: {e}")),
        },
        _ = setup_stop.wait_for(|s| *s) => {}
    }
    let mut stop = stop_rx;
    let _ = stop.wait_for(|s| *s).await;
    // New connections stop now; accepted predictions (sync and async) finish first.
    tracing::info!(
        in_flight = engine.in_flight(),
        "shutting down: waiting up to {:.0}s for running predictions",
        shutdown_timeout.as_secs_f64()
    );
    let report = server
        .drain(shutdown_timeout, Duration::from_secs(30))
        .await;
    if report.webhooks_pending > 0 {
        tracing::warn!(
            pending = report.webhooks_pending,
            "stopping with webhooks still being retried"
        );
    }
    match tokio::time::timeout(Duration::from_secs(5), http).await {
        Ok(joined) => joined.context("server task")?.context("server")?,
        Err(_) => tracing::warn!("some connections were still open at exit"),
    }
    if let Some(runner_engine::SnapshotSave::Saving { path }) = engine.snapshot_save() {
        tracing::info!(
            "waiting up to {:.0}s for the snapshot being saved to {}",
            shutdown_timeout.as_secs_f64(),
            path.display()
        );
        let waiting = Arc::clone(&engine);
        let finished =
            tokio::task::spawn_blocking(move || waiting.wait_for_snapshot_save(shutdown_timeout))
                .await
                .unwrap_or(false);
        if !finished {
            tracing::warn!(
                "stopping before the snapshot was saved: none was written to {}, and the next start loads cold",
                path.display()
            );
        }
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn take_snapshot(
    dir: &Path,
    device: DeviceSpec,
    output: Option<&Path>,
    verify: bool,
) -> Result<ExitCode> {
    let options = EngineOptions {
        record_for_snapshot: true,
        progress: progress_bars(),
        ..Default::default()
    };
    let engine = open_engine(dir, device, options)?;
    let loaded = engine
        .setup()
        .await
        .map_err(|e| anyhow::anyhow!("setup failed: {e}"))?;
    if loaded.weights_source == "none" {
        bail!(
            "candle:{} has no weights: there is nothing to snapshot",
            engine.architecture()
        );
    }
    let phases: Vec<String> = loaded
        .phases
        .iter()
        .map(|(name, t)| format!("{name} {:.3}s", t.as_secs_f64()))
        .collect();
    tracing::info!("loaded cold: {}", phases.join(", "));
    let writer = Arc::clone(&engine);
    let output = output.map(Path::to_path_buf);
    let report = tokio::task::spawn_blocking(move || writer.write_snapshot(output.as_deref()))
        .await
        .context("snapshot writer")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", report.path.display());
    // What loading and writing took in memory at most: a recording shares the model's
    // tensors, so about what serving the model takes.
    let peak = runner_models::device::process_peak_resident_bytes()
        .map(|b| format!(" (peak memory {:.1} MB)", b as f64 / 1e6))
        .unwrap_or_default();
    eprintln!(
        "runner: snapshot of {} tensors ({:.1} MB) written to {} in {:.2}s{peak}",
        report.tensors,
        report.data_bytes as f64 / 1e6,
        report.path.display(),
        report.elapsed.as_secs_f64()
    );
    if verify {
        let path = report.path.clone();
        let checked = tokio::task::spawn_blocking(move || engine.verify_snapshot(&path))
            .await
            .context("snapshot verifier")?
            .map_err(|e| anyhow::anyhow!("verify: {e}"))?;
        eprintln!(
            "runner: verified: {} restored tensors ({:.1} MB) are bit-identical to the cold load, restored at {:.2} GB/s",
            checked.tensors,
            checked.data_bytes as f64 / 1e6,
            checked.gb_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

struct BenchOutputs {
    format: BenchFormat,
    chart: Option<PathBuf>,
    json_out: Option<PathBuf>,
}

fn bench_cold_start(
    dir: &Path,
    runs: usize,
    device: DeviceSpec,
    snapshot: Option<PathBuf>,
    drop_caches: bool,
    fresh_machine: bool,
    outputs: BenchOutputs,
) -> Result<ExitCode> {
    if runs == 0 {
        bail!("--runs 0: run at least once");
    }
    let model_dir = ModelDir::open(dir)?;
    let architecture = runner_models::architecture_for(&model_dir)?;
    let input = (architecture.example_input)(&model_dir);
    let device_arg = device.to_string();
    let snapshot = match snapshot {
        Some(p) => p,
        None => {
            eprintln!("bench: taking a fresh snapshot");
            let out = std::process::Command::new(std::env::current_exe()?)
                .arg("-q")
                .arg("snapshot")
                .arg(dir)
                .args(["--device", &device_arg])
                .stderr(std::process::Stdio::inherit())
                .output()
                .context("running runner snapshot")?;
            if !out.status.success() {
                bail!("runner snapshot failed");
            }
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let snap = runner_snapshot::Snapshot::open(&snapshot)?;
    let snapshot_bytes = snap.header.data_bytes;
    drop(snap);
    let weights_format = if model_dir.weights.gguf.is_empty() {
        "safetensors"
    } else {
        "gguf"
    };
    let weights_bytes: u64 = model_dir
        .weights
        .safetensors
        .iter()
        .chain(&model_dir.weights.gguf)
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let ceiling = bench::page_cache_read_bandwidth(&snapshot)?;
    let fresh_memory = bench::fresh_memory_read_bandwidth(&snapshot)?;
    let cold_read = if drop_caches {
        Some(bench::cold_read_bandwidth(&snapshot)?)
    } else {
        None
    };
    let options = bench::BenchOptions {
        dir,
        device: &device_arg,
        runs,
        snapshot: snapshot.clone(),
        drop_caches,
        fresh_machine,
        weights_format,
    };
    let pinned_h2d = match device {
        DeviceSpec::Cpu => None,
        spec => {
            let opened = spec.open()?;
            runner_snapshot::pinned_h2d_bandwidth(&opened).transpose()?
        }
    };
    let results = bench::cold_start(&options, &input)?;
    let report = bench::Report {
        model: model_dir.name(),
        device: device_arg.clone(),
        machine: bench::machine_description(),
        weights_bytes,
        snapshot_bytes,
        page_cache_bytes_per_s: ceiling,
        fresh_memory_bytes_per_s: fresh_memory,
        results: &results,
        caches_dropped: drop_caches,
        cold_read_bytes_per_s: cold_read,
        pinned_h2d_bytes_per_s: pinned_h2d,
    };
    let json = serde_json::to_string_pretty(&bench::to_json(&report))?;
    match outputs.format {
        BenchFormat::Table => print!("{}", bench::to_table(&report)),
        BenchFormat::Json => println!("{json}"),
    }
    // The last report stays beside the snapshot, where `runner package` prices starts.
    let kept = model_dir.root.join(".runner").join(BENCH_REPORT);
    std::fs::write(&kept, format!("{json}\n"))
        .with_context(|| format!("writing {}", kept.display()))?;
    if let Some(path) = outputs.json_out {
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = outputs.chart {
        std::fs::write(&path, bench::to_svg(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: chart written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT, on SIGTERM (unless `await_explicit`), or on POST /shutdown.
/// Resolves on SIGINT, SIGTERM (unless `await_explicit`), or `POST /shutdown` once there
/// is a server to receive it.
async fn shutdown_signal(server: Option<&Server>, await_explicit: bool) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                loop {
                    s.recv().await;
                    if !await_explicit {
                        break;
                    }
                    // Kubernetes sends SIGTERM before the pod's work is handed off.
                    tracing::info!("SIGTERM ignored (--await-explicit-shutdown): POST /shutdown stops the server");
                }
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = async {
            match server {
                Some(server) => server.shutdown_requested().await,
                None => std::future::pending().await,
            }
        } => tracing::info!("POST /shutdown received"),
    }
}

/// Calls `on_event` with each of a prediction's events, those already past first, until
/// it completes.
async fn follow_events(
    prediction: &runner_engine::Running,
    mut on_event: impl FnMut(&StreamEvent),
) {
    let mut events = prediction.subscribe();
    let mut replay = std::mem::take(&mut events.replay);
    loop {
        let event = match replay.pop_front() {
            Some(e) => e,
            None => match events.receiver.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            },
        };
        on_event(&event);
        if matches!(*event, StreamEvent::Completed(_)) {
            break;
        }
    }
}

struct ChatSettings {
    system: Option<String>,
    temperature: f64,
    max_tokens: u64,
    seed: Option<u64>,
}

/// `runner chat`: a conversation in the terminal, one prediction per answer.
async fn chat(
    dir: &Path,
    device: DeviceSpec,
    snapshot: SnapshotOptions,
    settings: ChatSettings,
) -> Result<ExitCode> {
    let options = EngineOptions {
        snapshot,
        progress: progress_bars(),
        ..Default::default()
    };
    let engine = open_engine(dir, device, options)?;
    if engine.openai() != runner_models::OpenAi::TextGeneration {
        bail!(
            "{}: {} does not generate text; runner chat talks to text generators such as candle:llama",
            dir.display(),
            engine.run_target()
        );
    }
    engine
        .setup()
        .await
        .map_err(|e| anyhow::anyhow!("setup failed: {e}"))?;
    let greeting = [runner_models::ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    if engine.chat_prompt(&greeting).is_none_or(|r| r.is_err()) {
        bail!(
            "{}: the model has no chat template to hold a conversation with; use `runner run` to continue text",
            dir.display()
        );
    }
    let terminal = std::io::stdin().is_terminal();
    let start = || -> Vec<runner_models::ChatMessage> {
        settings
            .system
            .iter()
            .map(|s| runner_models::ChatMessage {
                role: "system".into(),
                content: s.clone(),
            })
            .collect()
    };
    let mut history = start();
    if terminal {
        eprintln!(
            "runner: chatting with {} (an empty line ends, /reset starts over)",
            engine.model_name()
        );
    }
    let mut lines = std::io::stdin().lines();
    loop {
        if terminal {
            eprint!("> ");
        }
        let Some(line) = lines.next().transpose().context("reading stdin")? else {
            break;
        };
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        if line == "/reset" {
            history = start();
            continue;
        }
        history.push(runner_models::ChatMessage {
            role: "user".into(),
            content: line,
        });
        let prompt = engine
            .chat_prompt(&history)
            .context("the model is not loaded")?
            .map_err(|e| anyhow::anyhow!(e))?;
        let mut input = serde_json::json!({
            "prompt": prompt,
            "use_chat_template": false,
            "temperature": settings.temperature,
            "max_new_tokens": settings.max_tokens,
        });
        if let Some(seed) = settings.seed {
            input["seed"] = seed.into();
        }
        let prediction = engine
            .submit(new_prediction_id(), &input)
            .map_err(|r| anyhow::anyhow!("the model cannot take the turn: {r:?}"))?;
        let mut answer = String::new();
        follow_events(&prediction, |event| {
            if let StreamEvent::Output {
                chunk: Value::String(text),
                ..
            } = event
            {
                print!("{text}");
                let _ = std::io::stdout().flush();
                answer.push_str(text);
            }
        })
        .await;
        prediction.wait().await;
        println!();
        if prediction.status() != PredictionStatus::Succeeded {
            bail!(
                "the answer failed: {}",
                prediction.error().unwrap_or_default()
            );
        }
        history.push(runner_models::ChatMessage {
            role: "assistant".into(),
            content: answer,
        });
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(
    dir: &Path,
    inputs: &[String],
    json: Option<&str>,
    output: Option<&Path>,
    device: DeviceSpec,
    mode: Mode,
    snapshot: SnapshotOptions,
) -> Result<ExitCode> {
    let options = EngineOptions {
        mode,
        snapshot,
        progress: progress_bars(),
        ..Default::default()
    };
    let engine = open_engine(dir, device, options)?;
    let mut input = match json {
        Some(j) => {
            let text = read_arg_source(j).context("--json")?;
            match serde_json::from_str::<Value>(&text).context("--json is not valid JSON")? {
                Value::Object(m) => m,
                other => bail!("--json must be a JSON object of inputs, got {other}"),
            }
        }
        None => Map::new(),
    };
    runner_engine::cli_inputs::parse_inputs(engine.signature(), inputs, &mut input)?;

    let validated = match engine.validate(&Value::Object(input)) {
        Ok(v) => v,
        Err(issues) => {
            for issue in issues {
                let name = issue
                    .loc
                    .iter()
                    .skip(2)
                    .map(|s| s.as_str().map(str::to_string).unwrap_or(s.to_string()))
                    .collect::<Vec<_>>()
                    .join(".");
                eprintln!("error: input `{name}`: {}", issue.msg);
            }
            return Ok(ExitCode::from(2));
        }
    };
    engine
        .setup()
        .await
        .map_err(|e| anyhow::anyhow!("setup failed: {e}"))?;
    let prediction = engine
        .submit(new_prediction_id(), &Value::Object(validated))
        .map_err(|r| match r {
            Rejection::InvalidInput(issues) => anyhow::anyhow!("invalid input: {issues:?}"),
            other => anyhow::anyhow!("the model cannot take the prediction: {other:?}"),
        })?;
    // Logs go to stderr as they come; text from a ConcatenateIterator model goes to stdout
    // as it is generated (unless -o collects it).
    let concatenates = matches!(
        engine.signature().output,
        runner_spec::OutputType::ConcatenateIterator(_)
    );
    let mut streamed = false;
    follow_events(&prediction, |event| match event {
        StreamEvent::Log { data } => eprint!("{data}"),
        StreamEvent::Output {
            chunk: Value::String(text),
            ..
        } if concatenates && output.is_none() => {
            print!("{text}");
            let _ = std::io::stdout().flush();
            streamed = true;
        }
        _ => {}
    })
    .await;
    prediction.wait().await;
    if streamed {
        println!();
    }
    match prediction.status() {
        PredictionStatus::Succeeded => {
            let value = prediction.output().unwrap_or(Value::Null);
            let data_uris: Option<Vec<&str>> = match &value {
                Value::String(s) if s.starts_with("data:") => Some(vec![s.as_str()]),
                Value::Array(items) if !items.is_empty() => items
                    .iter()
                    .map(|v| v.as_str().filter(|s| s.starts_with("data:")))
                    .collect(),
                _ => None,
            };
            if let (Some(path), Some(uris)) = (output, &data_uris) {
                // Files go to -o as their bytes: one file, or a folder for a list.
                let single = value.is_string();
                if !single {
                    std::fs::create_dir_all(path)
                        .with_context(|| format!("creating the folder {}", path.display()))?;
                }
                for (i, uri) in uris.iter().enumerate() {
                    let (mime, bytes) = runner_engine::files::decode_data_uri(&uri[5..], u64::MAX)
                        .map_err(|e| anyhow::anyhow!("output file {i}: {e}"))?;
                    let target = if single {
                        path.to_path_buf()
                    } else {
                        path.join(format!("{i}{}", runner_engine::files::extension_for(&mime)))
                    };
                    std::fs::write(&target, bytes)
                        .with_context(|| format!("writing {}", target.display()))?;
                    eprintln!("runner: wrote {}", target.display());
                }
            } else if streamed {
                // Already printed as it came.
            } else if let (true, Value::Array(items)) = (concatenates, &value) {
                let text: String = items.iter().filter_map(Value::as_str).collect();
                match output {
                    Some(path) => std::fs::write(path, text + "\n")
                        .with_context(|| format!("writing {}", path.display()))?,
                    None => println!("{text}"),
                }
            } else {
                let text = match &value {
                    Value::String(s) => s.clone(),
                    other => serde_json::to_string_pretty(other)?,
                };
                match output {
                    Some(path) => std::fs::write(path, text + "\n")
                        .with_context(|| format!("writing {}", path.display()))?,
                    None => println!("{text}"),
                }
            }
            tracing::info!(
                "predicted in {:.3}s",
                prediction.predict_time().unwrap_or_default().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        PredictionStatus::Canceled => {
            eprintln!("error: prediction canceled");
            Ok(ExitCode::FAILURE)
        }
        _ => {
            eprintln!(
                "error: prediction failed: {}",
                prediction.error().unwrap_or_default()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `@path` reads a file, `@-` stdin; anything else is the value itself.
fn read_arg_source(arg: &str) -> Result<String> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            Ok(s)
        }
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}")),
        None => Ok(arg.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
