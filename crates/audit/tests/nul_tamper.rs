//! An operator with the disk attacks the preallocated log's NUL padding (format 2): records
//! overwritten with NUL bytes must not pass verification as "unused space", except where the
//! result is exactly a truncation back to a checkpoint — which a head anchor (what the control
//! plane pulled last) still catches, as it does for a truncated format-1 log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bulkhead_audit::{
    Anchor, AuditEntry, AuditLog, CheckpointSigner, Decision, EntryKind, LogOptions, VerifyError,
    VerifyOptions,
};

fn entry(i: usize) -> AuditEntry {
    AuditEntry {
        kind: EntryKind::Request,
        request_id: format!("r{i}"),
        caller: "customer".into(),
        cert_sha256: None,
        token_id: None,
        op: "AttachVolume".into(),
        resources: vec![format!("volume:v-{i}")],
        params_sha256: None,
        decision: Decision::Allow,
        code: "ok".into(),
    }
}

/// Byte ranges of each complete record line (newline included) before the padding.
fn record_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'\n' {
            spans.push((start, i + 1));
            start = i + 1;
        }
        if *b == 0 && start == i {
            break;
        }
    }
    spans
}

fn nul_out(bytes: &[u8], from: usize, to: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b.get_mut(from..to).unwrap().fill(0);
    b
}

#[test]
fn records_overwritten_with_nul_bytes_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let der = {
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec()
    };
    let signer = Arc::new(CheckpointSigner::from_pkcs8_der(&der).unwrap());
    let (log, _) = AuditLog::open_with_options(
        &path,
        LogOptions {
            signer: Some(Arc::clone(&signer)),
            preallocate: true,
        },
    )
    .unwrap();
    for i in 0..12 {
        log.append_blocking(entry(i)).unwrap();
    }
    // The file as a killed writer leaves it: records, then preallocated NUL space.
    let bytes = std::fs::read(&path).unwrap();
    drop(log);
    let spans = record_spans(&bytes);
    assert!(
        bytes.len() > spans.last().unwrap().1,
        "no padding: not format 2"
    );
    let line = |k: usize| &bytes[spans[k].0..spans[k].1];
    let is_checkpoint = |k: usize| String::from_utf8_lossy(line(k)).contains("\"checkpoint\"");
    let key = signer.verifying_key();
    let check = |b: &[u8], anchor: Option<Anchor>| {
        let p = dir.path().join("tampered.log");
        std::fs::write(&p, b).unwrap();
        let opts = VerifyOptions {
            key: Some(key.clone()),
            anchor,
            ..VerifyOptions::default()
        };
        bulkhead_audit::verify_with(&p, &opts)
    };
    // The intact file verifies, padding and all; its head is what a puller anchors on.
    let head = check(&bytes, None).expect("the intact log verifies");
    assert_eq!(usize::try_from(head.records).unwrap(), spans.len());
    let last = spans.len() - 1;
    let anchor = || {
        Some(Anchor {
            seq: head.records,
            hash: bulkhead_audit::line_hash(&line(last)[..line(last).len() - 1]),
        })
    };
    assert!(check(&bytes, anchor()).is_ok(), "the anchor names the head");

    // A record in the middle zeroed (its newline too): the chain breaks there.
    let mid = spans.len() / 2;
    let b = nul_out(&bytes, spans[mid].0, spans[mid].1);
    assert!(check(&b, None).is_err(), "a zeroed middle record verified");
    // Only part of a record zeroed: not a record, not padding.
    let b = nul_out(&bytes, spans[mid].0 + 5, spans[mid].0 + 20);
    assert!(check(&b, None).is_err(), "a partly zeroed record verified");
    // The tail zeroed from a request record on (so the log no longer ends at a checkpoint).
    let cut = (1..spans.len())
        .rev()
        .find(|&k| !is_checkpoint(k) && is_checkpoint(k - 1))
        .expect("a request record right after a checkpoint");
    let after_request = cut + 1;
    assert!(!is_checkpoint(cut));
    let b = nul_out(&bytes, spans[after_request].0, spans[last].1);
    assert!(
        check(&b, None).is_err(),
        "a tail zeroed after an unsealed request verified"
    );
    // The tail zeroed back to a checkpoint: a truncation in NUL bytes. Like a truncated log it
    // verifies on its own (its seals agree) — and fails against the head already pulled.
    let b = nul_out(&bytes, spans[cut].0, spans[last].1);
    let short = check(&b, None).expect("cut back to a checkpoint: the seals agree");
    assert_eq!(usize::try_from(short.records).unwrap(), cut);
    assert!(
        matches!(check(&b, anchor()), Err(VerifyError::Truncated { .. })),
        "the pulled head did not catch records zeroed at the tail"
    );
}
