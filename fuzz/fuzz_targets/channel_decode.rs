//! Fuzzes the hypervisor's command-channel parser: arbitrary bytes must give a typed error or
//! a request that re-encodes to an equivalent frame, never a panic.
#![no_main]

use bulkhead_channel::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::parse_frame(data) {
        let again = Request::parse_frame(&req.encode()).expect("re-encoded request parses");
        assert_eq!(again, req);
    }
    let _ = Response::parse_frame(data);
});
