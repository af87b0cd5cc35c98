// What the file and argument fuzz targets check, shared with the corpus replay test in
// runner-engine (crates/runner-engine/tests/fuzz_corpus.rs): both `include!` this file
// (after shared.rs, for `every_input_kind`).

/// A scratch file in this process's own folder: the targets that read files write their
/// input there (fixed names, so an index in the corpus can name its shard).
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("runner-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch folder");
    dir.join(name)
}

/// A small valid shard for the index mode of `check_safetensors`.
fn valid_shard() -> std::path::PathBuf {
    let path = scratch("shard.safetensors");
    if !path.exists() {
        runner_models::weights::write_f32_safetensors(
            &path,
            &[
                ("layer.0.weight", vec![4, 8], vec![0.5; 32]),
                ("layer.0.bias", vec![4], vec![0.25; 4]),
            ],
        )
        .expect("writing the scratch shard");
    }
    path
}

/// The safetensors reader: the first byte chooses a single file (even) or an index JSON
/// over one valid shard (odd); the rest is the file. Opening gives checked weights or an
/// error, never a panic; every tensor that loads has the shape its header declares.
pub fn check_safetensors(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (layout, names) = if mode % 2 == 0 {
        let path = scratch("model.safetensors");
        std::fs::write(&path, rest).expect("writing the scratch file");
        let names = match runner_models::weights::read_header(&path) {
            Ok(header) => header.into_keys().collect(),
            Err(_) => Vec::new(),
        };
        let layout = runner_spec::WeightsLayout {
            files: vec![path.clone()],
            safetensors_index: None,
            safetensors: vec![path],
            gguf: vec![],
        };
        (layout, names)
    } else {
        let shard = valid_shard();
        let index = scratch("model.safetensors.index.json");
        std::fs::write(&index, rest).expect("writing the scratch index");
        let layout = runner_spec::WeightsLayout {
            files: vec![index.clone(), shard.clone()],
            safetensors_index: Some(index),
            safetensors: vec![shard],
            gguf: vec![],
        };
        (layout, vec!["layer.0.weight".into(), "layer.0.bias".into()])
    };
    let Ok(weights) = runner_models::weights::CheckedWeights::open(&layout) else {
        return;
    };
    let declared: Vec<(String, Vec<usize>)> = names
        .iter()
        .filter_map(|n| weights.info(n).map(|i| (n.clone(), i.shape.clone())))
        .collect();
    let vb = weights.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
    for (name, shape) in declared {
        if let Ok(t) = vb.get(shape.clone(), &name) {
            assert_eq!(
                t.dims(),
                shape.as_slice(),
                "{name} loaded with another shape"
            );
        }
    }
}

/// The GGUF reader and the tokenizer built from its metadata: a file runner refuses with
/// an error, or one it reads; never a panic.
pub fn check_gguf(data: &[u8]) {
    let path = scratch("model.gguf");
    std::fs::write(&path, data).expect("writing the scratch file");
    if let Ok((content, _file)) = runner_models::llama::open_gguf(&path) {
        let _ = runner_models::llama::tokenizer::from_gguf(&content);
    }
}

/// The snapshot reader and the CPU restore: a snapshot that opens either restores, with
/// every tensor as its manifest says, or fails with an error; never a panic. An input that
/// starts with `SEAL` is `header JSON \0 manifest JSON \0 data`, sealed into a file with a
/// valid preamble and checksum (a crafted snapshot, so the fuzzer gets past the checksum
/// to the layout checks and the restore); anything else is the file itself.
pub fn check_snapshot(data: &[u8]) {
    let path = scratch("model.rsnap");
    let file = match data.strip_prefix(b"SEAL") {
        Some(rest) => {
            let mut parts = rest.splitn(3, |&b| b == 0);
            let (header, manifest, body) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            runner_snapshot::seal(header, manifest, body)
        }
        None => data.to_vec(),
    };
    std::fs::write(&path, file).expect("writing the scratch file");
    if let Ok(snapshot) = runner_snapshot::Snapshot::open(&path) {
        let _ = snapshot.restore(&candle_core::Device::Cpu);
    }
}

/// Data URIs (everything after `data:`): decoded bytes never exceed the limit.
pub fn check_data_uri(data: &[u8]) {
    const LIMIT: u64 = 1024;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((_mime, bytes)) = runner_engine::files::decode_data_uri(text, LIMIT) {
        assert!(
            bytes.len() as u64 <= LIMIT,
            "{} bytes past the limit",
            bytes.len()
        );
    }
}

/// `runner run -i name=value` arguments, one per line, against every input kind: typed
/// inputs that the signature names, or an error; never a panic. (`name=@path` reads a
/// file, so such lines are left out.)
pub fn check_cli_inputs(signature: &runner_spec::Signature, data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args: Vec<String> = text
        .split('\n')
        .filter(|a| !a.split_once('=').is_some_and(|(_, v)| v.starts_with('@')))
        .map(String::from)
        .collect();
    let mut input = serde_json::Map::new();
    if runner_engine::cli_inputs::parse_inputs(signature, &args, &mut input).is_ok() {
        for name in input.keys() {
            assert!(
                signature.inputs.iter().any(|f| &f.name == name),
                "{name} is no input"
            );
        }
    }
}

/// Structured output: the input is a JSON Schema, a NUL byte, then output bytes. A schema
/// compiles or is refused, never a panic (nor a stack overflow: schemas come from HTTP
/// requests); the output's bytes are fed one by one, each refused byte leaving the matcher as
/// it was, each taken one leaving a way on; and whenever the bytes taken so far can finish,
/// they are JSON serde_json reads.
pub fn check_structured(data: &[u8]) {
    use runner_models::structured::Grammar;
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let Ok(schema) = serde_json::from_slice::<serde_json::Value>(&data[..split]) else {
        return;
    };
    let Ok(grammar) = Grammar::compile(&schema) else {
        return;
    };
    let mut matcher = grammar.matcher();
    let mut taken = Vec::new();
    for &b in data.get(split + 1..).unwrap_or_default() {
        let before = matcher.clone();
        if matcher.feed(&grammar, b) {
            taken.push(b);
            // No dead ends: what it took can always go on, or is whole.
            assert!(
                matcher.can_finish() || (0..=255u8).any(|next| matcher.clone().feed(&grammar, next)),
                "the matcher took bytes that lead nowhere: {:?}",
                String::from_utf8_lossy(&taken)
            );
            if matcher.can_finish() {
                assert!(
                    serde_json::from_slice::<serde_json::Value>(&taken).is_ok(),
                    "the matcher finished on text that is not JSON: {:?}",
                    String::from_utf8_lossy(&taken)
                );
            }
        } else {
            assert!(matcher == before, "a refused byte changed the matcher");
        }
        assert!(!matcher.is_done() || matcher.can_finish());
    }
}
