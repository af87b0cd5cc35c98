//! `cog.yaml`, parsed with Cog 0.23's field set and validated with its rules.
//!
//! Unknown keys are errors, as in Cog (its JSON schema sets `additionalProperties: false`).
//! Every error names the file, the line, the key and what to do about it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A problem with `cog.yaml`: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line of the offending key, when known.
    pub line: Option<u64>,
    /// Dotted key path, e.g. `weights[0].source.uri`.
    pub key: String,
    /// What is wrong and what to do, already including the key.
    pub message: String,
}

/// What `run:` (or the deprecated `predict:`) points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunTarget {
    /// `candle:<architecture>`: a native architecture compiled into runner.
    Native { architecture: String },
    /// `file.py:Class`: a Python Cog predictor.
    Python { file: String, class: String },
}

impl fmt::Display for RunTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunTarget::Native { architecture } => write!(f, "candle:{architecture}"),
            RunTarget::Python { file, class } => write!(f, "{file}:{class}"),
        }
    }
}

/// A validated `cog.yaml`.
#[derive(Debug, Clone)]
pub struct CogConfig {
    pub path: PathBuf,
    pub run: RunTarget,
    /// 1-based line of the `run:`/`predict:` key.
    pub run_line: u64,
    /// `train:`: the Python training function (or class) served by `runner serve --mode
    /// train`, as Cog's `--x-mode train` serves it.
    pub train: Option<RunTarget>,
    pub gpu: bool,
    pub model: Option<String>,
    pub image: Option<String>,
    pub concurrency_max: Option<u32>,
    pub environment: BTreeMap<String, String>,
    pub weights: Vec<WeightEntry>,
    /// `build:`, as far as a package that builds the Python environment needs it.
    pub build: BuildConfig,
}

/// What `build:` asks of the image a Python predictor runs in (runner does not build
/// images; `runner package --target modal` turns this into Modal's image steps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildConfig {
    pub python_version: Option<String>,
    pub python_packages: Vec<String>,
    /// A requirements file, relative to the model directory.
    pub python_requirements: Option<String>,
    pub system_packages: Vec<String>,
    /// `build.run` commands, in order.
    pub run: Vec<String>,
    /// The ids of the build secrets `build.run` mounts (Cog's `mounts`), which a package
    /// for another platform cannot carry.
    pub secret_mounts: Vec<String>,
}

/// One entry of Cog's `weights:` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightEntry {
    pub name: String,
    /// Where Cog mounts the weights in its container; kept for packaging.
    pub target: String,
    pub sources: Vec<WeightSource>,
    pub line: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSource {
    pub uri: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub line: u64,
}

// ---- the raw file, exactly Cog 0.23's keys ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    build: Option<Spanned<RawBuild>>,
    image: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    run: Option<Spanned<String>>,
    predict: Option<Spanned<String>>,
    train: Option<Spanned<String>>,
    concurrency: Option<Spanned<RawConcurrency>>,
    #[allow(dead_code)]
    observability: Option<RawObservability>,
    environment: Option<Vec<Spanned<String>>>,
    weights: Option<Vec<Spanned<RawWeight>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed so that Cog's keys are accepted; runner has no image to build
