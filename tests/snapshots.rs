//! Snapshots end to end: `runner snapshot` writes one, `runner serve` restores it
//! (bit-identical predictions), and every bad snapshot falls back to a cold load with a
//! warning naming the problem, or fails setup with `--require-snapshot`.

mod support;

use std::path::Path;

use serde_json::Value;
use support::*;

fn generated_model(layers: usize, dtype: &str) -> tempfile::TempDir {
    generated_tiny_mlp(512, layers, dtype)
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

    // The restore first and then the build (what CUDA does by default), instead of the
    // restore on its own thread beside the build.
    let mut command = std::process::Command::new(RUNNER);
    command.env("RUNNER_RESTORE_OVERLAP", "off");
    let sequential = Server::start_with(command, model.path(), &[]);
    assert!(
        sequential.status_line.contains("weights snapshot"),
        "{}",
        sequential.status_line
    );
    assert_eq!(predict_raw(&cold), predict_raw(&sequential));

    // By default the restore reads through the page cache and says how much of the data it
    // found there (the snapshot was just written, so some of it).
    let snapshot = &h["runner"]["snapshot"];
    assert_eq!(snapshot["read"], "page cache", "{snapshot}");
    let resident = snapshot["page_cache_resident"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&resident), "{snapshot}");
    // Reading around the page cache (O_DIRECT; what a fresh machine's disk may prefer)
    // restores the same model, where the file system takes direct reads.
    let mut command = std::process::Command::new(RUNNER);
    command.env("RUNNER_RESTORE_READ", "direct");
    let direct = Server::start_with(command, model.path(), &[]);
    let read = health(&direct)["runner"]["snapshot"]["read"].clone();
    if read == "direct" {
        assert_eq!(predict_raw(&cold), predict_raw(&direct));
    } else {
        eprintln!("direct reads skipped: the temporary directory refuses O_DIRECT");
        assert_eq!(read, "page cache");
    }
}

/// A server restored from a snapshot maps it; `runner snapshot` writing a new one over the
/// same path (a new file renamed into place) and the file then being removed must not
/// change what that server computes.
#[test]
fn a_snapshot_replaced_or_removed_under_a_server_changes_nothing() {
    let model = generated_model(2, "bf16");
    let path = take_snapshot(model.path());
    let server = Server::start(model.path(), &["--require-snapshot"]);
    assert!(server.mappings_of(&path) >= 1, "the snapshot is mapped");
    let before = predict_raw(&server);
    let again = take_snapshot(model.path());
    assert_eq!(again, path);
    assert_eq!(predict_raw(&server), before);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(predict_raw(&server), before);
    let h = health(&server);
    assert_eq!(h["status"], "READY", "{h}");
}

