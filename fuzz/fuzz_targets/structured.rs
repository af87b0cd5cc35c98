//! See `check_structured` in shared_files.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("shared_files.rs");

fuzz_target!(|data: &[u8]| check_structured(data));
