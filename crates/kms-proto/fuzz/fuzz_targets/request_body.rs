#![no_main]
//! cargo fuzz run request_body  (see bulkhead_kms_proto::fuzz_body)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_kms_proto::fuzz_body(data);
});
