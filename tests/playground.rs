//! The playground in a real browser: Debian's Chromium, driven by playwright-core
//! (tests/browser/playground.mjs), against `runner serve` on loopback: the embedding model,
//! the streamed text generator, the model with every input kind (at phone width), and a
//! training server (train()'s form, posted to /trainings).
//! scripts/setup-browser.sh installs both; RUNNER_SKIP_BROWSER=1 skips these tests.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use support::{minilm_dir, repo_root, Server};

/// The browser and its driver, or `None` (with the reason printed) when skipped.
fn browser_ready() -> Option<()> {
    if std::env::var("RUNNER_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("SKIPPED: RUNNER_SKIP_BROWSER=1");
        return None;
    }
    let chromium = std::env::var("RUNNER_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let driver = repo_root().join("tests/browser/node_modules/playwright-core/package.json");
    assert!(
        PathBuf::from(&chromium).is_file() && driver.is_file(),
        "the browser test needs {chromium} and playwright-core: run scripts/setup-browser.sh \
         (scripts/test.sh does), or set RUNNER_SKIP_BROWSER=1 to skip it"
    );
    Some(())
}

/// Runs one scenario of playground.mjs against `server`; returns its findings.
fn drive(scenario: &str, server: &Server) -> Value {
    let out = repo_root().join("target/playground-screenshots");
    let run = Command::new("node")
        .env("RUNNER_TEST_API_KEY", TEST_API_KEY)
        .arg(repo_root().join("tests/browser/playground.mjs"))
        .args([scenario, &format!("http://{}", server.addr)])
        .arg(&out)
        .output()
        .expect("node runs (install Node.js 20 or newer)");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the {scenario} playground scenario failed:\n{stderr}\n{stdout}\nserver log:\n{}",
        server.drain_stderr().join("\n")
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("findings are not JSON ({e}): {stdout}"))
}

const TEST_API_KEY: &str = "playground-test-key-0b7e";

#[test]
fn embedding_model_runs_from_the_browser() {
    if browser_ready().is_none() {
        return;
    }
    let server = Server::start(&minilm_dir(), &[]);
    let findings = drive("embedding", &server);
    // The page shows the real vector: the reference's first values for this sentence.
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/data/minilm_reference.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(reference["sentences"][0], "The cat sits outside");
    let want = reference["normalized_full384"][0].as_array().unwrap();
    let shown = findings["first_values"].as_array().unwrap();
    for (got, want) in shown.iter().zip(want) {
        let (got, want) = (got.as_f64().unwrap(), want.as_f64().unwrap());
        assert!((got - want).abs() < 1e-5, "shown {got}, reference {want}");
    }
    assert!(
        findings["validation_error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("required"),
        "{findings}"
    );
}

#[test]
fn text_generation_streams_into_the_browser() {
    if browser_ready().is_none() {
        return;
    }
    let dir = repo_root().join("models/smollm2-135m-instruct");
    assert!(
        dir.join("weights").is_dir(),
        "SmolLM2 weights are missing: run scripts/fetch-smollm2.sh (or scripts/test.sh)"
    );
    let server = Server::start(&dir, &[]);
    let findings = drive("textgen", &server);
    assert_eq!(findings["saw_partial_output"], true, "{findings}");
    assert!(!findings["text"].as_str().unwrap().is_empty());
}

#[test]
fn every_input_kind_has_its_control_on_a_phone_screen() {
    if browser_ready().is_none() {
        return;
    }
    let server = Server::start(&repo_root().join("models/conformance"), &[]);
    let findings = drive("conformance", &server);
    assert_eq!(findings["canceled"], true, "{findings}");
    let errors = findings["validation_error"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{findings}");
}

#[test]
fn files_go_up_from_the_picker_and_come_back_shown() {
    if browser_ready().is_none() {
        return;
    }
    let server = Server::start(&repo_root().join("models/files"), &[]);
    let findings = drive("files", &server);
    assert!(
        findings["file_text"]
            .as_str()
            .unwrap()
            .contains("> violets"),
        "{findings}"
    );
}

#[test]
fn the_page_asks_for_the_api_key_and_uses_it() {
    if browser_ready().is_none() {
        return;
    }
    let server = Server::start(
        &repo_root().join("models/conformance"),
        &["--api-key", TEST_API_KEY],
    );
    let findings = drive("apikey", &server);
    assert_eq!(findings["ran_with_key"], true, "{findings}");
}

#[test]
fn a_training_server_shows_the_training_form() {
    if browser_ready().is_none() {
        return;
    }
    let Ok(venv) = std::env::var("RUNNER_COGLET_VENV") else {
        eprintln!("SKIPPED: RUNNER_COGLET_VENV is not set (the trainer is a Python model)");
        return;
    };
    let python = PathBuf::from(venv).join("bin/python");
    let server = Server::start(
        &repo_root().join("cog-spec/predictors/trainer"),
        &["--mode", "train", "--python", python.to_str().unwrap()],
    );
    let findings = drive("training", &server);
    assert!(
        findings["output"].as_str().unwrap().contains("steps"),
        "{findings}"
    );
}
