//! Dynamic batching and the queue, end to end on MiniLM: concurrent predictions gathered
//! into one forward pass get exactly their own vectors (equal to unbatched ones), a flood
//! beyond the queue gets 429s without losing or duplicating predictions, a prediction
//! canceled inside a batch leaves the others alone, and invalid input never enters one.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Distinct short sentences, one per caller.
fn sentence(i: usize) -> String {
    const SUBJECTS: [&str; 6] = [
        "A dog",
        "The committee",
        "My neighbour",
        "A robot",
        "The river",
        "Our team",
    ];
    const VERBS: [&str; 5] = ["quietly reads", "builds", "ignores", "paints", "measures"];
    const OBJECTS: [&str; 4] = [
        "the old bridge",
        "a new theory",
        "every window",
        "the morning news",
    ];
    format!(
        "{} {} {} ({i})",
        SUBJECTS[i % 6],
        VERBS[(i / 6) % 5],
        OBJECTS[(i / 30) % 4]
    )
}

/// Starts a long prediction (many texts) in the background and returns once the server
/// is running it, so what is sent next has to wait and gather into one batch.
fn occupy(server: &Server) -> std::thread::JoinHandle<(u16, String)> {
    let texts: Vec<String> = (0..1024)
        .map(|i| format!("keep the model busy {i}"))
        .collect();
    let handle = server.predict_in_background(&json!({ "input": { "text": texts } }).to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = server.get("/metrics");
        if metrics
            .lines()
            .any(|l| l.starts_with("runner_predictions_in_flight ") && !l.ends_with(" 0"))
        {
            return handle;
        }
        assert!(
            Instant::now() < deadline,
            "the long prediction never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn put_prediction(addr: &str, id: &str, input: &Value) -> (u16, Value) {
    let (status, body) = http(
        addr,
        "PUT",
        &format!("/predictions/{id}"),
        Some(&json!({ "id": id, "input": input }).to_string()),
        &[("Content-Type", "application/json")],
    );
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, v)
}

/// PUTs predictions `{prefix}-{i}` of `sentence(i)` for i in 0..count, each from its own
/// thread; join the handles, in order, for (status, body).
fn put_sentences_in_background(
    server: &Server,
    prefix: &str,
    count: usize,
) -> Vec<std::thread::JoinHandle<(u16, Value)>> {
    (0..count)
        .map(|i| {
            let (addr, id) = (server.addr.clone(), format!("{prefix}-{i}"));
            std::thread::spawn(move || put_prediction(&addr, &id, &json!({ "text": sentence(i) })))
        })
        .collect()
}

#[test]
fn batched_predictions_equal_unbatched_ones_and_stay_separate() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/data/minilm_reference.json")).unwrap(),
    )
    .unwrap();
    let server = Server::start(
        &minilm_dir(),
        &[
            "--snapshot",
            "off",
            "--max-batch-size",
            "32",
            "--max-queue",
            "64",
        ],
    );
    assert!(
        server.status_line.contains("batches of up to 32"),
        "{}",
        server.status_line
    );

    // Unbatched: one sequential client never shares a forward pass.
    let inputs: Vec<Value> = (0..20)
        .map(|i| match i {
            0 | 1 => json!({ "text": reference["sentences"][i] }),
            5 => json!({ "text": [sentence(100), sentence(101), sentence(102)] }),
            7 => json!({ "text": sentence(i), "normalize": false }),
            _ => json!({ "text": sentence(i) }),
        })
        .collect();
    let mut alone = Vec::new();
    for input in &inputs {
        let (status, p) = server.predict(input.clone());
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["metrics"]["batch_size"], 1, "{p}");
        alone.push(p["output"].clone());
    }

    // Together: all twenty wait behind a long prediction, then run as one batch.
    let busy = occupy(&server);
    let handles: Vec<_> = inputs
        .iter()
        .map(|input| server.predict_in_background(&json!({ "input": input }).to_string()))
        .collect();
    // Invalid input is answered at once and never joins the batch.
    let (status, p) = server.predict(json!({ "text": 5 }));
    assert_eq!(status, 422, "{p}");
    let mut biggest_batch = 0;
    for (i, handle) in handles.into_iter().enumerate() {
        let (status, body) = handle.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let p: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(p["status"], "succeeded", "{p}");
        biggest_batch = biggest_batch.max(p["metrics"]["batch_size"].as_u64().unwrap());
        // Its own output: the same shape and, to float rounding, the same numbers.
        let (got, want) = (&p["output"], &alone[i]);
        let pairs: Vec<(Vec<f64>, Vec<f64>)> = if i == 5 {
            let (g, w) = (got.as_array().unwrap(), want.as_array().unwrap());
            assert_eq!(g.len(), 3, "prediction {i}: one vector per text");
            g.iter()
                .zip(w)
                .map(|(a, b)| (floats(a), floats(b)))
                .collect()
        } else {
            vec![(floats(got), floats(want))]
        };
        for (g, w) in pairs {
            let diff = max_abs_diff(&g, &w);
            assert!(
                diff < 1e-5,
                "prediction {i}: batched differs from unbatched by {diff}"
            );
        }
        // Its own logs: only its own text count.
        let texts = if i == 5 { 3 } else { 1 };
        let logs = p["logs"].as_str().unwrap();
        assert!(
            logs.starts_with(&format!(
                "embedded {texts} text(s) into 384 dimensions, in a batch of "
            )),
            "prediction {i}: {logs}"
        );
        if i < 2 {
            let cos = cosine(
                &floats(&p["output"]),
                &floats(&reference["normalized_full384"][i]),
            );
            assert!(
                cos >= 0.9999,
                "reference sentence {i} in a batch: cosine {cos}"
            );
        }
    }
    assert!(biggest_batch > 1, "nothing was batched");
    let norm = floats(&alone[7]).iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "normalize=false was applied to the whole batch"
    );
    let (status, _) = busy.join().unwrap();
    assert_eq!(status, 200);
}

