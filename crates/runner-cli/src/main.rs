//! `runner`: serve Cog-style model directories over Cog's HTTP API, run one prediction, or
//! print a model's OpenAPI schema.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use runner_engine::{new_prediction_id, Engine, PredictionStatus, Rejection};
use runner_models::DeviceSpec;
use runner_spec::{FieldType, ModelDir, Primitive, Signature};
use serde_json::{Map, Value};

#[derive(Parser)]
#[command(
    name = "runner",
    version,
    about = "Serve Cog-style model directories with candle, over Cog's HTTP API"
)]
struct Cli {
    #[command(flatten)]
    logging: Logging,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
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

#[derive(Subcommand)]
enum Command {
    /// Serve a model directory over Cog's HTTP prediction API.
    Serve {
        /// The model directory (holding cog.yaml).
        #[arg(default_value = ".", env = "RUNNER_MODEL_DIR")]
        dir: PathBuf,
        /// Address to listen on (0.0.0.0 to expose it beyond this machine).
        #[arg(long, default_value = "127.0.0.1", env = "RUNNER_HOST")]
        host: String,
        /// Port to listen on (Cog's is 5000; 0 picks a free one).
        #[arg(long, default_value_t = 5000, env = "RUNNER_PORT")]
        port: u16,
        #[command(flatten)]
        device: DeviceArgs,
        /// Predictions that may run at once (default: cog.yaml's concurrency.max, else 1).
        #[arg(long, env = "COG_MAX_CONCURRENCY")]
        concurrency: Option<u32>,
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
    init_logging(&cli.logging);
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
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(l: &Logging) {
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
    let filter = EnvFilter::try_from_env("RUNNER_LOG").unwrap_or_else(|_| EnvFilter::new(default));
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
            host,
            port,
            device,
            concurrency,
        } => serve(&dir, &host, port, device.device, concurrency).await,
        Command::Run {
            dir,
            inputs,
            json,
            output,
            device,
        } => {
            run(
                &dir,
                &inputs,
                json.as_deref(),
                output.as_deref(),
                device.device,
            )
            .await
        }
        Command::Generate {
            architecture: _,
            dir,
            seed,
        } => {
            runner_models::tiny_mlp::write_model(&dir, &Default::default(), seed)?;
            eprintln!(
                "runner: wrote tiny-mlp weights (seed {seed}) to {}",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { dir } => {
            let engine = open_engine(&dir, DeviceSpec::Cpu, None)?;
            std::io::stdout().write_all(engine.openapi_json().as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn open_engine(dir: &Path, device: DeviceSpec, concurrency: Option<u32>) -> Result<Arc<Engine>> {
    let model_dir = ModelDir::open(dir)?;
    Ok(Engine::new(model_dir, device, concurrency)?)
}

async fn serve(
    dir: &Path,
    host: &str,
    port: u16,
    device: DeviceSpec,
    concurrency: Option<u32>,
) -> Result<ExitCode> {
    let started = Instant::now();
    let engine = open_engine(dir, device, concurrency)?;
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
    // Bind before loading, as Cog does: /health-check answers STARTING meanwhile.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}; is another server using port {port}? (choose another with --port)"))?;
    let url = format!("http://{}", listener.local_addr()?);
    tracing::info!("listening on {url}; loading the model");

    let app = runner_server::router(Arc::clone(&engine));
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
    });

    match engine.setup().await {
        Ok(loaded) => eprintln!(
            "runner: ready at {url} · model {} (candle:{}) · device {} · weights {} · ready in {:.2}s",
            engine.model_name(),
            engine.architecture(),
            loaded.device,
            loaded.weights_source,
            started.elapsed().as_secs_f64()
        ),
        Err(e) => eprintln!("runner: setup failed, serving SETUP_FAILED at {url}/health-check: {e}"),
    }
    server.await.context("server task")?.context("server")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn run(
    dir: &Path,
    inputs: &[String],
    json: Option<&str>,
    output: Option<&Path>,
    device: DeviceSpec,
) -> Result<ExitCode> {
    let engine = open_engine(dir, device, None)?;
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
    parse_inputs(engine.signature(), inputs, &mut input)?;

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
    let slot = engine.reserve().map_err(|r| match r {
        Rejection::AtCapacity => anyhow::anyhow!("no free prediction slot"),
        other => anyhow::anyhow!("model not ready: {other:?}"),
    })?;
    let prediction = slot
        .run(new_prediction_id(), validated, Default::default())
        .await;
    if !prediction.logs.is_empty() {
        eprint!("{}", prediction.logs);
    }
    match prediction.status {
        PredictionStatus::Succeeded => {
            let text = match &prediction.output {
                Value::String(s) => s.clone(),
                other => serde_json::to_string_pretty(other)?,
            };
            match output {
                Some(path) => std::fs::write(path, text + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{text}"),
            }
            tracing::info!("predicted in {:.3}s", prediction.predict_time.as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        PredictionStatus::Failed => {
            eprintln!(
                "error: prediction failed: {}",
                prediction.error.unwrap_or_default()
            );
            Ok(ExitCode::FAILURE)
        }
        PredictionStatus::Canceled => {
            eprintln!("error: prediction canceled");
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

/// Turns `-i name=value` arguments into typed JSON inputs, using the signature.
fn parse_inputs(
    signature: &Signature,
    args: &[String],
    input: &mut Map<String, Value>,
) -> Result<()> {
    let mut repeated: Map<String, Value> = Map::new();
    for arg in args {
        let Some((name, raw)) = arg.split_once('=') else {
            bail!("-i {arg}: expected NAME=VALUE (e.g. -i text=hello)");
        };
        let Some(field) = signature.inputs.iter().find(|f| f.name == name) else {
            let names: Vec<&str> = signature.inputs.iter().map(|f| f.name.as_str()).collect();
            bail!(
                "-i {name}: the model has no input named {name:?}; its inputs are: {}",
                names.join(", ")
            );
        };
        let element = match &field.ty {
            FieldType::Prim(p) | FieldType::List(p) => *p,
            FieldType::Union(_) => Primitive::Str,
        };
        let value = typed_value(name, raw, element)?;
        let is_list = matches!(field.ty, FieldType::List(_) | FieldType::Union(_));
        match repeated.get_mut(name) {
            Some(Value::Array(items)) if is_list => items.push(value),
            Some(_) => bail!("-i {name} given twice, but {name} takes one value"),
            None if is_list && matches!(field.ty, FieldType::List(_)) => {
                // A JSON list given at once is the whole list.
                match value {
                    Value::String(ref s) if s.trim_start().starts_with('[') => {
                        repeated.insert(
                            name.into(),
                            serde_json::from_str(s)
                                .with_context(|| format!("-i {name}: not a JSON list"))?,
                        );
                    }
                    v => {
                        repeated.insert(name.into(), Value::Array(vec![v]));
                    }
                }
            }
            None if is_list => {
                repeated.insert(name.into(), Value::Array(vec![value]));
            }
            None => {
                repeated.insert(name.into(), value);
            }
        }
    }
    for (name, value) in repeated {
        // A union of str and list: one -i is a string, several a list.
        let field = signature
            .inputs
            .iter()
            .find(|f| f.name == name)
            .expect("checked above");
        let value = match (&field.ty, value) {
            (FieldType::Union(_), Value::Array(mut items)) if items.len() == 1 => items.remove(0),
            (_, v) => v,
        };
        input.insert(name, value);
    }
    Ok(())
}

fn typed_value(name: &str, raw: &str, p: Primitive) -> Result<Value> {
    if let Some(path) = raw.strip_prefix('@') {
        let bytes = std::fs::read(path)
            .with_context(|| format!("-i {name}=@{path}: cannot read the file"))?;
        return Ok(match p {
            Primitive::Path | Primitive::File => {
                let mime = mime_for(Path::new(path));
                Value::String(format!(
                    "data:{mime};base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                ))
            }
            _ => Value::String(
                String::from_utf8(bytes)
                    .with_context(|| format!("-i {name}=@{path}: not UTF-8 text"))?,
            ),
        });
    }
    Ok(match p {
        Primitive::Int => Value::from(
            raw.trim()
                .parse::<i64>()
                .with_context(|| format!("-i {name}={raw}: not an integer"))?,
        ),
        Primitive::Float => serde_json::Number::from_f64(
            raw.trim()
                .parse::<f64>()
                .with_context(|| format!("-i {name}={raw}: not a number"))?,
        )
        .map(Value::Number)
        .with_context(|| format!("-i {name}={raw}: not a finite number"))?,
        Primitive::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            _ => bail!("-i {name}={raw}: not a boolean (true or false)"),
        },
        Primitive::Any => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into())),
        Primitive::Str | Primitive::Secret | Primitive::Path | Primitive::File => {
            Value::String(raw.into())
        }
    })
}

fn mime_for(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("txt") => "text/plain",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        _ => "application/octet-stream",
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

    #[test]
    fn typed_inputs_follow_the_signature() {
        let sig = runner_models::conformance::signature();
        let mut m = Map::new();
        parse_inputs(
            &sig,
            &[
                "text=hi".into(),
                "count=2".into(),
                "ratio=0.25".into(),
                "flag=true".into(),
                "tags=x".into(),
                "tags=y".into(),
            ],
            &mut m,
        )
        .unwrap();
        assert_eq!(
            Value::Object(m),
            serde_json::json!({"text": "hi", "count": 2, "ratio": 0.25, "flag": true, "tags": ["x", "y"]})
        );
        let mut m = Map::new();
        assert!(parse_inputs(&sig, &["count=two".into()], &mut m)
            .unwrap_err()
            .to_string()
            .contains("not an integer"));
        assert!(parse_inputs(&sig, &["nope=1".into()], &mut m)
            .unwrap_err()
            .to_string()
            .contains("no input named"));
        let bert = runner_models::bert::signature();
        let mut m = Map::new();
        parse_inputs(&bert, &["text=a".into()], &mut m).unwrap();
        assert_eq!(m["text"], "a");
        let mut m = Map::new();
        parse_inputs(&bert, &["text=a".into(), "text=b".into()], &mut m).unwrap();
        assert_eq!(m["text"], serde_json::json!(["a", "b"]));
    }
}
