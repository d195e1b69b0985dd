#![no_main]
//! cargo fuzz run live_update_message: the hand-over message parser (first byte = tag, the
//! rest = payload) never panics.
use bulkhead_hypervisor::live_update::wire::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((tag, payload)) = data.split_first() {
        let _ = Msg::parse(*tag, payload);
    }
});
