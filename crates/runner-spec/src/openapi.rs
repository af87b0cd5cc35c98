//! The OpenAPI 3.0.2 document, exactly as Cog 0.23.1's generator writes it
//! (`pkg/schema/openapi_spec.go`) for the same signature, byte for byte.
//!
//! Cog builds the document from Go maps, which marshal with sorted keys, except for three
//! insertion-ordered maps: input properties (in `x-order`), `components.schemas` and
//! `paths`. The written file is indented by two spaces and keeps `<`, `>` and `&` as they
//! are (checked against the schemas Cog 0.23.1 wrote, in cog-spec/).

use serde_json::{json, Map, Value};

use crate::signature::{FieldType, InputField, OutputType, Primitive, Signature};
use crate::COG_VERSION;

/// Which of Cog's two servers a document describes: predictions, or trainings (what Cog
/// serves with `--x-mode train`, and runner with `--mode train`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Predict,
    Train,
}

/// The names Cog's generator gives each mode's schemas, routes and operations.
struct ModeNames {
    input: &'static str,
    output: &'static str,
    request: &'static str,
    response: &'static str,
    endpoint: &'static str,
    cancel: &'static str,
    summary: &'static str,
    description: &'static str,
    operation: &'static str,
    cancel_operation: &'static str,
    id_param: &'static str,
}

impl Mode {
    fn names(self) -> ModeNames {
        match self {
            Mode::Predict => ModeNames {
                input: "Input",
                output: "Output",
                request: "PredictionRequest",
                response: "PredictionResponse",
                endpoint: "/predictions",
                cancel: "/predictions/{prediction_id}/cancel",
                summary: "Predict",
                description: "Run a single prediction on the model",
                operation: "predict_predictions_post",
                cancel_operation: "cancel_predictions__prediction_id__cancel_post",
                id_param: "prediction_id",
            },
            Mode::Train => ModeNames {
                input: "TrainingInput",
                output: "TrainingOutput",
                request: "TrainingRequest",
                response: "TrainingResponse",
                endpoint: "/trainings",
                cancel: "/trainings/{training_id}/cancel",
                summary: "Train",
                description: "Run a single training on the model",
                operation: "train_trainings_post",
                cancel_operation: "cancel_trainings__training_id__cancel_post",
                id_param: "training_id",
            },
        }
    }
}

/// The predictions document as a JSON value (key order as Cog's).
pub fn document(signature: &Signature) -> Value {
    document_for(signature, Mode::Predict)
}

