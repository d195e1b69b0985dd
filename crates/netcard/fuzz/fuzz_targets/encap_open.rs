#![no_main]
//! cargo fuzz run encap_open  (see bulkhead_netcard::fuzzing::encap_open)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_netcard::fuzzing::encap_open(data);
});
