//! cog.yaml parsing and validation: any text gives a config or a located error, never a
//! panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("shared.rs");

fuzz_target!(|data: &[u8]| check_cog_yaml(data));