struct RawBuild {
    gpu: Option<bool>,
    python_version: Option<Spanned<StringOrNumber>>,
    python_requirements: Option<String>,
    python_packages: Option<Vec<String>>,
    run: Option<Vec<RawRunItem>>,
    system_packages: Option<Vec<String>>,
    pre_install: Option<Vec<String>>,
    cuda: Option<Spanned<String>>,
    cudnn: Option<String>,
    sdk_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrNumber {
    String(String),
    Number(f64),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum RawRunItem {
    Command(String),
    WithMounts {
        command: String,
        #[serde(default)]
        mounts: Vec<RawMount>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawMount {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    target: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConcurrency {
    max: Option<Spanned<i64>>,
    #[allow(dead_code)]
    default_target: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawObservability {
    config: Option<String>,
    traces: Option<RawTraces>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawTraces {
    enabled: Option<bool>,
    sampler: Option<String>,
    sampler_arg: Option<String>,
    trace_header: Option<String>,
    trace_header_format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeight {
    name: Option<String>,
    target: Option<String>,
    source: Option<Spanned<RawSourceList>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSourceList {
    One(RawSource),
    Many(Vec<RawSource>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    uri: Option<String>,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
}

/// Cog reserves these for its runtime (pkg/config/env.go).
const ENVIRONMENT_DENY_LIST: &[&str] = &[
    "PATH",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYTHONUNBUFFERED",
    "R8_*",
    "REPLICATE_*",
    "COG_OBSERVABILITY_*",
    "COG_TRACE_*",
    "OTEL_*",
    "LIBRARY_PATH",
    "CUDA_*",
    "NVIDIA_*",
    "NV_*",
    "PGET_*",
    "HF_ENDPOINT",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "KUBERNETES_*",
];

impl CogConfig {
    /// Reads and validates `path` (a `cog.yaml`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!(
                "cannot read cog.yaml: {e}; a model directory needs a cog.yaml with at least `run: \"candle:<architecture>\"`"
            ),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `cog.yaml` text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let err = |line: Option<u64>, key: &str, message: String| ConfigError {
            file: path.to_path_buf(),
            line,
            key: key.to_string(),
            message,
        };
        let raw: RawConfig = if text.trim().is_empty() {
            return Err(err(
                None,
                "run",
                "cog.yaml is empty; add `run: \"candle:<architecture>\"` (for example `run: \"candle:bert\"`)".into(),
            ));
        } else {
            serde_saphyr::from_str(text).map_err(|e| {
                let line = e.location().map(|l| l.line()).filter(|&l| l > 0);
                let msg = first_line(&e.to_string());
                let (key, message) = explain_parse_error(&msg);
                err(line, &key, message)
            })?
        };

        let line_of = |s: &serde_saphyr::Location| Some(s.line()).filter(|&l| l > 0);

        // run / predict (deprecated alias), exactly one.
        let (run_key, run) = match (&raw.run, &raw.predict) {
            (Some(r), Some(p)) if !r.value.is_empty() && !p.value.is_empty() => {
                return Err(err(
                    line_of(&p.referenced),
                    "predict",
                    "only one of `run` or `predict` can be set; `predict` is the deprecated name of `run`, remove it".into(),
                ))
            }
            (Some(r), _) if !r.value.is_empty() => ("run", r),
            (_, Some(p)) if !p.value.is_empty() => ("predict", p),
            _ => {
                return Err(err(
                    None,
                    "run",
                    "no `run` key: add `run: \"candle:<architecture>\"` (native, e.g. `candle:bert`) or `run: \"predict.py:Predictor\"` (Python)".into(),
                ))
            }
        };
        let run_line = line_of(&run.referenced);
        let target = parse_run_target(&run.value).map_err(|m| err(run_line, run_key, m))?;

        let train = match &raw.train {
            Some(train) if !train.value.is_empty() => {
                let line = line_of(&train.referenced);
                match parse_run_target(&train.value) {
                    Ok(t @ RunTarget::Python { .. }) => Some(t),
                    Ok(RunTarget::Native { .. }) => {
                        return Err(err(
                            line,
                            "train",
                            format!(
                                "`train: {}`: trainings run Python code; name a training function as 'train.py:train' (native candle: architectures only predict)",
                                train.value
                            ),
                        ))
                    }
                    Err(_) => {
                        return Err(err(
                            line,
                            "train",
                            format!(
                                "`train: {}` must be in the form 'train.py:train' (a Python training function)",
                                train.value
                            ),
                        ))
                    }
                }
            }
            _ => None,
        };

        let mut gpu = false;
        let mut build_config = BuildConfig::default();
        if let Some(build) = &raw.build {
            gpu = build.value.gpu.unwrap_or(false);
            if let Some(v) = &build.value.python_version {
                let version = match &v.value {
                    StringOrNumber::String(s) => s.clone(),
                    StringOrNumber::Number(n) => n.to_string(),
                };
                validate_python_version(&version)
                    .map_err(|m| err(line_of(&v.referenced), "build.python_version", m))?;
                build_config.python_version = Some(version);
            }
            build_config.python_packages = build.value.python_packages.clone().unwrap_or_default();
            build_config.python_requirements = build.value.python_requirements.clone();
            build_config.system_packages = build.value.system_packages.clone().unwrap_or_default();
            for item in build.value.run.iter().flatten() {
                match item {
                    RawRunItem::Command(command) => build_config.run.push(command.clone()),
                    RawRunItem::WithMounts { command, mounts } => {
                        build_config.run.push(command.clone());
                        build_config
                            .secret_mounts
                            .extend(mounts.iter().map(|m| m.id.clone()));
                    }
                }
            }
            if let Some(cuda) = &build.value.cuda {
                let major = cuda
                    .value
                    .split('.')
                    .next()
                    .and_then(|m| m.parse::<u32>().ok());
                if major.is_none_or(|m| m < 11) {
                    return Err(err(
                        line_of(&cuda.referenced),
                        "build.cuda",
                        format!("`build.cuda: {}` is not supported: Cog needs CUDA 11 or newer, written like \"12.4\"", cuda.value),
                    ));
                }
            }
        }

        let mut concurrency_max = None;
        if let Some(c) = &raw.concurrency {
            let Some(max) = &c.value.max else {
                return Err(err(
                    line_of(&c.referenced),
                    "concurrency",
                    "`concurrency` needs `max`, the number of predictions that may run at once (e.g. `max: 1`)".into(),
                ));
            };
            if max.value < 1 || max.value > u32::MAX as i64 {
                return Err(err(
                    line_of(&max.referenced),
                    "concurrency.max",
                    format!("`concurrency.max: {}` must be at least 1", max.value),
                ));
            }
            concurrency_max = Some(max.value as u32);
        }

        let mut environment = BTreeMap::new();
        for (i, entry) in raw.environment.iter().flatten().enumerate() {
            let key = format!("environment[{i}]");
            let line = line_of(&entry.referenced);
            let Some((name, value)) = entry.value.split_once('=').filter(|(n, _)| !n.is_empty())
            else {
                return Err(err(
                    line,
                    &key,
                    format!(
                        "environment variable {:?} is not in the KEY=VALUE format",
                        entry.value
                    ),
                ));
            };
            let valid_name = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                return Err(err(
                    line,
                    &key,
                    format!(
                        "environment variable name {name:?} must match ^[A-Za-z_][A-Za-z0-9_]*$"
                    ),
                ));
            }
            let reserved = ENVIRONMENT_DENY_LIST
                .iter()
                .any(|p| match p.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix),
                    None => *p == name,
                });
            if reserved {
                return Err(err(line, &key, format!("environment variable {name:?} is not allowed: reserved for internal use; choose another name")));
            }
            if environment
                .insert(name.to_string(), value.to_string())
                .is_some()
            {
                return Err(err(
                    line,
                    &key,
                    format!(
                        "environment variable {name:?} is already defined; remove the duplicate"
                    ),
                ));
            }
        }

        let model = raw
            .model
            .as_ref()
            .map(|m| m.value.clone())
            .filter(|m| !m.is_empty());
        let image = raw
            .image
            .as_ref()
            .map(|m| m.value.clone())
            .filter(|m| !m.is_empty());
        if let (Some(_), Some(i)) = (&model, &raw.image) {
            return Err(err(
                line_of(&i.referenced),
                "model",
                "'model' and 'image' cannot both be set; keep `model`".into(),
            ));
        }
        if let (Some(m), Some(raw_model)) = (&model, &raw.model) {
            let last = m.rsplit('/').next().unwrap_or(m);
            if m.contains('@') || last.contains(':') {
                return Err(err(
                    line_of(&raw_model.referenced),
                    "model",
                    format!(
                        "`model: {m}` must be a bare repository — tags and digests are not allowed"
                    ),
                ));
            }
        }

        let weights = validate_weights(&raw, model.is_some(), &err, &line_of)?;

        Ok(CogConfig {
            path: path.to_path_buf(),
            run: target,
            run_line: run_line.unwrap_or(0),
            train,
            build: build_config,
            gpu,
            model,
            image,
            concurrency_max,
            environment,
            weights,
        })
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

/// Turns serde's wording into Cog's: which key, and what to do.
fn explain_parse_error(msg: &str) -> (String, String) {
    if let Some(rest) = msg.split("unknown field `").nth(1) {
        let key = rest.split('`').next().unwrap_or_default().to_string();
        let expected = rest
            .split("expected ")
            .nth(1)
            .map(|e| format!(" (expected {e})"))
            .unwrap_or_default();
        return (
            key.clone(),
            format!("unknown key `{key}`: Cog 0.23 does not accept it here{expected}; remove it or fix its spelling"),
        );
    }
    if let Some(rest) = msg.split("missing field `").nth(1) {
        let key = rest.split('`').next().unwrap_or_default().to_string();
        return (key.clone(), format!("missing required key `{key}`"));
    }
    if msg.contains("RawSourceList") {
        return (
            "source".into(),
            "a weights `source` must be a mapping with `uri` (and optional `include`/`exclude` lists), or a list of such mappings; check for misspelled keys".into(),
        );
    }
    (String::new(), format!("invalid cog.yaml: {msg}"))
}

fn parse_run_target(value: &str) -> Result<RunTarget, String> {
    if let Some(architecture) = value.strip_prefix("candle:") {
        if architecture.is_empty() {
            return Err("`candle:` needs an architecture name, e.g. `run: \"candle:bert\"`".into());
        }
        return Ok(RunTarget::Native {
            architecture: architecture.to_string(),
        });
    }
    match value.split_once(".py:") {
        Some((file, class)) if !file.is_empty() && !class.is_empty() && !class.contains(".py:") => {
            Ok(RunTarget::Python { file: format!("{file}.py"), class: class.to_string() })
        }
        _ => Err(format!(
            "`{value}` must be in the form 'run.py:Runner' (a Python predictor) or 'candle:<architecture>' (native)"
        )),
    }
}

fn validate_python_version(version: &str) -> Result<(), String> {
    let parts: Vec<&str> = version.trim().splitn(3, '.').collect();
    if parts.len() < 2 {
        return Err(format!(
            "`build.python_version: {version}` must include major and minor version (e.g. '3.11')"
        ));
    }
    let (Ok(major), Ok(minor)) = (parts[0].parse::<u32>(), parts[1].parse::<u32>()) else {
        return Err(format!(
            "`build.python_version: {version}` is not a version number (e.g. '3.11')"
        ));
    };
    if major < 3 || (major == 3 && minor < 10) {
        return Err(format!(
            "`build.python_version: {version}`: minimum supported Python version is 3.10"
        ));
    }
    Ok(())
}

fn validate_weights(
    raw: &RawConfig,
    model_set: bool,
    err: &dyn Fn(Option<u64>, &str, String) -> ConfigError,
    line_of: &dyn Fn(&serde_saphyr::Location) -> Option<u64>,
) -> Result<Vec<WeightEntry>, ConfigError> {
    let Some(entries) = &raw.weights else {
        return Ok(Vec::new());
    };
    if !entries.is_empty() && !model_set {
        return Err(err(
            entries.first().and_then(|e| line_of(&e.referenced)),
            "model",
            "weights require 'model' in cog.yaml (a bare repository name such as `model: local/my-model`)".into(),
        ));
    }
    let name_ok = |n: &str| {
        n.split(['.', '_', '-']).all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
    };
    let mut names = std::collections::HashSet::new();
    let mut targets: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let idx = format!("weights[{i}]");
        let line = line_of(&entry.referenced);
        let w = &entry.value;
        let name = match &w.name {
            None => return Err(err(line, &format!("{idx}.name"), format!("`{idx}.name` is required"))),
            Some(n) if !name_ok(n) => {
                return Err(err(line, &format!("{idx}.name"), format!("`{idx}.name: {n}` must contain only lowercase alphanumeric characters, hyphens, dots, or underscores (e.g. \"my-model-weights\")")))
            }
            Some(n) if !names.insert(n.clone()) => {
                return Err(err(line, &format!("{idx}.name"), format!("duplicate weight name {n:?}")))
            }
            Some(n) => n.clone(),
        };
        let target = match &w.target {
            None => {
                return Err(err(
                    line,
                    &format!("{idx}.target"),
                    format!("`{idx}.target` is required (an absolute path such as /src/weights)"),
                ))
            }
            Some(t) if !t.starts_with('/') => {
                return Err(err(
                    line,
                    &format!("{idx}.target"),
                    format!("`{idx}.target: {t}` must be an absolute path"),
                ))
            }
            Some(t) => {
                let cleaned = t.trim_end_matches('/').to_string();
                if cleaned.is_empty() {
                    return Err(err(
                        line,
                        &format!("{idx}.target"),
                        format!("`{idx}.target` must not be the container root \"/\""),
                    ));
                }
                for prev in &targets {
                    if *prev == cleaned
                        || prev.starts_with(&format!("{cleaned}/"))
                        || cleaned.starts_with(&format!("{prev}/"))
                    {
                        return Err(err(line, &format!("{idx}.target"), format!("`{idx}.target: {t}` overlaps with {prev:?}; weight targets must be disjoint")));
                    }
                }
                targets.push(cleaned);
                t.clone()
            }
        };
        let source_line = w
            .source
            .as_ref()
            .and_then(|s| line_of(&s.referenced))
            .or(line);
        let raw_sources: Vec<&RawSource> = match w.source.as_ref().map(|s| &s.value) {
            None => vec![],
            Some(RawSourceList::One(s)) => vec![s],
            Some(RawSourceList::Many(v)) => v.iter().collect(),
        };
        if raw_sources.is_empty() {
            return Err(err(
                line,
                &format!("{idx}.source"),
                format!("`{idx}.source` is required, e.g. `source: {{uri: ./weights}}`"),
            ));
        }
        let mut sources = Vec::new();
        for (j, s) in raw_sources.iter().enumerate() {
            let key = if raw_sources.len() == 1 {
                format!("{idx}.source")
            } else {
                format!("{idx}.source[{j}]")
            };
            let sline = source_line;
            let Some(uri) = s.uri.clone().filter(|u| !u.is_empty()) else {
                return Err(err(sline, &format!("{key}.uri"), format!("`{key}.uri` is required (a path relative to the model directory, e.g. ./weights)")));
            };
            for (field, patterns) in [("include", &s.include), ("exclude", &s.exclude)] {
                for (k, p) in patterns.iter().enumerate() {
                    let p = p.trim();
                    let pkey = format!("{key}.{field}[{k}]");
                    if p.is_empty() {
                        return Err(err(
                            sline,
                            &pkey,
                            format!("`{pkey}`: pattern must not be empty"),
                        ));
                    }
                    if p.starts_with('!') {
                        return Err(err(sline, &pkey, format!("`{pkey}: {p}`: negation patterns (starting with '!') are not supported")));
                    }
                    if p.contains('\\') {
                        return Err(err(
                            sline,
                            &pkey,
                            format!(
                                "`{pkey}: {p}`: patterns must use forward slashes, not backslashes"
                            ),
                        ));
                    }
                }
            }
            sources.push(WeightSource {
                uri,
                include: s.include.iter().map(|p| p.trim().to_string()).collect(),
                exclude: s.exclude.iter().map(|p| p.trim().to_string()).collect(),
                line: sline.unwrap_or(0),
            });
        }
        out.push(WeightEntry {
            name,
            target,
            sources,
            line: line.unwrap_or(0),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CogConfig, ConfigError> {
        CogConfig::parse(Path::new("m/cog.yaml"), text)
    }

    #[test]
    fn native_and_python_targets() {
        let c = parse("run: \"candle:bert\"\n").unwrap();
        assert_eq!(
            c.run,
            RunTarget::Native {
                architecture: "bert".into()
            }
        );
        let c =
            parse("build:\n  python_version: \"3.11\"\npredict: predict.py:Predictor\n").unwrap();
        assert_eq!(
            c.run,
            RunTarget::Python {
                file: "predict.py".into(),
                class: "Predictor".into()
            }
        );
        assert_eq!(c.run_line, 3);
    }

    #[test]
    fn train_names_a_python_function() {
        let c = parse("run: predict.py:Predictor\ntrain: \"train.py:train\"\n").unwrap();
        assert_eq!(
            c.train,
            Some(RunTarget::Python {
                file: "train.py".into(),
                class: "train".into()
            })
        );
        assert_eq!(parse("run: predict.py:Predictor\n").unwrap().train, None);
        let native = parse("run: candle:bert\ntrain: candle:bert\n").unwrap_err();
        assert_eq!((native.key.as_str(), native.line), ("train", Some(2)));
        assert!(
            native.message.contains("trainings run Python code"),
            "{native}"
        );
        let malformed = parse("run: candle:bert\ntrain: train\n").unwrap_err();
        assert!(
            malformed.message.contains("'train.py:train'"),
            "{malformed}"
        );
    }

    #[test]
    fn build_is_kept_for_packages() {
        let c = parse(
            "build:\n  python_version: \"3.11\"\n  system_packages: [ffmpeg]\n  python_packages: [\"numpy==2.1.3\"]\n  python_requirements: requirements.txt\n  run:\n    - echo one\n    - command: echo two\n      mounts:\n        - type: secret\n          id: pip\n          target: /etc/pip.conf\nrun: predict.py:Predictor\n",
        )
        .unwrap();
        assert_eq!(
            c.build,
            BuildConfig {
                python_version: Some("3.11".into()),
                python_packages: vec!["numpy==2.1.3".into()],
                python_requirements: Some("requirements.txt".into()),
                system_packages: vec!["ffmpeg".into()],
                run: vec!["echo one".into(), "echo two".into()],
                secret_mounts: vec!["pip".into()],
            }
        );
        assert_eq!(
            parse("run: candle:bert\n").unwrap().build,
            BuildConfig::default()
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("run: candle:bert\nconcurency:\n  max: 2\n").unwrap_err();
        assert_eq!(e.key, "concurency");
        assert_eq!(e.line, Some(2), "{e:?}");
        let shown = format!("{e}");
        assert!(shown.starts_with("m/cog.yaml:2:"), "{shown}");
        assert!(shown.contains("unknown key `concurency`"), "{shown}");
    }

    #[test]
    fn nested_unknown_key() {
        let e =
            parse("run: candle:bert\nbuild:\n  gpu: true\n  pyhton_version: '3.11'\n").unwrap_err();
        assert_eq!(e.key, "pyhton_version");
        assert_eq!(e.line, Some(4), "{e:?}");
    }

    #[test]
    fn run_and_predict_conflict() {
        let e = parse("run: candle:bert\npredict: predict.py:Predictor\n").unwrap_err();
        assert_eq!(e.key, "predict");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn bad_values_are_located() {
        let e = parse("run: candle:bert\nconcurrency:\n  max: 0\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("concurrency.max", Some(3)));
        let e = parse("run: nonsense\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("run", Some(1)));
        let e = parse("run: candle:bert\nenvironment:\n  - OK=1\n  - PATH=/x\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("environment[1]", Some(4)));
        assert!(e.message.contains("reserved"));
        let e = parse("build:\n  python_version: '3.8'\nrun: candle:bert\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("build.python_version", Some(2)));
        let e = parse("").unwrap_err();
        assert_eq!(e.key, "run");
        let e = parse("run: [1, 2]\n").unwrap_err();
        assert!(e.to_string().contains("m/cog.yaml"), "{e}");
    }

    #[test]
    fn weights_follow_cog_rules() {
        let ok = "model: local/minilm\nrun: candle:bert\nweights:\n  - name: minilm\n    target: /src/weights\n    source:\n      uri: ./weights\n";
        let c = parse(ok).unwrap();
        assert_eq!(c.weights.len(), 1);
        assert_eq!(c.weights[0].sources[0].uri, "./weights");
        assert_eq!(c.weights[0].line, 4);

        let e = parse(
            "run: candle:bert\nweights:\n  - name: w\n    target: /w\n    source: {uri: ./w}\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "model");
        let e = parse("model: a/b\nrun: candle:bert\nweights:\n  - name: W!\n    target: /w\n    source: {uri: ./w}\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("weights[0].name", Some(4)));
        let e = parse("model: a/b\nrun: candle:bert\nweights:\n  - name: w\n    target: rel\n    source: {uri: ./w}\n").unwrap_err();
        assert_eq!(e.key, "weights[0].target");
        let e = parse("model: a/b\nrun: candle:bert\nweights:\n  - name: w\n    target: /w\n    source: {urx: ./w}\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("source", Some(6)), "{e:?}");
        let e = parse("model: a/b:tag\nrun: candle:bert\n").unwrap_err();
        assert_eq!(e.key, "model");
    }
}