/// `runner serve --save-snapshot`: a server that loads cold writes the snapshot the next
/// start restores, after it is ready; one restored from it writes nothing; a snapshot made
/// stale (the model changed) is replaced the same way; a place it cannot write to is a
/// warning while the server goes on serving.
#[test]
fn a_cold_server_saves_the_snapshot_the_next_start_restores() {
    let model = generated_model(2, "bf16");
    let cold = Server::start(model.path(), &["--save-snapshot"]);
    assert!(
        cold.status_line.contains("weights safetensors"),
        "{}",
        cold.status_line
    );
    let save = cold.finished_snapshot_save();
    assert_eq!(save["status"], "saved", "{save}");
    let path = std::path::PathBuf::from(save["path"].as_str().unwrap());
    assert!(path.starts_with(model.path().join(".runner")), "{save}");
    assert!(save["bytes"].as_u64().unwrap() > 0, "{save}");
    let metrics = cold.get("/metrics").1;
    assert!(
        metrics.contains("runner_snapshot_save{status=\"saved\"} 1"),
        "{metrics}"
    );
    let cold_output = predict_raw(&cold);
    drop(cold);

    let restored = Server::start(model.path(), &["--save-snapshot", "--require-snapshot"]);
    assert!(
        restored.status_line.contains("weights snapshot"),
        "{}",
        restored.status_line
    );
    let h = health(&restored);
    assert!(h["runner"].get("snapshot_save").is_none(), "{h}");
    assert_eq!(predict_raw(&restored), cold_output, "bit-identical outputs");
    drop(restored);

    // The model changes (its cog.yaml does): the old snapshot is refused, and the cold
    // start that follows saves one that fits again.
    let cog = model.path().join("cog.yaml");
    let mut yaml = std::fs::read_to_string(&cog).unwrap();
    yaml.push_str("# edited\n");
    std::fs::write(&cog, yaml).unwrap();
    let stale = Server::start(model.path(), &["--save-snapshot"]);
    assert!(
        stale.status_line.contains("weights safetensors"),
        "{}",
        stale.status_line
    );
    assert_eq!(stale.finished_snapshot_save()["status"], "saved");
    drop(stale);
    let again = Server::start(model.path(), &["--require-snapshot"]);
    assert!(
        again.status_line.contains("weights snapshot"),
        "{}",
        again.status_line
    );
    assert_eq!(predict_raw(&again), cold_output);
    drop(again);

    // Somewhere it cannot be written (its folder would be a file): the save fails and says
    // why; the server serves on.
    let unwritable = cog.join("x.rsnap");
    let server = Server::start(
        model.path(),
        &[
            "--save-snapshot",
            "--snapshot",
            unwritable.to_str().unwrap(),
        ],
    );
    let save = server.finished_snapshot_save();
    assert_eq!(save["status"], "failed", "{save}");
    assert!(
        save["error"].as_str().unwrap().contains("cannot create"),
        "{save}"
    );
    assert_eq!(health(&server)["status"], "READY");
    assert_eq!(predict_raw(&server), cold_output);
    // The warning was written before the status changed; its line may still be in the pipe.
    let mut warned = String::new();
    for _ in 0..100 {
        warned.push_str(&server.drain_stderr().join("\n"));
        if warned.contains("could not save a snapshot") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(warned.contains("could not save a snapshot"), "{warned}");
    drop(server);

    // Nowhere to put it.
    let (code, _, stderr) = runner(&[
        "serve",
        model.path().to_str().unwrap(),
        "--port",
        "0",
        "--device",
        "cpu",
        "--snapshot",
        "off",
        "--save-snapshot",
    ]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--save-snapshot with --snapshot off"),
        "{stderr}"
    );
}

/// SIGTERM while a `--save-snapshot` save is being written: the server waits for it (up to
/// its shutdown timeout) and exits cleanly, and what it leaves is a whole snapshot that the
/// next start restores, never a part of one.
#[test]
fn a_server_stopped_while_saving_finishes_the_snapshot_first() {
    // 16 layers of 1024 x 1024 f32: 67 MB to write, long enough to be stopped mid-save.
    let model = generated_tiny_mlp(1024, 16, "f32");
    let mut server = Server::start(model.path(), &["--save-snapshot"]);
    server.sigterm();
    assert!(
        server.exits_within(std::time::Duration::from_secs(60)),
        "the server did not stop"
    );
    let logs = server.drain_stderr().join("\n");
    assert!(logs.contains("snapshot saved"), "{logs}");
    let leftovers: Vec<String> = file_names(&model.path().join(".runner"))
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let restored = Server::start(model.path(), &["--require-snapshot"]);
    assert!(
        restored.status_line.contains("weights snapshot"),
        "{}",
        restored.status_line
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
    // The encoder's prepared (transposed, fused) weights replace the raw ones in the
    // snapshot rather than sitting beside them.
    let weights_bytes = std::fs::metadata(dir.join("weights/model.safetensors"))
        .unwrap()
        .len();
    let snapshot_bytes = std::fs::metadata(&snap).unwrap().len();
    assert!(
        snapshot_bytes < weights_bytes + weights_bytes / 20,
        "snapshot {snapshot_bytes} bytes for {weights_bytes} bytes of weights"
    );
    // The CPU restore maps the snapshot instead of copying it.
    assert!(restored.mappings_of(&snap) >= 1, "the snapshot is mapped");
    let mut copying = std::process::Command::new(RUNNER);
    copying.env("RUNNER_RESTORE_CPU", "copy");
    let copied = Server::start_with(
        copying,
        &dir,
        &["--snapshot", snap.to_str().unwrap(), "--require-snapshot"],
    );
    assert_eq!(
        copied.mappings_of(&snap),
        0,
        "RUNNER_RESTORE_CPU=copy copies"
    );
    // A cold load maps the large tensors it keeps as stored (the word embeddings) instead of
    // copying them; RUNNER_LOAD_CPU=copy copies everything.
    let weights = dir.join("weights/model.safetensors");
    assert!(cold.mappings_of(&weights) >= 1, "the embeddings are mapped");
    let mut copying_load = std::process::Command::new(RUNNER);
    copying_load.env("RUNNER_LOAD_CPU", "copy");
    let cold_copied = Server::start_with(copying_load, &dir, &["--snapshot", "off"]);
    assert_eq!(
        cold_copied.mappings_of(&weights),
        0,
        "RUNNER_LOAD_CPU=copy copies"
    );
    let input = serde_json::json!({"text": ["The cat sits outside", "A man is playing guitar"]});
    let a = cold.predict(input.clone()).1["output"].to_string();
    let b = restored.predict(input.clone()).1["output"].to_string();
    let c = copied.predict(input.clone()).1["output"].to_string();
    let d = cold_copied.predict(input).1["output"].to_string();
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(a, d);
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
    // Each start's setup log, line by line: what a GPU run is read from afterwards.
    let logs = |mode: usize| modes[mode]["setup_logs"][0].as_array().unwrap().clone();
    assert!(
        logs(1)
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("restored ")),
        "{:?}",
        logs(1)
    );
    assert!(
        !logs(0)
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("restored ")),
        "{:?}",
        logs(0)
    );
    assert!(report["snapshot_restore_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["page_cache_read_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["speedup_first_prediction"].as_f64().unwrap() > 0.0);
    // How the restores read, and what the page cache held; the cold-file ceiling only
    // with --drop-caches.
    assert_eq!(report["restore_reads"], "page cache", "{report}");
    let resident = report["page_cache_resident_at_restore"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&resident), "{report}");
    assert!(report["cold_read_gb_per_s"].is_null(), "{report}");
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

/// `runner snapshot MODEL --device cpu -o OUT`: (exit code, stderr).
fn snapshot_to(model: &str, out: &Path) -> (i32, String) {
    let (code, _, stderr) = runner(&[
        "snapshot",
        model,
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    (code, stderr)
}

/// The names of the files in `dir`.
fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every tensor of a snapshot file, restored on the CPU, as raw bytes by name.
fn restored_bytes(path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let snapshot = runner_snapshot::Snapshot::open(path).map_err(|e| e.to_string())?;
    let (tensors, _) = snapshot
        .restore(&candle_core::Device::Cpu)
        .map_err(|e| e.to_string())?;
    Ok(tensors
        .iter()
        .map(|(n, t)| (n.clone(), runner_snapshot::tensor_bytes(n, t).unwrap()))
        .collect())
}

/// Fault run (issue 10): `runner snapshot` killed with SIGKILL at 50 random points, from
/// before the model loads to after the rename. Afterwards the target either does not exist
/// or is a whole snapshot that restores the same bits as an undisturbed one; no leftover
/// file looks like a snapshot; the next writer removes the dead writers' temporary files;
/// and `serve` starts from the survivor (or cold).
#[test]
fn sigkill_while_snapshotting_never_leaves_a_bad_snapshot() {
    use rand::{Rng, SeedableRng};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = generated_model(6, "f32"); // 6.3 MB of weights: the write takes a while
    let model = dir.path().to_str().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let good = out_dir.path().join("good.rsnap");
    let started = Instant::now();
    let (code, stderr) = snapshot_to(model, &good);
    let whole_run = started.elapsed();
    assert_eq!(code, 0, "{stderr}");
    let want = restored_bytes(&good).unwrap();

    let target = out_dir.path().join("killed.rsnap");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED_0F4B_1D00);
    let (mut survived, mut absent, mut mid_write) = (0, 0, 0);
    for round in 0..50 {
        let _ = std::fs::remove_file(&target);
        let mut child = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args([
                "-q",
                "snapshot",
                model,
                "--device",
                "cpu",
                "-o",
                target.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Anywhere from the start to a little past a whole run.
        let delay = whole_run.mul_f64(rng.random_range(0.0..1.3));
        std::thread::sleep(delay.min(Duration::from_secs(20)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let names = file_names(out_dir.path());
        let its_temporary = format!(".killed.rsnap.tmp-{}-", child.id());
        if names.iter().any(|n| n.starts_with(&its_temporary)) {
            mid_write += 1;
        }
        if target.exists() {
            let got = restored_bytes(&target)
                .unwrap_or_else(|e| panic!("round {round}: a snapshot that does not restore: {e}"));
            assert!(
                got == want,
                "round {round}: the snapshot restores other bits"
            );
            survived += 1;
        } else {
            absent += 1;
        }
        for name in names {
            assert!(
                name == "good.rsnap"
                    || name == "killed.rsnap"
                    || name.starts_with(".killed.rsnap.tmp-"),
                "round {round}: unexpected file {name}"
            );
        }
    }
    eprintln!(
        "50 kills: {survived} left a whole snapshot, {absent} left none ({mid_write} of them mid-write)"
    );
    assert!(
        mid_write > 0,
        "no kill landed mid-write: the delays miss the write"
    );

    // The next writer sweeps the dead writers' temporary files away.
    let (code, stderr) = snapshot_to(model, &target);
    assert_eq!(code, 0, "{stderr}");
    let leftovers: Vec<String> = file_names(out_dir.path())
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let server = Server::start(
        dir.path(),
        &["--snapshot", target.to_str().unwrap(), "--require-snapshot"],
    );
    assert_eq!(health(&server)["status"], "READY");
}

/// Fault run (issue 10): a real full filesystem (a 2 MiB tmpfs, mounted in a private mount
/// namespace by `unshare`) under a 6 MB snapshot: a clear "disk full" error naming the path
/// and the space needed, a failing exit code, and nothing left on the filesystem.
#[test]
fn a_full_filesystem_fails_the_snapshot_cleanly() {
    let dir = generated_model(6, "f32");
    let script = r#"
        set -e
        mnt=$(mktemp -d)
        mount -t tmpfs -o size=2m tmpfs "$mnt"
        set +e
        "$RUNNER" snapshot "$MODEL" --device cpu -o "$mnt/full.rsnap"
        echo "exit=$?"
        echo "left=[$(ls -A "$mnt")]"
        echo "free=$(df -k --output=used "$mnt" | tail -1 | tr -d ' ')"
    "#;
    // As root a mount namespace is enough; otherwise a user namespace maps us to root.
    let unshare_args: &[&str] = if unsafe { libc::geteuid() } == 0 {
        &["-m"]
    } else {
        &["-rm"]
    };
    let out = std::process::Command::new("unshare")
        .args(unshare_args)
        .args(["sh", "-c", script])
        .env("RUNNER", env!("CARGO_BIN_EXE_runner"))
        .env("MODEL", dir.path())
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "this test mounts a small tmpfs in a private mount namespace (unshare -m, or -rm \
         without root), which this machine refused:\n{stderr}"
    );
    assert!(stdout.contains("exit=1"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("left=[]"),
        "files left on the full disk: {stdout}"
    );
    assert!(stdout.contains("free=0"), "space still used: {stdout}");
    assert!(
        stderr.contains("disk") && stderr.contains("full.rsnap"),
        "{stderr}"
    );
}
