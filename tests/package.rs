//! `runner package`: golden files for each target, byte-for-byte determinism, Cog's config
//! schema and rules, the Replicate launcher starting a real runner with Replicate's flags,
//! the standard-Cog-project predictor under Cog's own server (coglet), modal_app.py
//! imported with the pinned modal client, and the bad inputs.
//!
//! `UPDATE_GOLDEN=1 cargo test --test package` rewrites tests/golden/package/ after an
//! intended change; review the diff.

mod support;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runner_spec::cuda_arch::{GpuArch, KernelTargets};
use serde_json::{json, Value};
use support::{http, repo_root, runner, scratch_model, RUNNER};

/// A stand-in for the runner binary: an x86-64 ELF header and nothing else. It passes the
/// package's platform check, cannot run (so whether it has CUDA is unknown), and keeps
/// golden manifests independent of the build.
fn fake_runner_binary(dir: &Path) -> PathBuf {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1;
    elf[16] = 2; // ET_EXEC
    elf[18] = 0x3e; // x86-64
    let path = dir.join("runner-fake");
    std::fs::write(&path, elf).unwrap();
    path
}

/// Every file under `dir`, by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn package(model: &Path, out: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![
        "package",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    runner(&all)
}

fn package_ok(model: &Path, out: &Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = package(model, out, args);
    assert_eq!(code, 0, "runner package failed:\n{stderr}");
    stdout
}

