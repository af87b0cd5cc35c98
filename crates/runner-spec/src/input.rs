//! Prediction input validation against the `Input` schema, with JSON Schema semantics
//! (the `jsonschema` crate, as Cog's own server uses), then Cog's coercions: unknown keys
//! dropped, defaults filled in, `null` for optional inputs without a default.
//!
//! Compiled once per model; validating a request does not recompile anything.

use serde_json::{json, Map, Value};

use crate::signature::{FieldType, Primitive, Signature};

/// One problem with a request's input, in the shape of Cog's 422 `detail` entries.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationIssue {
    /// `["body", "input", NAME, ...]`.
    pub loc: Vec<Value>,
    pub msg: String,
    pub kind: String,
}

impl ValidationIssue {
    pub fn to_json(&self) -> Value {
        json!({"loc": self.loc, "msg": self.msg, "type": self.kind})
    }
}

/// A validated input, completed for the model, and the unknown keys that were dropped.
pub type PreparedInput = (Map<String, Value>, Vec<String>);

/// A compiled validator for one signature.
pub struct InputValidator {
    validator: jsonschema::Validator,
    signature: Signature,
}

impl std::fmt::Debug for InputValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputValidator").finish_non_exhaustive()
    }
}

impl InputValidator {
    /// Compiles the validator from the signature's OpenAPI `Input` schema.
    pub fn new(signature: &Signature) -> Result<Self, String> {
        let doc = crate::openapi::document(signature);
        let schemas = &doc["components"]["schemas"];
        let mut input = schemas["Input"].clone();
        inline_refs(&mut input, schemas);
        // Unknown keys are stripped before validation, as Cog does.
        input
            .as_object_mut()
            .expect("Input is an object")
            .remove("additionalProperties");
        if let Some(props) = input.get_mut("properties").and_then(Value::as_object_mut) {
            for prop in props.values_mut() {
                apply_nullable(prop);
            }
        }
        let validator = jsonschema::validator_for(&input)
            .map_err(|e| format!("the model's Input schema does not compile: {e}"))?;
        Ok(InputValidator {
            validator,
            signature: signature.clone(),
        })
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Validates `input` and returns the complete input the model will see: known keys
    /// only, defaults filled in, integral floats for `int` inputs turned into integers.
    /// Also returns the names of dropped unknown keys, for the logs.
    pub fn prepare(&self, input: &Value) -> Result<PreparedInput, Vec<ValidationIssue>> {
        let Some(object) = input.as_object() else {
            return Err(vec![ValidationIssue {
                loc: vec![json!("body"), json!("input")],
                msg: format!(
                    "Input should be an object of named inputs, got {}",
                    kind_of(input)
                ),
                kind: "type_error.dict".into(),
            }]);
        };
        let mut known = Map::new();
        let mut dropped = Vec::new();
        for (k, v) in object {
            if self.signature.inputs.iter().any(|f| &f.name == k) {
                known.insert(k.clone(), v.clone());
            } else {
                dropped.push(k.clone());
            }
        }
        let known = Value::Object(known);
        let mut issues = Vec::new();
        for error in self.validator.iter_errors(&known) {
            if let jsonschema::error::ValidationErrorKind::Required { property } = error.kind() {
                let name = property.as_str().unwrap_or_default().to_string();
                issues.push(ValidationIssue {
                    loc: vec![json!("body"), json!("input"), json!(name)],
                    msg: "Field required".into(),
                    kind: "value_error.missing".into(),
                });
                continue;
            }
            let mut loc = vec![json!("body"), json!("input")];
            for segment in error.instance_path().to_string().split('/').skip(1) {
                let segment = segment.replace("~1", "/").replace("~0", "~");
                loc.push(match segment.parse::<u64>() {
                    Ok(i) if loc.len() > 2 => json!(i),
                    _ => json!(segment),
                });
            }
            issues.push(ValidationIssue {
                loc,
                msg: shorten_echo(error.to_string(), error.instance()),
                kind: "value_error".into(),
            });
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        let Value::Object(mut known) = known else {
            unreachable!()
        };
        for field in &self.signature.inputs {
            match known.get_mut(&field.name) {
                Some(v) => coerce_integers(&field.ty, v),
                None => {
                    if let Some(d) = field.effective_default() {
                        known.insert(field.name.clone(), d.clone());
                    } else if field.is_nullable() {
                        known.insert(field.name.clone(), Value::Null);
                    }
                }
            }
        }
        // Keep the signature's order, so models and logs see inputs as declared.
        let mut ordered = Map::new();
        for field in &self.signature.inputs {
            if let Some(v) = known.remove(&field.name) {
                ordered.insert(field.name.clone(), v);
            }
        }
        Ok((ordered, dropped))
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn coerce_integers(ty: &FieldType, v: &mut Value) {
    let to_int = |v: &mut Value| {
        if let Some(f) = v.as_f64().filter(|f| f.fract() == 0.0 && v.is_f64()) {
            *v = json!(f as i64);
        }
    };
    match ty {
        FieldType::Prim(Primitive::Int) => to_int(v),
        FieldType::List(Primitive::Int) => {
            if let Some(items) = v.as_array_mut() {
                items.iter_mut().for_each(to_int);
            }
        }
        _ => {}
    }
}

/// OpenAPI 3.0's `nullable: true` is not JSON Schema: allow `null` explicitly.
fn apply_nullable(prop: &mut Value) {
    let Some(obj) = prop.as_object_mut() else {
        return;
    };
    if obj.remove("nullable") != Some(Value::Bool(true)) {
        return;
    }
    let inner = Value::Object(std::mem::take(obj));
    obj.insert("anyOf".into(), json!([{"type": "null"}, inner]));
}

fn inline_refs(v: &mut Value, schemas: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                if let Some(target) = r
                    .strip_prefix("#/components/schemas/")
                    .and_then(|n| schemas.get(n))
                {
                    *v = target.clone();
                    inline_refs(v, schemas);
                    return;
                }
            }
            m.values_mut().for_each(|c| inline_refs(c, schemas));
        }
        Value::Array(a) => a.iter_mut().for_each(|c| inline_refs(c, schemas)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::{InputField, OutputType};

    fn validator() -> InputValidator {
        InputValidator::new(&Signature {
            inputs: vec![
                InputField::prim("text", Primitive::Str).min_length(1),
                InputField::prim("n", Primitive::Int)
                    .default(json!(2))
                    .ge(1.0)
                    .le(5.0),
                InputField::prim("mode", Primitive::Str)
                    .default(json!("a"))
                    .choices(vec![json!("a"), json!("b")]),
                InputField::prim("maybe", Primitive::Str).optional(),
                InputField::list("tags", Primitive::Int).default(json!([1])),
            ],
            output: OutputType::Prim(Primitive::Str),
            streaming: false,
        })
        .unwrap()
    }

    #[test]
    fn fills_defaults_and_drops_unknown() {
        let (input, dropped) = validator()
            .prepare(&json!({"text": "hi", "extra": 1, "n": 3.0}))
            .unwrap();
        assert_eq!(
            Value::Object(input),
            json!({"text": "hi", "n": 3, "mode": "a", "maybe": null, "tags": [1]})
        );
        assert_eq!(dropped, vec!["extra".to_string()]);
    }

    #[test]
    fn reports_each_problem_at_its_location() {
        let errs = validator()
            .prepare(&json!({"n": 9, "mode": "c", "tags": [1, "x"]}))
            .unwrap_err();
        let locs: Vec<Value> = errs.iter().map(|e| json!(e.loc)).collect();
        assert!(locs.contains(&json!(["body", "input", "text"])), "{errs:?}");
        assert!(locs.contains(&json!(["body", "input", "n"])), "{errs:?}");
        assert!(locs.contains(&json!(["body", "input", "mode"])), "{errs:?}");
        assert!(
            locs.contains(&json!(["body", "input", "tags", 1])),
            "{errs:?}"
        );
        let missing = errs.iter().find(|e| e.loc[2] == "text").unwrap();
        assert_eq!(
            (missing.msg.as_str(), missing.kind.as_str()),
            ("Field required", "value_error.missing")
        );
    }

    #[test]
    fn nullable_accepts_null_and_non_object_is_rejected() {
        assert!(validator()
            .prepare(&json!({"text": "x", "maybe": null}))
            .is_ok());
        assert!(validator()
            .prepare(&json!({"text": "x", "n": null}))
            .is_err());
        let errs = validator().prepare(&json!([1])).unwrap_err();
        assert_eq!(errs[0].loc, vec![json!("body"), json!("input")]);
    }
}

/// jsonschema's messages quote the offending value whole, so a 20 MB string came back in
/// its 422 (found by the oversized-body test). A long value is shown as a preview and its
/// size instead.
fn shorten_echo(msg: String, instance: &Value) -> String {
    const PREVIEW: usize = 120;
    let whole = instance.to_string();
    if whole.len() <= PREVIEW || !msg.contains(&whole) {
        return msg;
    }
    let mut cut = PREVIEW;
    while !whole.is_char_boundary(cut) {
        cut -= 1;
    }
    msg.replacen(
        &whole,
        &format!("{}… ({} bytes)", &whole[..cut], whole.len()),
        1,
    )
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn long_values_are_not_echoed_whole() {
        let value = json!("a".repeat(10_000));
        let msg = format!("{value} is longer than 200 characters");
        let short = shorten_echo(msg, &value);
        assert!(short.len() < 200, "{short}");
        assert!(
            short.ends_with("(10002 bytes) is longer than 200 characters"),
            "{short}"
        );
        let small = json!("abc");
        assert_eq!(
            shorten_echo(format!("{small} is too short"), &small),
            "\"abc\" is too short"
        );
    }
}
