#![no_main]
//! cargo fuzz run simple_reply  (see bulkhead_nbd::fuzzing::simple_reply)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_nbd::fuzzing::simple_reply(data);
});
