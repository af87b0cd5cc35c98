//! `candle:files`: a weightless test architecture for file inputs and outputs, the twin of
//! Cog's file example predictor (`cog-spec/cog-0.23.1-schemas/files/predict.py`): it reads
//! a text file (`Path`, given as a URL or data URI), optionally appends a deprecated `File`
//! input, and writes `copies` files with every line prefixed (`List[Path]`).

use std::path::Path;

use runner_spec::{InputField, ModelDir, OutputType, Primitive, Signature};
use serde_json::{json, Map, Value};

use crate::{Architecture, LoadContext, LoadError, Model, PredictContext, PredictError};

pub const ARCHITECTURE: Architecture = Architecture {
    name: "files",
    summary: "no weights; reads a text file input, writes prefixed copies (file I/O tests)",
    signature,
    load,
    dtype_policy: "none",
    example_input: |_| serde_json::json!({"source": "data:text/plain;base64,aGVsbG8K"}),
    batching: false,
    needs_weights: false,
    openai: crate::OpenAi::None,
};

pub fn signature() -> Signature {
    Signature {
        inputs: vec![
            InputField::prim("source", Primitive::Path)
                .description("A text file (URL or data URI)"),
            InputField::prim("legacy", Primitive::File)
                .optional()
                .default(json!(null))
                .description("Deprecated File input"),
            InputField::prim("prefix", Primitive::Str)
                .default(json!("> "))
                .description("Prefix for each output line"),
            InputField::prim("copies", Primitive::Int)
                .default(json!(1))
                .ge(1.0)
                .le(3.0)
                .description("Number of output files"),
        ],
        output: OutputType::List(Box::new(OutputType::Prim(Primitive::Path))),
        streaming: false,
    }
}

struct Files;

fn load(
    _: &ModelDir,
    _: &candle_core::Device,
    ctx: &LoadContext,
) -> Result<Box<dyn Model>, LoadError> {
    ctx.log("files: nothing to load");
    Ok(Box::new(Files))
}

fn read_text(
    input: &Map<String, Value>,
    name: &str,
) -> Result<Option<(String, String)>, PredictError> {
    let Some(path) = input.get(name).and_then(Value::as_str) else {
        return Ok(None);
    };
    let path = Path::new(path);
    let text = std::fs::read_to_string(path).map_err(|e| {
        PredictError::Failed(format!("files: cannot read `{name}` as UTF-8 text: {e}"))
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Some((text, file_name)))
}

impl Model for Files {
    fn predict(
        &self,
        input: &Map<String, Value>,
        ctx: &PredictContext,
    ) -> Result<Value, PredictError> {
        let (mut data, file_name) = read_text(input, "source")?
            .ok_or_else(|| PredictError::Failed("files: `source` is required".into()))?;
        ctx.log(&format!(
            "files: read {} chars from {file_name}",
            data.chars().count()
        ));
        if let Some((extra, _)) = read_text(input, "legacy")? {
            data.push_str(&extra);
        }
        let prefix = input.get("prefix").and_then(Value::as_str).unwrap_or("> ");
        let copies = input.get("copies").and_then(Value::as_i64).unwrap_or(1);
        let body: String = data.lines().map(|l| format!("{prefix}{l}\n")).collect();
        let dir = ctx.output_dir();
        let mut outputs = Vec::new();
        for i in 0..copies.max(0) {
            let path = dir.join(format!("out{i}.txt"));
            std::fs::write(&path, &body).map_err(|e| {
                PredictError::Failed(format!("files: cannot write {}: {e}", path.display()))
            })?;
            outputs.push(Value::String(path.to_string_lossy().into_owned()));
        }
        Ok(Value::Array(outputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_lines_into_copies() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.txt");
        std::fs::write(&src, "hello\nworld").unwrap();
        let out = tempfile::tempdir().unwrap();
        let ctx = PredictContext::new().with_output_dir(out.path());
        let mut input = Map::new();
        input.insert("source".into(), json!(src.to_str().unwrap()));
        input.insert("prefix".into(), json!("# "));
        input.insert("copies".into(), json!(2));
        let v = Files.predict(&input, &ctx).unwrap();
        let paths = v.as_array().unwrap();
        assert_eq!(paths.len(), 2);
        for p in paths {
            let text = std::fs::read_to_string(p.as_str().unwrap()).unwrap();
            assert_eq!(text, "# hello\n# world\n");
        }
        assert_eq!(ctx.logs(), "files: read 11 chars from in.txt\n");
    }

    #[test]
    fn signature_is_what_cogs_generator_wrote() {
        crate::tests::assert_cog_schema("files", &signature());
    }
}
