//! A Cog predictor (`predict.py`) whose signature is the model's and whose body forwards to
//! runner: the "standard Cog project" form of a Replicate package.

use std::collections::BTreeSet;

use runner_spec::{FieldType, InputField, OutputType, Primitive, Signature};
use serde_json::Value;

use crate::{fill, PackageError};

const TEMPLATE: &str = include_str!("../templates/predict.py.tmpl");

/// Python's reserved words: an input named like one cannot be a parameter.
const PYTHON_KEYWORDS: &[&str] = &[
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue",
    "def", "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import",
    "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while",
    "with", "yield",
];

#[derive(Default)]
struct Imports {
    typing: BTreeSet<&'static str>,
    cog: BTreeSet<&'static str>,
}

pub fn predict_py(
    name: &str,
    signature: &Signature,
    startup_timeout: u64,
) -> Result<String, PackageError> {
    let mut imports = Imports::default();
    imports.cog.extend(["BasePredictor", "Input", "Path"]);

    let mut params = String::new();
    let mut forwards = String::new();
    for field in &signature.inputs {
        if PYTHON_KEYWORDS.contains(&field.name.as_str()) {
            return Err(unsupported(format!(
                "input `{}` is a Python keyword, so a Cog predictor cannot take it",
                field.name
            )));
        }
        let mut ty = field_type(&field.ty, &mut imports);
        if field.optional {
            imports.typing.insert("Optional");
            ty = format!("Optional[{ty}]");
        }
        params.push_str(&format!(
            "        {}: {ty} = Input({}),\n",
            field.name,
            input_arguments(field)
        ));
        forwards.push_str(&format!(
            "            {}: _encode({}, {}),\n",
            py_string(&field.name),
            field.name,
            input_kind(&field.ty)?
        ));
    }

    let mut output_class = String::new();
    let (return_type, body) = match &signature.output {
        OutputType::Iterator(item) | OutputType::ConcatenateIterator(item) => {
            let item_type = output_type(item, &mut imports, &mut output_class)?;
            let return_type = if matches!(signature.output, OutputType::Iterator(_)) {
                imports.typing.insert("Iterator");
                format!("Iterator[{item_type}]")
            } else {
                imports.cog.insert("ConcatenateIterator");
                format!("ConcatenateIterator[{item_type}]")
            };
            let kind = output_kind(item)?;
            // runner streams only what the model declares streaming (@cog.streaming);
            // other iterators arrive whole and are yielded item by item.
            let source = if signature.streaming {
                "self.runner.stream(inputs)"
            } else {
                "self.runner.predict(inputs)"
            };
            let body =
                format!("        for item in {source}:\n            yield _decode(item, {kind})\n");
            (return_type, body)
        }
        other => {
            let ty = output_type(other, &mut imports, &mut output_class)?;
            let kind = output_kind(other)?;
            (
                ty,
                format!("        return _decode(self.runner.predict(inputs), {kind})\n"),
            )
        }
    };

    let decorator = if signature.streaming {
        imports.cog.insert("streaming");
        "    @streaming\n"
    } else {
        ""
    };
    let predict_method = format!(
        "{decorator}    def predict(\n        self,\n{params}    ) -> {return_type}:\n        inputs = {{\n{forwards}        }}\n        inputs = {{k: v for k, v in inputs.items() if v is not None}}\n{body}"
    );
    let typing_import = if imports.typing.is_empty() {
        String::new()
    } else {
        format!(
            "from typing import {}\n",
            imports
                .typing
                .iter()
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Ok(fill(
        TEMPLATE,
        &[
            ("name", name),
            ("typing_import", typing_import.trim_end()),
            (
                "cog_imports",
                &imports.cog.iter().copied().collect::<Vec<_>>().join(", "),
            ),
            ("startup_timeout", &startup_timeout.to_string()),
            ("output_class", &output_class),
            ("predict_method", predict_method.trim_end()),
        ],
    ))
}

fn unsupported(what: String) -> PackageError {
    PackageError::Unsupported(format!(
        "{what}; package it with `--replicate-mode image` (runner serves it directly) instead"
    ))
}

fn primitive(p: Primitive, imports: &mut Imports) -> &'static str {
    match p {
        Primitive::Bool => "bool",
        Primitive::Float => "float",
        Primitive::Int => "int",
        Primitive::Str => "str",
        Primitive::Path => "Path",
        Primitive::File => {
            imports.cog.insert("File");
            "File"
        }
        Primitive::Secret => {
            imports.cog.insert("Secret");
            "Secret"
        }
        Primitive::Any => {
            imports.typing.insert("Any");
            "Any"
        }
    }
}

fn field_type(ty: &FieldType, imports: &mut Imports) -> String {
    match ty {
        FieldType::Prim(p) => primitive(*p, imports).to_string(),
        FieldType::List(p) => {
            imports.typing.insert("List");
            format!("List[{}]", primitive(*p, imports))
        }
        FieldType::Union(variants) => {
            imports.typing.insert("Union");
            let parts: Vec<String> = variants.iter().map(|v| field_type(v, imports)).collect();
            format!("Union[{}]", parts.join(", "))
        }
    }
}

/// How `_encode` treats an input: files become data URIs, secrets their value.
fn primitive_kind(p: Primitive) -> &'static str {
    match p {
        Primitive::Path | Primitive::File => "\"file\"",
        Primitive::Secret => "\"secret\"",
        _ => "\"value\"",
    }
}

