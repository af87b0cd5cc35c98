//! SmolLM2-135M-Instruct (`candle:llama`) against the reference outputs in
//! tests/data/smollm2_reference.json (transformers 5.24 in f32 on the dequantized GGUF, and
//! llama.cpp): the GGUF tokenizer, the quantized GGUF path, `runner convert`'s f32
//! safetensors, and the served model (streaming, sampling, stops, cancellation, bad inputs).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use runner_models::llama::{self, Generator};
use runner_models::LoadContext;
use runner_spec::ModelDir;
use serde_json::{json, Value};
use support::{repo_root, runner, Server};

const GGUF: &str = "weights/SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_dir() -> PathBuf {
    let dir = repo_root().join("models/smollm2-135m-instruct");
    assert!(
        dir.join(GGUF).is_file(),
        "SmolLM2 weights are missing: run scripts/fetch-smollm2.sh (or scripts/test.sh, which fetches them)"
    );
    dir
}

fn reference() -> Value {
    let text =
        std::fs::read_to_string(repo_root().join("tests/data/smollm2_reference.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["model"].clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn generator(dir: &Path) -> Generator {
    let model = ModelDir::open(dir).unwrap();
    let log = |_: &str| {};
    llama::load_generator(&model, &candle_core::Device::Cpu, &LoadContext::new(&log)).unwrap()
}

#[test]
fn the_gguf_tokenizer_reproduces_the_reference_prompt_ids() {
    let dir = model_dir();
    let (content, _) = llama::open_gguf(&dir.join(GGUF)).unwrap();
    let tokenizer = llama::tokenizer::from_gguf(&content).unwrap();
    let saved = tempfile::tempdir().unwrap();
    let path = saved.path().join("tokenizer.json");
    tokenizer.save(&path, false).unwrap();
    // Usable as a plain tokenizer.json with the tokenizers crate.
    let reloaded = tokenizers::Tokenizer::from_file(&path).unwrap();
    for case in reference()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want = ids(&case["prompt_ids"]);
        assert_eq!(
            tokenizer.encode(prompt, false).unwrap().get_ids(),
            want,
            "{prompt:?}"
        );
        assert_eq!(
            reloaded.encode(prompt, false).unwrap().get_ids(),
            want,
            "{prompt:?}"
        );
    }
    // Digits split one by one and ChatML's control tokens stay whole.
    let e = tokenizer
        .encode("<|im_start|>user 2018<|im_end|>", false)
        .unwrap();
    assert_eq!(e.get_ids()[0], 1);
    assert_eq!(*e.get_ids().last().unwrap(), 2);
    assert_eq!(
        tokenizer.decode(e.get_ids(), false).unwrap(),
        "<|im_start|>user 2018<|im_end|>"
    );
    let digits = tokenizer.encode("2018", false).unwrap();
    assert_eq!(digits.get_ids().len(), 4);
}

#[test]
fn the_quantized_gguf_path_matches_the_references() {
    let g = generator(&model_dir());
    let reference = reference();
    let n = reference["max_new_tokens"].as_u64().unwrap() as usize;
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let (got, _) = g.greedy(&ids(&case["prompt_ids"]), n).unwrap();
        let hf = ids(&case["hf_f32_generated_ids"]);
        if case["primary"] == true {
            // All implementations agree on these: quantized activations must too.
            assert_eq!(
                got,
                hf,
                "{prompt:?}: {:?}",
                g.tokenizer().decode(&got, false)
            );
        } else {
            // Q8_1 activations may flip low-margin steps later; the first token holds.
            assert_eq!(got[0], hf[0], "{prompt:?}: first token");
            assert_eq!(
                got[0],
                ids(&case["llama_cpp_generated_ids"])[0],
                "{prompt:?}"
            );
        }
    }
}

/// runner's own CPU forward pass, with each kernel this CPU runs (AVX-512 VNNI, AVX2),
/// against candle's quantized Llama on the same GGUF: the same first-step logits to
/// rounding, and the same greedy tokens, prompt and decoding steps alike (a cache fed one
/// token at a time, then re-fed from an earlier position).
#[test]
fn runners_cpu_forward_pass_agrees_with_candles() {
    use candle_core::Device;
    use runner_models::llama::quantized::ModelWeights;
    use runner_models::llama::Kernel;
    let path = model_dir().join(GGUF);
    let load = |native: Option<Kernel>| {
        let (content, mut file) = llama::open_gguf(&path).unwrap();
        ModelWeights::from_gguf_with(content, &mut file, &Device::Cpu, 512, native).unwrap()
    };
    let kernels = Kernel::all_here();
    if kernels.is_empty() {
        eprintln!("this CPU has neither AVX-512 VNNI nor AVX2: only candle's path serves it");
        return;
    }
    let candle = load(None);
    assert_eq!(candle.native_kernel(), None);
    let mut first_logits: Option<(Kernel, Vec<Vec<u32>>)> = None;
    for kernel in kernels {
        let mut ours = load(Some(kernel));
        assert_eq!(ours.native_kernel(), Some(kernel));
        // The kernels compute bit-identical products: the whole model's logits are too.
        let bits: Vec<Vec<u32>> = reference()["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|case| {
                let x = candle_core::Tensor::new(ids(&case["prompt_ids"]).as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let logits = ours.forward(&x, 0).unwrap().flatten_all().unwrap();
                logits
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|f| f.to_bits())
                    .collect()
            })
            .collect();
        match &first_logits {
            None => first_logits = Some((kernel, bits)),
            Some((other, theirs)) => assert!(
                bits == *theirs,
                "{kernel:?} and {other:?} give different first-step logits"
            ),
        }
        forward_passes_agree(ours, candle.clone(), &format!("{kernel:?}"));
    }
}

