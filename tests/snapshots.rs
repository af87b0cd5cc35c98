//! Snapshots end to end: `runner snapshot` writes one, `runner serve` restores it
//! (bit-identical predictions), and every bad snapshot falls back to a cold load with a
//! warning naming the problem, or fails setup with `--require-snapshot`.

mod support;

use std::path::Path;

use serde_json::Value;
use support::*;

fn generated_model(layers: usize, dtype: &str) -> tempfile::TempDir {
    let d = scratch_model("tiny-mlp");
    let weights = d.path().join("weights");
    let (code, _, stderr) = runner(&[
        "generate",
        "tiny-mlp",
        weights.to_str().unwrap(),
        "--hidden-size",
        "512",
        "--layers",
        &layers.to_string(),
        "--dtype",
        dtype,
    ]);
    assert_eq!(code, 0, "{stderr}");
    d
}

fn take_snapshot(dir: &Path) -> std::path::PathBuf {
    let (code, stdout, stderr) = runner(&["snapshot", dir.to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("snapshot of"), "{stderr}");
    let path = std::path::PathBuf::from(stdout.trim());
    assert!(path.is_file(), "{}", path.display());
    path
}

fn health(server: &Server) -> Value {
    serde_json::from_str(&server.get("/health-check").1).unwrap()
}

fn predict_raw(server: &Server) -> String {
    let input = runner_models::tiny_mlp::example_input(&Default::default());
    let (status, v) = server.predict(input);
    assert_eq!(status, 200, "{v}");
    v["output"].to_string()
}

#[test]
fn a_restored_model_predicts_exactly_as_a_cold_one() {
    let model = generated_model(2, "bf16");
    let path = take_snapshot(model.path());
    assert!(path.starts_with(model.path().join(".runner")));

    let cold = Server::start(model.path(), &["--snapshot", "off"]);
    assert!(
        cold.status_line.contains("weights safetensors"),
        "{}",
        cold.status_line
    );
    let restored = Server::start(model.path(), &[]);
    assert!(
        restored.status_line.contains("weights snapshot"),
        "{}",
        restored.status_line
    );
    let h = health(&restored);
    assert_eq!(h["runner"]["weights_source"], "snapshot");
    let phases: Vec<&str> = h["runner"]["setup_phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "device init",
            "snapshot check",
            "snapshot restore",
            "model build",
            "warm-up"
        ]
    );
    assert_eq!(
        predict_raw(&cold),
        predict_raw(&restored),
        "bit-identical outputs"
    );
}

#[test]
fn bad_snapshots_fall_back_to_a_cold_load_and_say_why() {
    let model = generated_model(1, "f32");
    let path = take_snapshot(model.path());
    let good = std::fs::read(&path).unwrap();

    // A flipped bit in the data.
    let mut bad = good.clone();
    bad[5000] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let server = Server::start(model.path(), &[]);
    assert!(
        server.status_line.contains("weights safetensors"),
        "{}",
        server.status_line
    );
    let logs = health(&server)["setup"]["logs"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        logs.contains("snapshot not used") && logs.contains("fails its checksum"),
        "{logs}"
    );
    drop(server);

    // The same with --require-snapshot: setup fails and says why.
    let server = Server::start(model.path(), &["--require-snapshot"]);
    assert!(
        server.status_line.contains("setup failed"),
        "{}",
        server.status_line
    );
    assert!(
        server.status_line.contains("fails its checksum"),
        "{}",
        server.status_line
    );
    assert_eq!(health(&server)["status"], "SETUP_FAILED");
    drop(server);

    // Truncated.
    std::fs::write(&path, &good[..good.len() - 100]).unwrap();
    let server = Server::start(model.path(), &["--require-snapshot"]);
    assert!(
        server.status_line.contains("truncated"),
        "{}",
        server.status_line
    );
    drop(server);

    // Taken before the weights changed: another model.
    std::fs::write(&path, &good).unwrap();
    let weights = model.path().join("weights");
    runner_models::tiny_mlp::write_model(
        &weights,
        &runner_models::tiny_mlp::TinyMlpConfig {
            hidden_size: 512,
            layers: 1,
            ..Default::default()
        },
        7,
    )
    .unwrap();
    let server = Server::start(model.path(), &["--require-snapshot"]);
    assert!(
        server
            .status_line
            .contains("another model (spec and weights)"),
        "{}",
        server.status_line
    );
    drop(server);

    // A directory where the snapshot should be, and a path that does not exist.
    let server = Server::start(
        model.path(),
        &[
            "--snapshot",
            model.path().to_str().unwrap(),
            "--require-snapshot",
        ],
    );
    assert!(
        server.status_line.contains("is a directory"),
        "{}",
        server.status_line
    );
    drop(server);
    let server = Server::start(model.path(), &["--snapshot", "/nonexistent/x.rsnap"]);
    assert!(
        server.status_line.contains("weights safetensors"),
        "{}",
        server.status_line
    );
    drop(server);
    let server = Server::start(
        model.path(),
        &["--snapshot", "/nonexistent/x.rsnap", "--require-snapshot"],
    );
    assert!(
        server.status_line.contains("no snapshot at"),
        "{}",
        server.status_line
    );
}

#[test]
fn minilm_restores_to_identical_embeddings() {
    let dir = minilm_dir();
    let scratch = tempfile::tempdir().unwrap();
    let snap = scratch.path().join("minilm.rsnap");
    let (code, _, stderr) = runner(&[
        "snapshot",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "-o",
        snap.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let cold = Server::start(&dir, &["--snapshot", "off"]);
    let restored = Server::start(
        &dir,
        &["--snapshot", snap.to_str().unwrap(), "--require-snapshot"],
    );
    assert!(
        restored.status_line.contains("weights snapshot"),
        "{}",
        restored.status_line
    );
    let input = serde_json::json!({"text": ["The cat sits outside", "A man is playing guitar"]});
    let a = cold.predict(input.clone()).1["output"].to_string();
    let b = restored.predict(input).1["output"].to_string();
    assert_eq!(a, b);
}

#[test]
fn bench_reports_both_modes_as_json_and_svg() {
    let model = generated_model(1, "bf16");
    let chart = model.path().join("chart.svg");
    let (code, stdout, stderr) = runner(&[
        "bench",
        model.path().to_str().unwrap(),
        "--cold-start",
        "--runs",
        "1",
        "--device",
        "cpu",
        "--format",
        "json",
        "--chart",
        chart.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    assert_eq!(modes[1]["mode"], "snapshot");
    let phases: Vec<&str> = modes[1]["median_phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"snapshot restore"), "{phases:?}");
    assert!(report["snapshot_restore_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["page_cache_read_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["speedup_first_prediction"].as_f64().unwrap() > 0.0);
    // The pinned ceiling and the fresh-machine mode exist on CUDA only.
    assert!(report["pinned_h2d_gb_per_s"].is_null(), "{report}");
    assert!(report["speedup_first_prediction_vs_fresh_machine"].is_null());
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("snapshot restore"));
}

#[test]
fn snapshot_verify_checks_every_restored_tensor() {
    let model = generated_model(2, "bf16");
    let (code, stdout, stderr) = runner(&[
        "snapshot",
        model.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--verify",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("verified: 8 restored tensors") && stderr.contains("bit-identical"),
        "{stderr}"
    );
    assert!(std::path::Path::new(stdout.trim()).is_file());
}
