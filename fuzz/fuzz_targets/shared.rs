// What the fuzz targets check, shared with the corpus replay test in runner-spec
// (crates/runner-spec/tests/fuzz_corpus.rs): both `include!` this file.

/// Every Cog input kind and constraint in one signature.
pub fn every_input_kind() -> runner_spec::Signature {
    use runner_spec::{FieldType, InputField, OutputType, Primitive, Signature};
    use serde_json::{json, Value};
    let inputs = vec![
        InputField::prim("text", Primitive::Str)
            .min_length(1)
            .max_length(200),
        InputField::prim("count", Primitive::Int)
            .default(json!(3))
            .ge(1.0)
            .le(10.0),
        InputField::prim("ratio", Primitive::Float)
            .default(json!(0.5))
            .ge(0.0)
            .le(1.0),
        InputField::prim("flag", Primitive::Bool).default(json!(false)),
        InputField::prim("color", Primitive::Str)
            .default(json!("red"))
            .choices(vec![json!("red"), json!("green"), json!("blue")]),
        InputField::prim("size", Primitive::Int)
            .default(json!(1))
            .choices(vec![json!(1), json!(2), json!(3)]),
        InputField::prim("code", Primitive::Str)
            .default(json!("ab12"))
            .regex("^[a-z]+[0-9]+$"),
        InputField::prim("api_key", Primitive::Secret).default(Value::Null),
        InputField::prim("note", Primitive::Str).optional(),
        InputField::list("tags", Primitive::Str).default(json!(["a", "b"])),
        InputField::prim("source", Primitive::Path).optional(),
        InputField::list("files", Primitive::Path).optional(),
        InputField::new(
            "either",
            FieldType::Union(vec![
                FieldType::Prim(Primitive::Str),
                FieldType::List(Primitive::Str),
            ]),
        )
        .optional(),
        InputField::prim("anything", Primitive::Any).optional(),
    ];
    Signature {
        inputs,
        output: OutputType::Prim(Primitive::Str),
        streaming: false,
    }
}

/// cog.yaml text: a config or an error whose message renders; never a panic.
pub fn check_cog_yaml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = runner_spec::CogConfig::parse(std::path::Path::new("cog.yaml"), text) {
            let _ = e.to_string();
        }
    }
}

/// A prediction body: a completed input or 422 issues (never an empty list); never a panic.
pub fn check_input(validator: &runner_spec::InputValidator, data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let input = body.get("input").cloned().unwrap_or(body);
    match validator.prepare(&input) {
        Ok(prepared) => {
            let _ = serde_json::to_string(&prepared.0);
        }
        Err(issues) => {
            assert!(!issues.is_empty(), "a rejection names at least one issue");
            for issue in issues {
                let _ = issue.to_json();
            }
        }
    }
}
