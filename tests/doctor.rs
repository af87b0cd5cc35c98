//! `runner doctor`: each finding checked against the real thing it predicts (a snapshot
//! that serve would ignore, weights that would not load, a port taken, a missing `cog`
//! package), and its exit code (1 exactly when serve would not start).

mod support;

use serde_json::Value;
use support::*;

/// Runs `runner doctor ARGS --format json`: (exit code, report, stderr).
fn doctor(args: &[&str]) -> (i32, Value, String) {
    let mut all = vec!["doctor", "--format", "json", "--port", "0"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = runner(&all);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor prints JSON ({e}): {stdout}\n{stderr}"));
    (code, report, stderr)
}

/// The finding of one check: (status, summary, fix).
fn finding(report: &Value, check: &str) -> (String, String, String) {
    let f = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no `{check}` finding: {report:#}"));
    let text = |k: &str| f[k].as_str().unwrap_or_default().to_string();
    (text("status"), text("summary"), text("fix"))
}

fn flip_byte(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

#[test]
fn a_model_with_no_snapshot_is_served_cold_and_the_fix_takes_one() {
    let model = generated_tiny_mlp(64, 2, "f32");
    let dir = model.path().to_str().unwrap();
    let (code, report, stderr) = doctor(&[dir, "--device", "cpu"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["failures"], 0);
    assert_eq!(finding(&report, "cog.yaml").0, "ok");
    assert_eq!(finding(&report, "device").1, "cpu");
    let (status, summary, _) = finding(&report, "weights");
    assert_eq!(status, "ok", "{summary}");
    assert!(summary.contains("1 safetensors file"), "{summary}");
    let (status, summary, fix) = finding(&report, "snapshot");
    assert_eq!(status, "warn");
    assert!(
        summary.contains("serve loads the weights cold"),
        "{summary}"
    );
    assert!(fix.starts_with("runner snapshot "), "{fix}");
    assert_eq!(finding(&report, "snapshot room").0, "ok");

    // The fix it names works, and the snapshot is then found compatible and restored.
    let (code, _, stderr) = runner(&["snapshot", dir, "--device", "cpu", "-q"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, report, stderr) = doctor(&[dir, "--device", "cpu", "--load", "--measure"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["warnings"], 0, "{report:#}");
    let (status, summary, _) = finding(&report, "snapshot");
    assert_eq!(status, "ok");
    assert!(summary.contains("compatible"), "{summary}");
    let (status, summary, _) = finding(&report, "load");
    assert_eq!(status, "ok");
    assert!(summary.contains("from snapshot"), "{summary}");
    let (status, summary, _) = finding(&report, "read bandwidth");
    assert_eq!(status, "ok");
    assert!(summary.contains("GB/s"), "{summary}");
}

#[test]
fn a_damaged_or_foreign_snapshot_is_named_exactly() {
    let model = generated_tiny_mlp(64, 2, "f32");
    let dir = model.path().to_str().unwrap();
    let (code, stdout, stderr) = runner(&["snapshot", dir, "--device", "cpu", "-q"]);
    assert_eq!(code, 0, "{stderr}");
    let path = std::path::PathBuf::from(stdout.trim());
    let len = std::fs::metadata(&path).unwrap().len();

    // Damaged data: only a load reads it. Serve would fall back to the weights, and
    // with --require-snapshot it would not start.
    flip_byte(&path, 4096 + 100);
    let (code, report, _) = doctor(&[dir, "--device", "cpu"]);
    assert_eq!(code, 0);
    assert_eq!(finding(&report, "snapshot").0, "ok");
    let (code, report, _) = doctor(&[dir, "--device", "cpu", "--load"]);
    assert_eq!(code, 0, "{report:#}");
    let (status, summary, fix) = finding(&report, "snapshot");
    assert_eq!(status, "warn");
    assert!(summary.contains("fails its checksum"), "{summary}");
    assert!(fix.starts_with("runner snapshot "), "{fix}");
    assert!(finding(&report, "load").1.contains("from safetensors"));
    let (code, report, _) = doctor(&[dir, "--device", "cpu", "--load", "--require-snapshot"]);
    assert_eq!(code, 1, "{report:#}");
    let (status, summary, _) = finding(&report, "load");
    assert_eq!(status, "fail");
    assert!(
        summary.contains("--require-snapshot") && summary.contains("fails its checksum"),
        "{summary}"
    );
    flip_byte(&path, 4096 + 100);

    // Damaged metadata (at the end of the file): found without a load.
    flip_byte(&path, len - 10);
    let (code, report, _) = doctor(&[dir, "--device", "cpu"]);
    assert_eq!(code, 0);
    let (status, summary, _) = finding(&report, "snapshot");
    assert_eq!(status, "warn");
    assert!(
        summary.contains("checksum of the preamble, header and manifest"),
        "{summary}"
    );
    let (code, report, _) = doctor(&[dir, "--device", "cpu", "--require-snapshot"]);
    assert_eq!(code, 1);
    assert_eq!(finding(&report, "snapshot").0, "fail");
    flip_byte(&path, len - 10);
    assert_eq!(
        finding(&doctor(&[dir, "--device", "cpu"]).1, "snapshot").0,
        "ok"
    );

    // Other weights: the snapshot belongs to another model.
    let (code, _, stderr) = runner(&[
        "generate",
        "tiny-mlp",
        model.path().join("weights").to_str().unwrap(),
        "--hidden-size",
        "64",
        "--layers",
        "2",
        "--seed",
        "7",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (_, report, _) = doctor(&[dir, "--device", "cpu"]);
    let (status, summary, _) = finding(&report, "snapshot");
    assert_eq!(status, "warn");
    assert!(summary.contains("model (spec and weights)"), "{summary}");

    // A truncated snapshot.
    cut_short(&path, len / 2);
    let (_, report, _) = doctor(&[dir, "--device", "cpu"]);
    let (status, summary, _) = finding(&report, "snapshot");
    assert_eq!(status, "warn");
    assert!(summary.contains("truncated"), "{summary}");
}

#[test]
fn what_stops_serve_fails_the_check() {
    // Truncated weights: named, with what to do.
    let model = generated_tiny_mlp(64, 2, "f32");
    let dir = model.path().to_str().unwrap();
    cut_short(&model.path().join("weights/model.safetensors"), 100);
    let (code, report, _) = doctor(&[dir, "--device", "cpu"]);
    assert_eq!(code, 1, "{report:#}");
    let (status, summary, fix) = finding(&report, "weights");
    assert_eq!(status, "fail");
    assert!(summary.contains("model.safetensors"), "{summary}");
    assert!(!fix.is_empty());
    // The load agrees: the same weights fail it.
    let (code, _, stderr) = runner(&["snapshot", dir, "--device", "cpu"]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("model.safetensors"), "{stderr}");

    // An invalid cog.yaml: the parse error, where it is.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("cog.yaml"), "run: [unclosed\n").unwrap();
    let (code, report, _) = doctor(&[broken.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    let (status, summary, _) = finding(&report, "cog.yaml");
    assert_eq!(status, "fail");
    assert!(summary.contains("cog.yaml"), "{summary}");

    // A CUDA device from a CPU build.
    let conformance = repo_root().join("models/conformance");
    let (code, report, _) = doctor(&[conformance.to_str().unwrap(), "--device", "cuda"]);
    if !runner(&["--version"]).1.contains("(cuda") {
        assert_eq!(code, 1);
        let (status, summary, _) = finding(&report, "device");
        assert_eq!(status, "fail");
        assert!(summary.contains("built without CUDA"), "{summary}");
    }

    // A port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stdout, _) = runner(&[
        "doctor",
        conformance.to_str().unwrap(),
        "--device",
        "cpu",
        "--port",
        &port,
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("127.0.0.1:{port} is in use")) && stdout.contains("--port"),
        "{stdout}"
    );
    drop(taken);
    let (code, stdout, _) = runner(&[
        "doctor",
        conformance.to_str().unwrap(),
        "--device",
        "cpu",
        "--port",
        &port,
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("is free") && stdout.contains("should start"),
        "{stdout}"
    );
}

#[test]
fn weightless_models_and_no_model_at_all() {
    let conformance = repo_root().join("models/conformance");
    let (code, report, _) = doctor(&[conformance.to_str().unwrap(), "--device", "cpu", "--load"]);
    assert_eq!(code, 0, "{report:#}");
    assert!(finding(&report, "weights")
        .1
        .contains("computes without weights"));
    assert!(report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["check"] != "snapshot"));
    assert_eq!(finding(&report, "load").0, "ok");

    // The OpenAI-compatible routes a model answers are named.
    let minilm = support::minilm_dir();
    let (_, report, _) = doctor(&[minilm.to_str().unwrap(), "--device", "cpu"]);
    let (_, summary, _) = finding(&report, "signature");
    assert!(
        summary.contains("OpenAI-compatible: /v1/embeddings"),
        "{summary}"
    );

    // Run where there is no cog.yaml: the machine only.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(RUNNER)
        .args(["doctor", "--format", "json", "--port", "0"])
        .current_dir(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(finding(&report, "model").0, "skip");
    assert_eq!(finding(&report, "runner").0, "ok");
}

#[test]
fn a_python_predictor_needs_an_interpreter_with_cog() {
    let trainer = repo_root().join("cog-spec/predictors/trainer");
    let trainer = trainer.to_str().unwrap();
    // No such interpreter.
    let (code, report, _) = doctor(&["--python", "/nonexistent/python3", trainer]);
    assert_eq!(code, 1);
    let (status, summary, fix) = finding(&report, "python");
    assert_eq!(status, "fail");
    assert!(summary.contains("/nonexistent/python3"), "{summary}");
    assert!(fix.contains("--python"), "{fix}");
    // runner opens no device for it, so --device cannot stop it.
    assert_eq!(finding(&report, "device").0, "skip");

    // An interpreter without the cog package.
    let bare = tempfile::tempdir().unwrap();
    let fake = bare.path().join("python3");
    std::fs::write(&fake, "#!/bin/sh\nexec python3 -I -S \"$@\"\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, report, _) = doctor(&["--python", fake.to_str().unwrap(), trainer]);
    assert_eq!(code, 1, "{report:#}");
    let (status, summary, fix) = finding(&report, "python");
    assert_eq!(status, "fail");
    assert!(summary.contains("cannot import cog"), "{summary}");
    assert!(fix.contains("pip install cog==0.23.1"), "{fix}");

    let Ok(venv) = std::env::var("RUNNER_COGLET_VENV") else {
        eprintln!("SKIPPED (the half with cog installed): RUNNER_COGLET_VENV is not set (scripts/test.sh sets it up)");
        return;
    };
    let python = format!("{venv}/bin/python");
    let (code, report, stderr) =
        doctor(&["--python", &python, trainer, "--mode", "train", "--load"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert!(finding(&report, "python").1.contains("cog 0.23.1"));
    let (status, summary, _) = finding(&report, "signature");
    assert_eq!(status, "ok");
    assert!(
        summary.contains("steps") && summary.contains("imported in"),
        "{summary}"
    );
    assert_eq!(finding(&report, "load").0, "ok");
}
