//! The configuration disk parser (the sealed host's only per-host input): never panics, and a
//! disk it accepts re-encodes to a disk that parses to the same configuration and digest.
#![no_main]

use bulkhead_hostinit::config::{encode_disk, parse_disk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse_disk(data) {
        let again = encode_disk(&p.config).expect("an accepted configuration encodes");
        let q = parse_disk(&again).expect("a re-encoded disk parses");
        assert_eq!(q.config, p.config);
    }
});
