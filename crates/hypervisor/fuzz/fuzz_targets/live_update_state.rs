#![no_main]
//! cargo fuzz run live_update_state: the live-update state blob parser never panics, and what
//! it accepts encodes back to the same bytes.
use bulkhead_hypervisor::live_update::state::MachineState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = MachineState::parse(data) {
        assert_eq!(s.encode(), data);
    }
});
