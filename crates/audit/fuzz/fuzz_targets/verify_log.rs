//! The log verifier (`verify_reader`, the chain follower under it): any bytes in — records,
//! torn tails, NUL padding of a preallocated log, garbage — a chain head or a typed error out;
//! never a panic. A log that verifies still verifies with more NUL padding after it, and its
//! head counts exactly the bytes before the padding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = bulkhead_audit::verify_reader(data) {
        let mut padded = data.to_vec();
        padded.extend_from_slice(&[0u8; 100]);
        let again = bulkhead_audit::verify_reader(&padded[..]).expect("padding is accepted");
        assert_eq!(again, head);
        let bytes = usize::try_from(head.bytes).expect("fits");
        assert!(data.get(bytes..).is_some_and(|t| t.iter().all(|&b| b == 0)));
    }
});
