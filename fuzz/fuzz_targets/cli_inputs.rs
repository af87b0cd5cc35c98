//! See `check_cli_inputs` in shared_files.rs.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

include!("shared.rs");
include!("shared_files.rs");

static SIGNATURE: OnceLock<runner_spec::Signature> = OnceLock::new();

fuzz_target!(|data: &[u8]| check_cli_inputs(SIGNATURE.get_or_init(every_input_kind), data));