#[test]
fn a_flood_beyond_the_queue_gets_429_and_loses_nothing() {
    let server = Server::start(
        &minilm_dir(),
        &[
            "--snapshot",
            "off",
            "--max-batch-size",
            "4",
            "--max-queue",
            "4",
        ],
    );
    let expected: Vec<Vec<f64>> = (0..40)
        .map(|i| floats(&server.predict(json!({ "text": sentence(i) })).1["output"]))
        .collect();

    // 4 slots (one taken by the long prediction) and 4 queue places for 40 callers.
    let busy = occupy(&server);
    let handles = put_sentences_in_background(&server, "flood", 40);
    let mut succeeded = 0;
    let mut refused = 0;
    for (i, handle) in handles.into_iter().enumerate() {
        let (status, p) = handle.join().unwrap();
        match status {
            200 => {
                assert_eq!(p["status"], "succeeded", "{p}");
                assert_eq!(p["id"], format!("flood-{i}"));
                let diff = max_abs_diff(&floats(&p["output"]), &expected[i]);
                assert!(
                    diff < 1e-5,
                    "flood-{i} got another caller's vector (diff {diff})"
                );
                succeeded += 1;
            }
            429 => refused += 1,
            other => panic!("flood-{i}: unexpected {other}: {p}"),
        }
    }
    assert_eq!(succeeded + refused, 40);
    assert!(refused > 0, "the queue never filled");
    assert!(succeeded >= 7, "only {succeeded} predictions were accepted");
    let (status, _) = busy.join().unwrap();
    assert_eq!(status, 200);

    // The server counted exactly what the callers saw: nothing lost, nothing twice.
    let (_, metrics) = server.get("/metrics");
    let counter = |prefix: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        counter("runner_predictions_total{status=\"succeeded\"}"),
        40 + succeeded + 1,
        "{metrics}"
    );
    assert_eq!(
        counter("runner_rejections_total{reason=\"queue_full\"}"),
        refused,
        "{metrics}"
    );
    // And the server still answers.
    let (status, _) = server.predict(json!({ "text": "still here" }));
    assert_eq!(status, 200);
}

#[test]
fn a_prediction_canceled_inside_a_batch_leaves_the_others_alone() {
    let server = Server::start(
        &minilm_dir(),
        &["--snapshot", "off", "--max-batch-size", "8"],
    );
    let expected: HashMap<usize, Vec<f64>> = [0, 1, 2]
        .into_iter()
        .map(|i| {
            (
                i,
                floats(&server.predict(json!({ "text": sentence(i) })).1["output"]),
            )
        })
        .collect();
    let busy = occupy(&server);
    let handles = put_sentences_in_background(&server, "batch", 3);
    // Wait until all three are in flight, then cancel the middle one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .get("/metrics")
        .1
        .lines()
        .any(|l| l == "runner_predictions_in_flight 4")
    {
        assert!(
            Instant::now() < deadline,
            "the three predictions never arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, body) = server.post_json("/predictions/batch-1/cancel", "");
    assert_eq!(status, 200, "{body}");
    for (i, handle) in handles.into_iter().enumerate() {
        let (status, p) = handle.join().unwrap();
        assert_eq!(status, 200, "{p}");
        if i == 1 {
            assert_eq!(p["status"], "canceled", "{p}");
        } else {
            assert_eq!(p["status"], "succeeded", "{p}");
            let diff = max_abs_diff(&floats(&p["output"]), &expected[&i]);
            assert!(diff < 1e-5, "batch-{i}: {diff}");
        }
    }
    assert_eq!(busy.join().unwrap().0, 200);
}
