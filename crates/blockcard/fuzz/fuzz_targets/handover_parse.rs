#![no_main]
//! cargo fuzz run handover_parse  (card-update state and reply bodies: bulkhead_blockcard::handover)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_blockcard::fuzzing::handover_parse(data);
});
