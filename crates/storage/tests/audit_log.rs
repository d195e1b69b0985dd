//! The storage node's audit log under an operator's eyes (claim 6), against the real
//! `bulkhead-storage` binary with its real qemu-storage-daemon:
//! * a CreateVolume record shows the route (`op`) and the volume (`resources`: `volume:vol-7`)
//!   in clear; only the digest covers the rest of the body, here the size. Reading the log, an
//!   operator cannot confirm a guess of it: the recorded digest is keyed
//!   (`bulkhead_audit::ParamsKey`), so plain SHA-256 of a dictionary of bodies (each record's
//!   clear volume id with every size a MiB apart up to 4 GiB, the true ones among them) matches
//!   nothing — with the old unkeyed digest it did;
//! * editing one byte of a record, dropping a middle record, or cutting records off the end of
//!   the node's real log is refused by the verifier holding the node's certificate, with the
//!   typed error naming the line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::Path;

use bulkhead_audit::{
    verify_with, Anchor, AuditRecord, CheckpointKey, EntryKind, VerifyError, VerifyOptions,
};
use harness::*;

const MIB: u64 = 1 << 20;

fn create_body(id: &str, size: u64) -> Vec<u8> {
    format!(r#"{{"volume_id":"{id}","size_bytes":{size}}}"#).into_bytes()
}

fn post(node: &StorageNode, client: &bulkhead_mtls::HttpsClient, body: &[u8]) -> u16 {
    rt().block_on(client.request(
        &node.control,
        "POST",
        "/v1/CreateVolume",
        &[("content-type", "application/json")],
        body.to_vec(),
    ))
    .unwrap()
    .status
}

fn records(log: &str) -> Vec<AuditRecord> {
    log.lines()
        // A line the writer is still writing is skipped; the counts below catch a missing one.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// What an operator reads of each CreateVolume request record, in log order: the volume id it
/// shows in clear, and the digest.
fn create_records(log: &str) -> Vec<(String, String)> {
    records(log)
        .into_iter()
        .filter(|r| r.entry.kind == EntryKind::Request && r.entry.op == "CreateVolume")
        .map(|r| {
            let [volume] = r.entry.resources.as_slice() else {
                panic!("one resource per CreateVolume: {:?}", r.entry.resources);
            };
            (
                volume
                    .strip_prefix("volume:")
                    .expect("a volume resource")
                    .to_string(),
                r.entry
                    .params_sha256
                    .expect("a control request carries a digest"),
            )
        })
        .collect()
}

/// Waits until `n` CreateVolume outcome records (queued after the answer) are in the log.
fn wait_outcomes(node: &StorageNode, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = records(&node.audit_log())
            .iter()
            .filter(|r| r.entry.kind == EntryKind::Outcome && r.entry.op == "CreateVolume")
            .count();
        if got >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{got} of {n} outcomes"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut t = lines.join("\n");
    t.push('\n');
    std::fs::write(path, t).unwrap();
}

#[test]
fn an_operator_reading_the_log_cannot_confirm_a_guessed_body_nor_edit_or_cut_it_unnoticed() {
    if !have_qemu() {
        bulkhead_testkit::skip_or_fail("qemu-storage-daemon and qemu-io are not installed");
        return;
    }
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut node = StorageNode::start(&pki, dir.path(), NodeOpts::default());
    let control = pki.control_client("control");

    // A low-entropy body, sent twice (CreateVolume is idempotent), and another one.
    let secret = create_body("vol-7", 64 * MIB);
    let other = create_body("vol-8", 64 * MIB);
    assert_eq!(post(&node, &control, &secret), 200);
    assert_eq!(post(&node, &control, &secret), 200);
    assert_eq!(post(&node, &control, &other), 200);
    wait_outcomes(&node, 3);
    let first = create_records(&node.audit_log());
    assert_eq!(first.len(), 3, "one request record per call");
    let ids: Vec<&str> = first.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(
        ids,
        ["vol-7", "vol-7", "vol-8"],
        "the volume id is in clear"
    );

    // The operator's dictionary: each record's clear volume id with every size a MiB apart up to
    // 4 GiB (the hidden field).
    let mut dictionary = Vec::new();
    for (volume, _) in &first {
        for mib in 1..=4096 {
            dictionary.push(create_body(volume, mib * MIB));
        }
    }
    let digests: Vec<String> = first.iter().map(|(_, d)| d.clone()).collect();
    bulkhead_testkit::assert_digests_keyed(&digests, (&secret, &other), &dictionary);

    // A restarted node draws a new key: the same body, another digest.
    node.restart(&pki);
    assert_eq!(post(&node, &control, &secret), 200);
    wait_outcomes(&node, 4);
    let all = create_records(&node.audit_log());
    assert_eq!(all.len(), 4);
    assert_eq!(all[3].0, "vol-7");
    assert_ne!(all[3].1, first[0].1, "a restart draws a new key");

    // Tampering with the real log. The node is stopped so the file holds still; every check runs
    // on a copy the way an operator's verifier would, with the node's certificate.
    node.kill9();
    let good: Vec<String> = node.audit_log().lines().map(str::to_string).collect();
    let n = good.len();
    let copy = dir.path().join("audit-copy.log");
    let cert = std::fs::read(pki.ca.cert(NODE_NAME)).unwrap();
    let keyed = VerifyOptions {
        key: Some(CheckpointKey::from_cert_pem(&cert).unwrap()),
        ..VerifyOptions::default()
    };
    write_lines(&copy, &good);
    let head = verify_with(&copy, &keyed).unwrap();
    assert_eq!(head.records, u64::try_from(n).unwrap());
    let is_checkpoint = |l: &str| l.contains("\"kind\":\"checkpoint\"");
    let line_no = |i: usize| u64::try_from(i + 1).unwrap();

    // (a) One byte of a middle record: the secret's first request record, a digest digit.
    let k = good
        .iter()
        .position(|l| l.contains("\"op\":\"CreateVolume\"") && l.contains("\"kind\":\"request\""))
        .unwrap();
    let mut edited = good.clone();
    let at = edited[k].find("\"params_sha256\":\"").unwrap() + "\"params_sha256\":\"".len();
    let flipped = if edited[k].as_bytes()[at] == b'0' {
        "1"
    } else {
        "0"
    };
    edited[k].replace_range(at..=at, flipped);
    write_lines(&copy, &edited);
    assert_eq!(
        verify_with(&copy, &keyed).unwrap_err(),
        VerifyError::BrokenLink {
            line: line_no(k + 1)
        }
    );

    // (b) That record dropped from the middle.
    let mut dropped = good.clone();
    dropped.remove(k);
    write_lines(&copy, &dropped);
    assert_eq!(
        verify_with(&copy, &keyed).unwrap_err(),
        VerifyError::BadSeq {
            line: line_no(k),
            got: line_no(k + 1),
            want: line_no(k),
        }
    );

    // (c) Records cut off the end, the cut ending on a record. Each commit here holds one record
    // and ends with its checkpoint (requests are answered one at a time), so the cut keeps every
    // line up to the second-to-last record: it removes that record's checkpoint, the last record
    // and the last checkpoint. What the verifier can say is that the log ends on records no
    // checkpoint seals, naming the first of them; it cannot count the removed record (that takes
    // the kept head, (d)).
    let recs: Vec<usize> = (0..n).filter(|&i| !is_checkpoint(&good[i])).collect();
    let keep = recs[recs.len() - 2] + 1;
    assert!(
        good[keep..].iter().any(|l| !is_checkpoint(l)),
        "the cut removes a record, not only a checkpoint"
    );
    let sealed = (0..keep).rev().find(|&i| is_checkpoint(&good[i])).unwrap();
    write_lines(&copy, &good[..keep]);
    assert_eq!(
        verify_with(&copy, &keyed).unwrap_err(),
        VerifyError::UnsealedTail {
            line: line_no(sealed + 1),
        }
    );

    // (d) Cut back to an earlier checkpoint: the signatures alone cannot tell (documented), the
    // head a verifier kept (the control plane stores one per pull) or the checkpoint number it
    // saw can.
    write_lines(&copy, &good[..=sealed]);
    assert!(verify_with(&copy, &keyed).is_ok());
    let anchored = VerifyOptions {
        anchor: Some(Anchor {
            seq: head.records,
            hash: head.last_hash.clone(),
        }),
        ..keyed.clone()
    };
    assert_eq!(
        verify_with(&copy, &anchored).unwrap_err(),
        VerifyError::Truncated {
            line: line_no(sealed + 1),
            have: line_no(sealed),
            want: head.records,
        }
    );
    let numbered = VerifyOptions {
        min_checkpoint: Some(head.checkpoint),
        ..keyed.clone()
    };
    assert!(matches!(
        verify_with(&copy, &numbered).unwrap_err(),
        VerifyError::RolledBack { line, want, .. }
            if line == line_no(sealed + 1) && want == head.checkpoint
    ));
}
