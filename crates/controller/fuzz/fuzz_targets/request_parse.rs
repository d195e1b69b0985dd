//! The controller's one HTTP-boundary parser: method, path, query and body in; a typed request
//! or a typed error out; never a panic.
//! Input layout: byte 0 picks the method, then the path (with optional `?query`) up to `\n`,
//! then the body.
#![no_main]

use bulkhead_controller::api::ApiRequest;
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 5] = ["GET", "POST", "DELETE", "PUT", "PATCH"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let (path, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    if let Ok(req) = ApiRequest::parse(method, path, query, body) {
        let _ = req.resources();
        let _ = req.operation();
    }
});