fn input_kind(ty: &FieldType) -> Result<String, PackageError> {
    Ok(match ty {
        FieldType::Prim(p) => primitive_kind(*p).to_string(),
        FieldType::List(p) => format!("(\"list\", {})", primitive_kind(*p)),
        FieldType::Union(variants) => {
            let kinds: BTreeSet<String> =
                variants.iter().map(input_kind).collect::<Result<_, _>>()?;
            if kinds
                .iter()
                .any(|k| k.contains("file") || k.contains("secret"))
            {
                return Err(unsupported(
                    "a union input holding files or secrets cannot be forwarded unambiguously"
                        .into(),
                ));
            }
            "\"value\"".to_string()
        }
    })
}

fn output_type(
    ty: &OutputType,
    imports: &mut Imports,
    output_class: &mut String,
) -> Result<String, PackageError> {
    Ok(match ty {
        OutputType::Prim(p) => primitive(*p, imports).to_string(),
        OutputType::List(inner) => {
            imports.typing.insert("List");
            format!("List[{}]", output_type(inner, imports, output_class)?)
        }
        OutputType::Object(fields) => {
            if !output_class.is_empty() {
                return Err(unsupported("nested output objects".into()));
            }
            imports.cog.insert("BaseModel");
            let mut class = String::from("\nclass Output(BaseModel):\n");
            for (name, field_ty, required) in fields {
                let mut t = output_type(field_ty, imports, &mut String::from("nested"))?;
                if !required {
                    imports.typing.insert("Optional");
                    t = format!("Optional[{t}] = None");
                }
                class.push_str(&format!("    {name}: {t}\n"));
            }
            class.push('\n');
            *output_class = class;
            "Output".to_string()
        }
        OutputType::Iterator(_) | OutputType::ConcatenateIterator(_) => {
            return Err(unsupported("an iterator inside an output".into()))
        }
    })
}

fn output_kind(ty: &OutputType) -> Result<String, PackageError> {
    Ok(match ty {
        OutputType::Prim(p) => match p {
            Primitive::Path | Primitive::File => "\"file\"".into(),
            _ => "\"value\"".into(),
        },
        OutputType::List(inner) => format!("(\"list\", {})", output_kind(inner)?),
        OutputType::Object(fields) => {
            let mut kinds = Vec::new();
            for (name, t, _) in fields {
                kinds.push(format!("{}: {}", py_string(name), output_kind(t)?));
            }
            format!("(\"object\", Output, {{{}}})", kinds.join(", "))
        }
        OutputType::Iterator(_) | OutputType::ConcatenateIterator(_) => {
            return Err(unsupported("an iterator inside an output".into()))
        }
    })
}

