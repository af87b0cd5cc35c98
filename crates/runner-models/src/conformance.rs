//! `candle:conformance`: an architecture without weights whose signature uses every Cog
//! input kind and constraint, for API and schema tests. It echoes what it received as an
//! object; `sleep` keeps it busy (cancellable) and `fail` makes the prediction fail.
//! Its Python twin for Cog's server is `cog-spec/predictors/conformance/predict.py`.
//!
//! Two environment variables shape its setup, for health tests: `CONFORMANCE_SETUP_DELAY`
//! (seconds) slows it down, `CONFORMANCE_SETUP_FAIL` (any value) makes it fail.

use std::time::Duration;

use runner_spec::{InputField, ModelDir, OutputType, Primitive, Signature};
use serde_json::{json, Map, Value};

use crate::{Architecture, LoadContext, LoadError, Model, PredictContext, PredictError};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "conformance",
    summary: "no weights; every Cog input kind, echoed back as an object (API tests)",
    signature,
    load,
    dtype_policy: "none",
    example_input: |_| serde_json::json!({"text": "hello"}),
    batching: false,
    needs_weights: false,
    openai: crate::OpenAi::None,
};

pub fn signature() -> Signature {
    use Primitive::*;
    Signature {
        inputs: vec![
            InputField::prim("text", Str)
                .min_length(1)
                .max_length(200)
                .description("Any text, 1 to 200 characters"),
            InputField::prim("count", Int)
                .default(json!(3))
                .ge(1.0)
                .le(10.0)
                .description("How many times to repeat the text"),
            InputField::prim("ratio", Float)
                .default(json!(0.5))
                .ge(0.0)
                .le(1.0)
                .description("A number from 0 to 1"),
            InputField::prim("flag", Bool)
                .default(json!(false))
                .description("A boolean"),
            InputField::prim("color", Str)
                .default(json!("red"))
                .choices(vec![json!("red"), json!("green"), json!("blue")])
                .description("A string choice"),
            InputField::prim("size", Int)
                .default(json!(1))
                .choices(vec![json!(1), json!(2), json!(3)])
                .description("An integer choice"),
            InputField::prim("code", Str)
                .default(json!("ab12"))
                .regex("^[a-z]+[0-9]+$")
                .description("Letters then digits"),
            InputField::prim("api_key", Secret)
                .default(Value::Null)
                .description("A secret; only its length is echoed"),
            InputField::prim("note", Str)
                .optional()
                .description("Optional, without a default"),
            InputField::list("tags", Str)
                .default(json!(["a", "b"]))
                .description("A list with a default"),
            InputField::prim("legacy", Bool)
                .default(json!(false))
                .deprecated()
                .description("Deprecated; ignored"),
            InputField::prim("sleep", Float)
                .default(json!(0.0))
                .ge(0.0)
                .le(600.0)
                .description("Seconds to stay busy before answering"),
            InputField::prim("fail", Bool)
                .default(json!(false))
                .description("Fail the prediction on purpose"),
        ],
        output: OutputType::Object(vec![
            ("text".into(), OutputType::Prim(Str), true),
            ("count".into(), OutputType::Prim(Int), true),
            ("ratio".into(), OutputType::Prim(Float), true),
            ("flag".into(), OutputType::Prim(Bool), true),
            ("color".into(), OutputType::Prim(Str), true),
            ("size".into(), OutputType::Prim(Int), true),
            ("code".into(), OutputType::Prim(Str), true),
            ("api_key_length".into(), OutputType::Prim(Int), true),
            ("note_given".into(), OutputType::Prim(Bool), true),
            (
                "tags".into(),
                OutputType::List(Box::new(OutputType::Prim(Str))),
                true,
            ),
        ]),
        streaming: false,
    }
}

struct Conformance;

fn load(
    _: &ModelDir,
    _: &candle_core::Device,
    ctx: &LoadContext,
) -> Result<Box<dyn Model>, LoadError> {
    let delay: f64 = std::env::var("CONFORMANCE_SETUP_DELAY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if delay > 0.0 {
        ctx.log(&format!("conformance: setup takes {delay} s"));
        std::thread::sleep(Duration::from_secs_f64(delay));
    }
    if std::env::var_os("CONFORMANCE_SETUP_FAIL").is_some() {
        ctx.log("conformance: failing setup as asked");
        return Err(LoadError::Other(
            "setup failed on purpose: CONFORMANCE_SETUP_FAIL is set".into(),
        ));
    }
    ctx.log("conformance: nothing to load");
    Ok(Box::new(Conformance))
}

impl Model for Conformance {
    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError> {
        let get = |k: &str| input.get(k).cloned().unwrap_or(Value::Null);
        let text = get("text").as_str().unwrap_or_default().to_string();
        let count = get("count").as_i64().unwrap_or(1);
        ctx.log(&format!(
            "conformance: text of {} characters, count {count}",
            text.chars().count()
        ));
        let sleep = get("sleep").as_f64().unwrap_or(0.0);
        if sleep > 0.0 {
            ctx.log(&format!("conformance: sleeping {sleep} s"));
            crate::stream::cancellable_sleep(ctx, sleep)?;
        }
        if get("fail").as_bool() == Some(true) {
            ctx.log("conformance: failing as asked");
            return Err(PredictError::Failed(
                "failed on purpose: the `fail` input was true".into(),
            ));
        }
        Ok(json!({
            "text": text.repeat(count.max(0) as usize),
            "count": count,
            "ratio": get("ratio"),
            "flag": get("flag"),
            "color": get("color"),
            "size": get("size"),
            "code": get("code"),
            "api_key_length": get("api_key").as_str().map_or(0, |s| s.chars().count()),
            "note_given": !get("note").is_null(),
            "tags": get("tags"),
        }))
    }
}
