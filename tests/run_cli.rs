//! `runner run` (alias `predict`): inputs from -i and --json, output on stdout, logs on
//! stderr, exit 1 on a failed prediction, and the tiny generated model checked against
//! an independent forward pass.

mod support;

use runner_models::tiny_mlp::{generate_weights, TinyMlpConfig};
use serde_json::{json, Value};
use support::*;

#[test]
fn run_prints_output_and_fails_clearly() {
    let dir = repo_root().join("models/conformance");
    let dir = dir.to_str().unwrap();
    let (code, stdout, stderr) = runner(&[
        "run", dir, "-i", "text=hi", "-i", "count=2", "-i", "tags=a", "-i", "tags=b",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["text"], "hihi");
    assert_eq!(out["tags"], json!(["a", "b"]));
    assert!(
        stderr.contains("conformance: text of 2 characters"),
        "logs go to stderr: {stderr}"
    );

    let (code, stdout, _) = runner(&[
        "predict",
        dir,
        "--json",
        r#"{"text": "x", "color": "blue"}"#,
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["color"],
        "blue"
    );

    let (code, stdout, stderr) = runner(&["run", dir, "-i", "text=x", "-i", "fail=true"]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("prediction failed") && stderr.contains("on purpose"),
        "{stderr}"
    );

    let (code, _, stderr) = runner(&["run", dir, "-i", "count=50"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("input `text`: Field required") && stderr.contains("input `count`"),
        "{stderr}"
    );

    let (code, _, stderr) = runner(&["run", dir, "-i", "colour=red"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no input named \"colour\""), "{stderr}");

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "from a file").unwrap();
    let (code, stdout, _) = runner(&[
        "run",
        dir,
        "-i",
        &format!("text=@{}", file.path().display()),
        "-i",
        "count=1",
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["text"],
        "from a file"
    );
}

/// fc2(relu(fc1(x))) in plain f64 loops: the reference for candle's forward pass.
fn reference_forward(c: &TinyMlpConfig, seed: u64, x: &[f64]) -> Vec<f64> {
    let w = generate_weights(c, seed);
    let hidden: Vec<f64> = (0..c.hidden_size)
        .map(|h| {
            let s: f64 = (0..c.input_size)
                .map(|i| w.fc1_weight[h * c.input_size + i] as f64 * x[i])
                .sum();
            (s + w.fc1_bias[h] as f64).max(0.0)
        })
        .collect();
    (0..c.output_size)
        .map(|o| {
            (0..c.hidden_size)
                .map(|h| w.fc2_weight[o * c.hidden_size + h] as f64 * hidden[h])
                .sum::<f64>()
                + w.fc2_bias[o] as f64
        })
        .collect()
}

#[test]
fn tiny_mlp_matches_an_independent_forward_pass() {
    let d = scratch_model("tiny-mlp");
    let (code, _, stderr) = runner(&[
        "generate",
        "tiny-mlp",
        d.path().join("weights").to_str().unwrap(),
        "--seed",
        "7",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let config = TinyMlpConfig::default();
    let x: Vec<f64> = (0..config.input_size).map(|i| (i as f64).sin()).collect();
    let out = tempfile::NamedTempFile::new().unwrap();
    let (code, _, stderr) = runner(&[
        "run",
        d.path().to_str().unwrap(),
        "--json",
        &json!({ "vector": x }).to_string(),
        "-o",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let got = floats(&serde_json::from_str(&std::fs::read_to_string(out.path()).unwrap()).unwrap());
    let want = reference_forward(&config, 7, &x);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
    }

    // The wrong input length is a failed prediction with a clear message.
    let (code, _, stderr) = runner(&[
        "run",
        d.path().to_str().unwrap(),
        "--json",
        r#"{"vector": [1, 2]}"#,
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("exactly 128"), "{stderr}");
}

#[test]
fn run_streams_text_and_writes_file_outputs() {
    let stream = repo_root().join("models/stream");
    let (code, stdout, stderr) = runner(&[
        "run",
        stream.to_str().unwrap(),
        "-i",
        "prompt=one two three",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "one two three \n");
    assert!(stderr.contains("stream: token 2"), "{stderr}");

    let (code, stdout, stderr) = runner(&[
        "run",
        stream.to_str().unwrap(),
        "-i",
        "prompt=a b c",
        "-i",
        "fail_at=1",
    ]);
    assert_eq!(code, 1);
    assert_eq!(stdout, "a \n", "items before the failure were printed");
    assert!(stderr.contains("failing at token 1"), "{stderr}");

    let scratch = tempfile::tempdir().unwrap();
    let source = scratch.path().join("in.txt");
    std::fs::write(&source, "a\nb\n").unwrap();
    let out = scratch.path().join("out");
    let files = repo_root().join("models/files");
    let (code, _, stderr) = runner(&[
        "run",
        files.to_str().unwrap(),
        "-i",
        &format!("source=@{}", source.display()),
        "-i",
        "copies=2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    for i in 0..2 {
        assert_eq!(
            std::fs::read_to_string(out.join(format!("{i}.txt"))).unwrap(),
            "> a\n> b\n"
        );
    }
}

/// Byte progress bars appear on a terminal (a pseudo-terminal made by util-linux's
/// `script`) for the weight load and the snapshot write and restore, and never when stderr
/// is a pipe or with -q.
#[test]
fn progress_bars_on_a_terminal_only() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: util-linux's `script` is not installed");
        return;
    }
    let d = scratch_model("tiny-mlp");
    let dir = d.path().to_str().unwrap();
    let weights = d.path().join("weights");
    assert_eq!(
        runner(&["generate", "tiny-mlp", weights.to_str().unwrap()]).0,
        0
    );
    let snap = d.path().join("tiny.rsnap");
    let on_a_terminal = |args: &str| -> String {
        let out = std::process::Command::new("script")
            .args(["-qec", &format!("{RUNNER} {args}"), "/dev/null"])
            .env("TERM", "xterm")
            .output()
            .expect("script runs");
        assert!(out.status.success(), "{args}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let taken = on_a_terminal(&format!(
        "snapshot {dir} --device cpu -o {}",
        snap.display()
    ));
    assert!(taken.contains("loading weights"), "{taken}");
    assert!(taken.contains("writing snapshot"), "{taken}");
    let run = format!(
        "run {dir} --device cpu --snapshot {} --json '{{\"vector\": [{}]}}'",
        snap.display(),
        vec!["0.5"; TinyMlpConfig::default().input_size].join(",")
    );
    let restored = on_a_terminal(&run);
    assert!(restored.contains("restoring snapshot"), "{restored}");
    assert!(!on_a_terminal(&format!("-q {run}")).contains("restoring snapshot"));
    // A pipe gets log lines only.
    let (code, _, stderr) = runner(&[
        "snapshot",
        dir,
        "--device",
        "cpu",
        "-o",
        snap.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("writing snapshot ["), "{stderr}");
}
