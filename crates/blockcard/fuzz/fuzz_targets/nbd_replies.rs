#![no_main]
//! cargo fuzz run nbd_replies  (see bulkhead_blockcard::fuzzing::nbd_replies for the input format)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_blockcard::fuzzing::nbd_replies(data);
});