fn forward_passes_agree(
    mut ours: runner_models::llama::quantized::ModelWeights,
    mut candle: runner_models::llama::quantized::ModelWeights,
    kernel: &str,
) {
    use candle_core::{Device, Tensor};
    use runner_models::llama::quantized::ModelWeights;
    let step = |m: &mut ModelWeights, tokens: &[u32], position: usize| -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        m.forward(&x, position)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0 as u32
    };
    for case in reference()["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let (a, b) = (step(&mut ours, &prompt, 0), step(&mut candle, &prompt, 0));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{kernel} {prompt:?}: first-step logits differ by at most {worst}");
        assert!(
            worst <= 0.05,
            "{kernel} {prompt:?}: first-step logits differ by {worst}"
        );
        let (mut next_a, mut next_b) = (argmax(&a), argmax(&b));
        let mut generated = vec![];
        for i in 0..8 {
            assert_eq!(next_a, next_b, "{kernel} {prompt:?}: step {i}");
            generated.push(next_a);
            let position = prompt.len() + i;
            next_a = argmax(&step(&mut ours, &[next_a], position));
            next_b = argmax(&step(&mut candle, &[next_b], position));
        }
        // Feeding the generated tokens again from the prompt's end replaces the cache's tail.
        let again = step(&mut ours, &generated, prompt.len());
        assert_eq!(argmax(&again), next_a, "{kernel} {prompt:?}: re-fed");
    }
}

