//! The host record's one parser (`HostRecord::parse`): any bytes in, a checked record or a
//! typed error out; never a panic. A record that parses must encode to bytes that parse to the
//! same record.
#![no_main]

use bulkhead_controller::record::HostRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = HostRecord::parse(data) {
        let again = HostRecord::parse(&r.encode()).expect("a parsed record re-encodes");
        assert_eq!(again, r);
    }
});
