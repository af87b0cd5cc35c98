//! Prediction input validation and coercion: any JSON body's `input` against a signature
//! with every Cog input kind and constraint gives a completed input or 422 issues.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use runner_spec::InputValidator;

include!("shared.rs");

fn validator() -> &'static InputValidator {
    static V: OnceLock<InputValidator> = OnceLock::new();
    V.get_or_init(|| InputValidator::new(&every_input_kind()).expect("the signature compiles"))
}

fuzz_target!(|data: &[u8]| check_input(validator(), data));
