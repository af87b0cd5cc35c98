//! `candle:stream`: a weightless test architecture that streams words back one by one as a
//! `ConcatenateIterator[str]`, the twin of Cog's own streaming example runner
//! (`cog-spec/cog-0.23.1-schemas/stream/run.py`). It exercises SSE, output webhooks,
//! per-token logs, a recorded metric, mid-stream failure and cancellation.

use std::time::{Duration, Instant};

use runner_spec::{InputField, ModelDir, OutputType, Primitive, Signature};
use serde_json::{json, Map, Value};

use crate::{
    Architecture, LoadContext, LoadError, MetricMode, Model, PredictContext, PredictError,
};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "stream",
    summary: "no weights; streams the prompt's words back (ConcatenateIterator[str], SSE tests)",
    signature,
    load,
    dtype_policy: "none",
    example_input: |_| serde_json::json!({"prompt": "hello world"}),
    batching: false,
    needs_weights: false,
    openai: crate::OpenAi::None,
};

pub fn signature() -> Signature {
    Signature {
        inputs: vec![
            InputField::prim("prompt", Primitive::Str)
                .description("Words to stream back one by one"),
            InputField::prim("delay", Primitive::Float)
                .default(json!(0.0))
                .ge(0.0)
                .le(5.0)
                .description("Seconds between tokens"),
            InputField::prim("fail_at", Primitive::Int)
                .default(json!(-1))
                .description("Raise after this many tokens (-1 = never)"),
        ],
        output: OutputType::ConcatenateIterator(Box::new(OutputType::Prim(Primitive::Str))),
        streaming: true,
    }
}

struct Stream;

fn load(
    _: &ModelDir,
    _: &candle_core::Device,
    ctx: &LoadContext,
) -> Result<Box<dyn Model>, LoadError> {
    ctx.log("stream: setup");
    Ok(Box::new(Stream))
}

/// Sleeps in small steps so a cancellation is noticed promptly.
pub(crate) fn cancellable_sleep(ctx: &PredictContext, seconds: f64) -> Result<(), PredictError> {
    let until = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    loop {
        ctx.check_canceled()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5).min(left));
    }
}

impl Model for Stream {
    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError> {
        let prompt = input.get("prompt").and_then(Value::as_str).unwrap_or("");
        let delay = input.get("delay").and_then(Value::as_f64).unwrap_or(0.0);
        let fail_at = input.get("fail_at").and_then(Value::as_i64).unwrap_or(-1);
        let words: Vec<&str> = prompt.split_whitespace().collect();
        ctx.record_metric("token_count", json!(words.len()), MetricMode::Replace);
        for (i, word) in words.iter().enumerate() {
            ctx.check_canceled()?;
            if i as i64 == fail_at {
                return Err(PredictError::Failed(format!(
                    "stream: failing at token {i}"
                )));
            }
            ctx.log(&format!("stream: token {i}"));
            ctx.emit_output(Value::String(format!("{word} ")));
            if delay > 0.0 {
                cancellable_sleep(ctx, delay)?;
            }
        }
        // An iterator's output is the items it emitted.
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_words_records_metric_and_fails_where_asked() {
        let ctx = PredictContext::new();
        let mut input = Map::new();
        input.insert("prompt".into(), json!("one two  three"));
        Stream.predict(&input, &ctx).unwrap();
        let r = ctx.recorded();
        assert_eq!(
            r.outputs,
            vec![json!("one "), json!("two "), json!("three ")]
        );
        assert_eq!(r.metrics["token_count"], json!(3));
        assert_eq!(
            r.logs,
            "stream: token 0\nstream: token 1\nstream: token 2\n"
        );

        let ctx = PredictContext::new();
        input.insert("fail_at".into(), json!(1));
        let err = Stream.predict(&input, &ctx).unwrap_err();
        assert_eq!(
            err,
            PredictError::Failed("stream: failing at token 1".into())
        );
        assert_eq!(ctx.recorded().outputs, vec![json!("one ")]);
    }

    #[test]
    fn signature_is_what_cogs_generator_wrote() {
        crate::tests::assert_cog_schema("stream", &signature());
    }
}
