#![no_main]
//! cargo fuzz run request_parse  (see bulkhead_blockcard::fuzzing::request_parse for the input format)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_blockcard::fuzzing::request_parse(data);
});
