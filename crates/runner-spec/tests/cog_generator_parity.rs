//! The OpenAPI documents runner writes are byte-identical to the ones Cog 0.23.1's
//! generator wrote for the same Python signatures (copied into cog-spec/cog-0.23.1-schemas).

use runner_spec::openapi::{document, to_cog_json};
use runner_spec::{FieldType, InputField, OutputType, Primitive, Signature};
use serde_json::json;

fn reference(name: &str) -> String {
    let path = format!(
        "{}/../../cog-spec/cog-0.23.1-schemas/{name}/openapi_schema.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_same(name: &str, signature: &Signature) {
    let ours = to_cog_json(&document(signature));
    let theirs = reference(name);
    if ours != theirs {
        for (i, (a, b)) in ours.lines().zip(theirs.lines()).enumerate() {
            assert_eq!(a, b, "{name}: first difference at line {}", i + 1);
        }
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{name}: documents differ in length"
        );
    }
}

#[test]
fn files_predictor() {
    // predict(source: Path, legacy: Optional[File] = None, prefix: str = "> ", copies: int = Input(1, ge=1, le=3)) -> List[Path]
    assert_same(
        "files",
        &Signature {
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
        },
    );
}

#[test]
fn stream_runner() {
    assert_same(
        "stream",
        &Signature {
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
        },
    );
}

#[test]
fn setup_fail_predictor() {
    assert_same(
        "setup_fail",
        &Signature {
            inputs: vec![InputField::new("text", FieldType::Prim(Primitive::Str))],
            output: OutputType::Prim(Primitive::Str),
            streaming: false,
        },
    );
}
