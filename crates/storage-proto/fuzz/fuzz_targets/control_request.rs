#![no_main]
//! cargo fuzz run control_request  (see bulkhead_storage_proto::fuzz_request)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_storage_proto::fuzz_request(data);
});