#[test]
fn golden_packages_for_each_target() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());
    let fake = fake.to_str().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        ("replicate-image", "conformance", &["--target", "replicate"]),
        (
            "replicate-predictor",
            "conformance",
            &["--target", "replicate", "--replicate-mode", "predictor"],
        ),
        (
            "replicate-gpu-stream",
            "stream",
            &["--target", "replicate", "--gpu", "L40S"],
        ),
        (
            "modal-gpu-stream",
            "stream",
            &["--target", "modal", "--gpu", "H100"],
        ),
        ("modal-cpu-files", "files", &["--target", "modal"]),
    ];
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for (case, model, args) in cases {
        let out = scratch.path().join(case);
        let mut all_args = args.to_vec();
        all_args.extend(["--runner-bin", fake, "--name", model]);
        package_ok(&repo_root().join("models").join(model), &out, &all_args);
        let got = tree(&out);
        let golden_dir = repo_root().join("tests/golden/package").join(case);
        if update {
            let _ = std::fs::remove_dir_all(&golden_dir);
            for (rel, bytes) in &got {
                let p = golden_dir.join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            continue;
        }
        let want = tree(&golden_dir);
        if got.keys().collect::<Vec<_>>() != want.keys().collect::<Vec<_>>() {
            failures.push(format!(
                "{case}: files differ\n  got:  {:?}\n  want: {:?}",
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            ));
            continue;
        }
        for (rel, bytes) in &got {
            if want[rel] != *bytes {
                failures.push(format!(
                    "{case}/{rel} differs from tests/golden/package/{case}/{rel}:\n{}",
                    String::from_utf8_lossy(bytes)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(after an intended change: UPDATE_GOLDEN=1 cargo test --test package)",
        failures.join("\n\n")
    );
}

#[test]
fn packaging_twice_gives_identical_bytes_and_the_manifest_lists_every_file() {
    let model = scratch_model("tiny-mlp");
    runner_models::tiny_mlp::write_model(&model.path().join("weights"), &Default::default(), 7)
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());
    let args = [
        "--target",
        "modal",
        "--gpu",
        "A10G",
        "--runner-bin",
        fake.to_str().unwrap(),
    ];
    let first = scratch.path().join("one");
    let second = scratch.path().join("two");
    package_ok(model.path(), &first, &args);
    package_ok(model.path(), &second, &args);
    let (a, b) = (tree(&first), tree(&second));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (rel, bytes) in &a {
        assert!(b[rel] == *bytes, "{rel} differs between two runs");
    }
    // The manifest: every other file, its size and sha256, sorted.
    let manifest: Value = serde_json::from_slice(&a["runner-package.json"]).unwrap();
    let listed: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = a
        .keys()
        .map(String::as_str)
        .filter(|p| *p != "runner-package.json")
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    for f in manifest["files"].as_array().unwrap() {
        let bytes = &a[f["path"].as_str().unwrap()];
        use sha2::Digest;
        assert_eq!(f["sha256"], hex::encode(sha2::Sha256::digest(bytes)));
        assert_eq!(f["bytes"], bytes.len());
    }
    assert!(a.contains_key("model/weights/model.safetensors"));
    assert_eq!(manifest["hardware"], "A10G");

    // --force replaces a package in place, and the model directory is never touched.
    let before = tree(model.path());
    let (code, _, stderr) = package(model.path(), &first, &args);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    package_ok(model.path(), &first, &[&args[..], &["--force"]].concat());
    assert_eq!(tree(&first).len(), a.len());
    assert_eq!(tree(model.path()), before);
}

/// Cog's rules beyond its JSON schema (pkg/config/validate.go in Cog).
fn check_cog_rules(config: &Value) {
    let python = config["build"]["python_version"]
        .as_str()
        .expect("python_version is a string");
    let minor: u32 = python.split('.').nth(1).unwrap().parse().unwrap();
    assert!(
        python.starts_with("3.") && minor >= 10,
        "Cog needs python_version >= 3.10"
    );
    let predict = config["predict"].as_str().expect("predict: file.py:Class");
    let (file, class) = predict.split_once(':').unwrap();
    assert!(file.ends_with(".py") && !class.is_empty(), "{predict}");
    if let Some(max) = config["concurrency"]["max"].as_u64() {
        assert!(
            max <= 1 || minor >= 11,
            "concurrency.max > 1 needs Python >= 3.11"
        );
    }
    if let Some(cuda) = config["build"]["cuda"].as_str() {
        assert!(cuda.split('.').next().unwrap().parse::<u32>().unwrap() >= 11);
    }
}

#[test]
fn the_replicate_cog_yaml_passes_cogs_schema_and_rules() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());
    let schema_path = repo_root().join("../shared/packaging/cog-config-schema-v1.0.json");
    let schema: Option<Value> = std::fs::read(&schema_path)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap());
    if schema.is_none() {
        eprintln!(
            "SKIPPED the JSON-schema half: {} is absent (Cog's rules are still checked)",
            schema_path.display()
        );
    }
    for (model, mode) in [
        ("stream", "image"),
        ("stream", "predictor"),
        ("conformance", "image"),
    ] {
        let out = scratch.path().join(format!("{model}-{mode}"));
        package_ok(
            &repo_root().join("models").join(model),
            &out,
            &[
                "--target",
                "replicate",
                "--replicate-mode",
                mode,
                "--runner-bin",
                fake.to_str().unwrap(),
            ],
        );
        let text = std::fs::read_to_string(out.join("cog.yaml")).unwrap();
        let config: Value = serde_saphyr::from_str(&text).unwrap();
        if let Some(schema) = &schema {
            let validator = jsonschema::validator_for(schema).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&config)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{model}/{mode} cog.yaml fails Cog's schema: {errors:?}\n{text}"
            );
        }
        check_cog_rules(&config);
        // runner's own parser (Cog's keys and rules) accepts it too.
        runner_spec::CogConfig::parse(&out.join("cog.yaml"), &text).unwrap();
        if mode == "image" {
            // Every COPY source exists in the package.
            let dockerfile = std::fs::read_to_string(out.join("Dockerfile")).unwrap();
            let copies: Vec<&str> = dockerfile
                .lines()
                .filter(|l| l.starts_with("COPY "))
                .collect();
            assert!(copies.len() >= 3, "{dockerfile}");
            for line in copies {
                let words: Vec<&str> = line
                    .split_whitespace()
                    .skip(1)
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                for source in &words[..words.len() - 1] {
                    assert!(
                        out.join(source).exists(),
                        "COPY source {source} is missing from the package"
                    );
                }
            }
            assert!(dockerfile.contains("EXPOSE 5000"));
            assert!(
                dockerfile.contains("FROM python:3.12-slim-bookworm"),
                "{dockerfile}"
            );
        }
        let push = std::fs::read_to_string(out.join("push.sh")).unwrap();
        assert!(
            push.contains("COG_VERSION=0.23.1") && push.contains("--openapi-schema openapi.json")
        );
        assert_eq!(mode == "image", push.contains("--dockerfile Dockerfile"));
    }
}