fn input_arguments(field: &InputField) -> String {
    let mut args = Vec::new();
    if let Some(d) = &field.description {
        args.push(format!("description={}", py_string(d)));
    }
    if let Some(v) = &field.default {
        args.push(format!("default={}", py_value(v)));
    }
    // Bounds in the field's own type, as a predictor author writes them (ge=0.0 on floats).
    let is_float = matches!(field.ty, FieldType::Prim(Primitive::Float));
    if let Some(v) = field.ge {
        args.push(format!("ge={}", py_number(v, is_float)));
    }
    if let Some(v) = field.le {
        args.push(format!("le={}", py_number(v, is_float)));
    }
    if let Some(v) = field.min_length {
        args.push(format!("min_length={v}"));
    }
    if let Some(v) = field.max_length {
        args.push(format!("max_length={v}"));
    }
    if let Some(r) = &field.regex {
        args.push(format!("regex={}", py_string(r)));
    }
    if !field.choices.is_empty() {
        let items: Vec<String> = field.choices.iter().map(py_value).collect();
        args.push(format!("choices=[{}]", items.join(", ")));
    }
    if field.deprecated {
        args.push("deprecated=True".into());
    }
    args.join(", ")
}

/// A Python string literal. JSON's escapes are a subset of Python's.
fn py_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

fn py_number(x: f64, float: bool) -> String {
    if !float && x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:?}")
    }
}

fn py_value(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_string(s),
        Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(py_value).collect::<Vec<_>>().join(", ")
            )
        }
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", py_string(k), py_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_keep_their_types_defaults_and_constraints() {
        let signature = Signature {
            inputs: vec![
                InputField::prim("text", Primitive::Str)
                    .description("Say \"hi\"\n")
                    .min_length(1),
                InputField::prim("count", Primitive::Int)
                    .default(json!(3))
                    .ge(1.0)
                    .le(10.0),
                InputField::prim("color", Primitive::Str)
                    .default(json!("red"))
                    .choices(vec![json!("red"), json!("blue")]),
                InputField::prim("note", Primitive::Str).optional(),
                InputField::prim("key", Primitive::Secret).default(Value::Null),
                InputField::list("images", Primitive::Path),
            ],
            output: OutputType::List(Box::new(OutputType::Prim(Primitive::Path))),
            streaming: false,
        };
        let py = predict_py("demo", &signature, 600).unwrap();
        assert!(
            py.contains(r#"text: str = Input(description="Say \"hi\"\n", min_length=1),"#),
            "{py}"
        );
        assert!(
            py.contains("count: int = Input(default=3, ge=1, le=10),"),
            "{py}"
        );
        assert!(py.contains(r#"color: str = Input(default="red", choices=["red", "blue"]),"#));
        assert!(py.contains("note: Optional[str] = Input(),"));
        assert!(py.contains("key: Secret = Input(default=None),"));
        assert!(py.contains(r#""images": _encode(images, ("list", "file")),"#));
        assert!(py.contains("from typing import List, Optional\n"));
        assert!(py.contains("from cog import BasePredictor, Input, Path, Secret\n"));
        assert!(py.contains(") -> List[Path]:"));
        assert!(!py.contains("{{"), "a placeholder was left: {py}");
    }

    #[test]
    fn streaming_models_stream_and_objects_get_an_output_class() {
        let streaming = Signature {
            inputs: vec![InputField::prim("prompt", Primitive::Str)],
            output: OutputType::ConcatenateIterator(Box::new(OutputType::Prim(Primitive::Str))),
            streaming: true,
        };
        let py = predict_py("s", &streaming, 600).unwrap();
        assert!(py.contains("    @streaming\n    def predict("));
        assert!(py.contains(") -> ConcatenateIterator[str]:"));
        assert!(py.contains("for item in self.runner.stream(inputs):"));

        let object = Signature {
            inputs: vec![],
            output: OutputType::Object(vec![
                ("text".into(), OutputType::Prim(Primitive::Str), true),
                ("score".into(), OutputType::Prim(Primitive::Float), false),
            ]),
            streaming: false,
        };
        let py = predict_py("o", &object, 600).unwrap();
        assert!(py.contains(
            "class Output(BaseModel):\n    text: str\n    score: Optional[float] = None\n"
        ));
        assert!(py.contains(r#"("object", Output, {"text": "value", "score": "value"})"#));
    }

    #[test]
    fn what_cannot_be_forwarded_is_refused_with_the_way_out() {
        let keyword = Signature {
            inputs: vec![InputField::prim("class", Primitive::Str)],
            output: OutputType::Prim(Primitive::Str),
            streaming: false,
        };
        let err = predict_py("k", &keyword, 600).unwrap_err().to_string();
        assert!(
            err.contains("`class` is a Python keyword") && err.contains("--replicate-mode image")
        );
    }
}
