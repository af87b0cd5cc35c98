//! See `check_snapshot` in shared_files.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("shared_files.rs");

// runner's allocator, so the CPU restore takes the mapped path the server takes.
#[global_allocator]
static ALLOCATOR: runner_snapshot::SnapshotAllocator = runner_snapshot::SnapshotAllocator;

fuzz_target!(|data: &[u8]| check_snapshot(data));