fn wait_for_ready(addr: &str, child: &mut std::process::Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the server exited ({status}) before it was ready:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if TcpStream::connect(addr).is_ok() {
            let (code, body) = http(addr, "GET", "/health-check", None, &[]);
            if code == 200 && body.contains("\"READY\"") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not ready in 60 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every `$ref` in the document points at something in it.
fn check_refs(doc: &Value, node: &Value) {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let pointer = r.strip_prefix('#').expect("local $ref");
                assert!(doc.pointer(pointer).is_some(), "$ref {r} does not resolve");
            }
            map.values().for_each(|v| check_refs(doc, v));
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(doc, v)),
        _ => {}
    }
}

#[test]
fn the_replicate_launcher_starts_a_real_runner_with_replicates_flags() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("pkg");
    // The real (CPU-only) binary, for a GPU: packaged, with a warning saying how to fix it.
    let (code, stdout, stderr) = package(
        &repo_root().join("models/conformance"),
        &out,
        &[
            "--target",
            "replicate",
            "--gpu",
            "H100",
            "--runner-bin",
            RUNNER,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains("built without CUDA")
            && stderr.contains("--features cuda"),
        "{stderr}"
    );
    assert!(
        stdout.contains("Next steps") && stdout.contains("| H100 ← | 80 GB | yes | 0.001525 |"),
        "{stdout}"
    );

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let log = scratch.path().join("launcher.log");
    // Exactly what Replicate runs in the image, from the image's WORKDIR.
    let mut child = Command::new("python3")
        .args([
            "-m",
            "cog.server.http",
            "--await-explicit-shutdown=true",
            "--upload-url=http://127.0.0.1:9/upload/",
            "--host",
            "127.0.0.1",
        ])
        .current_dir(&out)
        .env("PORT", port.to_string())
        .env_remove("RUNNER_PORT")
        .env_remove("RUNNER_BIN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("python3 runs");
    wait_for_ready(&addr, &mut child, &log);

    let (code, body) = http(
        &addr,
        "POST",
        "/predictions",
        Some(r#"{"input":{"text":"hi","count":2}}"#),
        &[("Content-Type", "application/json")],
    );
    assert_eq!(code, 200, "{body}");
    let prediction: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(prediction["status"], "succeeded");
    assert_eq!(prediction["output"]["text"], "hihi");

    // openapi.json in the package is byte-for-byte what the server answers.
    let (_, served) = http(&addr, "GET", "/openapi.json", None, &[]);
    let packaged = std::fs::read_to_string(out.join("openapi.json")).unwrap();
    assert_eq!(served, packaged);
    let doc: Value = serde_json::from_str(&packaged).unwrap();
    check_refs(&doc, &doc);

    // --await-explicit-shutdown=true reached runner: SIGTERM is ignored, /shutdown is not.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGTERM stopped a server told to await an explicit shutdown"
    );
    let (code, _) = http(&addr, "POST", "/shutdown", None, &[]);
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "runner did not stop after POST /shutdown"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The process Replicate supervised was runner itself (the launcher exec'd it).
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("runner: ready at"), "{logs}");

    // Cog's flags the launcher refuses, clearly.
    let bad = Command::new("python3")
        .args(["-m", "cog.server.http", "--x-mode", "train"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("only predictions are served"));
    let version = Command::new("python3")
        .args(["-m", "cog.server.http", "--version"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("runner "),
        "{version:?}"
    );
}

/// The address of the `runner serve` that a packaged predictor started for `project`,
/// found from the process table (its command line names the project's model folder).
fn runner_serving(project: &Path) -> String {
    let model = project.join("model");
    let model = model.to_str().unwrap();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "serve") && args.iter().any(|a| a == model) {
            let port = args
                .iter()
                .position(|a| a == "--port")
                .map(|i| args[i + 1].clone())
                .expect("the predictor passes --port");
            return format!("127.0.0.1:{port}");
        }
    }
    panic!("no `runner serve {model}` process is running");
}

/// coglet frees a slot a moment after it answers; a request right after may get 409.
fn post_when_free(addr: &str, headers: &[(String, String)], body: &[u8]) -> support::Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = support::request(addr, "POST", "/predictions", headers, Some(body));
        if r.status != 409 || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn json_post(addr: &str, body: &str) -> (u16, Value) {
    let r = post_when_free(
        addr,
        &[("Content-Type".into(), "application/json".into())],
        body.as_bytes(),
    );
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::Null),
    )
}

