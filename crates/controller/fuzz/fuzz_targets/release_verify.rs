//! DeployRelease's release text (`bulkhead-rot`'s `SignedRelease` JSON, verified with rot's
//! checker against a fixed 2-of-3 trust root): any bytes in, a typed refusal or a verified
//! manifest naming a hypervisor out; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_controller::deploy::fuzz_verify(data);
});
