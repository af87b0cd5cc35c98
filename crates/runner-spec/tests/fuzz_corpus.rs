//! Replays the fuzz corpora (fuzz/corpus/, seeds plus what the fuzzers found, and
//! fuzz/regressions/, every crash ever found) through the fuzz targets' checks, without
//! instrumentation: a cheap regression test that runs with `cargo test`.

use std::path::PathBuf;

include!("../../../fuzz/fuzz_targets/shared.rs");

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.map_while(Result::ok) {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
    assert!(!out.is_empty(), "no corpus for {target}");
    out
}

#[test]
fn cog_yaml_corpus() {
    for (path, data) in inputs("cog_yaml") {
        let r = std::panic::catch_unwind(|| check_cog_yaml(&data));
        assert!(r.is_ok(), "{} panics", path.display());
    }
}

#[test]
fn prediction_input_corpus() {
    let validator = runner_spec::InputValidator::new(&every_input_kind()).unwrap();
    for (path, data) in inputs("prediction_input") {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_input(&validator, &data)
        }));
        assert!(r.is_ok(), "{} panics", path.display());
    }
}
