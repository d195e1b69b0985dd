//! The BH1 `Authorization` parser, the date parser and the verifier on arbitrary input: never a
//! panic, and nothing made without the secret verifies.
//! Input layout: lines `Authorization`, `x-bh-date`, `x-bh-nonce`, path, then the body.
#![no_main]

use bulkhead_ec2_query::bh1::{self, Authorization, SignedParts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |b| *b == b'\n');
    let mut line = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (auth, date, nonce, path, body) = (line(), line(), line(), line(), line());
    let now = bh1::parse_date(&date).unwrap_or(0);
    let p = SignedParts {
        method: "POST".into(),
        path,
        query: String::new(),
        host: "control.bulkhead.test".into(),
        date,
        body,
        nonce,
    };
    let _ = bh1::canonical_request(&p);
    if let Ok(a) = Authorization::parse(&auth) {
        // A random 256-bit signature matching is not something the fuzzer can find.
        assert!(
            bh1::verify(&a, b"fuzz-secret", &p, now, 300).is_err(),
            "a signature made without the secret verified"
        );
    }
});