/// Packages `models/NAME` as a standard Cog project (predictor mode) at `project`.
fn predictor_project(name: &str, project: &Path, fake_runner: &Path) {
    package_ok(
        &repo_root().join("models").join(name),
        project,
        &[
            "--target",
            "replicate",
            "--replicate-mode",
            "predictor",
            "--runner-bin",
            fake_runner.to_str().unwrap(),
        ],
    );
}

/// Runs the package's predictor under Cog's own server, as `cog build` would set it up.
fn start_coglet(venv: &Path, project: &Path, log: &Path) -> (std::process::Child, String) {
    std::fs::create_dir_all(project.join(".cog")).unwrap();
    std::fs::copy(
        project.join("openapi.json"),
        project.join(".cog/openapi_schema.json"),
    )
    .unwrap();
    let port = free_port();
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(venv.join("bin/python"))
        .args(["-m", "cog.server.http", "--host", "127.0.0.1"])
        .current_dir(project)
        .env("PATH", path)
        .env("PORT", port.to_string())
        .env("COG_PREDICT_TYPE_STUB", "predict.py:Predictor")
        // The package holds a stand-in binary; the predictor starts the real one.
        .env("RUNNER_BIN", RUNNER)
        .env_remove("RUNNER_PORT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_for_ready(&addr, &mut child, log);
    (child, addr)
}

#[test]
fn the_standard_cog_project_runs_under_cogs_own_server() {
    let Some(venv) = std::env::var_os("RUNNER_COGLET_VENV").map(PathBuf::from) else {
        eprintln!("SKIPPED: RUNNER_COGLET_VENV is not set (scripts/test.sh sets it up with scripts/setup-coglet.sh)");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());

    // Streaming text: chunks arrive through coglet's event stream as runner makes them.
    let project = scratch.path().join("stream");
    predictor_project("stream", &project, &fake);
    let (mut child, addr) = start_coglet(&venv, &project, &scratch.path().join("stream.log"));
    let (code, p) = json_post(&addr, r#"{"input":{"prompt":"one two three"}}"#);
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["output"], json!(["one ", "two ", "three "]));
    assert!(
        p["logs"].as_str().unwrap().contains("stream: token 2"),
        "runner's logs reach Cog: {p}"
    );
    let stream = post_when_free(
        &addr,
        &[
            ("Content-Type".into(), "application/json".into()),
            ("Accept".into(), "text/event-stream".into()),
        ],
        br#"{"input":{"prompt":"a b","delay":0.05}}"#,
    );
    assert_eq!(stream.status, 200, "{}", stream.body);
    assert!(
        stream
            .body
            .contains("event: output\ndata: {\"chunk\":\"a \",\"index\":0}"),
        "{}",
        stream.body
    );
    // A failure inside runner fails the prediction in Cog, with runner's error.
    let (_, p) = json_post(&addr, r#"{"input":{"prompt":"a b c","fail_at":1}}"#);
    assert_eq!(p["status"], "failed");
    assert!(
        p["error"]
            .as_str()
            .unwrap()
            .contains("stream: failing at token 1"),
        "{p}"
    );
    // Cog validates against the same schema: a bound from runner's signature holds.
    let (code, _) = json_post(&addr, r#"{"input":{"prompt":"a","delay":9}}"#);
    assert_eq!(code, 422);
    // Killing Cog's server takes the runner it started along (--exit-with-parent).
    let runner_addr = runner_serving(&project);
    assert!(TcpStream::connect(&runner_addr).is_ok());
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(&runner_addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "runner outlived the Cog server that started it"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every input kind (secrets, optionals, lists, choices) and an object output: the same
    // answer through Cog's server as from runner directly.
    let project = scratch.path().join("conformance");
    predictor_project("conformance", &project, &fake);
    let (mut child, addr) = start_coglet(&venv, &project, &scratch.path().join("conformance.log"));
    let input = r#"{"input":{"text":"hi","count":2,"ratio":0.25,"color":"blue","size":3,"api_key":"s3cret","note":"n","tags":["x"]}}"#;
    let (code, through_cog) = json_post(&addr, input);
    assert_eq!(code, 200, "{through_cog}");
    let _ = child.kill();
    let _ = child.wait();
    let direct = support::Server::start(&repo_root().join("models/conformance"), &[]);
    let (_, body) = direct.post_json("/predictions", input);
    let direct: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(through_cog["output"], direct["output"]);
    assert_eq!(through_cog["output"]["api_key_length"], 6);
    assert_eq!(through_cog["output"]["text"], "hihi");

    // Files both ways: a data URI in, files out, through Cog's Path handling.
    let project = scratch.path().join("files");
    predictor_project("files", &project, &fake);
    let (mut child, addr) = start_coglet(&venv, &project, &scratch.path().join("files.log"));
    let (code, p) = json_post(
        &addr,
        r#"{"input":{"source":"data:text/plain;base64,aGVsbG8Kd29ybGQK","copies":2}}"#,
    );
    assert_eq!(code, 200, "{p}");
    let expected = format!("data:text/plain;base64,{}", base64_of("> hello\n> world\n"));
    assert_eq!(p["output"], json!([expected, expected]), "{p}");
    let _ = child.kill();
    let _ = child.wait();
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Runs `probe` (Python that imports modal_app and prints JSON) in the package folder with
/// the pinned Modal client; its JSON.
fn import_modal_app(venv: &Path, package: &Path, home: &Path, probe: &str) -> Value {
    let output = Command::new(venv.join("bin/python"))
        .args(["-c", probe])
        .current_dir(package)
        // No credentials: defining the app must not need a Modal account.
        .env("HOME", home)
        .env_remove("MODAL_TOKEN_ID")
        .env_remove("MODAL_TOKEN_SECRET")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "modal_app.py does not import:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn modal_app_imports_with_the_pinned_client_and_defines_what_modal_needs() {
    let Some(venv) = std::env::var_os("RUNNER_MODAL_VENV").map(PathBuf::from) else {
        eprintln!("SKIPPED: RUNNER_MODAL_VENV is not set (scripts/test.sh sets it up with scripts/setup-modal.sh)");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());
    let out = scratch.path().join("modal");
    package_ok(
        &repo_root().join("models/stream"),
        &out,
        &[
            "--target",
            "modal",
            "--gpu",
            "H100",
            "--name",
            "stream-demo",
            "--runner-bin",
            fake.to_str().unwrap(),
        ],
    );
    let probe = r#"
import json, warnings
warnings.simplefilter("ignore")
import modal
from modal._utils.async_utils import synchronizer
import modal_app
app = modal_app.app
classes = app.registered_classes
functions = app.registered_functions
service = functions["Runner.*"]
methods = classes["Runner"]._get_partial_functions()
serve = synchronizer._translate_in(methods["serve"]).params.webhook_config
start = synchronizer._translate_in(methods["start"])
print(json.dumps({
    "modal": modal.__version__,
    "app": app.name,
    "classes": sorted(classes),
    "gpu": service._spec_.gpus,
    "web_server_port": serve.web_server_port,
    "startup_timeout": serve.web_server_startup_timeout,
    "web_endpoints": sorted(app.registered_web_endpoints),
    "enter_flags": int(start.flags),
    "concurrency": modal_app.CONCURRENCY,
}))
"#;
    let got = import_modal_app(&venv, &out, scratch.path(), probe);
    assert_eq!(got["modal"], "1.6.4");
    assert_eq!(got["app"], "stream-demo");
    assert_eq!(got["classes"], json!(["Runner"]));
    assert_eq!(got["gpu"], "H100");
    assert_eq!(got["web_server_port"], 5000);
    assert_eq!(got["web_endpoints"], json!(["Runner.serve"]));
    assert_eq!(got["concurrency"], 2, "cog.yaml's concurrency.max");
    assert!(got["startup_timeout"].as_f64().unwrap() >= 300.0);
    // The snapshot options are in the class decorator.
    let source = std::fs::read_to_string(out.join("modal_app.py")).unwrap();
    assert!(source.contains("enable_memory_snapshot=True"));
    assert!(source.contains(r#"experimental_options={"enable_gpu_snapshot": True}"#));
    assert!(source.contains("@modal.enter(snap=True)"));
}

#[test]
fn bad_inputs_get_clear_errors_and_write_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());
    let fake = fake.to_str().unwrap();
    let conformance = repo_root().join("models/conformance");
    let out = scratch.path().join("out");

    let (code, _, stderr) = package(
        &conformance,
        &out,
        &["--target", "heroku", "--runner-bin", fake],
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("invalid value 'heroku'") && stderr.contains("replicate, modal"),
        "{stderr}"
    );

    let (code, _, stderr) = package(
        &conformance,
        &out,
        &["--target", "replicate", "--gpu", "L4", "--runner-bin", fake],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--gpu L4: replicate offers no GPU by that name")
            && stderr.contains("H100"),
        "{stderr}"
    );

    let (code, _, stderr) = package(
        &conformance,
        &out,
        &[
            "--target",
            "modal",
            "--name",
            "Bad Name",
            "--runner-bin",
            fake,
        ],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("--name \"Bad Name\""), "{stderr}");

    // A model directory that does not validate.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("cog.yaml"), "run: \"candle:nope\"\n").unwrap();
    let (code, _, stderr) = package(
        broken.path(),
        &out,
        &["--target", "modal", "--runner-bin", fake],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("nope"), "{stderr}");

    // Truncated weights are caught before anything is written.
    let model = scratch_model("tiny-mlp");
    runner_models::tiny_mlp::write_model(&model.path().join("weights"), &Default::default(), 1)
        .unwrap();
    let weights = model.path().join("weights/model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (code, _, stderr) = package(
        model.path(),
        &out,
        &["--target", "modal", "--runner-bin", fake],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("weights do not validate"), "{stderr}");

    // Never inside the model directory.
    let inside = model.path().join("dist");
    let good = scratch_model("conformance");
    let inside_good = good.path().join("dist");
    let (code, _, stderr) = package(
        good.path(),
        &inside_good,
        &["--target", "modal", "--runner-bin", fake],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("inside the model directory"), "{stderr}");
    assert!(!inside.exists() && !inside_good.exists());

    // Not a Linux x86-64 binary.
    let script = scratch.path().join("not-elf");
    std::fs::write(&script, "#!/bin/sh\necho runner\n").unwrap();
    let (code, _, stderr) = package(
        &conformance,
        &out,
        &[
            "--target",
            "modal",
            "--runner-bin",
            script.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("not a Linux executable"), "{stderr}");

    assert!(!out.exists(), "a failed package left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains(".partial-")),
        "{leftovers:?}"
    );
}

/// A Python Cog model on Modal: the image installs what cog.yaml's `build:` asks for (with
/// Cog's package), the package carries the predictor's source but nothing hidden or cached,
/// runner serves it with the image's Python, and what cannot travel is said. Replicate
/// gets it with `cog push` instead.
#[test]
fn a_python_predictor_packages_for_modal_with_its_build() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());
    let fake = fake.to_str().unwrap();
    let model = scratch.path().join("model");
    let source = repo_root().join("tests/data/python-predictors/modal");
    std::fs::create_dir_all(model.join("helpers/__pycache__")).unwrap();
    for rel in [
        "cog.yaml",
        "predict.py",
        "requirements.txt",
        "helpers/__init__.py",
        "helpers/words.py",
    ] {
        std::fs::copy(source.join(rel), model.join(rel)).unwrap();
    }
    std::fs::write(
        model.join("helpers/__pycache__/words.cpython-311.pyc"),
        b"x",
    )
    .unwrap();
    std::fs::create_dir_all(model.join(".git")).unwrap();
    std::fs::write(model.join(".git/HEAD"), b"ref: refs/heads/main\n").unwrap();

    // Replicate: refused before anything is imported, with what to do.
    let (code, _, stderr) = package(
        &model,
        &scratch.path().join("replicate"),
        &["--target", "replicate", "--runner-bin", fake],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cog push") && stderr.contains("--target modal"),
        "{stderr}"
    );

    let Ok(coglet) = std::env::var("RUNNER_COGLET_VENV") else {
        eprintln!("SKIPPED (Modal half): RUNNER_COGLET_VENV is not set (reading the predictor's signature needs `cog`)");
        return;
    };
    let python = PathBuf::from(coglet).join("bin/python");
    let out = scratch.path().join("modal");
    let (code, _, stderr) = runner(&[
        "--python",
        python.to_str().unwrap(),
        "package",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--target",
        "modal",
        "--name",
        "shout",
        "--runner-bin",
        fake,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("build secrets (pip)"), "{stderr}");
    assert!(stderr.contains("pass --gpu NAME"), "{stderr}");
    let files: Vec<String> = tree(&out).into_keys().collect();
    for want in [
        "model/cog.yaml",
        "model/predict.py",
        "model/requirements.txt",
        "model/helpers/__init__.py",
        "model/helpers/words.py",
        "modal_app.py",
        "openapi.json",
        "bin/runner",
    ] {
        assert!(
            files.contains(&want.to_string()),
            "{want} missing: {files:?}"
        );
    }
    assert!(
        !files
            .iter()
            .any(|f| f.contains(".git") || f.contains("__pycache__")),
        "{files:?}"
    );
    let app = std::fs::read_to_string(out.join("modal_app.py")).unwrap();
    for want in [
        r#"modal.Image.debian_slim(python_version="3.11")"#,
        r#".apt_install("libgomp1")"#,
        r#".pip_install("cog==0.23.1", "numpy==2.1.3")"#,
        r#".pip_install_from_requirements(str(HERE / "model" / "requirements.txt"))"#,
        r#".run_commands("echo 'built for runner' > /etc/runner-build-note", "pip download --no-deps tqdm==4.67.1 -d /tmp/wheels")"#,
        r#""--device", "cpu", "--python", "python"]"#,
        "CONCURRENCY = 2",
    ] {
        assert!(app.contains(want), "modal_app.py lacks {want}:\n{app}");
    }
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("openapi.json")).unwrap()).unwrap();
    assert_eq!(
        doc["components"]["schemas"]["Input"]["required"],
        json!(["text"])
    );

    // A requirements file cog.yaml names but the directory lacks: a clear error, nothing written.
    let cog_yaml = std::fs::read_to_string(model.join("cog.yaml")).unwrap();
    std::fs::write(
        model.join("cog.yaml"),
        cog_yaml.replace("requirements.txt", "missing.txt"),
    )
    .unwrap();
    let missing_out = scratch.path().join("missing");
    let (code, _, stderr) = runner(&[
        "--python",
        python.to_str().unwrap(),
        "package",
        model.to_str().unwrap(),
        "--out",
        missing_out.to_str().unwrap(),
        "--target",
        "modal",
        "--runner-bin",
        fake,
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("build.python_requirements names missing.txt"),
        "{stderr}"
    );
    assert!(
        !missing_out.exists(),
        "a failed package wrote {}",
        missing_out.display()
    );
    std::fs::write(model.join("cog.yaml"), cog_yaml).unwrap();

    let Some(venv) = std::env::var_os("RUNNER_MODAL_VENV").map(PathBuf::from) else {
        eprintln!("SKIPPED (import): RUNNER_MODAL_VENV is not set");
        return;
    };
    let probe = r#"
import json, warnings
warnings.simplefilter("ignore")
import modal_app
print(json.dumps({"app": modal_app.app.name, "classes": sorted(modal_app.app.registered_classes)}))
"#;
    let got = import_modal_app(&venv, &out, scratch.path(), probe);
    assert_eq!(got, json!({"app": "shout", "classes": ["Runner"]}));
}

#[test]
fn a_modal_package_says_its_url_answers_openais_sdks_where_the_model_does() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = fake_runner_binary(scratch.path());
    let fake = fake.to_str().unwrap();
    let out = scratch.path().join("embedder");
    let stdout = package_ok(
        &support::minilm_dir(),
        &out,
        &["--target", "modal", "--runner-bin", fake],
    );
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    for text in [&stdout, &readme] {
        assert!(
            text.contains("OpenAI's SDKs (/v1/embeddings)")
                && text.contains("base_url=URL + \"/v1\""),
            "{text}"
        );
    }
    // A model without them says nothing of it.
    let plain = scratch.path().join("plain");
    let stdout = package_ok(
        &repo_root().join("models/files"),
        &plain,
        &["--target", "modal", "--runner-bin", fake],
    );
    assert!(!stdout.contains("OpenAI"), "{stdout}");
}

/// A real x86-64 executable that answers `--version` as a CUDA build of runner whose
/// kernels were built for `targets` does (compiled with the C compiler cargo links with),
/// so that `runner package` reads which GPUs it runs on.
fn fake_cuda_runner(dir: &Path, name: &str, targets: &KernelTargets) -> PathBuf {
    let line = format!(
        "runner 0.1.0 (cuda: {}; runs on {})",
        targets.version_note(),
        targets.runs_on_words()
    );
    let source = dir.join(format!("{name}.c"));
    std::fs::write(
        &source,
        format!("#include <stdio.h>\nint main(void) {{ puts({line:?}); return 0; }}\n"),
    )
    .unwrap();
    let bin = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg(&source)
        .arg("-o")
        .arg(&bin)
        .status()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(status.success(), "{cc} could not build the stand-in runner");
    bin
}

#[test]
fn a_gpu_package_needs_a_runner_whose_kernels_run_on_that_gpu() {
    let model = scratch_model("tiny-mlp");
    runner_models::tiny_mlp::write_model(&model.path().join("weights"), &Default::default(), 7)
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let arch = |name| GpuArch::parse(name).unwrap();
    let hopper = fake_cuda_runner(
        scratch.path(),
        "runner-hopper",
        &KernelTargets::single(arch("sm_90a")),
    );
    let ampere = fake_cuda_runner(
        scratch.path(),
        "runner-ampere",
        &KernelTargets::single(arch("sm_86")),
    );
    // CUDA_COMPUTE_CAP=75,86,90: machine code for each, PTX for 7.5 and newer.
    let portable = fake_cuda_runner(
        scratch.path(),
        "runner-portable",
        &KernelTargets {
            machine_code: vec![arch("sm_75"), arch("sm_86"), arch("sm_90a")],
            ptx: arch("sm_75"),
            linked_ptx: true,
        },
    );
    // Packages for Modal, on `gpu` (or the one runner chooses) with the binary `bin`.
    let for_modal = |name: &str, gpu: Option<&str>, bin: &Path| {
        let out = scratch.path().join(name);
        let mut args = vec!["--target", "modal", "--runner-bin", bin.to_str().unwrap()];
        args.extend(gpu.map(|g| ["--gpu", g]).into_iter().flatten());
        let (code, _, stderr) = package(model.path(), &out, &args);
        (out, code, stderr)
    };

    // The H100/H200 build, for an A10G: refused before anything is written, saying why
    // and what to do.
    let (out, code, stderr) = for_modal("a10g", Some("A10G"), &hopper);
    assert_eq!(code, 1, "{stderr}");
    for expected in [
        "on the A10G it would fail at setup",
        "built for sm_90a, which runs on compute capability 9.0 only (H100, H200, GH200)",
        "the A10G has compute capability 8.6",
        "CUDA_COMPUTE_CAP=86",
        "--gpu H100 | H200",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
    assert!(!out.exists());

    // The same binary for the H100, an A10G build for the A10G, and the portable build for
    // any of them: packaged, with no word about kernels.
    for (gpu, bin) in [
        ("H100", &hopper),
        ("A10G", &ampere),
        ("A100-40GB", &portable),
        ("L40S", &portable),
        ("B200", &portable),
    ] {
        let (out, code, stderr) = for_modal(gpu, Some(gpu), bin);
        assert_eq!(code, 0, "{stderr}");
        assert!(!stderr.contains("kernels"), "{stderr}");
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(out.join("runner-package.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["hardware"], gpu);
    }

    // A GPU older than bf16 (the T4, 7.5), whatever the binary: runner's models cannot
    // run there.
    let (out, code, stderr) = for_modal("t4", Some("T4"), &portable);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the T4 has compute capability 7.5")
            && stderr.contains("bf16")
            && stderr.contains("choose one of: --gpu L4 | A10G"),
        "{stderr}"
    );
    assert!(!out.exists());

    // cog.yaml asks for a GPU and none is named: the smallest GPU the binary runs on, and a
    // warning saying which smaller one it cannot (the T4 is never chosen).
    let config = model.path().join("cog.yaml");
    let yaml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, yaml.replace("build:\n", "build:\n  gpu: true\n")).unwrap();
    let (out, code, stderr) = for_modal("auto", None, &hopper);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "the L4 is the smallest modal GPU that holds the weights and that runner supports"
        ) && stderr.contains("packaged for the H100 instead")
            && stderr.contains("CUDA_COMPUTE_CAP=89"),
        "{stderr}"
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("runner-package.json")).unwrap()).unwrap();
    assert_eq!(manifest["hardware"], "H100");
}