#[test]
fn converted_f32_safetensors_match_transformers_exactly() {
    let out = tempfile::tempdir().unwrap();
    let converted = out.path().join("smollm2-f32");
    let (code, stdout, stderr) = runner(&[
        "convert",
        model_dir().join(GGUF).to_str().unwrap(),
        "--out",
        converted.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), converted.to_str().unwrap());
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(converted.join("weights/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["rope_theta"], json!(100000.0));
    assert_eq!(config["rms_norm_eps"], json!(0.00001));
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["num_key_value_heads"], 3);

    let g = generator(&converted);
    let reference = reference();
    let n = reference["max_new_tokens"].as_u64().unwrap() as usize;
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let (got, first_logits) = g.greedy(&ids(&case["prompt_ids"]), n).unwrap();
        assert_eq!(got, ids(&case["hf_f32_generated_ids"]), "{prompt:?}");
        for (i, want) in case["hf_f32_first_step_logits_first8"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (first_logits[i] - want).abs() <= 1e-4,
                "{prompt:?}: logit {i}: {} vs {want}",
                first_logits[i]
            );
        }
        for pair in case["hf_f32_first_step_top5"].as_array().unwrap() {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            assert!(
                (first_logits[id] - want).abs() <= 1e-4,
                "{prompt:?}: logit of {id}"
            );
        }
    }
    // The served model's log probabilities: the first step's five most likely tokens are
    // transformers' top five, each at its logit minus the log of the sum of all logits'
    // exponentials (computed here from the whole first-step logits).
    let server = Server::start(&converted, &[]);
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let (_, first_logits) = g.greedy(&ids(&case["prompt_ids"]), 1).unwrap();
        let max = first_logits.iter().copied().fold(f32::MIN, f32::max) as f64;
        let log_sum = max
            + first_logits
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let (status, body) = support::http(
            &server.addr,
            "POST",
            "/v1/completions",
            Some(
                &json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 5})
                    .to_string(),
            ),
            &[],
        );
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        let logprobs = &body["choices"][0]["logprobs"];
        let top: Vec<(String, f64)> = logprobs["top_logprobs"][0]
            .as_object()
            .unwrap()
            .iter()
            .map(|(t, lp)| (t.clone(), lp.as_f64().unwrap()))
            .collect();
        let want = case["hf_f32_first_step_top5"].as_array().unwrap();
        assert_eq!(top.len(), 5, "{prompt:?}: {logprobs}");
        for (pair, (token, logprob)) in want.iter().zip(&top) {
            let id = pair[0].as_u64().unwrap() as u32;
            assert_eq!(
                token,
                &g.tokenizer().decode(&[id], false).unwrap(),
                "{prompt:?}"
            );
            let expected = first_logits[id as usize] as f64 - log_sum;
            assert!(
                (logprob - expected).abs() <= 1e-4,
                "{prompt:?}: logprob of {token:?}: {logprob} vs {expected}"
            );
            // transformers' logits differ from runner's by at most 1e-4 (above), so the
            // differences between logprobs are transformers' too.
            let hf_gap = pair[1].as_f64().unwrap() - want[0][1].as_f64().unwrap();
            assert!(
                (logprob - top[0].1 - hf_gap).abs() <= 2e-4,
                "{prompt:?}: {token:?}"
            );
        }
        assert_eq!(
            logprobs["token_logprobs"][0],
            json!(top[0].1),
            "greedy takes the top one"
        );
    }
    drop(server);

    // Converting again without --force is refused.
    let (code, _, stderr) = runner(&[
        "convert",
        model_dir().join(GGUF).to_str().unwrap(),
        "--out",
        converted.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--force"), "{stderr}");
}

fn greedy_input(prompt: &str, n: u32) -> Value {
    json!({"prompt": prompt, "use_chat_template": false, "temperature": 0, "max_new_tokens": n})
}

#[test]
fn the_served_model_streams_samples_stops_and_cancels() {
    let server = Server::start(&model_dir(), &[]);
    let reference = reference();
    let primary = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["primary"] == true)
        .unwrap();
    let prompt = primary["prompt"].as_str().unwrap();
    let text = primary["hf_f32_generated_text"].as_str().unwrap();

    // Greedy over HTTP: the reference text, with token metrics.
    let (code, p) = server.predict(greedy_input(prompt, 20));
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["status"], "succeeded");
    let output: String = p["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(output, text);
    assert_eq!(p["metrics"]["output_token_count"], 20);
    assert_eq!(p["metrics"]["input_token_count"], 4);
    assert!(p["metrics"]["time_to_first_token"].as_f64().unwrap() > 0.0);
    assert!(p["metrics"]["tokens_per_second"].as_f64().unwrap() > 0.0);

    // The same tokens as an event stream, one output event per piece.
    let r = support::request(
        &server.addr,
        "POST",
        "/predictions",
        &[
            ("Content-Type".into(), "application/json".into()),
            ("Accept".into(), "text/event-stream".into()),
        ],
        Some(
            json!({"input": greedy_input(prompt, 20)})
                .to_string()
                .as_bytes(),
        ),
    );
    let chunks: Vec<String> = r
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("event: output\ndata: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["chunk"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        chunks.len() >= 10,
        "streamed {} pieces: {}",
        chunks.len(),
        r.body
    );
    assert_eq!(chunks.concat(), text);

    // A stop sequence ends the output before it, and is not returned.
    let mut input = greedy_input(prompt, 20);
    input["stop"] = json!(["bear", "never"]);
    let (_, p) = server.predict(input);
    assert_eq!(
        p["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect::<String>(),
        " with a quick brown "
    );

    // Seeded sampling is reproducible; the chat template is applied by default.
    let sampled = json!({"prompt": "Write a haiku about rivers.", "temperature": 0.9, "top_p": 0.95, "seed": 1234, "max_new_tokens": 24});
    let (_, a) = server.predict(sampled.clone());
    let (_, b) = server.predict(sampled);
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(a["output"], b["output"]);
    assert!(
        a["metrics"]["input_token_count"].as_u64().unwrap() > 20,
        "ChatML wraps the prompt: {a}"
    );

    // Non-ASCII output is streamed in whole characters only.
    let (_, p) = server.predict(json!({"prompt": "Translate to Japanese: good morning, my friend! 🎉", "temperature": 0, "max_new_tokens": 32}));
    for chunk in p["output"].as_array().unwrap() {
        assert!(
            !chunk.as_str().unwrap().contains('\u{FFFD}'),
            "a broken character was streamed: {p}"
        );
    }

    // Cancellation stops generation within a token.
    let id = "cancel-me";
    let addr = server.addr.clone();
    let long = json!({"input": {"prompt": "Tell me a very long story.", "max_new_tokens": 4096, "temperature": 0.8, "seed": 1}}).to_string();
    let handle = std::thread::spawn(move || {
        support::http(
            &addr,
            "PUT",
            &format!("/predictions/{id}"),
            Some(&long),
            &[("Content-Type", "application/json")],
        )
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (code, _) = server.post_json(&format!("/predictions/{id}/cancel"), "{}");
    assert_eq!(code, 200);
    let (_, body) = handle.join().unwrap();
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["status"], "canceled", "{p}");
    assert!(p["output"].as_array().map_or(0, Vec::len) < 4096);

    // Out-of-range numbers are refused before generation; an over-long prompt fails clearly.
    let (code, p) = server.predict(json!({"prompt": "hi", "max_new_tokens": 0}));
    assert_eq!(code, 422, "{p}");
    let (code, _) = server.predict(json!({"prompt": "hi", "max_new_tokens": 5000}));
    assert_eq!(code, 422);
    let (code, _) = server.predict(json!({"prompt": "hi", "temperature": -1}));
    assert_eq!(code, 422);
    let (_, p) = server.predict(
        json!({"prompt": "word ".repeat(9000), "use_chat_template": false, "max_new_tokens": 4}),
    );
    assert_eq!(p["status"], "failed");
    assert!(
        p["error"]
            .as_str()
            .unwrap()
            .contains("context holds 8192 tokens"),
        "{p}"
    );
}

/// A model directory holding `gguf` as its only weight file.
fn model_with(gguf: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("weights")).unwrap();
    std::fs::write(dir.path().join("weights/model.gguf"), gguf).unwrap();
    std::fs::copy(model_dir().join("cog.yaml"), dir.path().join("cog.yaml")).unwrap();
    dir
}

fn run_error(dir: &Path) -> String {
    let (code, _, stderr) = runner(&["run", dir.to_str().unwrap(), "-i", "prompt=hi"]);
    assert_eq!(code, 1, "{stderr}");
    stderr
}

/// A small GGUF written with candle's writer.
fn tiny_gguf(architecture: &str) -> Vec<u8> {
    use candle_core::quantized::{gguf_file, QTensor};
    let t = QTensor::quantize(
        &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String(architecture.to_string());
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut out,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    out.into_inner()
}

#[test]
fn bad_gguf_files_get_clear_errors() {
    // Truncated: the tensors run past the end of the file.
    let real = std::fs::read(model_dir().join(GGUF)).unwrap();
    let truncated = model_with(&real[..20 << 20]);
    let err = run_error(truncated.path());
    assert!(
        err.contains("truncated: tensor") && err.contains("download it again"),
        "{err}"
    );

    // Another architecture.
    let gpt2 = model_with(&tiny_gguf("gpt2"));
    let err = run_error(gpt2.path());
    assert!(err.contains("general.architecture is `gpt2`"), "{err}");

    // A quantization type candle cannot read: the tensor's dtype patched to an unknown id.
    let mut bytes = tiny_gguf("llama");
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dtype_at = at + 4 + 2 * 8; // n_dims (u32), two u64 dims
    bytes[dtype_at..dtype_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let unknown = model_with(&bytes);
    let err = run_error(unknown.path());
    assert!(
        err.contains("quantization type") || err.contains("unknown dtype"),
        "{err}"
    );

    // Not a GGUF at all.
    let garbage = model_with(b"definitely not a gguf file");
    let err = run_error(garbage.path());
    assert!(err.contains("not a readable GGUF file"), "{err}");
}

/// A snapshot of the GGUF model holds runner's packed CPU weights: a restore reads none of
/// the GGUF's tensors, maps the snapshot, and generates exactly what a cold load does; a
/// load that runs candle's forward pass cannot use it and says so.
#[test]
fn a_gguf_snapshot_restores_to_identical_generations() {
    use runner_models::llama::Kernel;
    let dir = model_dir();
    let scratch = tempfile::tempdir().unwrap();
    let snap = scratch.path().join("smollm2.rsnap");
    let (dir_arg, snap_arg) = (dir.to_str().unwrap(), snap.to_str().unwrap());
    let (code, _, stderr) = runner(&[
        "snapshot", dir_arg, "--device", "cpu", "-o", snap_arg, "--verify",
    ]);
    if Kernel::detect().is_none() {
        // candle's forward pass (no AVX2 here) has no snapshot form.
        assert_ne!(code, 0);
        assert!(stderr.contains("--snapshot off"), "{stderr}");
        return;
    }
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("bit-identical to the cold load"),
        "{stderr}"
    );
    // The packed form is no larger than the GGUF it was made from.
    let gguf_bytes = std::fs::metadata(dir.join(GGUF)).unwrap().len();
    let snapshot_bytes = std::fs::metadata(&snap).unwrap().len();
    assert!(
        snapshot_bytes < gguf_bytes + gguf_bytes / 20,
        "snapshot {snapshot_bytes} bytes for a {gguf_bytes}-byte GGUF"
    );

    let cold = Server::start(&dir, &["--snapshot", "off"]);
    let restored = Server::start(&dir, &["--snapshot", snap_arg, "--require-snapshot"]);
    assert!(
        restored.status_line.contains("weights snapshot"),
        "{}",
        restored.status_line
    );
    assert!(restored.mappings_of(&snap) >= 1, "the snapshot is mapped");
    for case in reference()["cases"].as_array().unwrap() {
        let input = greedy_input(case["prompt"].as_str().unwrap(), 20);
        let (a, b) = (cold.predict(input.clone()).1, restored.predict(input).1);
        assert_eq!(b["status"], "succeeded", "{b}");
        assert_eq!(a["output"], b["output"], "{}", case["prompt"]);
        if case["primary"] == true {
            let text: String = b["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            assert_eq!(text, case["hf_f32_generated_text"].as_str().unwrap());
        }
    }

    // candle's forward pass cannot use runner's packed weights.
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--snapshot", snap_arg];
        args.extend_from_slice(extra);
        args.extend([dir_arg, "-i", "prompt=Hi", "-i", "max_new_tokens=2"]);
        let (code, _, stderr) = runner_with_candle(&args);
        (code, stderr)
    };
    let (code, stderr) = run(&["--require-snapshot"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("candle's forward pass"), "{stderr}");
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("snapshot not used") && stderr.contains("candle's forward pass"),
        "{stderr}"
    );
}

/// A prompt that starts as an earlier prompt and its output did (a chat resending its
/// history) reuses that generation's KV cache, and generates exactly what processing the
/// whole prompt again would (a server with the cache off).
#[test]
fn a_prompt_that_continues_an_earlier_one_reuses_its_kv_cache() {
    let cached = Server::start(&model_dir(), &["--concurrency", "2"]);
    let mut without = std::process::Command::new(support::RUNNER);
    without.env("RUNNER_LLAMA_PROMPT_CACHE_MB", "0");
    let uncached = Server::start_with(without, &model_dir(), &[]);
    let text = |p: &Value| -> String {
        assert_eq!(p["status"], "succeeded", "{p}");
        p["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect()
    };
    let first = "<|im_start|>system\nYou are a patient teacher who explains things step by step.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n";
    let (_, a) = cached.predict(greedy_input(first, 24));
    let answer = text(&a);
    assert!(
        a["metrics"].get("cached_input_token_count").is_none(),
        "{a}"
    );
    // The next turn: the history, the answer, a new question.
    let second = format!("{first}{answer}<|im_end|>\n<|im_start|>user\nAnd at sunset?<|im_end|>\n<|im_start|>assistant\n");
    let (_, b) = cached.predict(greedy_input(&second, 24));
    let reused = b["metrics"]["cached_input_token_count"]
        .as_u64()
        .unwrap_or(0);
    let prompt_tokens = b["metrics"]["input_token_count"].as_u64().unwrap();
    assert!(
        reused >= 40 && reused < prompt_tokens,
        "reused {reused} of {prompt_tokens}: {b}"
    );
    assert!(
        b["logs"]
            .as_str()
            .unwrap()
            .contains("reused from the prompt cache"),
        "{b}"
    );
    let (_, fresh) = uncached.predict(greedy_input(&second, 24));
    assert!(
        fresh["metrics"].get("cached_input_token_count").is_none(),
        "{fresh}"
    );
    assert_eq!(
        text(&b),
        text(&fresh),
        "a reused prefix changed the generation"
    );
    // The very same prompt again: all but its last token come from the cache.
    let (_, c) = cached.predict(greedy_input(&second, 24));
    assert_eq!(c["metrics"]["cached_input_token_count"], prompt_tokens - 1);
    assert_eq!(text(&c), text(&fresh));

    // /metrics adds up the tokens, reused ones apart.
    let sum = |key: &str| -> u64 {
        [&a, &b, &c]
            .iter()
            .map(|p| p["metrics"][key].as_u64().unwrap_or(0))
            .sum()
    };
    let (_, metrics) = support::http(&cached.addr, "GET", "/metrics", None, &[]);
    for (kind, key) in [
        ("input", "input_token_count"),
        ("cached_input", "cached_input_token_count"),
        ("output", "output_token_count"),
    ] {
        let line = format!("runner_tokens_total{{kind=\"{kind}\"}} {}", sum(key));
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
    }

    // Questions that share only the system prompt: each reuses it and leaves it for the
    // others, also two at once.
    let system = "<|im_start|>system\nYou are a meticulous librarian. You answer questions about books, authors and reading with care, in one or two sentences.<|im_end|>\n";
    let prompt_for = |question: &str| {
        format!("{system}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    };
    let (_, first) = cached.predict(greedy_input(&prompt_for("Who wrote Hamlet?"), 12));
    let (_, fresh) = uncached.predict(greedy_input(&prompt_for("Who wrote Hamlet?"), 12));
    assert_eq!(text(&first), text(&fresh));
    let questions = ["What is a novella?", "Why read poetry aloud?"];
    let together: Vec<Value> = questions
        .iter()
        .map(|q| {
            let body = json!({ "input": greedy_input(&prompt_for(q), 12) }).to_string();
            cached.predict_in_background(&body)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| serde_json::from_str(&h.join().unwrap().1).unwrap())
        .collect();
    for (question, p) in questions.iter().zip(&together) {
        let (_, fresh) = uncached.predict(greedy_input(&prompt_for(question), 12));
        assert_eq!(text(p), text(&fresh), "{question}");
        let reused = p["metrics"]["cached_input_token_count"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            reused >= 25,
            "{question}: the system prompt was not reused: {p}"
        );
    }
}

/// `runner chat`: each line a user turn, each answer streamed back, the conversation kept
/// through the chat template; the answers are what `runner run` gives the rendered history.
#[test]
fn runner_chat_holds_a_conversation() {
    use std::io::Write as _;
    let dir = model_dir();
    let mut child = std::process::Command::new(support::RUNNER)
        .args([
            "chat",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--temperature",
            "0",
        ])
        .args(["--max-tokens", "16", "--system", "You answer briefly."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Name a fruit.\nAnd a vegetable?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();

    let complete = |prompt: &str| -> String {
        let input = json!({"prompt": prompt, "use_chat_template": false, "temperature": 0, "max_new_tokens": 16});
        let (code, stdout, stderr) = runner(&[
            "run",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
            &input.to_string(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        stdout.trim_end_matches('\n').to_string()
    };
    let first = "<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n";
    let a1 = complete(first);
    let second = format!("{first}{a1}<|im_end|>\n<|im_start|>user\nAnd a vegetable?<|im_end|>\n<|im_start|>assistant\n");
    let a2 = complete(&second);
    assert_eq!(stdout, format!("{a1}\n{a2}\n"));

    // Not a text generator: said plainly.
    let (code, _, stderr) = runner(&["chat", support::minilm_dir().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("does not generate text"), "{stderr}");
}

/// `runner ARGS` with candle's forward pass (`RUNNER_LLAMA_CPU=candle`): (exit code,
/// stdout, stderr).
/// `runner serve --save-snapshot` on a GGUF model: the cold server saves the packed form
/// while it serves, and a server restored from it generates what the cold one does.
#[test]
fn a_serving_gguf_model_saves_a_snapshot_that_restores_the_same_generations() {
    if runner_models::llama::Kernel::detect().is_none() {
        eprintln!("skipped: runner's CPU kernels do not run here (no AVX2)");
        return;
    }
    let dir = model_dir();
    let scratch = tempfile::tempdir().unwrap();
    let snap = scratch.path().join("saved.rsnap");
    let snap_arg = snap.to_str().unwrap();
    let cold = Server::start(&dir, &["--snapshot", snap_arg, "--save-snapshot"]);
    assert!(
        cold.status_line.contains("weights gguf"),
        "{}",
        cold.status_line
    );
    let input = greedy_input("The capital of France is", 12);
    let generated = cold.predict(input.clone()).1;
    assert_eq!(generated["status"], "succeeded", "{generated}");
    let save = cold.finished_snapshot_save();
    assert_eq!(save["status"], "saved", "{save}");
    drop(cold);
    let restored = Server::start(&dir, &["--snapshot", snap_arg, "--require-snapshot"]);
    assert!(
        restored.status_line.contains("weights snapshot"),
        "{}",
        restored.status_line
    );
    assert_eq!(restored.predict(input).1["output"], generated["output"]);
}

/// The peak memory `runner snapshot` reports on its last line, in bytes./// The peak memory `runner snapshot` reports on its last line, in bytes.
fn snapshot_peak_bytes(stderr: &str) -> u64 {
    let mb: f64 = stderr
        .rsplit("(peak memory ")
        .next()
        .and_then(|r| r.split(" MB)").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory in: {stderr}"));
    (mb * 1e6) as u64
}

/// `runner snapshot` records the tensors the model keeps by sharing them, not by copying
/// them: loading and writing the snapshot takes about the memory that serving the same
/// model does (a copy of the weights held until the write was 95-120 MB more for this
/// 98 MB GGUF). `envs` picks the forward pass.
fn snapshotting_takes_what_serving_takes(envs: &[(&str, &str)]) {
    let dir = model_dir();
    let gguf_bytes = std::fs::metadata(dir.join(GGUF)).unwrap().len();
    let mut command = std::process::Command::new(support::RUNNER);
    command.envs(envs.iter().copied());
    let server = Server::start_with(command, &dir, &["--snapshot", "off"]);
    let serving = server.peak_rss_kib() * 1024;
    drop(server);
    let scratch = tempfile::tempdir().unwrap();
    let snap = scratch.path().join("memory.rsnap");
    let out = std::process::Command::new(support::RUNNER)
        .envs(envs.iter().copied())
        .args(["snapshot", dir.to_str().unwrap(), "--device", "cpu", "-o"])
        .arg(&snap)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let snapshotting = snapshot_peak_bytes(&stderr);
    assert!(
        snapshotting < serving + gguf_bytes / 2,
        "{envs:?}: snapshotting peaked at {snapshotting} bytes, serving at {serving}, for a {gguf_bytes}-byte GGUF"
    );
}

#[test]
fn snapshotting_runners_packed_weights_holds_no_copy_of_them() {
    if runner_models::llama::Kernel::detect().is_none() {
        eprintln!("skipped: runner's CPU kernels do not run here (no AVX2)");
        return;
    }
    snapshotting_takes_what_serving_takes(&[]);
}

/// candle's kernels keep the quantized blocks as loaded, as on a GPU, where a copy held on
/// the host was as large as the model.
#[test]
fn snapshotting_candles_quantized_weights_holds_no_copy_of_them() {
    snapshotting_takes_what_serving_takes(&[
        ("RUNNER_LLAMA_CPU", "candle"),
        ("RUNNER_CPU_KERNEL", "none"),
    ]);
}

fn runner_with_candle(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(support::RUNNER)
        .env("RUNNER_LLAMA_CPU", "candle")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The converted f32 safetensors of the GGUF, in a temporary folder.
fn converted_f32() -> (tempfile::TempDir, PathBuf) {
    let out = tempfile::tempdir().unwrap();
    let converted = out.path().join("smollm2-f32");
    let (code, _, stderr) = runner(&[
        "convert",
        model_dir().join(GGUF).to_str().unwrap(),
        "--out",
        converted.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    (out, converted)
}

fn quantized_generator(dir: &Path, quantize: &str) -> Generator {
    let model = ModelDir::open(dir).unwrap();
    let log = |_: &str| {};
    let ctx = LoadContext::new(&log).with_quantize(Some(quantize.into()));
    llama::load_generator(&model, &candle_core::Device::Cpu, &ctx).unwrap()
}

/// Safetensors quantized at load (`--quantize`): Q4_1 of the dequantized GGUF gives back
/// the GGUF's own blocks (llama.cpp's quantizer, its q/k layout, Q8_0 vocabulary), so the
/// same logits to the bit; Q8_0 stays within what 8-bit activations alone cost the GGUF;
/// Q5_0 runs through candle's kernels and keeps most first tokens.
#[test]
fn safetensors_quantized_at_load_track_the_gguf_and_the_f32_model() {
    let (_scratch, converted) = converted_f32();
    let full = generator(&converted);
    let gguf = generator(&model_dir());
    let q4_1 = quantized_generator(&converted, "q4_1");
    let q8_0 = quantized_generator(&converted, "q8_0");
    let q5_0 = quantized_generator(&converted, "q5_0");
    let worst = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let mut q5_0_agrees = 0;
    for case in reference()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let prompt_ids = ids(&case["prompt_ids"]);
        let (f32_ids, f32_logits) = full.greedy(&prompt_ids, 1).unwrap();
        let (gguf_ids, gguf_logits) = gguf.greedy(&prompt_ids, 8).unwrap();
        let (ids_4_1, logits_4_1) = q4_1.greedy(&prompt_ids, 8).unwrap();
        assert_eq!(logits_4_1, gguf_logits, "{prompt:?}: q4_1 against the GGUF");
        assert_eq!(ids_4_1, gguf_ids, "{prompt:?}");
        // 8-bit activations alone put the GGUF 0.65–1.71 logits away from f32 on these
        // prompts; q8_0 measured 0.68–1.71.
        let (ids_8_0, logits_8_0) = q8_0.greedy(&prompt_ids, 1).unwrap();
        let gguf_gap = worst(&gguf_logits, &f32_logits);
        let q8_gap = worst(&logits_8_0, &f32_logits);
        assert!(
            q8_gap <= 2.0,
            "{prompt:?}: q8_0 {q8_gap} from f32, the GGUF {gguf_gap}"
        );
        assert_eq!(ids_8_0[0], f32_ids[0], "{prompt:?}: q8_0's first token");
        let (ids_5_0, _) = q5_0.greedy(&prompt_ids, 1).unwrap();
        q5_0_agrees += usize::from(ids_5_0[0] == f32_ids[0]);
    }
    // Q5_0 cannot hold the Q4_1 grid these f32 weights lie on: 3 of 4 measured.
    assert!(
        q5_0_agrees >= 3,
        "q5_0 kept {q5_0_agrees} of 4 first tokens"
    );
}

fn run_args_error(args: &[&str]) -> String {
    let (code, _, stderr) = runner(args);
    assert_eq!(code, 1, "{args:?}: {stderr}");
    stderr
}

/// A model directory that asks for quantization at load in its cog.yaml serves what the
/// GGUF serves, snapshots the quantized form (bit-identical on restore, a quarter of the
/// f32 weights), and refuses a snapshot taken with another type; bad settings are refused
/// with what to do.
#[test]
fn a_model_quantized_at_load_serves_and_snapshots_it() {
    let (_scratch, converted) = converted_f32();
    let cog_yaml = converted.join("cog.yaml");
    let mut yaml = std::fs::read_to_string(&cog_yaml).unwrap();
    yaml.push_str("environment:\n  - RUNNER_QUANTIZE=q4_1\n");
    std::fs::write(&cog_yaml, &yaml).unwrap();
    let snap = converted.join("q4_1.rsnap");
    let (dir_arg, snap_arg) = (converted.to_str().unwrap(), snap.to_str().unwrap());
    let (code, _, stderr) = runner(&[
        "snapshot", dir_arg, "--device", "cpu", "-o", snap_arg, "--verify",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("bit-identical to the cold load"),
        "{stderr}"
    );
    assert!(stderr.contains("quantized to q4_1 at load"), "{stderr}");
    let f32_bytes = std::fs::metadata(converted.join("weights/model.safetensors"))
        .unwrap()
        .len();
    let snapshot_bytes = std::fs::metadata(&snap).unwrap().len();
    assert!(
        snapshot_bytes * 3 < f32_bytes,
        "snapshot {snapshot_bytes} bytes for {f32_bytes} bytes of f32"
    );

    let gguf = Server::start(&model_dir(), &["--snapshot", "off"]);
    let cold = Server::start(&converted, &["--snapshot", "off"]);
    let restored = Server::start(&converted, &["--snapshot", snap_arg, "--require-snapshot"]);
    assert!(
        restored.status_line.contains("weights snapshot")
            && restored.status_line.contains("quantized to q4_1 at load"),
        "{}",
        restored.status_line
    );
    assert!(
        cold.status_line
            .contains("weights safetensors, quantized to q4_1 at load"),
        "{}",
        cold.status_line
    );
    for case in reference()["cases"].as_array().unwrap() {
        let input = greedy_input(case["prompt"].as_str().unwrap(), 12);
        let want = gguf.predict(input.clone()).1;
        assert_eq!(want["status"], "succeeded", "{want}");
        assert_eq!(cold.predict(input.clone()).1["output"], want["output"]);
        assert_eq!(restored.predict(input).1["output"], want["output"]);
    }
    drop((gguf, cold, restored));

    // `runner doctor` says what the load will do.
    let (code, stdout, stderr) = runner(&["doctor", dir_arg, "--device", "cpu", "--port", "0"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("quantized to q4_1 at load"), "{stdout}");

    // --quantize overrides cog.yaml, so this snapshot (q4_1) no longer fits.
    let stderr = run_args_error(&[
        "run",
        dir_arg,
        "--quantize",
        "q8_0",
        "--snapshot",
        snap_arg,
        "--require-snapshot",
        "-i",
        "prompt=Hi",
        "-i",
        "max_new_tokens=1",
    ]);
    assert!(
        stderr.contains("quantized at load to q4_1")
            && stderr.contains("quantized at load to q8_0"),
        "{stderr}"
    );
    let (code, _, stderr) = runner(&[
        "run",
        dir_arg,
        "--quantize",
        "off",
        "--snapshot",
        "off",
        "-i",
        "prompt=Hi",
        "-i",
        "max_new_tokens=1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("safetensors (F32) loaded"), "{stderr}");

    // Bad settings.
    let run = |extra: &[&str], dir: &str| {
        let mut args = vec!["run", dir, "--snapshot", "off", "-i", "prompt=Hi"];
        args.extend_from_slice(extra);
        run_args_error(&args)
    };
    let e = run(&["--quantize", "q3"], dir_arg);
    assert!(
        e.contains("\"q3\"") && e.contains("q4_1") && e.contains("off"),
        "{e}"
    );
    // SmolLM2's rows of 576 values do not split into k-quant blocks of 256.
    let e = run(&["--quantize", "q4_k"], dir_arg);
    assert!(e.contains("blocks of 256") && e.contains("q8_0"), "{e}");
    let e = run(&["--quantize", "q8_0"], model_dir().to_str().unwrap());
    assert!(e.contains("already quantized"), "{e}");
    let minilm = repo_root().join("models/all-minilm-l6-v2");
    let e = run(&["--quantize", "q8_0"], minilm.to_str().unwrap());
    assert!(e.contains("applies to candle:llama"), "{e}");
    std::fs::write(&cog_yaml, yaml.replace("=q4_1", "=q4")).unwrap();
    let e = run(&[], dir_arg);
    assert!(
        e.contains("cog.yaml") && e.contains("RUNNER_QUANTIZE=q4"),
        "{e}"
    );
    // Rotary scaling the quantized Llama does not apply is refused, not ignored.
    std::fs::write(&cog_yaml, &yaml).unwrap();
    let config_path = converted.join("weights/config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["rope_scaling"] = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"});
    std::fs::write(&config_path, config.to_string()).unwrap();
    let e = run(&[], dir_arg);
    assert!(e.contains("rope_scaling"), "{e}");
}

/// candle's forward pass (`RUNNER_LLAMA_CPU=candle` here; every GPU) snapshots the GGUF's
/// quantized tensors as they are held, and a restore serves the same text.
#[test]
fn candles_quantized_forward_pass_snapshots_too() {
    let dir = model_dir();
    let scratch = tempfile::tempdir().unwrap();
    let snap = scratch.path().join("candle.rsnap");
    let (dir_arg, snap_arg) = (dir.to_str().unwrap(), snap.to_str().unwrap());
    let (code, _, stderr) = runner_with_candle(&[
        "snapshot", dir_arg, "--device", "cpu", "-o", snap_arg, "--verify",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("bit-identical to the cold load"),
        "{stderr}"
    );
    let generate = |snapshot: &str| {
        let (code, stdout, stderr) = runner_with_candle(&[
            "run",
            dir_arg,
            "--device",
            "cpu",
            "--snapshot",
            snapshot,
            "--json",
            r#"{"prompt": "The capital of France is", "use_chat_template": false, "temperature": 0, "max_new_tokens": 12}"#,
        ]);
        assert_eq!(code, Some(0), "{stderr}");
        (stdout, stderr)
    };
    let (cold, _) = generate("off");
    let (restored, stderr) = generate(snap_arg);
    assert!(stderr.contains("restored from the snapshot"), "{stderr}");
    assert!(stderr.contains("candle's forward pass"), "{stderr}");
    assert_eq!(restored, cold);
}
