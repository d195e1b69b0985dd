//! The dev cluster's enrolment ceremony enrols a host's attestation key only after the host's
//! TPM proved it holds an EK certified by the (dev) manufacturer: real swtpm TPMs manufactured
//! by `swtpm_setup`, the real `bulkhead-launcher`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bulkhead_devcluster::cluster;
use bulkhead_rot::endorsement::{verify_ek_certificate, LocalManufacturer};

/// The workspace's release binaries (`make test` builds them before the tests run).
fn bins() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn only_hosts_whose_tpm_the_manufacturer_certified_are_enrolled() {
    let b = bins();
    if !cluster::can_attest(&b) {
        bulkhead_testkit::skip_or_fail(
            "endorsement ceremony: swtpm/swtpm_setup not on PATH or bulkhead-launcher not built",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    cluster::prepare(dir.path(), 2, true, &[]).unwrap();

    // Host 2's TPM was made by someone else: a manufacturer the cluster does not trust.
    let rogue = LocalManufacturer::new(&dir.path().join("rogue")).unwrap();
    rogue
        .manufacture(&dir.path().join("host-2/rot/swtpm"))
        .unwrap();

    let err = cluster::provision_attested(dir.path(), &b, 2).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("endorsement of host-2") && msg.contains("EK certificate"),
        "{msg}"
    );
    let attest = dir.path().join("kms/attest");
    // Host 1 passed the ceremony: its enrolment and EK certificate are recorded, and the
    // certificate chains to the cluster's manufacturer.
    assert!(attest.join("host-1.json").is_file());
    let der = std::fs::read(attest.join("host-1.ek.der")).unwrap();
    let trust = LocalManufacturer::new(&dir.path().join("manufacturer"))
        .unwrap()
        .trust()
        .unwrap();
    verify_ek_certificate(&der, &trust, bulkhead_rot::unix_now()).unwrap();
    // Host 2 was not enrolled: the KMS will never accept its quotes.
    assert!(!attest.join("host-2.json").exists());
    assert!(!attest.join("host-2.ek.der").exists());
    assert!(!dir.path().join("kms/attest.json").exists());
}
