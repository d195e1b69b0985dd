#![no_main]
//! cargo fuzz run body_parse  (see bulkhead_controller_proto::fuzz_body)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_controller_proto::fuzz_body(data);
});
