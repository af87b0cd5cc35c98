//! The README's promise: `runner serve models/all-minilm-l6-v2` answers Cog predictions
//! with the embeddings sentence-transformers computes (cosine ≥ 0.9999).

mod support;

use serde_json::{json, Value};
use support::*;

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/data/minilm_reference.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let reference = reference();
    // The cold path, whatever snapshot a local `runner snapshot` or bench left behind.
    let server = Server::start(&minilm_dir(), &["--snapshot", "off"]);
    assert!(
        server.status_line.contains("candle:bert")
            && server.status_line.contains("weights safetensors"),
        "{}",
        server.status_line
    );

    // One text: one 384-dimensional vector.
    for (i, sentence) in reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let (status, p) = server.predict(json!({ "text": sentence }));
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["status"], "succeeded");
        let got = floats(&p["output"]);
        assert_eq!(got.len(), 384);
        let want = floats(&reference["normalized_full384"][i]);
        let cos = cosine(&got, &want);
        assert!(cos >= 0.9999, "sentence {i}: cosine {cos}");
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(max_abs <= 1e-4, "sentence {i}: max abs diff {max_abs}");
    }

    // A list of texts: one vector each, in order (batched with padding).
    let (status, p) = server.predict(json!({ "text": reference["sentences"] }));
    assert_eq!(status, 200, "{p}");
    let rows = p["output"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (i, row) in rows.iter().enumerate() {
        let cos = cosine(&floats(row), &floats(&reference["normalized_full384"][i]));
        assert!(cos >= 0.9999, "batched sentence {i}: cosine {cos}");
    }

    // Without normalisation the vectors keep sentence-transformers' mean-pooled norms.
    let (_, p) = server.predict(json!({ "text": reference["sentences"], "normalize": false }));
    for (i, row) in p["output"].as_array().unwrap().iter().enumerate() {
        let norm = floats(row).iter().map(|x| x * x).sum::<f64>().sqrt();
        let want = reference["mean_pooled_l2norm"][i].as_f64().unwrap();
        assert!((norm - want).abs() < 1e-3, "norm {norm} vs {want}");
        let first8: Vec<f64> = floats(row)[..8].to_vec();
        let cos = cosine(&first8, &floats(&reference["mean_pooled_first8"][i]));
        assert!(cos > 0.9999, "mean-pooled first 8: cosine {cos}");
    }

    // The README's curl: {"input": {"text": "hello"}}.
    let (status, body) = server.post_json("/predictions", r#"{"input":{"text":"hello"}}"#);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["output"].as_array().unwrap().len(), 384);

    // Wrong input type: 422 naming the input.
    let (status, p) = server.predict(json!({ "text": 5 }));
    assert_eq!(status, 422);
    assert_eq!(p["detail"][0]["loc"], json!(["body", "input", "text"]));
}
