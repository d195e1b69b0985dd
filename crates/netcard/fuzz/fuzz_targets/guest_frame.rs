#![no_main]
//! cargo fuzz run guest_frame  (see bulkhead_netcard::fuzzing::guest_frame)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_netcard::fuzzing::guest_frame(data);
});
