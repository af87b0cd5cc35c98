//! Replays the corpora of the file and argument fuzz targets (fuzz/corpus/<target>/, seeds
//! plus what the fuzzers found, and fuzz/regressions/<target>/, every crash ever found)
//! through the targets' own checks, without instrumentation: a cheap regression test that
//! runs with `cargo test`. (cog.yaml and prediction input replay in runner-spec.)
#![allow(dead_code)] // shared.rs also holds checks replayed elsewhere

use std::path::PathBuf;

// runner's allocator, so the snapshot corpus goes through the mapped CPU restore as in the
// server.
#[global_allocator]
static ALLOCATOR: runner_snapshot::SnapshotAllocator = runner_snapshot::SnapshotAllocator;

include!("../../../fuzz/fuzz_targets/shared.rs");
include!("../../../fuzz/fuzz_targets/shared_files.rs");

fn replay(target: &str, check: impl Fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.map_while(Result::ok) {
            let data = std::fs::read(e.path()).unwrap();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
            assert!(outcome.is_ok(), "{} panics", e.path().display());
            count += 1;
        }
    }
    assert!(count > 0, "no corpus for {target}");
}

#[test]
fn structured_corpus() {
    replay("structured", check_structured);
}

#[test]
fn safetensors_corpus() {
    replay("safetensors", check_safetensors);
}

#[test]
fn gguf_corpus() {
    replay("gguf", check_gguf);
}

#[test]
fn snapshot_corpus() {
    replay("snapshot", check_snapshot);
}

#[test]
fn data_uri_corpus() {
    replay("data_uri", check_data_uri);
}

#[test]
fn cli_inputs_corpus() {
    let signature = every_input_kind();
    replay("cli_inputs", |data| check_cli_inputs(&signature, data));
}

/// The seeds are what they claim: the valid ones open (so the fuzzers start from inputs
/// that reach deep into the readers).
#[test]
fn valid_seeds_are_accepted() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let gguf = scratch("seed.gguf");
    std::fs::copy(root.join("gguf/tiny-llama"), &gguf).unwrap();
    let (content, _) = runner_models::llama::open_gguf(&gguf).unwrap();
    let tokenizer = runner_models::llama::tokenizer::from_gguf(&content).unwrap();
    let ids = tokenizer.encode("hello", false).unwrap().get_ids().to_vec();
    assert_eq!(tokenizer.id_to_token(ids[0]).as_deref(), Some("hello"));
    runner_snapshot::Snapshot::open(&root.join("snapshot/tiny-mlp.rsnap"))
        .unwrap()
        .restore(&candle_core::Device::Cpu)
        .unwrap();
    let single = std::fs::read(root.join("safetensors/single")).unwrap();
    let path = scratch("seed.safetensors");
    std::fs::write(&path, &single[1..]).unwrap();
    assert_eq!(runner_models::weights::read_header(&path).unwrap().len(), 2);
}

/// The sealed seed is the real snapshot again: sealing adds nothing of its own.
#[test]
fn the_sealed_snapshot_seed_restores() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/snapshot");
    let sealed = std::fs::read(root.join("tiny-mlp-sealed")).unwrap();
    let mut parts = sealed[4..].splitn(3, |&b| b == 0);
    let (h, m, d) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let path = scratch("sealed.rsnap");
    std::fs::write(&path, runner_snapshot::seal(h, m, d)).unwrap();
    let original = std::fs::read(root.join("tiny-mlp.rsnap")).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), original);
    runner_snapshot::Snapshot::open(&path)
        .unwrap()
        .restore(&candle_core::Device::Cpu)
        .unwrap();
}
