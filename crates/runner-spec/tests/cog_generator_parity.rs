//! The OpenAPI documents runner writes are byte-identical to the ones Cog 0.23.1's
//! generator wrote for the same Python signatures (copied into cog-spec/cog-0.23.1-schemas).
//! The `files` and `stream` schemas are checked against the architectures that implement
//! them, in runner-models (`signature_is_what_cogs_generator_wrote`).

use runner_spec::openapi::{document, to_cog_json};
use runner_spec::{FieldType, InputField, OutputType, Primitive, Signature};

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
