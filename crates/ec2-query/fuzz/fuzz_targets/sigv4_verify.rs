//! The SigV4 `Authorization` parser, the canonicaliser and the verifier on arbitrary input:
//! never a panic, and nothing made without the secret verifies.
//! Input layout: lines `Authorization`, `X-Amz-Date`, path, query, then the body.
#![no_main]

use bulkhead_ec2_query::sigv4::{canonical_query, canonical_request, canonical_uri};
use bulkhead_ec2_query::{Authorization, HttpRequestParts, SecretKey, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |b| *b == b'\n');
    let auth = parts.next().unwrap_or_default();
    let date = parts.next().unwrap_or_default();
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let _ = canonical_uri(&path);
    let _ = canonical_query(&query);
    let headers: [(&str, &[u8]); 4] = [
        ("Host", b"ec2.bulkhead.test"),
        ("X-Amz-Date", date),
        ("Authorization", auth),
        ("Content-Type", b"application/x-www-form-urlencoded; charset=utf-8"),
    ];
    let req = HttpRequestParts { method: "POST", path: &path, query: &query, headers: &headers, body };
    if let Ok(a) = Authorization::parse(auth) {
        let _ = canonical_request(&req, &a);
    }
    let lookup = |_: &str| Some(SecretKey::new("fuzz-secret"));
    let now = bulkhead_ec2_query::AmzDate::parse(date).map(|d| d.unix).unwrap_or(0);
    let verified = Verifier::new("bulkhead-1").verify(&req, now, &lookup);
    // A random 256-bit signature matching is not something the fuzzer can find.
    assert!(verified.is_err(), "a signature made without the secret verified");
});
