#![no_main]
//! cargo fuzz run agent_wire  (see bulkhead_rot_proto::fuzz_wire)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_rot_proto::fuzz_wire(data);
});
