#![no_main]
//! cargo fuzz run sealed_blob_open  (see bulkhead_blockcard::fuzzing::sealed_blob_open for the input format)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_blockcard::fuzzing::sealed_blob_open(data);
});
