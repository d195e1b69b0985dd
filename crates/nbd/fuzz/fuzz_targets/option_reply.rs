#![no_main]
//! cargo fuzz run option_reply  (see bulkhead_nbd::fuzzing::option_reply)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_nbd::fuzzing::option_reply(data);
});
