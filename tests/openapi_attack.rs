//! The API under attack (issue 10): schemathesis (pinned in
//! tests/data/schemathesis-requirements.txt; scripts/test.sh installs it) generates requests
//! from runner's own `/openapi.json` (examples, coverage, fuzzing and stateful phases, every
//! check) against the test, embedding and text-generation models on loopback, and must
//! find nothing: no server error, every answer of a documented status and content type and
//! conforming to its schema, valid data accepted and invalid data refused.
//!
//! `/openapi.json` is byte-for-byte what Cog's generator writes (for Replicate), and Cog's
//! generator documents only 200 and 422. The run therefore uses that document completed
//! with the answers Cog's server really gives, as the README's HTTP API table lists them
//! (plain-text 400/413/415/422 for bodies that are not a JSON prediction request, 409, 429,
//! 503, and 404 `{}` from cancel for a prediction not in flight), and with `input` required
//! when the model has required inputs (as both servers treat a missing `input`; null when it
//! has none, as both read a null `input` as an empty one), a
//! request id that may be null (read as absent, by both) but not empty (runner refuses an
//! empty id: no one could cancel that prediction), and ids that can be routed. Nothing else is added: any other answer fails the run.
//!
//! One check is left out: `ensure_resource_availability` assumes a created resource stays
//! reachable, but in Cog's API a prediction is gone once it finishes, so canceling it
//! afterwards answers 404 `{}` by design.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use support::{repo_root, Server};

fn schemathesis() -> Option<PathBuf> {
    let venv = std::env::var_os("RUNNER_SCHEMATHESIS_VENV").map(PathBuf::from);
    if venv.is_none() {
        eprintln!("SKIPPED: RUNNER_SCHEMATHESIS_VENV is not set (scripts/test.sh sets it up with scripts/setup-schemathesis.sh)");
    }
    venv.map(|v| v.join("bin/schemathesis"))
}

/// Cog's document plus the answers Cog's server gives that its generator leaves out, for the
/// routes the server runs: predictions, or with `train` the trainings.
fn completed(mut doc: Value, train: bool) -> Value {
    let (route, cancel, request, input) = if train {
        (
            "/trainings",
            "/trainings/{training_id}/cancel",
            "TrainingRequest",
            "TrainingInput",
        )
    } else {
        (
            "/predictions",
            "/predictions/{prediction_id}/cancel",
            "PredictionRequest",
            "Input",
        )
    };
    let text = json!({"text/plain": {"schema": {"type": "string"}}});
    let any_json = json!({"application/json": {"schema": {}}});
    let predict = &mut doc["paths"][route]["post"]["responses"];
    predict["202"] =
        json!({"description": "Accepted (Prefer: respond-async)", "content": any_json});
    for (status, why) in [
        ("400", "The body is not JSON"),
        ("413", "The body is over 100 MiB"),
        ("415", "The body is not application/json"),
    ] {
        predict[status] = json!({"description": why, "content": text});
    }
    predict["422"]["content"]["text/plain"] = text["text/plain"].clone();
    for (status, why) in [
        ("409", "Every slot is busy, or the id is in flight"),
        ("429", "The queue is full"),
        ("503", "Setup has not succeeded"),
    ] {
        predict[status] = json!({"description": why, "content": any_json});
    }
    doc["paths"][cancel]["post"]["responses"]["404"] =
        json!({"description": "No such prediction in flight", "content": any_json});
    let has_required = doc["components"]["schemas"][input]["required"]
        .as_array()
        .is_some_and(|r| !r.is_empty());
    if has_required {
        doc["components"]["schemas"][request]["required"] = json!(["input"]);
        doc["paths"][route]["post"]["requestBody"]["required"] = json!(true);
    } else {
        // Both servers read a null `input` as an empty one, which is valid when nothing is
        // required.
        let reference = format!("#/components/schemas/{input}");
        doc["components"]["schemas"][request]["properties"]["input"] =
            json!({"allOf": [{"$ref": reference}], "nullable": true});
    }
    // Both servers read the id as optional: null is the same as no id. runner refuses an
    // empty one (cog-spec/deviations.md).
    let id = &mut doc["components"]["schemas"][request]["properties"]["id"];
    id["nullable"] = json!(true);
    id["minLength"] = json!(1);
    // An id that is empty, or starts with a dot (`.`, `..`: the client normalises the path
    // away), cannot be routed to `/predictions/{id}/cancel`.
    doc["paths"][cancel]["post"]["parameters"][0]["schema"]["pattern"] = json!("^[^/.][^/]*$");
    doc
}

