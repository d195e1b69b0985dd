#![no_main]
//! cargo fuzz run dhcp_parse  (see bulkhead_netcard::fuzzing::dhcp_parse)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_netcard::fuzzing::dhcp_parse(data);
});
