#![no_main]
//! cargo fuzz run virtio_chain  (see bulkhead_netcard::fuzzing::virtio_chain)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_netcard::fuzzing::virtio_chain(data);
});
