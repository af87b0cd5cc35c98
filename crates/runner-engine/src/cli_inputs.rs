//! `runner run -i name=value` (and `runner predict`) arguments turned into typed JSON
//! inputs, following the model's signature. Here rather than in the CLI so that the fuzz
//! target `cli_inputs` exercises exactly this code.

use std::path::Path;

use base64::Engine as _;
use runner_spec::{FieldType, Primitive, Signature};
use serde_json::{Map, Value};

/// A `-i` argument that does not fit the model's inputs; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliInputError(pub String);

macro_rules! fail {
    ($($arg:tt)*) => { return Err(CliInputError(format!($($arg)*))) };
}

/// Turns `-i name=value` arguments into typed JSON inputs, using the signature.
pub fn parse_inputs(
    signature: &Signature,
    args: &[String],
    input: &mut Map<String, Value>,
) -> Result<(), CliInputError> {
    let mut repeated: Map<String, Value> = Map::new();
    for arg in args {
        let Some((name, raw)) = arg.split_once('=') else {
            fail!("-i {arg}: expected NAME=VALUE (e.g. -i text=hello)");
        };
        let Some(field) = signature.inputs.iter().find(|f| f.name == name) else {
            let names: Vec<&str> = signature.inputs.iter().map(|f| f.name.as_str()).collect();
            fail!(
                "-i {name}: the model has no input named {name:?}; its inputs are: {}",
                names.join(", ")
            );
        };
        let element = match &field.ty {
            FieldType::Prim(p) | FieldType::List(p) => *p,
            FieldType::Union(_) => Primitive::Str,
        };
        let value = typed_value(name, raw, element)?;
        let is_list = matches!(field.ty, FieldType::List(_) | FieldType::Union(_));
        match repeated.get_mut(name) {
            Some(Value::Array(items)) if is_list => items.push(value),
            Some(_) => fail!("-i {name} given twice, but {name} takes one value"),
            None if is_list && matches!(field.ty, FieldType::List(_)) => {
                // A JSON list given at once is the whole list.
                match value {
                    Value::String(ref s) if s.trim_start().starts_with('[') => {
                        repeated.insert(
                            name.into(),
                            serde_json::from_str(s).map_err(|e| {
                                CliInputError(format!("-i {name}: not a JSON list ({e})"))
                            })?,
                        );
                    }
                    v => {
                        repeated.insert(name.into(), Value::Array(vec![v]));
                    }
                }
            }
            None if is_list => {
                repeated.insert(name.into(), Value::Array(vec![value]));
            }
            None => {
                repeated.insert(name.into(), value);
            }
        }
    }
    for (name, value) in repeated {
        // A union of str and list: one -i is a string, several a list.
        let field = signature
            .inputs
            .iter()
            .find(|f| f.name == name)
            .expect("checked above");
        let value = match (&field.ty, value) {
            (FieldType::Union(_), Value::Array(mut items)) if items.len() == 1 => items.remove(0),
            (_, v) => v,
        };
        input.insert(name, value);
    }
    Ok(())
}

fn typed_value(name: &str, raw: &str, p: Primitive) -> Result<Value, CliInputError> {
    if let Some(path) = raw.strip_prefix('@') {
        let bytes = std::fs::read(path)
            .map_err(|e| CliInputError(format!("-i {name}=@{path}: cannot read the file ({e})")))?;
        return Ok(match p {
            Primitive::Path | Primitive::File => {
                let mime = crate::files::mime_for_path(Path::new(path));
                Value::String(format!(
                    "data:{mime};base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                ))
            }
            _ => {
                Value::String(String::from_utf8(bytes).map_err(|e| {
                    CliInputError(format!("-i {name}=@{path}: not UTF-8 text ({e})"))
                })?)
            }
        });
    }
    Ok(match p {
        Primitive::Int => Value::from(
            raw.trim()
                .parse::<i64>()
                .map_err(|e| CliInputError(format!("-i {name}={raw}: not an integer ({e})")))?,
        ),
        Primitive::Float => serde_json::Number::from_f64(
            raw.trim()
                .parse::<f64>()
                .map_err(|e| CliInputError(format!("-i {name}={raw}: not a number ({e})")))?,
        )
        .map(Value::Number)
        .ok_or_else(|| CliInputError(format!("-i {name}={raw}: not a finite number")))?,
        Primitive::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            _ => fail!("-i {name}={raw}: not a boolean (true or false)"),
        },
        Primitive::Any => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into())),
        Primitive::Str | Primitive::Secret | Primitive::Path | Primitive::File => {
            Value::String(raw.into())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_inputs_follow_the_signature() {
        let sig = runner_models::conformance::signature();
        let mut m = Map::new();
        parse_inputs(
            &sig,
            &[
                "text=hi".into(),
                "count=2".into(),
                "ratio=0.25".into(),
                "flag=true".into(),
                "tags=x".into(),
                "tags=y".into(),
            ],
            &mut m,
        )
        .unwrap();
        assert_eq!(
            Value::Object(m),
            serde_json::json!({"text": "hi", "count": 2, "ratio": 0.25, "flag": true, "tags": ["x", "y"]})
        );
        let mut m = Map::new();
        assert!(parse_inputs(&sig, &["count=two".into()], &mut m)
            .unwrap_err()
            .to_string()
            .contains("not an integer"));
        assert!(parse_inputs(&sig, &["nope=1".into()], &mut m)
            .unwrap_err()
            .to_string()
            .contains("no input named"));
        let bert = runner_models::bert::signature();
        let mut m = Map::new();
        parse_inputs(&bert, &["text=a".into()], &mut m).unwrap();
        assert_eq!(m["text"], "a");
        let mut m = Map::new();
        parse_inputs(&bert, &["text=a".into(), "text=b".into()], &mut m).unwrap();
        assert_eq!(m["text"], serde_json::json!(["a", "b"]));
    }
}
