#![no_main]
//! cargo fuzz run client_option  (see bulkhead_nbd::fuzzing::client_option)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_nbd::fuzzing::client_option(data);
});
