//! See `check_data_uri` in shared_files.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("shared_files.rs");

fuzz_target!(|data: &[u8]| check_data_uri(data));