fn attack(
    model: &Path,
    args: &[&str],
    max_examples: u32,
    also_excluded: &[&str],
    tweak: impl Fn(&mut Value),
) {
    let Some(schemathesis) = schemathesis() else {
        return;
    };
    let server = Server::start(model, args);
    let (status, served) = server.get("/openapi.json");
    assert_eq!(status, 200);
    let train = args.contains(&"train");
    let mut doc = completed(serde_json::from_str(&served).unwrap(), train);
    tweak(&mut doc);
    let work = tempfile::tempdir().unwrap();
    let schema = work.path().join("openapi.json");
    std::fs::write(&schema, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let out = Command::new(&schemathesis)
        .current_dir(work.path())
        .arg("run")
        .arg(&schema)
        .args(["--url", &format!("http://{}", server.addr)])
        .args(["--checks", "all", "--workers", "1", "--no-color"])
        .arg("--exclude-checks")
        .arg(
            [&["ensure_resource_availability"], also_excluded]
                .concat()
                .join(","),
        )
        .args(["--max-examples", &max_examples.to_string()])
        .args(["--seed", "20261128", "--generation-deterministic"])
        .args(["--request-timeout", "120", "--max-response-time", "120"])
        .args(["--suppress-health-check", "all"])
        .output()
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed"))
        .collect::<Vec<_>>()
        .join(" | ");
    eprintln!("{}: {summary}", model.display());
    assert!(
        out.status.success(),
        "schemathesis found problems with {}:\n{stdout}\n{}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = server.drain_stderr().join("\n");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// Every Cog input kind and constraint. `sleep` is left out of the generated requests (the
/// model sleeps that long on purpose, up to minutes) so the run stays short.
#[test]
fn schemathesis_finds_nothing_in_the_test_model() {
    attack(
        &repo_root().join("models/conformance"),
        &[],
        60,
        &[],
        |doc| {
            let input = &mut doc["components"]["schemas"]["Input"];
            input["properties"].as_object_mut().unwrap().remove("sleep");
        },
    );
}

#[test]
fn schemathesis_finds_nothing_in_the_embedding_model() {
    attack(
        &support::minilm_dir(),
        &["--max-batch-size", "8"],
        30,
        &[],
        |_| {},
    );
}

/// Text generation on the CPU, in a debug build: every generated request asks for at most
/// 8 new tokens (the document makes `max_new_tokens` required, at most 8), so the run stays
/// short. The server's real bound is higher, so the check that out-of-bounds values are
/// refused is left out here; the test model runs it for every kind of constraint.
#[test]
fn schemathesis_finds_nothing_in_the_text_generation_model() {
    attack(
        &repo_root().join("models/smollm2-135m-instruct"),
        &[],
        20,
        &["negative_data_rejection"],
        |doc| {
            let input = &mut doc["components"]["schemas"]["Input"];
            input["properties"]["max_new_tokens"]["maximum"] = json!(8);
            match input["required"].as_array_mut() {
                Some(required) => required.push(json!("max_new_tokens")),
                None => input["required"] = json!(["max_new_tokens"]),
            }
        },
    );
}

/// A training server (`--mode train`, a Python `train()`): the trainings routes of the
/// combined document. Its `/predictions` also runs `train()` (as Cog's does) while the
/// document describes `predict()` there, so those routes are left out. `step_seconds` is
/// left out so that every training is short.
#[test]
fn schemathesis_finds_nothing_in_a_training_server() {
    let Ok(venv) = std::env::var("RUNNER_COGLET_VENV") else {
        eprintln!("SKIPPED: RUNNER_COGLET_VENV is not set (the trainer is a Python model)");
        return;
    };
    let python = PathBuf::from(venv).join("bin/python");
    let dir = tempfile::tempdir().unwrap();
    for name in ["cog.yaml", "predict.py", "train.py"] {
        std::fs::copy(
            repo_root().join("cog-spec/predictors/trainer").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    attack(
        dir.path(),
        &["--python", python.to_str().unwrap(), "--mode", "train"],
        40,
        &[],
        |doc| {
            let paths = doc["paths"].as_object_mut().unwrap();
            paths.remove("/predictions");
            paths.remove("/predictions/{prediction_id}/cancel");
            let input = &mut doc["components"]["schemas"]["TrainingInput"]["properties"];
            input.as_object_mut().unwrap().remove("step_seconds");
        },
    );
}
