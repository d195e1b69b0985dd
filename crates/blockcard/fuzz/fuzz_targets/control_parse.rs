#![no_main]
//! cargo fuzz run control_parse  (see bulkhead_blockcard::fuzzing::control_parse for the input format)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_blockcard::fuzzing::control_parse(data);
});
