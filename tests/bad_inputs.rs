//! Bad model directories give clear errors (what, where, what to do) and never a crash:
//! broken cog.yaml, unsupported predictors, missing, truncated and mismatched weights.

mod support;

use std::fs;

use serde_json::Value;
use support::*;

fn write_cog_yaml(dir: &std::path::Path, text: &str) {
    fs::write(dir.join("cog.yaml"), text).unwrap();
}

#[test]
fn broken_cog_yaml_names_file_line_and_key() {
    let d = scratch_model("conformance");
    write_cog_yaml(
        d.path(),
        "build:\n  python_version: \"3.11\"\nrun: \"candle:conformance\"\nconcurency:\n  max: 2\n",
    );
    for cmd in ["serve", "schema"] {
        let (code, _, stderr) = runner(
            &[cmd, d.path().to_str().unwrap(), "--port", "0"][..if cmd == "serve" { 4 } else { 2 }],
        );
        assert_eq!(code, 1, "{cmd}: {stderr}");
        assert!(
            stderr.contains("cog.yaml:4") && stderr.contains("unknown key `concurency`"),
            "{cmd}: {stderr}"
        );
    }
    write_cog_yaml(
        d.path(),
        "run: \"candle:conformance\"\nconcurrency:\n  max: 0\n",
    );
    let (code, _, stderr) = runner(&["schema", d.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cog.yaml:3") && stderr.contains("concurrency.max"),
        "{stderr}"
    );
    write_cog_yaml(d.path(), "run: [\n");
    let (code, _, stderr) = runner(&["schema", d.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cog.yaml"), "{stderr}");
}

#[test]
fn unknown_architectures_are_named() {
    let d = tempfile::tempdir().unwrap();
    write_cog_yaml(d.path(), "run: \"candle:gpt9\"\n");
    let (code, _, stderr) = runner(&["schema", d.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("unknown architecture") && stderr.contains("candle:bert"),
        "{stderr}"
    );
}

#[test]
fn missing_weights_folder_is_a_config_error() {
    let d = scratch_model("tiny-mlp");
    let (code, _, stderr) = runner(&["serve", d.path().to_str().unwrap(), "--port", "0"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("weights[0].source.uri") && stderr.contains("./weights"),
        "{stderr}"
    );
}

fn setup_failure(dir: &std::path::Path) -> (Server, Value) {
    let server = Server::start(dir, &[]);
    assert!(
        server.status_line.contains("setup failed"),
        "{}",
        server.status_line
    );
    let (status, body) = server.get("/health-check");
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "SETUP_FAILED", "{health}");
    assert_eq!(health["setup"]["status"], "failed");
    let (status, body) = server.post_json("/predictions", r#"{"input": {"vector": [1.0]}}"#);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("health-check"), "{body}");
    (server, health)
}

#[test]
fn truncated_weights_fail_setup_with_logs() {
    let d = scratch_model("tiny-mlp");
    let weights = d.path().join("weights");
    runner_models::tiny_mlp::write_model(&weights, &Default::default(), 1).unwrap();
    let file = weights.join("model.safetensors");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let (_server, health) = setup_failure(d.path());
    let logs = health["setup"]["logs"].as_str().unwrap();
    assert!(
        logs.contains("model.safetensors")
            && logs.contains("truncated")
            && logs.contains("tensor `"),
        "{logs}"
    );
}

#[test]
fn mismatched_weights_name_the_tensor() {
    let d = scratch_model("tiny-mlp");
    let weights = d.path().join("weights");
    let small = runner_models::tiny_mlp::TinyMlpConfig {
        input_size: 8,
        hidden_size: 16,
        output_size: 4,
        ..Default::default()
    };
    runner_models::tiny_mlp::write_model(&weights, &small, 1).unwrap();
    // config.json claims a different hidden size than the tensors have.
    fs::write(
        weights.join("config.json"),
        r#"{"input_size": 8, "hidden_size": 32, "output_size": 4}"#,
    )
    .unwrap();
    let (_server, health) = setup_failure(d.path());
    let logs = health["setup"]["logs"].as_str().unwrap();
    assert!(
        logs.contains("tensor `fc1.weight`")
            && logs.contains("[16, 8]")
            && logs.contains("[32, 8]"),
        "{logs}"
    );

    // A tensor missing altogether.
    runner_models::weights::write_f32_safetensors(
        &weights.join("model.safetensors"),
        &[("fc1.weight", vec![16, 8], vec![0.0; 128])],
    )
    .unwrap();
    fs::write(
        weights.join("config.json"),
        r#"{"input_size": 8, "hidden_size": 16, "output_size": 4}"#,
    )
    .unwrap();
    let (_server, health) = setup_failure(d.path());
    let logs = health["setup"]["logs"].as_str().unwrap();
    assert!(logs.contains("tensor `fc1.bias` is missing"), "{logs}");

    // config.json itself broken.
    fs::write(weights.join("config.json"), r#"{"input_size": "eight"}"#).unwrap();
    let (_server, health) = setup_failure(d.path());
    let logs = health["setup"]["logs"].as_str().unwrap();
    assert!(
        logs.contains("config.json") && logs.contains("invalid for candle:tiny-mlp"),
        "{logs}"
    );
}

/// A memory cgroup (v2, else v1) limiting what it holds to `limit` bytes; removed on drop.
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn create(limit: u64) -> Result<MemoryCgroup, String> {
        let name = format!("runner-test-oom-{}", std::process::id());
        let unified = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let (dir, limit_file) = if unified {
            (
                std::path::Path::new("/sys/fs/cgroup").join(&name),
                "memory.max",
            )
        } else {
            (
                std::path::Path::new("/sys/fs/cgroup/memory").join(&name),
                "memory.limit_in_bytes",
            )
        };
        fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let group = MemoryCgroup { dir };
        fs::write(group.dir.join(limit_file), limit.to_string())
            .map_err(|e| format!("setting {limit_file}: {e}"))?;
        Ok(group)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Fault run (issue 10): a model too big for the memory the process may use. `runner
/// serve` runs in a memory cgroup limited to 256 MiB with 537 MB of weights: setup fails
/// (SETUP_FAILED) with both sizes named and the server keeps answering, instead of the
/// kernel's OOM killer ending it halfway through the load.
#[test]
fn a_model_too_big_for_memory_fails_setup_instead_of_being_killed() {
    let group = match MemoryCgroup::create(256 << 20) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: this machine does not let the test create a memory cgroup ({e})");
            return;
        }
    };
    let dir = generated_tiny_mlp(2048, 32, "f32"); // 537 MB of weights
    let mut shell = std::process::Command::new("sh");
    shell
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("sh")
        .arg(&group.dir)
        .arg(RUNNER);
    let server = Server::start_with(shell, dir.path(), &["--snapshot", "off"]);
    assert!(
        server.status_line.contains("setup failed"),
        "{}",
        server.status_line
    );
    let h: Value = serde_json::from_str(&server.get("/health-check").1).unwrap();
    assert_eq!(h["status"], "SETUP_FAILED", "{h}");
    let logs = h["setup"]["logs"].as_str().unwrap();
    assert!(
        logs.contains("out of memory") && logs.contains("0.54 GB"),
        "{logs}"
    );
    // Still answering, and a prediction is refused with the reason, not a crash.
    let input = runner_models::tiny_mlp::example_input(&Default::default());
    let (status, body) = server.predict(input);
    assert_eq!(status, 503, "{body}");
    drop(server);
}

#[test]
fn a_missing_or_broken_bert_tokenizer_is_named() {
    let d = scratch_model("all-minilm-l6-v2");
    let weights = d.path().join("weights");
    fs::create_dir(&weights).unwrap();
    let real = repo_root().join("models/all-minilm-l6-v2/weights");
    // Copies (links out of the model directory are refused), all but the tokenizer.
    for entry in fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        let to = weights.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            fs::create_dir(&to).unwrap();
            for inner in fs::read_dir(entry.path()).unwrap() {
                let inner = inner.unwrap();
                fs::copy(inner.path(), to.join(inner.file_name())).unwrap();
            }
        } else if entry.file_name() != "tokenizer.json" {
            fs::copy(entry.path(), to).unwrap();
        }
    }
    let dir = d.path().to_str().unwrap();
    let (code, _, stderr) = runner(&["run", dir, "-i", "text=hello", "--device", "cpu"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("tokenizer.json not found") && stderr.contains("candle:bert"),
        "{stderr}"
    );
    fs::write(weights.join("tokenizer.json"), r#"{"model": 7}"#).unwrap();
    let (code, _, stderr) = runner(&["run", dir, "-i", "text=hello", "--device", "cpu"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("tokenizer.json") && stderr.contains("not a usable tokenizer.json"),
        "{stderr}"
    );
}