/// The document Cog's generator writes for one mode (`pkg/schema/openapi_spec.go`):
/// trainings get `TrainingInput`/`TrainingOutput`, `/trainings` and its cancel route; the
/// output keeps the title `Output` in both.
pub fn document_for(signature: &Signature, mode: Mode) -> Value {
    let names = mode.names();
    let (mut input, enums) = input_schema(&signature.inputs);
    input["title"] = json!(names.input);
    let input_ref = format!("#/components/schemas/{}", names.input);
    let output_ref = format!("#/components/schemas/{}", names.output);
    let mut schemas = Map::new();
    schemas.insert(names.input.into(), input);
    schemas.insert(names.output.into(), output_schema(&signature.output, true));
    for (name, schema) in enums {
        schemas.insert(name, schema);
    }
    let fixed = sorted(json!({
        "Request": {
            "title": names.request, "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": input_ref}
            }
        },
        "Response": {
            "title": names.response, "type": "object",
            "properties": {
                "input": {"$ref": input_ref},
                "output": {"$ref": output_ref},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"}
            }
        },
        "Status": {
            "title": "Status", "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string"
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError", "type": "object",
            "properties": {
                "detail": {"title": "Detail", "type": "array",
                           "items": {"$ref": "#/components/schemas/ValidationError"}}
            }
        },
        "ValidationError": {
            "title": "ValidationError", "required": ["loc", "msg", "type"], "type": "object",
            "properties": {
                "loc": {"title": "Location", "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"}
            }
        }
    }));
    // Insertion order of the fixed components is Cog's, not alphabetical.
    for (key, name) in [
        ("Request", names.request),
        ("Response", names.response),
        ("Status", "Status"),
        ("HTTPValidationError", "HTTPValidationError"),
        ("ValidationError", "ValidationError"),
    ] {
        schemas.insert(name.into(), fixed[key].clone());
    }

    let mut operation = json!({
        "summary": names.summary,
        "description": names.description,
        "operationId": names.operation,
        "requestBody": {"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", names.request)}}}},
        "responses": {
            "200": {"description": "Successful Response",
                    "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", names.response)}}}},
            "422": {"description": "Validation Error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
        }
    });
    if signature.streaming && mode == Mode::Predict {
        operation["x-cog-streaming"] = json!(true);
    }
    let any_ok = json!({"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}});
    let mut paths = Map::new();
    paths.insert(
        "/".into(),
        sorted(
            json!({"get": {"summary": "Root", "operationId": "root__get", "responses": any_ok}}),
        ),
    );
    paths.insert(
        "/health-check".into(),
        sorted(json!({"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": any_ok}})),
    );
    paths.insert(names.endpoint.into(), sorted(json!({ "post": operation })));
    paths.insert(
        names.cancel.into(),
        sorted(json!({"post": {
            "summary": "Cancel",
            "operationId": names.cancel_operation,
            "parameters": [{"required": true, "schema": {"title": title_case(names.id_param), "type": "string"}, "name": names.id_param, "in": "path"}],
            "responses": {
                "200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}},
                "422": {"description": "Validation Error",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
            }
        }})),
    );

    let mut components = Map::new();
    components.insert("schemas".into(), Value::Object(schemas));
    let mut info = Map::new();
    info.insert("title".into(), json!("Cog"));
    info.insert("version".into(), json!(COG_VERSION));
    let mut doc = Map::new();
    doc.insert("components".into(), Value::Object(components));
    doc.insert("info".into(), Value::Object(info));
    doc.insert("openapi".into(), json!("3.0.2"));
    doc.insert("paths".into(), Value::Object(paths));
    Value::Object(doc)
}

/// One document for a model with both `run:` and `train:`, merged as Cog's generator
/// merges them (`GenerateCombined`): the predictions document, plus the trainings
/// document's paths and component schemas it does not have already. Cog merges after a
/// round trip through Go's plain maps, so every object's keys come out sorted.
pub fn combined(predict: &Value, train: &Value) -> Value {
    let mut merged = predict.clone();
    for section in ["paths", "components"] {
        let (Some(Value::Object(into)), Some(Value::Object(from))) =
            (merged.get_mut(section), train.get(section))
        else {
            continue;
        };
        if section == "paths" {
            for (k, v) in from {
                into.entry(k.clone()).or_insert_with(|| v.clone());
            }
        } else if let (Some(Value::Object(into)), Some(Value::Object(from))) =
            (into.get_mut("schemas"), from.get("schemas"))
        {
            for (k, v) in from {
                into.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    sorted(merged)
}

/// The document as Cog writes `.cog/openapi_schema.json`: two-space indent, trailing newline.
pub fn to_cog_json(doc: &Value) -> String {
    serde_json::to_string_pretty(doc).expect("a JSON value always serializes") + "\n"
}

/// Title-cases a snake_case name the way Cog does: `fail_at` → `Fail At`.
pub fn title_case(name: &str) -> String {
    name.split('_')
        .map(|p| {
            let mut c = p.chars();
            match c.next() {
                Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A number as Go's encoder writes a float64: integral values without a fraction.
pub fn go_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

fn primitive_schema(p: Primitive) -> Value {
    match p {
        Primitive::Bool => json!({"type": "boolean"}),
        Primitive::Float => json!({"type": "number"}),
        Primitive::Int => json!({"type": "integer"}),
        Primitive::Str => json!({"type": "string"}),
        Primitive::Path | Primitive::File => json!({"type": "string", "format": "uri"}),
        Primitive::Secret => {
            json!({"type": "string", "format": "password", "writeOnly": true, "x-cog-secret": true})
        }
        Primitive::Any => json!({"type": "object"}),
    }
}

fn field_type_schema(t: &FieldType) -> Value {
    match t {
        FieldType::Prim(p) => primitive_schema(*p),
        FieldType::List(p) => json!({"type": "array", "items": sorted(primitive_schema(*p))}),
        FieldType::Union(variants) => {
            json!({"anyOf": variants.iter().map(|v| sorted(field_type_schema(v))).collect::<Vec<_>>()})
        }
    }
}

fn input_schema(inputs: &[InputField]) -> (Value, Vec<(String, Value)>) {
    let mut properties = Map::new();
    let mut required = Vec::new();
    let mut enums = Vec::new();
    for (order, field) in inputs.iter().enumerate() {
        let mut prop = Map::new();
        prop.insert("x-order".into(), json!(order));
        if !field.choices.is_empty() {
            let ty = match &field.ty {
                FieldType::Prim(p) | FieldType::List(p) => primitive_schema(*p)["type"].clone(),
                FieldType::Union(_) => json!("string"),
            };
            enums.push((
                field.name.clone(),
                sorted(json!({
                    "title": field.name, "description": "An enumeration.",
                    "enum": field.choices, "type": ty
                })),
            ));
            prop.insert(
                "allOf".into(),
                json!([{"$ref": format!("#/components/schemas/{}", field.name)}]),
            );
        } else {
            prop.insert("title".into(), json!(title_case(&field.name)));
            if let Value::Object(m) = field_type_schema(&field.ty) {
                prop.extend(m);
            }
        }
        let nullable = field.is_nullable();
        let default = field.effective_default();
        let is_union = matches!(field.ty, FieldType::Union(_));
        // Cog: a field without an effective default is required unless it is Optional.
        if default.is_none() && (is_union || !field.optional) {
            required.push(json!(field.name));
        }
        if let Some(d) = default {
            prop.insert("default".into(), go_value(d));
        }
        if nullable {
            prop.insert("nullable".into(), json!(true));
        }
        if let Some(d) = &field.description {
            prop.insert("description".into(), json!(d));
        }
        if let Some(v) = field.ge {
            prop.insert("minimum".into(), go_number(v));
        }
        if let Some(v) = field.le {
            prop.insert("maximum".into(), go_number(v));
        }
        if let Some(v) = field.min_length {
            prop.insert("minLength".into(), json!(v));
        }
        if let Some(v) = field.max_length {
            prop.insert("maxLength".into(), json!(v));
        }
        if let Some(r) = &field.regex {
            prop.insert("pattern".into(), json!(r));
        }
        if field.deprecated {
            prop.insert("deprecated".into(), json!(true));
        }
        properties.insert(field.name.clone(), sorted(Value::Object(prop)));
    }
    let mut schema = Map::new();
    schema.insert("properties".into(), Value::Object(properties));
    if !required.is_empty() {
        schema.insert("required".into(), Value::Array(required));
    }
    schema.insert("title".into(), json!("Input"));
    schema.insert("type".into(), json!("object"));
    (Value::Object(schema), enums)
}

fn output_schema(t: &OutputType, top_level: bool) -> Value {
    let mut schema = match t {
        // Any value (pydantic's `Any`: no type). A model that answers a vector or a list of
        // vectors must not be documented as an object.
        OutputType::Prim(Primitive::Any) => json!({}),
        OutputType::Prim(p) => primitive_schema(*p),
        OutputType::List(items) => json!({"type": "array", "items": output_schema(items, false)}),
        OutputType::Iterator(items) => json!({
            "type": "array", "items": output_schema(items, false), "x-cog-array-type": "iterator"
        }),
        OutputType::ConcatenateIterator(items) => json!({
            "type": "array", "items": output_schema(items, false),
            "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"
        }),
        OutputType::Object(fields) => {
            let mut properties = Map::new();
            let mut required = Vec::new();
            for (name, ty, is_required) in fields {
                let mut prop = output_schema(ty, false);
                prop["title"] = json!(title_case(name));
                if *is_required {
                    required.push(json!(name));
                }
                properties.insert(name.clone(), sorted(prop));
            }
            let mut m = Map::new();
            m.insert("properties".into(), Value::Object(properties));
            if !required.is_empty() {
                m.insert("required".into(), Value::Array(required));
            }
            m.insert("type".into(), json!("object"));
            Value::Object(m)
        }
    };
    if top_level {
        schema["title"] = json!("Output");
    }
    // `properties` keeps declaration order; everything else marshals sorted.
    sort_keys_shallow(&mut schema);
    schema
}

/// A default value as Go would marshal it after parsing the Python literal.
fn go_value(v: &Value) -> Value {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|_| n.is_f64())
            .map(go_number)
            .unwrap_or_else(|| v.clone()),
        Value::Array(a) => Value::Array(a.iter().map(go_value).collect()),
        other => other.clone(),
    }
}

/// Sorts object keys recursively, as Go's encoder does for plain maps.
fn sorted(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.sort_keys();
                m.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

fn sort_keys_shallow(v: &mut Value) {
    if let Value::Object(m) = v {
        m.sort_keys();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn title_case_matches_cog() {
        assert_eq!(title_case("fail_at"), "Fail At");
        assert_eq!(title_case("prompt"), "Prompt");
        assert_eq!(title_case("max__len"), "Max  Len");
    }

    /// An object's keys, in the document's order.
    fn keys_of(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn signature(input: &str, output: OutputType, streaming: bool) -> Signature {
        let mut field = InputField::new(input, FieldType::Prim(Primitive::Int));
        field.default = Some(json!(3));
        field.ge = Some(1.0);
        Signature {
            inputs: vec![field],
            output,
            streaming,
        }
    }

    #[test]
    fn training_document_names_what_cog_names() {
        let output = OutputType::Object(vec![(
            "weights".into(),
            OutputType::Prim(Primitive::Path),
            true,
        )]);
        let doc = document_for(&signature("steps", output, true), Mode::Train);
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let keys = keys_of(&doc["components"]["schemas"]);
        assert_eq!(
            keys,
            [
                "TrainingInput",
                "TrainingOutput",
                "TrainingRequest",
                "TrainingResponse",
                "Status",
                "HTTPValidationError",
                "ValidationError"
            ]
        );
        assert_eq!(schemas["TrainingInput"]["title"], "TrainingInput");
        assert_eq!(
            schemas["TrainingInput"]["properties"]["steps"]["minimum"],
            1
        );
        // The output schema is titled `Output` in both modes, as Cog's generator titles it.
        assert_eq!(schemas["TrainingOutput"]["title"], "Output");
        assert_eq!(
            schemas["TrainingResponse"]["properties"]["output"]["$ref"],
            "#/components/schemas/TrainingOutput"
        );
        let paths = keys_of(&doc["paths"]);
        assert_eq!(
            paths,
            [
                "/",
                "/health-check",
                "/trainings",
                "/trainings/{training_id}/cancel"
            ]
        );
        let train = &doc["paths"]["/trainings"]["post"];
        assert_eq!(train["operationId"], "train_trainings_post");
        assert_eq!(train["summary"], "Train");
        // Trainings never stream, whatever the function returns.
        assert!(train.get("x-cog-streaming").is_none());
        let cancel = &doc["paths"]["/trainings/{training_id}/cancel"]["post"];
        assert_eq!(cancel["parameters"][0]["schema"]["title"], "Training Id");
        assert_eq!(
            cancel["operationId"],
            "cancel_trainings__training_id__cancel_post"
        );
    }

    #[test]
    fn combined_document_keeps_both_modes_sorted_like_cog() {
        let predict = document(&signature("zeta", OutputType::Prim(Primitive::Str), true));
        let train = document_for(
            &signature("steps", OutputType::Prim(Primitive::Path), false),
            Mode::Train,
        );
        let doc = combined(&predict, &train);
        let paths = keys_of(&doc["paths"]);
        assert_eq!(
            paths,
            [
                "/",
                "/health-check",
                "/predictions",
                "/predictions/{prediction_id}/cancel",
                "/trainings",
                "/trainings/{training_id}/cancel"
            ]
        );
        let schemas = &doc["components"]["schemas"];
        for name in [
            "Input",
            "Output",
            "PredictionRequest",
            "TrainingInput",
            "TrainingOutput",
        ] {
            assert!(schemas.get(name).is_some(), "{name} missing");
        }
        // The predictions document wins where both have an entry.
        assert_eq!(schemas["Input"]["properties"]["zeta"]["x-order"], 0);
        assert_eq!(
            doc["paths"]["/predictions"]["post"]["x-cog-streaming"],
            true
        );
        // Go's maps: every object sorted, input properties included.
        let keys = keys_of(&schemas["Input"]["properties"]["zeta"]);
        let mut sorted_keys = keys.clone();
        sorted_keys.sort();
        assert_eq!(keys, sorted_keys);
    }

    #[test]
    fn go_numbers() {
        let doc = json!({"d": "a<b>&c", "n": go_number(5.0), "f": go_number(0.5)});
        let s = to_cog_json(&doc);
        assert!(s.contains("a<b>&c"), "{s}");
        assert!(s.contains("\"n\": 5,"), "{s}");
        assert!(s.contains("\"f\": 0.5"), "{s}");
    }
}
